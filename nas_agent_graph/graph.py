"""Wire and compile the search graph. No logic lives here: see nodes.py and routers.py.

    load_state -> propose -> validate -> launch -> wait -> summarise -> decide -> collect_lora -> propose ...
                     ^          |           |                                             |
                     +--invalid-+           +--> propose (a slot is free: --parallel)      +--> finetune -> propose
                                                                                          +--> wait (runs in flight)
                                                                                          +--> stop
"""
from __future__ import annotations

from langgraph.graph import END, START, StateGraph

from nas_agent_graph import nodes, routers
from nas_agent_graph.context import Context
from nas_agent_graph.state import GraphState


def build_graph(checkpointer=None):
    g = StateGraph(GraphState, context_schema=Context)
    for name in ("load_state", "propose", "validate", "launch", "wait", "summarise", "decide", "collect_lora",
                 "finetune", "stop"):
        g.add_node(name, getattr(nodes, name))
    g.add_edge(START, "load_state")
    g.add_conditional_edges("load_state", routers.after_load)
    g.add_edge("propose", "validate")
    g.add_conditional_edges("validate", routers.after_validate)
    g.add_conditional_edges("launch", routers.after_launch)
    g.add_edge("wait", "summarise")
    g.add_edge("summarise", "decide")
    g.add_edge("decide", "collect_lora")
    g.add_conditional_edges("collect_lora", routers.after_collect)
    g.add_conditional_edges("finetune", routers.after_finetune)
    g.add_edge("stop", END)
    return g.compile(checkpointer=checkpointer)
