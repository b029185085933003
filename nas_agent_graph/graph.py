"""Wire and compile the search graph. No logic lives here: see nodes.py, routers.py and study/ (and
phases.py, whose wrapper times each node).

    load_state -> propose -> validate -> launch -> wait -> summarise -> decide -> collect_lora -> propose ...
                     ^          |           |          |                                  |
                     +--invalid-+           |          +--> reject_run -> propose          +--> finetune -> propose
                     ^                      |               (the in-run smoke test failed)  +--> wait (runs in flight)
                     +----------------------+--> propose (a slot is free: --parallel)      +--> stop
"""
from __future__ import annotations

from langgraph.graph import END, START, StateGraph

from nas_agent_graph import nodes, routers
from nas_agent_graph.context import Context
from nas_agent_graph.phases import timed_node
from nas_agent_graph.state import GraphState


def build_graph(checkpointer=None):
    g = StateGraph(GraphState, context_schema=Context)
    for node in (nodes.load_state, nodes.propose, nodes.validate, nodes.launch, nodes.wait, nodes.reject_run,
                 nodes.summarise, nodes.decide, nodes.collect_lora, nodes.finetune, nodes.stop):
        g.add_node(node.__name__, timed_node(node.__name__, node))  # timed into runs/phases.jsonl
    g.add_edge(START, "load_state")
    g.add_conditional_edges("load_state", routers.after_load)
    g.add_edge("propose", "validate")
    g.add_conditional_edges("validate", routers.after_validate)
    g.add_conditional_edges("launch", routers.after_launch)
    g.add_conditional_edges("wait", routers.after_wait)
    g.add_conditional_edges("reject_run", routers.after_reject_run)
    g.add_edge("summarise", "decide")
    g.add_edge("decide", "collect_lora")
    g.add_conditional_edges("collect_lora", routers.after_collect)
    g.add_conditional_edges("finetune", routers.after_finetune)
    g.add_edge("stop", END)
    return g.compile(checkpointer=checkpointer)
