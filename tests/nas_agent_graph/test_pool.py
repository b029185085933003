"""--parallel N: the run pool (slots, GPU round-robin, CPU thread split, shutdown) and the search with
several runs in flight, run as a user runs it, including a SIGKILL while two runs are in flight."""
import datetime as dt
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nas_agent.agent_state import load_agent_state
from nas_agent.logging_utils import load_metrics
from nas_agent_graph.launcher import LaunchCancelled, is_finished
from nas_agent_graph.pool import RunPool, RunSpec, slot_env, visible_gpus
from tests.conftest import PYTHON, TINY_CONFIG, run_env
from nas_agent_graph.testing import TINY_SPACE
from tests.nas_agent_graph.test_cli import cli, wait_for
from tests.nas_agent_graph.test_launcher import HEADER, alive

# Wider than test_cli's space (4 configs), so 5-6 parallel proposals never run dry.
SPACE = {**TINY_SPACE, "training.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}

SLEEPER = HEADER + '''
write_json("history.json", [{"epoch": 1, "val_mse": 0.5}])
with open(run_dir / "env.json", "w") as f:
    json.dump({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}, f)
time.sleep(float(os.environ.get("SLEEP_S", "1.5")))
write_json("metrics.json", {"status": "ok", "val_mse": 0.4})
'''


# --------------------------------------------------------------------------- slots


def test_gpus_round_robin_and_cpu_threads_split():
    assert slot_env(0, 2, {}, ["0", "1"], cores=8) == {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4",
                                                     "MKL_NUM_THREADS": "4"}
    assert slot_env(3, 4, {}, ["0", "1"], cores=8)["CUDA_VISIBLE_DEVICES"] == "1"
    assert slot_env(2, 4, {}, ["5", "7", "9"], cores=8)["CUDA_VISIBLE_DEVICES"] == "9"
    # on 2 cores, 3 runs still get one thread each; a value the user set is kept; one run: nothing changes
    assert slot_env(1, 3, {}, [], cores=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert "OMP_NUM_THREADS" not in slot_env(1, 2, {"OMP_NUM_THREADS": "3"}, [], cores=2)
    assert slot_env(0, 1, {}, [], cores=2) == {}
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def _pool(tmp_path, parallel, **kw):
    script = tmp_path / "fake_train.py"
    script.write_text(SLEEPER)
    env = run_env(**kw)
    env.pop("OMP_NUM_THREADS", None)
    return RunPool(parallel, env={**env, "CUDA_VISIBLE_DEVICES": "0,1"},
                   launch_kwargs=dict(train_script=script, runs_dir=tmp_path / "runs", poll_s=0.05))


def _spec(tmp_path, run_id):
    return RunSpec(run_id=run_id, run_dir=tmp_path / "runs" / run_id, config_text="x = 1\n")


def test_pool_runs_at_once_on_separate_slots_and_collects_every_run(tmp_path):
    pool = _pool(tmp_path, 2, SLEEP_S="5")
    start = time.monotonic()
    for run_id in ("run_0000", "run_0001"):
        pool.submit(_spec(tmp_path, run_id))
    pool.submit(_spec(tmp_path, "run_0000"))  # already in flight: ignored, not started twice
    got = [pool.wait_any(), pool.wait_any()]
    assert time.monotonic() - start < 9.5, "two 5 s runs took as long as running them one after the other"
    assert sorted(r for r, _ in got) == ["run_0000", "run_0001"] and pool.running() == []
    assert all(result.status == "ok" for _, result in got)
    envs = [json.loads((tmp_path / "runs" / r / "env.json").read_text()) for r in ("run_0000", "run_0001")]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0", "1"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {str(max(1, pool.cores // 2))}
    pool.shutdown()


def test_pool_shutdown_stops_runs_in_flight_so_a_resume_reruns_them(tmp_path):
    pool = _pool(tmp_path, 1, SLEEP_S="600")  # 1 slot, 2 threads: run_0002 is queued behind them
    try:
        for run_id in ("run_0000", "run_0001", "run_0002"):
            pool.submit(_spec(tmp_path, run_id))
        launches = [tmp_path / "runs" / r / "launch.json" for r in ("run_0000", "run_0001")]
        wait_for(lambda: all(p.exists() for p in launches), timeout=60)
        pids = [json.loads(p.read_text())["pid"] for p in launches]
        assert pool.wait_any(timeout_s=0.5) is None  # nothing finished yet
    finally:
        stopped = time.monotonic()
        pool.shutdown(grace_s=30)
    assert time.monotonic() - stopped < 30
    assert not any(alive(pid) for pid in pids)
    assert not any(is_finished(p.parent) for p in launches)
    assert not (tmp_path / "runs" / "run_0002").exists(), "a queued run was started only to be stopped"


def test_a_launch_that_is_cancelled_reraises_in_wait_any(tmp_path):
    pool = _pool(tmp_path, 1, SLEEP_S="600")
    try:
        pool.submit(_spec(tmp_path, "run_0000"))
        wait_for((tmp_path / "runs" / "run_0000" / "launch.json").exists, timeout=60)
        threading.Timer(0.5, pool._flights["run_0000"].stop.set).start()
        with pytest.raises(LaunchCancelled):
            pool.wait_any()
        assert pool.running() == []
    finally:
        pool.shutdown(grace_s=30)


# --------------------------------------------------------------------------- the search


@pytest.fixture
def study(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "space.json").write_text(json.dumps(SPACE))
    return tmp_path


def search_args(max_runs, *extra, steps=5):
    return ["--max-runs", str(max_runs), "--proposer", "tpe", "--space", "space.json", "--parallel", "2",
            "--warm-start", "off", "--set", "training.max_epochs=1", "--set", f"training.max_steps_per_epoch={steps}", *extra]


def run_interval(run_dir: Path) -> tuple[float, float]:
    """When a run started (launch.json) and ended (metrics.json written), as timestamps."""
    started = json.loads((run_dir / "launch.json").read_text())["started_at"]
    return dt.datetime.fromisoformat(started).timestamp(), (run_dir / "metrics.json").stat().st_mtime


def assert_all_recorded(study: Path, n_runs: int):
    """Every run id 0..n-1 recorded once with a finished folder that matches it; none beyond."""
    state = load_agent_state(study / "agent_state.json")
    ids = [r.run_id for r in state.runs]
    assert sorted(ids) == [f"run_{i:04d}" for i in range(n_runs)], ids
    for r in state.runs:
        metrics = load_metrics(study / "runs" / r.run_id)
        assert metrics["status"] == r.status != "interrupted"
        assert metrics["val_mse"] == pytest.approx(r.val_mse)
    assert not (study / "runs" / f"run_{n_runs:04d}").exists()
    hashes = [r.extra["config_hash"] for r in state.runs]
    assert len(set(hashes)) == len(hashes), "two runs trained the same config"
    return state


@pytest.mark.slow  # a 5-run parallel CLI study (~40 s); the default suite must stay under 15 min
def test_parallel_search_runs_two_at_once_with_no_lost_or_duplicated_run(study):
    proc = cli(study, *search_args(5, steps=30))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = assert_all_recorded(study, 5)
    assert all(r.status == "ok" for r in state.runs)
    intervals = sorted(run_interval(study / "runs" / r.run_id) for r in state.runs)
    overlaps = sum(1 for a, b in zip(intervals, intervals[1:]) if b[0] < a[1])
    assert overlaps >= 1, f"no two runs were in flight together: {intervals}"
    assert "up to 2 runs at once" in proc.stderr
    # a TPE proposal made while another run trained saw that run as a RUNNING trial (constant liar)
    assert any(r.extra["proposal"]["optuna"]["n_running"] >= 1 for r in state.runs if r.proposer == "tpe")


@pytest.mark.slow  # about a minute of real training (CI's second pass runs it)
@pytest.mark.timeout(900)
def test_sigkill_with_two_runs_in_flight_then_resume_loses_and_repeats_nothing(study):
    """Kill the orchestrator while two train.py runs are going; the resume reruns both, once."""
    env = run_env()
    args = [PYTHON, "-m", "nas_agent_graph", *search_args(4, steps=400)]
    proc = subprocess.Popen(args, cwd=study, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def two_in_flight():
        folders = [p for p in (study / "runs").glob("run_*") if (p / "launch.json").exists()
                   and not (p / "metrics.json").exists()]
        return len(folders) == 2 and all(alive(json.loads((p / "launch.json").read_text())["pid"])
                                         for p in folders) and folders

    try:
        wait_for(two_in_flight, timeout=300)
        folders = two_in_flight()
        pids = [json.loads((p / "launch.json").read_text())["pid"] for p in folders]
        time.sleep(1.0)  # into their first epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60)  # the kernel took the orphans down
    before = load_agent_state(study / "agent_state.json")
    assert not {p.name for p in folders} & {r.run_id for r in before.runs}
    done = cli(study, *search_args(4, steps=400), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming 2 run(s) in flight" in done.stderr
    assert_all_recorded(study, 4)
    for folder in folders:  # each killed run ran again once; its partial files are kept aside
        assert (folder / "attempt_1" / "train.log").exists() and not (folder / "attempt_2").exists()


@pytest.mark.slow  # starts a Ray cluster in the CLI's process (CI's second pass runs it)
@pytest.mark.timeout(600)
def test_a_two_run_study_on_a_local_ray_cluster(study):
    """--launcher ray: the CLI starts a local cluster, each run is a Ray task; nothing is left behind."""
    pytest.importorskip("ray", reason="Ray is not installed (optional): pip install -r requirements-ray.txt")
    from tests.nas_agent_graph.test_ray_launcher import ray_leftovers_removed

    args = [PYTHON, "-m", "nas_agent_graph", *search_args(2, "--launcher", "ray")]
    pids: list[int] = []
    with ray_leftovers_removed(pids):  # the CLI's pid names its local cluster's session folder
        proc = subprocess.Popen(args, cwd=study, env=run_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        pids.append(proc.pid)
        try:
            _, err = proc.communicate(timeout=500)
        finally:
            if proc.poll() is None:  # timed out: SIGTERM lets the CLI stop its runs and its cluster
                proc.terminate()
                proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "Ray cluster (local)" in err and "each run asks for {'num_cpus': 1, 'num_gpus': 0}" in err
    state = assert_all_recorded(study, 2)
    assert all(r.status == "ok" for r in state.runs)
    assert not list((study / "runs").glob(".ray_shared_*"))  # the shared-filesystem markers are cleaned up


def test_runs_in_flight_that_do_not_follow_the_study_are_dropped(tmp_path):
    from nas_agent.agent_state import AgentState, RunInfo
    from nas_agent_graph.context import Context
    from nas_agent_graph.study.rules import consistent_flights

    ctx = Context(state_path=tmp_path / "agent_state.json")
    study = AgentState(runs=[RunInfo(run_id=f"run_{i:04d}", status="ok") for i in range(2)])
    entry = lambda i: {"run_id": f"run_{i:04d}", "proposal": {}}  # noqa: E731
    assert consistent_flights(study, [entry(2), entry(3)], ctx) == [entry(2), entry(3)]
    assert consistent_flights(study, [entry(1), entry(2)], ctx) == [entry(2)]  # run_0001 was recorded already
    # agent_state.json restored from a backup: run_0003/4 would clash with the next ids
    assert consistent_flights(study, [entry(3), entry(4)], ctx) == []
    assert consistent_flights(study, [entry(2), entry(2)], ctx) == []
