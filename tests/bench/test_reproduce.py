"""bench/reproduce.py's bookkeeping: a finished run counts only while its config is the one the
shipped file gives now, so the table never mixes two versions of a config; each finished run
leaves a record that counts on a machine without its run folder."""
from __future__ import annotations

import json
import subprocess

import torch

import train
from nas_agent.config import config_hash, load_config, render_config
from tests.conftest import PYTHON, ROOT, load_bench_script, run_env

rp = load_bench_script("reproduce")


def fake_finished_run(out, config: str, dataset: str, seed: int, model_changes: dict, test_mse: float):
    """A run folder as train.py leaves it: config_used.py (channels filled in) and metrics.json."""
    overrides = rp.run_overrides(config, dataset, []) + [f"training.seed={seed}"]  # as train.py --seed sets it
    cfg = load_config(ROOT / "configs" / f"{config}.py", overrides).model_dump()
    cfg["model"].update(enc_in=7, dec_in=7, c_out=7, **model_changes)
    run_dir = out / rp.tag_for(config, dataset, seed, [])
    run_dir.mkdir(parents=True)
    (run_dir / "config_used.py").write_text(render_config(cfg))
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "ok", "test_mse": test_mse, "test_mae": 0.4, "val_mse": 0.7, "train_time_sec": 10.0,
        "epochs_run": 3, "best_epoch": 2}))
    return run_dir


def resume_state(run_dir, config: str, seed: int, model_hash: str | None = None) -> None:
    """The part of train.py's resume_state.pt that decides whether --resume continues it."""
    cfg = load_config(ROOT / "configs" / f"{config}.py", rp.run_overrides(config, "ETTh1", []) + [f"training.seed={seed}"])
    state = dict.fromkeys(train.RESUME_KEYS, 0)  # the rest is what restore_resume_state reads
    state.update(config_hash=config_hash(cfg), model_hash=model_hash or train.model_file_hash(str(ROOT / "model.py")))
    torch.save(state, run_dir / "resume_state.pt")


def bench_args(tmp_path, *more: str):
    """Arguments with --out and --records in tmp_path (never the checkout's committed records)."""
    return rp.parse_args(["--configs", "tsmixer", "--datasets", "ETTh1", "--out", str(tmp_path),
                          "--records", str(tmp_path / "records"), *more])


def test_a_run_of_the_current_config_counts_and_a_changed_one_does_not(tmp_path):
    args = bench_args(tmp_path, "--seeds", "2")
    # (Seeds 2021 and 2022, as the real benchmark runs them.)
    current = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {}, 0.371)
    old = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0 + 1, {"raw_tokens": False, "d_model": 16}, 0.7)
    assert rp.config_changes(current, "tsmixer", "ETTh1", rp.SEED0, []) == []
    assert rp.config_changes(old, "tsmixer", "ETTh1", rp.SEED0 + 1, []) == ["model.d_model: 16 -> 256",
                                                                          "model.raw_tokens: False -> True"]
    # The seed is the run's own: another seed's run is not a changed config.
    assert rp.config_changes(current, "tsmixer", "ETTh1", rp.SEED0 + 1, []) == ["training.seed: 2021 -> 2022"]
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0, args)["test_mse"] == 0.371
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0 + 1, args) is None
    row = next(line for line in rp.table(args).splitlines() if line.startswith("| tsmixer | ETTh1"))
    assert "| 1/2 |" in row and "0.3710" in row and "0.7" not in row.split("|")[5]


def test_report_only_says_which_run_is_stale(tmp_path):
    fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {"raw_tokens": False}, 0.7)
    proc = subprocess.run([PYTHON, "bench/reproduce.py", "--configs", "tsmixer", "--datasets", "ETTh1", "--seeds", "1",
                           "--out", str(tmp_path), "--records", str(tmp_path / "records"), "--report-only"], cwd=ROOT, env=run_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[stale] tsmixer_ETTh1_s2021: trained with another version of configs/tsmixer.py" in proc.stdout
    assert "model.raw_tokens: False -> True" in proc.stdout
    assert "| tsmixer | ETTh1 | 512 | 0/1 |" in proc.stdout


def test_a_killed_attempt_is_resumed_and_an_ended_or_stale_one_restarted(tmp_path):
    args = bench_args(tmp_path)
    assert rp.restart_reason(tmp_path / "absent", "tsmixer", "ETTh1", rp.SEED0, args) is None
    run = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {}, 0.371)
    for status, reason in (("failed", "it ended failed"), ("pruned", "it ended pruned"), ("interrupted", None)):
        (run / "metrics.json").write_text(json.dumps({"status": status}))
        assert rp.restart_reason(run, "tsmixer", "ETTh1", rp.SEED0, args) == reason
    (run / "metrics.json").write_text(json.dumps({"status": "failed"}))
    resume_state(run, "tsmixer", rp.SEED0)  # a passing failure that kept its state: resumed
    assert rp.restart_reason(run, "tsmixer", "ETTh1", rp.SEED0, args) is None
    # A state train.py --resume would refuse is trained afresh, not refused at every invocation.
    resume_state(run, "tsmixer", rp.SEED0, model_hash="0123456789abcdef")  # model.py edited since
    assert rp.restart_reason(run, "tsmixer", "ETTh1", rp.SEED0, args).startswith(
        "its resume state cannot be continued (--resume: ") and "another model file" in rp.restart_reason(
        run, "tsmixer", "ETTh1", rp.SEED0, args)
    (run / "resume_state.pt").write_bytes(b"torn")
    assert "does not load" in rp.restart_reason(run, "tsmixer", "ETTh1", rp.SEED0, args)
    resume_state(run, "tsmixer", rp.SEED0)
    (run / "metrics.json").write_text("{torn")
    assert rp.restart_reason(run, "tsmixer", "ETTh1", rp.SEED0, args) == "its metrics.json does not read"
    (run / "metrics.json").unlink()  # killed: train.py --resume takes it over
    assert rp.restart_reason(run, "tsmixer", "ETTh1", rp.SEED0, args) is None
    stale = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0 + 1, {"raw_tokens": False}, 0.7)
    (stale / "metrics.json").unlink()
    assert rp.restart_reason(stale, "tsmixer", "ETTh1", rp.SEED0 + 1, args) == (
        "it trained another version of configs/tsmixer.py (model.raw_tokens: False -> True)")


def test_a_finished_run_leaves_a_record_that_counts_without_its_folder(tmp_path, monkeypatch):
    args = bench_args(tmp_path, "--seeds", "2")
    run = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {}, 0.371)
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0, args)["test_mse"] == 0.371
    record_file = tmp_path / "records" / f"{run.name}.json"
    record = json.loads(record_file.read_text())
    assert record["test_mse"] == 0.371 and record["seed"] == rp.SEED0 and record["config_used"]["model"]["d_model"] == 256
    # Read again: the record is left as it is (no new date, so a committed record does not churn).
    record_file.write_text(record_file.read_text().replace(record["recorded"], "2000-01-01T00:00"))
    rp.finished("tsmixer", "ETTh1", rp.SEED0, args)
    assert json.loads(record_file.read_text())["recorded"] == "2000-01-01T00:00"

    # Another machine: the record, no run folder. It counts, and train_one does not train it again.
    for f in run.iterdir():
        f.unlink()
    run.rmdir()
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0, args)["test_mse"] == 0.371

    def no_training(*a, **k):
        raise AssertionError("a run with a current record was trained again")

    monkeypatch.setattr(rp.subprocess, "call", no_training)
    assert rp.train_one("tsmixer", "ETTh1", rp.SEED0, args)["test_mse"] == 0.371
    assert not run.exists()
    row = next(line for line in rp.table(args).splitlines() if line.startswith("| tsmixer | ETTh1"))
    assert "| 1/2 |" in row and "0.3710" in row


def test_a_stale_or_unreadable_record_does_not_count(tmp_path, capsys):
    args = bench_args(tmp_path, "--seeds", "3")
    records = tmp_path / "records"
    run = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {}, 0.371)
    rp.finished("tsmixer", "ETTh1", rp.SEED0, args)
    record = json.loads((records / f"{run.name}.json").read_text())
    # Trained before a config change: stale, with what changed.
    stale = dict(record, tag=rp.tag_for("tsmixer", "ETTh1", rp.SEED0 + 1, []), seed=rp.SEED0 + 1)
    stale["config_used"] = dict(record["config_used"], training=dict(record["config_used"]["training"], seed=rp.SEED0 + 1),
                                model=dict(record["config_used"]["model"], raw_tokens=False))
    (records / f"{stale['tag']}.json").write_text(json.dumps(stale))
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0 + 1, args) is None
    assert f"[stale] {records / 'tsmixer_ETTh1_s2022.json'}: trained with another version of configs/tsmixer.py " \
           "(model.raw_tokens: False -> True); not counted (delete it, and the run is trained again)" \
           in capsys.readouterr().out
    # A torn record, and one that is not a finished run's: named, not counted.
    torn = rp.tag_for("tsmixer", "ETTh1", rp.SEED0 + 2, [])
    (records / f"{torn}.json").write_text("{torn")
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0 + 2, args) is None
    assert f"{torn}.json does not read" in capsys.readouterr().out
    (records / f"{torn}.json").write_text(json.dumps({"status": "failed"}))
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0 + 2, args) is None
    assert "is not a finished run's record" in capsys.readouterr().out


def test_a_record_without_mae_says_over_how_many_seeds_the_cell_is(tmp_path):
    args = bench_args(tmp_path, "--seeds", "2")
    for seed, mse in ((rp.SEED0, 0.371), (rp.SEED0 + 1, 0.381)):
        fake_finished_run(tmp_path, "tsmixer", "ETTh1", seed, {}, mse)
        rp.finished("tsmixer", "ETTh1", seed, args)
    path = tmp_path / "records" / f"{rp.tag_for('tsmixer', 'ETTh1', rp.SEED0 + 1, [])}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, test_mae=None, val_mse=None)))
    for run in tmp_path.glob("tsmixer_*"):  # the records alone
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    cells = next(line for line in rp.table(args).splitlines() if line.startswith("| tsmixer | ETTh1")).split(" | ")
    assert cells[3:7] == ["2/2", "0.3760 ± 0.0071", "0.4000 (1 of 2)", "0.7000 (1 of 2)"]


def test_train_one_records_the_run_it_trained_unless_it_deviates_from_the_paper(tmp_path, monkeypatch):
    def fake_train(cmd, **kwargs):  # train.py's part: a finished run folder
        fake_finished_run(tmp_path, "tsmixer", "ETTh1", int(cmd[cmd.index("--seed") + 1]), {}, 0.371)
        return 0

    monkeypatch.setattr(rp.subprocess, "call", fake_train)
    args = bench_args(tmp_path)
    assert rp.train_one("tsmixer", "ETTh1", rp.SEED0, args)["test_mse"] == 0.371
    record = json.loads((tmp_path / "records" / "tsmixer_ETTh1_s2021.json").read_text())
    assert record["test_mse"] == 0.371 and record["model_py"] == train.model_file_hash(str(ROOT / "model.py"))
    # --set: not the papers' settings, so nothing is recorded.
    rp.finished("tsmixer", "ETTh1", rp.SEED0, bench_args(tmp_path, "--set", "training.max_epochs=2"))
    assert [f.name for f in (tmp_path / "records").iterdir()] == ["tsmixer_ETTh1_s2021.json"]


def test_a_record_names_the_model_file_the_run_reports(tmp_path):
    # train.py --model OTHER reports OTHER's hash in metrics.json; the record keeps it, not model.py's.
    run = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {}, 0.371)
    m = json.loads((run / "metrics.json").read_text())
    record = rp.make_record(run, dict(m, model_hash="0123456789abcdef"), "tsmixer", "ETTh1", rp.SEED0, [])
    assert record["model_py"] == "0123456789abcdef"
    assert rp.make_record(run, m, "tsmixer", "ETTh1", rp.SEED0, [])["model_py"] == train.model_file_hash(
        str(ROOT / "model.py"))  # a run from before train.py reported it


def test_a_record_from_before_a_new_schema_key_still_counts(tmp_path):
    """A key the schema gained since (absent from the record, its default what the config gives) is
    no change; a record whose config no longer validates is stale, with the reason."""
    args = bench_args(tmp_path)
    fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0, {}, 0.371)
    rp.finished("tsmixer", "ETTh1", rp.SEED0, args)
    path = tmp_path / "records" / "tsmixer_ETTh1_s2021.json"
    for run in tmp_path.glob("tsmixer_*"):
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    record = json.loads(path.read_text())
    del record["config_used"]["data"]["label_len"]  # as if written before the key existed
    path.write_text(json.dumps(record))
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0, args)["test_mse"] == 0.371
    record["config_used"]["model"]["d_model"] = -1
    path.write_text(json.dumps(record))
    assert rp.finished("tsmixer", "ETTh1", rp.SEED0, args) is None


def test_a_record_keeps_where_the_run_trained_and_the_row_says_it(tmp_path):
    """metrics.json's device and amp go into the record; the table's device cell names each device
    of a row's runs, and says how many records predate the key."""
    args = bench_args(tmp_path, "--seeds", "3")
    for i, device in enumerate(["cuda", "cpu", None]):
        run = fake_finished_run(tmp_path, "tsmixer", "ETTh1", rp.SEED0 + i, {}, 0.37)
        m = json.loads((run / "metrics.json").read_text())
        if device:
            m.update(device=device, amp="bf16" if device == "cuda" else "off")
        (run / "metrics.json").write_text(json.dumps(m))
        rp.finished("tsmixer", "ETTh1", rp.SEED0 + i, args)
    records = [json.loads((tmp_path / "records" / f"tsmixer_ETTh1_s{rp.SEED0 + i}.json").read_text()) for i in range(3)]
    assert [(r["device"], r["amp"]) for r in records] == [("cuda", "bf16"), ("cpu", "off"), (None, None)]
    row = next(line for line in rp.table(args).splitlines() if line.startswith("| tsmixer | ETTh1"))
    assert "| cpu+cuda, 1 not recorded |" in row
    assert rp.device_cell([{"device": "cuda"}]) == "cuda"
    assert rp.device_cell([{}, {}]) == "not recorded" and rp.device_cell([]) == "–"
