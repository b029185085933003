"""runs/phases.jsonl: where the orchestrator's time goes, one line per timed phase.

    {"at": 1764612345.12, "run_id": "run_0003", "phase": "decide", "s": 0.0412}

Each graph node is timed as a whole (graph.py wraps it with `timed_node`), the checkpoint
writes between nodes as "checkpoint", and a few parts of nodes as "NODE/PART" (the smoke
test, the optuna mirror, agent_state.json saves); a part's time is also inside its node's.
bench/overhead.py reads the file into a per-phase table and compares it with the time spent
inside train.py.

This is a diagnostic log, not state: lines are appended without fsync (a crash can tear the
last line, which `read_phases` skips), nothing reads it back to make a decision, and a failed
write is logged once and never stops the search.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

PHASES_FILE = "phases.jsonl"


class PhaseLog:
    """Appends timed phases to runs_dir/phases.jsonl; `run_id` is the run the graph works on."""

    def __init__(self, runs_dir: Path):
        self.path = Path(runs_dir) / PHASES_FILE
        self.run_id: str | None = None
        self._failed = False

    def record(self, phase: str, seconds: float, run_id: str | None = None) -> None:
        line = json.dumps({"at": round(time.time(), 3), "run_id": run_id or self.run_id, "phase": phase,
                           "s": round(seconds, 4)})
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:  # a diagnostic: never worth stopping the search for
            if not self._failed:
                log.warning("cannot append to %s (%s); phase timings are not recorded", self.path, e)
                self._failed = True

    @contextmanager
    def span(self, phase: str, run_id: str | None = None) -> Iterator[None]:
        """Time the block as `phase` (recorded even when it raises)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.record(phase, time.monotonic() - start, run_id)


def phase_log(ctx: Any) -> PhaseLog:
    """The session's PhaseLog (ctx.session.phases), made on first use."""
    if ctx.session.phases is None:
        ctx.session.phases = PhaseLog(ctx.runs_dir)
    return ctx.session.phases


def timed_node(name: str, fn: Callable) -> Callable:
    """The node `fn`, recording its wall time as phase `name` for the run it worked on (the run id
    it set, else the one it was given). functools.wraps keeps the (state, runtime) signature that
    LangGraph inspects."""

    @functools.wraps(fn)
    def node(state, runtime):
        phases = phase_log(runtime.context)
        start = time.monotonic()
        out = fn(state, runtime)
        run_id = (out or {}).get("run_id") or state.get("run_id")
        if run_id:
            phases.run_id = run_id
        phases.record(name, time.monotonic() - start, run_id)
        return out

    return node


def timed_saver(saver: Any, phases: PhaseLog) -> Any:
    """`saver` (a LangGraph checkpointer) with its writes timed as phase "checkpoint"."""
    for method in ("put", "put_writes"):
        original = getattr(saver, method)

        def timed(*args, _original=original, **kwargs):
            with phases.span("checkpoint"):
                return _original(*args, **kwargs)

        setattr(saver, method, timed)
    return saver


def read_phases(runs_dir: Path) -> list[dict]:
    """Every whole line of runs_dir/phases.jsonl (a torn last line is skipped)."""
    path = Path(runs_dir) / PHASES_FILE
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
