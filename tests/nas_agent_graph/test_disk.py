"""A full disk stops the search cleanly (nas_agent_graph/disk.py): one message, exit 1, and the same
command resumes with no run lost or duplicated. Uses a small tmpfs (needs root; skipped otherwise)."""
import errno
import json
import os
import subprocess
import uuid

import pytest

from nas_agent.agent_state import load_agent_state
from nas_agent_graph.disk import disk_full_message, full_disk_error
from nas_agent_graph.launcher import launch_run
from tests.conftest import PYTHON, TINY_CONFIG, run_env
from nas_agent_graph.testing import TINY_SPACE
from tests.nas_agent_graph.test_cli import QUICK


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / f"fs_{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(mnt, leave_bytes):
    """A filler file taking all but about `leave_bytes` of the tmpfs."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return mnt / "filler"


def test_message_names_the_file_the_free_space_and_what_to_do(tmp_path):
    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "agent_state.json"))
    wrapped = RuntimeError("node failed")
    wrapped.__cause__ = err
    assert full_disk_error(wrapped) is err and full_disk_error(ValueError("x")) is None
    msg = disk_full_message(err)
    assert str(tmp_path / "agent_state.json") in msg and "free on its file system" in msg
    assert msg.endswith("Free space and run the same command to resume.")


@pytest.mark.slow  # ~26 s here
def test_a_run_whose_writes_find_the_disk_full_stops_and_reruns_after_space_is_freed(tmpfs):
    runs = tmpfs / "runs"
    runs.mkdir()
    filler = fill(tmpfs, 24 * 1024)
    with pytest.raises(OSError) as info:
        launch_run(runs / "run_0000", TINY_CONFIG, run_id="run_0000", runs_dir=runs, env=run_env(), timeout_s=300)
    assert info.value.errno == errno.ENOSPC and "run_0000" in str(info.value.filename)
    assert not (runs / "run_0000" / "metrics.json").exists()  # not recorded as the config's failure
    filler.unlink()
    result = launch_run(runs / "run_0000", TINY_CONFIG, run_id="run_0000", runs_dir=runs, env=run_env(), timeout_s=300)
    assert result.status == "ok" and result.attempt == 1


@pytest.mark.slow  # a search on a tmpfs, stopped and resumed: ~25 s
def test_a_full_runs_folder_stops_the_search_with_exit_1_and_the_same_command_completes_it(tmp_path, tmpfs):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    args = ["--max-runs", "3", "--proposer", "random", "--space", "space.json", *QUICK, "--warm-start", "off",
            "--runs-dir", str(tmpfs / "runs")]

    def search(max_runs):
        return subprocess.run([PYTHON, "-m", "nas_agent_graph", *args, "--max-runs", str(max_runs)], cwd=tmp_path,
                              env=run_env(), capture_output=True, text=True, timeout=600)

    first = search(1)
    assert first.returncode == 0, first.stderr[-3000:]
    filler = fill(tmpfs, 2 * 1024 ** 2)  # less than a run's estimate (16 MB of logs and checkpoint)
    full = search(3)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert "Free space and run the same command to resume." in full.stderr
    assert [r.run_id for r in load_agent_state(tmp_path / "agent_state.json").runs] == ["run_0000"]
    filler.unlink()
    resumed = search(3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = load_agent_state(tmp_path / "agent_state.json").runs
    assert [r.run_id for r in runs] == ["run_0000", "run_0001", "run_0002"]
    assert all(r.status == "ok" for r in runs)
