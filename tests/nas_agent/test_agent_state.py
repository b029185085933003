"""Tests for nas_agent.agent_state: schema, invariants, crash-safe saving."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nas_agent.agent_state import (
    STATE_VERSION, AgentState, AgentStateError, RunInfo, add_rejected, add_run,
    backup_path_for, get_best_run, get_recent_runs, get_run, load_agent_state, replace_run,
    save_agent_state,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(i: int, **overrides) -> RunInfo:
    fields = dict(run_id=f"run_{i:04d}", status="ok", val_mse=0.5 - 0.01 * i, val_mae=0.6,
                  test_mse=0.55, test_mae=0.65, history_summary=f"Ran {i + 1} epochs.",
                  accepted=False, reason="worse than best", proposer="llm",
                  config={"model": {"d_model": 64 + i, "layers": [1, 2]}, "lr": 1e-3},
                  parent_run_id=None, started_at="2025-01-31T12:00:00+00:00",
                  duration_s=12.5, error_tail=None)
    fields.update(overrides)
    return RunInfo(**fields)


def _state_with_runs() -> AgentState:
    state = AgentState(max_runs=10, meta={"seed": 0, "proposer": "llm",
                                          "created_at": "2025-01-31T12:00:00+00:00"})
    add_run(state, _run(0, accepted=True, reason="first run"))
    add_run(state, _run(1, status="diverged", val_mse=float("nan"), val_mae=float("inf"),
                        test_mse=None, test_mae=None, error_tail="Loss is NaN",
                        parent_run_id="run_0000"))
    add_run(state, _run(2, accepted=True, reason="improved val_mse", parent_run_id="run_0000",
                        extra={"llm": {"model": "x", "tokens": 123}}))
    add_run(state, _run(3, status="failed", val_mse=None, error_tail="ValueError: bad"))
    add_rejected(state, attempt=5, proposer="llm", config="not a dict", error="not a config")
    return state


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _valid_dict() -> dict:
    return json.loads(json.dumps(_state_with_runs().to_dict()))


# --------------------------------------------------------------------------- round trip

def test_missing_file_gives_fresh_state_without_creating_it(tmp_path):
    path = tmp_path / "agent_state.json"
    state = load_agent_state(path)
    assert state == AgentState()
    assert state.version == STATE_VERSION and state.runs == [] and state.best_run_id is None
    assert not path.exists()


def test_round_trip_with_nan_metric(tmp_path):
    path = tmp_path / "agent_state.json"
    state = _state_with_runs()
    save_agent_state(state, path)
    loaded = load_agent_state(path)
    assert [r.run_id for r in loaded.runs] == ["run_0000", "run_0001", "run_0002", "run_0003"]
    assert loaded.runs[1].val_mse is None and loaded.runs[1].val_mae is None
    assert loaded.runs[1].status == "diverged"
    assert loaded.best_run_id == "run_0002"
    assert loaded.runs[2].extra == {"llm": {"model": "x", "tokens": 123}}
    assert loaded.runs[0] == state.runs[0]
    assert loaded.rejected[0]["config"] == "not a dict"
    assert loaded.meta == state.meta and loaded.max_runs == 10
    text = path.read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))


def test_save_keeps_previous_version_as_bak(tmp_path):
    path = tmp_path / "agent_state.json"
    state = AgentState()
    add_run(state, _run(0, accepted=True))
    save_agent_state(state, path)
    assert not backup_path_for(path).exists()
    add_run(state, _run(1))
    save_agent_state(state, path)
    assert len(load_agent_state(path).runs) == 2
    assert len(load_agent_state(backup_path_for(path)).runs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent_state.json",
                                                          "agent_state.json.bak"]


# --------------------------------------------------------------------------- corrupt files

def test_corrupt_json_error_names_path_and_line_and_leaves_file_alone(tmp_path):
    path = tmp_path / "agent_state.json"
    save_agent_state(_state_with_runs(), path)
    text = path.read_text(encoding="utf-8")
    broken = text[: len(text) // 2]  # truncated mid-way, as after a bad manual edit
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(AgentStateError) as info:
        load_agent_state(path)
    message = str(info.value)
    assert str(path) in message
    assert "invalid JSON at line" in message and "column" in message
    assert "no .bak backup exists" in message
    with pytest.raises(AgentStateError, match="refusing to overwrite"):
        save_agent_state(AgentState(), path)
    assert path.read_text(encoding="utf-8") == broken


def test_corrupt_json_error_suggests_restoring_bak(tmp_path):
    path = tmp_path / "agent_state.json"
    save_agent_state(AgentState(), path)
    save_agent_state(_state_with_runs(), path)
    path.write_text("{\n  \"version\": 1,\n  oops\n}", encoding="utf-8")
    with pytest.raises(AgentStateError, match="line 3, column 3") as info:
        load_agent_state(path)
    assert f"cp {path}.bak {path}" in str(info.value)


def test_empty_and_non_utf8_files(tmp_path):
    path = tmp_path / "agent_state.json"
    path.write_text("", encoding="utf-8")
    with pytest.raises(AgentStateError, match="the file is empty"):
        load_agent_state(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(AgentStateError, match="not UTF-8"):
        load_agent_state(path)


# --------------------------------------------------------------------------- schema errors

def _load_error(tmp_path, data) -> str:
    path = tmp_path / "agent_state.json"
    _write(path, data)
    before = path.read_bytes()
    with pytest.raises(AgentStateError) as info:
        load_agent_state(path)
    assert path.read_bytes() == before
    assert str(path) in str(info.value)
    return str(info.value)


def test_wrong_type_names_run_index_and_field(tmp_path):
    data = _valid_dict()
    data["runs"][3]["val_mse"] = "abc"
    assert "runs[3].val_mse: expected a number or null, got 'abc'" in _load_error(tmp_path, data)


@pytest.mark.parametrize("field, value, expected", [
    ("status", "done", "runs[1].status: unknown status 'done'; expected one of ok"),
    ("accepted", "yes", "runs[1].accepted: expected true or false, got 'yes'"),
    ("config", [1], "runs[1].config: expected an object, got [1]"),
    ("started_at", "yesterday", "runs[1].started_at: expected an ISO-8601 timestamp"),
    ("run_id", "", "runs[1].run_id: expected a non-empty string"),
    ("val_mae", True, "runs[1].val_mae: expected a number or null, got True"),
])
def test_field_type_errors(tmp_path, field, value, expected):
    data = _valid_dict()
    data["runs"][1][field] = value
    assert expected in _load_error(tmp_path, data)


def test_missing_and_unknown_fields(tmp_path):
    data = _valid_dict()
    del data["runs"][0]["val_mse"]  # a key of the original nas_system's format: required
    assert "runs[0]: missing field(s) val_mse" in _load_error(tmp_path, data)
    data = _valid_dict()
    data["runs"][0]["val_mes"] = 0.3
    assert "runs[0]: unknown field(s) 'val_mes'" in _load_error(tmp_path, data)
    data = _valid_dict()
    del data["runs"][0]["extra"]  # optional: older writers may omit it
    path = tmp_path / "ok.json"
    _write(path, data)
    assert load_agent_state(path).runs[0].extra == {}


def test_duplicate_run_id(tmp_path):
    data = _valid_dict()
    data["runs"][3]["run_id"] = "run_0001"
    message = _load_error(tmp_path, data)
    assert "runs[3].run_id: duplicate run_id 'run_0001' (already used by runs[1])" in message


def test_best_run_id_must_exist(tmp_path):
    data = _valid_dict()
    data["best_run_id"] = "run_0099"
    assert "best_run_id: 'run_0099' does not name any run" in _load_error(tmp_path, data)


def test_best_run_id_must_be_accepted(tmp_path):
    data = _valid_dict()
    data["best_run_id"] = "run_0001"
    assert "best_run_id: run 'run_0001' (runs[1]) has accepted=false" in \
        _load_error(tmp_path, data)


def test_newer_version_refused(tmp_path):
    data = _valid_dict()
    data["version"] = STATE_VERSION + 1
    message = _load_error(tmp_path, data)
    assert f"schema version {STATE_VERSION + 1}, written by a newer nas_agent" in message
    assert "Upgrade nas_agent" in message


def test_bad_rejected_entry_and_top_level(tmp_path):
    data = _valid_dict()
    data["rejected"][0]["attempt"] = "five"
    assert "rejected[0].attempt: expected an integer >= 0" in _load_error(tmp_path, data)
    assert "top level: expected an object" in _load_error(tmp_path, [1, 2])
    data = _valid_dict()
    data["max_runs"] = 0
    assert "max_runs: expected an integer >= 1 or null, got 0" in _load_error(tmp_path, data)


def test_save_validates_in_memory_state(tmp_path):
    path = tmp_path / "agent_state.json"
    state = _state_with_runs()
    state.best_run_id = "run_0003"
    with pytest.raises(AgentStateError, match="cannot save agent state to .*accepted=false"):
        save_agent_state(state, path)
    state = _state_with_runs()
    state.runs[0].config["path"] = Path("/data")
    with pytest.raises(AgentStateError, match=r"runs\[0\]\.config\.path: a value of type"):
        save_agent_state(state, path)
    assert not path.exists()


def test_run_from_dict_direct_error():
    d = _run(0).to_dict()
    d["duration_s"] = "long"
    with pytest.raises(AgentStateError, match=r"^run\.duration_s: expected a number"):
        RunInfo.from_dict(d)


# --------------------------------------------------------------------------- helpers

def test_add_get_replace():
    state = AgentState()
    add_run(state, _run(0, accepted=True))
    add_run(state, _run(1))
    assert add_run(state, _run(2, accepted=True)) is state
    assert get_best_run(state).run_id == "run_0002"
    assert get_run(state, "run_0001").run_id == "run_0001" and get_run(state, "nope") is None
    assert [r.run_id for r in get_recent_runs(state, 2)] == ["run_0001", "run_0002"]
    assert len(get_recent_runs(state, 10)) == 3 and get_recent_runs(state, 0) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        get_recent_runs(state, -1)
    with pytest.raises(ValueError, match="run_id 'run_0001' is already in the state"):
        add_run(state, _run(1))
    replace_run(state, _run(2, accepted=False, reason="finalised: worse"))
    assert state.best_run_id == "run_0000"
    assert get_run(state, "run_0002").reason == "finalised: worse"
    replace_run(state, _run(1, accepted=True))
    assert state.best_run_id == "run_0001"
    replace_run(state, _run(0, accepted=True, reason="re-scored"))
    assert state.best_run_id == "run_0001"  # a later accepted run stays the best
    with pytest.raises(ValueError, match="run_id 'run_0042' is not in the state"):
        replace_run(state, _run(42))
    assert get_best_run(AgentState()) is None


# --------------------------------------------------------------------------- crash safety

@pytest.mark.parametrize("failing_call", [1, 2])
def test_failed_replace_mid_save_keeps_old_file(tmp_path, monkeypatch, failing_call):
    """Call 1 publishes the .bak, call 2 the new state; either failing keeps the old one."""
    path = tmp_path / "agent_state.json"
    old = _state_with_runs()
    save_agent_state(old, path)
    before = path.read_bytes()
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("simulated crash in os.replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    new = _state_with_runs()
    add_run(new, _run(4))
    with pytest.raises(OSError, match="simulated crash"):
        save_agent_state(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert len(load_agent_state(path).runs) == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    save_agent_state(new, path)  # the next save works normally
    assert len(load_agent_state(path).runs) == 5


_CHILD = textwrap.dedent("""
    import sys
    from nas_agent.agent_state import AgentState, RunInfo, add_run, save_agent_state

    path = sys.argv[1]
    i = 0
    while True:
        n = i % 40 + 1
        state = AgentState(meta={"writer": "crash-test"})
        for j in range(n):
            add_run(state, RunInfo(
                run_id=f"run_{j:04d}", status="ok", val_mse=1.0 / (j + 1),
                accepted=j % 3 == 0, history_summary="x" * 500,
                config={"j": j, "payload": list(range(50))},
                started_at="2025-01-31T12:00:00+00:00"))
        save_agent_state(state, path)
        if i == 0:
            print("saved", flush=True)
        i += 1
""")


def _assert_complete(state: AgentState, label: str) -> None:
    """A state written by _CHILD: contiguous runs whose content is all there."""
    n = len(state.runs)
    assert 1 <= n <= 40, label
    assert [r.run_id for r in state.runs] == [f"run_{j:04d}" for j in range(n)], label
    assert all(r.config == {"j": j, "payload": list(range(50))}
               for j, r in enumerate(state.runs)), label
    assert state.best_run_id == f"run_{(n - 1) // 3 * 3:04d}", label
    assert state.meta == {"writer": "crash-test"}, label


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_sigkill_during_saves_never_leaves_a_broken_state(tmp_path):
    path = tmp_path / "agent_state.json"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    env = dict(os.environ)
    leftovers = set()
    for attempt in range(20):
        label = f"attempt {attempt} (seed {seed})"
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line == "saved\n", f"{label}: child failed: {child.stderr.read()}"
            child.stdout.close()
            time.sleep(rng.uniform(0.0, 0.15))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL, f"{label}: child exited by itself"
        _assert_complete(load_agent_state(path), label)
        bak = backup_path_for(path)
        if bak.exists():
            _assert_complete(load_agent_state(bak), label + " (.bak)")
        for p in tmp_path.iterdir():
            if p.name not in ("agent_state.json", "agent_state.json.bak"):
                assert p.name.startswith(".agent_state.json.") and p.name.endswith(".tmp"), \
                    f"{label}: unexpected file {p.name}"
                leftovers.add(p.name)
    # Temp files left behind prove some kills landed inside a save (the case under test).
    assert leftovers, f"no kill interrupted a save (seed {seed}); the test proved nothing"


# --------------------------------------------------------------------------- the original nas_system's API

def test_readme_state_snippet_in_a_fresh_directory(tmp_path, monkeypatch):
    """The README's agent_state example, as written: no paths, RunInfo without a status."""
    monkeypatch.chdir(tmp_path)
    from nas_agent import (
        load_agent_state, save_agent_state, add_run,
        get_best_run, get_recent_runs, RunInfo
    )

    state = load_agent_state()
    run_info = RunInfo(
        run_id="run_0000",
        val_mse=0.185,
        test_mse=0.192,
        history_summary="...",
        accepted=True
    )
    state = add_run(state, run_info)
    save_agent_state(state)

    best = get_best_run(state)
    assert f"Best: {best.run_id}, MSE: {best.val_mse}" == "Best: run_0000, MSE: 0.185"
    recent = get_recent_runs(state, k=5)
    assert [r.run_id for r in recent] == ["run_0000"] and run_info.status == "ok"
    saved = json.loads((tmp_path / "agent_state.json").read_text())
    assert saved["best_run_id"] == "run_0000" and saved["runs"][0]["accepted"] is True
    assert load_agent_state().runs[0].test_mse == 0.192  # read back from ./agent_state.json


def test_agent_state_file_of_the_original_format_loads(tmp_path):
    """The README's agent_state.json: no version, rejected or meta; runs with five fields. (The README's
    example names run_0003 as best but lists only run_0000, an excerpt; here the lists agree.)"""
    path = tmp_path / "agent_state.json"
    path.write_text(json.dumps({
        "max_runs": 100,
        "best_run_id": "run_0000",
        "runs": [{"run_id": "run_0000", "val_mse": 0.1855, "test_mse": 0.1923,
                  "history_summary": "20 epochs, best_epoch=17...", "accepted": True}],
    }))
    state = load_agent_state(path)
    run = get_best_run(state)
    assert (state.version, state.max_runs, state.rejected, state.meta) == (STATE_VERSION, 100, [], {})
    assert (run.run_id, run.status, run.val_mse, run.test_mse, run.accepted) == ("run_0000", "ok", 0.1855,
                                                                                 0.1923, True)
    add_run(state, RunInfo(run_id="run_0001", val_mse=0.2, test_mse=0.21, history_summary="", accepted=False))
    save_agent_state(state, path)  # saved with every key, and the original keys as they were
    again = json.loads(path.read_text())
    assert again["runs"][0]["history_summary"] == "20 epochs, best_epoch=17..." and len(again["runs"]) == 2
