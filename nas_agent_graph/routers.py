"""Routers: pure functions of the graph state that name the next node.

With runs in flight (--parallel), a stop drains first: `wait` collects the runs still going,
each is recorded, and only then does the search stop.
"""
from __future__ import annotations

from typing import Literal

from nas_agent_graph.state import GraphState


def _stop_or_drain(state: GraphState) -> Literal["wait", "stop"]:
    return "wait" if state.get("in_flight") else "stop"


def _next_run(state: GraphState) -> Literal["propose", "wait"]:
    """Propose another run while a slot is free, else wait for one of the runs in flight."""
    return "propose" if state.get("can_propose", True) or not state.get("in_flight") else "wait"


def _finetune_or_drain(state: GraphState) -> Literal["finetune", "wait"]:
    """A due fine-tune waits until no run is in flight (training and LoRA would share the device)."""
    return "wait" if state.get("in_flight") else "finetune"


def after_load(state: GraphState) -> Literal["finetune", "propose", "wait", "stop"]:
    if state.get("stop_reason"):
        return _stop_or_drain(state)
    return _finetune_or_drain(state) if state.get("finetune_due") else _next_run(state)


def after_validate(state: GraphState) -> Literal["launch", "propose", "wait", "stop"]:
    if state.get("validation_error") is None:
        return "launch"
    return _stop_or_drain(state) if state.get("stop_reason") else "propose"


def after_launch(state: GraphState) -> Literal["propose", "wait"]:
    return _next_run(state)


def after_wait(state: GraphState) -> Literal["reject_run", "summarise"]:
    """A run that ended "invalid" failed its in-run smoke test: a rejected proposal, not a run."""
    return "reject_run" if (state.get("launch") or {}).get("status") == "invalid" else "summarise"


def after_reject_run(state: GraphState) -> Literal["propose", "wait", "stop"]:
    """Propose again for the same run id at once (its slot is free, and no later run may take the id)."""
    return _stop_or_drain(state) if state.get("stop_reason") else "propose"


def after_collect(state: GraphState) -> Literal["finetune", "propose", "wait", "stop"]:
    if state.get("stop_reason"):
        return _stop_or_drain(state)
    return _finetune_or_drain(state) if state.get("finetune_due") else _next_run(state)


def after_finetune(state: GraphState) -> Literal["propose", "wait", "stop"]:
    return _stop_or_drain(state) if state.get("stop_reason") else _next_run(state)
