"""Run folders: naming (run_0000, run_0001, ...), locating, and config snapshots.

As in the original nas_system, `get_run_dir("run_0000")` makes and returns runs/run_0000 in
the current directory, and `snapshot_config(Path("config.py"), run_dir)` copies the config
file into it as config_used.py.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

from nas_agent.atomic import atomic_write_text
from nas_agent.run_folder import CONFIG_USED_FILE

log = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^run_(\d{4,})$")
RUNS_DIR = "runs"
LOG_ALLOWANCE_BYTES = 16 * 1024 ** 2  # train.log, history.json, learning_curve.png, config files


def run_size_estimate(n_params: int | None) -> int:
    """Bytes a run writes: best_model.pth (float32 weights, and as much again in transient copies) plus
    logs. The orchestrator checks it before a launch (nas_agent_graph/disk.py), train.py after building
    the model when the orchestrator did not know the parameter count (its smoke test ran in the run)."""
    return (n_params or 0) * 4 * 2 + LOG_ALLOWANCE_BYTES


def get_run_dir(run_id: str, runs_dir: str | Path = RUNS_DIR, *, create: bool = True) -> Path:
    """The folder of a run, made if missing unless create=False.

    Run ids are checked so a proposal cannot name '../x'.
    """
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValueError(f"bad run id {run_id!r}: expected run_ followed by digits, e.g. run_0007 "
                         f"(the call is get_run_dir(run_id, runs_dir))")
    path = Path(runs_dir) / run_id
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def run_id_for(index: int) -> str:
    """The id of the run at position `index` of a study: run_0000, run_0001, ..."""
    return f"run_{index:04d}"


def ids_in_order(ids: set[str]) -> bool:
    """True when `ids` are exactly run_0000 .. run_N (ids are handed out in order, none skipped)."""
    return ids == {run_id_for(i) for i in range(len(ids))}


def next_run_id(runs_dir: str | Path, known_ids: Iterable[str] = ()) -> str:
    """The next free id: one past the highest of the known ids and the folders on disk."""
    numbers = [int(m.group(1)) for rid in known_ids if (m := RUN_ID_RE.match(rid))]
    runs = Path(runs_dir)
    if runs.is_dir():
        numbers += [int(m.group(1)) for p in runs.iterdir() if p.is_dir() and (m := RUN_ID_RE.match(p.name))]
    return run_id_for(max(numbers, default=-1) + 1)


def snapshot_config(config_path: str | Path, run_dir: str | Path) -> Path:
    """Copy a config file, as written, into run_dir as config_used.py (atomically); return its path.

    train.py writes the effective config instead (nas_agent.config.write_config), since --set
    overrides are not in the file.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_USED_FILE
    atomic_write_text(path, Path(config_path).read_text(encoding="utf-8"))
    return path
