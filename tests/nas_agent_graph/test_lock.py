"""StudyLock: one orchestrator per agent_state.json; a dead holder's lock is taken over."""
import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from nas_agent_graph.lock import LockHeld, StudyLock
from tests.conftest import ROOT, run_env

HOLDER = '''
import sys, time
from pathlib import Path
from nas_agent_graph.lock import StudyLock
StudyLock(Path(sys.argv[1])).acquire()
Path(sys.argv[2]).touch()
time.sleep(600)
'''


@pytest.fixture
def state(tmp_path):
    return tmp_path / "agent_state.json"


def test_lock_file_sits_beside_the_state_and_names_us(state):
    with StudyLock(state) as lock:
        assert lock.path == state.parent / "agent_state.json.lock" and lock.held
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["hostname"] == socket.gethostname()
        assert owner["started_at"] and owner["argv"] == sys.argv
    assert not lock.path.exists() and not lock.held


def test_other_process_is_refused_until_holder_is_killed(state, tmp_path):
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state), str(ready)], cwd=ROOT, env=run_env())
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "holder did not take the lock"
            time.sleep(0.02)
        with pytest.raises(LockHeld) as refused:
            StudyLock(state).acquire()
        message = str(refused.value)
        assert f"PID {holder.pid}" in message and socket.gethostname() in message
        assert f"kill {holder.pid}" in message and "frees itself" in message
    finally:
        holder.kill()
        holder.wait()
    lock_file = state.parent / "agent_state.json.lock"
    assert json.loads(lock_file.read_text())["pid"] == holder.pid, "a SIGKILLed holder leaves its file behind"
    with StudyLock(state):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_same_process_second_lock_refused_then_reacquire_after_release(state):
    lock = StudyLock(state)
    with lock:
        with pytest.raises(LockHeld, match=f"PID {os.getpid()}"):
            StudyLock(state).acquire()
        with pytest.raises(RuntimeError, match="already held"):
            lock.acquire()
    with lock:
        assert lock.held
    with StudyLock(state):
        pass


def test_stale_garbage_lock_file_does_not_block(state):
    lock_file = state.parent / "agent_state.json.lock"
    lock_file.write_text("{not json at all, and long enough to show truncation" + "x" * 500)
    with StudyLock(state):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_refusal_message_when_holder_details_are_unreadable(state):
    lock_file = state.parent / "agent_state.json.lock"
    with open(lock_file, "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(LockHeld, match="could not be read"):
            StudyLock(state).acquire()


def test_release_leaves_a_replaced_lock_file_alone(state):
    first = StudyLock(state).acquire()
    first.path.unlink()  # someone deleted the lock file by hand; a newcomer makes a new one
    second = StudyLock(state).acquire()
    first.release()
    assert second.path.exists(), "the first holder must not remove a file it no longer holds"
    second.release()
    assert not second.path.exists()
