"""bench/device_check.py, the prepared GPU check: its parts here, and its whole dry run (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, load_bench_script, run_env

SCRIPT = ROOT / "bench" / "device_check.sh"
dc = load_bench_script("device_check")


def test_cpu_references_come_from_the_results_files():
    """The CPU columns are read from bench/results, never typed into the script."""
    assert dc.amp_parity_sets() == ["training.max_epochs=3"]
    default = dc.cpu_reference(dc.SOLO[0])
    assert default["samples_s"] == "107" and default["val"].startswith("1.0443")  # train_speed.md, bf16 column
    itransformer = dc.cpu_reference(dc.SOLO[2])
    assert itransformer["val"] == "0.6910" and itransformer["test"].startswith("0.3858")
    assert dc.run_sets(dc.SOLO[2]) == ["training.amp=True"]  # reproduce.md ran the paper settings


def test_every_run_has_a_reference_and_a_distinct_tag():
    runs = dc.SOLO + dc.PAIR
    assert len({r.tag for r in runs}) == len(runs)
    for run in runs:
        assert dc.cpu_reference(run)["val"] != "–", run


def _importtime_log(tmp_path: Path, lines: list[tuple[int, str]]) -> Path:
    """A log as `python -X importtime` writes it: each module after the ones it imported."""
    log = tmp_path / "child.log"
    log.write_text("some training output\n" + "".join(
        f"import time: {10:>9} | {20:>10} | {' ' * 2 * depth}{name}\n" for depth, name in lines))
    return log


def test_import_edges_name_the_importing_package(tmp_path):
    log = _importtime_log(tmp_path, [(2, "colorlog.formatter"), (1, "colorlog"), (1, "optuna.distributions"),
                                     (0, "optuna"), (0, "pydantic")])
    assert dc.import_edges(log) == {("colorlog", "optuna"), ("optuna", None), ("pydantic", None)}


def test_a_package_left_behind_is_found_unless_only_the_image_imports_it(tmp_path):
    image = {"torch"}
    # colorlog is imported by optuna, which travels: colorlog must travel too.
    log = _importtime_log(tmp_path, [(1, "colorlog"), (0, "optuna"), (0, "torch")])
    ok, detail = dc.classify_imports([log], image, carried={"optuna"})
    assert not ok and "colorlog (by ['optuna'])" in detail
    assert dc.classify_imports([log], image, carried={"optuna", "colorlog"})[0]
    # Imported by an image package only (another version here): the image's own needs decide.
    log = _importtime_log(tmp_path, [(1, "colorlog"), (0, "torch")])
    ok, detail = dc.classify_imports([log], image, carried=set())
    assert ok and "colorlog by torch" in detail
    # Imported by the project's code (no distribution): it must travel.
    log = _importtime_log(tmp_path, [(1, "colorlog"), (0, "nas_agent")])
    assert not dc.classify_imports([log], image, carried=set())[0]


def test_a_failing_llm_step_is_named(monkeypatch, tmp_path, capsys):
    def broken(device, work, res):
        res.update(device=device, stage="NF4 load")
        raise RuntimeError("no kernel")

    monkeypatch.setattr(dc, "llm_part", broken)
    assert dc.llm_child("cpu", tmp_path) == 1
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["error"] == "NF4 load: RuntimeError: no kernel"
    assert dc.llm_lines(res)[0].startswith("LLM path on cpu: FAILED: NF4 load: RuntimeError")


def test_the_run_call_fits_the_device_tool():
    call = dc.run_call()
    assert len(call["command"]) <= dc.COMMAND_LIMIT and len(call["carry"]) <= dc.CARRY_PATHS_LIMIT
    assert call["timeout_s"] <= 480 and dc.BUDGET_S < call["timeout_s"]  # the issue: under 8 minutes there
    for folder in call["carry"]:  # carried folders are ignored, so wheels and data are never committed
        # a file inside, since "folder/" patterns match only folders, and a fresh clone has none yet
        assert subprocess.run(["git", "check-ignore", "-q", f"{folder}/x.whl"], cwd=ROOT).returncode == 0, folder


def test_the_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.slow
def test_dry_run_is_ready_and_reports_what_travels():
    """The whole rehearsal on the CPU: --prepare fills .whl/ (from the package index, once; later
    runs find the wheels there) and .devdata/, then --dry-run trains 2 steps of every planned run
    and runs the NF4 LLM path. About 2 minutes on 2 busy cores."""
    proc = subprocess.run(["bash", str(SCRIPT), "--prepare", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, env=run_env(PYTHON=sys.executable), timeout=580)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "READY for the GPU" in out
    travels = next(line for line in out.splitlines() if line.startswith("| what travels |"))
    assert "| ok |" in travels and "MiB of 64.0 MiB" in travels
    assert "| imports there | ok |" in out and "LLM path on cpu: ok" in out
    call = json.loads(out.strip().splitlines()[-1])
    assert call == dc.run_call()
