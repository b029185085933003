"""nas_agent.lock: the shared flock (StudyLock's own tests are in tests/nas_agent_graph/test_lock.py)."""
import errno
import os

import pytest

from nas_agent import lock as lock_mod
from nas_agent.lock import LockHeld, RunFolderLock


def test_a_full_disk_while_writing_the_holder_record_keeps_the_lock(tmp_path, monkeypatch, caplog):
    """The record only informs a refused user: failing to write it must not stop the run."""
    def no_room(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(lock_mod.os, "fsync", no_room)
    with RunFolderLock(tmp_path / "run") as held:
        assert held.held and (tmp_path / "run" / ".lock").is_file()
        assert "holder record could not be written" in caplog.text
        monkeypatch.setattr(lock_mod.os, "fsync", os.fsync)
        with pytest.raises(LockHeld, match="is in use by another train.py"):
            RunFolderLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / ".lock").exists()
