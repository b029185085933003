"""Checkpoint retention (--keep-checkpoints): which files go, what the record says, idempotence."""
from nas_agent.agent_state import AgentState, RunInfo, add_run
from nas_agent import run_folder
from nas_agent_graph import retention
from nas_agent_graph.report import render_status

# run id, val MSE, accepted (when it finished), pending confirmation
RUNS = [("run_0000", 1.00, True, False), ("run_0001", 0.90, True, False), ("run_0002", 0.95, False, False),
        ("run_0003", 0.80, True, False), ("run_0004", 0.85, False, False), ("run_0005", None, False, False),
        ("run_0006", 0.99, False, True), ("run_0007", 0.97, False, False)]


def make_study(tmp_path):
    study = AgentState()
    for run_id, val, accepted, pending in RUNS:
        run_dir = tmp_path / run_id
        run_dir.mkdir()
        for name in ("metrics.json", "history.json", "config.py"):
            (run_dir / name).write_text("{}")
        extra = {"confirm": {"status": "pending"}} if pending else {}
        if val is not None:  # a failed run wrote no checkpoint
            (run_dir / run_folder.CHECKPOINT_FILE).write_bytes(b"w" * 200_000)
            (run_dir / run_folder.FORECASTS_FILE).write_bytes(b"f" * 1_000)
            extra["checkpoint"] = retention.checkpoint_record(run_dir)
        add_run(study, RunInfo(run_id=run_id, val_mse=val, accepted=accepted, status="ok" if val else "failed",
                               extra=extra))
    return study


def on_disk(tmp_path):
    return {p.parent.name for p in tmp_path.glob(f"*/{run_folder.CHECKPOINT_FILE}")}


def test_keeps_incumbents_pending_candidates_and_the_n_best(tmp_path):
    study = make_study(tmp_path)
    doomed = retention.mark_for_deletion(study, tmp_path, keep=2)
    # incumbents 0, 1, 3; pending 6; the two best 3 and 4
    assert sorted(p.parent.name for p in doomed) == ["run_0002", "run_0007"]
    assert all("deleted_at" in study.runs[i].extra["checkpoint"] for i in (2, 7))
    assert "--keep-checkpoints 2" in study.runs[2].extra["checkpoint"]["why"]
    assert on_disk(tmp_path) == {"run_0000", "run_0001", "run_0002", "run_0003", "run_0004", "run_0006", "run_0007"}
    assert retention.delete(doomed) == 402_000  # marked first, deleted once the caller has saved
    assert on_disk(tmp_path) == {"run_0000", "run_0001", "run_0003", "run_0004", "run_0006"}
    # the checkpoint's forecasts (the ensemble's input) go with it
    assert {p.parent.name for p in tmp_path.glob(f"*/{run_folder.FORECASTS_FILE}")} == on_disk(tmp_path)
    assert all((tmp_path / "run_0002" / name).exists() for name in ("metrics.json", "history.json", "config.py"))
    # a second pass (a resume) deletes nothing more and keeps the first record
    first = dict(study.runs[2].extra["checkpoint"])
    assert retention.mark_for_deletion(study, tmp_path, keep=2) == []
    assert study.runs[2].extra["checkpoint"] == first


def test_a_crash_between_record_and_delete_deletes_again_and_all_keeps_everything(tmp_path):
    study = make_study(tmp_path)
    retention.mark_for_deletion(study, tmp_path, keep=0)  # recorded, then "killed" before deleting
    assert retention.mark_for_deletion(study, tmp_path, keep=None) == []  # 'all': nothing
    again = retention.mark_for_deletion(study, tmp_path, keep=0)
    assert sorted(p.parent.name for p in again) == ["run_0002", "run_0004", "run_0007"]
    retention.delete(again)
    assert on_disk(tmp_path) == {"run_0000", "run_0001", "run_0003", "run_0006"}


def test_status_shows_which_runs_keep_a_checkpoint(tmp_path):
    study = make_study(tmp_path)
    retention.delete(retention.mark_for_deletion(study, tmp_path, keep=1))
    text = render_status(study)
    assert "checkpoint" in text and "checkpoints: 4 kept, 3 deleted" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("run_")}
    assert "deleted" in rows["run_0002"] and "0.2 MB" in rows["run_0003"] and "deleted" not in rows["run_0005"]


def test_each_model_family_keeps_its_best_run_for_the_ensemble(tmp_path):
    # The 2 best are linear (DLinear-like); the best PatchTST-like and iTransformer-like runs stay
    # too (the ensemble's diverse members), while a worse run of a kept family goes.
    linear = {"head": "linear", "tokens": "time", "mixer": "none", "decomp": "moving_avg"}
    patch = {"head": "linear", "tokens": "patch", "mixer": "attention", "channels": "independent"}
    variate = {"head": "linear", "tokens": "variate", "mixer": "attention"}
    runs = [("run_0000", 0.64, linear), ("run_0001", 0.65, linear), ("run_0002", 0.66, linear),
            ("run_0003", 0.70, patch), ("run_0004", 0.72, patch), ("run_0005", 0.69, variate)]
    study = AgentState()
    for run_id, val, model in runs:
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / run_folder.CHECKPOINT_FILE).write_bytes(b"w")
        add_run(study, RunInfo(run_id=run_id, val_mse=val, status="ok", config={"model": model}))
    assert {f: r.run_id for f, r in retention.family_bests(study).items()} == {
        "time-none": "run_0000", "patch-attention-ci": "run_0003", "variate-attention": "run_0005"}
    doomed = retention.mark_for_deletion(study, tmp_path, keep=2)
    assert sorted(p.parent.name for p in doomed) == ["run_0002", "run_0004"]
    assert "nor its family's best" in study.runs[4].extra["checkpoint"]["why"]


def test_the_n_best_and_family_bests_count_scored_runs_once_per_config(tmp_path):
    linear = {"head": "linear", "tokens": "time", "mixer": "none"}
    patch = {"head": "linear", "tokens": "patch", "mixer": "attention", "channels": "independent"}
    # a pruned run with the lowest val, a repeated config, then two distinct ones
    runs = [("run_0000", 0.50, patch, "ha", "pruned"), ("run_0001", 0.60, linear, "hb", "ok"),
            ("run_0002", 0.61, linear, "hb", "ok"), ("run_0003", 0.62, linear, "hc", "timeout"),
            ("run_0004", 0.70, patch, "hd", "ok")]
    study = AgentState()
    for run_id, val, model, config_hash, status in runs:
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / run_folder.CHECKPOINT_FILE).write_bytes(b"w")
        add_run(study, RunInfo(run_id=run_id, val_mse=val, status=status, config={"model": model},
                               extra={"config_hash": config_hash}))
    assert [r.run_id for r in retention.scored_runs(study)] == ["run_0001", "run_0003", "run_0004"]
    assert retention.family_bests(study)["patch-attention-ci"].run_id == "run_0004"  # not the pruned run
    doomed = retention.mark_for_deletion(study, tmp_path, keep=2)
    assert sorted(p.parent.name for p in doomed) == ["run_0000", "run_0002"]
