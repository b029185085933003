"""Graph wiring and logic: routers, the mermaid snapshot, and the validate/retry/stop paths.

The graph-logic tests use a scripted fake proposer (the only fake here); validation,
smoke tests and training are real subprocesses on a tiny config.
"""
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nas_agent.agent_state import load_agent_state
from nas_agent.config import parse_config_source
from nas_agent_graph import routers
from nas_agent_graph.cli import checkpoint_agrees, run_search
from nas_agent_graph.context import Context, Session
from nas_agent_graph.display import PlainDisplay
from nas_agent_graph.graph import build_graph
from nas_agent_graph.phases import read_phases
from nas_agent_graph.proposers import Proposal
from tests.conftest import PYTHON, ROOT, TINY_CONFIG, run_env

SNAPSHOT = Path(__file__).with_name("graph.mmd")
QUICK = ["training.max_epochs=1", "training.max_steps_per_epoch=5"]


def test_mermaid_drawing_matches_snapshot_and_the_docs():
    drawing = build_graph().get_graph().draw_mermaid()
    assert drawing == SNAPSHOT.read_text(), "graph changed: update tests/nas_agent_graph/graph.mmd and docs/search.md"
    docs = (Path(__file__).resolve().parents[2] / "docs" / "search.md").read_text()
    assert drawing.strip() in docs


def test_routers_are_pure_functions_of_state():
    assert routers.after_load({"stop_reason": None}) == "propose"
    assert routers.after_load({"stop_reason": "reached --max-runs 3"}) == "stop"
    assert routers.after_validate({"validation_error": None}) == "launch"
    assert routers.after_validate({"validation_error": "bad", "stop_reason": None}) == "propose"
    assert routers.after_validate({"validation_error": "bad", "stop_reason": "too many"}) == "stop"
    assert routers.after_collect({"stop_reason": None}) == "propose"
    assert routers.after_collect({"stop_reason": "patience"}) == "stop"


def test_routers_with_runs_in_flight():
    flying = [{"run_id": "run_0003"}]
    # a free slot: propose another run; no slot: wait for one to end
    assert routers.after_launch({"in_flight": flying, "can_propose": True}) == "propose"
    assert routers.after_launch({"in_flight": flying, "can_propose": False}) == "wait"
    assert routers.after_collect({"in_flight": flying, "can_propose": False}) == "wait"
    assert routers.after_load({"in_flight": flying, "can_propose": False}) == "wait"
    assert routers.after_finetune({"in_flight": flying, "can_propose": True}) == "propose"
    # a stop drains the runs in flight first
    assert routers.after_collect({"in_flight": flying, "stop_reason": "patience"}) == "wait"
    assert routers.after_validate({"in_flight": flying, "validation_error": "bad", "stop_reason": "x"}) == "wait"
    assert routers.after_load({"in_flight": [], "stop_reason": "max runs"}) == "stop"
    # a due fine-tune waits for the runs in flight to end (no new run starts meanwhile)
    assert routers.after_collect({"in_flight": flying, "finetune_due": True, "can_propose": True}) == "wait"
    assert routers.after_collect({"in_flight": [], "finetune_due": True}) == "finetune"


@dataclass
class ScriptedProposer:
    """Returns the given raw configs in order, one per call, the last one repeated; an
    exception in the list is raised instead (graph-logic tests only)."""

    configs: list
    name: str = "scripted"
    calls: list = field(default_factory=list)

    def propose(self, state, base_config, attempt, feedback):
        self.calls.append({"runs": len(state.runs), "attempt": attempt, "feedback": feedback})
        item = self.configs[min(len(self.calls) - 1, len(self.configs) - 1)]
        if isinstance(item, Exception):
            raise item
        return Proposal(config=item, proposer=self.name)


def make_ctx(tmp_path, proposer, **kw) -> Context:
    config = tmp_path / "config.py"
    if not config.exists():
        config.write_text(TINY_CONFIG)
    defaults = dict(state_path=tmp_path / "agent_state.json", runs_dir=tmp_path / "runs", config_path=config,
                    overrides=QUICK, max_runs=2)
    live = {k: kw.pop(k) for k in list(kw) if k in Session.__dataclass_fields__}
    defaults.update(kw)
    return Context(**defaults, session=Session(proposer=proposer, display=live.pop("display", PlainDisplay()), **live))


def base_raw(tmp_path) -> dict:
    return parse_config_source(TINY_CONFIG)


def test_invalid_proposal_goes_back_to_propose_with_feedback(tmp_path):
    good = base_raw(tmp_path)
    good["model"]["d_model"] = 24
    bad = json.loads(json.dumps(good))
    bad["model"]["n_heads"] = 5  # 24 % 5 != 0
    proposer = ScriptedProposer([bad, good])
    assert run_search(make_ctx(tmp_path, proposer)) == 0
    study = load_agent_state(tmp_path / "agent_state.json")
    assert [r.run_id for r in study.runs] == ["run_0000", "run_0001"]  # the rejection did not count as a run
    assert study.runs[0].proposer == "baseline" and study.runs[1].proposer == "scripted"
    assert study.runs[1].config["model"]["d_model"] == 24
    assert len(study.rejected) == 1 and "d_model % n_heads" in study.rejected[0]["error"]
    assert proposer.calls[1]["attempt"] == 1 and "d_model % n_heads" in proposer.calls[1]["feedback"]
    assert not (tmp_path / "runs" / "run_0002").exists()
    # every node, and the checkpoint writes, timed for bench/overhead.py (runs/phases.jsonl)
    phases = read_phases(tmp_path / "runs")
    of_run1 = {p["phase"] for p in phases if p["run_id"] == "run_0001"}
    assert {"propose", "validate", "launch", "wait", "summarise", "decide", "decide/save_state", "collect_lora",
            "checkpoint"} <= of_run1
    assert [p["phase"] for p in phases].count("validate") == 3 and all(p["s"] >= 0 for p in phases)


def test_duplicate_proposal_is_rejected_with_the_earlier_run(tmp_path):
    proposer = ScriptedProposer([base_raw(tmp_path)])  # the baseline again, forever
    ctx = make_ctx(tmp_path, proposer, max_retries=1)
    assert run_search(ctx) == 1  # a failure stop
    study = load_agent_state(ctx.state_path)
    assert len(study.runs) == 1
    assert len(study.rejected) == 2
    assert all("duplicate: the same settings already ran as run_0000" in r["error"] for r in study.rejected)


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_parallel_proposal_of_a_config_still_training_is_a_duplicate(tmp_path):
    slow = base_raw(tmp_path)
    slow["model"]["d_model"] = 24
    slow["training"]["max_steps_per_epoch"] = 300  # still training when run_0000 is done
    other = json.loads(json.dumps(slow))
    other["model"]["d_model"] = 32
    other["training"]["max_steps_per_epoch"] = 5
    proposer = ScriptedProposer([slow, slow, other])
    ctx = make_ctx(tmp_path, proposer, max_runs=3, parallel=2, overrides=["training.max_epochs=1"])
    assert run_search(ctx) == 0
    study = load_agent_state(ctx.state_path)
    assert sorted(r.run_id for r in study.runs) == ["run_0000", "run_0001", "run_0002"]
    assert [e["error"] for e in study.rejected] == [
        "duplicate: the same settings already ran as run_0001 (still training)"]
    assert proposer.calls[1]["runs"] == 2  # run_0001 was shown to the proposer, as a run in flight
    assert {r.run_id: r.config["model"]["d_model"] for r in study.runs}["run_0002"] == 32


@pytest.mark.parametrize("in_run", [True, pytest.param(False, marks=pytest.mark.slow)])  # False: ~34 s here
def test_smoke_test_failure_and_param_budget_reject(tmp_path, in_run):
    raw = base_raw(tmp_path)
    raw["data"]["path"] = str(tmp_path / "missing.csv")  # fails only when data is loaded: in the smoke test
    big = base_raw(tmp_path)
    big["model"]["d_model"] = 64
    proposer = ScriptedProposer([raw, big])
    ctx = make_ctx(tmp_path, proposer, max_retries=1, max_params=20_000, smoke_in_run=in_run)
    assert run_search(ctx) == 1
    study = load_agent_state(ctx.state_path)
    errors = [r["error"] for r in study.rejected]
    assert "smoke test failed: DataError: data file not found" in errors[0]
    assert "too many parameters" in errors[1] and "> --max-params 20,000" in errors[1]
    assert [r.run_id for r in study.runs] == ["run_0000"]  # neither rejection counts as a run
    assert study.runs[0].extra["smoke"].get("in_run", False) is in_run
    folder = tmp_path / "runs" / "run_0001"
    if in_run:  # each rejected proposal ran in run_0001 and ended "invalid"; its files were set aside
        assert [json.loads((folder / f"attempt_{i}" / "metrics.json").read_text())["status"] for i in (1, 2)] == \
            ["invalid", "invalid"]
        assert not (folder / "metrics.json").exists()
    else:
        assert not folder.exists()


def test_checkpoint_agreement_rules():
    from nas_agent.agent_state import AgentState, RunInfo
    study = AgentState(runs=[RunInfo(run_id="run_0000", status="ok", accepted=True, val_mse=1.0)],
                       best_run_id="run_0000")
    assert checkpoint_agrees({"run_id": "run_0001"}, ("launch",), study)
    assert not checkpoint_agrees({"run_id": None}, ("propose",), study)  # redo the pass from load_state
    assert not checkpoint_agrees({"run_id": "run_0000"}, ("launch",), study)  # already recorded
    assert not checkpoint_agrees({"run_id": "run_0005"}, ("validate",), study)  # state lost runs
    assert checkpoint_agrees({"run_id": "run_0000"}, ("decide",), study)  # saved, checkpoint not yet written
    assert checkpoint_agrees({"run_id": "run_0001"}, ("decide",), study)


CRASHING_TRAIN = '''
import sys
print("loading data ...", flush=True)
raise RuntimeError("CUDA out of memory (simulated crash)")
'''

OVER_BUDGET_TRAIN = '''
import argparse, json, pathlib, sys
p = argparse.ArgumentParser()
p.add_argument("--config"); p.add_argument("--tag"); p.add_argument("--runs-dir")
a, _ = p.parse_known_args()
run = pathlib.Path(a.runs_dir) / a.tag
run.mkdir(parents=True, exist_ok=True)
(run / "metrics.json").write_text(json.dumps({  # as train.py ends a model too slow to evaluate in its budget
    "status": "failed", "over_budget": True, "val_mse": None, "test_mse": None,
    "error": "too slow for the time budget: evaluating the 5570 validation and test windows alone takes about 300s"}))
sys.exit(1)
'''

HANGING_TRAIN = '''
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that will not stop politely
print("training forever", flush=True)
time.sleep(600)
'''


def _tuned(tmp_path):
    raw = base_raw(tmp_path)
    return [dict(raw, training={**raw["training"], "seed": s}) for s in range(10, 20)]


def test_consecutive_train_crashes_stop_the_search_with_a_diagnosis(tmp_path):
    script = tmp_path / "crash_train.py"
    script.write_text(CRASHING_TRAIN)
    ctx = make_ctx(tmp_path, ScriptedProposer(_tuned(tmp_path)), max_runs=10, max_failures=2, train_script=script)
    assert run_search(ctx) == 1
    study = load_agent_state(ctx.state_path)
    assert [r.status for r in study.runs] == ["failed", "failed"]  # stopped after 2, not 10
    assert "CUDA out of memory (simulated crash)" in study.runs[0].error_tail
    assert study.best_run_id is None
    metrics = json.loads((tmp_path / "runs" / "run_0001" / "metrics.json").read_text())
    assert metrics["status"] == "failed"


def test_runs_too_slow_for_the_budget_stop_the_search_only_at_twice_the_failure_streak(tmp_path, capsys):
    script = tmp_path / "over_budget_train.py"
    script.write_text(OVER_BUDGET_TRAIN)
    ctx = make_ctx(tmp_path, ScriptedProposer(_tuned(tmp_path)), max_runs=10, max_failures=2, train_script=script)
    assert run_search(ctx) == 1
    study = load_agent_state(ctx.state_path)
    assert [r.status for r in study.runs] == ["failed"] * 4  # not 2 (--max-failures), not 10
    assert all(r.extra.get("over_budget") is True for r in study.runs)  # train.py's flag, recorded
    out = capsys.readouterr()
    assert "the last 4 runs were all too slow to evaluate within the run budget" in out.out + out.err


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_timeout_kills_a_child_that_ignores_sigterm_and_the_loop_goes_on(tmp_path):
    script = tmp_path / "hang_train.py"
    script.write_text(HANGING_TRAIN)
    ctx = make_ctx(tmp_path, ScriptedProposer(_tuned(tmp_path)), max_runs=2, max_failures=5, train_script=script,
                   run_timeout=2.0)
    assert run_search(ctx) == 0  # reached --max-runs: two recorded timeouts
    study = load_agent_state(ctx.state_path)
    assert [r.status for r in study.runs] == ["timeout", "timeout"]
    for r in study.runs:
        launch_rec = json.loads((tmp_path / "runs" / r.run_id / "launch.json").read_text())
        assert not Path(f"/proc/{launch_rec['pid']}").exists() or \
            Path(f"/proc/{launch_rec['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
        assert "run-timeout" in (r.error_tail or "") + r.reason


def test_stop_rules():
    from nas_agent.agent_state import AgentState, RunInfo
    from nas_agent_graph.study.rules import stop_reason_for

    def study(*vals, accepted=None, time_used=0.0):
        runs = [RunInfo(run_id=f"run_{i:04d}", status="ok" if v is not None else "failed", val_mse=v,
                        accepted=bool(accepted and i in accepted)) for i, v in enumerate(vals)]
        best = f"run_{max(accepted):04d}" if accepted else None
        return AgentState(runs=runs, best_run_id=best, meta={"time_used_s": time_used})

    ctx = Context(max_runs=10)
    assert stop_reason_for(study(1.0, 0.9, accepted={0, 1}), ctx) == (None, False)
    assert stop_reason_for(study(*[1.0] * 10, accepted={0}), ctx)[0] == "reached --max-runs 10"
    reason, failed = stop_reason_for(study(1.0, 1.1, 1.2, accepted={0}), Context(patience=2))
    assert reason == "no improvement in the last 2 runs (--patience 2)" and not failed
    assert stop_reason_for(study(1.0, 0.5, accepted={0, 1}), Context(target_mse=0.6))[0].startswith(
        "reached --target-mse 0.6")
    assert stop_reason_for(study(1.0, accepted={0}, time_used=100), Context(time_budget=50))[0] == \
        "used 100s of --time-budget 50s"
    reason, failed = stop_reason_for(study(1.0, None, None, None, accepted={0}), Context(max_failures=3))
    assert failed and reason.startswith("the last 3 runs all failed")


def test_rich_display_renders_every_event():
    import io
    from rich.console import Console
    from nas_agent.agent_state import AgentState, RunInfo
    from nas_agent_graph.display import RichDisplay

    out = io.StringIO()
    run = RunInfo(run_id="run_0000", status="ok", val_mse=0.5, accepted=True, reason="first")
    state = AgentState(max_runs=3, runs=[run], best_run_id="run_0000")
    with RichDisplay(Console(file=out, force_terminal=True, width=100)) as d:
        d.on_study(state=state)
        d.on_propose(run_id="run_0001", proposer="tpe", attempt=0)
        d.on_rejected(run_id="run_0001", error="duplicate: the same settings already ran as run_0000")
        d.on_launch(run_id="run_0001", config={"training": {"max_epochs": 3}})
        d.on_launch(run_id="run_0002", config={"training": {"max_epochs": 5}})  # --parallel 2
        d.on_epoch(run_id="run_0001", history=[{"epoch": 1, "val_mse": 0.61}])
        assert d.training == {"run_0001": "epoch 1/3 val_mse 0.6100", "run_0002": "epoch 0/5"}
        d.on_decision(run=RunInfo(run_id="run_0001", status="ok", val_mse=0.61), state=state)
        assert list(d.training) == ["run_0002"]
        d.on_rejected(run_id="run_0002", error="smoke test failed: ValueError: model output")  # reject_run
        assert d.training == {}
        d.on_decision(run=run, state=state)
        d.on_stop(message="Search stopped: reached --max-runs 3.")
    text = out.getvalue()
    assert "run_0000 ok val_mse 0.5000" in text and "best: run_0000" in text and "Search stopped" in text
    assert "proposal rejected" in text


def test_rich_display_shows_progress_within_the_epoch_and_the_study_eta(tmp_path):
    import io
    import json
    import time
    from rich.console import Console
    from nas_agent.agent_state import AgentState, RunInfo
    from nas_agent_graph.display import RichDisplay

    done = [RunInfo(run_id=f"run_000{i}", status="ok", val_mse=0.5, duration_s=60.0 * (i + 1), accepted=i == 0)
            for i in range(3)]  # median 120 s a run
    state = AgentState(max_runs=13, runs=done, best_run_id="run_0000")
    (tmp_path / "run_0003").mkdir()
    (tmp_path / "run_0003" / "progress.json").write_text(json.dumps(
        {"epoch": 2, "max_epochs": 20, "step": 60, "steps": 264, "steps_per_s": 3.0, "epoch_eta_s": 68.0,
         "run_eta_s": 1830.0}))
    out = io.StringIO()
    with RichDisplay(Console(file=out, force_terminal=True, width=140), runs_dir=tmp_path, parallel=2) as d:
        d.on_study(state=state)
        assert "ETA 10m00s" in d.study_line  # 10 runs left x 120 s / 2 at once
        d.on_launch(run_id="run_0003", config={"training": {"max_epochs": 20}})
        deadline = time.monotonic() + 10
        while "it/s" not in d.training["run_0003"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert d.training["run_0003"].startswith("epoch 2/20 [####")
        assert "60/264 3.0 it/s, epoch ETA 1m08s, run ETA 30m30s" in d.training["run_0003"]
        d.on_stop(message="Search stopped.")


@pytest.mark.slow  # ~24 s here
def test_a_proposer_error_is_an_invalid_proposal_not_a_crash(tmp_path):
    good = base_raw(tmp_path)
    good["model"]["d_model"] = 24
    from nas_agent_graph.search_space import SpaceError
    proposer = ScriptedProposer([SpaceError("model.d_model and model.n_heads are searched together: 24 % 5 != 0"),
                                 good], name="broken")
    assert run_search(make_ctx(tmp_path, proposer)) == 0
    study = load_agent_state(tmp_path / "agent_state.json")
    assert len(study.runs) == 2 and study.runs[1].config["model"]["d_model"] == 24
    assert "could not build a config" in study.rejected[0]["error"]
    assert "24 % 5" in proposer.calls[1]["feedback"]


@pytest.mark.slow  # ~13 s here
def test_rerun_after_max_retries_does_not_repeat_the_rejected_attempts(tmp_path):
    proposer = ScriptedProposer([base_raw(tmp_path)])  # always the baseline again: a duplicate
    ctx = make_ctx(tmp_path, proposer, max_retries=1)
    assert run_search(ctx) == 1
    assert [c["attempt"] for c in proposer.calls] == [0, 1]  # run_0001: two duplicates, then the stop
    again = ScriptedProposer([base_raw(tmp_path)])
    assert run_search(make_ctx(tmp_path, again, max_retries=1)) == 1
    study = load_agent_state(tmp_path / "agent_state.json")
    assert again.calls[0]["attempt"] == 2  # continues after the 2 stored rejections of run_0001
    assert len(study.rejected) == 4 and len({r["key"] for r in study.rejected}) == 4


def test_runs_without_a_validation_score_count_as_failures(tmp_path):
    from nas_agent.agent_state import AgentState, RunInfo
    from nas_agent_graph.study.rules import stop_reason_for
    runs = [RunInfo(run_id=f"run_{i:04d}", status="timeout", val_mse=None) for i in range(3)]
    reason, failed = stop_reason_for(AgentState(runs=runs), Context(max_failures=3))
    assert failed and reason.startswith("the last 3 runs all failed")


@dataclass
class ByAttempt:
    """Proposes configs[attempt] (the last one for later attempts): the same proposal after a resume."""

    configs: list
    name: str = "scripted"

    def propose(self, state, base_config, attempt, feedback):
        return Proposal(config=self.configs[min(attempt, len(self.configs) - 1)], proposer=self.name)


KILLED_IN_REJECT_RUN = """
import sys
from pathlib import Path
from tests.nas_agent_graph.test_graph import ByAttempt, make_ctx, too_big_then_fine
from nas_agent_graph.cli import run_search
tmp = Path(sys.argv[1])
sys.exit(run_search(make_ctx(tmp, ByAttempt(too_big_then_fine(tmp)), max_params=20_000)))
"""


def too_big_then_fine(tmp_path) -> list:
    big, fine = base_raw(tmp_path), base_raw(tmp_path)
    big["model"]["d_model"] = 64  # over --max-params: ends "invalid" in its own train.py
    fine["model"]["d_model"] = 24
    return [big, fine]


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_sigkill_while_an_invalid_run_is_rejected_loses_and_repeats_nothing(tmp_path):
    """Killed in reject_run after the rejection is saved, before the folder is set aside: the resumed
    search records the rejection once, sets the folder aside and trains the next proposal as run_0001."""
    env = run_env(NAS_AGENT_TEST_PAUSE="reject_run:run_0001:60")
    proc = subprocess.Popen([PYTHON, "-c", KILLED_IN_REJECT_RUN, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = tmp_path / "runs" / ".paused_in_reject_run"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study = load_agent_state(tmp_path / "agent_state.json")
    assert [r.run_id for r in study.runs] == ["run_0000"] and [e["key"] for e in study.rejected] == ["run_0001#0"]
    assert json.loads((tmp_path / "runs" / "run_0001" / "metrics.json").read_text())["status"] == "invalid"
    assert run_search(make_ctx(tmp_path, ByAttempt(too_big_then_fine(tmp_path)), max_params=20_000)) == 0
    study = load_agent_state(tmp_path / "agent_state.json")
    assert [r.run_id for r in study.runs] == ["run_0000", "run_0001"] and [e["key"] for e in study.rejected] == \
        ["run_0001#0"]
    assert study.runs[1].config["model"]["d_model"] == 24 and study.runs[1].status == "ok"
    folder = tmp_path / "runs" / "run_0001"
    assert json.loads((folder / "attempt_1" / "metrics.json").read_text())["status"] == "invalid"
    assert json.loads((folder / "metrics.json").read_text())["status"] == "ok"


def test_models_too_slow_for_the_run_budget_are_not_a_streak_of_failures():
    # train.py's over_budget failures (evaluation alone outlasts the budget) say what the config
    # is, not that something is broken: they neither stop the search nor break a real streak.
    from nas_agent.agent_state import AgentState, RunInfo
    from nas_agent_graph.study.rules import stop_reason_for

    def failed(i, over_budget):
        return RunInfo(run_id=f"run_{i:04d}", status="failed", val_mse=None,
                       extra={"over_budget": True} if over_budget else {})
    ok = RunInfo(run_id="run_0000", status="ok", val_mse=1.0, accepted=True)
    too_slow = AgentState(runs=[ok] + [failed(i, True) for i in range(1, 6)], best_run_id="run_0000")
    assert stop_reason_for(too_slow, Context(max_failures=3)) == (None, False)
    broken = AgentState(runs=[ok, failed(1, False), failed(2, True), failed(3, False), failed(4, True),
                              failed(5, False)], best_run_id="run_0000")
    reason, stop_failed = stop_reason_for(broken, Context(max_failures=3))
    assert stop_failed and reason.startswith("the last 3 runs all failed")
    assert "run_0001" in reason and "run_0002" not in reason
