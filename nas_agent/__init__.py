"""The nas_agent library: the original nas_system's API, importable from the package.

    from nas_agent import load_agent_state, save_agent_state, add_run, get_best_run, get_recent_runs, RunInfo
    from nas_agent import save_metrics, load_metrics, save_history, load_history, build_history_summary
    from nas_agent import get_run_dir, snapshot_config

Without a path, agent_state.json and runs/ are in the current directory, as in the original.
The modules hold the richer forms the search uses (AgentState, replace_run, ...).
"""
from nas_agent.agent_state import (
    AgentState,
    RunInfo,
    add_run,
    get_best_run,
    get_recent_runs,
    load_agent_state,
    save_agent_state,
)
from nas_agent.history_summary import build_history_summary
from nas_agent.logging_utils import load_history, load_metrics, save_history, save_metrics
from nas_agent.run_manager import get_run_dir, snapshot_config

__all__ = [
    "AgentState",
    "RunInfo",
    "add_run",
    "build_history_summary",
    "get_best_run",
    "get_recent_runs",
    "get_run_dir",
    "load_agent_state",
    "load_history",
    "load_metrics",
    "save_agent_state",
    "save_history",
    "save_metrics",
    "snapshot_config",
]
