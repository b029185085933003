"""Launch one `train.py` run into runs/run_XXXX/ and wait for its outcome.

The search runs for hours and its orchestrator may be stopped at any moment (Ctrl-C,
a crash, a lost SSH session). So a launch must be safe to repeat: a run folder that
holds metrics.json is final and is only read back; a folder without it is the debris
of an interrupted attempt, which is moved aside into attempt_N/ (never deleted) before
the run is started afresh.

Each child runs in its own session and process group, so the whole tree it spawns
(data-loader workers, a shell wrapper) can be stopped with one signal and nothing
survives a timeout. On Linux the kernel is also asked to SIGTERM the child when the
orchestrator dies, and launch.json records the PID so that a later launch can find
and stop a child orphaned by a SIGKILLed orchestrator.

Whatever happens to the child, the folder ends with a metrics.json: the child's own,
or one written here (status "failed" or "timeout") when the child left none, so a
resumed search reuses the outcome instead of paying for the run again.
"""
from __future__ import annotations

import errno
import datetime as _dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nas_agent.atomic import atomic_write_json, atomic_write_text
from nas_agent.run_folder import CONFIG_FILE, LAUNCH_FILE, LOCK_FILE, LOG_FILE, PRUNE_FILE
from nas_agent_graph.disk import mentions_full_disk
from nas_agent_graph.limits import Caps, memory_cap_reason, ran_out_of_memory
from nas_agent_graph.paths import TRAIN_SCRIPT
from nas_agent_graph.process import (
    cmdline_mentions,
    group_alive,
    kill_after_error,
    kill_process_group,
    kill_single,
    pid_alive,
    signal_group,
    start_child,
    wait_exit_unreaped,
)
from nas_agent.logging_utils import METRICS_FILE, HISTORY_FILE, load_history, load_metrics, save_metrics

log = logging.getLogger(__name__)

ATTEMPT_RE = re.compile(r"^attempt_(\d+)$")
ERROR_TAIL_LINES = 30
# Metric keys a synthesised metrics.json carries (as None), so readers find the same
# keys as in one written by train.py; see nas_agent.logging_utils for their meaning.
METRIC_KEYS = ("best_epoch", "val_mse", "val_mae", "test_mse", "test_mae", "train_mse", "train_time_sec",
               "n_params", "device", "seed")


class LaunchCancelled(Exception):
    """launch_run was told to stop (its stop_event was set); the child has been stopped and the
    folder holds what train.py wrote on SIGTERM (status "interrupted", so a resume reruns it)."""


@dataclass
class LaunchResult:
    """What one launch_run call found or produced; see launch_run."""

    status: str              # one of RUN_STATUSES
    metrics: dict            # the run's metrics.json content (read, or synthesised when train.py left none)
    history: list[dict]      # the epochs of history.json ([] if none)
    duration_s: float        # wall-clock of this launch (0 when reused)
    error_tail: str | None   # last ~30 lines of train.log when status != "ok", else None
    returncode: int | None   # child's exit code (None when reused)
    reused: bool             # True: metrics.json already existed, nothing was launched
    attempt: int             # how many earlier partial attempts were moved aside


# --------------------------------------------------------------------------- public API

def is_finished(run_dir: Path) -> bool:
    """True when the run folder holds a final metrics.json (train.py writes it last).

    An "interrupted" run is not final: train.py writes that status when the orchestrator
    stops it (Ctrl-C, or the kernel's parent-death SIGTERM after an orchestrator crash),
    so a resumed search moves its files aside and runs it again from scratch.
    """
    metrics = load_metrics(Path(run_dir))
    return metrics is not None and metrics["status"] != "interrupted"


def launch_run(run_dir: Path, config_text: str, *, run_id: str, runs_dir: Path, python: str = sys.executable,
               train_script: Path = TRAIN_SCRIPT, extra_args: Sequence[str] = (),
               timeout_s: float | None = None, env: Mapping[str, str] | None = None,
               on_progress: Callable[[list[dict]], None] | None = None, poll_s: float = 0.5,
               term_grace_s: float = 10.0, files: Mapping[str, str] | None = None,
               stop_event: threading.Event | None = None, caps: Caps | None = None) -> LaunchResult:
    """Run train.py for `run_id` into `run_dir` (= runs_dir/run_id) and return its outcome.

    Idempotent: a folder with metrics.json is returned as is (reused=True). Otherwise any
    orphaned child of an earlier orchestrator is stopped, earlier files are moved into
    attempt_N/, config.py is written and train.py is started with its output streamed
    into train.log. `files` ({name: text}) are written into the folder beside config.py.
    `on_progress(epochs)` is called with the per-epoch records whenever history.json changes.
    After `timeout_s` seconds the whole process group is stopped and the status is
    "timeout". A KeyboardInterrupt (or any error) while waiting stops the group and is
    re-raised; so is LaunchCancelled when `stop_event` is set by another thread (a parallel
    search shutting down), after the group has been stopped. The child's environment gets PYTHONUNBUFFERED=1 unless `env` sets it, so
    train.log fills while the run goes instead of at exit. `caps` (nas_agent_graph.limits) are set in
    the child; a run that ran out of memory under them ends "failed" with reason "memory cap (N GB)".
    """
    run_dir, runs_dir, train_script = check_launch_args(run_dir, run_id, runs_dir, train_script,
                                                         timeout_s, poll_s, term_grace_s)
    if is_finished(run_dir):
        return reused_result(run_dir)
    stop_orphan(run_dir, term_grace_s)
    attempt = move_aside(run_dir)
    atomic_write_text(run_dir / CONFIG_FILE, config_text)
    for name, text in (files or {}).items():  # e.g. a proposed model.py, which --model in extra_args names
        atomic_write_text(run_dir / name, text)
    cmd = [python, str(train_script), "--config", str(run_dir / CONFIG_FILE), "--tag", run_id,
           "--runs-dir", str(runs_dir), *map(str, extra_args)]
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.update(caps.env() if caps else {})
    start = time.monotonic()
    with open(run_dir / LOG_FILE, "wb") as log_file:
        proc = start_child(cmd, cwd=train_script.parent, env=child_env, caps=caps, stdout=log_file)
        try:  # an interrupt (Ctrl-C, a Ray cancel) may come before _supervise takes over
            _write_launch_record(run_dir, proc, cmd)
            log.info("%s: started pid %d: %s", run_id, proc.pid, " ".join(cmd))
        except BaseException:
            kill_after_error(proc, term_grace_s)
            raise
        timed_out = _supervise(proc, run_dir, on_progress, timeout_s, poll_s, term_grace_s, stop_event)
    duration = time.monotonic() - start
    _raise_if_disk_full(run_dir, run_id)
    metrics = _final_metrics(run_dir, run_id, proc.returncode, timed_out, timeout_s)
    if caps is not None and caps.memory_gb and metrics["status"] == "failed":
        metrics = _label_memory_cap(run_dir, run_id, metrics, caps.memory_gb)
    return launch_result(run_dir, metrics, duration, proc.returncode, reused=False, attempt=attempt)


def request_prune(run_dir: Path, reason: str, record: dict) -> None:
    """Ask the train.py running in `run_dir` to stop as "pruned" (it looks between batches).

    The file holds the reason on its first line (train.py copies it into metrics.json) and
    the decision as JSON on the second (read back by `read_prune_request`).
    """
    atomic_write_text(Path(run_dir) / PRUNE_FILE, reason.replace("\n", " ") + "\n" + json.dumps(record) + "\n")


def read_prune_request(run_dir: Path) -> dict | None:
    """The decision stored by request_prune, or None when there is none (or it is unreadable)."""
    try:
        lines = (Path(run_dir) / PRUNE_FILE).read_text(encoding="utf-8").splitlines()
        record = json.loads(lines[1])
    except (OSError, IndexError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# --------------------------------------------------------------------------- checks

def check_launch_args(run_dir, run_id, runs_dir, train_script, timeout_s, poll_s, term_grace_s):
    """Resolve the paths (the child runs in another cwd) and reject inconsistent arguments.

    train.py writes into runs_dir/run_id; a run_dir elsewhere would never see its
    metrics.json and every launch would silently start over.
    """
    run_dir, runs_dir = Path(run_dir).resolve(), Path(runs_dir).resolve()
    train_script = Path(train_script).resolve()
    if run_dir != runs_dir / run_id:
        raise ValueError(f"launch_run: run_dir {run_dir} is not runs_dir/run_id ({runs_dir / run_id}); "
                         "train.py writes into runs_dir/run_id, so pass run_dir=runs_dir / run_id")
    if not train_script.is_file():
        raise FileNotFoundError(f"launch_run: train script {train_script} not found; pass train_script= "
                                "the path of train.py")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"launch_run: timeout_s must be > 0 or None (no limit), got {timeout_s}")
    if poll_s <= 0 or term_grace_s < 0:
        raise ValueError(f"launch_run: poll_s must be > 0 and term_grace_s >= 0, got poll_s={poll_s}, "
                         f"term_grace_s={term_grace_s}")
    return run_dir, runs_dir, train_script


# --------------------------------------------------------------------------- earlier attempts

def launch_record(run_dir: Path) -> dict | None:
    """launch.json (pid, pgid, cmd, started_at) as a dict; None when absent or unreadable."""
    return _read_launch_record(run_dir)


def is_live_child(run_dir: Path, record: dict | None) -> bool:
    """Whether the train.py in `record` (launch.json) still runs: its PID alive and its command
    line naming this folder, so a reused PID does not count. Read-only."""
    pid = record.get("pid") if record else None
    if not isinstance(pid, int) or pid <= 1 or not pid_alive(pid):
        return False
    # launch_run passes absolute paths; the caller's run_dir may be relative to its cwd
    return cmdline_mentions(pid, run_dir) or cmdline_mentions(pid, run_dir.resolve())


def stop_orphan(run_dir: Path, grace_s: float) -> None:
    """Stop a child left running by an orchestrator that died without killing it.

    The PID in launch.json may since have been reused by an unrelated process, so it is
    only killed if its command line names this run folder.
    """
    record = _read_launch_record(run_dir)
    pid = record.get("pid") if record else None
    if not isinstance(pid, int) or pid <= 1 or pid == os.getpid() or not pid_alive(pid):
        return
    if not cmdline_mentions(pid, run_dir):
        log.debug("%s: pid %d from %s is alive but is not this run's child; leaving it", run_dir, pid, LAUNCH_FILE)
        return
    log.warning("%s: an earlier child (pid %d) is still running, orphaned by a previous orchestrator; "
                "stopping it before relaunching", run_dir, pid)
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid == os.getpgrp() or pgid <= 1:
        kill_single(pid, grace_s)
    else:
        kill_process_group(pgid, grace_s)


def stop_attempt_group(run_dir: Path, grace_s: float) -> bool:
    """Stop what is left of the process group in run_dir's launch.json; True if anything was.

    Only for a record written by the attempt just cancelled (move_aside cleared older ones):
    then its group id is ours even when the leader, train.py, is gone or a zombie (killed with
    its Ray worker, never reaped where PID 1 does not reap), and processes train.py started
    are still in it. A group id is not reused while any member lives.
    """
    record = _read_launch_record(run_dir)
    pgid = record.get("pgid") if record else None
    if not isinstance(pgid, int) or pgid <= 1 or pgid == os.getpgrp() or not group_alive(pgid):
        return False
    log.warning("%s: processes of its train.py (group %d) outlived the cancel; stopping them", run_dir.name, pgid)
    kill_process_group(pgid, grace_s)
    return True


def _read_launch_record(run_dir: Path) -> dict | None:
    """launch.json as a dict; None when absent or unreadable (it is only a hint)."""
    path = run_dir / LAUNCH_FILE
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); cannot check for an orphaned child of an earlier attempt", path, exc)
        return None
    return data if isinstance(data, dict) else None


def move_aside(run_dir: Path) -> int:
    """Move everything but earlier attempt_* folders into the next attempt_N/; return the attempt count.

    Nothing is deleted: the partial history and log of an interrupted attempt may be
    what explains it. train.py also refuses a folder that already holds its outputs.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in run_dir.iterdir() if p.is_dir() and (m := ATTEMPT_RE.match(p.name))]
    # The lock file stays: a train.py still holding it (an orphan stop_orphan missed) then refuses
    # the new attempt, instead of both writing the folder.
    leftovers = [p for p in run_dir.iterdir() if not (p.is_dir() and ATTEMPT_RE.match(p.name)) and p.name != LOCK_FILE]
    if not leftovers:
        return len(numbers)
    target = run_dir / f"attempt_{max(numbers, default=0) + 1}"
    target.mkdir()
    for path in leftovers:
        os.replace(path, target / path.name)
    log.info("%s: moved %d file(s) of an interrupted attempt into %s", run_dir, len(leftovers), target.name)
    return len(numbers) + 1


# --------------------------------------------------------------------------- starting the child

def _write_launch_record(run_dir: Path, proc: subprocess.Popen, cmd: list[str]) -> None:
    """launch.json: who runs this folder, so a later launch can stop it if we die."""
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(run_dir / LAUNCH_FILE, {"pid": proc.pid, "pgid": proc.pid, "cmd": cmd, "started_at": started})


# --------------------------------------------------------------------------- supervising

def _supervise(proc, run_dir, on_progress, timeout_s, poll_s, grace_s, stop_event=None) -> bool:
    """Wait for the child, reporting progress; return True if it was stopped for the timeout.

    The child is left unreaped (a zombie) until its group has been swept, so its PID,
    which is also the group id, cannot be reused by an unrelated process meanwhile.
    """
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    watcher = HistoryWatcher(run_dir, on_progress)
    timed_out = False
    try:
        while not wait_exit_unreaped(proc.pid, poll_s):
            watcher.check()
            if stop_event is not None and stop_event.is_set():
                raise LaunchCancelled(f"{run_dir.name}: the search is shutting down")
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("%s: --run-timeout of %gs reached; stopping pid %d and its group",
                            run_dir.name, timeout_s, proc.pid)
                timed_out = True
                kill_process_group(proc.pid, grace_s)
                wait_exit_unreaped(proc.pid, None)
                break
        signal_group(proc.pid, signal.SIGKILL)  # grandchildren that outlived the child
        proc.wait()
    except BaseException:
        log.warning("%s: orchestrator interrupted; stopping pid %d and its group", run_dir.name, proc.pid)
        kill_after_error(proc, grace_s)
        raise
    watcher.check()  # the last epoch, written just before exit
    return timed_out


class HistoryWatcher:
    """Calls on_progress(epochs) when history.json changes; a failing callback is only logged."""

    def __init__(self, run_dir: Path, on_progress):
        self.path = run_dir / HISTORY_FILE
        self.run_dir = run_dir
        self.on_progress = on_progress
        self.last = None

    def check(self) -> None:
        if self.on_progress is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)  # atomic replace: a new inode each write
        if stamp == self.last:
            return
        self.last = stamp
        try:
            self.on_progress(load_history(self.run_dir)["epochs"])
        except Exception:
            log.exception("%s: on_progress callback failed; the run goes on", self.run_dir.name)


# --------------------------------------------------------------------------- signals and processes

# --------------------------------------------------------------------------- outcome

def _final_metrics(run_dir: Path, run_id: str, returncode: int, timed_out: bool, timeout_s) -> dict:
    """The run's metrics.json, made final: synthesised if missing, relabelled after our timeout."""
    metrics = load_metrics(run_dir)
    if metrics is None:
        metrics = _synthesise_metrics(run_dir, run_id, returncode, timed_out, timeout_s)
        save_metrics(run_dir, metrics)
    elif timed_out and metrics.get("status") == "interrupted":
        metrics["status"] = "timeout"
        metrics["error"] = (f"killed by the orchestrator after --run-timeout {timeout_s:g}s "
                            f"(train.py stopped on SIGTERM: {metrics.get('error')})")
        save_metrics(run_dir, metrics)
    return metrics


LOG_TAIL_MARKER = "\n--- last lines of "
_SIGNAL_HINTS = {"SIGKILL": "; possibly the out-of-memory killer, or the CPU-time cap's hard limit",
                 "SIGXCPU": ": it used up its CPU-time cap (RLIMIT_CPU), a backstop beside --run-timeout"}


def _raise_if_disk_full(run_dir: Path, run_id: str) -> None:
    """A run that failed because its own writes found the disk full is not the config's failure:
    its metrics.json is set aside (the folder is then unfinished, and a resumed search runs it again)
    and the search stops with ENOSPC naming the folder (nas_agent_graph/disk.py)."""
    metrics = load_metrics(run_dir)
    if metrics is not None and metrics.get("status") not in ("failed", "interrupted"):
        return
    if not (mentions_full_disk((metrics or {}).get("error")) or mentions_full_disk(log_tail(run_dir))):
        return
    if metrics is not None:
        os.replace(run_dir / METRICS_FILE, run_dir / f"disk_full_{METRICS_FILE}")
    log.error("%s: train.py could not write its files: the disk is full", run_id)
    raise OSError(errno.ENOSPC, f"train.py of {run_id} could not write its files", str(run_dir))


def _label_memory_cap(run_dir: Path, run_id: str, metrics: dict, gb: float) -> dict:
    """A failed run that ran out of memory under its cap: its error starts with "memory cap (N GB)",
    and the same line ends train.log, so the LLM's failure feedback (the log's tail) says it too."""
    error = metrics.get("error") or ""
    tail = log_tail(run_dir)
    if not (ran_out_of_memory(error) or ran_out_of_memory(tail)):
        return metrics
    reason = (f"{memory_cap_reason(gb)}: train.py ran out of memory under its cap (--run-memory {gb:g}); "
              "propose a smaller model (d_model, d_ff, layers, seq_len, batch_size) or raise --run-memory")
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(f"\n[orchestrator] {reason}\n")
    log.warning("%s: %s", run_id, reason)
    metrics = {**metrics, "error": f"{reason}{LOG_TAIL_MARKER}{LOG_FILE} ---\n{log_tail(run_dir)}",
               "failure": "memory cap", "memory_cap_gb": gb}
    save_metrics(run_dir, metrics)
    return metrics


def error_headline(error: str | None) -> str:
    """One line that says why a run failed: the orchestrator's own reason when it wrote the
    error (reason, then the log tail), else the last line of train.py's error (the exception)."""
    text = (error or "").strip()
    if LOG_TAIL_MARKER in text:
        return text.split(LOG_TAIL_MARKER, 1)[0].strip().splitlines()[0][:300]
    lines = text.splitlines()
    return lines[-1][:300] if lines else "(no error text)"


def _synthesise_metrics(run_dir: Path, run_id: str, returncode: int, timed_out: bool, timeout_s) -> dict:
    """metrics for a child that left none, with the reason and the log tail as its error."""
    if timed_out:
        status = "timeout"
        reason = (f"killed after --run-timeout {timeout_s:g}s before train.py could write {METRICS_FILE}; "
                  "raise --run-timeout or make the config train faster")
    else:
        status = "failed"
        reason = f"train.py exited with code {returncode} without writing {METRICS_FILE}"
        if returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else "a signal"
            reason += f" (killed by {name}{_SIGNAL_HINTS.get(name, '')})"
    tail = log_tail(run_dir) or "(train.log is empty)"
    log.warning("%s: %s", run_id, reason)
    metrics = {"status": status, **{key: None for key in METRIC_KEYS}}
    metrics.update(epochs_run=len(load_history(run_dir)["epochs"]), error=f"{reason}{LOG_TAIL_MARKER}{LOG_FILE} ---\n{tail}",
                   tag=run_id, returncode=returncode)
    return metrics


def log_tail(run_dir: Path, lines: int = ERROR_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of train.log, reading only its end (logs can be large)."""
    path = run_dir / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def reused_result(run_dir: Path) -> LaunchResult:
    """The outcome of a folder that is already final; nothing is launched."""
    log.info("%s: already finished (%s exists); reusing it", run_dir.name, METRICS_FILE)
    attempts = sum(1 for p in run_dir.iterdir() if p.is_dir() and ATTEMPT_RE.match(p.name))
    return launch_result(run_dir, load_metrics(run_dir), 0.0, None, reused=True, attempt=attempts)


def launch_result(run_dir: Path, metrics: dict, duration: float, returncode, *, reused: bool, attempt: int) -> LaunchResult:
    status = metrics["status"]
    return LaunchResult(status=status, metrics=metrics, history=load_history(run_dir)["epochs"], duration_s=duration,
                        error_tail=None if status == "ok" else log_tail(run_dir), returncode=returncode,
                        reused=reused, attempt=attempt)
