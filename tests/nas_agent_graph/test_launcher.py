"""launch_run: idempotence, attempts moved aside, orphans, timeouts that leave no survivor, streaming.

Stand-in scripts (parsing train.py's flags and writing its files) keep these tests fast;
one test runs the real train.py with the tiny config.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nas_agent.logging_utils import load_metrics
from nas_agent_graph.launcher import LaunchCancelled, LaunchResult, is_finished, launch_run
from nas_agent_graph.process import kill_process_group
from tests.conftest import ROOT, TINY_CONFIG, run_env

CONFIG_TEXT = "training = {'max_epochs': 1}\n"

HEADER = '''\
import argparse, json, os, signal, subprocess, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--tag", required=True)
parser.add_argument("--runs-dir", required=True)
parser.add_argument("--set", action="append", default=[])
args = parser.parse_args()
run_dir = Path(args.runs_dir) / args.tag


def write_json(name, obj):
    tmp = run_dir / ("." + name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, run_dir / name)

'''

OK_BODY = '''
with open(Path(args.runs_dir) / "launches.txt", "a") as f:
    f.write(args.tag + "\\n")
write_json("history.json", [{"epoch": 1, "val_mse": 0.5}])
time.sleep(0.2)
write_json("history.json", [{"epoch": 1, "val_mse": 0.5}, {"epoch": 2, "val_mse": 0.4}])
write_json("metrics.json", {"status": "ok", "val_mse": 0.4, "config_seen": Path(args.config).read_text()})
'''


def stand_in(tmp_path: Path, body: str, name: str = "fake_train") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def launch(tmp_path: Path, script: Path, run_id: str = "run_0000", **kwargs) -> LaunchResult:
    runs = tmp_path / "runs"
    kwargs.setdefault("poll_s", 0.05)
    kwargs.setdefault("env", run_env())
    return launch_run(runs / run_id, CONFIG_TEXT, run_id=run_id, runs_dir=runs, train_script=script, **kwargs)


def alive(pid: int) -> bool:
    """Running, not a zombie (an exited orphan may stay unreaped where PID 1 does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in "ZX"


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def launches(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs" / "launches.txt"
    return path.read_text().split() if path.exists() else []


# --------------------------------------------------------------------------- success, reuse, progress

def test_ok_run_then_reused_without_relaunch(tmp_path):
    script = stand_in(tmp_path, OK_BODY)
    seen = []
    first = launch(tmp_path, script, on_progress=seen.append)
    run_dir = tmp_path / "runs" / "run_0000"
    assert (first.status, first.returncode, first.reused, first.attempt, first.error_tail) == ("ok", 0, False, 0, None)
    assert first.metrics["config_seen"] == CONFIG_TEXT == (run_dir / "config.py").read_text()
    assert [h["epoch"] for h in first.history] == [1, 2] and first.duration_s > 0
    assert seen and seen[-1] == first.history
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["pgid"] == record["pid"] and str(run_dir / "config.py") in record["cmd"]
    assert is_finished(run_dir)

    second = launch(tmp_path, script)
    assert second.reused and second.returncode is None and second.duration_s == 0
    assert second.status == "ok" and second.metrics == first.metrics and second.history == first.history
    assert launches(tmp_path) == ["run_0000"], "a finished run must not be launched again"


def test_failing_progress_callback_does_not_stop_the_run(tmp_path, caplog):
    def broken(history):
        raise ValueError("display bug")

    result = launch(tmp_path, stand_in(tmp_path, OK_BODY), on_progress=broken)
    assert result.status == "ok"
    assert "on_progress callback failed" in caplog.text


def test_output_streams_into_train_log_while_running(tmp_path):
    script = stand_in(tmp_path, '''
        print("hello from the stand-in")  # not flushed: the launcher sets PYTHONUNBUFFERED
        print("a line on stderr", file=sys.stderr)
        write_json("history.json", [{"epoch": 1}])
        deadline = time.time() + 20
        while not (run_dir / "release").exists() and time.time() < deadline:
            time.sleep(0.02)
        write_json("metrics.json", {"status": "ok"})
    ''')
    run_dir = tmp_path / "runs" / "run_0000"
    snapshots = []

    def peek(history):
        snapshots.append(((run_dir / "train.log").read_text(), is_finished(run_dir)))
        (run_dir / "release").touch()

    env = {k: v for k, v in run_env().items() if k != "PYTHONUNBUFFERED"}
    assert launch(tmp_path, script, env=env, on_progress=peek).status == "ok"
    log_text, finished = snapshots[0]
    assert not finished, "the callback must have run while the child was still running"
    assert "hello from the stand-in" in log_text and "a line on stderr" in log_text


# --------------------------------------------------------------------------- failures

def test_crash_synthesises_final_failed_metrics(tmp_path):
    script = stand_in(tmp_path, '''
        print("about to fail")
        raise RuntimeError("boom from the stand-in")
    ''')
    result = launch(tmp_path, script)
    run_dir = tmp_path / "runs" / "run_0000"
    assert (result.status, result.returncode) == ("failed", 1)
    on_disk = load_metrics(run_dir)
    assert on_disk == result.metrics
    assert "train.py exited with code 1 without writing metrics.json" in on_disk["error"]
    assert "RuntimeError: boom from the stand-in" in on_disk["error"]
    assert on_disk["val_mse"] is None and on_disk["test_mse"] is None
    assert "Traceback (most recent call last)" in result.error_tail
    assert "RuntimeError: boom from the stand-in" in result.error_tail
    assert launch(tmp_path, script).reused, "a failed run is final: resuming must not relaunch it"


def test_timeout_kills_child_and_grandchild_that_ignore_sigterm(tmp_path):
    script = stand_in(tmp_path, '''
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready = run_dir / "grandchild_ready"
        code = ("import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)")
        grandchild = subprocess.Popen([sys.executable, "-c", code, str(ready)])
        deadline = time.time() + 20
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        write_json("pids.json", {"child": os.getpid(), "grandchild": grandchild.pid})
        time.sleep(600)
    ''')
    run_dir = tmp_path / "runs" / "run_0000"
    start = time.monotonic()
    result = launch(tmp_path, script, timeout_s=3, term_grace_s=1)
    elapsed = time.monotonic() - start
    pids = json.loads((run_dir / "pids.json").read_text())
    try:
        assert (result.status, result.returncode) == ("timeout", -signal.SIGKILL)
        assert 3 <= elapsed < 3 + 1 + 3
        assert not alive(pids["child"]) and not alive(pids["grandchild"]), "nothing may survive a timeout"
        assert "killed after --run-timeout 3s" in load_metrics(run_dir)["error"]
        assert result.error_tail is not None
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_timeout_relabels_interrupted_metrics_written_on_sigterm(tmp_path):
    script = stand_in(tmp_path, '''
        def on_term(signum, frame):
            write_json("metrics.json", {"status": "interrupted", "val_mse": 0.7, "error": "received SIGTERM"})
            sys.exit(130)

        signal.signal(signal.SIGTERM, on_term)
        write_json("history.json", [{"epoch": 1, "val_mse": 0.7}])
        time.sleep(600)
    ''')
    result = launch(tmp_path, script, timeout_s=2.5, term_grace_s=5)
    assert (result.status, result.returncode) == ("timeout", 130)
    assert result.metrics["val_mse"] == 0.7, "the numbers train.py wrote are kept"
    assert "--run-timeout 2.5s" in result.metrics["error"] and "received SIGTERM" in result.metrics["error"]
    assert load_metrics(tmp_path / "runs" / "run_0000")["status"] == "timeout"


def test_keyboard_interrupt_while_waiting_kills_the_child_and_reraises(tmp_path):
    script = stand_in(tmp_path, '''
        write_json("history.json", [{"epoch": 1}])
        time.sleep(600)
    ''')

    def interrupt(history):
        raise KeyboardInterrupt

    run_dir = tmp_path / "runs" / "run_0000"
    with pytest.raises(KeyboardInterrupt):
        launch(tmp_path, script, on_progress=interrupt, term_grace_s=2)
    pid = json.loads((run_dir / "launch.json").read_text())["pid"]
    assert not alive(pid)
    assert not is_finished(run_dir), "an orchestrator interruption is not an outcome of the run"


def test_stop_event_from_another_thread_stops_the_child_and_raises_cancelled(tmp_path):
    import threading
    script = stand_in(tmp_path, '''
        write_json("history.json", [{"epoch": 1}])
        time.sleep(600)
    ''')
    stop = threading.Event()
    run_dir = tmp_path / "runs" / "run_0000"
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    start = time.monotonic()
    with pytest.raises(LaunchCancelled, match="shutting down"):
        launch(tmp_path, script, term_grace_s=2, stop_event=stop)
    assert time.monotonic() - start < 60
    pid = json.loads((run_dir / "launch.json").read_text())["pid"]
    assert not alive(pid)
    assert not is_finished(run_dir), "a cancelled run is rerun on resume, not reused"


def test_grandchild_left_behind_by_a_finished_child_is_killed(tmp_path):
    script = stand_in(tmp_path, '''
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        write_json("pids.json", {"grandchild": grandchild.pid})
        write_json("metrics.json", {"status": "ok"})
    ''')
    result = launch(tmp_path, script)
    pid = json.loads((tmp_path / "runs" / "run_0000" / "pids.json").read_text())["grandchild"]
    try:
        assert result.status == "ok"
        assert _wait(lambda: not alive(pid), 5), "the child's process group must be swept after it exits"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


ORCHESTRATOR = '''
import sys
from pathlib import Path
from nas_agent_graph.launcher import launch_run
runs = Path(sys.argv[1])
launch_run(runs / "run_0000", "", run_id="run_0000", runs_dir=runs, train_script=Path(sys.argv[2]))
'''


def test_child_gets_sigterm_when_the_orchestrator_is_sigkilled(tmp_path):
    script = stand_in(tmp_path, '''
        write_json("pids.json", {"child": os.getpid()})
        time.sleep(600)
    ''')
    runs = tmp_path / "runs"
    orchestrator = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, str(runs), str(script)], cwd=ROOT,
                                    env=run_env())
    pids_file = runs / "run_0000" / "pids.json"
    try:
        assert _wait(pids_file.exists, 30), "the stand-in did not start"
        child = json.loads(pids_file.read_text())["child"]
        orchestrator.kill()
        orchestrator.wait()
        assert _wait(lambda: not alive(child), 5), "PR_SET_PDEATHSIG must stop the child of a dead orchestrator"
    finally:
        orchestrator.kill()
        orchestrator.wait()
        if pids_file.exists() and alive(child := json.loads(pids_file.read_text())["child"]):
            os.kill(child, signal.SIGKILL)


# --------------------------------------------------------------------------- earlier attempts

def test_interrupted_attempts_are_moved_aside_and_relaunched(tmp_path):
    script = stand_in(tmp_path, OK_BODY)
    run_dir = tmp_path / "runs" / "run_0000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.py").write_text("old config\n")
    (run_dir / "history.json").write_text('[{"epoch": 1}]')
    (run_dir / "train.log").write_text("old log\n")
    (run_dir / ".lock").write_text('{"pid": 1}')  # a SIGKILLed train.py's lock file stays where it locks

    first = launch(tmp_path, script)
    assert (first.status, first.attempt, first.reused) == ("ok", 1, False)
    assert sorted(p.name for p in (run_dir / "attempt_1").iterdir()) == ["config.py", "history.json", "train.log"]
    assert (run_dir / ".lock").is_file()
    assert (run_dir / "attempt_1" / "config.py").read_text() == "old config\n"
    assert (run_dir / "config.py").read_text() == CONFIG_TEXT and is_finished(run_dir)

    (run_dir / "metrics.json").unlink()  # interrupted again, just before metrics.json
    second = launch(tmp_path, script)
    assert (second.status, second.attempt) == ("ok", 2)
    moved = {p.name for p in (run_dir / "attempt_2").iterdir()}
    assert {"config.py", "history.json", "train.log", "launch.json"} <= moved
    assert (run_dir / "attempt_1" / "train.log").read_text() == "old log\n"
    assert launches(tmp_path) == ["run_0000", "run_0000"]
    assert launch(tmp_path, script).attempt == 2


def test_interrupted_metrics_are_not_final_and_the_run_is_relaunched(tmp_path):
    """train.py writes status "interrupted" when the orchestrator stops it; a resume runs it again."""
    script = stand_in(tmp_path, OK_BODY)
    run_dir = tmp_path / "runs" / "run_0000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.py").write_text(CONFIG_TEXT)
    (run_dir / "metrics.json").write_text('{"status": "interrupted", "val_mse": 0.9}')
    assert not is_finished(run_dir)
    result = launch(tmp_path, script)
    assert (result.status, result.reused, result.attempt) == ("ok", False, 1)
    assert json.loads((run_dir / "attempt_1" / "metrics.json").read_text())["status"] == "interrupted"
    assert launches(tmp_path) == ["run_0000"]


ORPHAN = '''
import pathlib, signal, sys, time
run_dir = pathlib.Path(sys.argv[1]).parent
def stop(signum, frame):
    (run_dir / "metrics.json").write_text('{"status": "interrupted"}')
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(run_dir / "orphan_ready").touch()
time.sleep(600)
'''


def test_orphaned_child_is_stopped_before_relaunch_but_unrelated_pids_are_not(tmp_path):
    script = stand_in(tmp_path, OK_BODY)
    runs = tmp_path / "runs"
    orphan_dir, other_dir = runs / "run_0001", runs / "run_0002"
    for d in (orphan_dir, other_dir):
        d.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, str(orphan_dir / "config.py")], start_new_session=True)
    # A live process whose arguments only share a prefix with run_0002 (run_00020) is not its child.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(runs / "run_00020")],
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (orphan_dir / "orphan_ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for d, proc in ((orphan_dir, orphan), (other_dir, bystander)):
            (d / "launch.json").write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid}))

        result = launch(tmp_path, script, run_id="run_0001", term_grace_s=5)
        assert orphan.wait(timeout=5) == 0, "the orphan must have been sent SIGTERM"
        assert result.status == "ok" and result.attempt == 1
        # What the orphan wrote on SIGTERM was moved aside, so it was stopped before the relaunch.
        assert json.loads((orphan_dir / "attempt_1" / "metrics.json").read_text()) == {"status": "interrupted"}

        assert launch(tmp_path, script, run_id="run_0002").status == "ok"
        assert bystander.poll() is None, "a pid whose cmdline does not name the run folder must be left alone"
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- arguments

def test_run_dir_must_be_runs_dir_slash_run_id(tmp_path):
    with pytest.raises(ValueError, match="runs_dir/run_id"):
        launch_run(tmp_path / "elsewhere", CONFIG_TEXT, run_id="run_0000", runs_dir=tmp_path / "runs",
                   train_script=stand_in(tmp_path, OK_BODY))


def test_kill_process_group_refuses_our_own_group():
    with pytest.raises(ValueError, match="own group"):
        kill_process_group(os.getpgrp(), 0.1)


# --------------------------------------------------------------------------- the real train.py

def test_real_train_py_tiny_run(tmp_path):
    seen = []
    runs = tmp_path / "runs"
    result = launch_run(runs / "run_0000", TINY_CONFIG, run_id="run_0000", runs_dir=runs,
                        extra_args=["--set", "training.max_epochs=1"], env=run_env(), timeout_s=300,
                        on_progress=seen.append, poll_s=0.2)
    log_text = (runs / "run_0000" / "train.log").read_text()
    assert result.status == "ok" and result.returncode == 0, log_text[-3000:]
    assert isinstance(result.metrics["val_mse"], float) and result.metrics["tag"] == "run_0000"
    assert [h["epoch"] for h in result.history] == [1]
    assert seen and seen[-1] == result.history
    assert "status:         ok" in log_text, "train.py's stdout summary is streamed into train.log"
    assert log_text.count("epoch 1/1 train_mse") == 1, "train.py must not also write train.log itself"


def test_cancel_cleanup_stops_the_group_of_a_zombie_train_py(tmp_path):
    """What a Ray worker killed mid-run leaves: train.py exited but unreaped (a zombie, as under a
    PID 1 that does not reap), the process it started still running in its group. The orphan
    check for an earlier orchestrator leaves a dead leader alone; the cancel cleanup stops the group."""
    from nas_agent_graph.launcher import LAUNCH_FILE, stop_attempt_group, stop_orphan

    run_dir = tmp_path / "runs" / "run_0000"
    run_dir.mkdir(parents=True)
    leader = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
    """), str(run_dir)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(leader.stdout.readline())
    (run_dir / LAUNCH_FILE).write_text(json.dumps({"pid": leader.pid, "pgid": leader.pid}))
    assert _wait(lambda: not alive(leader.pid), 10) and alive(grandchild)  # exited, not reaped: a zombie
    try:
        stop_orphan(run_dir, 2.0)
        assert alive(grandchild)
        assert stop_attempt_group(run_dir, 2.0)
        assert _wait(lambda: not alive(grandchild), 5)
        assert not stop_attempt_group(run_dir, 2.0)  # nothing left: nothing to do
    finally:
        leader.stdout.close()
        leader.wait()
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
