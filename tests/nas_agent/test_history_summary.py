"""Tests for nas_agent.history_summary: the facts each kind of curve must surface."""
import math

import pytest

from nas_agent.history_summary import MAX_CHARS, build_history_summary, fmt

NAN = float("nan")


def _history(train, val, lr=None, val_mae=None):
    """Per-epoch records like the trainer writes (1-based epochs)."""
    lr = lr or [1e-3] * len(train)
    val_mae = val_mae or [math.sqrt(v) if isinstance(v, float) and v == v else v for v in val]
    return [{"epoch": i + 1, "train_loss": t, "train_mse": t, "val_mse": v, "val_mae": m,
             "lr": r, "epoch_time_s": 1.0}
            for i, (t, v, m, r) in enumerate(zip(train, val, val_mae, lr))]


STEADY = _history(train=[1.0, 0.7, 0.5, 0.4, 0.33, 0.3],
                  val=[1.1, 0.8, 0.6, 0.5, 0.45, 0.41])
OVERFIT = _history(train=[1.0, 0.6, 0.4, 0.3, 0.22, 0.15, 0.1],
                   val=[1.0, 0.7, 0.5, 0.55, 0.6, 0.68, 0.75])
PLATEAU = _history(train=[1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                   val=[1.0, 0.62, 0.52, 0.5201, 0.5203, 0.5202, 0.5204, 0.5201])
DIVERGED = _history(train=[1.0, 0.8, 3.5, NAN, NAN], val=[1.0, 0.9, 4.0, NAN, NAN])
LR_DECAY = _history(train=[1.0, 0.7, 0.5, 0.45, 0.42, 0.41],
                    val=[1.0, 0.75, 0.55, 0.5, 0.48, 0.47],
                    lr=[1e-4, 1e-4, 5e-5, 2.5e-5, 1e-5, 2.5e-6])
EXPLODED = _history(train=[1.0, 0.5, 0.4, 2.0, 8.0], val=[1.0, 0.5, 0.45, 3.0, 9.0])

ALL = [STEADY, OVERFIT, PLATEAU, DIVERGED, LR_DECAY, EXPLODED, []]


def test_steady_improvement():
    s = build_history_summary(STEADY)
    assert "Ran 6 epochs" in s
    assert "best epoch 6 with val_mse 0.41" in s
    assert "train_mse improving (0.5->0.3)" in s
    assert "val_mse improving (0.6->0.41)" in s
    assert "overfit" not in s.lower() and "plateau" not in s and "diverged" not in s
    assert "lr constant at 0.001" in s


def test_overfitting_after_epoch_3():
    s = build_history_summary(OVERFIT)
    assert "best epoch 3" in s
    assert "overfit" in s.lower()
    assert "val_mse rose 0.5->0.75" in s
    assert "train_mse fell 0.4->0.1" in s
    assert "val_mse worsening" in s


def test_plateau():
    s = build_history_summary(PLATEAU)
    assert "best epoch 4" not in s  # 0.5201 > 0.52: best stays at epoch 3
    assert "best epoch 3" in s
    assert "plateau" in s
    assert "last 5 epochs" in s
    assert "flat" in s


def test_diverged_with_nan():
    s = build_history_summary(DIVERGED, {"status": "diverged",
                                         "error": "Loss is NaN at epoch 4\nTraceback ..."})
    assert s.startswith("Run diverged: Loss is NaN at epoch 4.")
    assert "Traceback" not in s
    assert "diverged: non-finite" in s and "from epoch 4" in s
    assert "best epoch 2" in s


def test_diverged_by_explosion():
    s = build_history_summary(EXPLODED)
    assert "diverged: val_mse exploded to 9" in s
    assert "20x its best" in s


def test_lr_decay():
    s = build_history_summary(LR_DECAY)
    assert "lr decayed from 1e-4 to 2.5e-6" in s
    assert "4 changes, last at epoch 6" in s


def test_lr_warmup_then_decay():
    hist = _history(train=[1.0, 0.8, 0.6, 0.5], val=[1.0, 0.8, 0.6, 0.5],
                    lr=[1e-4, 1e-3, 5e-4, 1e-4])
    assert "lr warmed up from 1e-4 to 0.001 then decayed to 1e-4" in build_history_summary(hist)


def test_empty_history():
    s = build_history_summary([])
    assert "No epoch completed" in s
    failed = build_history_summary([], {"status": "failed", "error": "CUDA out of memory.\nmore"})
    assert failed.startswith("Run failed: CUDA out of memory.")
    assert "No epoch completed" in failed


def test_ok_status_is_not_mentioned():
    assert not build_history_summary(STEADY, {"status": "ok", "error": None}).startswith("Run")


def test_single_epoch():
    s = build_history_summary(_history(train=[1.0], val=[0.9]))
    assert s.startswith("Ran 1 epoch; best epoch 1 with val_mse 0.9")


def test_missing_keys_and_null_values_do_not_crash():
    s = build_history_summary([{"epoch": 1, "val_mse": None}, {"epoch": 2, "val_mse": None}])
    assert "never finite" in s
    assert "Ran 2 epochs; no val_mse was recorded." in build_history_summary([{}, {}])


@pytest.mark.parametrize("hist", ALL)
def test_length_bounds_and_determinism(hist):
    s = build_history_summary(hist)
    assert 20 < len(s) < 400
    assert s == build_history_summary([dict(r) for r in hist])


def test_hard_cap_with_huge_error_and_long_history():
    long_hist = _history(train=[1.0 / (i + 1) for i in range(200)],
                         val=[0.5 + 0.001 * (i - 50) ** 2 for i in range(200)],
                         lr=[1e-3 * 0.97 ** i for i in range(200)])
    s = build_history_summary(long_hist, {"status": "timeout", "error": "x" * 5000})
    assert len(s) <= MAX_CHARS
    assert s.startswith("Run timeout: xxx")
    assert "xxx... Ran 200 epochs; best epoch 51" in s
    # val soars while train keeps falling: overfitting, not divergence.
    assert "overfit" in s.lower() and "diverged" not in s


def test_fmt_is_compact():
    assert [fmt(x) for x in (1e-4, 2.5e-6, 0.341234, 12345.6, 0.0, 3, NAN)] == \
        ["1e-4", "2.5e-6", "0.3412", "1.235e4", "0", "3", "nan"]


def test_readme_summary_snippet_reads_either_history_form(tmp_path, monkeypatch):
    """The README's example: load_history, then build_history_summary on what it returns."""
    import json
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    from nas_agent import load_history, build_history_summary, save_history

    train = [1.02 - 0.04 * i for i in range(20)]
    val = [1.05 - 0.04 * i for i in range(18)] + [0.4, 0.45]  # lowest at epoch 17 (0-based, as in the README)
    epochs = [{"epoch": i, "train_mse": t, "val_mse": v, "lr": 1e-4} for i, (t, v) in enumerate(zip(train, val))]
    save_history(Path("runs/run_0000"), {"best_epoch": 17, "epochs": epochs})

    history = load_history(Path("runs/run_0000"))
    summary = build_history_summary(history)
    assert summary.startswith("Ran 20 epochs; best epoch 17 with val_mse 0.37.")
    (tmp_path / "runs" / "run_0000" / "history.json").write_text(json.dumps(epochs))  # the older list form
    assert build_history_summary(load_history(Path("runs/run_0000"))) == summary == build_history_summary(epochs)
