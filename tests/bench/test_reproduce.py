"""bench/reproduce.py's bookkeeping: a finished run counts only while its config is the one the
shipped file gives now, so the table never mixes two versions of a config."""
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


def test_a_run_of_the_current_config_counts_and_a_changed_one_does_not(tmp_path):
    args = rp.parse_args(["--configs", "tsmixer", "--datasets", "ETTh1", "--seeds", "2", "--out", str(tmp_path)])
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
                           "--out", str(tmp_path), "--report-only"], cwd=ROOT, env=run_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[stale] tsmixer_ETTh1_s2021: trained with another version of configs/tsmixer.py" in proc.stdout
    assert "model.raw_tokens: False -> True" in proc.stdout
    assert "| tsmixer | ETTh1 | 512 | 0/1 |" in proc.stdout


def test_a_killed_attempt_is_resumed_and_an_ended_or_stale_one_restarted(tmp_path):
    args = rp.parse_args(["--configs", "tsmixer", "--datasets", "ETTh1", "--out", str(tmp_path)])
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
