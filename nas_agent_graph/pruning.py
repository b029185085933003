"""Learning-curve pruning: stop a running train.py whose curve looks worse than earlier runs'.

After every epoch of a running trial, the orchestrator calls `prune_decision` with the
per-epoch validation MSE of the earlier runs and of the running one. It rebuilds an
in-memory Optuna study from those curves (earlier runs as finished trials with their
intermediate values, the running run as a fresh trial that reports its epochs one by one)
and asks Optuna's pruner:

* ``median``: `optuna.pruners.MedianPruner`: prune when the running run's best val MSE so
  far is worse than the median of the finished (status ok/timeout) runs' val MSE at the
  same epoch.
* ``asha``: `optuna.pruners.SuccessiveHalvingPruner` (reduction factor 3, first rung at
  the first epoch after the warm-up): at epochs warmup+1, 3(warmup+1), 9(warmup+1)... a run
  goes on only while its val MSE at that epoch is in the best third of every run (pruned
  ones included) that reached it.

Warm-up: no run is pruned at an epoch <= `warmup_epochs`, nor while fewer than `min_runs`
earlier runs have finished (ok or timeout). A run that is pruned stops at once (see
train.py's PRUNE request); the decision says why (epoch, value, threshold).

This module is pure: no files, no processes. `curve_of` reads an earlier run's curve from
its record (extra.curve) or, for runs recorded before curves were stored, its history.json.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from nas_agent.agent_state import AgentState, RunInfo
from nas_agent.logging_utils import load_history
from nas_agent.run_folder import SCORED

log = logging.getLogger(__name__)

PRUNERS = ("none", "median", "asha")
ASHA_REDUCTION_FACTOR = 3
# The pruning study needs one parameter per trial; this dummy one carries no information.
_DUMMY = {"x": 0.0}
_DUMMY_DIST = {"x": FloatDistribution(0.0, 1.0)}


@dataclass(frozen=True)
class PastCurve:
    """An earlier run's per-epoch val MSE (index 0 = epoch 1) and whether it was pruned."""
    run_id: str
    values: tuple[float, ...]
    pruned: bool = False


@dataclass(frozen=True)
class PruneDecision:
    """Why a run should stop: the method, the epoch and value compared, and the threshold."""
    method: str
    epoch: int
    value: float
    threshold: float | None
    n_runs: int

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text()}

    def text(self) -> str:
        what = "best val_mse so far" if self.method == "median" else "val_mse"
        cut = "the median" if self.method == "median" else "the best-third cut-off"
        threshold = "n/a" if self.threshold is None else f"{self.threshold:.6f}"
        return (f"pruned ({self.method}) at epoch {self.epoch}: {what} {self.value:.6f} is worse than {cut} "
                f"{threshold} of {self.n_runs} earlier run(s) at that epoch")


def check_settings(method: str, warmup_epochs: int, min_runs: int) -> None:
    """Raise ValueError with a clear message for settings that make no sense."""
    if method not in PRUNERS:
        raise ValueError(f"--prune: unknown pruner {method!r}; choose one of {', '.join(PRUNERS)}")
    if warmup_epochs < 0 or min_runs < 1:
        raise ValueError(f"--prune-warmup: expected EPOCHS >= 0 and RUNS >= 1, got {warmup_epochs},{min_runs}")


def _finite(values: Sequence) -> tuple[float, ...] | None:
    """The curve as floats, or None if any value is missing or non-finite (a diverged run)."""
    out = []
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return None
        out.append(float(v))
    return tuple(out)


def prune_decision(method: str, past: Sequence[PastCurve], current: Sequence[float], *, warmup_epochs: int = 1,
                   min_runs: int = 3) -> PruneDecision | None:
    """Whether the running run, whose per-epoch val MSE so far is `current`, should be pruned
    now (after its last epoch); None means go on. Pure: the same inputs give the same answer."""
    check_settings(method, warmup_epochs, min_runs)
    cur = _finite(current)
    epoch = len(current)
    finished = [c for c in past if not c.pruned and c.values]
    if method == "none" or cur is None or epoch <= warmup_epochs or len(finished) < min_runs:
        return None  # a non-finite value is train.py's to report (status diverged), not ours
    if method == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0)
    else:
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup_epochs + 1,
                                                        reduction_factor=ASHA_REDUCTION_FACTOR,
                                                        min_early_stopping_rate=0)
    study = optuna.create_study(direction="minimize", pruner=pruner, sampler=optuna.samplers.RandomSampler(0))
    for curve in past:
        values = curve.values
        if not values:
            continue
        attrs = _asha_rungs(values, warmup_epochs + 1) if method == "asha" else {}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED if curve.pruned else TrialState.COMPLETE,
            value=None if curve.pruned else min(values), params=_DUMMY, distributions=_DUMMY_DIST,
            intermediate_values={i + 1: v for i, v in enumerate(values)}, system_attrs=attrs,
            user_attrs={"run_id": curve.run_id}))
    trial = study.ask(_DUMMY_DIST)
    for step, value in enumerate(cur, 1):  # replayed epoch by epoch, as a live trial would have been
        trial.report(value, step)
        # Past the warm-up only. An earlier epoch can fail the test when the live search could not
        # yet ask (too few finished runs then, or an epoch written while the last one was read):
        # the run is pruned now, with the comparison that failed.
        if step > warmup_epochs and trial.should_prune():
            threshold, n = _threshold(method, study, trial, cur[:step], step)
            return PruneDecision(method=method, epoch=step, value=min(cur[:step]) if method == "median" else value,
                                 threshold=threshold, n_runs=n)
    return None


def _asha_rungs(values: Sequence[float], min_resource: int) -> dict:
    """The rung records Optuna's SuccessiveHalvingPruner would have left on a trial with this curve."""
    attrs, rung = {}, 0
    while (step := min_resource * ASHA_REDUCTION_FACTOR ** rung) <= len(values):
        attrs[f"completed_rung_{rung}"] = values[step - 1]
        rung += 1
    return attrs


def _threshold(method: str, study: optuna.Study, trial: optuna.Trial, cur: tuple, epoch: int):
    """(the value the run had to beat, how many earlier runs it was compared with), for the record."""
    others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
    if method == "median":
        at = [t.intermediate_values[epoch] for t in others
              if t.state == TrialState.COMPLETE and epoch in t.intermediate_values]
        return (float(np.median(at)) if at else None), len(at)
    frozen = study.get_trials(deepcopy=False)[trial.number]
    rungs = [k for k in frozen.system_attrs if k.startswith("completed_rung_")]
    key = max(rungs, key=lambda k: int(k.rsplit("_", 1)[1])) if rungs else "completed_rung_0"
    competing = sorted([t.system_attrs[key] for t in others if key in t.system_attrs] + [cur[-1]])
    idx = max(len(competing) // ASHA_REDUCTION_FACTOR - 1, 0)
    return competing[idx], len(competing) - 1


def curve_of(run: RunInfo, runs_dir: Path | None = None) -> tuple[float, ...] | None:
    """An earlier run's per-epoch val MSE: extra.curve, else its history.json; None if unknown."""
    curve = run.extra.get("curve") if isinstance(run.extra, dict) else None
    if curve is None and runs_dir is not None:
        try:
            curve = [h.get("val_mse") for h in load_history(Path(runs_dir) / run.run_id)["epochs"]]
        except (OSError, ValueError):
            curve = None
    return _finite(curve) if curve else None


def past_curves(state: AgentState, runs_dir: Path | None = None) -> list[PastCurve]:
    """The curves the pruner compares with: finished (ok, timeout) and pruned runs."""
    out = []
    for run in state.runs:
        if run.status not in SCORED + ("pruned",):
            continue
        curve = curve_of(run, runs_dir)
        if curve:
            out.append(PastCurve(run.run_id, curve, pruned=run.status == "pruned"))
    return out
