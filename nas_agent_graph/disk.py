"""A full disk stops the search cleanly: one message, exit 1, and the same command resumes.

Every file the search reads back is written atomically (nas_agent/atomic.py), and the checkpoint
database commits or rolls back, so a failed write leaves the previous version whole; what is lost
is only the write itself, which a resumed search redoes. So a write refused for lack of space
(ENOSPC, EDQUOT) is not a crash to debug but a condition to report: what could not be written,
where, how much space is free, and what to do.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from nas_agent.run_manager import LOG_ALLOWANCE_BYTES, run_size_estimate  # noqa: F401 - shared with train.py

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What a child (train.py) prints when its own write failed for lack of space.
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


class NotEnoughSpace(OSError):
    """Refused before starting a run: its checkpoint and logs would not fit."""


def full_disk_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `exc` (itself, or in its cause/context chain), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def mentions_full_disk(text: str | None) -> bool:
    return bool(text) and any(t in text for t in FULL_TEXTS)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding `path` (its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full_message(err: OSError) -> str:
    """The one message the search stops with."""
    where = err.filename or "(unknown file)"
    reason = err.strerror or os.strerror(err.errno or errno.ENOSPC)
    return (f"error: could not write {where}: {reason}; {human(free_bytes(where))} free on its file system. "
            "Nothing already written was damaged. Free space and run the same command to resume.")


def check_room_for_run(run_dir: Path, n_params: int | None) -> None:
    """Raise NotEnoughSpace (an ENOSPC OSError naming run_dir) when the run would not fit."""
    need, free = run_size_estimate(n_params), free_bytes(run_dir)
    if free is not None and free < need:
        raise NotEnoughSpace(errno.ENOSPC, f"not enough free space to start the run: it needs about {human(need)} "
                                           f"({n_params or 0:,} parameters, checkpoint and logs)", str(run_dir))
