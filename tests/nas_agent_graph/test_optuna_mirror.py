"""runs/optuna.db mirrors agent_state.json for optuna-dashboard: a real study, a real dashboard."""
import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas_agent.agent_state import load_agent_state
from nas_agent_graph.optuna_mirror import STUDY_NAME, db_path, sync
from nas_agent_graph.search_space import load_space
from tests.conftest import TINY_CONFIG
from nas_agent_graph.testing import TINY_SPACE
from tests.nas_agent_graph.test_cli import cli, search_args


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 3-run TPE study of tiny models, run by the CLI (which keeps runs/optuna.db)."""
    folder = tmp_path_factory.mktemp("mirror")
    (folder / "config.py").write_text(TINY_CONFIG)
    (folder / "space.json").write_text(json.dumps(TINY_SPACE))
    proc = cli(folder, *search_args(3, "tpe", "--set", "training.max_epochs=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def trials_by_run(path: Path) -> dict[str, optuna.trial.FrozenTrial]:
    ostudy = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{path}")
    return {t.user_attrs["run_id"]: t for t in ostudy.trials}


def comparable(t: optuna.trial.FrozenTrial) -> dict:
    return {"state": t.state, "value": t.value, "params": t.params, "curve": t.intermediate_values,
            "attrs": t.user_attrs}


@pytest.mark.slow  # uses the module study (a 3-run CLI search)
def test_every_run_is_a_trial_with_its_params_value_curve_and_attributes(study):
    state = load_agent_state(study / "agent_state.json")
    trials = trials_by_run(study / "runs" / "optuna.db")
    assert list(trials) == [r.run_id for r in state.runs]
    space = load_space(study / "space.json")
    for run in state.runs:
        t = trials[run.run_id]
        assert t.state == TrialState.COMPLETE and t.value == pytest.approx(run.val_mse)
        assert t.params == space.from_config(run.config)
        assert list(t.intermediate_values.values()) == pytest.approx(run.extra["curve"]) and len(run.extra["curve"]) == 2
        assert t.user_attrs["proposer"] == run.proposer and t.user_attrs["test_mse"] == pytest.approx(run.test_mse)


@pytest.mark.slow  # uses the module study
def test_export_rebuilds_it_exactly(study, tmp_path):
    path = study / "runs" / "optuna.db"
    before = {k: comparable(t) for k, t in trials_by_run(path).items()}
    path.unlink()
    out = cli(study, "export-optuna")
    assert out.returncode == 0 and "3 trials" in out.stdout and "optuna-dashboard sqlite:///" in out.stdout
    assert {k: comparable(t) for k, t in trials_by_run(path).items()} == before


@pytest.mark.slow  # uses the module study
def test_a_run_in_flight_is_running_then_finished_in_place(study, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    state = load_agent_state(study / "agent_state.json")
    space = load_space(study / "space.json")
    done, last = state.runs[:2], state.runs[2]
    flying = dataclasses.replace(last, status="running", val_mse=None, test_mse=None, extra={})
    view = dataclasses.replace(state, runs=[*done, flying])
    assert sync(view, space, runs, tmp_path / "agent_state.json").startswith("built (3 trials)")
    assert trials_by_run(db_path(runs))[last.run_id].state == TrialState.RUNNING
    assert sync(state, space, runs, tmp_path / "agent_state.json") == "added 0, finished 1"
    finished = trials_by_run(db_path(runs))[last.run_id]
    assert finished.state == TrialState.COMPLETE and finished.value == pytest.approx(last.val_mse)
    assert list(finished.intermediate_values.values()) == pytest.approx(last.extra["curve"])
    # a run that drops out (interrupted, not in flight any more) gets the mirror rebuilt without it
    assert sync(dataclasses.replace(state, runs=done), space, runs, tmp_path / "agent_state.json").startswith("rebuilt")
    assert list(trials_by_run(db_path(runs))) == [r.run_id for r in done]


@pytest.mark.slow  # uses the module study
def test_a_foreign_database_is_moved_aside_and_a_corrupt_one_rebuilt(study, tmp_path, caplog):
    runs = tmp_path / "runs"
    runs.mkdir()
    state = load_agent_state(study / "agent_state.json")
    space = load_space(study / "space.json")
    optuna.create_study(study_name="someone_elses", storage=f"sqlite:///{db_path(runs)}")
    assert sync(state, space, runs, tmp_path / "agent_state.json").startswith("built")
    aside = list(runs.glob("optuna.foreign-*.db"))
    assert len(aside) == 1 and "someone_elses" in [s.study_name for s in optuna.get_all_study_summaries(
        f"sqlite:///{aside[0]}")]
    assert "moved it to" in caplog.text and len(trials_by_run(db_path(runs))) == 3
    db_path(runs).write_bytes(b"garbage " * 100)
    assert sync(state, space, runs, tmp_path / "agent_state.json").startswith("rebuilt")
    assert len(trials_by_run(db_path(runs))) == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.timeout(120)
@pytest.mark.slow  # a real optuna-dashboard server on the module study (~40 s with the study)
def test_optuna_dashboard_serves_the_study(study):
    exe = Path(sys.executable).with_name("optuna-dashboard")
    assert exe.exists() or shutil.which("optuna-dashboard"), "optuna-dashboard is in requirements.txt"
    port = _free_port()
    server = subprocess.Popen([str(exe if exe.exists() else "optuna-dashboard"),
                               f"sqlite:///{study / 'runs' / 'optuna.db'}", "--host", "127.0.0.1",
                               "--port", str(port), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                summaries = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
                time.sleep(0.3)
        assert [s["study_name"] for s in summaries] == [STUDY_NAME]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}?after=0")
        served = {next(a["value"] for a in t["user_attrs"] if a["key"] == "run_id"): t for t in detail["trials"]}
        state = load_agent_state(study / "agent_state.json")
        assert list(served) == [r.run_id for r in state.runs]
        for run in state.runs:
            t = served[run.run_id]
            assert t["state"] == "Complete" and t["values"] == [pytest.approx(run.val_mse)]
            assert [v["value"] for v in t["intermediate_values"]] == pytest.approx(run.extra["curve"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_agent_state_of_the_original_format_exports(tmp_path):
    """The original README's agent_state.json: no config, no curve; each run is still a trial."""
    (tmp_path / "agent_state.json").write_text(json.dumps({
        "max_runs": 100, "best_run_id": "run_0000",
        "runs": [{"run_id": "run_0000", "val_mse": 0.1855, "test_mse": 0.1923,
                  "history_summary": "20 epochs, best_epoch=17...", "accepted": True}]}))
    out = cli(tmp_path, "export-optuna")
    assert out.returncode == 0 and "1 trials" in out.stdout, out.stderr
    trial = trials_by_run(tmp_path / "runs" / "optuna.db")["run_0000"]
    assert trial.state == TrialState.COMPLETE and trial.value == 0.1855 and trial.params == {}


def _runs(n: int, running: int | None = None) -> list:
    """n runs without configs (trials without params), the one at index `running` still in flight."""
    from nas_agent.agent_state import RunInfo
    return [RunInfo(run_id=f"run_{i:04d}", status="running" if i == running else "ok",
                    val_mse=None if i == running else 1.0 / (i + 1), extra={"curve": [1.5, 1.0 / (i + 1)]})
            for i in range(n)]


def test_the_searchs_mirror_writes_only_the_change_and_rereads_a_file_changed_behind_it(tmp_path, monkeypatch):
    from nas_agent.agent_state import AgentState
    from nas_agent_graph import optuna_mirror
    from nas_agent_graph.optuna_mirror import Mirror

    runs, state_path = tmp_path / "runs", tmp_path / "agent_state.json"
    runs.mkdir()
    space = load_space(None)
    mirror = Mirror(runs, state_path, space)
    assert mirror.sync(AgentState(runs=_runs(1, running=0))) == "built (1 trials)"
    reads = []
    monkeypatch.setattr(optuna_mirror, "_owner", lambda storage: reads.append(1) or str(state_path.resolve()))
    for n in range(1, 4):  # each run: launched (running), then recorded
        assert mirror.sync(AgentState(runs=_runs(n))) == "added 0, finished 1"
        assert mirror.sync(AgentState(runs=_runs(n + 1, running=n))) == "added 1, finished 0"
    assert reads == []  # the file was the one it left: no owner check, no read-back
    trials = trials_by_run(db_path(runs))
    assert [t.state for t in trials.values()] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]
    assert trials["run_0002"].value == pytest.approx(1 / 3) and trials["run_0002"].intermediate_values == \
        {1: 1.5, 2: pytest.approx(1 / 3)}
    # someone else rebuilt the file (export-optuna): the next sync reads it and checks its owner again
    optuna_mirror.rebuild(AgentState(runs=_runs(3)), space, db_path(runs), state_path)
    assert mirror.sync(AgentState(runs=_runs(4, running=3))) == "added 1, finished 0" and reads == [1]
    assert mirror.sync(AgentState(runs=_runs(4))) == "added 0, finished 1" and reads == [1]
    assert {k: comparable(t) for k, t in trials_by_run(db_path(runs)).items()} == \
        {k: comparable(t) for k, t in _fresh(tmp_path / "fresh", _runs(4), space).items()}


def _fresh(folder: Path, runs: list, space) -> dict:
    from nas_agent.agent_state import AgentState
    folder.mkdir()
    sync(AgentState(runs=runs), space, folder, folder / "agent_state.json")
    return trials_by_run(db_path(folder))
