"""Child processes of the orchestrator: started in their own session and process group, tied to
the orchestrator's life, capped, and stopped whole.

Every child that trains or runs proposed code (a run's train.py, a smoke test, a LoRA fine-tune,
a forecast for the ensemble) is started here, so each gets the same treatment:
- its own session and process group, so one signal stops the whole tree it spawns
  (data-loader workers, a shell wrapper) and nothing survives a timeout;
- on Linux, SIGTERM from the kernel when the orchestrator dies, however it dies
  (prctl PR_SET_PDEATHSIG);
- the resource caps of nas_agent_graph/limits.py (memory, CPU time, oom_score_adj), set in the
  child before it runs anything;
- no stdin.

A process is judged alive from /proc, where a zombie (exited, not yet reaped) counts as dead,
and a process group is only ever signalled when it is not our own.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nas_agent_graph.limits import Caps, apply_in_child
from nas_agent_graph.paths import ROOT

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_EXIT_POLL_S = 0.05  # how often to look at a child that is expected to exit


def run_child(cmd: Sequence[str], *, timeout_s: float | None, caps: Caps | None = None,
              env: Mapping[str, str] | None = None, cwd: Path = ROOT, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, grace_s: float = 5.0) -> subprocess.CompletedProcess:
    """Run a child to its end, text output captured (by default), like subprocess.run, but in its
    own process group, tied to our life and under `caps`. Past `timeout_s` the whole group is
    stopped (TERM, then KILL after grace_s) before subprocess.TimeoutExpired is raised."""
    proc = start_child(list(cmd), cwd=cwd, env=dict(os.environ if env is None else env), caps=caps,
                       stdout=stdout, stderr=stderr)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid, grace_s)
        proc.communicate()
        raise
    except BaseException:
        kill_after_error(proc, grace_s)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_foreign_group(pgid: int) -> None:
    """Refuse group ids whose killpg would hit the orchestrator itself or every process."""
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"kill_process_group: refusing to signal process group {pgid}: it is "
                         f"{'invalid' if pgid <= 1 else 'our own group'}; pass the pgid of a child "
                         "started with start_new_session=True")


def cmdline_mentions(pid: int, run_dir: Path) -> bool:
    """True if an argument of `pid` is run_dir or a path inside it.

    Compared path-wise, not as a substring, so runs/run_0001 does not match runs/run_00010.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    prefix = str(run_dir)
    return any(arg == prefix or arg.startswith(prefix + os.sep) for arg in args)


def _load_prctl():
    """libc's prctl, or None where there is none (not Linux); looked up before fork."""
    if not sys.platform.startswith("linux"):
        log.debug("not Linux: children are not tied to the orchestrator's life (no PR_SET_PDEATHSIG)")
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        log.debug("prctl unavailable (%s): children are not tied to the orchestrator's life", exc)
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _make_preexec(prctl, caps: Caps | None = None):
    """preexec_fn asking the kernel to SIGTERM the child when its parent thread dies, and
    setting `caps` (memory, CPU time, oom_score_adj) in the child before it runs anything.

    The signal follows the launching *thread*; that is safe because every caller blocks in
    that thread until the child has exited. If the parent died before prctl
    took effect, the child stops itself at once. The rlimits are computed here, before
    fork, so the child only makes syscalls.
    """
    if prctl is None and caps is None:
        return None
    parent_pid = os.getpid()
    limits = caps.rlimits() if caps else []
    oom_adj = caps.oom_score_adj if caps else None

    def preexec() -> None:
        if prctl is not None:
            if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
        apply_in_child(limits, oom_adj)

    return preexec


def child_preexec(caps: Caps | None = None):
    """preexec_fn for any child of the orchestrator that runs proposed code or trains (smoke test,
    training, fine-tuning): SIGTERM when the orchestrator dies, however it dies, and `caps` set
    (None where there is nothing to do)."""
    return _make_preexec(_load_prctl(), caps)


def start_child(cmd: list[str], *, cwd: Path, env: Mapping[str, str], caps: Caps | None = None,
                stdout=None, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """Start a child in its own session (its pid is its process group id), tied to our life and
    under `caps`, with no stdin; piped output is text. A failure to start is a RuntimeError saying
    what to check."""
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                                start_new_session=True, preexec_fn=child_preexec(caps),
                                text=stdout is subprocess.PIPE)
    except subprocess.SubprocessError as exc:
        raise RuntimeError(f"could not start {cmd[1]}: setting up the child (prctl PR_SET_PDEATHSIG, "
                           f"resource caps {caps}) failed: {exc}") from exc
    except OSError as exc:
        raise RuntimeError(f"could not start {' '.join(cmd[:2])}: {exc}; check the python interpreter "
                           "and the script's path") from exc


def kill_after_error(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop and reap the child while another exception is propagating; never raise over it."""
    try:
        if proc.returncode is None:  # not reaped yet, so its pid still names its group
            kill_process_group(proc.pid, grace_s)
        proc.wait()
    except Exception:
        log.exception("stopping pid %d after an orchestrator error failed; check it with `ps -g %d`",
                      proc.pid, proc.pid)


def wait_exit_unreaped(pid: int, timeout_s: float | None) -> bool:
    """Wait up to timeout_s (None: forever) for child `pid` to exit, without reaping it."""
    flags = os.WEXITED | os.WNOWAIT
    if timeout_s is None:
        os.waitid(os.P_PID, pid, flags)
        return True
    end = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, flags | os.WNOHANG) is None:
        remaining = end - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(_EXIT_POLL_S, remaining))
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """killpg; returns False, not an error, when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_single(pid: int, grace_s: float) -> None:
    """TERM, grace, KILL for one process that shares our own group (never killpg that)."""
    try:
        os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(pid), grace_s):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, pgrp) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[2])


def pid_alive(pid: int) -> bool:
    """True if `pid` runs; a zombie (exited, not yet reaped) counts as dead."""
    if os.path.isdir("/proc/self"):
        stat = proc_stat(pid)
        return stat is not None and stat[0] not in "ZX"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True if a non-zombie process is still in group `pgid`.

    killpg(pgid, 0) alone would also count zombies, which may never be reaped where
    PID 1 does not reap orphans (some containers).
    """
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                stat = proc_stat(int(entry.name))
                if stat is not None and stat[1] == pgid and stat[0] not in "ZX":
                    return True
    return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = _EXIT_POLL_S) -> bool:
    """Poll `predicate` until true or timeout; return its last value."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(step_s)
    return True


def kill_process_group(pgid: int, grace_s: float) -> bool:
    """Stop every process of group `pgid`: SIGTERM, up to `grace_s` to exit, then SIGKILL.

    SIGTERM first so that train.py can write what it has (status "interrupted"); SIGKILL
    after the grace period because a hung or signal-ignoring process must not outlive
    the orchestrator's decision. Returns True if SIGKILL was needed.
    Refuses our own group, since killpg on it would kill the orchestrator itself.
    """
    check_foreign_group(pgid)
    if not signal_group(pgid, signal.SIGTERM):
        return False
    if wait_until(lambda: not group_alive(pgid), grace_s):
        return False
    log.warning("process group %d still alive %.1fs after SIGTERM; sending SIGKILL", pgid, grace_s)
    signal_group(pgid, signal.SIGKILL)
    if not wait_until(lambda: not group_alive(pgid), 5.0):
        log.error("process group %d survived SIGKILL for 5s (uninterruptible I/O?); check it with "
                  "`ps -o pid,stat,cmd -g %d`", pgid, pgid)
    return True
