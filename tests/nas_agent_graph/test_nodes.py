"""sync_incumbent: config.py is rewritten with the best run's config, in the key spelling the file used."""
from nas_agent.agent_state import AgentState, RunInfo, add_run
from nas_agent.config import load_config, parse_config_source, validate_config
from nas_agent_graph.context import Context
from nas_agent_graph.study.incumbent import sync_incumbent
from tests.conftest import README_CONFIG, TINY_CONFIG


def _study_with_best(config: dict) -> AgentState:
    state = AgentState()
    add_run(state, RunInfo(run_id="run_0000", val_mse=0.5, test_mse=0.6, history_summary="", accepted=True,
                           config=config, extra={"incumbent_config": config}))
    return state


def _better(text: str) -> dict:
    """The config of `text` with another learning rate and optimizer argument, as a search records it."""
    config = validate_config(parse_config_source(text)).model_dump()
    config["training"].update(lr=3e-4, optimizer_kwargs={"betas": [0.8, 0.9]})
    return config


def test_an_incumbent_over_a_config_in_the_original_format_keeps_that_format(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(README_CONFIG)
    best = _better(README_CONFIG)
    sync_incumbent(_study_with_best(best), Context(config_path=path, runs_dir=tmp_path / "runs"))
    raw = parse_config_source(path.read_text())
    assert raw["training"]["optimizer_params"] == {"lr": 3e-4, "weight_decay": 1e-4, "betas": [0.8, 0.9]}
    assert raw["training"]["scheduler_params"] == {"T_max": 10} and "seed" in raw and "batch_size" in raw["data"]
    assert not {"lr", "weight_decay", "optimizer_kwargs", "scheduler_kwargs", "seed", "batch_size"} & \
        set(raw["training"])
    assert load_config(path) == validate_config(best)
    assert (tmp_path / "runs" / "incumbents" / "config_before_run_0000.py").read_text() == README_CONFIG


def test_an_incumbent_over_a_config_in_this_projects_format_keeps_that_format(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(TINY_CONFIG)
    best = _better(TINY_CONFIG)
    sync_incumbent(_study_with_best(best), Context(config_path=path, runs_dir=tmp_path / "runs"))
    raw = parse_config_source(path.read_text())
    assert raw["training"]["lr"] == 3e-4 and raw["training"]["optimizer_kwargs"] == {"betas": [0.8, 0.9]}
    assert "optimizer_params" not in raw["training"] and "seed" not in raw
    assert load_config(path) == validate_config(best)


def test_a_config_in_the_original_format_that_holds_the_incumbent_is_left_alone(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(README_CONFIG)
    same = validate_config(parse_config_source(README_CONFIG)).model_dump()
    sync_incumbent(_study_with_best(same), Context(config_path=path, runs_dir=tmp_path / "runs"))
    assert path.read_text() == README_CONFIG and not (tmp_path / "runs").exists()


def test_the_smoke_test_runs_inside_the_run_only_where_that_is_safe(tmp_path):
    from nas_agent_graph.validation import smoke_in_run
    config = {"proposer": "tpe", "meta": {}}
    assert smoke_in_run(config, Context())
    assert not smoke_in_run(config, Context(smoke_in_run=False))
    assert not smoke_in_run(config, Context(parallel=2))  # run ids: another run may take the next one
    assert not smoke_in_run(config, Context(launcher="ray"))
    assert not smoke_in_run(config, Context(allow_code=True))  # model.py may be the LLM's by now
    assert not smoke_in_run(config, Context(model_path=tmp_path / "model.py"))
    assert not smoke_in_run({"proposer": "llm", "meta": {"model_code": "def build_model(c): ..."}}, Context())
