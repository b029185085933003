"""Tests for nas_agent.logging_utils: metrics.json / history.json save and load."""
import json

import pytest

from nas_agent.logging_utils import (
    RUN_STATUSES, MetricsError, load_history, load_metrics, save_history, save_metrics,
)


def _metrics(**overrides):
    base = {"status": "ok", "best_epoch": 3, "val_mse": 0.25, "val_mae": 0.4,
            "test_mse": 0.3, "test_mae": 0.45, "train_mse": 0.2, "train_time_sec": 12.5,
            "n_params": 1234, "epochs_run": 5, "device": "cpu", "seed": 0, "error": None}
    base.update(overrides)
    return base


def test_statuses_are_the_documented_ones():
    assert RUN_STATUSES == ("ok", "diverged", "timeout", "failed", "interrupted", "pruned", "invalid")


def test_metrics_round_trip_with_nan_as_null(tmp_path):
    save_metrics(tmp_path, _metrics(status="diverged", val_mse=float("nan"), error="NaN loss"))
    loaded = load_metrics(tmp_path)
    assert loaded["status"] == "diverged"
    assert loaded["val_mse"] is None
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))


def test_missing_metrics_is_none(tmp_path):
    assert load_metrics(tmp_path) is None


def test_unknown_status_rejected_on_save(tmp_path):
    with pytest.raises(ValueError, match="unknown run status 'finished'.*ok, diverged"):
        save_metrics(tmp_path, _metrics(status="finished"))
    assert not (tmp_path / "metrics.json").exists()


def test_missing_status_is_saved_as_ok(tmp_path):
    metrics = _metrics()
    del metrics["status"]
    save_metrics(tmp_path, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    assert "status" not in metrics  # the caller's dict is left alone


def test_corrupt_metrics_raises_with_path(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"status": "ok", "val_mse": 0.3', encoding="utf-8")
    with pytest.raises(MetricsError) as info:
        load_metrics(tmp_path)
    assert str(path) in str(info.value)
    assert "line 1" in str(info.value)


@pytest.mark.parametrize("content, expected", [
    ('{"status": "weird"}', "unknown run status 'weird'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_invalid_metrics_content(tmp_path, content, expected):
    (tmp_path / "metrics.json").write_text(content, encoding="utf-8")
    with pytest.raises(MetricsError, match=expected) as info:
        load_metrics(tmp_path)
    assert str(tmp_path / "metrics.json") in str(info.value)


def test_history_round_trip(tmp_path):
    history = [{"epoch": 1, "train_loss": 1.0, "train_mse": 1.0, "val_mse": 1.2,
                "val_mae": 0.9, "lr": 1e-3, "epoch_time_s": 0.5},
               {"epoch": 2, "train_loss": float("nan"), "train_mse": float("nan"),
                "val_mse": float("inf"), "val_mae": None, "lr": 1e-3, "epoch_time_s": 0.5}]
    save_history(tmp_path, {"best_epoch": 1, "epochs": history})
    loaded = load_history(tmp_path)
    assert loaded["best_epoch"] == 1 and loaded["epochs"][0] == history[0]
    assert loaded["epochs"][1]["val_mse"] is None and loaded["epochs"][1]["train_loss"] is None
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert list(on_disk) == ["best_epoch", "epochs"] and len(on_disk["epochs"]) == 2


def test_missing_history_is_empty(tmp_path):
    assert load_history(tmp_path) == {"best_epoch": None, "epochs": []}


def test_corrupt_history_raises_with_path(tmp_path):
    path = tmp_path / "history.json"
    path.write_text("[{\"epoch\": 1}, ", encoding="utf-8")
    with pytest.raises(MetricsError, match="not valid JSON") as info:
        load_history(tmp_path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps([{"epoch": 1}, 5]), encoding="utf-8")
    with pytest.raises(MetricsError, match=r"epochs\[1\] must be an object"):
        load_history(tmp_path)
    path.write_text(json.dumps({"best_epoch": "one", "epochs": []}), encoding="utf-8")
    with pytest.raises(MetricsError, match="best_epoch must be an epoch number or null, got 'one'"):
        load_history(tmp_path)
    path.write_text(json.dumps({"best": 1, "runs": []}), encoding="utf-8")
    with pytest.raises(MetricsError, match='expected {"best_epoch": N, "epochs"'):
        load_history(tmp_path)


# --------------------------------------------------------------------------- the original nas_system's API

def test_readme_logging_snippet_in_a_fresh_directory(tmp_path, monkeypatch):
    """The README's logging example, as written: metrics without a status, runs/run_0000 not made yet."""
    monkeypatch.chdir(tmp_path)
    from pathlib import Path
    from nas_agent import save_metrics, load_metrics, save_history, load_history

    metrics = {
        "val_mse": 0.185,
        "test_mse": 0.192,
        "best_epoch": 17,
    }
    save_metrics(Path("runs/run_0000"), metrics)
    metrics = load_metrics(Path("runs/run_0000"))
    assert metrics == {"status": "ok", "val_mse": 0.185, "test_mse": 0.192, "best_epoch": 17}

    history = {
        "best_epoch": 17,
        "epochs": [
            {"epoch": 0, "train_mse": 1.02, "val_mse": 1.05},
            {"epoch": 1, "train_mse": 0.85, "val_mse": 0.89},
        ]
    }
    save_history(Path("runs/run_0000"), history)
    assert json.loads((tmp_path / "runs" / "run_0000" / "history.json").read_text()) == history
    assert load_history(Path("runs/run_0000")) == history


def test_files_of_the_original_format_and_of_earlier_versions_load(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({  # the README's metrics.json: no status
        "best_epoch": 17, "val_mse": 0.1855, "test_mse": 0.1923, "train_mse": 0.1621,
        "train_time_sec": 285.4, "n_params": 4932103}))
    assert load_metrics(tmp_path)["status"] == "ok" and load_metrics(tmp_path)["n_params"] == 4932103
    # history.json of earlier versions of this project: the bare list of epochs.
    epochs = [{"epoch": 1, "train_mse": 1.0, "val_mse": 0.9, "lr": 1e-3},
              {"epoch": 2, "train_mse": 0.8, "val_mse": 0.7, "lr": 1e-3},
              {"epoch": 3, "train_mse": 0.7, "val_mse": 0.75, "lr": 1e-3}]
    (tmp_path / "history.json").write_text(json.dumps(epochs))
    assert load_history(tmp_path) == {"best_epoch": 2, "epochs": epochs}
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": 1, "val_mse": None}]))
    assert load_history(tmp_path)["best_epoch"] is None  # no finite val_mse: no best epoch
