"""Ensemble selection at the end of a study: the selection rule on arrays, then a real study."""
import json
from collections import Counter

import numpy as np
import pytest

from nas_agent.agent_state import AgentState, load_agent_state, save_agent_state
from nas_agent import forecasts
from nas_agent.schema import model_family
from nas_agent_graph import ensemble
from nas_agent_graph.testing import TINY_SPACE
from tests.nas_agent_graph.test_cli import cli, search_args

# ------------------------------------------------------------------------ the selection rule


def test_selection_averages_runs_whose_errors_cancel():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 4, 2))
    noise = rng.normal(size=target.shape)
    val = {"a": target + noise, "b": target - noise, "c": target + 3 * noise}
    picks = ensemble.select(val, target, steps=10)
    assert set(picks) == {"a", "b"} and picks.count("a") == picks.count("b")  # the errors cancel exactly
    assert ensemble.mse(sum(val[k] for k in picks) / len(picks), target) == pytest.approx(0.0, abs=1e-20)


def test_selection_keeps_the_best_prefix_and_breaks_ties_by_order():
    target = np.zeros((10, 3, 1))
    val = {"best": np.full_like(target, 0.1), "same": np.full_like(target, 0.1), "worse": np.full_like(target, 0.5)}
    # Nothing improves on the best run alone: the ensemble is that run, once.
    assert ensemble.select(val, target, steps=20) == ["best"]
    with pytest.raises(ensemble.EnsembleError):
        ensemble.select({}, target, steps=5)


def test_bagged_selection_averages_the_selections_of_random_halves(monkeypatch):
    rng = np.random.default_rng(1)
    target = rng.normal(size=(40, 4, 2))
    val = {k: target + s * rng.normal(size=target.shape) for k, s in (("a", 0.5), ("b", 0.6), ("c", 0.7), ("d", 2.0))}
    weights, picks = ensemble.select_bagged(val, target, steps=10, bags=8, seed=3)
    assert sum(weights.values()) == pytest.approx(1.0) and set(weights) <= set(val)
    assert (weights, picks) == ensemble.select_bagged(val, target, steps=10, bags=8, seed=3)  # seeded
    # A bag that holds every run is the plain selection: with 3 such bags, its weights exactly.
    monkeypatch.setattr(ensemble, "BAG_FRACTION", 1.0)
    plain = ensemble.select(val, target, steps=10)
    weights, picks = ensemble.select_bagged(val, target, steps=10, bags=3)
    assert weights == pytest.approx({k: n / len(plain) for k, n in Counter(plain).items()})
    assert picks == Counter({k: 3 * n for k, n in Counter(plain).items()})


def test_the_library_holds_the_best_runs_and_each_familys_best(tmp_path):
    from nas_agent.agent_state import RunInfo, add_run
    linear = {"head": "linear", "tokens": "time", "mixer": "none"}
    patch = {"head": "linear", "tokens": "patch", "mixer": "attention", "channels": "independent"}
    study = AgentState()
    # val, model, checkpoint on disk, config hash, status
    runs = [(0.64, linear, True, "h0", "ok"), (0.645, linear, True, "h0", "ok"), (0.65, linear, True, "h1", "ok"),
            (0.66, linear, True, "h2", "ok"), (0.71, patch, True, "h3", "timeout"), (0.70, {}, False, "h4", "ok"),
            (0.73, {}, True, "h5", "ok"), (0.60, patch, True, "h6", "pruned"), (0.74, {}, True, "h7", "ok")]
    for i, (val, model, checkpoint, config_hash, status) in enumerate(runs):
        (tmp_path / f"run_{i:04d}").mkdir()
        if checkpoint:
            (tmp_path / f"run_{i:04d}" / "best_model.pth").write_bytes(b"w")
        add_run(study, RunInfo(run_id=f"run_{i:04d}", val_mse=val, status=status, config={"model": model},
                               extra={"config_hash": config_hash}))
    runs, skipped = ensemble.pool_runs(study, tmp_path, 2)
    # The 2 best configs (run_0001 repeats run_0000's), then PatchTST-like run_0004 (the pruned
    # run_0007 is not scored). Informer's best, run_0005, lost its checkpoint: its next best,
    # run_0006, stands in, and only the family's best gets a note.
    assert [r.run_id for r in runs] == ["run_0000", "run_0002", "run_0004", "run_0006"]
    assert skipped == ["run_0005 (val 0.7000): no best_model.pth (deleted by retention)"]
    # A pool that reaches the deleted run passes over it, noted once, and fills up with the next.
    runs, skipped = ensemble.pool_runs(study, tmp_path, 5)
    assert [r.run_id for r in runs] == ["run_0000", "run_0002", "run_0003", "run_0004", "run_0006"]
    assert skipped == ["run_0005 (val 0.7000): no best_model.pth (deleted by retention)"]
    runs, skipped = ensemble.pool_runs(study, tmp_path, 2, families=False)
    assert [r.run_id for r in runs] == ["run_0000", "run_0002"] and skipped == []


# ------------------------------------------------------------------------ a real study


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 5-run TPE study on the tiny space, with the CLI's default ensemble at its end."""
    from tests.conftest import TINY_CONFIG
    study = tmp_path_factory.mktemp("ens")
    (study / "config.py").write_text(TINY_CONFIG)
    (study / "space.json").write_text(json.dumps(TINY_SPACE))
    proc = cli(study, *search_args(5))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return study, proc


def _recomputed(study, record, split):
    """The MSE of the members' forecasts averaged with the record's weights (rounded to 1e-6)."""
    members = {m["run_id"]: m["weight"] for m in record["members"]}
    arrays = {rid: np.load(study / "runs" / rid / "forecasts.npz") for rid in members}
    pred = sum(arrays[rid][split].astype(np.float64) * w for rid, w in members.items())
    rid = next(iter(members))
    target = forecasts.windows(arrays[rid][f"{split}_target_rows"], pred.shape[1])
    return float(np.mean((pred - target) ** 2))


def test_a_study_ends_with_an_ensemble_selected_on_validation(finished):
    study, proc = finished
    record = json.loads((study / "runs" / "ensemble.json").read_text())
    state = load_agent_state(study / "agent_state.json")
    scored = sorted((r for r in state.runs if r.status in ("ok", "timeout")), key=lambda r: r.val_mse)
    # The library: the 5 best, and each model family's best beside them, best first.
    family_best = {}
    for r in scored:
        family_best.setdefault(model_family(r.config.get("model") or {}), r)
    library = {r.run_id for r in scored[:ensemble.DEFAULT_POOL]} | {r.run_id for r in family_best.values()}
    assert record["library"] == [r.run_id for r in scored if r.run_id in library] and record["skipped"] == []
    assert record["families"] is True and "each model family's best" in record["library_rule"]
    # Bagged selection, the default (docs/search.md): recorded so, and rebuilt so whatever the default becomes.
    assert record["bags"] == ensemble.DEFAULT_BAGS > 0 and f"bagged: {ensemble.DEFAULT_BAGS} bags" in record["method"]
    assert record["rebuild"].endswith(f"--bags {ensemble.DEFAULT_BAGS}")
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0, abs=1e-5)
    assert record["best_single"]["run_id"] == scored[0].run_id
    # Its numbers are those of the weighted average of the members' forecasts, every window.
    assert record["val_mse"] == pytest.approx(_recomputed(study, record, "val"), rel=1e-4)
    assert record["test_mse"] == pytest.approx(_recomputed(study, record, "test"), rel=1e-4)
    assert record["windows"]["test"] == len(np.load(study / "runs" / scored[0].run_id / "forecasts.npz")["test"])
    assert f"ensemble_test_mse: {record['test_mse']:.6f}" in proc.stdout
    first = record["members"][0]
    assert f"ensemble_members: {first['run_id']} {first['weight']:.1%} ({first['family']})" in proc.stdout
    status = cli(study, "status")
    assert status.returncode == 0 and f"ensemble_test_mse: {record['test_mse']:.6f}" in status.stdout


def test_test_forecasts_never_steer_the_selection_and_a_missing_file_is_predicted_again(finished):
    study, _ = finished
    before = json.loads((study / "runs" / "ensemble.json").read_text())
    state = load_agent_state(study / "agent_state.json")
    # Scramble every pooled run's test forecasts: the selection must not move, only the test score.
    for rid in before["library"]:
        path = study / "runs" / rid / "forecasts.npz"
        arrays = dict(np.load(path))
        arrays["test"] = arrays["test"][::-1].copy()
        np.savez(path, **arrays)
    (study / "runs" / before["library"][-1] / "forecasts.npz").unlink()  # train.py --predict rebuilds this one
    again = cli(study, "ensemble")
    assert again.returncode == 0, again.stderr[-2000:]
    after = json.loads((study / "runs" / "ensemble.json").read_text())
    assert after["members"] == before["members"] and after["val_mse"] == before["val_mse"]
    assert after["test_mse"] != before["test_mse"]
    assert (study / "runs" / before["library"][-1] / "forecasts.npz").is_file()
    assert load_agent_state(study / "agent_state.json").runs == state.runs  # the study is untouched


@pytest.mark.slow  # ~13 s here
def test_a_forecast_file_that_disagrees_with_its_run_is_left_out(finished):
    study, _ = finished
    record = json.loads((study / "runs" / "ensemble.json").read_text())
    rid = record["library"][0]
    path = study / "runs" / rid / "forecasts.npz"
    arrays = dict(np.load(path))
    arrays["val"] = arrays["val"] + 1.0
    np.savez(path, **arrays)
    proc = cli(study, "ensemble")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((study / "runs" / "ensemble.json").read_text())
    assert rid not in after["library"] and any(s.startswith(f"{rid}: its checkpoint gives val MSE")
                                               for s in after["skipped"])
    path.unlink()  # put it back as train.py would
    assert cli(study, "ensemble").returncode == 0


@pytest.mark.slow  # a second study: ~33 s here
def test_ensemble_off_leaves_none(tmp_path):
    from tests.conftest import TINY_CONFIG
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    proc = cli(tmp_path, *search_args(2), "--ensemble", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "run_0001" / "forecasts.npz").is_file()  # the runs still keep their forecasts
    assert not (tmp_path / "runs" / "ensemble.json").exists() and "ensemble_test_mse" not in proc.stdout


def test_bad_flags_and_an_empty_study_get_clear_messages(tmp_path, finished):
    study, _ = finished
    proc = cli(study, *search_args(1), "--ensemble", "0")
    assert proc.returncode == 2 and "--ensemble '0': expected a number of runs >= 1" in proc.stderr
    proc = cli(study, "ensemble", "--pool", "0")
    assert proc.returncode == 2 and "--pool and --steps must be >= 1" in proc.stderr
    save_agent_state(AgentState(), tmp_path / "agent_state.json")
    proc = cli(tmp_path, "ensemble")
    assert proc.returncode == 1 and "no scored run" in proc.stderr and not (tmp_path / "runs" / "ensemble.json").exists()


def test_bags_0_is_one_selection_never_worse_on_validation_than_the_best_run(finished, tmp_path):
    import shutil
    study = tmp_path / "study"
    shutil.copytree(finished[0], study)
    state = load_agent_state(study / "agent_state.json")
    best = min((r for r in state.runs if r.status in ("ok", "timeout")), key=lambda r: r.val_mse)
    proc = cli(study, "ensemble", "--bags", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((study / "runs" / "ensemble.json").read_text())
    assert record["bags"] == 0 and "bagged" not in record["method"] and record["rebuild"].endswith("--bags 0")
    # The first pick is the best run, so the chosen prefix is never worse on validation (the
    # recorded val MSE and the forecasts' agree to 1e-4, as build checks).
    assert record["val_mse"] <= best.val_mse * (1 + 1e-4)
    # A run's weight is its share of the picks, which the summary shows.
    picks = sum(m["picks"] for m in record["members"])
    assert all(m["weight"] == pytest.approx(m["picks"] / picks, abs=1e-6) for m in record["members"])
    assert record["val_mse"] == pytest.approx(_recomputed(study, record, "val"), rel=1e-4)
    first = record["members"][0]
    assert f"ensemble_members: {first['run_id']}x{first['picks']} ({first['family']})" in proc.stdout


def test_top_only_chooses_from_the_best_runs_alone(finished, tmp_path):
    import shutil
    study = tmp_path / "study"
    shutil.copytree(finished[0], study)  # the shared study's ensemble.json stays as it is
    state = load_agent_state(study / "agent_state.json")
    scored = sorted((r for r in state.runs if r.status in ("ok", "timeout")), key=lambda r: r.val_mse)
    proc = cli(study, "ensemble", "--pool", "2", "--top-only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((study / "runs" / "ensemble.json").read_text())
    assert record["library"] == [r.run_id for r in scored[:2]] and record["families"] is False
    assert record["rebuild"].endswith(f"--pool 2 --steps 20 --top-only --bags {ensemble.DEFAULT_BAGS}")


def test_a_bagged_ensemble_is_recorded_and_scored_with_its_weights(finished, tmp_path):
    import shutil
    study = tmp_path / "study"
    shutil.copytree(finished[0], study)
    proc = cli(study, "ensemble", "--bags", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((study / "runs" / "ensemble.json").read_text())
    assert record["bags"] == 5 and "bagged: 5 bags" in record["method"] and record["rebuild"].endswith("--bags 5")
    # Picks are summed over the bags, so the summary shows each member's weight instead.
    first = record["members"][0]
    assert f"ensemble_members: {first['run_id']} {first['weight']:.1%} ({first['family']})" in proc.stdout
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0, abs=1e-5)
    arrays = {m["run_id"]: np.load(study / "runs" / m["run_id"] / "forecasts.npz") for m in record["members"]}
    for split in ("val", "test"):
        pred = sum(arrays[m["run_id"]][split].astype(np.float64) * m["weight"] for m in record["members"])
        target = forecasts.windows(next(iter(arrays.values()))[f"{split}_target_rows"], pred.shape[1])
        assert record[f"{split}_mse"] == pytest.approx(float(np.mean((pred - target) ** 2)), rel=1e-4)
    assert cli(study, "ensemble", "--bags", "-1").returncode == 2


# ------------------------------------------------------------------------ seed averaging


def _seed(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["seed"]


def test_seed_averaging_trains_each_member_again_and_keeps_the_weights(finished, tmp_path):
    import shutil
    study = tmp_path / "study"
    shutil.copytree(finished[0], study)
    plain = json.loads((study / "runs" / "ensemble.json").read_text())
    proc = cli(study, "ensemble", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((study / "runs" / "ensemble.json").read_text())
    # The selection is the plain one: seed averaging chooses nothing.
    assert record["members"] == plain["members"] and record["seeds"] == 1 and record["seed_notes"] == []
    assert record["single_seed"]["val_mse"] == pytest.approx(plain["val_mse"], rel=1e-12)
    assert record["single_seed"]["test_mse"] == pytest.approx(plain["test_mse"], rel=1e-12)
    assert record["rebuild"].endswith("--seeds 1")
    runs = study / "runs"
    folders = {}
    for m in record["members"]:
        rid, seed = m["run_id"], _seed(runs / m["run_id"])
        folders[rid] = runs / "seed_runs" / f"{rid}_s{seed + 1}"
        assert _seed(folders[rid]) == seed + 1 and record["seed_runs"][rid]["seeds"] == [seed, seed + 1]
    # Recomputed from the files: each member's two forecasts averaged, then weighted.
    for split in ("val", "test"):
        own = {rid: np.load(runs / rid / "forecasts.npz") for rid in folders}
        new = {rid: np.load(f / "forecasts.npz") for rid, f in folders.items()}
        pred = sum((own[m["run_id"]][split].astype(np.float64) + new[m["run_id"]][split]) / 2 * m["weight"]
                   for m in record["members"])
        target = forecasts.windows(next(iter(own.values()))[f"{split}_target_rows"], pred.shape[1])
        assert record[f"{split}_mse"] == pytest.approx(float(np.mean((pred - target) ** 2)), rel=1e-4)
    assert record["val_mse"] != plain["val_mse"]  # the new seeds took part
    spent = sum(json.loads((f / "metrics.json").read_text())["train_time_sec"] for f in folders.values())
    assert record["seed_runs_train_s"] == pytest.approx(spent, abs=0.1) and spent > 0
    assert f"ensemble_seeds: each member averaged over its own seed and up to 1 more ({len(folders)} seed runs" \
        in proc.stdout and f"ensemble_single_seed: val {plain['val_mse']:.6f}" in proc.stdout
    # A second build reuses the seed runs; the study itself never sees them.
    stamps = {rid: (f / "metrics.json").stat().st_mtime_ns for rid, f in folders.items()}
    again = cli(study, "ensemble", "--seeds", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((runs / "ensemble.json").read_text())["val_mse"] == record["val_mse"]
    assert stamps == {rid: (f / "metrics.json").stat().st_mtime_ns for rid, f in folders.items()}
    status = cli(study, "status")
    assert status.returncode == 0 and "seed_runs" not in status.stdout + status.stderr
    assert [r.run_id for r in load_agent_state(study / "agent_state.json").runs] == \
        [r.run_id for r in load_agent_state(finished[0] / "agent_state.json").runs]
    assert cli(study, "ensemble", "--seeds", "-1").returncode == 2


@pytest.mark.slow  # ~30 s here: a copy of the study, several train.py starts
def test_a_seed_run_that_fails_is_a_note_and_an_unfinished_one_is_trained_again(finished, tmp_path, monkeypatch):
    import shutil
    from tests.conftest import DATA_DIR
    monkeypatch.setenv("NAS_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study = tmp_path / "study"
    shutil.copytree(finished[0], study)
    state, runs = load_agent_state(study / "agent_state.json"), study / "runs"
    plain = ensemble.build(state, runs)
    # A wall limit no train.py can meet: every seed run is stopped, and each member keeps its own seed.
    record = ensemble.build(state, runs, seeds=1, retrain_timeout_s=0.5)
    assert record["members"] == plain["members"] and record["val_mse"] == pytest.approx(plain["val_mse"], rel=1e-12)
    assert len(record["seed_notes"]) == len(plain["members"])
    assert all("train.py took more than 0.5s" in n for n in record["seed_notes"])
    assert all(len(i["seeds"]) == 1 for i in record["seed_runs"].values())
    # The first member's next seed: a folder a killed run left (forecasts, but status interrupted),
    # which must be trained again; the one after: a scored folder of other windows, left out.
    rid = plain["members"][0]["run_id"]
    seed = _seed(runs / rid)
    killed, other = (runs / "seed_runs" / f"{rid}_s{seed + k}" for k in (1, 2))
    for folder, status in ((killed, "interrupted"), (other, "ok")):
        folder.mkdir(parents=True, exist_ok=True)
        arrays = dict(np.load(runs / rid / "forecasts.npz"))
        if folder == other:
            arrays["val_target_rows"] = arrays["val_target_rows"] + 1.0
        np.savez(folder / "forecasts.npz", **arrays)
        (folder / "metrics.json").write_text(json.dumps({"status": status, "seed": seed, "train_time_sec": 1.0}))
    record = ensemble.build(state, runs, seeds=2)
    assert _seed(killed) == seed + 1 and json.loads((killed / "metrics.json").read_text())["status"] in ("ok", "timeout")
    assert record["seed_runs"][rid]["seeds"] == [seed, seed + 1]
    assert record["seed_notes"] == [f"seed run left out: {other.name}: its windows differ from {rid}'s"]
    assert all(len(i["seeds"]) == 3 for r, i in record["seed_runs"].items() if r != rid)
    assert record["val_mse"] != plain["val_mse"]


def test_an_unreadable_forecasts_file_is_an_error_that_names_the_run(tmp_path):
    (tmp_path / "run_0007").mkdir()
    (tmp_path / "run_0007" / "forecasts.npz").write_bytes(b"not an npz")
    with pytest.raises(ensemble.EnsembleError, match=r"^run_0007: .*delete it to have it made again"):
        ensemble.load_forecasts(tmp_path / "run_0007")
