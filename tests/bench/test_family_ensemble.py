"""bench/family_ensemble.py: per-seed ensembles of reproduce.py's run folders, a study's library
joined, and the errors for missing or mismatched forecasts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nas_agent import forecasts
from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "family_ensemble.py"


def write_run(folder, target_rows, noise, pred_len=4):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{s}_target_rows": target_rows[s] for s in ("val", "test")}
    for s in ("val", "test"):
        arrays[s] = (forecasts.windows(target_rows[s], pred_len) + noise[s]).astype(np.float32)
    forecasts.save(folder / "forecasts.npz", arrays)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ), timeout=120)


@pytest.fixture
def runs(tmp_path):
    """Two configs x 2 seeds whose errors cancel on both splits, and a third that only adds noise."""
    rng = np.random.default_rng(0)
    rows = {s: rng.normal(size=(23, 3)).astype(np.float32) for s in ("val", "test")}
    for seed in (2021, 2022):
        e = {s: rng.normal(size=(20, 4, 3)).astype(np.float32) for s in ("val", "test")}
        write_run(tmp_path / f"a_ETTh1_s{seed}", rows, e)
        write_run(tmp_path / f"b_ETTh1_s{seed}", rows, {s: -e[s] for s in e})
        write_run(tmp_path / f"c_ETTh1_s{seed}", rows, {s: 3 * rng.normal(size=(20, 4, 3)) for s in e})
    return tmp_path, rows


def test_each_seed_gets_the_validation_chosen_ensemble_and_the_mean(runs):
    out, _ = runs
    proc = run("--out", out, "--configs", "a", "b", "c", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].startswith("| 2021 | shipped configs |")
    assert {m.split()[0] for m in lines[2].split("|")[3].split(",")} == {"a", "b"}  # c only adds noise
    assert "| 0.0000 | 0.0000 |" in lines[2]  # a and b cancel: exact on validation, hence on test
    assert lines[4].startswith("| mean (2 seeds) | shipped configs |")


def test_a_studys_library_joins_every_seed(runs, tmp_path_factory):
    out, rows = runs
    study = tmp_path_factory.mktemp("study")
    write_run(study / "runs" / "run_0003", rows, {s: np.full((20, 4, 3), 0.5) for s in ("val", "test")})
    (study / "runs" / "ensemble.json").write_text(json.dumps({"library": ["run_0003"]}))
    proc = run("--out", out, "--configs", "a", "c", "--seeds", "2", "--study", study)
    assert proc.returncode == 0, proc.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in proc.stdout.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("-", "study"), ("2021", "shipped configs"), ("2021", "study + shipped configs"),
                                            ("2022", "shipped configs"), ("2022", "study + shipped configs"),
                                            ("mean (2 seeds)", "shipped configs"), ("mean (2 seeds)", "study + shipped configs")]
    # the study's run (off by a constant 0.5) lowers c's error: the selection takes it
    assert f"{study.name}/run_0003 x" in rows[2][2] and float(rows[2][4]) < float(rows[1][4])


def test_missing_or_mismatched_forecasts_are_named(runs):
    out, rows = runs
    proc = run("--out", out, "--configs", "a", "--steps", "0")
    assert proc.returncode == 1 and "--steps must be >= 1" in proc.stderr
    (out / "a_ETTh1_s2021" / "forecasts.npz").write_bytes(b"not an npz")
    proc = run("--out", out, "--configs", "a", "--seeds", "1")
    assert proc.returncode == 1 and "a: " in proc.stderr and "is unreadable" in proc.stderr
    proc = run("--out", out, "--configs", "b", "zzz", "--seeds", "1")
    assert proc.returncode == 1 and "missing forecasts" in proc.stderr and "zzz_ETTh1_s2021" in proc.stderr
    other = {s: r + 1 for s, r in rows.items()}
    write_run(out / "d_ETTh1_s2021", other, {s: np.zeros((20, 4, 3)) for s in other})
    proc = run("--out", out, "--configs", "b", "d", "--seeds", "1")
    assert proc.returncode == 1 and "d_ETTh1_s2021" in proc.stderr and "targets differ" in proc.stderr
