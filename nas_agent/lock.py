"""One writer per resource: an exclusive, non-blocking flock(2) on a lock file.

Used for a study's agent_state.json (one orchestrator, nas_agent_graph.lock.StudyLock) and for
a run folder (one train.py, RunFolderLock). The kernel releases an flock when the holding
process exits in any way, SIGKILL and crashes included, so a lock file left behind by a dead
process never blocks anyone and needs no manual cleanup. The file's content (PID, host, start
time, argv) is only there to tell a refused user who holds the lock.

flock is per open file description: a second lock on the same file in the same process is
refused too, and the descriptor is not inherited by children (Python opens it close-on-exec),
so a child process never keeps the lock alive. flock on network file systems may be local to
one host; keep studies and runs on a local disk.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from nas_agent.run_folder import LOCK_FILE

log = logging.getLogger(__name__)

_MAX_TRIES = 5  # re-opens after losing a race with a releasing holder that unlinked the file


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it and what to do."""


class ExclusiveLock:
    """Exclusive, non-blocking lock guarding `resource` through the file `path`; use as
    `with ExclusiveLock(...):`. `holder` names the kind of process that takes it, for messages."""

    def __init__(self, path: Path, resource: Path, holder: str):
        self.path = Path(path)
        self.resource = Path(resource)
        self.holder = holder
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ExclusiveLock:
        """Take the lock or raise LockHeld at once (never wait: the user should know now)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this lock is already held; release it before acquiring again")
        for _ in range(_MAX_TRIES):
            fd = self._open_locked()
            if self._still_linked(fd):
                self._fd = fd
                try:
                    self._write_owner()
                except OSError as exc:  # a full disk, say: the record only informs a refused user
                    log.warning("%s: held, but its holder record could not be written (%s)", self.path, exc)
                except BaseException:
                    self.release()  # no `with` body will run, so nothing else would release it
                    raise
                log.debug("%s: acquired", self.path)
                return self
            os.close(fd)  # the holder removed the file while we waited on it; try the new one
        raise LockHeld(f"{self.path}: could not lock the file after {_MAX_TRIES} tries, other processes keep "
                       f"re-creating it; check which {self.holder} processes are running on {self.resource}")

    def release(self) -> None:
        """Remove the lock file (only while still holding it), then unlock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._still_linked(fd):
                self.path.unlink()
        except OSError as exc:
            log.warning("%s: could not remove the lock file (%s); it is harmless and may be deleted", self.path, exc)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        log.debug("%s: released", self.path)

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _open_locked(self) -> int:
        """Open (create) the lock file and flock it; LockHeld naming the holder if taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_owner(fd)
            os.close(fd)
            raise LockHeld(self._held_message(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _still_linked(self, fd: int) -> bool:
        """True if `fd` is still the file at self.path.

        A releasing holder unlinks the file before unlocking; a process that opened the
        old file just before would otherwise lock an orphaned inode while a third one
        locks a new file at the same path: two holders.
        """
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _write_owner(self) -> None:
        """Replace the file's content with who we are, fsynced, for the next refused user."""
        owner = {"pid": os.getpid(), "hostname": socket.gethostname(),
                 "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "argv": sys.argv}
        data = (json.dumps(owner, indent=2) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _held_message(self, holder: dict | None) -> str:
        """The refusal text: who holds the resource and how to proceed."""
        if holder is None:
            who = f"another {self.holder} (its PID could not be read from the lock file; it may be starting)"
            kill = f"stop that {self.holder}"
        else:
            pid, host = holder.get("pid", "?"), holder.get("hostname", "?")
            who = f"another {self.holder}: PID {pid} on host {host}, started {holder.get('started_at', '?')}"
            kill = f"stop that {self.holder} (kill {pid}" + ("" if host == socket.gethostname() else f" on {host}") + ")"
        return (f"{self.resource} is in use by {who} (lock file {self.path}). To proceed, {kill} or wait for "
                "it; the lock frees itself when it exits.")


def _read_owner(fd: int) -> dict | None:
    """The holder's record from the lock file; None if empty or unreadable (it may be mid-write)."""
    try:
        data = os.pread(fd, 64 * 1024, 0)
        owner = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


class RunFolderLock(ExclusiveLock):
    """One train.py per run folder: the lock file is the folder's hidden `.lock`, there only
    while a train.py runs. Two writers would mix their epochs into one history.json and one
    resume state (a reproduction started twice, or a --resume beside a live run)."""

    def __init__(self, run_dir: Path):
        super().__init__(Path(run_dir) / LOCK_FILE, resource=Path(run_dir), holder="train.py")
