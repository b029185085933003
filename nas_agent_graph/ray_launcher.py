"""Launch one `train.py` run as a Ray task, with the contract of `launcher.launch_run`.

A search with `--launcher ray` spreads its runs over the nodes of a Ray cluster. Each run is
one Ray task that calls `launch_run` on the node Ray picked, so timeouts, process groups and
the synthesised metrics.json behave exactly as in a local search. Ray is optional: it is
imported only inside the functions that need it.

Where the run folder lives depends on the cluster:

- **Shared filesystem** (NFS, or a local cluster): the orchestrator writes a marker file with
  a random name into runs_dir before each launch; a task that can read that marker at the same
  path runs train.py straight into run_dir. The orchestrator watches run_dir/history.json for
  `on_progress`, and a PRUNE file it writes there is seen by train.py on the worker.
- **No shared filesystem**: the task runs into a temporary folder on its node and returns the
  folder's files; the orchestrator writes them into run_dir, metrics.json last. There is no
  progress (and so no pruning) in that mode.

A run whose task dies (the worker process or its node) is an outcome like any other: status
"failed" with what Ray reported, never an exception that stops the search. Ray's own retries
are off (max_retries=0): a run that failed is data, and retrying it blindly would hide that.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nas_agent.atomic import atomic_write_text
from nas_agent.logging_utils import load_history, load_metrics, save_metrics
from nas_agent.run_folder import LOG_FILE, METRICS_FILE
from nas_agent_graph.launcher import (
    LOG_TAIL_MARKER,
    METRIC_KEYS,
    HistoryWatcher,
    LaunchCancelled,
    LaunchResult,
    check_launch_args,
    is_finished,
    launch_result,
    launch_run,
    log_tail,
    move_aside,
    reused_result,
    stop_attempt_group,
    stop_orphan,
)
from nas_agent_graph.limits import Caps
from nas_agent_graph.paths import ROOT, TRAIN_SCRIPT

log = logging.getLogger(__name__)

RAY_MISSING = "Ray is not installed: pip install -r requirements-ray.txt"
MARKER_PREFIX = ".ray_shared_"
# Set to 1 in a worker's environment (or in env_overrides) to treat the filesystem as not
# shared even where the marker is visible, e.g. where NFS is too slow or incoherent for
# run folders; files then come back through Ray.
NO_SHARED_FS_ENV = "NAS_RAY_NO_SHARED_FS"
PROJECT_ROOT = ROOT
# What a shipped copy of the project leaves out: run outputs, environments, checkpoints and
# data sets are large and node-specific (data is read from NAS_DATA_DIR on each node).
SHIP_EXCLUDES = ("runs/", ".venv*", ".git", "*.pth", "data/", "__pycache__/", ".pytest_cache/",
                 "agent_state.json*", "*.lock", "*.sqlite")
_TERM_GRACE_S = 10.0  # launch_run's SIGTERM-to-SIGKILL grace on the worker
_CANCEL_GRACE_S = _TERM_GRACE_S + 5.0  # time for that graceful stop before the worker is killed
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:(\d{1,5})$")


# --------------------------------------------------------------------------- connecting

def connect(address: str | None, *, num_cpus: int | None = None) -> dict:
    """Connect this process to Ray once and return the cluster's resources ({"CPU": 8.0, ...}).

    `address` None starts a local cluster (`num_cpus` caps its CPUs, default: all); "auto" or
    "HOST:PORT" joins a cluster started with `ray start`, and ships the project's code to its
    nodes (a runtime_env working_dir without runs, environments, checkpoints and data), since a
    node may not have it. A second call is a no-op that returns the resources again, even with
    another address: one process talks to one cluster.
    """
    ray = _import_ray()
    _check_connect_args(address, num_cpus)
    if ray.is_initialized():
        log.debug("already connected to Ray; connect(%r) is a no-op", address)
        return ray.cluster_resources()
    if address is None:
        # Same machine, so same paths: workers inherit our environment and the code needs no shipping.
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init(address=address, runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": list(SHIP_EXCLUDES)})
    resources = ray.cluster_resources()
    log.info("connected to Ray (%s): %s", address or "local cluster", resources)
    return resources


def shutdown() -> None:
    """Disconnect from Ray (and stop a local cluster started by connect); no-op when not connected."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def _import_ray():
    """The ray module, imported here rather than at module import: Ray is an optional dependency."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


def _check_connect_args(address: str | None, num_cpus: int | None) -> None:
    if address is not None and address != "auto" and not _valid_host_port(address):
        raise ValueError(f"connect: address {address!r} is not 'auto' or HOST:PORT (e.g. 10.0.0.5:6379, the "
                         "head node's `ray start --head --port=6379`); pass None for a local cluster"
                         + ("; Ray Client (ray://) is not supported" if address.startswith("ray://") else ""))
    if num_cpus is not None and address is not None:
        raise ValueError(f"connect: num_cpus={num_cpus} only applies to a local cluster (address None); "
                         "an existing cluster's CPUs are set by `ray start --num-cpus` on each node")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"connect: num_cpus must be an integer >= 1 or None (all CPUs), got {num_cpus!r}")


def _valid_host_port(address: str) -> bool:
    match = _ADDRESS_RE.match(address)
    return match is not None and 1 <= int(match.group(1)) <= 65535


# --------------------------------------------------------------------------- launching (orchestrator)

def ray_launch_run(run_dir: Path, config_text: str, *, run_id: str, runs_dir: Path,
                   train_script: Path = TRAIN_SCRIPT, extra_args: Sequence[str] = (),
                   timeout_s: float | None = None, env_overrides: Mapping[str, str] | None = None,
                   on_progress: Callable[[list[dict]], None] | None = None, files: Mapping[str, str] | None = None,
                   num_cpus: float = 1, num_gpus: float = 0, poll_s: float = 0.5,
                   stop_event: threading.Event | None = None, caps: Caps | None = None) -> LaunchResult:
    """Run train.py for `run_id` as one Ray task and return its outcome, like `launch_run`.

    Idempotent: a finished folder is returned as is (reused=True, nothing launched). Otherwise
    earlier files are moved into attempt_N/ and one task asking for `num_cpus` CPUs and
    `num_gpus` GPUs runs `launch_run` on a node, with the node's python, the node's environment
    plus `env_overrides`, and `timeout_s` enforced there. `on_progress(history)` is called when
    history.json changes, on a shared filesystem only (see the module docstring). When
    `stop_event` is set, or on KeyboardInterrupt, the task is cancelled (train.py is stopped) and
    LaunchCancelled (or the KeyboardInterrupt) is raised. A task that dies gives status "failed".
    `caps` (nas_agent_graph.limits) are set on train.py by the node that runs it, under that node's
    hard limits, and a run over the memory cap ends "failed" with reason "memory cap (N GB)".
    The folder always ends with a metrics.json. Call `connect` first.
    `duration_s` is the wall-clock from submission, so it includes time queued for resources.
    """
    run_dir, runs_dir, train_script = check_launch_args(run_dir, run_id, runs_dir, train_script,
                                                         timeout_s, poll_s, _TERM_GRACE_S)
    if is_finished(run_dir):
        return reused_result(run_dir)
    ray = _import_ray()
    _check_cluster(ray, num_cpus, num_gpus)
    stop_orphan(run_dir, _TERM_GRACE_S)  # a child of an earlier local launch on this machine
    attempt = move_aside(run_dir)  # before watching, so an old history.json is not reported as progress
    marker, token = _write_marker(runs_dir)
    spec = _RunSpec(run_dir=str(run_dir), runs_dir=str(runs_dir), run_id=run_id, config_text=config_text,
                    train_script=str(train_script), extra_args=[str(a) for a in extra_args], timeout_s=timeout_s,
                    env_overrides=dict(env_overrides or {}), files=dict(files or {}), poll_s=poll_s,
                    num_gpus=num_gpus, marker=str(marker), token=token, caps=caps)
    start = time.monotonic()
    try:
        ref = _submit(ray, spec, num_cpus, num_gpus)
        _await(ray, ref, run_dir, on_progress, poll_s, stop_event)
        outcome, error = _fetch(ray, ref)
    finally:
        marker.unlink(missing_ok=True)
    return _finish(run_dir, run_id, outcome, error, on_progress, attempt, time.monotonic() - start)


def _check_cluster(ray, num_cpus: float, num_gpus: float) -> None:
    """Refuse to submit a task that could wait forever: not connected, or no node big enough."""
    if not ray.is_initialized():
        raise RuntimeError("ray_launch_run: not connected to Ray; call nas_agent_graph.ray_launcher.connect(address) "
                           "first (None for a local cluster, 'auto' to join the one on this node)")
    if not num_cpus > 0 or not num_gpus >= 0:
        raise ValueError(f"ray_launch_run: num_cpus must be > 0 and num_gpus >= 0, got num_cpus={num_cpus}, "
                         f"num_gpus={num_gpus}")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        sizes = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no live node"
        raise ValueError(f"ray_launch_run: no node of the Ray cluster has {num_cpus:g} CPU and {num_gpus:g} GPU "
                         f"for one run (nodes: {sizes}); ask for fewer per run or add such a node")


def check_resources(num_cpus: float, num_gpus: float) -> None:
    """Raise a clear error now when no live node could ever run one run with these resources."""
    _check_cluster(_import_ray(), num_cpus, num_gpus)


def _write_marker(runs_dir: Path) -> tuple[Path, str]:
    """A file with a fresh random name and content: a task that reads it at this path shares our filesystem.

    A fresh name also defeats NFS's cache of failed lookups, which could hide a reused name.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = runs_dir / f"{MARKER_PREFIX}{token}"
    atomic_write_text(marker, token)
    return marker, token


def _submit(ray, spec: _RunSpec, num_cpus: float, num_gpus: float):
    """One task per run; no retries (a failed run is an outcome, not something to repeat blindly)."""
    task = ray.remote(_run_on_worker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
                                               name=f"train {spec.run_id}")
    ref = task.remote(spec)
    log.info("%s: submitted to Ray (%g CPU, %g GPU)", spec.run_id, num_cpus, num_gpus)
    return ref


def _await(ray, ref, run_dir: Path, on_progress, poll_s: float, stop_event: threading.Event | None) -> None:
    """Wait for the task, reporting progress from run_dir; cancel it if we are stopped."""
    watcher = HistoryWatcher(run_dir, on_progress)
    try:
        while not ray.wait([ref], timeout=poll_s)[0]:
            watcher.check()
            if stop_event is not None and stop_event.is_set():
                raise LaunchCancelled(f"{run_dir.name}: the search is shutting down")
    except BaseException:
        log.warning("%s: orchestrator interrupted; cancelling its Ray task", run_dir.name)
        _cancel(ray, ref, run_dir)
        raise
    watcher.check()  # the last epoch, written just before train.py exited


def _cancel(ray, ref, run_dir: Path) -> None:
    """Stop the task and its train.py; never raise over the error that led here.

    First a plain cancel (a KeyboardInterrupt in the task, on which launch_run stops train.py's
    process group and a temporary folder is removed); if the task is still there after the grace
    period, force: Ray kills the worker, and train.py gets SIGTERM as its parent died. Last,
    what is left on this machine of this attempt's process group (launch.json, shared
    filesystem) is stopped: a killed worker takes down train.py but not the processes train.py
    started (seen in the full test suite: train.py a zombie, its child still running).
    """
    run_id = run_dir.name
    try:
        _cancel_task(ray, ref, run_id)
    finally:
        try:
            stop_attempt_group(run_dir, _TERM_GRACE_S)
        except Exception:
            log.exception("%s: stopping its train.py after the cancel failed; check `ps -ef | grep %s`",
                          run_id, run_id)


def _cancel_task(ray, ref, run_id: str) -> None:
    """The Ray side of _cancel: plain, then forced after _CANCEL_GRACE_S."""
    try:
        ray.cancel(ref)
        if ray.wait([ref], timeout=_CANCEL_GRACE_S)[0]:
            return
        log.warning("%s: the Ray task did not stop within %gs; killing its worker", run_id, _CANCEL_GRACE_S)
        ray.cancel(ref, force=True)
        ray.wait([ref], timeout=_TERM_GRACE_S)
    except Exception:
        log.exception("%s: cancelling the Ray task failed; check `ray list tasks` for a task named 'train %s'",
                      run_id, run_id)


def _fetch(ray, ref) -> tuple[dict | None, BaseException | None]:
    """The task's outcome, or the Ray error that replaced it (a dead worker or node, an error in the task)."""
    try:
        return ray.get(ref), None
    except ray.exceptions.RayError as exc:
        return None, exc


# --------------------------------------------------------------------------- outcome (orchestrator)

def _finish(run_dir: Path, run_id: str, outcome: dict | None, error: BaseException | None, on_progress,
            attempt: int, duration: float) -> LaunchResult:
    """Bring the run folder to its final state and describe it."""
    if outcome is not None and outcome["mode"] == "copied":
        if on_progress is not None:
            log.warning("%s: ran on %s without a shared filesystem with the orchestrator: no progress and no "
                        "pruning (put runs_dir on a filesystem shared by all nodes, e.g. NFS)", run_id, outcome["node"])
        attempt = _store_files(run_dir, outcome["files"])
    metrics = load_metrics(run_dir)
    if error is not None or metrics is None:
        metrics = _record_failure(run_dir, run_id, error, metrics)
    returncode = outcome["returncode"] if outcome is not None else None
    if outcome is not None:
        log.info("%s: finished on %s (%s): %s", run_id, outcome["node"], outcome["mode"], metrics["status"])
    return launch_result(run_dir, metrics, duration, returncode, reused=False, attempt=attempt)


def _store_files(run_dir: Path, files: Mapping[str, bytes]) -> int:
    """Write the files a task brought back into run_dir, metrics.json last (its presence means final).

    Leftovers of an earlier attempt are moved aside first; returns the attempt count.
    """
    attempt = move_aside(run_dir)
    names = sorted(files, key=lambda name: name == METRICS_FILE)
    for name in names:
        target = _safe_target(run_dir, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_bytes_atomic(target, files[name])
    return attempt


def _safe_target(run_dir: Path, name: str) -> Path:
    """run_dir/name, refusing names that would land outside run_dir."""
    target = (run_dir / name).resolve()
    if run_dir not in target.parents:
        raise ValueError(f"a Ray task returned the file name {name!r}, which is outside the run folder {run_dir}")
    return target


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a temp file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_failure(run_dir: Path, run_id: str, error: BaseException | None, metrics: dict | None) -> dict:
    """Final metrics for a task that died or left none: status "failed", with what Ray reported.

    Numbers train.py wrote (e.g. "interrupted" on the SIGTERM it got as its worker died) are
    kept; a run train.py finished before the task died keeps its own outcome.
    """
    if metrics is not None and metrics["status"] != "interrupted":
        log.warning("%s: the Ray task failed after train.py finished (%s); keeping its outcome", run_id,
                    _ray_error_line(error))
        return metrics
    reason = (f"the Ray task running train.py failed: {_ray_error_line(error)}" if error is not None
              else f"the Ray task ended without a {METRICS_FILE}")
    log.warning("%s: %s", run_id, reason)
    earlier = f"\ntrain.py's own error: {metrics.get('error')}" if metrics is not None else ""
    tail = log_tail(run_dir) or f"({LOG_FILE} is empty or was not brought back)"
    final = metrics or {key: None for key in METRIC_KEYS}
    final.update(status="failed", epochs_run=len(load_history(run_dir)["epochs"]), tag=run_id, returncode=None,
                 error=f"{reason}\n{_ray_error_text(error)}{earlier}{LOG_TAIL_MARKER}{LOG_FILE} ---\n{tail}")
    save_metrics(run_dir, final)
    return final


def _ray_error_line(error: BaseException | None) -> str:
    """One line naming Ray's error: the exception raised inside the task, or Ray's own (a dead worker...)."""
    if error is None:
        return "(no error reported)"
    cause = getattr(error, "cause", None)  # RayTaskError: the exception raised in the task
    shown = cause if isinstance(cause, BaseException) else error
    text = next((line.strip() for line in str(shown).splitlines() if line.strip()), "")
    return f"{type(shown).__name__}: {text}"[:300]


def _ray_error_text(error: BaseException | None, limit: int = 4000) -> str:
    """Ray's full report (a remote traceback for an error in the task), its end kept when long."""
    text = str(error) if error is not None else ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


# --------------------------------------------------------------------------- the task (worker)

@dataclass(frozen=True)
class _RunSpec:
    """Everything a task needs, as the orchestrator sees it (paths are the orchestrator's)."""

    run_dir: str
    runs_dir: str
    run_id: str
    config_text: str
    train_script: str
    extra_args: list[str]
    timeout_s: float | None
    env_overrides: dict[str, str]
    files: dict[str, str]
    poll_s: float
    num_gpus: float
    marker: str
    token: str
    caps: Caps | None = None
    project_root: str = field(default=str(PROJECT_ROOT))


def _run_on_worker(spec: _RunSpec) -> dict:
    """The Ray task: run train.py on this node with launch_run, into run_dir or a temporary folder.

    Returns {"mode": "shared"|"copied", "node", "returncode", "files" (copied: {relative path: bytes})}.
    """
    env = _worker_env(spec)
    node = socket.gethostname()
    if _sees_marker(spec) and env.get(NO_SHARED_FS_ENV) != "1":
        result = _launch_here(spec, Path(spec.run_dir), Path(spec.runs_dir), env)
        return {"mode": "shared", "node": node, "returncode": result.returncode}
    with tempfile.TemporaryDirectory(prefix="nas_ray_") as tmp:
        runs = Path(tmp) / "runs"
        result = _launch_here(spec, runs / spec.run_id, runs, env)
        return {"mode": "copied", "node": node, "returncode": result.returncode,
                "files": _read_tree(runs / spec.run_id)}


def _worker_env(spec: _RunSpec) -> dict[str, str]:
    """This node's environment plus the overrides; the orchestrator's own would carry its paths.

    A run that reserved no GPU is kept off the GPUs: Ray leaves CUDA_VISIBLE_DEVICES alone for
    such tasks, so train.py would otherwise take a GPU another run has reserved.
    """
    env = {**os.environ, **spec.env_overrides}
    if spec.num_gpus == 0 and "CUDA_VISIBLE_DEVICES" not in spec.env_overrides:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _sees_marker(spec: _RunSpec) -> bool:
    try:
        with open(spec.marker, encoding="utf-8") as f:
            return f.read() == spec.token
    except OSError:
        return False


def _launch_here(spec: _RunSpec, run_dir: Path, runs_dir: Path, env: dict) -> LaunchResult:
    """launch_run on this node, with the orchestrator's paths translated to this node's."""
    train_script = Path(_localize(spec.train_script, spec, run_dir))
    if not train_script.is_file():
        raise FileNotFoundError(f"train script {spec.train_script} is not on node {socket.gethostname()} and is "
                                "not inside the project shipped to it; put it on a shared filesystem or in the project")
    args = [_localize(arg, spec, run_dir) for arg in spec.extra_args]
    return launch_run(run_dir, spec.config_text, run_id=spec.run_id, runs_dir=runs_dir, python=sys.executable,
                      train_script=train_script, extra_args=args, timeout_s=spec.timeout_s, env=env,
                      poll_s=spec.poll_s, term_grace_s=_TERM_GRACE_S, files=spec.files, caps=spec.caps)


def _localize(arg: str, spec: _RunSpec, run_dir: Path) -> str:
    """An orchestrator path as this node sees it: paths in the run folder follow the run folder
    (a temporary one without a shared filesystem); other paths are used as they are when they
    exist here, else taken from the project copy Ray shipped. Non-paths are returned unchanged."""
    if not arg.startswith("/"):
        return arg
    path = Path(arg)
    if path == Path(spec.run_dir) or Path(spec.run_dir) in path.parents:
        return str(run_dir / path.relative_to(spec.run_dir))
    if path.exists():
        return arg
    if Path(spec.project_root) in path.parents:
        return str(PROJECT_ROOT / path.relative_to(spec.project_root))
    return arg


def _read_tree(run_dir: Path) -> dict[str, bytes]:
    """Every regular file under run_dir, by path relative to it."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                files[path.relative_to(run_dir).as_posix()] = f.read()
    return files
