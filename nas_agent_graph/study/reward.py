"""The reward of a proposal, defined in one place (used for LoRA samples and reports).

reward = 0.5 + 0.5 * tanh(relative_improvement / SCALE) for a run that produced a
validation MSE, where relative_improvement = (incumbent_val - val) / incumbent_val,
measured against the incumbent at the time of the proposal. So:
    0.5   as good as the incumbent;   ~0.88 5 % better;   ~0.12 5 % worse;
    -1.0  a run that failed, diverged or produced no validation MSE.
The very first run of a study (no incumbent yet) gets 0.5 when it succeeds.
A reward threshold of 0.7 (planned default for choosing LoRA training samples) means about
2 % better than the incumbent.
"""
from __future__ import annotations

import math
from typing import Optional
from nas_agent.run_folder import SCORED

SCALE = 0.05
FAILURE = -1.0


def compute_reward(status: str, val_mse: Optional[float], incumbent_val: Optional[float]) -> float:
    if status not in SCORED or val_mse is None or not math.isfinite(val_mse):
        return FAILURE
    if incumbent_val is None or not math.isfinite(incumbent_val) or incumbent_val <= 0:
        return 0.5
    rel = (incumbent_val - val_mse) / incumbent_val
    return 0.5 + 0.5 * math.tanh(rel / SCALE)
