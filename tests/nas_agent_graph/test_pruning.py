"""Learning-curve pruning: the pure decision, train.py's PRUNE request, and a real search that
prunes a run that learns nothing (tiny configs, real training, no fakes)."""
import json
import math
import subprocess
import time

import pytest
from optuna.trial import TrialState

from nas_agent.agent_state import RunInfo, load_agent_state
from nas_agent_graph.cli import parse_prune_warmup, run_search
from nas_agent_graph.pruning import PastCurve, past_curves, prune_decision
from nas_agent_graph.report import run_cells
from nas_agent.config import ConfigError
from tests.conftest import PYTHON, ROOT, run_env
from tests.nas_agent_graph.test_graph import ScriptedProposer, base_raw, make_ctx

PAST = [PastCurve("run_0000", (1.0, 0.9, 0.8, 0.7)), PastCurve("run_0001", (1.1, 0.95, 0.85, 0.8)),
        PastCurve("run_0002", (0.9, 0.8, 0.7, 0.6))]


# --------------------------------------------------------------------------- the pure decision

def test_median_prunes_a_curve_worse_than_the_median_and_says_why():
    d = prune_decision("median", PAST, [1.5, 1.4])
    assert d is not None and d.epoch == 2 and d.value == 1.4
    assert d.threshold == pytest.approx(0.9) and d.n_runs == 3  # median of 0.9, 0.95, 0.8
    assert "pruned (median) at epoch 2" in d.text() and "0.900000" in d.text()
    assert d.to_dict()["text"] == d.text()


def test_a_good_or_average_curve_is_not_pruned():
    assert prune_decision("median", PAST, [0.8, 0.7]) is None
    assert prune_decision("median", PAST, [1.0, 0.9, 0.8]) is None  # equal to the median is not worse
    assert prune_decision("asha", PAST, [0.5, 0.4, 0.3]) is None


def test_warmup_epochs_and_min_runs_hold_pruning_back():
    assert prune_decision("median", PAST, [1.5]) is None  # epoch 1 <= warm-up 1
    assert prune_decision("median", PAST, [1.5, 1.4], warmup_epochs=2) is None
    assert prune_decision("median", PAST, [1.5, 1.4, 1.3], warmup_epochs=2).epoch == 3
    assert prune_decision("median", PAST[:2], [1.5, 1.4]) is None  # 2 finished runs < 3
    assert prune_decision("median", PAST[:2], [1.5, 1.4], min_runs=2) is not None
    # pruned runs are compared with, but do not count as finished runs
    pruned = [PastCurve(c.run_id, c.values, pruned=True) for c in PAST]
    assert prune_decision("median", pruned, [1.5, 1.4]) is None
    assert prune_decision("none", PAST, [9.0, 9.0]) is None


def test_asha_keeps_the_best_third_at_its_rungs():
    d = prune_decision("asha", PAST, [1.5, 1.4])  # first rung: epoch 2 (warm-up 1 + 1)
    assert d is not None and d.method == "asha" and d.epoch == 2 and d.value == 1.4
    assert d.threshold == pytest.approx(0.8) and d.n_runs == 3
    assert prune_decision("asha", PAST, [1.5, 0.79]) is None  # best of the rung
    assert prune_decision("asha", PAST, [0.5, 0.4, 9.0]) is None  # epoch 3 is no rung (rungs 2, 6, 18)


def test_missed_epochs_and_non_finite_values():
    # an epoch the live search did not see is still judged: pruned at the epoch that failed
    d = prune_decision("median", PAST, [1.5, 1.4, 0.1])
    assert d is not None and d.epoch == 2
    assert prune_decision("median", PAST, [1.5, math.nan]) is None  # train.py reports it as diverged
    assert prune_decision("median", PAST, [1.5, None]) is None


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown pruner 'hyperband'"):
        prune_decision("hyperband", PAST, [1.0, 1.0])
    with pytest.raises(ValueError, match="RUNS >= 1"):
        prune_decision("median", PAST, [1.0, 1.0], min_runs=0)
    assert parse_prune_warmup("2,5") == (2, 5)
    for bad in ("2", "a,b", "1,0", "-1,3"):
        with pytest.raises(ConfigError, match="--prune-warmup"):
            parse_prune_warmup(bad)


def test_a_pruned_run_is_shown_to_the_samplers_as_a_pruned_trial_with_its_curve(tmp_path):
    from nas_agent_graph.proposers import trial_for_run
    from nas_agent_graph.search_space import load_space
    from nas_agent_graph.testing import TINY_SPACE
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    space = load_space(tmp_path / "space.json")
    ok = RunInfo(run_id="run_0000", status="ok", val_mse=0.5, config=base_raw(None), extra={"curve": [0.6, 0.5]})
    pruned = RunInfo(run_id="run_0001", status="pruned", val_mse=0.9, config=base_raw(None),
                     extra={"curve": [1.0, 0.9], "pruned": {"epoch": 2}})
    assert trial_for_run(ok, space).state == TrialState.COMPLETE
    t = trial_for_run(pruned, space)
    assert t.state == TrialState.PRUNED and t.value is None and t.intermediate_values == {1: 1.0, 2: 0.9}
    assert run_cells(pruned, None)["status"] == "pruned@2"


# --------------------------------------------------------------------------- train.py honours PRUNE

def test_train_py_stops_on_a_prune_request_and_writes_every_file(tmp_path, tiny_config):
    runs = tmp_path / "runs"
    run_dir = runs / "run_0000"
    cmd = [PYTHON, str(ROOT / "train.py"), "--config", str(tiny_config), "--tag", "run_0000", "--runs-dir",
           str(runs), "--set", "training.max_epochs=50", "--set", "training.max_steps_per_epoch=5",
           "--set", "training.patience=50"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "history.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    (run_dir / "PRUNE").write_text("looks worse than the others\n{}\n")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 5, out[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert metrics["status"] == "pruned" and "looks worse than the others" in metrics["error"]
    assert 1 <= metrics["epochs_run"] == len(history) < 50
    best = min(history, key=lambda h: h["val_mse"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["val_mse"] == pytest.approx(best["val_mse"], rel=1e-6)  # the restored best checkpoint
    assert metrics["test_mse"] is not None and metrics["test_mae"] is not None
    for name in ("best_model.pth", "learning_curve.png", "config_used.py"):
        assert (run_dir / name).is_file(), name
    assert "status:         pruned" in out


@pytest.mark.slow  # ~11 s here
def test_a_stale_prune_request_does_not_stop_a_new_attempt(tmp_path, tiny_config):
    run_dir = tmp_path / "runs" / "run_0000"
    run_dir.mkdir(parents=True)
    (run_dir / "PRUNE").write_text("from an earlier attempt\n")
    proc = subprocess.run([PYTHON, str(ROOT / "train.py"), "--config", str(tiny_config), "--tag", "run_0000",
                           "--runs-dir", str(tmp_path / "runs"), "--set", "training.max_epochs=1",
                           "--set", "training.max_steps_per_epoch=3"],
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"


# --------------------------------------------------------------------------- a real search

@pytest.mark.slow  # a real search (~50 s); the default suite must stay under 15 min
def test_search_prunes_a_run_that_learns_nothing_and_not_a_good_one(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = base_raw(tmp_path)
    bad = json.loads(json.dumps(base))
    bad["training"]["lr"] = 1e-8  # learns nothing
    clone = json.loads(json.dumps(base))
    clone["training"]["time_budget_s"] = 10_000.0  # trains exactly like the baseline (CPU is deterministic)
    quick = ["training.max_epochs=4", "training.max_steps_per_epoch=10", "training.patience=10"]
    ctx = make_ctx(tmp_path, ScriptedProposer([bad, clone]), max_runs=3, overrides=quick, prune="median",
                   prune_warmup_epochs=1, prune_min_runs=1, env=run_env())
    assert run_search(ctx) == 0
    study = load_agent_state(ctx.state_path)
    assert [r.status for r in study.runs] == ["ok", "pruned", "ok"]
    base_run, pruned, good = study.runs
    assert not pruned.accepted and study.best_run_id in ("run_0000", "run_0002")
    info = pruned.extra["pruned"]
    assert info["method"] == "median" and info["epoch"] >= 2 and info["value"] > info["threshold"]
    assert info["threshold"] == pytest.approx(base_run.extra["curve"][info["epoch"] - 1])
    assert pruned.reason.startswith(f"pruned (median) at epoch {info['epoch']}")
    run_dir = tmp_path / "runs" / "run_0001"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["epochs_run"] < 4
    assert pruned.val_mse == pytest.approx(min(pruned.extra["curve"]))  # the best epoch's val MSE
    assert pruned.test_mse is not None
    for name in ("best_model.pth", "learning_curve.png", "history.json", "config_used.py", "PRUNE"):
        assert (run_dir / name).is_file(), name
    assert good.extra["curve"] == base_run.extra["curve"] and "pruned" not in good.extra
    assert [p.run_id for p in past_curves(study, ctx.runs_dir) if p.pruned] == ["run_0001"]
