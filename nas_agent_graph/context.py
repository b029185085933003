"""Run-scoped settings: what one invocation of the orchestrator was asked to do.

These come from the command line and are not part of the checkpointed graph state:
a resumed study may be continued with a larger --max-runs or a new --run-timeout.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    state_path: Path = Path("agent_state.json")
    """agent_state.json: the study's single source of truth."""
    runs_dir: Path = Path("runs")
    """Parent of the run folders; also holds the checkpoint database and the report."""
    config_path: Path = Path("config.py")
    """The incumbent config: the study's starting point, overwritten by each accepted run."""
    max_runs: int = 100
    """Total runs in the study, earlier sessions included."""
    proposer: str = "tpe"
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """--set KEY=VALUE applied to every proposal (e.g. training.max_epochs=3)."""
    space_path: Optional[Path] = None
    run_timeout: Optional[float] = None
    """Hard wall-clock limit per train.py process, seconds; the process group is killed."""
    max_params: Optional[int] = None
    min_delta: float = 0.0
    """Accept only when val_mse < best - min_delta."""
    patience: Optional[int] = None
    """Stop after this many runs in a row without an accepted improvement."""
    time_budget: Optional[float] = None
    """Stop once the study has used this many seconds of wall-clock time (all sessions)."""
    target_mse: Optional[float] = None
    max_retries: int = 3
    """Invalid proposals allowed for one run before the search stops."""
    max_failures: int = 3
    """Failed runs in a row before the search stops with a diagnosis."""
    smoke_timeout: float = 120.0
    python: str = sys.executable
    train_script: Path = ROOT / "train.py"
    env: Optional[dict[str, str]] = None
    """Environment of train.py subprocesses (default: this process's)."""

    # Built once per invocation by the CLI; not settings.
    proposer_obj: Any = None
    space: Any = None
    display: Any = None
    started_at: float = 0.0
    """time.monotonic() at the start of this session, for the study's time budget."""

    @property
    def checkpoint_path(self) -> Path:
        return self.runs_dir / "checkpoints.sqlite"
