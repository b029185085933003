"""bench/seed_ensemble.py: a study's ensemble members trained again with more seeds (real train.py
runs of the tiny config), their forecasts averaged, and the ensembles scored."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from nas_agent import forecasts
from tests.conftest import DATA_DIR, PYTHON, ROOT, TINY_CONFIG, load_bench_script, run_env

seed_bench = load_bench_script("seed_ensemble")
WEIGHTS = {"run_0000": 0.75, "run_0001": 0.25}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tiny runs (different learning rates, seed 2021) and an ensemble.json that weighs them."""
    study = tmp_path_factory.mktemp("study")
    (study / "config.py").write_text(TINY_CONFIG)
    for rid, lr in (("run_0000", "1e-3"), ("run_0001", "3e-3")):
        proc = subprocess.run([PYTHON, "train.py", "--config", str(study / "config.py"), "--tag", rid, "--runs-dir",
                               str(study / "runs"), "--set", "training.max_epochs=1", "--set", f"training.lr={lr}"],
                              cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    members = [{"run_id": rid, "weight": w} for rid, w in WEIGHTS.items()]
    (study / "runs" / "ensemble.json").write_text(json.dumps({"members": members}))
    return study


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("NAS_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def load(study, rid):
    return forecasts.load(study / "runs" / rid / "forecasts.npz")


def test_members_are_retrained_with_new_seeds_and_averaged(study, env):
    result = seed_bench.score_study(study, seeds=1)
    for rid in WEIGHTS:
        folder = study / "runs" / "seed_runs" / f"{rid}_s2022"
        assert json.loads((folder / "metrics.json").read_text())["seed"] == 2022
    own = {rid: load(study, rid) for rid in WEIGHTS}
    new = {rid: forecasts.load(study / "runs" / "seed_runs" / f"{rid}_s2022" / "forecasts.npz") for rid in WEIGHTS}
    assert not np.array_equal(own["run_0000"]["val"], new["run_0000"]["val"])  # the seed took effect
    target = own["run_0000"]["val_target"]

    def mse(pred):
        return float(np.mean((pred.astype(np.float64) - target) ** 2))
    study_val = sum(own[r]["val"].astype(np.float64) * w for r, w in WEIGHTS.items())
    averaged_val = sum((own[r]["val"].astype(np.float64) + new[r]["val"]) / 2 * w for r, w in WEIGHTS.items())
    assert result["study_ensemble"]["val"] == pytest.approx(mse(study_val), rel=1e-9)
    assert result["seed_averaged"]["val"] == pytest.approx(mse(averaged_val), rel=1e-9)
    assert result["single"]["run_0001"]["val"][1] == pytest.approx(mse(new["run_0001"]["val"]), rel=1e-9)
    assert sum(result["reselected_weights"].values()) == pytest.approx(1.0)
    spent = sum(json.loads((study / "runs" / "seed_runs" / f"{rid}_s2022" / "metrics.json").read_text())["train_time_sec"]
                for rid in WEIGHTS)
    assert result["extra_train_s"] == pytest.approx(spent) and spent > 0
    # A second pass reuses the folders: nothing trains again, the same numbers come out.
    stamps = {rid: (study / "runs" / "seed_runs" / f"{rid}_s2022" / "metrics.json").stat().st_mtime_ns for rid in WEIGHTS}
    again = seed_bench.score_study(study, seeds=1)
    assert again == result
    assert stamps == {rid: (study / "runs" / "seed_runs" / f"{rid}_s2022" / "metrics.json").stat().st_mtime_ns for rid in WEIGHTS}
    text = seed_bench.table([result])
    assert f"| {study.name} | 2 | 2 |" in text and "| run_0000 | 0.750 |" in text


def test_a_study_without_an_ensemble_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="no runs/ensemble.json; build it first"):
        seed_bench.members(tmp_path)


def test_a_member_without_forecasts_is_refused_with_its_name(tmp_path):
    (tmp_path / "runs" / "run_0000").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"run_0000: .*forecasts\.npz.*delete it to have it made again"):
        seed_bench.member_runs(tmp_path, "run_0000", 1)
