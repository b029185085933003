"""bench/search_compare.py's bookkeeping: which code, and which machine, each arm's study ran on."""
from __future__ import annotations

import json
import os
import re
import subprocess

from tests.conftest import ROOT, load_bench_script

sc = load_bench_script("search_compare")


def test_a_study_keeps_the_commit_of_every_session_that_ran_it(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert sc.code_version().startswith(head.strip())
    assert sc.session_values(tmp_path, sc.CODE_FILE) == ["unrecorded"]  # a study from before the record
    assert sc.record_session(tmp_path, sc.CODE_FILE, "aaaaaaa") == ["aaaaaaa"]
    assert sc.record_session(tmp_path, sc.CODE_FILE, "aaaaaaa") == ["aaaaaaa"]  # resumed on the same code: once
    assert sc.record_session(tmp_path, sc.CODE_FILE, "bbbbbbb+changes") == ["aaaaaaa", "bbbbbbb+changes"]
    assert sc.session_values(tmp_path, sc.CODE_FILE) == ["aaaaaaa", "bbbbbbb+changes"]


def test_a_study_keeps_the_machine_of_every_session_that_ran_it(tmp_path):
    # A machine's description has spaces and commas: one per line.
    here = sc.machine()
    assert re.fullmatch(rf".+, {os.cpu_count()} cores, (no )?native bf16", here), here
    assert sc.record_session(tmp_path, sc.MACHINE_FILE, "AMD EPYC, 2 cores, native bf16") == [
        "AMD EPYC, 2 cores, native bf16"]
    assert sc.record_session(tmp_path, sc.MACHINE_FILE, "AMD EPYC, 2 cores, no native bf16") == [
        "AMD EPYC, 2 cores, native bf16", "AMD EPYC, 2 cores, no native bf16"]
    row = {"arm": "tpe", "seed": 1, "runs": 3, "minutes": 90.0, "curve": [], "ensemble": None, "code": ["aaaaaaa"],
           "machines": sc.session_values(tmp_path, sc.MACHINE_FILE)}
    line = sc.arm_tables([row]).splitlines()[2]
    assert line.endswith("| aaaaaaa | AMD EPYC, 2 cores, native bf16; AMD EPYC, 2 cores, no native bf16 |")


def test_a_study_from_before_the_record_keeps_its_unrecorded_sessions(tmp_path):
    (tmp_path / "agent_state.json").write_text("{}")  # a study that ran before code_versions.txt
    assert sc.record_session(tmp_path, sc.CODE_FILE, "ccccccc") == ["unrecorded", "ccccccc"]


def test_machines_given_by_hand_survive_a_re_read_of_an_unrecorded_study(tmp_path):
    results = tmp_path / "tpe_seed0.json"
    assert sc.known_machines(["unrecorded"], results) == ["unrecorded"]  # no results file yet
    results.write_text(json.dumps({"machines": ["AMD EPYC, 2 cores, native bf16 (recorded afterwards)"]}))
    assert sc.known_machines(["unrecorded"], results) == ["AMD EPYC, 2 cores, native bf16 (recorded afterwards)"]
    assert sc.known_machines(["AMD EPYC, 2 cores, no native bf16"], results) == ["AMD EPYC, 2 cores, no native bf16"]


def test_a_study_stopped_by_a_rule_is_over_and_says_why(tmp_path):
    from nas_agent.agent_state import AgentState, save_agent_state

    assert not sc.study_ended(tmp_path, 5400)  # nothing there yet
    state = AgentState()
    state.meta["time_used_s"] = 5289.6
    save_agent_state(state, tmp_path / "agent_state.json")
    assert not sc.study_ended(tmp_path, 5400)  # killed before its budget: resumed
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ensemble.json").write_text("{}")  # written when a study ends, or by hand
    assert not sc.study_ended(tmp_path, 5400)  # no stop line: an ensemble built by hand
    log = tmp_path / "orchestrator.log"
    log.write_text("run_0042: failed\nSearch stopped: the last 6 runs were all too slow\nRuns in the study: 43.\n")
    assert sc.stop_line(tmp_path) == "Search stopped: the last 6 runs were all too slow"
    assert sc.study_ended(tmp_path, 5400)
    # Stopped because every recent run failed: a fault to fix, then resume.
    log.write_text("Search stopped: the last 3 runs all failed, so the search stops instead of burning its budget.\n")
    assert not sc.study_ended(tmp_path, 5400)


def test_the_best_runs_say_whether_validation_still_orders_test(tmp_path):
    """top_runs keeps the k best scored runs by val MSE, with Spearman(val, test) over them; runs
    without a score (failed, or no test MSE) are left out."""
    from types import SimpleNamespace as Run

    def run(i, val, test, status="ok", seq_len=336):
        return Run(run_id=f"run_{i:04d}", status=status, val_mse=val, test_mse=test,
                   config={"data": {"seq_len": seq_len}, "model": {"head": "linear", "tokens": "time",
                                                                  "mixer": "none", "channels": "independent"}})

    agree = [run(i, 0.6 + i / 100, 0.37 + i / 100) for i in range(5)]
    top = sc.top_runs(agree + [run(9, 0.5, None, "failed"), run(8, 0.55, 0.5, "failed")], k=4)
    assert [r["run"] for r in top["runs"]] == ["run_0000", "run_0001", "run_0002", "run_0003"]
    assert top["spearman"] == 1.0 and top["runs"][0]["seq_len"] == 336
    reverse = [run(i, 0.6 + i / 100, 0.40 - i / 100) for i in range(4)]
    assert sc.top_runs(reverse)["spearman"] == -1.0
    assert sc.top_runs(agree[:2])["spearman"] is None  # too few to rank
    line = sc.top_line({"top": sc.top_runs(agree)})
    assert line.startswith("its 5 best runs by val MSE: time-none-ci x5; their test MSE 0.3700 to 0.4100")
    assert line.endswith("Spearman(val, test) over them 1.00") and sc.top_line({"top": None}) is None
    # The arms' README carries the line for each study that has one.
    row = {"arm": "tpe", "seed": 2, "finished": True, "minutes": 90.0, "stop": None, "top": sc.top_runs(agree)}
    notes = sc.study_notes([dict(row, top_line=sc.top_line(row)), {"arm": "random", "seed": 0, "finished": True}], 90)
    assert notes.splitlines()[-2:] == ["The candidates selection chooses between (test MSE reported, never used):",
                                       f"- tpe seed 2: {sc.top_line(row)}"]


def test_a_study_with_family_bests_compares_its_ensemble_with_the_top_five_alone():
    """library_table pairs a study's ensemble (top 5 + family bests) with its top-5-only one; studies
    from before family bests have no pair and no row."""
    def ens(val, test, members, families):
        return {"val_mse": val, "test_mse": test, "families": families, "members": members, "pool": 5, "steps": 20,
                "member_families": {"run_0001": "time-none", "run_0007": "variate-attention"}}
    new = {"arm": "tpe", "seed": 3, "ensemble": ens(0.630, 0.365, {"run_0001": 12, "run_0007": 8}, True),
           "alternatives": {"top_only": ens(0.636, 0.374, {"run_0001": 20}, False),
                            "bagged": ens(0.632, 0.362, {"run_0001": 30, "run_0007": 10}, True)}}
    old = {"arm": "tpe", "seed": 0, "ensemble": ens(0.625, 0.365, {"run_0001": 1}, False), "alternatives": {}}
    # A study since bagging became the default: its own ensemble is the bagged one, the plain one beside it.
    since = {"arm": "tpe", "seed": 10, "ensemble": dict(ens(0.631, 0.366, {"run_0001": 25, "run_0007": 15}, True),
                                                         bags=20),
             "alternatives": {"top_only": ens(0.637, 0.375, {"run_0001": 20}, False),
                              "plain": dict(ens(0.629, 0.368, {"run_0007": 20}, True), bags=0)}}
    table = sc.library_table([old, new, since]).splitlines()
    assert len(table) == 4 and table[2].startswith("| tpe | 3 | 5 | 0.6360 / 0.3740 (run_0001x20) | 0.6300 / 0.3650 "
                                                   "(run_0001x12, run_0007x8) (the study's); time-none, "
                                                   "variate-attention |")
    assert table[2].endswith("| 0.6320 / 0.3620 (bagged, 2 members) |")  # a row from before "bags" was kept
    assert table[3] == ("| tpe | 10 | 5 | 0.6370 / 0.3750 (run_0001x20) | 0.6290 / 0.3680 (run_0007x20); "
                        "time-none, variate-attention | 0.6310 / 0.3660 (bagged, 2 members) (the study's) |")
    assert sc.library_table([old]) is None
    assert sc.alternative_ensembles(ROOT, old["ensemble"]) == {}  # nothing to pair: not built
    # The summary's bagged columns hold the bagged selection of each study, its own or built beside it.
    curve = [{"run": 1, "minutes": 1.0, "proposer": "tpe", "best_val": 0.64, "best_test": 0.37, "best_run": "run_0001"}]
    summary = sc.arm_tables([dict(r, runs=1, minutes=90.0, curve=curve, finished=True) for r in (old, new, since)])
    assert summary.splitlines()[-1] == ("| tpe | 3 | 0.6400 | 0.0000 | 0.3700 | 0.0000 | 0.6287 | 0.3653 | 0.0006 | "
                                        "2 | 0.6315 | 0.3640 | 0.0028 |")


def test_the_paired_ensemble_is_built_top_only_with_the_studys_own_pool_and_steps(tmp_path, monkeypatch):
    from nas_agent.agent_state import AgentState, save_agent_state
    save_agent_state(AgentState(), tmp_path / "agent_state.json")
    calls = []

    def build(study, runs_dir, **kw):
        calls.append((runs_dir, kw))
        return {"val_mse": 0.6, "test_mse": 0.37, "pool": kw["pool"], "steps": kw["steps"], "created_at": "now",
                "families": kw.get("families", True), "members": [{"run_id": "run_0001", "picks": 3, "family": "time-none"}]}
    monkeypatch.setattr(sc.ensemble, "build", build)
    # A study from before bagging was the default (no "bags" recorded): its own is the plain selection.
    rows = sc.alternative_ensembles(tmp_path, {"families": True, "pool": 3, "steps": 7})
    assert calls == [(tmp_path / "runs", {"pool": 3, "steps": 7, "families": False, "bags": 0}),
                     (tmp_path / "runs", {"pool": 3, "steps": 7, "families": True, "bags": sc.BAGS})]
    assert rows["top_only"]["families"] is False and rows["top_only"]["members"] == {"run_0001": 3}
    assert rows["bagged"]["pool"] == 3 and sc.alternative_ensembles(tmp_path, {"families": False}) == {}
    # A study since: its own is the bagged one, and the plain one is built beside it.
    calls.clear()
    rows = sc.alternative_ensembles(tmp_path, {"families": True, "bags": sc.BAGS, "pool": 3, "steps": 7})
    assert [kw for _, kw in calls] == [{"pool": 3, "steps": 7, "families": False, "bags": 0},
                                       {"pool": 3, "steps": 7, "families": True, "bags": 0}]
    assert set(rows) == {"top_only", "plain"}


def test_a_seed_averaged_ensemble_is_not_the_arms_own(tmp_path, monkeypatch):
    """`ensemble --seeds K` trains outside the study's budget: the arm's row is the same selection
    rebuilt without it, and the study's ensemble.json is left as the user wrote it."""
    from nas_agent.agent_state import AgentState, save_agent_state
    save_agent_state(AgentState(), tmp_path / "agent_state.json")
    (tmp_path / "runs").mkdir()
    seeded = {"val_mse": 0.62, "test_mse": 0.36, "pool": 4, "steps": 9, "families": True, "bags": 0, "seeds": 2,
              "created_at": "then", "members": [{"run_id": "run_0001", "picks": 2, "family": "time-none"}]}
    (tmp_path / "runs" / "ensemble.json").write_text(json.dumps(seeded))
    calls = []

    def build(study, runs_dir, **kw):
        calls.append(kw)
        return {**seeded, "val_mse": 0.63, "test_mse": 0.37, "seeds": 0}
    monkeypatch.setattr(sc.ensemble, "build", build)
    row = sc.arm_ensemble(tmp_path)
    assert calls == [{"pool": 4, "steps": 9, "families": True, "bags": 0}]
    assert (row["val_mse"], row["test_mse"]) == (0.63, 0.37)
    assert json.loads((tmp_path / "runs" / "ensemble.json").read_text()) == seeded


def test_a_resumed_studys_curve_runs_on_study_time_not_the_wall_clock(tmp_path):
    # Session 1: two 10-minute runs, then killed; the study resumes 5 hours later for one more run.
    # Its curve's minutes are study time (10, 20, then 20 + 10), not 5 hours and more.
    from datetime import datetime, timezone

    from nas_agent.agent_state import AgentState, RunInfo, save_agent_state

    t0 = 1_796_400_000.0
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat()  # noqa: E731
    ends = [t0 + 600, t0 + 1200, t0 + 5 * 3600 + 600]
    state = AgentState(runs=[RunInfo(run_id=f"run_{i:04d}", val_mse=0.7 - i / 100, test_mse=0.4, proposer="tpe",
                                     started_at=iso(end), duration_s=600.0) for i, end in enumerate(ends)])
    assert [round(x["minutes"]) for x in sc.best_so_far(state)] == [10, 20, 310]  # unrecorded: wall-clock

    save_agent_state(AgentState(), tmp_path / "agent_state.json")
    sc.record_start(tmp_path)  # the first session: nothing used yet
    state.meta["time_used_s"] = 1200.0
    save_agent_state(state, tmp_path / "agent_state.json")
    sc.record_start(tmp_path)  # the resumed one
    sessions = sc.study_sessions(tmp_path)
    assert [s["time_used_s"] for s in sessions] == [0.0, 1200.0]
    sessions[0]["at"], sessions[1]["at"] = t0, t0 + 5 * 3600  # when they started, for the arithmetic
    assert [round(x["minutes"]) for x in sc.best_so_far(state, sessions)] == [10, 20, 30]
    assert sc.best_so_far(state, sessions)[-1]["best_run"] == "run_0002"

    row = {"arm": "random", "seed": 0, "minutes": 30.0, "curve": sc.best_so_far(state), "finished": True}
    assert "wall-clock since the first run" in sc.study_notes([row], 90)  # an old study's curve is flagged
    row["curve"] = sc.best_so_far(state, sessions)
    assert "wall-clock" not in sc.study_notes([row], 90)


def test_a_study_part_way_through_its_budget_stays_out_of_its_arms_means(tmp_path):
    def row(seed, best_val, finished):
        return {"arm": "tpe", "seed": seed, "runs": 3, "minutes": 90.0 if finished else 40.0, "finished": finished,
                "curve": [{"run": 0, "minutes": 1.0, "proposer": "tpe", "best_val": best_val, "best_test": 0.4,
                           "best_run": "run_0000"}],
                "ensemble": {"val_mse": best_val - 0.01, "test_mse": 0.37, "members": {"run_0000": 1}}}

    text = sc.arm_tables([row(0, 0.64, True), row(1, 0.66, True), row(2, 0.90, False)])
    assert "| tpe | 2 | 0.6500 | 0.0141 | 0.4000 | 0.0000 | 0.6400 | 0.3700 | 0.0000 |" in text, text
    assert "| tpe | 2 | 3 | 40 |" in text  # the unfinished study keeps its own row


def test_studies_are_tabulated_by_arm_then_by_seed_as_a_number(tmp_path):
    for arm, seed in (("tpe", 10), ("tpe", 9), ("random", 1), ("tpe", 2)):
        (tmp_path / f"{arm}_seed{seed}.json").write_text(json.dumps({"arm": arm, "seed": seed}))
    assert [(r["arm"], r["seed"]) for r in sc.load_rows(tmp_path)] == [("random", 1), ("tpe", 2), ("tpe", 9),
                                                                        ("tpe", 10)]  # by file name: arm, then seed as a number
