"""The search's single source of truth: agent_state.json.

Everything the agent knows about a search (which runs happened, how they did,
which one is best, which proposals were rejected) lives in one JSON file, so a
search can be stopped and resumed, inspected with `cat`, and repaired by hand.
It is written atomically with the previous version kept as
`agent_state.json.bak`, and a corrupt file is never overwritten.

JSON schema (version 1). The original nas_system's keys are required (max_runs,
best_run_id, runs; and run_id, val_mse, test_mse, history_summary, accepted in a
run), so its files load as they are; the keys this project added are optional
when reading and take the defaults below. Saving always writes every key.

    {
      "version":     int, optional (default 1, STATE_VERSION; the original format
                     has none). A larger number means the file was written by a
                     newer nas_agent and is refused.
      "max_runs":    int >= 1 or null. Run budget of the search; null = unlimited.
      "best_run_id": str or null. run_id of the current best run; it must name a
                     run in "runs" whose "accepted" is true. null = no run accepted yet.
      "runs":        list of run objects, in launch order (see below); run_ids unique.
      "rejected":    list, optional (default []), one object per proposal that failed validation and
                     was never run:
                       "attempt":  int, the proposal attempt number (0-based).
                       "proposer": str, who proposed it (e.g. "llm", "random").
                       "config":   any JSON value, the proposal as received.
                       "error":    str, why it was rejected.
                       "at":       str, ISO-8601 UTC time of the rejection.
                     Extra keys are allowed and kept.
      "meta":        object, optional (default {}), study-level information (seed, proposer, created_at,
                     dataset, ...); free-form.
    }

A run object (RunInfo):

    "run_id":          str, non-empty, e.g. "run_0000"; also its folder name in runs/.
    "status":          str, one of logging_utils.RUN_STATUSES (default "ok": the
                       original format recorded finished runs only).
    "val_mse":         number or null (null when missing or non-finite, e.g. diverged).
    "val_mae":         number or null.
    "test_mse":        number or null.
    "test_mae":        number or null.
    "history_summary": str, the plain-English training summary shown to the LLM.
    "accepted":        bool, whether the run became the new best when it finished.
    "reason":          str, why it was accepted or rejected.
    "proposer":        str, who proposed the config (e.g. "llm", "random", "baseline").
    "config":          object, the full training config as plain JSON.
    "parent_run_id":   str or null, the run this config was derived from.
    "started_at":      str, ISO-8601 UTC timestamp, e.g. "2025-01-31T12:00:00+00:00"
                       (default: when the record was made or, for a file
                       without it, loaded).
    "duration_s":      number or null, wall-clock seconds of the run.
    "error_tail":      str or null, last lines of the error output of a failed run.
    "extra":           object (default {}): forward-compatible slot for
                       proposer / LLM / seed details.

Fields without a stated default default to null, "" or {} (the RunInfo defaults).

NaN or infinite numbers are stored as null (strict JSON).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nas_agent.atomic import atomic_write_text, dumps_json
from nas_agent.logging_utils import RUN_STATUSES

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "agent_state.json"
BACKUP_SUFFIX = ".bak"
# The original nas_system's keys: required in a file; the rest have defaults.
_STATE_REQUIRED = {"max_runs", "best_run_id", "runs"}
_RUN_REQUIRED = {"run_id", "val_mse", "test_mse", "history_summary", "accepted"}

_REJECTED_FIELDS = {"attempt": int, "proposer": str, "error": str, "at": str}


class AgentStateError(ValueError):
    """agent_state.json (or an in-memory state) is invalid.

    The message says which file, which field, and how to fix it.
    """


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601, the format used for every timestamp in the state."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- field checks

def _show(value: Any) -> str:
    """repr() of a bad value, shortened, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect_str(value: Any, where: str, *, nullable: bool = False,
                nonempty: bool = False) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or (nonempty and not value):
        kind = "a non-empty string" if nonempty else "a string"
        raise AgentStateError(f"{where}: expected {kind}{' or null' if nullable else ''}, "
                              f"got {_show(value)}")
    return value


def _expect_number(value: Any, where: str) -> float | None:
    """A number or null; non-finite numbers become None as they would after a save."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AgentStateError(f"{where}: expected a number or null, got {_show(value)}")
    value = float(value)
    return value if math.isfinite(value) else None


def _expect_int(value: Any, where: str, *, nullable: bool = False,
                minimum: int | None = None) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (
            minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise AgentStateError(f"{where}: expected an integer{bound}"
                              f"{' or null' if nullable else ''}, got {_show(value)}")
    return value


def _expect_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise AgentStateError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _expect_dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise AgentStateError(f"{where}: expected an object, got {_show(value)}")
    return value


def _expect_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise AgentStateError(f"{where}: expected a list, got {_show(value)}")
    return value


def _expect_timestamp(value: Any, where: str) -> str:
    _expect_str(value, where)
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise AgentStateError(f"{where}: expected an ISO-8601 timestamp such as "
                              f"'2025-01-31T12:00:00+00:00', got {_show(value)}") from None
    return value


def _check_keys(d: dict, where: str, required: set[str], optional: set[str]) -> None:
    """Reject missing and unknown keys; unknown ones are usually typos."""
    missing = sorted(required - d.keys())
    if missing:
        raise AgentStateError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(d.keys() - required - optional)
    if unknown:
        raise AgentStateError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                              f"known fields are {', '.join(sorted(required | optional))}")


# --------------------------------------------------------------------------- dataclasses

@dataclass
class RunInfo:
    """Everything the agent remembers about one training run (see module docstring)."""
    run_id: str
    status: str = "ok"
    val_mse: float | None = None
    val_mae: float | None = None
    test_mse: float | None = None
    test_mae: float | None = None
    history_summary: str = ""
    accepted: bool = False
    reason: str = ""
    proposer: str = ""
    config: dict = field(default_factory=dict)
    parent_run_id: str | None = None
    started_at: str = field(default_factory=utc_now_iso)
    duration_s: float | None = None
    error_tail: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain dict in schema field order (values are not copied or checked here)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "run") -> "RunInfo":
        """Build a RunInfo from parsed JSON, checking every field's type.

        `where` prefixes error messages, e.g. "runs[3]" gives
        "runs[3].val_mse: expected a number or null, got 'abc'".
        """
        _expect_dict(d, where)
        _check_keys(d, where, _RUN_REQUIRED, {f.name for f in fields(cls)} - _RUN_REQUIRED)
        d = {**cls(run_id="run_0000").to_dict(), **d}  # defaults for the keys the file left out
        status = _expect_str(d["status"], f"{where}.status")
        if status not in RUN_STATUSES:
            raise AgentStateError(f"{where}.status: unknown status {status!r}; "
                                  f"expected one of {', '.join(RUN_STATUSES)}")
        return cls(
            run_id=_expect_str(d["run_id"], f"{where}.run_id", nonempty=True),
            status=status,
            val_mse=_expect_number(d["val_mse"], f"{where}.val_mse"),
            val_mae=_expect_number(d["val_mae"], f"{where}.val_mae"),
            test_mse=_expect_number(d["test_mse"], f"{where}.test_mse"),
            test_mae=_expect_number(d["test_mae"], f"{where}.test_mae"),
            history_summary=_expect_str(d["history_summary"], f"{where}.history_summary"),
            accepted=_expect_bool(d["accepted"], f"{where}.accepted"),
            reason=_expect_str(d["reason"], f"{where}.reason"),
            proposer=_expect_str(d["proposer"], f"{where}.proposer"),
            config=_expect_dict(d["config"], f"{where}.config"),
            parent_run_id=_expect_str(d["parent_run_id"], f"{where}.parent_run_id",
                                      nullable=True),
            started_at=_expect_timestamp(d["started_at"], f"{where}.started_at"),
            duration_s=_expect_number(d["duration_s"], f"{where}.duration_s"),
            error_tail=_expect_str(d["error_tail"], f"{where}.error_tail", nullable=True),
            extra=_expect_dict(d["extra"], f"{where}.extra"),
        )


@dataclass
class AgentState:
    """The whole search (see module docstring for the JSON form)."""
    version: int = STATE_VERSION
    max_runs: int | None = None
    best_run_id: str | None = None
    runs: list[RunInfo] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain dict ready for JSON (runs converted with RunInfo.to_dict)."""
        return {
            "version": self.version,
            "max_runs": self.max_runs,
            "best_run_id": self.best_run_id,
            "runs": [run.to_dict() for run in self.runs],
            "rejected": self.rejected,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "AgentState":
        """Build and fully validate a state from parsed JSON (types and invariants)."""
        _expect_dict(d, "top level")
        _check_keys(d, "top level", _STATE_REQUIRED, {"version", "rejected", "meta"})
        d = {"version": STATE_VERSION, "rejected": [], "meta": {}, **d}
        version = _expect_int(d["version"], "version")
        _check_version(version)
        runs = [RunInfo.from_dict(r, f"runs[{i}]")
                for i, r in enumerate(_expect_list(d["runs"], "runs"))]
        rejected = _expect_list(d["rejected"], "rejected")
        for i, entry in enumerate(rejected):
            _check_rejected(entry, f"rejected[{i}]")
        state = cls(
            version=version,
            max_runs=_expect_int(d["max_runs"], "max_runs", nullable=True, minimum=1),
            best_run_id=_expect_str(d["best_run_id"], "best_run_id", nullable=True),
            runs=runs,
            rejected=rejected,
            meta=_expect_dict(d["meta"], "meta"),
        )
        _check_invariants(state)
        return state


def _check_version(version: int) -> None:
    if version > STATE_VERSION:
        raise AgentStateError(
            f"version: the file has schema version {version}, written by a newer nas_agent; "
            f"this nas_agent reads version {STATE_VERSION}. Upgrade nas_agent to resume "
            "this search")
    if version < 1:
        raise AgentStateError(f"version: unknown schema version {version}; "
                              f"expected {STATE_VERSION}")


def _check_rejected(entry: Any, where: str) -> None:
    _expect_dict(entry, where)
    missing = sorted((set(_REJECTED_FIELDS) | {"config"}) - entry.keys())
    if missing:
        raise AgentStateError(f"{where}: missing field(s) {', '.join(missing)}")
    _expect_int(entry["attempt"], f"{where}.attempt", minimum=0)
    for name in ("proposer", "error"):
        _expect_str(entry[name], f"{where}.{name}")
    _expect_timestamp(entry["at"], f"{where}.at")


def _check_invariants(state: AgentState) -> None:
    """Cross-field rules: unique run ids; best_run_id names an accepted run."""
    seen: dict[str, int] = {}
    for i, run in enumerate(state.runs):
        if run.run_id in seen:
            raise AgentStateError(f"runs[{i}].run_id: duplicate run_id {run.run_id!r} "
                                  f"(already used by runs[{seen[run.run_id]}])")
        seen[run.run_id] = i
    best = state.best_run_id
    if best is None:
        return
    if best not in seen:
        raise AgentStateError(f"best_run_id: {best!r} does not name any run in 'runs'; "
                              "set it to an accepted run's run_id or to null")
    if not state.runs[seen[best]].accepted:
        raise AgentStateError(f"best_run_id: run {best!r} (runs[{seen[best]}]) has "
                              "accepted=false; the best run must be an accepted run")


# --------------------------------------------------------------------------- load / save

def backup_path_for(path: str | os.PathLike) -> Path:
    """Where the previous version of a state file is kept: `<path>.bak`."""
    path = Path(path)
    return path.with_name(path.name + BACKUP_SUFFIX)


def _how_to_fix(path: Path) -> str:
    """Repair advice, pointing at the backup when there is one."""
    bak = backup_path_for(path)
    if bak.exists():
        return (f"Fix the file by hand, or restore the previous version with: "
                f"cp {shlex.quote(str(bak))} {shlex.quote(str(path))}")
    return ("Fix the file by hand, or move it aside to start a new search "
            "(no .bak backup exists)")


def _parse_state_text(text: str, path: Path) -> AgentState:
    """Parse and validate file contents; errors name the path, problem and fix."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = ("the file is empty" if not text.strip() else
                   f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
        raise AgentStateError(f"{path}: {problem}. {_how_to_fix(path)}") from None
    try:
        return AgentState.from_dict(data)
    except AgentStateError as exc:
        raise AgentStateError(f"{path}: {exc}. {_how_to_fix(path)}") from None


def load_agent_state(path: str | os.PathLike = STATE_FILE) -> AgentState:
    """Read and validate a state file (default: agent_state.json in the current directory);
    a missing file gives a fresh empty state.

    The file is only read, never created or modified, so a bad file stays
    exactly as it was for the user to inspect.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        log.debug("no state file at %s; starting a fresh search state", path)
        return AgentState()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AgentStateError(f"{path}: not UTF-8 text (byte {exc.start}). "
                              f"{_how_to_fix(path)}") from None
    return _parse_state_text(text, path)


def _serialise(state: AgentState, path: Path) -> str:
    """Validate an in-memory state and render it as JSON text.

    Validation reuses the loader (on the JSON form) so that whatever is saved
    is guaranteed to load back.
    """
    try:
        text = dumps_json(state.to_dict())
    except TypeError as exc:
        raise AgentStateError(f"cannot save agent state to {path}: {exc}") from None
    try:
        AgentState.from_dict(json.loads(text))
    except AgentStateError as exc:
        raise AgentStateError(f"cannot save agent state to {path}: {exc}. "
                              "Fix the value in the code that built the state") from None
    return text


def save_agent_state(state: AgentState, path: str | os.PathLike = STATE_FILE) -> None:
    """Validate and atomically write the state (default: agent_state.json in the current
    directory), keeping the previous file as .bak.

    Refuses (AgentStateError) to replace an existing file that does not load,
    so a corrupt or newer-version file is preserved for the user to inspect
    rather than silently destroyed.
    """
    path = Path(path)
    text = _serialise(state, path)
    if path.exists():
        try:
            load_agent_state(path)
        except AgentStateError as exc:
            raise AgentStateError(f"refusing to overwrite {path} because it does not load: "
                                  f"{exc}") from None
    atomic_write_text(path, text, backup_path=backup_path_for(path))
    log.debug("saved agent state with %d runs to %s", len(state.runs), path)


# --------------------------------------------------------------------------- queries / updates

def add_run(state: AgentState, run: RunInfo) -> AgentState:
    """Append `run` (mutating `state` in place) and return the same state.

    An accepted run becomes the best run. Raises ValueError on a duplicate run_id.
    """
    if get_run(state, run.run_id) is not None:
        raise ValueError(f"run_id {run.run_id!r} is already in the state; use replace_run "
                         "to update an existing run, or pick a new run_id")
    state.runs.append(run)
    if run.accepted:
        state.best_run_id = run.run_id
    return state


def replace_run(state: AgentState, run: RunInfo) -> AgentState:
    """Replace the run with the same run_id (mutating `state`) and return the state.

    Used when a run's record is finalised. best_run_id is kept consistent: if the
    replaced run's acceptance is involved, the best becomes the most recently
    accepted run (the rule add_run follows). Raises ValueError if no run has that id.
    """
    for i, existing in enumerate(state.runs):
        if existing.run_id == run.run_id:
            state.runs[i] = run
            break
    else:
        raise ValueError(f"run_id {run.run_id!r} is not in the state; use add_run for a new run")
    if run.accepted or state.best_run_id == run.run_id:
        accepted = [r.run_id for r in state.runs if r.accepted]
        state.best_run_id = accepted[-1] if accepted else None
    return state


def add_rejected(state: AgentState, *, attempt: int, proposer: str, config: Any,
                 error: str) -> dict:
    """Record a proposal that failed validation and was never run; return the entry."""
    entry = {"attempt": attempt, "proposer": proposer, "config": config,
             "error": error, "at": utc_now_iso()}
    state.rejected.append(entry)
    return entry


def get_run(state: AgentState, run_id: str) -> RunInfo | None:
    """The run with this id, or None."""
    for run in state.runs:
        if run.run_id == run_id:
            return run
    return None


def get_best_run(state: AgentState) -> RunInfo | None:
    """The run named by best_run_id, or None if no run has been accepted."""
    return None if state.best_run_id is None else get_run(state, state.best_run_id)


def get_recent_runs(state: AgentState, k: int) -> list[RunInfo]:
    """The last `k` runs in launch order (fewer if there are fewer runs)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return state.runs[-k:] if k else []
