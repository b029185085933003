"""Crash-safe file writes shared by the state and run-logging modules.

A search runs for hours and may be killed at any moment (Ctrl-C, OOM killer, a
lost SSH session). A half-written agent_state.json or metrics.json would make the
search unrecoverable or, worse, silently forget runs. So every file that other
code reads back is written whole to a temporary file in the same directory,
flushed to disk, and renamed over the target: readers see either the old or the
new version, never a mixture.

Temporary files are named `.<target name>.<random>.tmp` (hidden, with a `.tmp`
suffix) so that nothing that looks for the target name can pick one up. One left
behind by a process killed mid-write is harmless debris and may be deleted.

JSON written here is strict (no NaN/Infinity literals, which many JSON readers
reject). Diverged runs legitimately produce NaN metrics, so `to_jsonable` maps
non-finite floats to null instead of failing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_JSON_SCALARS = (str, int, bool, type(None))


def to_jsonable(obj: Any, where: str = "$") -> Any:
    """Return a copy of `obj` made only of JSON types, with NaN/inf floats as None.

    Tuples become lists (JSON has no tuples). Anything else that JSON cannot hold
    raises TypeError naming where it sits (e.g. `$.runs[2].config.path`), because
    a bare "Object of type PosixPath is not JSON serializable" does not say which
    of thousands of values is at fault.
    """
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, _JSON_SCALARS):
        return obj
    if isinstance(obj, dict):
        return {_json_key(k, where): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: a value of type {type(obj).__name__} ({_short_repr(obj)}) cannot be "
        "written as JSON; convert it to a str, number, bool, None, list or dict first"
    )


def _json_key(key: Any, where: str) -> Any:
    """Check a dict key is one json.dumps accepts, so the error names its location."""
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(
        f"{where}: dict key {_short_repr(key)} of type {type(key).__name__} cannot be "
        "written as JSON; use str keys"
    )


def _short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to `limit` characters so error messages stay readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dumps_json(obj: Any) -> str:
    """Serialise to strict, indented JSON with a trailing newline (diff- and cat-friendly)."""
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"


def atomic_write_text(path: str | os.PathLike, text: str, *,
                      backup_path: str | os.PathLike | None = None) -> None:
    """Replace `path` with `text` so that a crash leaves either the old or the new file.

    Steps: write a temp file in the same directory (a rename is only atomic
    within one file system), fsync it, rename it onto `path`, fsync the
    directory so the rename itself survives a power cut.

    If `backup_path` is given and `path` exists, the current file is first
    published as `backup_path`, also by an atomic rename, so at every instant
    `path` holds a complete version and `backup_path` holds a complete older one.
    The temp file is removed if anything fails.
    """
    target = Path(path)
    try:
        tmp = _write_temp(target, text)
    except OSError as exc:
        if exc.errno is not None:  # name the file being written (a full disk's message), not its temp
            exc.filename = str(target)
        raise
    try:
        if backup_path is not None and target.exists():
            _snapshot(target, Path(backup_path))
        os.replace(tmp, target)
    except BaseException:
        _remove_if_present(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, *,
                      backup_path: str | os.PathLike | None = None) -> None:
    """Write `obj` as strict JSON (non-finite floats as null) via `atomic_write_text`."""
    atomic_write_text(path, dumps_json(obj), backup_path=backup_path)


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one JSON line and fsync, so logged samples survive a crash.

    Appending is not atomic like a rename, but a crash can only truncate the
    last line, which line-by-line readers can detect and skip. A torn last line
    is closed with a newline first, so it cannot swallow the new record.
    """
    line = json.dumps(to_jsonable(record), allow_nan=False) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _temp_name(target: Path) -> Path:
    """A fresh hidden name next to `target` that cannot be mistaken for it."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


def _write_temp(target: Path, text: str) -> Path:
    """Write `text` to a new temp file beside `target`, fsynced; return its path.

    O_EXCL guarantees we never clobber another file; the 0o666 mode lets the
    user's umask decide permissions, as for any ordinary file.
    """
    tmp = _temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_if_present(tmp)
        raise
    return tmp


def _snapshot(src: Path, dst: Path) -> None:
    """Atomically make `dst` a complete copy of `src`, leaving `src` untouched.

    A hard link costs nothing and is complete the moment it exists; where the
    file system refuses links we fall back to a fsynced copy. Either way the
    copy gets a temp name first and is renamed onto `dst`, so `dst` is never
    half-written.
    """
    tmp = _temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError as exc:
            log.debug("hard link %s -> %s failed (%s); copying instead", src, tmp, exc)
            _copy_fsynced(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        _remove_if_present(tmp)
        raise
    if dst.parent.resolve() != src.parent.resolve():
        _fsync_dir(dst.parent)


def _copy_fsynced(src: Path, dst: Path) -> None:
    """Copy bytes from `src` to a new file `dst` and fsync it."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so renames in it are durable (POSIX only; no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_present(path: Path) -> None:
    """Delete a temp file during cleanup; a failure is logged, not raised, so the
    original error (the one the caller needs to see) is what propagates."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s; delete it by hand", path, exc)
