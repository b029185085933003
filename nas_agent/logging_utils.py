"""Per-run result files: metrics.json and history.json in runs/run_XXXX/.

Both are written atomically (see `nas_agent._atomic`), so a run killed while
saving leaves the previous complete file or none, never a truncated one.
Non-finite floats (a diverged run's NaN loss) are stored as null.

metrics.json: one JSON object with the final outcome of a run.

    status          str, one of RUN_STATUSES (required; see below).
    best_epoch      int | null   1-based epoch with the lowest val_mse.
    val_mse         float | null validation MSE at best_epoch.
    val_mae         float | null validation MAE at best_epoch.
    test_mse        float | null test MSE of the best_epoch weights.
    test_mae        float | null test MAE of the best_epoch weights.
    train_mse       float | null training MSE at best_epoch.
    train_time_sec  float | null wall-clock training time in seconds.
    n_params        int | null   number of trainable parameters.
    epochs_run      int          epochs actually completed.
    device          str          e.g. "cpu", "cuda:0".
    seed            int | null   random seed used.
    error           str | null   error message / traceback tail when status != "ok".

Only `status` is checked here; the trainer owns the other keys, and readers
must tolerate missing ones (a run that failed before training has no val_mse).

history.json: a JSON list, one object per completed epoch, in order.

    epoch         int    1-based epoch number.
    train_loss    float  mean training loss (the criterion actually optimised).
    train_mse     float  training MSE.
    val_mse       float  validation MSE.
    val_mae       float  validation MAE.
    lr            float  learning rate used during the epoch.
    epoch_time_s  float  wall-clock seconds for the epoch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from nas_agent._atomic import atomic_write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"

RUN_STATUSES = (
    "ok",           # trained to the end (or early-stopped normally); metrics are valid
    "diverged",     # loss became NaN/inf or exploded; training was stopped
    "timeout",      # hit the per-run time budget; metrics are from the best epoch so far
    "failed",       # crashed (bad config, OOM, exception); see `error`
    "interrupted",  # stopped by the user or a signal (Ctrl-C, SIGTERM)
    "pruned",       # stopped early by the search because it looked unpromising
)


class MetricsError(ValueError):
    """metrics.json or history.json is unreadable or invalid; the message names the file."""


def check_status(status: Any, where: str) -> None:
    """Raise ValueError unless `status` is a known run status.

    Shared with agent_state so both files agree on the vocabulary.
    """
    if status not in RUN_STATUSES:
        raise ValueError(
            f"{where}: unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}"
        )


def save_metrics(run_dir: str | os.PathLike, metrics: dict) -> Path:
    """Validate and atomically write run_dir/metrics.json; return its path.

    Validation happens before writing so that a bad status is caught in the
    run that produced it, not later by the agent reading the file.
    """
    path = Path(run_dir) / METRICS_FILE
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: metrics must be a dict, got {type(metrics).__name__}")
    if "status" not in metrics:
        raise ValueError(f"{path}: metrics has no 'status' key; set it to one of "
                         f"{', '.join(RUN_STATUSES)}")
    check_status(metrics["status"], f"{path}: field 'status'")
    atomic_write_json(path, metrics)
    return path


def load_metrics(run_dir: str | os.PathLike) -> dict | None:
    """Read run_dir/metrics.json; None if the run has not written it (yet).

    Raises MetricsError if the file exists but is not a JSON object with a
    known `status`, because guessing would feed the agent wrong results.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MetricsError(f"{path}: expected a JSON object, got {type(data).__name__}; "
                           "re-run the training job or delete the file")
    if "status" not in data:
        raise MetricsError(f"{path}: missing field 'status'; add one of "
                           f"{', '.join(RUN_STATUSES)} or re-run the training job")
    try:
        check_status(data["status"], f"{path}: field 'status'")
    except ValueError as exc:
        raise MetricsError(str(exc)) from None
    return data


def save_history(run_dir: str | os.PathLike, history: list[dict]) -> Path:
    """Atomically write run_dir/history.json (list of per-epoch dicts); return its path."""
    path = Path(run_dir) / HISTORY_FILE
    _check_history(history, path, ValueError)
    atomic_write_json(path, history)
    return path


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """Read run_dir/history.json; [] if absent (the run completed no epoch)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return []
    data = _read_json(path)
    _check_history(data, path, MetricsError)
    return data


def _check_history(history: Any, path: Path, error: type[Exception]) -> None:
    """Raise `error` unless history is a list of dicts, naming the bad index."""
    if not isinstance(history, list):
        raise error(f"{path}: history must be a list of per-epoch objects, "
                    f"got {type(history).__name__}")
    for i, record in enumerate(history):
        if not isinstance(record, dict):
            raise error(f"{path}: history[{i}] must be an object, "
                        f"got {type(record).__name__}")


def _read_json(path: Path) -> Any:
    """Parse a JSON file, turning decode errors into MetricsError with line/column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise MetricsError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "the file is corrupt: re-run the training job or delete the file"
        ) from None
    except UnicodeDecodeError as exc:
        raise MetricsError(f"{path}: not UTF-8 text ({exc}); the file is corrupt: "
                           "re-run the training job or delete the file") from None
