"""Run folders that agent_state.json has not recorded yet: runs in flight, and interrupted ones.

A run enters agent_state.json when it ends (the `decide` node), so without this a run that has
trained for minutes, then was stopped by Ctrl-C, shows nowhere in `status`. What a folder says
is read here, never changed: the orchestrator owns the folders. A resume reruns an interrupted
run from scratch (its files are moved into attempt_N/ first) and records a run that finished
before the orchestrator could record it, without training it again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from nas_agent.agent_state import AgentState
from nas_agent.config import ConfigError, load_config
from nas_agent.logging_utils import MetricsError, load_history, load_metrics
from nas_agent.run_folder import CONFIG_FILE, LAUNCH_FILE
from nas_agent_graph.launcher import is_live_child, launch_record

_RUN_DIR = re.compile(r"^run_\d{4,}$")


@dataclass
class FolderRun:
    run_id: str
    state: str
    """"in flight" (its train.py runs), "interrupted", or "finished" (not recorded yet)."""
    epochs: int
    """Epochs completed (history.json)."""
    max_epochs: int | None
    best_val: float | None
    """Lowest validation MSE of the completed epochs."""
    started_at: str | None
    attempts: int
    """Earlier attempts moved aside into attempt_N/."""


def unrecorded_runs(study: AgentState, runs_dir: Path) -> list[FolderRun]:
    """Every run_XXXX folder of runs_dir that the study has not recorded, in run order."""
    recorded = {r.run_id for r in study.runs}
    if not runs_dir.is_dir():
        return []
    out = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and _RUN_DIR.match(p.name)):
        if folder.name not in recorded and (folder / LAUNCH_FILE).exists():
            out.append(_read(folder))
    return out


def _read(folder: Path) -> FolderRun:
    record = launch_record(folder) or {}  # read once: liveness and start time both come from it
    try:
        metrics = load_metrics(folder)
    except MetricsError:
        metrics = None
    if is_live_child(folder, record):
        state = "in flight"
    elif metrics is not None and metrics.get("status") != "interrupted":
        state = "finished"
    else:
        state = "interrupted"
    try:
        epochs = load_history(folder)["epochs"]
    except MetricsError:
        epochs = []
    vals = [e["val_mse"] for e in epochs if isinstance(e.get("val_mse"), (int, float)) and math.isfinite(e["val_mse"])]
    try:
        max_epochs = load_config(folder / CONFIG_FILE).training.max_epochs
    except (ConfigError, OSError):
        max_epochs = None
    return FolderRun(run_id=folder.name, state=state, epochs=len(epochs), max_epochs=max_epochs,
                     best_val=min(vals) if vals else None, started_at=record.get("started_at"),
                     attempts=sum(1 for p in folder.glob("attempt_*") if p.is_dir()))


def describe(run: FolderRun) -> str:
    """One line: what the folder holds and what a resume will do with it."""
    of = f"/{run.max_epochs}" if run.max_epochs else ""
    best = f", best val MSE {run.best_val:.4f}" if run.best_val is not None else ""
    then = {"in flight": "training now",
            "interrupted": "a resume trains it again from scratch",
            "finished": "finished; a resume records it without training it again"}[run.state]
    earlier = f", {run.attempts} earlier attempt(s) kept in attempt_N/" if run.attempts else ""
    since = f", started {run.started_at}" if run.started_at else ""
    return f"{run.run_id}: {run.state}, {run.epochs}{of} epochs done{best}{since}{earlier}: {then}"
