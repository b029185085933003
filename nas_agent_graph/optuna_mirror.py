"""runs/optuna.db: the study as an Optuna RDB storage, so optuna-dashboard can show it.

    optuna-dashboard sqlite:///runs/optuna.db

One trial per run: its params in the search space's distributions, its state (COMPLETE,
PRUNED, FAIL, or RUNNING while it trains), val MSE as the value, its per-epoch val MSE as
intermediate values (the dashboard's learning curves), and run id, proposer, status, test MSE
and the accept/reject reason as user attributes. Test MSE is only shown there, as in `status`.

agent_state.json stays the single source of truth: this file is derived from it after every
launch and every recorded run, in place when only new runs or finished ones changed, else
rebuilt whole into a temporary file that replaces it. The search keeps one Mirror per session,
which remembers what it wrote, so a sync writes just the change (~0.03 s, not ~0.3 s).
`python -m nas_agent_graph export-optuna` rebuilds it from scratch. A database this study did not write (another tool's, another
study's) is moved aside with a warning, never written into; an unreadable one is rebuilt. The
mirror never stops the search: a failure is logged and the next sync tries again.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from nas_agent.agent_state import AgentState, RunInfo
from nas_agent_graph.proposers import run_value
from nas_agent_graph.search_space import SearchSpace

log = logging.getLogger(__name__)

DB_FILE = "optuna.db"
STUDY_NAME = "nas_agent_graph"
OWNER_ATTR = "agent_state"  # study user attribute: the agent_state.json this database mirrors
_REASON_CHARS = 300


def db_path(runs_dir: Path) -> Path:
    return runs_dir / DB_FILE


def _storage(path: Path) -> optuna.storages.RDBStorage:
    from sqlalchemy.pool import NullPool

    # No pooled connection outlives a call, so the file can be replaced between syncs.
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(path).resolve()}", engine_kwargs={"poolclass": NullPool})
    # Without SQLite's fsyncs (from the next connection on): the file is derived, rebuilt from
    # agent_state.json whenever it disagrees with it, and a killed process cannot corrupt it.
    sqlalchemy.event.listen(storage.engine, "connect", _no_fsync)
    return storage


def _curve(run: RunInfo) -> dict[int, float]:
    curve = run.extra.get("curve") if isinstance(run.extra, dict) else None
    return {i + 1: float(v) for i, v in enumerate(curve or [])
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _state(run: RunInfo) -> TrialState:
    if run.status == "running":
        return TrialState.RUNNING
    if run.status == "pruned":
        return TrialState.PRUNED
    # An over-budget run stays a FAIL here, as people read it (it failed, with its reason); the
    # samplers see it as PRUNED (proposers.trial_for_run), so TPE learns to avoid its region.
    return TrialState.COMPLETE if run_value(run) is not None else TrialState.FAIL


def _user_attrs(run: RunInfo) -> dict[str, Any]:
    attrs = {"run_id": run.run_id, "proposer": run.proposer, "status": run.status,
             "accepted": run.accepted, "reason": (run.reason or "")[:_REASON_CHARS]}
    for key in ("val_mse", "test_mse", "duration_s"):
        value = getattr(run, key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            attrs[key] = float(value)
    return attrs


def dashboard_trial(run: RunInfo, space: SearchSpace) -> FrozenTrial:
    """The trial that shows `run`: params in the space's distributions (none when the space
    cannot express its config), state, value, learning curve and attributes."""
    params = (space.from_config(run.config) if run.config else None) or {}
    state = _state(run)
    return optuna.trial.create_trial(
        state=state, value=run_value(run) if state == TrialState.COMPLETE else None, params=params,
        distributions=space.distributions(params) if params else {}, intermediate_values=_curve(run),
        user_attrs=_user_attrs(run))


def _desired(study: AgentState, space: SearchSpace) -> dict[str, FrozenTrial]:
    return {run.run_id: dashboard_trial(run, space) for run in study.runs}


def rebuild(study: AgentState, space: SearchSpace, path: Path, state_path: Path) -> int:
    """Write the whole mirror into a temporary file that then replaces `path`; the trial count."""
    trials = list(_desired(study, space).values())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        ostudy = optuna.create_study(storage=_storage(tmp), study_name=STUDY_NAME, direction="minimize")
        ostudy.set_user_attr(OWNER_ATTR, str(Path(state_path).resolve()))
        ostudy.add_trials(trials)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(trials)


def _owner(storage: optuna.storages.RDBStorage) -> str | None:
    """The agent_state.json a database mirrors; None when it is not one of ours."""
    names = [s.study_name for s in storage.get_all_studies()]
    if names != [STUDY_NAME]:
        return None
    return storage.get_study_user_attrs(storage.get_study_id_from_name(STUDY_NAME)).get(OWNER_ATTR)


def sync(study: AgentState, space: SearchSpace, runs_dir: Path, state_path: Path) -> str:
    """Bring runs/optuna.db in line with the study (whose runs in flight, if any, have status
    "running": study.rules.study_view); what was done ("added 1, finished 0", "rebuilt (12 trials)").
    A one-off: the search keeps a Mirror, which remembers what it wrote between syncs."""
    return Mirror(runs_dir, state_path, space).sync(study)


class Mirror:
    """The mirror of one study, kept in sync by the search after every launch and recorded run.

    It keeps what opening the database costs (the storage: ~0.1 s of schema checks) and what the
    last sync wrote (each run's trial: state, value, params, trial id). While the file is the one
    it left (same inode, size and modification time) the next sync trusts that record and only
    writes the change (one trial added, or one finished), with no owner check and no reading back
    of every trial; a file changed by anyone else is read and checked again, as by a fresh sync.
    """

    def __init__(self, runs_dir: Path, state_path: Path, space: SearchSpace):
        self.path = db_path(runs_dir)
        self.state_path = Path(state_path)
        self.space = space
        self._storage: optuna.storages.RDBStorage | None = None
        self._stamp: tuple | None = None
        self._known: dict[str, tuple] = {}  # run_id -> (state, value, params, trial_id) as last written
        self._study_id: int | None = None

    def sync(self, study: AgentState) -> str:
        desired = _desired(study, self.space)
        if self._stamp is None or self._stamp != _stamp(self.path):
            self._known, self._stamp = {}, None
            if not self.path.exists():
                return self._rebuild(study, desired, "built")
            try:
                storage = self._open()  # one open: the owner check and the update share it
                owner = _owner(storage)
            except Exception as e:  # noqa: BLE001 - sqlalchemy's errors for a file that is not an Optuna database
                log.warning("%s cannot be read as an Optuna database (%s); rebuilding it from %s", self.path, e,
                            self.state_path)
                return self._rebuild(study, desired, "rebuilt")
            if owner != str(self.state_path.resolve()):
                aside = self.path.with_name(f"{self.path.stem}.foreign-{time.strftime('%Y%m%d-%H%M%S')}"
                                            f"{self.path.suffix}")
                os.replace(self.path, aside)
                log.warning("%s mirrors %s, not %s; moved it to %s and writing a new one", self.path,
                            owner or "another tool's study", self.state_path, aside.name)
                return self._rebuild(study, desired, "built")
            self._study_id = storage.get_study_id_from_name(STUDY_NAME)
            self._known = {t.user_attrs.get("run_id"): _entry(t, t._trial_id)
                           for t in storage.get_all_trials(self._study_id, deepcopy=False)}
        in_place = all(run_id in desired and (_same_entry(old, desired[run_id]) or (
            old[0] == TrialState.RUNNING and old[2] == desired[run_id].params)) for run_id, old in self._known.items())
        if not in_place:  # a run dropped out (interrupted), or agent_state.json was edited: start over
            return self._rebuild(study, desired, "rebuilt")
        storage, study_id = self._open(), self._study_id
        added = finished = 0
        for run_id, trial in desired.items():
            old = self._known.get(run_id)
            if old is None:
                self._known[run_id] = _entry(trial, storage.create_new_trial(study_id, template_trial=trial))
                added += 1
            elif old[0] == TrialState.RUNNING and trial.state != TrialState.RUNNING:
                _finish(storage, old[3], trial)
                self._known[run_id] = _entry(trial, old[3])
                finished += 1
        self._stamp = _stamp(self.path)
        return f"added {added}, finished {finished}"

    def _open(self) -> optuna.storages.RDBStorage:
        if self._storage is None:
            self._storage = _storage(self.path)
        return self._storage

    def _rebuild(self, study: AgentState, desired: dict[str, FrozenTrial], verb: str) -> str:
        n = rebuild(study, self.space, self.path, self.state_path)
        storage = self._open()  # the new file, at the same path (each call opens its own connection)
        self._study_id = storage.get_study_id_from_name(STUDY_NAME)
        ids = {t.user_attrs.get("run_id"): t._trial_id
               for t in storage.get_all_trials(self._study_id, deepcopy=False)}
        self._known = {run_id: _entry(trial, ids[run_id]) for run_id, trial in desired.items()}
        self._stamp = _stamp(self.path)
        return f"{verb} ({n} trials)"


def _entry(trial: FrozenTrial, trial_id: int) -> tuple:
    return trial.state, trial.value, trial.params, trial_id


def _same_entry(old: tuple, new: FrozenTrial) -> bool:
    return old[0] == new.state and old[1] == new.value and old[2] == new.params


def _stamp(path: Path) -> tuple | None:
    """What identifies the file as the one a sync left: inode, size, modification time."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _no_fsync(dbapi_connection, connection_record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=OFF")


def _finish(storage: optuna.storages.RDBStorage, trial_id: int, new: FrozenTrial) -> None:
    """A RUNNING trial's run has ended: its curve, attributes and final state."""
    for step, value in new.intermediate_values.items():
        storage.set_trial_intermediate_value(trial_id, step, value)
    for key, value in new.user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, new.state, [new.value] if new.state == TrialState.COMPLETE else None)
