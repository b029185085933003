"""The shipped configs in configs/: each one is accepted by the search's check, trains through
train.py, and builds the family its docstring names."""
import json
import math
import subprocess

import pytest
import torch

from model import Forecaster, Informer, MixerBlock, build_model, n_patches
from nas_agent.config import load_config
from tests.conftest import PYTHON, ROOT, run_env

CONFIGS = sorted(ROOT.glob("configs/*.py"))
N_VARS = 7  # ETTh1, features "M"


def build(path):
    cfg = load_config(path)
    cfg.model.enc_in = cfg.model.dec_in = cfg.model.c_out = N_VARS
    return cfg, build_model(cfg.model_dump())


def test_the_six_families_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"informer", "dlinear", "patchtst42", "patchtst64", "itransformer", "tsmixer"} <= names


def test_each_config_builds_the_family_it_names():
    models = {p.stem: build(p) for p in CONFIGS}
    assert isinstance(models["informer"][1], Informer)

    cfg, dlinear = models["dlinear"]
    # Linear on the seasonal part and linear on the trend, nothing in between.
    assert dlinear.decomp is not None and isinstance(dlinear.mixer, torch.nn.Identity)
    assert dlinear.head.over_features is None and dlinear.trend is not None

    for name in ("patchtst42", "patchtst64"):
        cfg, patchtst = models[name]
        assert patchtst.revin is not None and cfg.model.channels == "independent"
        assert patchtst.tokenizer.n_tokens == n_patches(cfg.data.seq_len, cfg.model.patch_len, cfg.model.stride)
    assert models["patchtst42"][1].tokenizer.n_tokens == 42
    assert models["patchtst64"][1].tokenizer.n_tokens == 64

    _, itransformer = models["itransformer"]
    assert itransformer.tokenizer.n_tokens == N_VARS and itransformer.tokenizer.position is None

    cfg, tsmixer = models["tsmixer"]
    assert sum(isinstance(m, MixerBlock) for m in tsmixer.mixer) == cfg.model.e_layers
    for _, model in models.values():
        assert isinstance(model, (Informer, Forecaster))


# The heaviest three (a smoke test of a big model each) run in the slow pass.
HEAVY = ("informer", "patchtst64", "tsmixer")


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c.stem in HEAVY else c
                                    for c in CONFIGS], ids=lambda p: p.stem)
def test_check_accepts_shipped_config(config, tmp_path):
    # A study file that does not exist: no duplicate check against whatever study lies around.
    proc = subprocess.run([PYTHON, "-m", "nas_agent_graph", "check", str(config.relative_to(ROOT)),
                           "--state", str(tmp_path / "agent_state.json")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"OK: configs/{config.name} would be accepted" in proc.stdout


# Two steps, then evaluation on a small slice of ETTh1 (10/4/4 % of the rows): the full val and
# test splits made the paper-sized Informer take 400 s on the shared 2-core machine. Still slow.
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.heavy) if c.stem == "informer" else c
                                    for c in CONFIGS], ids=lambda p: p.stem)
def test_train_py_runs_shipped_config(config, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run([PYTHON, "train.py", "--config", str(config), "--tag", "t", "--runs-dir", str(runs),
                           "--set", "training.max_epochs=1", "--set", "training.max_steps_per_epoch=2",
                           "--set", "data.split=ratio", "--set", "data.split_ratios=[0.1, 0.04, 0.04]"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((runs / "t" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs_run"] == 1
    assert math.isfinite(metrics["test_mse"])
