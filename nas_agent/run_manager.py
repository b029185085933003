"""Run folders: naming (run_0000, run_0001, ...), locating, and config snapshots."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

from nas_agent._atomic import atomic_write_text
from nas_agent.config import render_config
from nas_agent.schema import Config

log = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^run_(\d{4,})$")


def get_run_dir(runs_dir: str | Path, run_id: str) -> Path:
    """The folder of a run. Run ids are checked so a proposal cannot name '../x'."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"bad run id {run_id!r}: expected run_ followed by digits, e.g. run_0007")
    return Path(runs_dir) / run_id


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


def snapshot_config(config: Config | dict, path: str | Path, header: str = "") -> Path:
    """Write a config as a loadable config file, atomically."""
    path = Path(path)
    atomic_write_text(path, render_config(config, header=header))
    return path
