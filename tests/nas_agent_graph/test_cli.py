"""The orchestrator as a user runs it: `python -m nas_agent_graph` in a subprocess, real train.py runs.

Tiny models (a narrowed search space) and one-epoch runs keep each run to a few seconds.
"""
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from nas_agent.agent_state import load_agent_state
from nas_agent.config import load_config
from nas_agent.schema import model_family
from nas_agent_graph.cli import DEFAULT_RUN_BUDGET_S
from nas_agent_graph.process import pid_alive
from nas_agent_graph.testing import TINY_SPACE
from tests.conftest import PYTHON, ROOT, TINY_CONFIG, run_env

QUICK = ["--set", "training.max_epochs=1", "--set", "training.max_steps_per_epoch=5"]
# No warm start: the shipped archetypes are full-size models (test_warm_start has tiny ones).
NO_WARM_START = ["--warm-start", "off"]


@pytest.fixture
def study(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    return tmp_path


def cli(study: Path, *args, timeout=600, **kw):
    env = run_env()
    return subprocess.run([PYTHON, "-m", "nas_agent_graph", *args], cwd=study, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def search_args(max_runs, proposer="tpe", *extra):
    return ["--max-runs", str(max_runs), "--proposer", proposer, "--space", "space.json", *QUICK, *NO_WARM_START,
            *extra]


def incumbent_budget(study: Path):
    return load_config(study / "config.py").training.time_budget_s


def assert_consistent(study: Path, n_runs: int):
    """No lost or duplicated runs; every recorded run has a finished folder that matches it."""
    state = load_agent_state(study / "agent_state.json")
    ids = [r.run_id for r in state.runs]
    assert ids == [f"run_{i:04d}" for i in range(n_runs)], ids
    for r in state.runs:
        metrics = json.loads((study / "runs" / r.run_id / "metrics.json").read_text())
        assert metrics["status"] == r.status
        assert metrics["status"] != "interrupted"
        assert metrics["val_mse"] == pytest.approx(r.val_mse) if r.val_mse is not None else True
    assert not (study / "runs" / f"run_{n_runs:04d}").exists()
    return state


# ~50 s each here: the default suite's CLI search is test_search_from_a_config_in_the_original_format,
# and test_graph.py's searches run the loop.
@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["random", "tpe", "cmaes"])
def test_search_loop_for_each_proposer(study, proposer):
    proc = cli(study, *search_args(3, proposer))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = assert_consistent(study, 3)
    assert state.runs[0].proposer == "baseline"
    assert {r.proposer for r in state.runs[1:]} == {proposer}
    assert all(r.status == "ok" for r in state.runs)
    assert state.best_run_id is not None and state.runs[0].accepted
    best = next(r for r in state.runs if r.run_id == state.best_run_id)
    # config.py is the incumbent without the session's --set; the original is kept when replaced.
    # Every run also got the default --run-budget, which stays out of config.py as well.
    quick = [QUICK[i + 1] for i in range(0, len(QUICK), 2)] + [f"training.time_budget_s={DEFAULT_RUN_BUDGET_S}"]
    assert incumbent_budget(study) is None
    no_channels = {"model": {"enc_in", "dec_in", "c_out"}}
    incumbent = load_config(study / "config.py")
    assert incumbent.training.max_steps_per_epoch == 25  # the base's value: the --set budget (5) stayed out
    assert load_config(study / "config.py", quick).model_dump(exclude=no_channels) == \
        load_config(study / "runs" / best.run_id / "config.py").model_dump(exclude=no_channels)
    if best.run_id != "run_0000":  # the first replacement kept the user's file (later ones keep incumbents)
        kept = sorted((study / "runs" / "incumbents").glob("config_before_run_*.py"))
        assert kept[-1].name == f"config_before_{best.run_id}.py" and kept[0].read_text() == TINY_CONFIG
    else:
        assert (study / "config.py").read_text() == TINY_CONFIG  # the baseline won: nothing rewritten
    assert "Search stopped: reached --max-runs 3" in proc.stderr
    assert f"Best run: {best.run_id}" in proc.stderr and "python train.py --config" in proc.stderr
    samples = (study / "runs" / "lora" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 and all("reward" in json.loads(s) for s in samples)


@pytest.mark.slow
def test_same_seed_reproduces_proposals(study, tmp_path_factory):
    other = tmp_path_factory.mktemp("again")
    (other / "config.py").write_text(TINY_CONFIG)
    (other / "space.json").write_text(json.dumps(TINY_SPACE))
    for where in (study, other):
        assert cli(where, *search_args(3, "random", "--seed", "5")).returncode == 0
    a, b = (load_agent_state(w / "agent_state.json") for w in (study, other))
    assert [r.config for r in a.runs] == [r.config for r in b.runs]
    assert [r.val_mse for r in a.runs] == [r.val_mse for r in b.runs]


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_status_and_report(study):
    assert cli(study, *search_args(2)).returncode == 0
    status = cli(study, "status")
    assert status.returncode == 0 and "run_0000" in status.stdout and "run_0001" in status.stdout
    report = cli(study, "report")
    assert report.returncode == 0 and (study / "runs" / "report.html").is_file()


@pytest.mark.slow
def test_max_runs_counts_the_whole_study(study):
    assert cli(study, *search_args(2)).returncode == 0
    assert cli(study, *search_args(2)).returncode == 0  # nothing left to do
    assert_consistent(study, 2)
    assert cli(study, *search_args(3)).returncode == 0  # one more
    assert_consistent(study, 3)


def default_sigint():
    """preexec_fn: SIGINT back to its default, so that Python installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, timeout=180, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow  # two CLI sessions with real training (~50 s); the default suite must stay under 15 min
def test_resume_after_sigkill_during_training(study):
    env = run_env()
    args = [PYTHON, "-m", "nas_agent_graph", *search_args(3), "--set", "training.max_steps_per_epoch=200"]
    proc = subprocess.Popen(args, cwd=study, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    launch = study / "runs" / "run_0001" / "launch.json"
    wait_for(launch.exists)
    child = json.loads(launch.read_text())["pid"]
    time.sleep(1.0)  # let train.py get into its epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=60)  # the orphan is taken down
    state = load_agent_state(study / "agent_state.json")
    assert len(state.runs) == 1  # run_0001 was in flight: not counted
    done = cli(study, *search_args(3), "--set", "training.max_steps_per_epoch=200")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming 1 run(s) in flight: run_0001" in done.stderr
    assert_consistent(study, 3)
    assert (study / "runs" / "run_0001" / "attempt_1" / "train.log").exists()  # old partial files kept


@pytest.mark.slow  # a killed CLI session and its resume: ~55 s here
def test_resume_after_sigkill_during_proposing(study):
    env = run_env(NAS_AGENT_TEST_PAUSE="propose:run_0001:30")
    args = [PYTHON, "-m", "nas_agent_graph", *search_args(3)]
    proc = subprocess.Popen(args, cwd=study, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = study / "runs" / ".paused_in_propose"
    wait_for(marker.exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(load_agent_state(study / "agent_state.json").runs) == 1
    done = cli(study, *search_args(3))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the interrupted pass had not started a run yet; starting it again" in done.stderr
    assert_consistent(study, 3)


@pytest.mark.slow
def test_checkpoint_and_state_agree_after_crashes(study):
    """Kill the orchestrator at random moments; afterwards the checkpoint never contradicts the state."""
    import random
    from nas_agent_graph.cli import checkpoint_agrees, thread_id
    from langgraph.checkpoint.sqlite import SqliteSaver
    from nas_agent_graph.graph import build_graph

    rng = random.Random(3)
    env = run_env()
    args = [PYTHON, "-m", "nas_agent_graph", *search_args(4)]
    for _ in range(4):
        proc = subprocess.Popen(args, cwd=study, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(3, 12))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state_path = study / "agent_state.json"
        if not (study / "runs" / "checkpoints.sqlite").exists() or not state_path.exists():
            continue
        state = load_agent_state(state_path)
        with sqlite3.connect(study / "runs" / "checkpoints.sqlite") as conn:
            snap = build_graph(SqliteSaver(conn)).get_state({"configurable": {"thread_id": thread_id(state_path)}})
        # A checkpoint without a pass run id (e.g. at `wait`, runs in flight) is never resumed in place:
        # the next session starts a fresh pass from load_state, which keeps and checks the runs in flight.
        if snap.next and snap.values.get("run_id") is not None:
            assert checkpoint_agrees(snap.values, snap.next, state), (snap.next, snap.values.get("run_id"))
    done = cli(study, *search_args(4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_consistent(study, 4)


@pytest.mark.slow  # ~23 s here
def test_second_orchestrator_is_refused(study):
    env = run_env(NAS_AGENT_TEST_PAUSE="propose:run_0001:60")
    first = subprocess.Popen([PYTHON, "-m", "nas_agent_graph", *search_args(3)], cwd=study, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for((study / "runs" / ".paused_in_propose").exists)
        before = (study / "agent_state.json").read_bytes()
        second = cli(study, *search_args(3))
        assert second.returncode == 2
        assert f"PID {first.pid}" in second.stderr
        assert (study / "agent_state.json").read_bytes() == before
    finally:
        first.kill()
        first.wait()


def test_corrupt_state_gives_a_clear_error_and_is_not_overwritten(study):
    path = study / "agent_state.json"
    path.write_text('{"version": 1, "runs": [')
    proc = cli(study, *search_args(2))
    assert proc.returncode == 2
    assert "agent_state.json" in proc.stderr and "line 1" in proc.stderr
    assert path.read_text() == '{"version": 1, "runs": ['
    assert not (study / "runs" / "run_0000").exists()


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_corrupt_checkpoint_database_is_moved_aside_and_the_study_resumes(study):
    assert cli(study, *search_args(2)).returncode == 0
    db = study / "runs" / "checkpoints.sqlite"
    db.write_bytes(b"not a database " * 200)
    done = cli(study, *search_args(3))
    assert done.returncode == 0, done.stderr[-3000:]
    aside = list((study / "runs").glob("checkpoints.corrupt-*.sqlite"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"not a database")
    assert "is not a readable checkpoint database" in done.stderr and aside[0].name in done.stderr
    assert "Traceback" not in done.stderr
    assert_consistent(study, 3)
    assert sqlite3.connect(db).execute("PRAGMA quick_check").fetchone() == ("ok",)


@pytest.mark.slow  # two CLI sessions, 5 runs (~35 s); test_retention.py covers the rules in the default suite
def test_keep_checkpoints_holds_exactly_across_a_resume(study):
    def check(n_runs):
        state = assert_consistent(study, n_runs)
        scored = sorted((r for r in state.runs if r.status in ("ok", "timeout") and r.val_mse is not None),
                        key=lambda r: r.val_mse)
        family_best = {}  # each model family's best run keeps its checkpoint too (the ensemble's diverse members)
        for r in scored:
            family_best.setdefault(model_family(r.config.get("model") or {}), r.run_id)
        keep = {r.run_id for r in state.runs if r.accepted} | {r.run_id for r in scored[:1]} | set(family_best.values())
        have = {r.run_id for r in state.runs if (study / "runs" / r.run_id / "best_model.pth").exists()}
        assert have == keep
        for r in state.runs:
            assert ("deleted_at" in (r.extra["checkpoint"] or {})) == (r.run_id not in keep)
            assert (study / "runs" / r.run_id / "metrics.json").exists()
        return state

    args = search_args(3, "random", "--seed", "1", "--keep-checkpoints", "1")
    assert cli(study, *args).returncode == 0
    check(3)
    args[1] = "5"
    assert cli(study, *args).returncode == 0
    state = check(5)
    status = cli(study, "status").stdout
    deleted = [r.run_id for r in state.runs if "deleted_at" in (r.extra["checkpoint"] or {})]
    assert deleted and f"{5 - len(deleted)} kept, {len(deleted)} deleted" in status  # seed 1: some go
    assert all("deleted" in line for line in status.splitlines() if line.strip().startswith(tuple(deleted)))


@pytest.mark.slow  # ~26 s here
def test_a_set_that_breaks_the_config_fails_at_start_up(study):
    """Before any model loads or any proposal is made: exit 2, the schema's message, nothing written."""
    start = time.monotonic()
    bad = cli(study, "--max-runs", "3", "--proposer", "hybrid", "--set", "model.dmodel=32")
    assert bad.returncode == 2 and "model.dmodel" in bad.stderr and "did you mean 'd_model'" in bad.stderr
    assert "--set model.dmodel=32" in bad.stderr and "Traceback" not in bad.stderr and "LLM" not in bad.stderr
    assert time.monotonic() - start < 60 and not (study / "agent_state.json").exists()
    assert cli(study, *search_args(1)).returncode == 0  # a resumed study checks its base config too
    before = (study / "agent_state.json").read_bytes()
    again = cli(study, *search_args(2, "tpe", "--set", "training.lr=-1"))
    assert again.returncode == 2 and "training.lr" in again.stderr and "base config" in again.stderr
    assert (study / "agent_state.json").read_bytes() == before and not (study / "runs" / "run_0001").exists()


@pytest.mark.slow  # a search stopped by SIGINT mid-run (~30 s)
def test_status_shows_a_run_in_flight_and_then_interrupted(study):
    # Early stopping off (patience = max_epochs): the run cannot end before the SIGINT, however
    # slow the status call. SIGINT at its default in the child: pytest started in the background by
    # a shell without job control ignores SIGINT, its children inherit that, and the SIGINT would
    # do nothing (both made this test fail in background CI runs).
    args = [PYTHON, "-m", "nas_agent_graph", *search_args(2), "--set", "training.max_epochs=1000",
            "--set", "training.patience=1000"]
    proc = subprocess.Popen(args, cwd=study, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=default_sigint)
    try:
        wait_for((study / "runs" / "run_0000" / "history.json").exists)
        live = cli(study, "status").stdout
        assert "no runs yet" in live and "run_0000: in flight, " in live and "/1000 epochs done" in live, live
        assert "best val MSE" in live and "training now" in live
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    after = cli(study, "status").stdout
    assert "run_0000: interrupted, " in after and "a resume trains it again from scratch" in after, after


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_check_subcommand(study):
    ok = cli(study, "check", "config.py")
    assert ok.returncode == 0 and "OK: config.py would be accepted" in ok.stdout
    bad = study / "bad.py"
    bad.write_text(TINY_CONFIG + "\nmodel['x'] = 1\n")
    rejected = cli(study, "check", "bad.py")
    assert rejected.returncode == 1 and "REJECTED" in rejected.stdout and "bad.py:9" in rejected.stdout
    assert cli(study, *search_args(1)).returncode == 0
    # The search gave run_0000 the default --run-budget too: with it, the same settings.
    dup = cli(study, "check", "config.py", *QUICK, "--set", f"training.time_budget_s={DEFAULT_RUN_BUDGET_S}")
    assert dup.returncode == 1 and "duplicate: the same settings already ran as run_0000" in dup.stdout
    big = cli(study, "check", "config.py", "--max-params", "100", "--set", "training.seed=9")
    assert big.returncode == 1 and "too many parameters" in big.stdout


@pytest.mark.slow  # ~17 s here
def test_check_subcommand_reads_the_original_format(study):
    from tests.conftest import README_CONFIG
    (study / "old.py").write_text(README_CONFIG)
    ok = cli(study, "check", "old.py", "--set", "training.optimizer_params.lr=3e-4")
    assert ok.returncode == 0 and "OK: old.py would be accepted" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    (study / "mixed.py").write_text(README_CONFIG.replace('"max_epochs": 20,', '"max_epochs": 20, "lr": 1e-3,'))
    mixed = cli(study, "check", "mixed.py")
    assert mixed.returncode == 1
    assert "training.optimizer_params.lr and training.lr both set the learning rate; keep one" in mixed.stdout


def test_search_from_a_config_in_the_original_format(study):
    """The base config of a search in the README's format, and an override in its spelling for every run.
    (The model is shrunk by --set so the one run stays quick; the file itself is left as written.)"""
    from tests.conftest import README_CONFIG
    (study / "config.py").write_text(README_CONFIG)
    small = ["--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_ff=32",
             "--set", "model.e_layers=1", "--set", "data.seq_len=48", "--set", "data.label_len=24"]
    proc = cli(study, *search_args(1, "tpe", "--set", "training.optimizer_params.lr=3e-4", *small))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_agent_state(study / "agent_state.json")
    assert state.runs[0].status == "ok" and state.meta["base_config"]["training"]["scheduler_kwargs"] == {"T_max": 10}
    assert load_config(study / "runs" / "run_0000" / "config_used.py").training.lr == 3e-4
    assert (study / "config.py").read_text() == README_CONFIG  # the baseline is the incumbent: nothing to rewrite


@pytest.mark.slow  # ~22 s here; test_code_check.py covers the check in the default suite
def test_check_with_a_model_file(study):
    good = cli(study, "check", "config.py", "--model", str(ROOT / "model.py"))
    assert good.returncode == 0 and "OK:" in good.stdout
    wrong_shape = study / "wrong_shape.py"
    wrong_shape.write_text(
        "import torch\n"
        "class EncoderOnly(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(7, 7)\n"
        "    def forward(self, x_enc, mark_enc, x_dec, mark_dec):\n"
        "        return self.lin(x_enc)  # seq_len steps out instead of pred_len\n"
        "def build_model(config):\n"
        "    return EncoderOnly()\n")
    bad = cli(study, "check", "config.py", "--model", str(wrong_shape))
    assert bad.returncode == 1
    assert "smoke test failed: ValueError: model output: expected shape [32, 24, 7]" in bad.stdout
    assert "got [32, 48, 7]" in bad.stdout


def test_proposer_auto_run_budget_and_warm_start_flags(tmp_path):
    import torch

    from nas_agent.config import ConfigError as CE
    from nas_agent_graph.archetypes import DEFAULT_ARCHETYPES
    from nas_agent_graph.cli import context_from_args, search_parser

    def ctx(*args):
        return context_from_args(search_parser().parse_args(list(args)))
    default = ctx()
    assert default.proposer == ("hybrid" if torch.cuda.is_available() else "tpe")
    assert default.overrides == [f"training.time_budget_s={DEFAULT_RUN_BUDGET_S}"]
    assert default.warm_start == DEFAULT_ARCHETYPES and all(p.is_file() for p in DEFAULT_ARCHETYPES)
    assert ctx("--proposer", "hybrid").proposer == "hybrid"
    assert ctx("--set", "training.time_budget_s=30").overrides == ["training.time_budget_s=30"]
    assert ctx("--run-budget", "none").overrides == [] and ctx("--run-budget", "90").overrides[-1].endswith("=90")
    assert ctx("--warm-start", "off").warm_start == ()
    mine = tmp_path / "mine.py"
    mine.write_text(TINY_CONFIG)
    assert ctx("--warm-start", str(mine)).warm_start == (mine,)
    for args, message in [(("--run-budget", "-5"), "positive number of seconds"),
                          (("--run-budget", "soon"), "expected seconds"),
                          (("--warm-start", "nope.py"), "no such config file: nope.py"),
                          (("--warm-start", "off", str(mine)), "'off' cannot be combined")]:
        with pytest.raises(CE, match=message):
            ctx(*args)
    if not torch.cuda.is_available():
        with pytest.raises(CE, match=r"--allow-code needs an LLM proposer.*\(which is tpe here\)"):
            ctx("--allow-code")


def test_a_search_started_with_sigint_ignored_says_how_to_stop_it(caplog):
    from nas_agent_graph.cli import note_ignored_sigint
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with caplog.at_level("INFO", logger="nas_agent_graph.cli"):
            assert note_ignored_sigint()
    finally:
        signal.signal(signal.SIGINT, before)
    assert "SIGINT is ignored" in caplog.text and "(SIGTERM)" in caplog.text
    caplog.clear()
    assert not note_ignored_sigint() and caplog.text == ""


@pytest.mark.slow  # a search stopped by SIGTERM mid-run (~20 s)
def test_a_search_that_ignores_sigint_stops_on_sigterm(study):
    """What docs/search.md promises a search started in the background: SIGINT does nothing, and
    `kill PID` (SIGTERM) stops it; the kernel stops its train.py, and the run is one a resume reruns."""
    args = [PYTHON, "-m", "nas_agent_graph", *search_args(2), "--set", "training.max_epochs=1000",
            "--set", "training.patience=1000"]
    proc = subprocess.Popen(args, cwd=study, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for((study / "runs" / "run_0000" / "history.json").exists)
        child = json.loads((study / "runs" / "run_0000" / "launch.json").read_text())["pid"]
        proc.send_signal(signal.SIGINT)
        time.sleep(3)
        assert proc.poll() is None  # ignored, as the shell asked
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        stderr = proc.communicate()[1]
    assert "SIGINT is ignored in this process" in stderr and f"`kill {proc.pid}`" in stderr
    wait_for(lambda: not pid_alive(child), timeout=30)  # the kernel stopped its train.py (a zombie counts as gone)
    # ... once: the parent-death SIGTERM may come more than once (once per orchestrator thread), and
    # train.py takes the repeats as the same request, so it still writes what it has.
    metrics = json.loads((study / "runs" / "run_0000" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "received SIGTERM" in metrics["error"]
    after = cli(study, "status").stdout
    assert "run_0000: interrupted, " in after and "a resume trains it again from scratch" in after, after
