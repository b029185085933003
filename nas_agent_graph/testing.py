"""What the tests and the benchmarks share (as optuna.testing does): a tiny search space over every
family, and a synthetic study of any size. Nothing here trains or loads a model."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

from nas_agent.agent_state import AgentState, RunInfo, add_run
from nas_agent.config import load_config
from nas_agent_graph.paths import ROOT
from nas_agent_graph.search_space import load_space

TINY_SPACE = {  # every family of the default space, at tiny sizes
    "model.n_heads": {"type": "categorical", "choices": [2]},
    "model.d_model": {"type": "categorical", "choices": [8, 16]},
    "model.e_layers": {"type": "int", "low": 1, "high": 2},
    "model.d_layers": None,
    "model.d_ff": {"type": "categorical", "choices": [16, 32]},
    "data.seq_len": {"type": "categorical", "choices": [48]},
    "model.decomp_kernel": {"type": "categorical", "choices": [13, 25]},  # <= seq_len
    "data.label_frac": {"type": "categorical", "choices": [0.5]},
    "training.batch_size": {"type": "categorical", "choices": [32]},
}


def synthetic_study(n: int, seed: int = 0) -> AgentState:
    """n runs drawn from the default space: most ok, some failed with long tracebacks, long summaries."""
    rng = random.Random(seed)
    space, base = load_space(None), load_config(ROOT / "config.py").model_dump()
    state = AgentState(max_runs=n)
    best = None
    for i in range(n):
        params = {}
        for key, entry in space.entries.items():
            if not space.is_active(key, params, base):
                continue  # define-by-run, as the samplers draw
            if entry["type"] == "categorical":
                params[key] = rng.choice(entry["choices"])
            elif entry["type"] == "int":
                params[key] = rng.randint(entry["low"], entry["high"])
            else:
                params[key] = rng.uniform(entry["low"], entry["high"])
        config = space.to_config(params, base)
        failed = i % 7 == 3
        val = None if failed else 0.4 + rng.random()
        accepted = val is not None and (best is None or val < best)
        best = val if accepted else best
        add_run(state, RunInfo(
            run_id=f"run_{i:04d}", status="failed" if failed else "ok", val_mse=val,
            test_mse=None if failed else 7.654321, accepted=accepted, proposer="tpe", config=config,
            reason="status failed" if failed else "worse", history_summary="The loss went down and up. " * 30,
            error_tail=("Traceback (most recent call last):\n" + "  File x.py, line 1\n" * 80
                        + "RuntimeError: CUDA out of memory") if failed else None))
    return state


def pause_point(node: str, run_id: str, runs_dir: Path) -> None:
    """Crash-test hook: NAS_AGENT_TEST_PAUSE="propose:run_0001:30" makes that node touch
    runs/.paused_in_propose and sleep 30 s, so a test can SIGKILL the orchestrator there."""
    spec = os.environ.get("NAS_AGENT_TEST_PAUSE", "")
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == node and parts[1] == run_id:
        (runs_dir / f".paused_in_{node}").touch()
        time.sleep(float(parts[2]))
