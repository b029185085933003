"""bench/dropout_parity.py's baseline: its copy of model.py drops out exactly as torch's F.dropout
does, everywhere model.py drops out, while model.py itself uses its own masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import train
from tests.conftest import ROOT, cpu_ops, load_bench_script

load_bench_script("amp_parity")  # imported by dropout_parity as sibling scripts
load_bench_script("train_speed")
dp = load_bench_script("dropout_parity")

CONFIG = {"data": {"seq_len": 24, "label_len": 8, "pred_len": 6},
          "model": {"head": "linear", "tokens": "patch", "patch_len": 8, "stride": 4, "mixer": "attention",
                    "attn": "full", "d_model": 8, "n_heads": 2, "e_layers": 1, "d_ff": 8, "dropout": 0.3,
                    "enc_in": 3, "dec_in": 3, "c_out": 3}}


def dropout_modules(build_model):
    return [m for m in build_model(CONFIG).modules() if isinstance(m, torch.nn.Dropout)]


def test_baseline_model_file_uses_torch_dropout(tmp_path):
    x = torch.randn(64, 64)
    baseline = dropout_modules(train.load_build_model(str(dp.torch_dropout_model(tmp_path))))
    own = dropout_modules(train.load_build_model(str(ROOT / "model.py")))
    assert baseline and own
    torch.manual_seed(5)
    want = F.dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(baseline[0].train()(x), want)
    torch.manual_seed(5)
    assert not torch.equal(own[0].train()(x), want)
    assert (ROOT / "model.py").read_text() in (tmp_path / "model_torch_dropout.py").read_text()


def training_ops(build_model) -> set[str]:
    model = build_model(CONFIG).train()
    x = torch.randn(4, CONFIG["data"]["seq_len"], 3)
    return cpu_ops(lambda: model(x, None, None, None).sum().backward())


def test_baseline_model_file_trains_with_torch_masks_and_plain_mlps(tmp_path):
    # Every mask of a training step is bernoulli_'s, the FFN's included (plain_mlp, not the fused
    # mlp_forward, whose where() selection would show); model.py itself draws none of them.
    baseline = training_ops(train.load_build_model(str(dp.torch_dropout_model(tmp_path))))
    assert "aten::bernoulli_" in baseline and not baseline & {"aten::random_", "aten::where"}
    own = training_ops(train.load_build_model(str(ROOT / "model.py")))
    assert "aten::bernoulli_" not in own and {"aten::random_", "aten::where"} <= own


def test_train_speed_baseline_is_the_same_torch_masks_and_plain_mlps():
    ts = load_bench_script("train_speed")
    import model
    with ts.torch_dropout():
        inside = training_ops(model.build_model)
    assert "aten::bernoulli_" in inside and not inside & {"aten::random_", "aten::where"}
    assert "aten::bernoulli_" not in training_ops(model.build_model)  # restored on the way out
