"""Routers: pure functions of the graph state that name the next node."""
from __future__ import annotations

from typing import Literal

from nas_agent_graph.state import GraphState


def after_load(state: GraphState) -> Literal["finetune", "propose", "stop"]:
    if state.get("stop_reason"):
        return "stop"
    return "finetune" if state.get("finetune_due") else "propose"


def after_validate(state: GraphState) -> Literal["launch", "propose", "stop"]:
    if state.get("validation_error") is None:
        return "launch"
    return "stop" if state.get("stop_reason") else "propose"


def after_collect(state: GraphState) -> Literal["finetune", "propose", "stop"]:
    if state.get("stop_reason"):
        return "stop"
    return "finetune" if state.get("finetune_due") else "propose"


def after_finetune(state: GraphState) -> Literal["propose", "stop"]:
    return "stop" if state.get("stop_reason") else "propose"
