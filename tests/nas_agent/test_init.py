"""The package exports the original nas_system's API by name."""
import inspect

import nas_agent

README_NAMES = ("load_agent_state", "save_agent_state", "add_run", "get_best_run", "get_recent_runs", "RunInfo",
                "save_metrics", "load_metrics", "save_history", "load_history", "build_history_summary",
                "get_run_dir", "snapshot_config")


def test_readme_names_are_exported_with_the_readme_defaults():
    assert set(README_NAMES) <= set(nas_agent.__all__)
    assert all(callable(getattr(nas_agent, name)) for name in README_NAMES)
    assert inspect.signature(nas_agent.load_agent_state).parameters["path"].default == "agent_state.json"
    assert inspect.signature(nas_agent.save_agent_state).parameters["path"].default == "agent_state.json"
    assert inspect.signature(nas_agent.get_run_dir).parameters["runs_dir"].default == "runs"
    assert list(inspect.signature(nas_agent.snapshot_config).parameters) == ["config_path", "run_dir"]
