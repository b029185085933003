"""bench/ensemble_halves.py: selection on one half of the validation windows, scored on the other,
over a study folder's ensemble library."""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from nas_agent import forecasts
from nas_agent.agent_state import AgentState, RunInfo, add_run, save_agent_state
from nas_agent_graph import ensemble
from tests.bench.test_family_ensemble import write_run
from tests.conftest import load_bench_script

load_bench_script("search_compare")  # the sibling ensemble_halves imports, as running it from bench/ would
halves_bench = load_bench_script("ensemble_halves")

PRED_LEN = 4


@pytest.fixture
def study(tmp_path):
    """Three runs: 'steady' (small errors everywhere), 'lucky' (no error on the first half of the
    validation windows, large ones on the second) and 'noisy'."""
    rng = np.random.default_rng(0)
    rows = {s: rng.normal(size=(43, 2)).astype(np.float32) for s in ("val", "test")}  # 40 windows each
    shape = (40, PRED_LEN, 2)
    lucky = rng.normal(size=shape)
    lucky[:20] = 0.0
    noise = {"steady": {s: 0.5 * rng.normal(size=shape) for s in rows},
             "lucky": {"val": 2 * lucky, "test": 2 * rng.normal(size=shape)},
             "noisy": {s: 3 * rng.normal(size=shape) for s in rows}}
    state = AgentState()
    for i, (name, e) in enumerate(noise.items()):
        folder = tmp_path / "runs" / f"run_{i:04d}"
        write_run(folder, rows, e, pred_len=PRED_LEN)
        f = forecasts.load(folder / "forecasts.npz")
        val_mse = float(np.mean((f["val"].astype(np.float64) - f["val_target"]) ** 2))
        add_run(state, RunInfo(run_id=folder.name, val_mse=val_mse, status="ok", config={"model": {}},
                               extra={"config_hash": name}))
    save_agent_state(state, tmp_path / "agent_state.json")
    return tmp_path


def test_the_halves_leave_pred_len_windows_between_them():
    first, second = halves_bench.halves(40, gap=PRED_LEN)
    assert (first, second) == (slice(0, 18), slice(22, 40))
    with pytest.raises(SystemExit, match="too few"):
        halves_bench.halves(9, gap=PRED_LEN)


def test_each_method_is_selected_on_one_half_and_scored_on_the_other(study):
    rows = halves_bench.score_study(study, pool=5, steps=10)
    assert all(tuple(r) == halves_bench.ROW_KEYS for r in rows)  # what a record keeps, and read_records checks
    assert {(r["library"], r["method"]) for r in rows} == {(lib, m) for lib in halves_bench.LIBRARIES
                                                            for m in halves_bench.METHODS}
    single = next(r for r in rows if r["library"] == "family" and r["method"] == "single")
    f = {rid: forecasts.load(study / "runs" / rid / "forecasts.npz") for rid in ("run_0000", "run_0001")}
    target = f["run_0000"]["val_target"]

    def mse(rid, sl):
        return float(np.mean((f[rid]["val"][sl].astype(np.float64) - target[sl]) ** 2))
    # On the first half the lucky run is the best single run, and it fails on the second half;
    # selected on the second half, the steady run wins and is scored on the first.
    assert single["first_to_second"] == pytest.approx(mse("run_0001", slice(22, 40)))
    assert single["second_to_first"] == pytest.approx(mse("run_0000", slice(0, 18)))
    assert single["held_out"] == pytest.approx((single["first_to_second"] + single["second_to_first"]) / 2)
    # The plain and bagged selections too: chosen on one half by ensemble's own functions, scored on the other.
    val = {rid: forecasts.load(study / "runs" / rid / "forecasts.npz")["val"].astype(np.float64)
           for rid in ("run_0000", "run_0001", "run_0002")}
    for method, choose in (("plain", lambda v, t: Counter(ensemble.select(v, t, 10))),
                           ("bagged", lambda v, t: ensemble.select_bagged(v, t, 10, halves_bench.BAGS)[0])):
        row = next(r for r in rows if r["library"] == "family" and r["method"] == method)
        for key, sel, out in (("first_to_second", slice(0, 18), slice(22, 40)),
                              ("second_to_first", slice(22, 40), slice(0, 18))):
            w = choose({r: v[sel] for r, v in val.items()}, target[sel])
            total = sum(w.values())
            pred = sum(val[r][out] * k / total for r, k in w.items())
            assert row[key] == pytest.approx(float(np.mean((pred - target[out]) ** 2)), rel=1e-9)
    plain = next(r for r in rows if r["library"] == "family" and r["method"] == "plain")
    assert plain["val_mse"] <= single["val_mse"] + 1e-12  # on the windows it was selected on, never worse
    text = halves_bench.table(rows)
    assert "| family | single |" in text and "held-out" in text


def test_a_folder_without_a_study_is_named(tmp_path):
    (tmp_path / "runs").mkdir()
    save_agent_state(AgentState(), tmp_path / "agent_state.json")
    with pytest.raises(SystemExit, match="no run with forecasts"):
        halves_bench.score_study(tmp_path, pool=5, steps=10)


def rule_rows(held_out: dict[str, dict[str, float]]) -> list[dict]:
    """Rows as score_study makes them, for the rule alone: held-out val MSE per study and method."""
    return [{"study": s, "library": lib, "method": m, "held_out": v + (lib == "top-only")}
            for s, by_method in held_out.items() for m, v in by_method.items() for lib in halves_bench.LIBRARIES]


def test_the_rule_says_which_method_leads_until_all_its_studies_are_in_then_decides():
    rows = rule_rows({"tpe_seed6": {"plain": 0.1, "bagged": 0.9},  # outside the rule: must not count
                      "tpe_seed7": {"plain": 0.6476, "bagged": 0.6407},
                      "tpe_seed8": {"plain": 0.6252, "bagged": 0.6266}})
    studies = ["tpe_seed7", "tpe_seed8", "tpe_seed9", "tpe_seed10"]
    text = halves_bench.rule(rows, studies)
    assert "2 of 4" in text and "plain 0.6364" in text and "bagged 0.6337" in text
    assert "not decided yet (tpe_seed9, tpe_seed10 still to run); bagged leads" in text
    rows += rule_rows({"tpe_seed9": {"plain": 0.63, "bagged": 0.64}, "tpe_seed10": {"plain": 0.63, "bagged": 0.64}})
    assert halves_bench.rule(rows, studies).endswith("decided: the plain selection stays the default.")
    rows += rule_rows({"tpe_seed11": {"plain": 0.9, "bagged": 0.1}})
    assert "decided: the plain selection stays" in halves_bench.rule(rows, studies)  # a later study changes nothing
    assert "decided: bagged selection becomes the default" in halves_bench.rule(rows, ["tpe_seed11"])
    assert "none is scored or recorded yet" in halves_bench.rule(rows, ["tpe_seed12"])


def copy_study(study, folder):
    folder.mkdir()
    shutil.copytree(study / "runs", folder / "runs")
    shutil.copy(study / "agent_state.json", folder / "agent_state.json")
    return folder


def run_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["ensemble_halves.py", *map(str, args)])
    halves_bench.main()


def test_a_scored_study_is_recorded_and_counts_after_its_folder_is_gone(study, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(halves_bench, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(halves_bench, "RESULTS_MD", tmp_path / "halves.md")
    seed10, seed9 = copy_study(study, tmp_path / "tpe_seed10"), copy_study(study, tmp_path / "tpe_seed9")
    run_main(monkeypatch, "--study", seed10, "--steps", 10, "--write")
    record = json.loads((tmp_path / "records" / "tpe_seed10.json").read_text())
    assert record["rows"] == pytest.approx(halves_bench.score_study(seed10, halves_bench.ensemble.DEFAULT_POOL, 10))
    assert "--study" in record["command"] and record["code"]
    shutil.rmtree(seed10)  # the machine that ran it is gone; its record stays
    capsys.readouterr()
    run_main(monkeypatch, "--study", seed9, "--steps", 10, "--rule", "tpe_seed9", "tpe_seed10", "--write")
    out = capsys.readouterr().out
    md = (tmp_path / "halves.md").read_text()
    assert "| tpe_seed10 | family" in md and "the records of 1 studies scored earlier" in md
    assert md.index("| tpe_seed9 |") < md.index("| tpe_seed10 |")  # by seed, not as text
    assert "2 of 2 in" in out and "decided:" in out and "Mean over 2 studies" in md
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["tpe_seed10.json", "tpe_seed9.json"]
    shutil.rmtree(seed9)
    run_main(monkeypatch, "--rule", "tpe_seed9", "tpe_seed10", "--write")  # the records alone: no folder, no scoring
    assert capsys.readouterr().out.count("decided:") == 1
    # The table says how to make it again: a command that runs, with no empty --study.
    assert ("`NAS_DATA_DIR=../shared/data python bench/ensemble_halves.py --rule tpe_seed9 tpe_seed10 --write` "
            "(with the records of 2 studies scored earlier" in (tmp_path / "halves.md").read_text())


def test_nothing_to_tabulate_and_two_folders_of_one_name_are_refused(study, tmp_path, monkeypatch):
    monkeypatch.setattr(halves_bench, "RECORDS", tmp_path / "no_records")
    with pytest.raises(SystemExit, match="nothing to tabulate"):
        run_main(monkeypatch, "--rule", "tpe_seed9")
    with pytest.raises(SystemExit, match="different names"):
        run_main(monkeypatch, "--study", study, tmp_path / ".." / tmp_path.name)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not an ensemble_halves record"),
    ('{"rows": []}', "got no rows"),
    ('{"rows": [{"study": "tpe_seed4", "library": "family"}]}', "expected rows of study 'tpe_seed3' with keys"),
    (json.dumps({"rows": [{"study": "tpe_seed3", "library": "family", "size": 5, "method": "plain",
                           "first_to_second": 0.6, "second_to_first": 0.7, "held_out": "0.65", "val_mse": 0.6,
                           "test_mse": 0.37}]}), "numbers"),
])
def test_a_broken_record_is_named_with_how_to_mend_it(tmp_path, text, expected):
    (tmp_path / "tpe_seed3.json").write_text(text)
    with pytest.raises(SystemExit, match=expected) as e:
        halves_bench.read_records(tmp_path)
    assert "tpe_seed3.json" in str(e.value) and "--write" in str(e.value)


def test_the_committed_records_read_and_order_by_seed():
    rows = halves_bench.read_records()
    studies = list(dict.fromkeys(r["study"] for r in sorted(rows, key=lambda r: halves_bench.study_order(r["study"]))))
    assert studies[:6] == [f"tpe_seed{i}" for i in range(3, 9)]
    assert all(len([r for r in rows if r["study"] == s]) == 6 for s in studies)
