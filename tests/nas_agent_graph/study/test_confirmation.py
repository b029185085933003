"""--confirm-seeds: a candidate that beats the incumbent is re-run with more seeds, and so is the
incumbent, before it is accepted. Real training on tiny configs; the proposer is scripted."""
import signal
import subprocess
import time

import pytest

from nas_agent.agent_state import AgentState, RunInfo, load_agent_state
from nas_agent_graph.cli import run_search
from nas_agent_graph.study.confirmation import (
    conclude,
    confirmations_of,
    next_confirmation,
    student_t_cdf,
    welch_one_sided,
)
from nas_agent_graph.report import render_status
from tests.conftest import PYTHON, TINY_CONFIG, run_env
from tests.nas_agent_graph.test_cli import assert_consistent, cli, search_args, study, wait_for  # noqa: F401
from tests.nas_agent_graph.test_graph import ScriptedProposer, base_raw, make_ctx

QUICK = ["training.max_epochs=1", "training.max_steps_per_epoch=10"]


def run(i, val, **kw):
    """A finished run of a scripted study (pure-function tests of the confirmation plan)."""
    return RunInfo(run_id=f"run_{i:04d}", status="ok", val_mse=val, config={"training": {"seed": 1}}, **kw)


def test_student_t_and_welch_match_tables():
    assert student_t_cdf(-2.132, 4) == pytest.approx(0.05, abs=1e-4)  # t(0.95, 4) = 2.132
    assert student_t_cdf(-12.706, 1) == pytest.approx(0.025, abs=1e-4)
    assert student_t_cdf(2.0, 3) == pytest.approx(0.93034, abs=1e-4)
    t, df, p = welch_one_sided([1.0, 2.0, 3.0], [4.0, 5.0, 6.5])
    assert t < 0 and 3 < df < 4 and p == pytest.approx(0.01457, abs=1e-4)
    assert welch_one_sided([1.0, 1.0], [2.0, 2.0])[2] == 0.0  # no spread: the sign decides
    with pytest.raises(ValueError, match="at least 2 values"):
        welch_one_sided([1.0], [2.0, 3.0])


def test_the_plan_is_derived_from_the_study_alone():
    st = AgentState(runs=[run(0, 1.0, accepted=True),
                             run(1, 0.5, extra={"confirm": {"status": "pending", "k": 3, "incumbent": "run_0000"}})],
                       best_run_id="run_0000")
    plans = []
    for i in range(2, 6):
        plan = next_confirmation(st)
        plans.append((plan.target, plan.index))
        st.runs.append(run(i, 0.5 if plan.target == "run_0001" else 1.0, proposer="confirm",
                              extra={"confirms": plan.target}, parent_run_id=plan.target))
    assert plans == [("run_0001", 1), ("run_0001", 2), ("run_0000", 1), ("run_0000", 2)]
    assert next_confirmation(st) is None
    done = conclude(st, 0.0)
    assert done.accepted and st.best_run_id == "run_0001" and done.extra["confirm"]["status"] == "accepted"
    assert st.meta["noise_floor"]["run_id"] == "run_0000" and st.meta["noise_floor"]["n"] == 3


def test_two_candidates_from_parallel_runs_are_confirmed_one_at_a_time_against_the_incumbent_of_now():
    pending = {"status": "pending", "k": 2, "incumbent": "run_0000"}
    # run_0001 and run_0002 trained at the same time and both beat run_0000
    st = AgentState(runs=[run(0, 1.0, accepted=True), run(1, 0.5, extra={"confirm": dict(pending)}),
                             run(2, 0.7, extra={"confirm": dict(pending)})], best_run_id="run_0000")
    assert next_confirmation(st).candidate == "run_0001"  # the oldest first
    for i, target, val in ((3, "run_0001", 0.52), (4, "run_0000", 0.98)):
        assert next_confirmation(st).target == target
        st.runs.append(run(i, val, proposer="confirm", extra={"confirms": target}, parent_run_id=target))
    done = conclude(st, 0.0)
    assert done.run_id == "run_0001" and done.accepted and st.best_run_id == "run_0001"
    # run_0002 (0.7) no longer beats the new incumbent (0.5): rejected without spending runs on it
    second = st.runs[2]
    assert second.extra["confirm"]["status"] == "rejected" and not second.accepted
    assert "no longer beats the incumbent run_0001" in second.reason
    assert next_confirmation(st) is None


def test_a_waiting_candidate_that_still_beats_the_new_incumbent_is_confirmed_against_it():
    pending = {"status": "pending", "k": 2, "incumbent": "run_0000"}
    st = AgentState(runs=[run(0, 1.0, accepted=True), run(1, 0.5, extra={"confirm": dict(pending)}),
                             run(2, 0.3, extra={"confirm": dict(pending)})], best_run_id="run_0000")
    for i, target, val in ((3, "run_0001", 0.52), (4, "run_0000", 0.98)):
        st.runs.append(run(i, val, proposer="confirm", extra={"confirms": target}, parent_run_id=target))
    assert conclude(st, 0.0).accepted
    assert st.runs[2].extra["confirm"] == {**pending, "incumbent": "run_0001"}
    plan = next_confirmation(st)
    assert (plan.candidate, plan.target) == ("run_0002", "run_0002")


@pytest.mark.slow  # 4 real training runs (~65 s); the default suite must stay under 15 min
def test_confirmation_rejects_a_candidate_that_differs_only_by_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reseeded = base_raw(tmp_path)
    reseeded["training"]["seed"] = 7
    # --min-delta -1: any successful run "beats" the incumbent, so the seeds alone must decide
    ctx = make_ctx(tmp_path, ScriptedProposer([reseeded]), max_runs=6, overrides=QUICK, confirm_seeds=3,
                   min_delta=-1.0, env=run_env())
    assert run_search(ctx) == 0
    st = load_agent_state(ctx.state_path)
    assert [r.proposer for r in st.runs] == ["baseline", "scripted"] + ["confirm"] * 4
    cand = st.runs[1]
    assert [r.extra["confirms"] for r in st.runs[2:]] == ["run_0001"] * 2 + ["run_0000"] * 2
    assert all(r.parent_run_id == r.extra["confirms"] and not r.accepted for r in st.runs[2:])
    seeds = [r.config["training"]["seed"] for r in st.runs]
    assert len(set(seeds)) == 6  # every run its own seed
    info = cand.extra["confirm"]
    assert info["status"] == "rejected" and not cand.accepted and st.best_run_id == "run_0000"
    assert info["p"] >= 0.05 and info["candidate_stats"]["n"] == 3 and info["incumbent_stats"]["n"] == 3
    assert cand.reason.startswith("not confirmed: val_mse")
    assert st.meta["noise_floor"]["run_id"] == "run_0000" and st.meta["noise_floor"]["std"] > 0
    assert "noise floor ±" in render_status(st)


@pytest.mark.slow  # 4 real training runs (~65 s); the default suite must stay under 15 min
def test_confirmation_accepts_a_clearly_better_config(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "config.py").write_text(TINY_CONFIG.replace('"lr": 1e-3', '"lr": 1e-6'))  # a base that barely learns
    better = base_raw(tmp_path)
    better["training"]["lr"] = 3e-3
    ctx = make_ctx(tmp_path, ScriptedProposer([better]), max_runs=6, overrides=QUICK, confirm_seeds=3, env=run_env())
    assert run_search(ctx) == 0
    st = load_agent_state(ctx.state_path)
    cand = st.runs[1]
    assert cand.extra["confirm"]["status"] == "accepted" and cand.accepted and st.best_run_id == "run_0001"
    assert cand.extra["confirm"]["p"] < 0.05 and cand.reason.startswith("confirmed: val_mse")
    assert len(confirmations_of(st, "run_0001")) == 2 and len(confirmations_of(st, "run_0000")) == 2
    assert "0.003" in (tmp_path / "config.py").read_text()  # the confirmed config is the incumbent now


@pytest.mark.slow
def test_resume_after_sigkill_during_a_confirmation_run(study):  # noqa: F811
    args = search_args(6, "tpe", "--confirm-seeds", "3", "--min-delta", "-1", "--set",
                       "training.max_steps_per_epoch=200")
    proc = subprocess.Popen([PYTHON, "-m", "nas_agent_graph", *args], cwd=study, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    launch = study / "runs" / "run_0003" / "launch.json"  # the second confirmation of run_0001
    wait_for(launch.exists, timeout=300)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(load_agent_state(study / "agent_state.json").runs) == 3
    done = cli(study, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    state = assert_consistent(study, 6)
    assert [r.proposer for r in state.runs[2:]] == ["confirm"] * 4
    assert [r.extra["confirms"] for r in state.runs[2:]] == ["run_0001"] * 2 + ["run_0000"] * 2
    assert state.runs[1].extra["confirm"]["status"] in ("accepted", "rejected")
    assert (study / "runs" / "run_0003" / "attempt_1").is_dir()  # the killed attempt, kept aside
