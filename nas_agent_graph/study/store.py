"""Saving the study (agent_state.json, the commit point), its Optuna mirror, and its clock."""
from __future__ import annotations

import logging
import time

from nas_agent.agent_state import AgentState, save_agent_state
from nas_agent_graph import optuna_mirror
from nas_agent_graph.context import Context
from nas_agent_graph.phases import phase_log

log = logging.getLogger(__name__)

def save_study(study: AgentState, ctx: Context, node: str) -> None:
    """save_agent_state, timed as phase NODE/save_state (runs/phases.jsonl)."""
    with phase_log(ctx).span(f"{node}/save_state"):
        save_agent_state(study, ctx.state_path)


def mirror_study(study: AgentState, ctx: Context, node: str) -> None:
    """runs/optuna.db for optuna-dashboard (nas_agent_graph/optuna_mirror.py); never stops the search."""
    if not ctx.optuna_mirror:
        return
    try:
        if ctx.session.mirror is None:  # kept for the session: it remembers what it wrote (see optuna_mirror.Mirror)
            ctx.session.mirror = optuna_mirror.Mirror(ctx.runs_dir, ctx.state_path, ctx.session.space)
        with phase_log(ctx).span(f"{node}/mirror"):
            done = ctx.session.mirror.sync(study)
        log.debug("runs/optuna.db: %s", done)
    except Exception as e:  # noqa: BLE001 - a derived view; agent_state.json already holds everything
        log.warning("%s not updated (%s); the next run tries again, or run export-optuna",
                    optuna_mirror.db_path(ctx.runs_dir), e)


def tick_time(state: AgentState, ctx: Context) -> None:
    """Add this session's wall-clock time since the last tick to the study's total."""
    now = time.monotonic()
    last = ctx.session.started_at if ctx.session.started_at else now
    state.meta["time_used_s"] = state.meta.get("time_used_s", 0.0) + (now - last)
    ctx.session.started_at = now
