"""runs/optuna.db: the study as an Optuna RDB storage, so optuna-dashboard can show it.

    optuna-dashboard sqlite:///runs/optuna.db

One trial per run: its params in the search space's distributions, its state (COMPLETE,
PRUNED, FAIL, or RUNNING while it trains), val MSE as the value, its per-epoch val MSE as
intermediate values (the dashboard's learning curves), and run id, proposer, status, test MSE
and the accept/reject reason as user attributes. Test MSE is only shown there, as in `status`.

agent_state.json stays the single source of truth: this file is derived from it after every
launch and every recorded run, in place when only new runs or finished ones changed, else
rebuilt whole into a temporary file that replaces it. `python -m nas_agent_graph export-optuna`
rebuilds it from scratch. A database this study did not write (another tool's, another
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
    return optuna.storages.RDBStorage(f"sqlite:///{Path(path).resolve()}", engine_kwargs={"poolclass": NullPool})


def _curve(run: RunInfo) -> dict[int, float]:
    curve = run.extra.get("curve") if isinstance(run.extra, dict) else None
    return {i + 1: float(v) for i, v in enumerate(curve or [])
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _state(run: RunInfo) -> TrialState:
    if run.status == "running":
        return TrialState.RUNNING
    if run.status == "pruned":
        return TrialState.PRUNED
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


def _same(old: FrozenTrial, new: FrozenTrial) -> bool:
    return old.state == new.state and old.value == new.value and old.params == new.params


def sync(study: AgentState, space: SearchSpace, runs_dir: Path, state_path: Path) -> str:
    """Bring runs/optuna.db in line with the study (whose runs in flight, if any, have status
    "running": nodes.study_view); what was done ("added 1, finished 0", "rebuilt (12 trials)")."""
    path = db_path(runs_dir)
    desired = _desired(study, space)
    if not path.exists():
        return f"built ({rebuild(study, space, path, state_path)} trials)"
    try:
        storage = _storage(path)  # one open per sync: the owner check and the update share it
        owner = _owner(storage)
    except Exception as e:  # noqa: BLE001 - sqlalchemy's errors for a file that is not an Optuna database
        log.warning("%s cannot be read as an Optuna database (%s); rebuilding it from %s", path, e, state_path)
        return f"rebuilt ({rebuild(study, space, path, state_path)} trials)"
    if owner != str(Path(state_path).resolve()):
        aside = path.with_name(f"{path.stem}.foreign-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        os.replace(path, aside)
        log.warning("%s mirrors %s, not %s; moved it to %s and writing a new one", path,
                    owner or "another tool's study", state_path, aside.name)
        return f"built ({rebuild(study, space, path, state_path)} trials)"
    ostudy = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    existing = {t.user_attrs.get("run_id"): t for t in ostudy.get_trials(deepcopy=False)}
    in_place = all(run_id in desired and (_same(old, desired[run_id]) or (
        old.state == TrialState.RUNNING and old.params == desired[run_id].params)) for run_id, old in existing.items())
    if not in_place:  # a run dropped out (interrupted), or agent_state.json was edited: start over
        return f"rebuilt ({rebuild(study, space, path, state_path)} trials)"
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    added = finished = 0
    for run_id, trial in desired.items():
        old = existing.get(run_id)
        if old is None:
            ostudy.add_trial(trial)
            added += 1
        elif old.state == TrialState.RUNNING and trial.state != TrialState.RUNNING:
            _finish(storage, storage.get_trial_id_from_study_id_trial_number(study_id, old.number), trial)
            finished += 1
    return f"added {added}, finished {finished}"


def _finish(storage: optuna.storages.RDBStorage, trial_id: int, new: FrozenTrial) -> None:
    """A RUNNING trial's run has ended: its curve, attributes and final state."""
    for step, value in new.intermediate_values.items():
        storage.set_trial_intermediate_value(trial_id, step, value)
    for key, value in new.user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, new.state, [new.value] if new.state == TrialState.COMPLETE else None)
