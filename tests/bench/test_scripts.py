"""Every benchmark script starts: `python bench/NAME.py --help` imports what it needs, run the way
its docstring says (bench/ is a folder of scripts, so a sibling is imported by its bare name)."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ROOT

SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


def test_every_bench_script_runs_its_help():
    def help_of(script):
        return script.name, subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                           cwd=ROOT, timeout=120)
    assert len(SCRIPTS) >= 10
    with ThreadPoolExecutor(2) as pool:
        failed = {name: proc.stderr.strip().splitlines()[-1:] for name, proc in pool.map(help_of, SCRIPTS)
                  if proc.returncode != 0}
    assert failed == {}
