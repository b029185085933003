"""train.py end to end: real subprocesses, real ETTh1, a tiny model. Every status is exercised."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from nas_agent.config import ConfigError, load_config, parse_config_source
from tests.conftest import PYTHON, ROOT, run_env

OUTPUTS = ("config_used.py", "metrics.json", "history.json", "learning_curve.png", "best_model.pth", "train.log",
           "forecasts.npz")


def train(tmp_path, config, tag, *extra, timeout=300):
    cmd = [PYTHON, "train.py", "--config", str(config), "--tag", tag, "--runs-dir", str(tmp_path / "runs"), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)


def metrics_of(tmp_path, tag):
    return json.loads((tmp_path / "runs" / tag / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs of the tiny config with the same seed (shared by several tests)."""
    from tests.conftest import TINY_CONFIG
    tmp = tmp_path_factory.mktemp("e2e")
    config = tmp / "tiny.py"
    config.write_text(TINY_CONFIG)
    procs = [train(tmp, config, tag, "--set", "training.max_epochs=3") for tag in ("a", "b")]
    return tmp, config, procs


def test_run_writes_every_file_and_beats_naive(two_runs):
    tmp, _, procs = two_runs
    proc = procs[0]
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp / "runs" / "a"
    for name in OUTPUTS:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    m = metrics_of(tmp, "a")
    assert m["status"] == "ok" and m["error"] is None
    for k in ("val_mse", "val_mae", "test_mse", "test_mae", "train_mse"):
        assert isinstance(m[k], float) and m[k] == m[k] and m[k] < 1e3, k
    assert m["val_mse"] < m["naive_val_mse"], "must beat repeating the last value"
    assert m["epochs_run"] == 3 and 1 <= m["best_epoch"] <= 3 and m["n_params"] > 0
    saved = json.loads((run / "history.json").read_text())
    history = saved["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and saved["best_epoch"] == m["best_epoch"]
    assert set(history[0]) >= {"train_mse", "val_mse", "val_mae", "lr", "epoch_time_s"}
    # The reported val_mse is the best epoch's, re-measured on the restored checkpoint.
    assert m["val_mse"] == pytest.approx(history[m["best_epoch"] - 1]["val_mse"], rel=1e-6)
    # Greppable summary block.
    assert "\nstatus:         ok\n" in proc.stdout and "test_mse:" in proc.stdout
    # Where the run is inside its epoch, for the search's live panel: the last write is the epoch's end.
    progress = json.loads((run / "progress.json").read_text())
    assert progress["epoch"] == 3 and progress["step"] == progress["steps"] and progress["steps_per_s"] > 0
    # Throughput and precision: training samples/s over the steps alone, evaluation seconds.
    assert m["samples_per_s"] > 0 and m["eval_s"] > 0 and 0 < m["startup_s"] < 120 and "samples_per_s:" in proc.stdout
    assert m["amp"] in ("bf16", "off") and m["amp_reason"]


def test_same_seed_gives_same_metrics(two_runs):
    tmp, _, procs = two_runs
    assert all(p.returncode == 0 for p in procs)
    a, b = metrics_of(tmp, "a"), metrics_of(tmp, "b")
    for k in ("val_mse", "val_mae", "test_mse", "test_mae", "train_mse", "best_epoch"):
        assert a[k] == b[k], k


def test_config_used_is_rerunnable_and_exact(two_runs):
    tmp, config, _ = two_runs
    used = tmp / "runs" / "a" / "config_used.py"
    effective = load_config(used)
    assert effective.training.max_epochs == 3  # the --set override is recorded
    assert effective.model.enc_in == 7 and effective.model.c_out == 7
    original = load_config(config, ["training.max_epochs=3"])
    assert effective.model_dump(exclude={"model": {"enc_in", "dec_in", "c_out"}}) == \
        original.model_dump(exclude={"model": {"enc_in", "dec_in", "c_out"}})


def test_checkpoint_reloads_into_a_model_with_the_same_val_mse(two_runs):
    from model import build_model
    from nas_agent.data import load_dataset
    from nas_agent.schema import Config
    import train as train_mod
    tmp, _, _ = two_runs
    ckpt = torch.load(tmp / "runs" / "a" / "best_model.pth", weights_only=False)
    cfg = Config.model_validate(ckpt["config"])
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    ds = load_dataset(cfg.data, cfg.model.embed)
    val_mse, _ = train_mod.evaluate(model, ds.val, torch.device("cpu"))
    assert val_mse == pytest.approx(metrics_of(tmp, "a")["val_mse"], rel=1e-5)


def test_forecasts_are_every_window_with_the_reported_errors_and_predict_reproduces_them(two_runs):
    """forecasts.npz (for the study's ensemble) holds the forecast of every validation and test
    window, whose MSE/MAE are metrics.json's; train.py --predict rebuilds it from the checkpoint."""
    import numpy as np

    from nas_agent.data import load_dataset
    from nas_agent.forecasts import windows
    tmp, _, _ = two_runs
    run, m = tmp / "runs" / "a", metrics_of(tmp, "a")
    saved = dict(np.load(run / "forecasts.npz"))
    ds = load_dataset(load_config(run / "config_used.py").data, "timeF")
    for split in ("val", "test"):
        target = windows(saved[f"{split}_target_rows"], 24)
        assert saved[split].shape == target.shape == (len(getattr(ds, split)), 24, 7)  # no window dropped
        _, _, _, _, y = getattr(ds, split).batch(torch.arange(len(getattr(ds, split))))
        assert np.array_equal(target, y.numpy())
        err = (saved[split] - target).astype(np.float64)
        assert np.square(err).mean() == pytest.approx(m[f"{split}_mse"], rel=1e-12)
        assert np.abs(err).mean() == pytest.approx(m[f"{split}_mae"], rel=1e-12)
    out = tmp / "predicted.npz"
    proc = train(tmp, run / "config_used.py", "a", "--predict", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = np.load(out)
    assert all(np.array_equal(saved[k], again[k]) for k in saved)
    assert json.loads((run / "metrics.json").read_text()) == m  # nothing of the run was touched
    missing = train(tmp, run / "config_used.py", "no_such_run", "--predict", str(tmp / "x.npz"))
    assert missing.returncode == 2 and "best_model.pth not found" in missing.stderr


def test_existing_run_is_never_silently_overwritten(two_runs):
    tmp, config, _ = two_runs
    before = (tmp / "runs" / "a" / "metrics.json").read_bytes()
    proc = train(tmp, config, "a")
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert (tmp / "runs" / "a" / "metrics.json").read_bytes() == before


@pytest.mark.slow  # four train.py runs: ~26 s here
def test_overwrite_seed_flag_and_other_training_classes(tmp_path, tiny_config):
    assert train(tmp_path, tiny_config, "r", "--set", "training.max_epochs=1").returncode == 0
    proc = train(tmp_path, tiny_config, "r", "--overwrite", "--seed", "7", "--set", "training.max_epochs=2",
                 "--set", "training.optimizer_class=optim.SGD", "--set", "training.optimizer_kwargs={'momentum': 0.9}",
                 "--set", "training.scheduler_class=optim.lr_scheduler.ReduceLROnPlateau",
                 "--set", "training.scheduler_kwargs={'factor': 0.1, 'patience': 0}",
                 "--set", "training.criterion_class=nn.HuberLoss", "--set", "training.grad_clip=0.5",
                 "--set", "model.attn=full", "--set", "model.embed=learned", "--set", "model.revin=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = metrics_of(tmp_path, "r")
    assert m["seed"] == 7 and m["epochs_run"] == 2 and m["status"] == "ok"
    history = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["epochs"]
    if history[1]["val_mse"] >= history[0]["val_mse"]:  # plateau stepped with the validation MSE
        assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.1)
    assert all(h["train_loss"] != h["train_mse"] for h in history)  # Huber loss optimised, MSE reported
    assert load_config(tmp_path / "runs" / "r" / "config_used.py").training.seed == 7


def test_timeout_tests_best_checkpoint_and_writes_everything(tmp_path, tiny_config):
    proc = train(tmp_path, tiny_config, "t", "--set", "training.max_epochs=1000", "--set", "training.patience=1000",
                 "--set", "training.time_budget_s=6")
    assert proc.returncode == 4, proc.stderr[-2000:]
    m = metrics_of(tmp_path, "t")
    assert m["status"] == "timeout" and "time budget" in m["error"]
    assert m["test_mse"] is not None and m["val_mse"] is not None
    for name in OUTPUTS:
        assert (tmp_path / "runs" / "t" / name).is_file(), name


SLOW_EVAL_MODEL = '''
import importlib.util, pathlib, time, torch
spec = importlib.util.spec_from_file_location("base_model", pathlib.Path({root!r}) / "model.py")
base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)

class SlowEval(torch.nn.Module):
    """The real model, {sleep}s slower per forward call in eval mode: an expensive evaluation."""
    def __init__(self, inner):
        super().__init__(); self.inner = inner
    def forward(self, *x):
        if not self.training:
            time.sleep({sleep})
        return self.inner(*x)

def build_model(config):
    return SlowEval(base.build_model(config))
'''


def slow_eval_model(tmp_path, sleep: float):
    path = tmp_path / "slow_eval.py"
    path.write_text(SLOW_EVAL_MODEL.format(root=str(ROOT), sleep=sleep))
    return path


def test_the_time_budget_keeps_room_for_the_final_evaluation(tmp_path, tiny_config):
    # About 22 evaluation batches of 0.1 s: the last ~2 s of the 6 s budget are kept for them, so
    # training and the final evaluation together end within the budget (before, 2 s past it).
    proc = train(tmp_path, tiny_config, "k", "--model", str(slow_eval_model(tmp_path, 0.1)),
                 "--set", "training.max_epochs=1000", "--set", "training.patience=1000",
                 "--set", "training.time_budget_s=6")
    assert proc.returncode == 4, proc.stderr[-2000:]
    m = metrics_of(tmp_path, "k")
    assert m["status"] == "timeout" and "s kept for the evaluation)" in m["error"], m["error"]
    assert m["test_mse"] is not None and m["val_mse"] is not None
    assert m["eval_s"] > 2.2  # the evaluations really were slow
    assert m["train_eval_s"] <= 6 + 1.0, m  # within the budget, give or take a step and the estimate


@pytest.mark.slow  # two runs with a slowed evaluation: ~29 s here
def test_the_evaluation_probe_leaves_training_as_it_was(tmp_path, tiny_config):
    # A budget that never binds times one evaluation batch before training; the ProbSparse key
    # sample it draws comes from a forked RNG, so the run is the same as without a budget.
    for tag, extra in (("none", []), ("budget", ["--set", "training.time_budget_s=10000"])):
        proc = train(tmp_path, tiny_config, tag, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "runs"
    curves = [json.loads((runs / tag / "history.json").read_text())["epochs"] for tag in ("none", "budget")]
    assert [(e["train_loss"], e["val_mse"]) for e in curves[0]] == [(e["train_loss"], e["val_mse"]) for e in curves[1]]
    a, b = metrics_of(tmp_path, "none"), metrics_of(tmp_path, "budget")
    assert (a["val_mse"], a["test_mse"]) == (b["val_mse"], b["test_mse"])
    assert b["startup_marks"]["eval_probe"] <= b["startup_marks"]["first_step"]


def test_a_model_whose_evaluation_outlasts_the_budget_fails_at_once(tmp_path, tiny_config):
    # 0.3 s per evaluation batch: scoring every val and test window takes longer than the 3 s budget,
    # so the run neither trains nor evaluates; it says why and how to fit.
    proc = train(tmp_path, tiny_config, "b", "--model", str(slow_eval_model(tmp_path, 0.3)),
                 "--set", "training.time_budget_s=3")
    assert proc.returncode == 1, proc.stderr[-2000:]
    m = metrics_of(tmp_path, "b")
    assert m["status"] == "failed" and m["over_budget"] is True
    assert m["error"].startswith("too slow for the time budget: evaluating the"), m["error"]
    assert "more than training.time_budget_s 3s" in m["error"] and "a larger budget fits" in m["error"]
    assert m["epochs_run"] == 0 and m["samples_per_s"] is None and m["val_mse"] is None
    assert 0.3 <= m["eval_s"] < 3  # a few timed batches (6.6 s for all of them)


@pytest.mark.parametrize("per_call, per_window, sizes, verdict", [
    (0.0, 3.0, [8, 8, 16], 3.0),  # far over the budget (x4): the quick look decides, no full batch
    (0.0, 1.0, [8, 8, 16, 256, 256], 1.0),  # over, within the margin: full batches decide, the warm one counts
    (0.0, 0.01, [8, 8, 16, 256], 0.01),  # within the budget: one full batch for the reserve
    # A fixed cost per call (a 0.5 s sleep, say) is not taken for a slow model: over 4x the budget on
    # 16 windows (0.5 / 16 s a window), but a full batch is cheap per window, and fits.
    (0.5, 0.0, [8, 8, 16, 256], 0.5 / 256),
])
def test_the_evaluation_cost_is_looked_at_on_small_batches_first(monkeypatch, per_call, per_window, sizes, verdict):
    """A model far over the budget fails after three batches of at most 16 windows, not after two
    full evaluation batches (minutes each for the slowest models a search proposes)."""
    import train as train_mod
    asked = []

    def timed(model, windows, device, batch=train_mod.EVAL_BATCH):
        asked.append(batch)
        cold = 100.0 if len(asked) == 1 else 0.0  # the first call pays set-up: never part of a verdict
        return (cold + per_call + batch * per_window) / batch

    monkeypatch.setattr(train_mod, "eval_seconds_per_window", timed)
    # 100 windows against a 60 s budget: over it from 0.6 s a window, far over from 2.4 s.
    assert train_mod.eval_cost_per_window(None, None, None, 100, 60.0) == pytest.approx(verdict)
    assert (train_mod.PROBE_WINDOWS, train_mod.EVAL_BATCH, train_mod.PROBE_MARGIN) == (16, 256, 4.0)
    assert asked == sizes


def test_the_full_batch_cost_is_extrapolated_from_two_small_batches():
    import train as train_mod
    # 0.2 s a call and 0.5 s a window: 8 windows take 4.2 s, 16 take 8.2 s; a full batch 128.2 s.
    assert train_mod.full_batch_cost(4.2, 8.2, 8, 16) == pytest.approx(128.2 / 256)
    assert train_mod.full_batch_cost(0.3, 0.3, 8, 16) == pytest.approx(0.3 / 256)  # all per call
    assert train_mod.full_batch_cost(0.5, 0.3, 8, 16) == pytest.approx(0.3 / 256)  # noise: no negative cost


NAN_MODEL = '''
import importlib.util, pathlib, torch
spec = importlib.util.spec_from_file_location("base_model", pathlib.Path({root!r}) / "model.py")
base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)

class Exploding(torch.nn.Module):
    """The real model, whose output turns NaN from the 4th training call on."""
    def __init__(self, inner):
        super().__init__(); self.inner = inner; self.calls = 0
    def forward(self, *x):
        self.calls += self.training
        out = self.inner(*x)
        return out * float("nan") if self.calls >= 4 else out

def build_model(config):
    return Exploding(base.build_model(config))
'''


def test_nan_fails_fast_as_diverged(tmp_path, tiny_config):
    model_file = tmp_path / "nan_model.py"
    model_file.write_text(NAN_MODEL.format(root=str(ROOT)))
    proc = train(tmp_path, tiny_config, "d", "--model", str(model_file))
    assert proc.returncode == 3, proc.stderr[-2000:]
    m = metrics_of(tmp_path, "d")
    assert m["status"] == "diverged" and "epoch 1, step 4" in m["error"]
    assert m["epochs_run"] == 0 and m["test_mse"] is None
    import train as train_mod
    assert m["model_hash"] == train_mod.model_file_hash(str(model_file))  # the file it trained, not model.py


def test_exception_is_recorded_as_failed(tmp_path, tiny_config):
    model_file = tmp_path / "broken.py"
    model_file.write_text("def build_model(config):\n    raise RuntimeError('boom: no model today')\n")
    proc = train(tmp_path, tiny_config, "f", "--model", str(model_file))
    assert proc.returncode == 1
    m = metrics_of(tmp_path, "f")
    assert m["status"] == "failed" and "boom: no model today" in m["error"]
    assert "error:" in proc.stdout


@pytest.mark.slow  # ~12 s here
def test_sigterm_writes_what_exists_as_interrupted(tmp_path, tiny_config):
    cmd = [PYTHON, "train.py", "--config", str(tiny_config), "--tag", "i", "--runs-dir", str(tmp_path / "runs"),
           "--set", "training.max_epochs=1000", "--set", "training.patience=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = tmp_path / "runs" / "i" / "history.json"
    deadline = time.monotonic() + 120
    while not history.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    m = metrics_of(tmp_path, "i")
    assert m["status"] == "interrupted" and "SIGTERM" in m["error"]
    assert m["epochs_run"] >= 1 and m["val_mse"] is not None and m["test_mse"] is None
    assert (tmp_path / "runs" / "i" / "best_model.pth").is_file()


@pytest.mark.parametrize("gap_s, survives", [(0.0, True), (1.5, False)])
def test_a_repeated_sigterm_is_the_same_request_unless_it_comes_later(gap_s, survives):
    """The kernel's parent-death SIGTERM can come twice within a millisecond (once per thread of a
    dying orchestrator): the repeat must not kill train.py before it writes. A user's later
    second SIGTERM still acts as usual. Real signals, sent by a process to itself."""
    code = ("import os, signal, time, train\n"
            "for sig in (signal.SIGINT, signal.SIGTERM):\n"
            "    signal.signal(sig, train._on_signal)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            f"time.sleep({gap_s})\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.5)\n"
            "print('stop requested by', train._stop_signal)\n")
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    if survives:
        assert proc.returncode == 0 and "stop requested by ['SIGTERM']" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGTERM and not proc.stdout, proc.stderr[-2000:]


def test_a_sigterm_after_the_parent_died_is_the_same_request(tmp_path):
    """The parent-death SIGTERM can also come later than TERM_REPEAT_S after the first (a search that
    asked its run to stop, then was killed itself): a SIGTERM once the parent is gone is ignored."""
    ready, done = tmp_path / "ready", tmp_path / "done"
    child = ("import os, signal, time, train\n"
             "for sig in (signal.SIGINT, signal.SIGTERM):\n"
             "    signal.signal(sig, train._on_signal)\n"
             "os.kill(os.getpid(), signal.SIGTERM)\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "while os.getppid() == train._PARENT_PID:\n"
             "    time.sleep(0.05)\n"
             "time.sleep(1.5)\n"
             "os.kill(os.getpid(), signal.SIGTERM)\n"
             "time.sleep(0.5)\n"
             f"open({str(done)!r}, 'w').write(repr(train._stop_signal))\n")
    parent = ("import os, subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
              f"while not os.path.exists({str(ready)!r}):\n"
              "    time.sleep(0.05)\n")  # then exits: the child is reparented
    subprocess.run([PYTHON, "-c", parent], cwd=ROOT, env=run_env(), timeout=120, check=True)
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done.exists() and done.read_text() == "['SIGTERM']"


def test_bad_data_is_a_failed_run_with_a_clear_error(tmp_path, tiny_config):
    bad = tmp_path / "bad.csv"
    bad.write_text("date,a,OT\n2020-01-01,1,2\n2020-01-02,x,3\n")
    proc = train(tmp_path, tiny_config, "b", "--set", f"data.path={bad}")
    assert proc.returncode == 1
    m = metrics_of(tmp_path, "b")
    assert f"{bad}:3: column 'a' has the non-numeric value 'x'" in m["error"]
    assert (tmp_path / "runs" / "b" / "config_used.py").is_file()


def test_a_pending_signal_interrupts_evaluation(tiny_config):
    """SIGINT/SIGTERM is honoured outside the batch loop too (data loading, evaluation)."""
    import train as train_mod
    from model import build_model
    from nas_agent.data import load_dataset
    cfg = load_config(tiny_config)
    ds = load_dataset(cfg.data, cfg.model.embed)
    cfg.model.enc_in = cfg.model.dec_in = cfg.model.c_out = ds.enc_in
    model = build_model(cfg.model_dump())
    train_mod._stop_signal.append("SIGTERM")
    try:
        with pytest.raises(train_mod.StopTraining, match="received SIGTERM during evaluation"):
            train_mod.evaluate(model, ds.val, torch.device("cpu"))
    finally:
        train_mod._stop_signal.clear()


@pytest.mark.slow  # the README's full-size Informer, twice: ~75 s here
def test_readme_config_trains_and_its_config_used_reruns_as_is(tmp_path, readme_config):
    """The original nas_system's config.py example, as written, with a small budget (a few steps, a small
    slice of ETTh1 to evaluate on); an override in its spelling; config_used.py comes out in the same
    spelling and re-runs without flags to the same result."""
    proc = train(tmp_path, readme_config, "old", "--set", "training.max_epochs=1",
                 "--set", "training.max_steps_per_epoch=5", "--set", "data.split=ratio",
                 "--set", "data.split_ratios=[0.1, 0.02, 0.02]", "--set", "training.optimizer_params.lr=3e-4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / "old"
    history = json.loads((run / "history.json").read_text())
    assert history["best_epoch"] == 1 and history["epochs"][0]["lr"] == pytest.approx(3e-4)
    used = run / "config_used.py"
    raw = parse_config_source(used.read_text())
    assert raw["training"]["optimizer_params"] == {"lr": 3e-4, "weight_decay": 1e-4}
    assert raw["training"]["scheduler_params"] == {"T_max": 10} and raw["data"]["batch_size"] == 32
    assert "lr" not in raw["training"] and raw["seed"] == 2021
    again = train(tmp_path, used, "again")
    assert again.returncode == 0, again.stderr[-2000:]
    first, second = metrics_of(tmp_path, "old"), metrics_of(tmp_path, "again")
    assert first["config_hash"] == second["config_hash"] and first["val_mse"] == second["val_mse"]


def test_the_batch_bar_shows_rate_and_etas_on_a_terminal_only(monkeypatch):
    import io

    import train as train_mod

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    train_mod._progress(2, 10, 30, 120, 0.5, epoch_s=15.0, budget_left=None)
    bar = term.getvalue()
    # 2 it/s: 90 steps left in the epoch (45 s), and 8 more epochs of 120 steps (480 s)
    assert "30/120" in bar and "2.0 it/s" in bar and "epoch ETA 0m45s" in bar and "run ETA 8m45s" in bar
    term.truncate(0)
    train_mod._progress(2, 10, 30, 120, 0.5, epoch_s=15.0, budget_left=100.0)  # the time budget ends first
    assert "run ETA 1m40s" in term.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    train_mod._progress(2, 10, 30, 120, 0.5, epoch_s=15.0, budget_left=None)
    assert pipe.getvalue() == ""  # logs and pipes get the per-epoch lines only


# --------------------------------------------------------------------------- bf16 autocast (training.amp)

X86_WITH = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_WITHOUT = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"
ARM_WITH = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    import train as train_mod
    assert train_mod.cpu_has_native_bf16(X86_WITH) == (True, "the CPU has avx512_bf16")
    assert train_mod.cpu_has_native_bf16(ARM_WITH)[0]
    native, why = train_mod.cpu_has_native_bf16(X86_WITHOUT)
    assert not native and "no native bf16" in why


def test_amp_mode_follows_the_config_and_the_machine(monkeypatch):
    import train as train_mod
    cpu = torch.device("cpu")
    read_flags = train_mod.cpu_has_native_bf16
    assert train_mod.amp_mode(cpu, False) == ("off", "training.amp is false")
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: read_flags(X86_WITHOUT))
    mode, why = train_mod.amp_mode(cpu, True)
    assert mode == "off" and "no native bf16" in why
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: read_flags(X86_WITH))
    mode, why = train_mod.amp_mode(cpu, True)  # the probe really runs bf16 autocast on this CPU
    assert mode == "bf16" and "probe ok" in why


def test_amp_on_a_cpu_without_bf16_trains_in_fp32_and_says_why(tmp_path, tiny_config, monkeypatch):
    import train as train_mod
    read_flags = train_mod.cpu_has_native_bf16
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: read_flags(X86_WITHOUT))
    # in this process, so the probe can be told the CPU has no bf16
    code = run_in_process(tmp_path, "--config", str(tiny_config), "--tag", "nobf16", "--set", "training.max_epochs=1",
                          "--set", "training.max_steps_per_epoch=3", "--set", "training.amp=True")
    assert code == 0
    m = metrics_of(tmp_path, "nobf16")
    assert m["amp"] == "off" and "no native bf16" in m["amp_reason"]
    assert "amp off (the CPU has no native bf16" in (tmp_path / "runs" / "nobf16" / "train.log").read_text()


def test_bf16_training_is_reproducible(tmp_path, tiny_config):
    import train as train_mod
    native, _ = train_mod.cpu_has_native_bf16()
    if not native:
        pytest.skip("this CPU has no native bf16")
    runs = [train(tmp_path, tiny_config, tag, "--set", "training.max_epochs=1", "--set", "training.amp=True")
            for tag in ("bf_a", "bf_b")]
    assert all(p.returncode == 0 for p in runs), runs[0].stderr[-2000:]
    a, b = metrics_of(tmp_path, "bf_a"), metrics_of(tmp_path, "bf_b")
    assert a["amp"] == "bf16" and a["val_mse"] == b["val_mse"] and a["test_mse"] == b["test_mse"]
    # (that the reported val MSE is an fp32 evaluation of the saved weights is
    # test_checkpoint_reloads_into_a_model_with_the_same_val_mse, with the default amp=True)


def run_in_process(tmp_path, *args) -> int:
    """train.main in this process (no second torch import), its signal and log handlers put back."""
    import train as train_mod
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    try:
        return train_mod.main(["--runs-dir", str(tmp_path / "runs"), *args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for handler in train_mod.log.handlers:
            handler.close()
        train_mod.log.handlers.clear()


@pytest.mark.slow  # two runs compared: ~16 s here
def test_the_in_run_smoke_test_leaves_training_exactly_as_without_it(two_runs):
    tmp, config, procs = two_runs
    proc = train(tmp, config, "smoked", "--set", "training.max_epochs=3", "--smoke-test", "--smoke-timeout", "120")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, smoked = metrics_of(tmp, "a"), metrics_of(tmp, "smoked")
    for k in ("val_mse", "val_mae", "test_mse", "test_mae", "train_mse", "best_epoch", "n_params"):
        assert smoked[k] == plain[k], k
    assert 0 < smoked["smoke_s"] < 60 and "smoke_s" not in plain
    marks = smoked["startup_marks"]
    assert list(marks) == ["imports", "setup", "data", "model", "optimizer", "eval_probe", "first_step"]
    assert marks["first_step"] == pytest.approx(smoked["startup_s"], abs=0.01)


BROKEN_MODELS = {
    "raises": ("def build_model(config):\n    raise RuntimeError('boom: no model today')\n",
               "smoke test failed: RuntimeError: boom: no model today"),
    "wrong shape": ("import torch.nn as nn\n\n\nclass M(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n        self.lin = nn.Linear(1, 1)\n\n"
                    "    def forward(self, x, *rest):\n        return self.lin(x[..., :1])\n\n\n"
                    "def build_model(config):\n    return M()\n",
                    "smoke test failed: ValueError: model output: expected shape [32, 24, 7]"),
}


@pytest.mark.parametrize("kind", list(BROKEN_MODELS))
def test_a_model_failing_the_in_run_smoke_test_ends_the_run_invalid(tmp_path, tiny_config, kind):
    code, expected = BROKEN_MODELS[kind]
    model_file = tmp_path / "model.py"
    model_file.write_text(code)
    assert run_in_process(tmp_path, "--config", str(tiny_config), "--tag", "x", "--model", str(model_file),
                          "--smoke-test") == 6
    m = metrics_of(tmp_path, "x")
    assert m["status"] == "invalid" and m["error"].startswith(expected), m["error"]
    assert m["epochs_run"] == 0 and m["val_mse"] is None
    run = tmp_path / "runs" / "x"
    assert not (run / "best_model.pth").exists() and not (run / "learning_curve.png").exists()
    # without --smoke-test the same model is an ordinary failed run
    assert run_in_process(tmp_path, "--config", str(tiny_config), "--tag", "y", "--model", str(model_file)) == 1
    assert metrics_of(tmp_path, "y")["status"] == "failed"


def test_max_params_and_the_smoke_timeout_end_the_run_invalid(tmp_path, tiny_config):
    assert run_in_process(tmp_path, "--config", str(tiny_config), "--tag", "big", "--max-params", "100") == 6
    m = metrics_of(tmp_path, "big")
    assert m["status"] == "invalid" and m["error"] == f"too many parameters: {m['n_params']:,} > --max-params 100"
    assert run_in_process(tmp_path, "--config", str(tiny_config), "--tag", "slow", "--smoke-test",
                          "--smoke-timeout", "0.001") == 6
    m = metrics_of(tmp_path, "slow")
    assert m["status"] == "invalid" and m["error"] == "smoke test failed: smoke test timed out after 0.001s"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


RESUMABLE_CONFIG = '''
import torch.nn as nn
import torch.optim as optim
# A small slice of ETTh1 (ratio split): epochs of a fraction of a second, most of it evaluation.
data = {"path": "data/ETTh1.csv", "seq_len": 48, "label_len": 24, "pred_len": 24, "split": "ratio",
        "split_ratios": [0.2, 0.04, 0.04]}
model = {"d_model": 16, "n_heads": 2, "e_layers": 2, "d_layers": 1, "d_ff": 32, "dropout": 0.1}
training = {"max_epochs": 10, "batch_size": 32, "lr": 1e-3, "max_steps_per_epoch": 10, "patience": 20,
            "scheduler_class": optim.lr_scheduler.ExponentialLR, "scheduler_kwargs": {"gamma": 0.8}}
'''


@pytest.mark.slow  # six train.py runs: ~70 s here
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    """SIGKILL (nothing written at the end) after epoch 3; --resume continues from the resume
    state, and the curve, the checkpoint's metrics and its forecasts equal an uninterrupted run's
    (dropout, ProbSparse sampling, batch order and the scheduler all carry over)."""
    import train as train_mod
    config = tmp_path / "resumable.py"
    config.write_text(RESUMABLE_CONFIG)
    # Evaluation slowed to about 1 s per epoch, so a loaded machine still kills it mid-run.
    model = ("--model", str(slow_eval_model(tmp_path, 0.05)))
    whole = train(tmp_path, config, "whole", "--resume", *model)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert not (tmp_path / "runs" / "whole" / "resume_state.pt").exists()  # an ended run keeps none

    cmd = [PYTHON, "train.py", "--config", str(config), "--tag", "cut", "--runs-dir", str(tmp_path / "runs"), "--resume",
           *model]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "cut"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            # epoch 3 in the curve: epoch 2's resume state, saved before it, is on disk
            if len(json.loads((run_dir / "history.json").read_text())["epochs"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    assert not (run_dir / "metrics.json").exists(), "the run ended before it could be killed"
    saved = torch.load(run_dir / "resume_state.pt", weights_only=True)
    assert 2 <= saved["next_epoch"] - 1 < 10 and tuple(saved) == train_mod.RESUME_KEYS
    assert (run_dir / ".lock").is_file()  # SIGKILL left the folder's lock file; the kernel freed the lock

    # Another config's state is refused, naming both hashes, and none of the run's files change
    # (the refused train.py took the folder's lock, as any train.py does, and removed its file).
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}
    other = train(tmp_path, config, "cut", "--resume", *model, "--set", "training.lr=0.002")
    assert other.returncode == 2
    assert "is the state of another config (config hash expected" in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before

    # A passing failure (the data is not there in this session) keeps the state and the files,
    # and rewrites the curve as the resume state holds it. (That can be one epoch shorter than
    # the history.json the kill left: the kill may land between an epoch's history.json and its
    # resume state, and the resume state is what a resumed run goes on from.)
    curve_saved = {"best_epoch": saved["best_epoch"], "epochs": saved["history"]}
    nodata = subprocess.run(cmd, cwd=ROOT, env=run_env(NAS_DATA_DIR=str(tmp_path / "nodata")), capture_output=True,
                            text=True, timeout=300)
    assert nodata.returncode == 1 and metrics_of(tmp_path, "cut")["status"] == "failed"
    assert (run_dir / "resume_state.pt").is_file() and json.loads((run_dir / "history.json").read_text()) == curve_saved
    assert metrics_of(tmp_path, "cut")["epochs_run"] == len(curve_saved["epochs"])

    # A state that does not fit the model built now (its weights changed shape) is refused with
    # the reason and removed, so the next --resume trains afresh; the rest of the folder stays.
    unfit = tmp_path / "runs" / "unfit"
    shutil.copytree(run_dir, unfit)
    bad = torch.load(unfit / "resume_state.pt", weights_only=True)
    name = next(iter(bad["model"]))
    bad["model"][name] = torch.zeros(3, 3)
    torch.save(bad, unfit / "resume_state.pt")
    refused = train(tmp_path, config, "unfit", "--resume", *model)
    assert refused.returncode == 1 and "resume_state.pt does not fit this run's model or optimizer" in refused.stderr
    assert not (unfit / "resume_state.pt").exists()
    assert json.loads((unfit / "history.json").read_text()) == curve_saved

    again = train(tmp_path, config, "cut", "--resume", *model)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed after epoch {saved['next_epoch'] - 1}" in again.stderr
    whole_fc = np.load(tmp_path / "runs" / "whole" / "forecasts.npz")
    cut_fc = np.load(run_dir / "forecasts.npz")
    assert all(np.array_equal(whole_fc[k], cut_fc[k]) for k in whole_fc.files)
    a, b = metrics_of(tmp_path, "whole"), metrics_of(tmp_path, "cut")
    curve = [(e["epoch"], e["train_loss"], e["val_mse"], e["lr"]) for e in
             json.loads((tmp_path / "runs" / "whole" / "history.json").read_text())["epochs"]]
    assert curve == [(e["epoch"], e["train_loss"], e["val_mse"], e["lr"]) for e in
                     json.loads((run_dir / "history.json").read_text())["epochs"]]
    assert len(curve) == 10 and curve[-1][3] < curve[0][3]  # the scheduler carried on
    for key in ("status", "best_epoch", "val_mse", "val_mae", "test_mse", "test_mae", "epochs_run"):
        assert a[key] == b[key], key
    assert b["train_time_sec"] > 0 and not (run_dir / "resume_state.pt").exists()
    assert not (run_dir / ".lock").exists()  # taken over from the dead holder, removed at the end

    ended = train(tmp_path, config, "cut", "--resume", *model)
    assert ended.returncode == 2 and "nothing to resume" in ended.stderr


def test_a_resume_state_missing_its_keys_is_refused_with_the_fix(tmp_path, tiny_config):
    """A state from another train.py version (or not a state at all) is a clear refusal, not a traceback."""
    import train as train_mod
    cfg = load_config(tiny_config)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    for payload, missing in (({"config_hash": "x"}, "missing model_hash, next_epoch"), ([1, 2], "missing config_hash")):
        torch.save(payload, run_dir / "resume_state.pt")
        with pytest.raises(ConfigError, match=f"is not a resume state this train.py can continue \\({missing}"):
            train_mod.load_resume_state(run_dir, cfg, "0" * 16)


@pytest.mark.slow  # ~12 s here
def test_resume_restarts_an_unfinished_run_that_left_no_resume_state(tmp_path, tiny_config):
    """A run interrupted without --resume has no state: --resume trains it from the start, and says so."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "history.json").write_text('{"best_epoch": null, "epochs": []}')
    (run_dir / "metrics.json").write_text('{"status": "interrupted"}')
    proc = train(tmp_path, tiny_config, "r", "--resume", "--set", "training.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "holds an unfinished run without a resume state; training from the start" in proc.stderr
    assert metrics_of(tmp_path, "r")["epochs_run"] == 1 and not (run_dir / "resume_state.pt").exists()


@pytest.mark.slow  # ~26 s here
def test_a_second_train_py_on_a_live_run_folder_is_refused_untouched(tmp_path, tiny_config):
    """One train.py per run folder: while another process holds the folder's lock (here this
    test, as a live run would), train.py --resume and --overwrite both exit 2 naming the holder,
    and the folder's files are not read, replaced or removed."""
    from nas_agent.lock import RunFolderLock
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / "history.json").write_text('{"best_epoch": null, "epochs": []}')
    with RunFolderLock(run_dir):
        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir()}
        for flag in ("--resume", "--overwrite"):
            proc = train(tmp_path, tiny_config, "busy", flag, "--set", "training.max_epochs=1")
            assert proc.returncode == 2, (flag, proc.stderr[-2000:])
            assert f"is in use by another train.py: PID {os.getpid()}" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr and "frees itself when it exits" in proc.stderr
            assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir()} == before
    proc = train(tmp_path, tiny_config, "busy", "--resume", "--set", "training.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert metrics_of(tmp_path, "busy")["status"] == "ok" and not (run_dir / ".lock").exists()

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    cmd = [PYTHON, "train.py", "--config", str(tiny_config), "--tag", "t", "--runs-dir", str(not_a_folder)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: cannot lock the run folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_run_killed_in_its_final_evaluation_resumes_to_that_evaluation_alone(tmp_path):
    """Killed after early stopping (patience 1 ends it after epoch 4 of 30), while testing the best
    checkpoint: --resume trains no more epochs, and its final evaluation gives the uninterrupted
    run's metrics and forecasts."""
    config = tmp_path / "resumable.py"
    config.write_text(RESUMABLE_CONFIG)
    slow = str(slow_eval_model(tmp_path, 0.2))  # about 9 s of final evaluation to kill it in
    extra = ("--model", slow, "--resume", "--set", "training.max_epochs=30", "--set", "training.patience=1",
             "--set", "training.lr=0.003")
    whole = train(tmp_path, config, "whole", *extra)
    assert whole.returncode == 0, whole.stderr[-2000:]
    stopped = metrics_of(tmp_path, "whole")["epochs_run"]
    assert "early stop" in whole.stderr and stopped < 30, "the settings no longer stop early on patience"

    cmd = [PYTHON, "train.py", "--config", str(config), "--tag", "cut", "--runs-dir", str(tmp_path / "runs"), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "cut"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # the state after the last epoch is saved before the final evaluation starts
            if torch.load(run_dir / "resume_state.pt", weights_only=True)["next_epoch"] == stopped + 1:
                break
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    assert not (run_dir / "metrics.json").exists(), "the run ended before it could be killed"
    assert len(json.loads((run_dir / "history.json").read_text())["epochs"]) == stopped

    again = train(tmp_path, config, "cut", *extra)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed after epoch {stopped}" in again.stderr and f"epoch {stopped + 1}/" not in again.stderr
    a, b = metrics_of(tmp_path, "whole"), metrics_of(tmp_path, "cut")
    for key in ("status", "best_epoch", "val_mse", "val_mae", "test_mse", "test_mae", "epochs_run"):
        assert a[key] == b[key], key
    whole_fc, cut_fc = np.load(tmp_path / "runs" / "whole" / "forecasts.npz"), np.load(run_dir / "forecasts.npz")
    assert all(np.array_equal(whole_fc[k], cut_fc[k]) for k in whole_fc.files)
    assert not (run_dir / "resume_state.pt").exists()
