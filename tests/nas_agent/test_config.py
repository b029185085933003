"""The config loader: parse without exec, validate with clear errors, render and round-trip."""
import subprocess
import textwrap

import pytest

from nas_agent.config import (ConfigError, apply_overrides, config_hash, load_config, parse_config_source,
                              render_config, validate_config)
from nas_agent.schema import Config, resolve_class
from tests.conftest import PYTHON, ROOT, run_env

HEADER = "import torch.nn as nn\nimport torch.optim as optim\n"


def test_default_config_is_the_documented_baseline():
    cfg = load_config(ROOT / "config.py")
    d, m, t = cfg.data, cfg.model, cfg.training
    assert (d.path, d.features, d.seq_len, d.label_len, d.pred_len) == ("data/ETTh1.csv", "M", 96, 48, 96)
    assert (m.d_model, m.n_heads, m.e_layers, m.d_layers, m.d_ff, m.dropout, m.factor) == (256, 4, 3, 1, 1024, 0.1, 5)
    assert (t.optimizer_class, t.lr, t.weight_decay, t.criterion_class) == ("optim.Adam", 1e-4, 1e-4, "nn.MSELoss")
    assert (t.scheduler_class, t.scheduler_kwargs) == ("optim.lr_scheduler.CosineAnnealingLR", {"T_max": 10})
    assert (t.max_epochs, t.patience, t.batch_size, t.seed) == (20, 5, 32, 2021)
    assert m.revin is False


def test_class_names_resolve_to_torch_classes():
    import torch
    cfg = load_config(ROOT / "config.py")
    assert resolve_class(cfg.training.optimizer_class) is torch.optim.Adam
    assert resolve_class(cfg.training.scheduler_class) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert validate_config({"training": {"optimizer_class": "AdamW"}}).training.optimizer_class == "optim.AdamW"


def test_render_round_trips(tmp_path):
    cfg = load_config(ROOT / "config.py", ["training.optimizer_class=optim.SGD",
                                          "training.optimizer_kwargs={'momentum': 0.9, 'nesterov': True}",
                                          "data.split_ratios=[0.6, 0.2, 0.2]"])
    path = tmp_path / "c.py"
    path.write_text(render_config(cfg, header="round trip"))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert "optimizer_class\": optim.SGD" in path.read_text()  # bare name, not a string


def test_overrides_apply_and_do_not_mutate_input():
    raw = {"training": {"lr": 1e-4}}
    out = apply_overrides(raw, ["training.lr=3e-3", "data.path=foo.csv", "training.scheduler_kwargs.T_max=4"])
    assert raw == {"training": {"lr": 1e-4}}
    assert out["training"]["lr"] == 3e-3 and out["data"]["path"] == "foo.csv"
    assert out["training"]["scheduler_kwargs"] == {"T_max": 4}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(raw, ["lr=1"])
    with pytest.raises(ConfigError, match="unknown section 'trainin'"):
        apply_overrides(raw, ["trainin.lr=1"])


def test_overrides_read_json_spellings_of_true_false_and_null():
    out = apply_overrides({}, ["model.revin=true", "model.distil=false", "model.attn_dropout=null",
                               "model.mix=True", "data.target=truthy"])
    assert out["model"] == {"revin": True, "distil": False, "attn_dropout": None, "mix": True}
    assert out["data"]["target"] == "truthy"
    assert validate_config(out).model.revin is True


def test_hash_ignores_data_derived_channels_but_not_settings():
    a = validate_config({})
    b = validate_config({"model": {"enc_in": 7, "dec_in": 7, "c_out": 7}})
    c = validate_config({"training": {"seed": 1}})
    assert config_hash(a) == config_hash(b) != config_hash(c)


@pytest.mark.parametrize("override, expected", [
    ("training.lrr=1", "unknown key 'lrr' (did you mean 'lr'?)"),
    ("model.n_heads=3", "expected d_model % n_heads == 0, got 256 % 3 == 1"),
    ("data.label_len=200", "got label_len 200 > seq_len 96"),
    ("training.lr=-1", "training.lr: expected greater than 0, got -1"),
    ("model.attn='sparse'", "model.attn: expected 'prob' or 'full', got 'sparse'"),
    ("data.features='X'", "data.features: expected 'M', 'S' or 'MS'"),
    ("training.optimizer_class=Adamm", "unknown optimizer 'Adamm' (did you mean optim.Adam?)"),
    ("training.scheduler_kwargs={}", "CosineAnnealingLR needs T_max"),
    ("training.optimizer_kwargs={'momentum': 0.9}", "optim.Adam has no argument 'momentum'"),
    ("training.optimizer_kwargs={'lr': 0.1}", "'lr' is set by train.py"),
    ("model.dropout=1.5", "model.dropout: expected less than or equal to 0.9, got 1.5"),
    ("training.batch_size=True", "training.batch_size: expected a valid integer"),
    ("data.split_ratios=[0.9, 0.2, 0.2]", "summing to <= 1"),
])
def test_schema_errors_say_expected_versus_actual(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "config.py", [override])
    assert expected in str(e.value)
    assert "config.py" in str(e.value)


def test_unknown_top_level_name_is_reported():
    with pytest.raises(ConfigError, match="unknown key 'modle' \\(did you mean 'model'\\?\\)"):
        validate_config(parse_config_source("modle = {}"))


HOSTILE = {
    "os_system": "data = __import__('os').system('touch {marker}')",
    "open_call": "data = open('{marker}', 'w')",
    "subclasses": "data = ().__class__.__bases__[0].__subclasses__()",
    "dunder_attr": "import torch.nn as nn\ndata = nn.__dict__",
    "lambda": "data = (lambda: open('{marker}', 'w'))()",
    "lambda_value": "data = lambda: 1",
    "list_comp": "data = [open('{marker}', 'w') for _ in range(1)]",
    "dict_comp": "data = {{k: 1 for k in 'ab'}}",
    "genexp": "data = list(x for x in ())",
    "fstring": "data = f\"{{open('{marker}', 'w')}}\"",
    "walrus": "data = (x := 1)",
    "import_os": "import os\ndata = {{}}",
    "import_from": "from os import system\ndata = {{}}",
    "import_torch_plain": "import torch\ndata = {{}}",
    "function_def": "def f():\n    open('{marker}', 'w')\ndata = {{}}",
    "class_def": "class A:\n    x = open('{marker}', 'w')",
    "exec_call": "exec(\"open('{marker}', 'w')\")",
    "non_allowlisted_attr": "import torch.optim as optim\ntraining = {{'optimizer_class': optim.Optimizer}}",
    "bare_name": "data = open",
    "binop": "data = {{'seq_len': 2 ** 100000}}",
    "subscript": "data = {{}}['x']",
    "dunder_assign": "__builtins__ = {{}}",
    "dict_unpack": "data = {{**{{}}}}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_configs_are_rejected_and_never_run(name, tmp_path):
    marker = tmp_path / "MARKER"
    src = HOSTILE[name].format(marker=marker)
    path = tmp_path / "hostile.py"
    path.write_text(src)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}:" in str(e.value)  # names the file and line
    assert "not allowed" in str(e.value) or "unknown key" in str(e.value)
    assert not marker.exists()


def test_train_py_refuses_hostile_config_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.py"
    path.write_text(HEADER + f"data = __import__('os').system('touch {marker}')\n")
    proc = subprocess.run([PYTHON, "train.py", "--config", str(path), "--tag", "x", "--runs-dir", str(tmp_path)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "hostile.py:3: a function call is not allowed" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "x").exists()


def test_error_line_numbers_point_at_the_offending_line():
    src = textwrap.dedent("""\
        import torch.nn as nn
        data = {
            "seq_len": 96,
            "path": open("x"),
        }
    """)
    with pytest.raises(ConfigError, match=r"c\.py:4: a function call"):
        parse_config_source(src, "c.py")


def test_syntax_error_is_a_config_error():
    with pytest.raises(ConfigError, match="c.py:1: syntax error"):
        parse_config_source("data = {", "c.py")


def test_config_defaults_validate():
    assert Config() == validate_config({})


def test_default_cosine_kwargs_do_not_leak_into_other_schedulers():
    assert validate_config({"training": {"scheduler_class": None}}).training.scheduler_kwargs == {}
    with pytest.raises(ConfigError, match="ExponentialLR needs gamma"):
        validate_config({"training": {"scheduler_class": "ExponentialLR"}})
    assert validate_config({}).training.scheduler_kwargs == {"T_max": 10}


@pytest.mark.parametrize("override, expected", [
    ("training.lr=1e999", "expected a finite number"),
    ("training.optimizer_kwargs={'eps': b'1'}", "only numbers, strings, booleans"),
    ("training.lr=" + "-" * 300000 + "1", "longer than"),
])
def test_odd_override_values_are_config_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "config.py", [override])


def test_non_regular_config_file_is_refused():
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")
