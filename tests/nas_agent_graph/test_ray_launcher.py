"""ray_launch_run on a real local Ray cluster (2 CPUs): parallel runs of the real train.py, the
no-shared-filesystem path, reuse, cancellation, crashes of train.py and of the Ray worker itself.

Stand-in scripts (parsing train.py's flags and writing its files) keep the cancellation and
crash tests fast; the parallel and no-shared-filesystem tests run the real train.py.
"""
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nas_agent.logging_utils import load_metrics
from nas_agent_graph import ray_launcher
from nas_agent_graph.launcher import LaunchCancelled, error_headline, is_finished
from nas_agent_graph.process import kill_process_group
from nas_agent_graph.limits import Caps, cpu_cap_s
from nas_agent_graph.ray_launcher import MARKER_PREFIX, NO_SHARED_FS_ENV, ray_launch_run
from tests.conftest import DATA_DIR, ROOT, TINY_CONFIG
from tests.nas_agent_graph.test_launcher import _wait as wait_for
from tests.nas_agent_graph.test_launcher import alive
from tests.nas_agent_graph.test_limits import LEAK

# Not the test process's whole environment: a task gets its node's environment plus these.
ENV = {"NAS_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1"}

HEADER = '''\
import argparse, json, os, signal, subprocess, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--tag", required=True)
parser.add_argument("--runs-dir", required=True)
args = parser.parse_args()
run_dir = Path(args.runs_dir) / args.tag


def write_json(name, obj):
    tmp = run_dir / ("." + name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, run_dir / name)

'''


def stand_in(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake_train.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def launch(tmp_path: Path, script: Path | None = None, run_id: str = "run_0000", **kwargs):
    runs = tmp_path / "runs"
    kwargs.setdefault("poll_s", 0.1)
    kwargs.setdefault("env_overrides", ENV)
    if script is not None:
        kwargs["train_script"] = script
    return ray_launch_run(runs / run_id, kwargs.pop("config_text", "training = {}\n"), run_id=run_id,
                          runs_dir=runs, **kwargs)


def no_markers_left(runs: Path) -> bool:
    return not list(runs.glob(MARKER_PREFIX + "*"))


# --------------------------------------------------------------------------- the cluster

def _ray_temp_root() -> Path:
    """Where Ray keeps its session folders (Ray's rule: $RAY_TMPDIR or the system temp dir, then ray/)."""
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"


def _listing(folder: Path) -> set[str] | None:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else None


def _remove_new_entries(folder: Path, before: set[str] | None, ours=lambda name: True) -> None:
    """Delete what appeared in `folder` since `before` and is `ours`; the folder too if it did not exist
    and is now empty. A dangling link left (session_latest) is removed too."""
    for name in (_listing(folder) or set()) - (before or set()):
        path = folder / name
        if not ours(name) or not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name == "session_latest" and path.is_symlink() and not path.exists():
            path.unlink()
    if before is None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


@contextlib.contextmanager
def ray_leftovers_removed(session_pids: list[int]):
    """Remove what Ray writes outside the test's folders and was not there before.

    Ray 2.60's local ray.init enables token authentication: it writes ~/.ray/auth_token (when
    missing) and sets RAY_AUTH_MODE=token in this process. Each cluster keeps its session (logs,
    sockets, a shipped project) in /tmp/ray/session_<date>_<pid of its starter>/, with a
    session_latest link; `ray start` adds /tmp/ray/ray_current_cluster. /tmp/ray is shared with
    any other Ray on the machine, so only the sessions of `session_pids` (filled in by the caller)
    are removed there.
    """
    ray_home, ray_tmp = Path.home() / ".ray", _ray_temp_root()
    home_before, tmp_before = _listing(ray_home), _listing(ray_tmp)
    auth_mode = os.environ.get("RAY_AUTH_MODE")

    def ours(name: str) -> bool:
        return name == "ray_current_cluster" or any(name.startswith("session_2") and name.endswith(f"_{pid}")
                                                    for pid in session_pids)
    try:
        yield
    finally:
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
        _remove_new_entries(ray_home, home_before)
        _remove_new_entries(ray_tmp, tmp_before, ours)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for this module, started by connect; shut down and cleaned up after."""
    pytest.importorskip("ray", reason="Ray is not installed (optional): pip install -r requirements-ray.txt")
    with ray_leftovers_removed([os.getpid()]):  # the driver's pid names a local cluster's session
        try:
            yield ray_launcher.connect(None, num_cpus=2)
        finally:
            ray_launcher.shutdown()


# --------------------------------------------------------------------------- joining a cluster
# First in the module, so it runs before the module's own cluster is started.

DRIVER = '''
import json, sys
from pathlib import Path
import ray
from nas_agent_graph import ray_launcher

resources = ray_launcher.connect(sys.argv[1])
runs = Path(sys.argv[2])
result = ray_launcher.ray_launch_run(runs / "run_0000", "training = {}\\n", run_id="run_0000", runs_dir=runs,
                                     train_script=Path(sys.argv[3]), poll_s=0.1)


@ray.remote
def code_root():
    from nas_agent_graph import ray_launcher
    return str(ray_launcher.PROJECT_ROOT)


print(json.dumps({"cpus": resources["CPU"], "status": result.status, "worker_code": ray.get(code_root.remote())}))
ray_launcher.shutdown()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_joining_a_cluster_ships_the_project_to_its_workers(tmp_path):
    """`ray start --head`, then an orchestrator that joins it: its workers import the project from
    the copy connect() ships, as they would on a node without it (their environment has no path to it)."""
    pytest.importorskip("ray", reason="Ray is not installed (optional): pip install -r requirements-ray.txt")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["NAS_DATA_DIR"] = str(DATA_DIR)
    script = stand_in(tmp_path, '''
        write_json("metrics.json", {"status": "ok", "val_mse": 0.5})
    ''')
    ray_bin = Path(sys.executable).with_name("ray")
    session_pids = []  # `ray start`'s pid names its session
    with ray_leftovers_removed(session_pids), open(tmp_path / "head.log", "wb") as head_log:
        head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--block"], cwd=tmp_path, env=env,
                                stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
        session_pids.append(head.pid)
        try:
            assert wait_for(lambda: b"Ray runtime started" in (tmp_path / "head.log").read_bytes(), 90), \
                (tmp_path / "head.log").read_text()[-3000:]
            out = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", str(tmp_path / "runs"),
                                  str(script)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
        finally:
            kill_process_group(head.pid, grace_s=15)  # `ray start --block` stops the cluster it started
            head.wait()
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["cpus"] == 1 and report["status"] == "ok"
    assert "working_dir_files" in report["worker_code"], f"workers ran the shipped copy, not {report['worker_code']}"
    assert not (Path(report["worker_code"]) / "runs").exists()


def test_connect_is_idempotent_and_checks_its_input(cluster):
    assert cluster["CPU"] == 2
    assert ray_launcher.connect(None, num_cpus=2) == cluster
    with pytest.raises(ValueError, match="not 'auto' or HOST:PORT"):
        ray_launcher.connect("headnode")
    with pytest.raises(ValueError, match="only applies to a local cluster"):
        ray_launcher.connect("auto", num_cpus=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        ray_launcher.connect(None, num_cpus=0)


def test_a_run_no_node_can_hold_is_refused(cluster, tmp_path):
    with pytest.raises(ValueError, match="no node of the Ray cluster has 1 CPU and 1 GPU"):
        launch(tmp_path, num_gpus=1)
    assert not (tmp_path / "runs").exists(), "nothing is written for a run that cannot be placed"


# --------------------------------------------------------------------------- the real train.py

@pytest.mark.timeout(300)
def test_two_runs_at_once_on_the_real_train_py(cluster, tmp_path):
    runs = tmp_path / "runs"
    seen = {"run_0000": [], "run_0001": []}
    first_progress, ended, results, errors = {}, {}, {}, []

    def run(run_id):
        def progress(history):
            first_progress.setdefault(run_id, time.monotonic())
            seen[run_id].append(history)
        try:
            results[run_id] = launch(tmp_path, run_id=run_id, config_text=TINY_CONFIG, timeout_s=240,
                                     on_progress=progress, poll_s=0.2)
        except BaseException as exc:  # reported below; a thread's exception would otherwise vanish
            errors.append(exc)
        ended[run_id] = time.monotonic()

    threads = [threading.Thread(target=run, args=(run_id,)) for run_id in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for run_id, result in results.items():
        run_dir = runs / run_id
        assert result.status == "ok", (run_dir / "train.log").read_text()[-3000:]
        assert not result.reused and result.attempt == 0 and result.returncode == 0
        assert load_metrics(run_dir)["tag"] == run_id and (run_dir / "history.json").is_file()
        assert [h["epoch"] for h in result.history] == [1, 2]
        assert seen[run_id] and seen[run_id][-1] == result.history, "progress comes from the shared run folder"
        cmd = json.loads((run_dir / "launch.json").read_text())["cmd"]
        assert str(run_dir / "config.py") in cmd, "on a shared filesystem train.py runs straight in run_dir"
    assert first_progress["run_0000"] < ended["run_0001"] and first_progress["run_0001"] < ended["run_0000"], \
        "both runs were training at the same time"
    assert no_markers_left(runs)


@pytest.mark.timeout(300)
def test_without_a_shared_filesystem_the_files_come_back(cluster, tmp_path, caplog):
    runs = tmp_path / "runs"
    run_dir = runs / "run_0000"
    run_dir.mkdir(parents=True)
    (run_dir / "history.json").write_text('[{"epoch": 1, "val_mse": 9.9}]')  # an interrupted earlier attempt
    seen = []
    model_code = (ROOT / "model.py").read_text()
    with caplog.at_level(logging.WARNING, logger="nas_agent_graph.ray_launcher"):
        result = launch(tmp_path, config_text=TINY_CONFIG, timeout_s=240, on_progress=seen.append,
                        env_overrides={**ENV, NO_SHARED_FS_ENV: "1"}, files={"model.py": model_code},
                        extra_args=["--model", str(run_dir / "model.py"), "--set", "training.max_epochs=1"])
    assert result.status == "ok", result.metrics.get("error")
    assert result.attempt == 1 and json.loads((run_dir / "attempt_1" / "history.json").read_text())[0]["val_mse"] == 9.9
    for name in ("metrics.json", "history.json", "train.log", "config.py", "config_used.py", "best_model.pth",
                 "model.py", "launch.json"):
        assert (run_dir / name).is_file(), f"{name} was not brought back"
    assert [h["epoch"] for h in result.history] == [1] and load_metrics(run_dir)["status"] == "ok"
    assert seen == [], "no progress without a shared filesystem"
    assert "without a shared filesystem" in caplog.text
    cmd = json.loads((run_dir / "launch.json").read_text())["cmd"]
    worker_run_dir = Path(cmd[cmd.index("--model") + 1]).parent
    assert worker_run_dir != run_dir, "the run folder path in --model follows the run to the worker's folder"
    assert not worker_run_dir.exists(), "the worker's temporary folder is removed"
    assert not list(run_dir.glob(".*.tmp")) and no_markers_left(runs)


# --------------------------------------------------------------------------- stand-ins

def test_finished_folder_is_reused_without_a_task(cluster, tmp_path):
    script = stand_in(tmp_path, '''
        with open(Path(args.runs_dir) / "launches.txt", "a") as f:
            f.write(args.tag + "\\n")
        write_json("history.json", [{"epoch": 1, "val_mse": 0.5}])
        write_json("metrics.json", {"status": "ok", "val_mse": 0.5})
    ''')
    first = launch(tmp_path, script)
    second = launch(tmp_path, script)
    assert (first.status, first.reused, second.status, second.reused) == ("ok", False, "ok", True)
    assert second.duration_s == 0 and second.metrics == first.metrics
    assert (tmp_path / "runs" / "launches.txt").read_text() == "run_0000\n", "a finished run is never relaunched"


def _sleeper(tmp_path: Path) -> Path:
    return stand_in(tmp_path, '''
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        write_json("pids.json", {"child": os.getpid(), "grandchild": grandchild.pid})
        write_json("history.json", [{"epoch": 1, "val_mse": 0.5}])
        time.sleep(600)
    ''')


def _assert_stopped(run_dir: Path) -> None:
    pids = json.loads((run_dir / "pids.json").read_text())
    assert wait_for(lambda: not any(alive(pid) for pid in pids.values()), 10), f"still running: {pids}"
    assert not is_finished(run_dir), "a cancelled run is rerun on resume, not reused"
    assert no_markers_left(run_dir.parent)


@pytest.mark.timeout(120)
def test_stop_event_cancels_the_task_and_its_train_py(cluster, tmp_path):
    stop = threading.Event()
    start = time.monotonic()
    with pytest.raises(LaunchCancelled, match="shutting down"):
        launch(tmp_path, _sleeper(tmp_path), stop_event=stop, on_progress=lambda history: stop.set())
    assert time.monotonic() - start < 60
    _assert_stopped(tmp_path / "runs" / "run_0000")


@pytest.mark.timeout(120)
def test_keyboard_interrupt_while_waiting_cancels_and_reraises(cluster, tmp_path):
    def interrupt(history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch(tmp_path, _sleeper(tmp_path), on_progress=interrupt)
    _assert_stopped(tmp_path / "runs" / "run_0000")


def test_crashing_train_script_fails_with_its_error(cluster, tmp_path):
    script = stand_in(tmp_path, '''
        print("about to fail", flush=True)
        raise RuntimeError("boom in the stand-in")
    ''')
    result = launch(tmp_path, script)
    assert (result.status, result.returncode) == ("failed", 1)
    assert "boom in the stand-in" in result.metrics["error"] and "boom in the stand-in" in result.error_tail
    assert load_metrics(tmp_path / "runs" / "run_0000")["status"] == "failed"


@pytest.mark.timeout(120)
def test_dead_worker_gives_a_failed_run_with_rays_report(cluster, tmp_path):
    # The stand-in's parent is the Ray worker running the task: killing it is a worker crash.
    script = stand_in(tmp_path, '''
        write_json("pids.json", {"child": os.getpid()})
        print("killing my Ray worker", flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(600)
    ''')
    result = launch(tmp_path, script)
    run_dir = tmp_path / "runs" / "run_0000"
    assert result.status == "failed" and result.returncode is None
    error = load_metrics(run_dir)["error"]
    assert error.startswith("the Ray task running train.py failed: WorkerCrashedError"), error
    assert "killing my Ray worker" in error, "the train.log tail is kept"
    pid = json.loads((run_dir / "pids.json").read_text())["child"]
    assert wait_for(lambda: not alive(pid), 10), "train.py gets SIGTERM when its worker dies"


def test_an_error_inside_the_task_is_a_failed_run(cluster, tmp_path):
    # launch_run on the worker cannot write a file into a folder that does not exist: it raises there.
    result = launch(tmp_path, stand_in(tmp_path, ""), files={"missing/notes.txt": "x"})
    error = load_metrics(tmp_path / "runs" / "run_0000")["error"]
    assert result.status == "failed" and result.returncode is None
    assert error.startswith("the Ray task running train.py failed: FileNotFoundError"), error
    assert "notes.txt" in error.splitlines()[0]


@pytest.mark.timeout(300)
@pytest.mark.slow  # a Ray task that leaks past 1.5 GB (~20 s)
def test_the_caps_go_with_the_task_and_a_run_over_the_memory_cap_fails_with_the_reason(cluster, tmp_path):
    (tmp_path / "leak.py").write_text(LEAK)
    result = launch(tmp_path, config_text=TINY_CONFIG, timeout_s=240, extra_args=["--model", str(tmp_path / "leak.py")],
                    caps=Caps(memory_gb=1.5, cpu_s=cpu_cap_s(None, 1)))
    assert result.status == "failed"
    assert error_headline(result.metrics["error"]).startswith("memory cap (1.5 GB): train.py ran out of memory")


# --------------------------------------------------------------------------- without a cluster

def test_paths_are_translated_for_the_node(tmp_path):
    spec = ray_launcher._RunSpec(
        run_dir="/orchestrator/runs/run_0003", runs_dir="/orchestrator/runs", run_id="run_0003", config_text="",
        train_script="/orchestrator/project/train.py", extra_args=[], timeout_s=None, env_overrides={}, files={},
        poll_s=0.5, num_gpus=0, marker="/orchestrator/runs/.ray_shared_x", token="x",
        project_root="/orchestrator/project")
    local = tmp_path / "runs" / "run_0003"
    assert ray_launcher._localize("/orchestrator/runs/run_0003/model.py", spec, local) == str(local / "model.py")
    assert ray_launcher._localize("/orchestrator/project/train.py", spec, local) == str(ROOT / "train.py")
    assert ray_launcher._localize(str(tmp_path), spec, local) == str(tmp_path), "a path that exists here is kept"
    assert ray_launcher._localize("training.lr=0.1", spec, local) == "training.lr=0.1"


def test_without_ray_installed_the_error_says_how_to_install_it():
    code = textwrap.dedent('''
        import sys
        sys.modules["ray"] = None  # what `import ray` sees where Ray is not installed
        from nas_agent_graph import ray_launcher
        ray_launcher.shutdown()  # a no-op without Ray
        try:
            ray_launcher.connect(None)
        except ImportError as exc:
            print("ERROR:", exc)
    ''')
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR: Ray is not installed: pip install -r requirements-ray.txt" in out.stdout


def test_a_run_without_a_gpu_is_kept_off_the_gpus(tmp_path):
    spec = ray_launcher._RunSpec(
        run_dir=str(tmp_path), runs_dir=str(tmp_path.parent), run_id=tmp_path.name, config_text="",
        train_script="train.py", extra_args=[], timeout_s=None, env_overrides={"A": "1"}, files={}, poll_s=0.5,
        num_gpus=0, marker="", token="")
    assert ray_launcher._worker_env(spec)["CUDA_VISIBLE_DEVICES"] == ""
    assert ray_launcher._worker_env(spec)["A"] == "1" and "PATH" in ray_launcher._worker_env(spec)
    chosen = dataclasses.replace(spec, env_overrides={"CUDA_VISIBLE_DEVICES": "1"})
    assert ray_launcher._worker_env(chosen)["CUDA_VISIBLE_DEVICES"] == "1"


def test_files_brought_back_are_written_metrics_last_and_never_outside(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "run_0000"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("an earlier attempt")
    written = []
    real_write = ray_launcher._write_bytes_atomic
    monkeypatch.setattr(ray_launcher, "_write_bytes_atomic",
                        lambda path, data: (written.append(path.name), real_write(path, data)))
    attempt = ray_launcher._store_files(run_dir, {"metrics.json": b"{}", "train.log": b"new", "sub/x.txt": b"x"})
    assert attempt == 1 and written[-1] == "metrics.json" and len(written) == 3
    assert (run_dir / "sub" / "x.txt").read_bytes() == b"x" and (run_dir / "attempt_1" / "train.log").is_file()
    with pytest.raises(ValueError, match="outside the run folder"):
        ray_launcher._store_files(run_dir, {"../evil.txt": b"x"})
    assert not (run_dir.parent / "evil.txt").exists()
