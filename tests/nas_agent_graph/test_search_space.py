"""The search space: every sample is a valid config, params round-trip, conditional keys exist
only where they mean something, user files are checked."""
import json

import optuna
import pytest

from nas_agent.config import load_config, validate_config
from nas_agent_graph.search_space import DEFAULT_SPACE, SearchSpace, SpaceError, load_space, space_from_overrides
from tests.conftest import ROOT

SHIPPED = ("informer", "dlinear", "patchtst42", "patchtst64", "itransformer", "tsmixer")


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


def _random_params(space: SearchSpace, n: int, seed: int = 0, base: dict | None = None) -> list[dict]:
    """Define-by-run samples, as the proposers draw them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    base = base or load_config(ROOT / "config.py").model_dump()
    return [space.sample(study.ask(), base) for _ in range(n)]


def test_every_random_sample_is_valid_and_round_trips(space, base):
    families = set()
    for params in _random_params(space, 400):
        config = space.to_config(params, base)
        cfg = validate_config(config)
        m, d = cfg.model, cfg.data
        assert 1 <= d.label_len <= d.seq_len
        assert space.from_config(config) == params
        families.add((m.head, m.tokens, m.mixer))
        if m.head == "linear":
            assert "model.d_layers" not in params and "data.label_frac" not in params
        if m.tokens == "patch":
            assert {"model.patch_len", "model.stride"} <= params.keys()
        else:
            assert "model.patch_len" not in params and m.patch_len == 16  # the schema default
        if m.mixer == "none" and m.head == "linear":
            assert "model.d_model" not in params and m.d_model == 256
    # Informer, and every token kind with every mixer, are reached.
    assert ("decoder", "time", "attention") in families
    assert {(t, x) for h, t, x in families if h == "linear"} == {
        (t, x) for t in ("time", "patch", "variate") for x in ("attention", "mlp", "none")}


def test_conditional_keys_follow_their_conditions(space, base):
    assert space.conditional()
    params = next(p for p in _random_params(space, 200) if p.get("model.tokens") == "patch")
    with pytest.raises(SpaceError, match=r"missing \['model.patch_len'\]"):
        space.to_config({k: v for k, v in params.items() if k != "model.patch_len"}, base)
    informer = next(p for p in _random_params(space, 50) if p["model.head"] == "decoder")
    with pytest.raises(SpaceError, match=r"not used with these values \['model.patch_len'\]"):
        space.to_config({**informer, "model.patch_len": 16}, base)
    assert space.active_keys({"model.head": "linear", "model.tokens": "variate"}, base).count("model.channels") == 0
    assert "model.channels" in space.active_keys({"model.head": "linear", "model.tokens": "time"}, base)
    # TSMixer's raw tokens keep their own width: no d_model to search, and raw_tokens only with the MLP.
    mlp = {"model.head": "linear", "model.tokens": "time", "model.mixer": "mlp"}
    assert "model.d_model" in space.active_keys({**mlp, "model.raw_tokens": False}, base)
    assert "model.d_model" not in space.active_keys({**mlp, "model.raw_tokens": True}, base)
    assert "model.raw_tokens" not in space.active_keys({**mlp, "model.mixer": "attention"}, base)
    # With raw_tokens out of the space (the base's false holds), d_model is still not a key of mixer "none".
    fixed = space_from_overrides({"model.raw_tokens": None}, where="test")
    assert "model.d_model" not in fixed.active_keys({**mlp, "model.mixer": "none"}, base)
    assert "model.d_model" in fixed.active_keys(mlp, base)


def test_branches_match_the_active_keys(space, base):
    branches = space.branches()
    # decoder: attn x2; linear: tokens x3, mixer (attention: attn x2, mlp: raw_tokens x2, none), decomp x2
    assert len(branches) == 32
    for params in _random_params(space, 60, seed=3):
        fixed = {k: params[k] for k in ("model.head", "model.tokens", "model.mixer", "model.raw_tokens", "model.attn",
                                        "model.decomp") if k in params}
        match = [keys for f, keys in branches if f == fixed]
        assert match == [list(params)]


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


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_points_of_the_default_space(space, name):
    config = load_config(ROOT / "configs" / f"{name}.py").model_dump()
    params = space.from_config(config)
    assert params is not None, f"configs/{name}.py is outside the default space: samplers could not learn from it"
    assert params["model.head"] == config["model"]["head"]


def test_baseline_is_representable_and_odd_configs_are_not(space, base):
    params = space.from_config(base)
    assert params["model.head"] == "decoder" and params["model.d_model"] == 256 and params["model.n_heads"] == 4
    assert params["data.label_frac"] == 0.5 and params["model.d_ff"] == 1024
    assert "model.tokens" not in params
    odd = json.loads(json.dumps(base))
    odd["model"].update({"d_model": 100, "n_heads": 4, "d_ff": 400})
    assert space.from_config(odd) is None
    assert space.from_config({"model": {"d_model": 100, "n_heads": 3}}) is None  # invalid config
    partial = {"training": {"lr": 1e-3}}  # schema defaults fill the rest
    assert space.from_config(partial)["training.lr"] == 1e-3


def test_old_informer_space_is_kept_as_a_file(base):
    space = load_space(ROOT / "spaces" / "informer.json")
    assert not any(k in space.entries for k in ("model.tokens", "model.mixer", "model.d_model"))
    for params in _random_params(space, 100):
        cfg = validate_config(space.to_config(params, base))
        assert cfg.model.head == "decoder"
        assert cfg.model.d_model == params["model.head_dim"] * params["model.n_heads"]
        assert cfg.model.d_ff == params["model.ff_mult"] * cfg.model.d_model
        assert space.from_config(cfg.model_dump()) == params


def test_a_space_file_restricts_a_study_to_one_family(tmp_path, base):
    space = load_space(ROOT / "spaces" / "patchtst.json")
    text = space.describe()
    assert "model.d_layers" not in text and "model.patch_len" in text  # keys that can never exist are not shown
    for params in _random_params(space, 40):
        cfg = validate_config(space.to_config(params, base))
        assert (cfg.model.head, cfg.model.tokens, cfg.model.channels, cfg.model.mixer) == (
            "linear", "patch", "independent", "attention")
        assert cfg.model.revin and cfg.data.seq_len >= 336


def test_describe_and_to_json(space, tmp_path):
    text = space.describe()
    assert len(text.splitlines()) == len(DEFAULT_SPACE)
    assert "training.lr: float in [1e-05, 0.01], log scale" in text
    assert 'model.patch_len: one of [8, 16, 24, 32]  (only when model.tokens is "patch")' in text
    narrowed = load_space(_write(tmp_path, {"model.dropout": None,
                                            "model.stride": {"type": "categorical", "choices": [8], "when": None}}))
    assert "when" not in narrowed.entries["model.stride"]  # made unconditional on purpose
    again = load_space(_write(tmp_path, narrowed.to_json()))
    assert again.entries == narrowed.entries and "model.dropout" not in again.entries


def test_user_file_narrows_and_extends(tmp_path, base):
    path = _write(tmp_path, {
        "# note": "dropout fixed by the base config; lr narrowed; activation searched",
        "model.dropout": None,
        "training.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
        "model.activation": {"type": "categorical", "choices": ["gelu", "relu"]},
        "training.optimizer_class": {"type": "categorical", "choices": ["Adam", "torch.optim.SGD"]},
        "model.patch_len": {"type": "categorical", "choices": [12, 16]},  # keeps its condition
    })
    space = load_space(path)
    assert "model.dropout" not in space.entries and "model.activation" in space.entries
    assert space.entries["model.patch_len"]["when"] == [{"model.tokens": ["patch"]}]
    assert space.entries["training.optimizer_class"]["choices"] == ["optim.Adam", "optim.SGD"]
    for params in _random_params(space, 40, seed=1):
        config = space.to_config(params, base)
        validate_config(config)
        assert config["model"]["dropout"] == base["model"]["dropout"]
        assert 1e-4 <= config["training"]["lr"] <= 1e-3
        assert space.from_config(config) == params
    assert {space.to_config(p, base)["model"]["activation"] for p in _random_params(space, 20)} == {"gelu", "relu"}


def test_removed_virtual_key_keeps_the_base_ratio(base):
    space = space_from_overrides({"model.d_model": None, "data.label_frac": None,
                                  "model.head": {"type": "categorical", "choices": ["decoder"]}})
    for params in _random_params(space, 30):
        cfg = validate_config(space.to_config(params, base))
        assert cfg.data.label_len == cfg.data.seq_len // 2  # the base's 48 / 96
        # Not searched: the base's width per head (256 / 4), so d_model % n_heads holds whatever n_heads is.
        assert cfg.model.d_model == 64 * cfg.model.n_heads


@pytest.mark.parametrize("overrides, message", [
    ({"training.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}, r"unknown key 'training.lrr' \(did you mean 'training.lr'\?\)"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, r"did you mean 'training.lr'"),
    ({"model.d_modell": None}, r"did you mean 'model.d_model'"),
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
    ({"model.head_dim": {"type": "categorical", "choices": [16, 32]}}, r"'model.d_model' and the virtual key 'model.head_dim'.*set the other to null"),
    ({"model.patch_len": {"type": "categorical", "choices": [16], "when": {"model.strid": ["x"]}}}, r"'when' names 'model.strid'.*did you mean 'model.stride'"),
    ({"model.patch_len": {"type": "categorical", "choices": [16], "when": {"model.tokens": ["pach"]}}}, r"'when' lists \"pach\" for 'model.tokens'"),
    ({"model.tokens": {"type": "categorical", "choices": ["time"], "when": {"model.patch_len": [16]}}}, r"'when' names 'model.patch_len', which must be a categorical key listed before"),
    ({"model.patch_len": {"type": "categorical", "choices": [16], "when": "tokens=patch"}}, r"'when' must be"),
    ({"model.tokens": {"type": "categorical", "choices": ["time", "patch"], "when": None}}, r"(?s)'model.tokens': value \"patch\" does not make a valid config.*with model.head 'decoder'"),
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


def test_head_dim_may_replace_d_model(base):
    space = space_from_overrides({"model.d_model": None,
                                  "model.head_dim": {"type": "categorical", "choices": [16, 32]}})
    for params in _random_params(space, 30):
        cfg = validate_config(space.to_config(params, base))
        if "model.n_heads" in params:
            assert cfg.model.d_model == params["model.head_dim"] * params["model.n_heads"]


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


def test_complete_brings_and_takes_the_keys_a_change_activates(space, base):
    informer = space.from_config(base)
    changed = space.complete({**informer, "model.head": "linear"}, base, lambda key, entry: entry["choices"][0]
                             if entry["type"] == "categorical" else entry["low"])
    assert changed["model.tokens"] == "time" and "model.d_layers" not in changed and "data.label_frac" not in changed
    validate_config(space.to_config(changed, base))
    patch = space.complete({**changed, "model.tokens": "patch"}, base, lambda key, entry: entry["choices"][-1])
    assert patch["model.patch_len"] == 32 and patch["model.stride"] == 16
    assert space.to_config(patch, base)["model"]["patch_len"] == 32


def test_searches_architecture_decides_the_default_warm_start(space):
    assert space.searches_architecture()  # the default space: the shipped archetypes run first
    informer = load_space(ROOT / "spaces" / "informer.json")
    assert not informer.searches_architecture()  # Informer's hyperparameters only: no DLinear warm start
    assert space_from_overrides({"model.tokens": {"type": "categorical", "choices": ["time"]}}).searches_architecture()
    decoder_only = {"model.head": {"type": "categorical", "choices": ["decoder"]}}
    assert not space_from_overrides(decoder_only).searches_architecture()
