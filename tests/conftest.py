"""Shared fixtures: where the data lives, and a tiny config that trains in seconds."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests, CI and benchmarks read the data sets beside the project, never a copy inside it.
DATA_DIR = Path(os.environ.get("NAS_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()

TINY_CONFIG = '''
import torch.nn as nn
import torch.optim as optim
data = {"path": "data/ETTh1.csv", "seq_len": 48, "label_len": 24, "pred_len": 24}
model = {"d_model": 16, "n_heads": 2, "e_layers": 2, "d_layers": 1, "d_ff": 32, "dropout": 0.0}
training = {"max_epochs": 2, "batch_size": 32, "lr": 1e-3, "max_steps_per_epoch": 25,
            "scheduler_class": None, "scheduler_kwargs": {}, "patience": 2}
'''

# The config.py example of the original nas_system's README, as written there (its Russian
# comments put in English): the format its users' files are in.
README_CONFIG = '''import torch.optim as optim
import torch.nn as nn

# Model architecture
model = {
    "d_model": 256,         # model width
    "n_heads": 4,           # attention heads
    "e_layers": 3,          # encoder layers
    "d_layers": 1,          # decoder layers
    "d_ff": 1024,           # feed-forward width
    "dropout": 0.1,         # dropout
}

# Training
training = {
    "optimizer_class": optim.Adam,  # or optim.AdamW, optim.SGD
    "optimizer_params": {
        "lr": 0.0001,
        "weight_decay": 0.0001,
    },
    "criterion_class": nn.MSELoss,  # or nn.L1Loss, nn.SmoothL1Loss
    "scheduler_class": optim.lr_scheduler.CosineAnnealingLR,
    "scheduler_params": {"T_max": 10},
    "max_epochs": 20,
    "patience": 5,          # early stopping
}
'''


@pytest.hookimpl(tryfirst=True)  # before pytest's -m selection, which reads the marks
def pytest_collection_modifyitems(items):
    """A heavy test is a slow test: mark it so, so that the default suite (-m 'not slow') never runs it."""
    for item in items:
        if item.get_closest_marker("heavy") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def readme_config(tmp_path) -> Path:
    path = tmp_path / "readme_config.py"
    path.write_text(README_CONFIG)
    return path



@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "ETTh1.csv").is_file():
        pytest.fail(f"data sets not found in {DATA_DIR}; set NAS_DATA_DIR to the folder holding ETTh1.csv")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _data_env(monkeypatch, data_dir):
    monkeypatch.setenv("NAS_DATA_DIR", str(data_dir))


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny_config.py"
    path.write_text(TINY_CONFIG)
    return path


def run_env(**extra) -> dict:
    """Environment for subprocesses: data dir set, one torch thread each (2-core machines)."""
    env = dict(os.environ, NAS_DATA_DIR=str(DATA_DIR), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


PYTHON = sys.executable


def load_bench_script(name: str):
    """bench/<name>.py as a module: bench/ is a folder of scripts, not a package. Registered in
    sys.modules before it runs, as an import would be (a dataclass looks its module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cpu_ops(fn) -> set[str]:
    """The names of the torch operators that fn() runs on the CPU (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}
