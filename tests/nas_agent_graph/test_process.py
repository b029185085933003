"""The process layer: a child that outlives its timeout is stopped with everything it started."""
import subprocess
import sys
import time

import pytest

from nas_agent_graph.process import pid_alive, run_child

# A child that starts a grandchild in its own process group, reports its pid, and then hangs.
SCRIPT = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def test_a_timeout_stops_the_whole_group_and_the_output_so_far_is_kept(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        start = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            run_child([sys.executable, "-c", SCRIPT], timeout_s=3, stdout=f, grace_s=2)
    assert time.monotonic() - start < 30
    grandchild = int(out.read_text().split()[0])
    deadline = time.monotonic() + 10
    while pid_alive(grandchild) and time.monotonic() < deadline:  # killed, maybe not yet reaped by init
        time.sleep(0.1)
    assert not pid_alive(grandchild), "subprocess.run's timeout would have left the grandchild running"


def test_a_child_that_ends_returns_its_code_and_text_output():
    proc = run_child([sys.executable, "-c", "import os, sys; print(os.getpgrp() == os.getpid()); sys.exit(3)"],
                     timeout_s=60)
    assert proc.returncode == 3 and proc.stdout.strip() == "True"  # its own process group
