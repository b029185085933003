"""The original nas_system's config spellings: read everywhere, refused when mixed, written back."""
import pytest

from nas_agent import legacy
from nas_agent.config import (ConfigError, apply_overrides, config_hash, config_style, load_config,
                              parse_config_source, render_config, validate_config, write_config)
from tests.conftest import README_CONFIG, ROOT

HEADER = "import torch.nn as nn\nimport torch.optim as optim\n"


def _file(tmp_path, text, name="c.py"):
    path = tmp_path / name
    path.write_text(HEADER + text)
    return path


def test_readme_example_loads_as_written(readme_config):
    t = load_config(readme_config).training
    assert (t.optimizer_class, t.lr, t.weight_decay, t.optimizer_kwargs) == ("optim.Adam", 1e-4, 1e-4, {})
    assert (t.scheduler_class, t.scheduler_kwargs) == ("optim.lr_scheduler.CosineAnnealingLR", {"T_max": 10})
    assert (t.criterion_class, t.max_epochs, t.patience) == ("nn.MSELoss", 20, 5)
    # The same settings in this project's spelling are the same config.
    canonical = validate_config({"model": {"d_model": 256, "n_heads": 4, "e_layers": 3, "d_layers": 1,
                                           "d_ff": 1024, "dropout": 0.1},
                                 "training": {"lr": 1e-4, "weight_decay": 1e-4, "scheduler_kwargs": {"T_max": 10},
                                              "max_epochs": 20, "patience": 5}})
    assert config_hash(load_config(readme_config)) == config_hash(canonical)


def test_batch_size_under_data_seed_at_top_level_and_other_optimizer_arguments(tmp_path):
    path = _file(tmp_path, 'seed = 42\ndata = {"batch_size": 16}\n'
                           'training = {"optimizer_class": optim.SGD, "optimizer_params": {"lr": 0.01, "momentum": 0.9},'
                           ' "scheduler_class": None, "scheduler_params": {}}\n')
    t = load_config(path).training
    assert (t.seed, t.batch_size, t.lr, t.optimizer_kwargs) == (42, 16, 0.01, {"momentum": 0.9})
    assert t.weight_decay == 1e-4 and t.scheduler_kwargs == {}  # not given: the defaults


@pytest.mark.parametrize("text, both", [
    ('training = {"optimizer_params": {"lr": 1e-3}, "lr": 1e-3}',
     "training.optimizer_params.lr and training.lr both set the learning rate"),
    ('training = {"optimizer_params": {"weight_decay": 0.0}, "weight_decay": 0.0}',
     "training.optimizer_params.weight_decay and training.weight_decay both set the weight decay"),
    ('training = {"optimizer_params": {"betas": [0.9, 0.99]}, "optimizer_kwargs": {}}',
     "training.optimizer_params and training.optimizer_kwargs both set the optimizer's arguments"),
    ('training = {"scheduler_params": {"T_max": 4}, "scheduler_kwargs": {"T_max": 4}}',
     "training.scheduler_params and training.scheduler_kwargs both set the lr scheduler's arguments"),
    ('data = {"batch_size": 16}\ntraining = {"batch_size": 16}',
     "data.batch_size and training.batch_size both set the batch size"),
    ('seed = 1\ntraining = {"seed": 1}', "seed and training.seed both set the random seed"),
])
def test_one_setting_spelled_both_ways_is_an_error_naming_both(tmp_path, text, both):
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {both}; keep one"


@pytest.mark.parametrize("raw, expected", [
    ({"training": {"optimiser_params": {}}}, "training: unknown key 'optimiser_params' (did you mean "
                                             "'optimizer_params'?)"),
    ({"training": {"scheduler_param": {}}}, "did you mean 'scheduler_params'?"),
    ({"data": {"batch_sise": 8}}, "data: unknown key 'batch_sise' (did you mean 'batch_size'?)"),
    ({"sed": 3}, "(top level): unknown key 'sed' (did you mean 'seed'?)"),
    ({"training": {"lrr": 1}}, "training: unknown key 'lrr' (did you mean 'lr'?)"),
    ({"modle": {}}, "(top level): unknown key 'modle' (did you mean 'model'?)"),
])
def test_unknown_keys_get_a_hint_from_both_vocabularies(raw, expected):
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "x.py")
    assert expected in str(e.value) and str(e.value).startswith("x.py: invalid config")
    assert "; or, as in the original nas_system: " in str(e.value)


def test_schema_errors_say_how_old_spellings_were_read(readme_config):
    with pytest.raises(ConfigError) as e:
        load_config(readme_config, ["training.optimizer_params.momentum=0.9"])
    message = str(e.value)
    assert "optim.Adam has no argument 'momentum'" in message
    assert "training.optimizer_params as training.lr, training.weight_decay, training.optimizer_kwargs" in message


@pytest.mark.parametrize("config", ["readme", "canonical"])
def test_overrides_in_either_spelling_replace_the_setting(readme_config, config):
    path = readme_config if config == "readme" else ROOT / "config.py"
    old = load_config(path, ["training.optimizer_params.lr=3e-4", "seed=7", "data.batch_size=8",
                             "training.scheduler_params={'T_max': 4}", "training.optimizer_params.betas=[0.8, 0.9]"])
    new = load_config(path, ["training.lr=3e-4", "training.seed=7", "training.batch_size=8",
                             "training.scheduler_kwargs={'T_max': 4}", "training.optimizer_kwargs.betas=[0.8, 0.9]"])
    assert old == new
    t = old.training
    assert (t.lr, t.seed, t.batch_size, t.scheduler_kwargs, t.optimizer_kwargs) == \
        (3e-4, 7, 8, {"T_max": 4}, {"betas": [0.8, 0.9]})


def test_setting_a_whole_old_dict_by_override():
    out = apply_overrides({}, ["training.optimizer_params={'lr': 0.01, 'betas': [0.8, 0.9]}"])
    assert out["training"] == {"optimizer_kwargs": {"betas": [0.8, 0.9]}, "lr": 0.01}
    with pytest.raises(ConfigError, match="training.optimizer_params must be a dict of arguments"):
        apply_overrides({}, ["training.optimizer_params=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["lr=1"])  # a bare name other than the old top-level seed


def test_style_of_a_file():
    assert config_style(ROOT / "config.py") == frozenset()
    readme = legacy.style_of(parse_config_source(README_CONFIG))
    # Settings the README example leaves out take the old spelling too: the file is in the old format.
    assert readme == {"training.optimizer_params", "training.scheduler_params", "data.batch_size", "seed"}
    mixed = legacy.style_of({"data": {"batch_size": 8}, "training": {"lr": 1e-3, "scheduler_kwargs": {}}})
    assert mixed == {"data.batch_size", "seed"}


def test_rendered_in_the_old_style_uses_only_old_spellings_and_loads_back(tmp_path, readme_config):
    cfg = load_config(readme_config, ["training.optimizer_params.betas=[0.8, 0.9]", "seed=5"])
    path = write_config(cfg, tmp_path / "out.py", header="old style", style=config_style(readme_config))
    raw = parse_config_source(path.read_text())
    assert raw["seed"] == 5 and raw["data"]["batch_size"] == 32
    assert raw["training"]["optimizer_params"] == {"lr": 1e-4, "weight_decay": 1e-4, "betas": [0.8, 0.9]}
    assert raw["training"]["scheduler_params"] == {"T_max": 10}
    assert not {"lr", "weight_decay", "optimizer_kwargs", "scheduler_kwargs", "batch_size", "seed"} & \
        set(raw["training"])
    keys = list(raw["training"])  # the old dicts sit where the keys they replace were
    assert keys.index("optimizer_class") + 1 == keys.index("optimizer_params")
    assert load_config(path) == cfg
    assert "optimizer_params" not in render_config(cfg)  # no style: this project's spelling


def test_canonicalise_leaves_its_input_and_canonical_dicts_alone():
    raw = {"seed": 3, "training": {"optimizer_params": {"lr": 0.1}}}
    out = legacy.canonicalise(raw)
    assert raw == {"seed": 3, "training": {"optimizer_params": {"lr": 0.1}}}
    assert out == {"training": {"lr": 0.1, "optimizer_kwargs": {}, "seed": 3}}
    assert legacy.canonicalise(out) == out
    assert legacy.canonical_key("training.optimizer_params.lr") == "training.lr"
    assert legacy.canonical_key("training.scheduler_params.T_max") == "training.scheduler_kwargs.T_max"
    assert legacy.canonical_key("model.dropout") == "model.dropout"
