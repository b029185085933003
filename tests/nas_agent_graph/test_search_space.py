"""The search space: every sample is a valid config, params round-trip, user files are checked."""
import json

import optuna
import pytest

from nas_agent.config import load_config, validate_config
from nas_agent_graph.search_space import DEFAULT_SPACE, SearchSpace, SpaceError, load_space, space_from_overrides
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def base() -> dict:
    return load_config(ROOT / "config.py").model_dump()


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return load_space(None)


def _write(tmp_path, overrides) -> str:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(overrides) if not isinstance(overrides, str) else overrides)
    return str(path)


def _random_params(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(space.distributions()).params for _ in range(n)]


def test_every_random_sample_is_valid_and_round_trips(space, base):
    for params in _random_params(space, 300):
        config = space.to_config(params, base)
        cfg = validate_config(config)
        m, d = cfg.model, cfg.data
        assert m.d_model % m.n_heads == 0
        assert m.d_model == params["model.head_dim"] * params["model.n_heads"]
        assert m.d_ff == params["model.ff_mult"] * m.d_model
        assert 1 <= d.label_len <= d.seq_len
        assert space.from_config(config) == params


def test_to_config_returns_a_new_dict_and_derives_companion_settings(space, base):
    params = _random_params(space, 1)[0]
    params.update({"training.optimizer_class": "optim.SGD", "training.scheduler_class": "optim.lr_scheduler.StepLR"})
    config = space.to_config(params, base)
    assert config is not base and config["model"] is not base["model"]
    assert base["training"]["optimizer_class"] == "optim.Adam"  # the base is untouched
    assert config["training"]["optimizer_kwargs"] == {"momentum": 0.9}
    assert config["training"]["scheduler_kwargs"] == {"step_size": 3, "gamma": 0.5}
    params.update({"training.optimizer_class": "optim.AdamW",
                   "training.scheduler_class": "optim.lr_scheduler.CosineAnnealingLR"})
    config = space.to_config(params, base)
    assert config["training"]["optimizer_kwargs"] == {}
    assert config["training"]["scheduler_kwargs"] == {"T_max": base["training"]["max_epochs"]}
    params["training.scheduler_class"] = None
    assert space.to_config(params, base)["training"]["scheduler_kwargs"] == {}


def test_to_config_rejects_params_outside_the_space(space, base):
    params = _random_params(space, 1)[0]
    with pytest.raises(SpaceError, match=r"training.lr.*outside the search space"):
        space.to_config({**params, "training.lr": 0.5}, base)
    with pytest.raises(SpaceError, match="missing.*model.dropout"):
        space.to_config({k: v for k, v in params.items() if k != "model.dropout"}, base)


def test_baseline_is_representable_and_odd_configs_are_not(space, base):
    params = space.from_config(base)
    assert params["model.head_dim"] == 64 and params["model.n_heads"] == 4
    assert params["data.label_frac"] == 0.5 and params["model.ff_mult"] == 4
    odd = json.loads(json.dumps(base))
    odd["model"].update({"d_model": 100, "n_heads": 4, "d_ff": 400})
    assert space.from_config(odd) is None
    odd = json.loads(json.dumps(base))
    odd["model"]["d_ff"] = 3 * 256  # ff_mult 3 is not a choice
    assert space.from_config(odd) is None
    assert space.from_config({"model": {"d_model": 100, "n_heads": 3}}) is None  # invalid config
    partial = {"training": {"lr": 1e-3}}  # schema defaults fill the rest
    assert space.from_config(partial)["training.lr"] == 1e-3


def test_describe_and_to_json(space, tmp_path):
    text = space.describe()
    assert len(text.splitlines()) == len(DEFAULT_SPACE)
    assert "training.lr: float in [1e-05, 0.01], log scale" in text
    assert "model.d_model = head_dim * n_heads" in text
    narrowed = load_space(_write(tmp_path, {"model.dropout": None}))
    again = load_space(_write(tmp_path, narrowed.to_json()))
    assert again.entries == narrowed.entries and "model.dropout" not in again.entries


def test_user_file_narrows_and_extends(tmp_path, base):
    path = _write(tmp_path, {
        "# note": "dropout fixed by the base config; lr narrowed; activation searched",
        "model.dropout": None,
        "training.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
        "model.activation": {"type": "categorical", "choices": ["gelu", "relu"]},
        "training.optimizer_class": {"type": "categorical", "choices": ["Adam", "torch.optim.SGD"]},
    })
    space = load_space(path)
    assert "model.dropout" not in space.entries and "model.activation" in space.entries
    assert space.entries["training.optimizer_class"]["choices"] == ["optim.Adam", "optim.SGD"]
    for params in _random_params(space, 40, seed=1):
        config = space.to_config(params, base)
        validate_config(config)
        assert config["model"]["dropout"] == base["model"]["dropout"]
        assert 1e-4 <= config["training"]["lr"] <= 1e-3
        assert space.from_config(config) == params
    assert {space.to_config(p, base)["model"]["activation"] for p in _random_params(space, 20)} == {"gelu", "relu"}


def test_removed_virtual_key_keeps_the_base_ratio(base):
    space = space_from_overrides({"model.head_dim": None, "data.label_frac": None})
    for params in _random_params(space, 30):
        cfg = validate_config(space.to_config(params, base))
        assert cfg.model.d_model == 64 * cfg.model.n_heads  # the base's 256 / 4
        assert cfg.data.label_len == cfg.data.seq_len // 2  # the base's 48 / 96
    fixed = space_from_overrides({"model.head_dim": None, "model.n_heads": None})
    assert all(fixed.to_config(p, base)["model"]["d_model"] == 256 for p in _random_params(fixed, 10))


@pytest.mark.parametrize("overrides, message", [
    ({"training.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}, r"unknown key 'training.lrr' \(did you mean 'training.lr'\?\)"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, r"did you mean 'training.lr'"),
    ({"model.head_dimm": None}, r"did you mean 'model.head_dim'"),
    ({"model.dropout": [0.1, 0.2]}, r"'model.dropout': expected an entry of one of these shapes"),
    ({"model.dropout": {"type": "float", "min": 0.0, "high": 0.2}}, r"'model.dropout': missing low; unknown field\(s\) min; expected \{\"type\": \"float\""),
    ({"model.dropout": {"type": "float", "low": 0.3, "high": 0.1}}, r"low 0.3 is above high 0.1"),
    ({"training.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}, r"log-scale range needs low > 0"),
    ({"model.e_layers": {"type": "int", "low": 1, "high": 4, "step": 2}}, r"multiple of step 2"),
    ({"model.e_layers": {"type": "int", "low": 1.0, "high": 4}}, r"low must be an integer"),
    ({"model.attn": {"type": "categorical", "choices": []}}, r"non-empty list"),
    ({"model.attn": {"type": "categorical", "choices": [["prob"]]}}, r"choices\[0\].*a choice must be null"),
    ({"model.attn": {"type": "categorical", "choices": ["prob", "sparse"]}}, r"'model.attn': value \"sparse\" does not make a valid config"),
    ({"training.optimizer_class": {"type": "categorical", "choices": ["optim.Adam", "optim.Adamm"]}}, r"unknown optimizer 'optim.Adamm' \(did you mean optim.Adam\?\)"),
    ({"training.optimizer_class": {"type": "categorical", "choices": ["Adam", "optim.Adam"]}}, r"listed twice"),
    ({"model.dropout": {"type": "float", "low": 0.0, "high": 0.95}}, r"'model.dropout': value 0.95 does not make a valid config"),
    ({"data.label_frac": {"type": "categorical", "choices": [0.5, 1.5]}}, r"value 1.5 must be a number in \(0, 1\]"),
    ({"model.d_model": {"type": "categorical", "choices": [128, 256]}}, r"'model.d_model' and the virtual key 'model.head_dim'.*set the other to null"),
    ({"model.enc_in": {"type": "int", "low": 1, "high": 7}}, r"'model.enc_in' cannot be searched: it is filled in by train.py"),
    ({"data.pred_len": {"type": "categorical", "choices": [24, 96]}}, r"would not be comparable"),
])
def test_bad_space_files_give_clear_errors(tmp_path, overrides, message):
    with pytest.raises(SpaceError, match=message) as info:
        load_space(_write(tmp_path, overrides))
    assert str(tmp_path / "space.json") in str(info.value)


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(SpaceError, match=r"space.json:1:\d+: invalid JSON"):
        load_space(_write(tmp_path, "{'training.lr': 1}"))
    with pytest.raises(SpaceError, match="expected a JSON object"):
        load_space(_write(tmp_path, "[1, 2]"))
    with pytest.raises(SpaceError, match="search space file not found"):
        load_space(tmp_path / "nope.json")


def test_direct_d_model_is_allowed_without_head_dim(base):
    space = space_from_overrides({"model.head_dim": None,
                                  "model.d_model": {"type": "categorical", "choices": [128, 256]}})
    for params in _random_params(space, 20):
        assert space.to_config(params, base)["model"]["d_model"] in (128, 256)


def test_space_file_keys_in_the_original_spelling_name_the_canonical_keys(tmp_path, base):
    space = load_space(_write(tmp_path, {
        "training.optimizer_params.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
        "training.optimizer_params.weight_decay": None,
        "data.batch_size": {"type": "categorical", "choices": [8, 16]},
    }))
    assert "training.weight_decay" not in space.entries
    assert space.entries["training.lr"]["high"] == 1e-3 and space.entries["training.batch_size"]["choices"] == [8, 16]
    assert not any("optimizer_params" in key or key.startswith("data.batch") for key in space.entries)
    for params in _random_params(space, 10):
        config = space.to_config(params, base)
        assert 1e-4 <= config["training"]["lr"] <= 1e-3 and config["training"]["batch_size"] in (8, 16)
    with pytest.raises(SpaceError, match="'training.lr' and 'training.optimizer_params.lr' both name training.lr; "
                                         "keep one"):
        load_space(_write(tmp_path, {"training.lr": None, "training.optimizer_params.lr": None}))
