"""Per-run result files: metrics.json and history.json in runs/run_XXXX/.

Both are written atomically (see `nas_agent.atomic`), so a run killed while
saving leaves the previous complete file or none, never a truncated one.
Non-finite floats (a diverged run's NaN loss) are stored as null.

metrics.json: one JSON object with the final outcome of a run.

    status          str, one of RUN_STATUSES (see below). The original nas_system wrote
                    no status; a file without one was a finished run and reads as "ok",
                    and save_metrics writes "ok" when the dict has none.
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
    amp             str          training precision: "bf16" (autocast) or "off" (fp32).
    amp_reason      str | null   why (training.amp, the device's bf16 support, the probe).
    samples_per_s   float | null training samples per second over the training steps alone.
    eval_s          float | null seconds spent evaluating (every epoch's val, the final val and test).
    startup_s       float | null seconds from process start to the first training step.
    startup_marks   object       process age (s) at each step of start-up: imports, setup (config,
                                 device, amp probe), data, model, optimizer, first_step.
    smoke_s         float        seconds of the in-run smoke test (train.py --smoke-test); absent
                                 without it.

Only `status` is checked here; the trainer owns the other keys, and readers
must tolerate missing ones (a run that failed before training has no val_mse).

history.json: one JSON object, the original nas_system's format, rewritten by
train.py after every epoch:

    {"best_epoch": 3, "epochs": [{"epoch": 1, "train_mse": 1.02, "val_mse": 1.05, "lr": 1e-4, ...}, ...]}

    best_epoch    int | null  the `epoch` of the lowest val_mse so far; null before any.
    epochs        list, one object per completed epoch, in order:
      epoch         int    1-based epoch number.
      train_loss    float  mean training loss (the criterion actually optimised).
      train_mse     float  training MSE.
      val_mse       float  validation MSE.
      val_mae       float  validation MAE.
      lr            float  learning rate used during the epoch.
      epoch_time_s  float  wall-clock seconds for the epoch.

Earlier versions of this project wrote only the list of epochs; `load_history` reads
that form too and always returns the object form (`as_history`), so readers use
`load_history(run_dir)["epochs"]`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from nas_agent.atomic import atomic_write_json
from nas_agent.run_folder import HISTORY_FILE, METRICS_FILE

log = logging.getLogger(__name__)


RUN_STATUSES = (
    "ok",           # trained to the end (or early-stopped normally); metrics are valid
    "diverged",     # loss became NaN/inf or exploded; training was stopped
    "timeout",      # hit the per-run time budget; metrics are from the best epoch so far
    "failed",       # crashed (bad config, OOM, exception); see `error`
    "interrupted",  # stopped by the user or a signal (Ctrl-C, SIGTERM)
    "pruned",       # stopped early by the search because it looked unpromising
    "invalid",      # train.py --smoke-test: the model failed its smoke test before training (a rejected
                    # proposal: the search sets the folder aside and records no run)
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
    """Validate and atomically write run_dir/metrics.json (making run_dir); return its path.

    Validation happens before writing so that a bad status is caught in the
    run that produced it, not later by the agent reading the file. A dict
    without a status (the original nas_system's form) is written as "ok".
    """
    path = Path(run_dir) / METRICS_FILE
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: metrics must be a dict, got {type(metrics).__name__}")
    metrics = {"status": "ok", **metrics}
    check_status(metrics["status"], f"{path}: field 'status'")
    path.parent.mkdir(parents=True, exist_ok=True)
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
    data.setdefault("status", "ok")  # the original nas_system's files have none
    try:
        check_status(data["status"], f"{path}: field 'status'")
    except ValueError as exc:
        raise MetricsError(str(exc)) from None
    return data


def save_history(run_dir: str | os.PathLike, history: dict | list[dict]) -> Path:
    """Atomically write run_dir/history.json (making run_dir); return its path.

    `history` is {"best_epoch": N, "epochs": [...]}; a bare list of epochs is written in that
    form, with best_epoch worked out from val_mse.
    """
    path = Path(run_dir) / HISTORY_FILE
    history = as_history(history, str(path), ValueError)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, history)
    return path


def load_history(run_dir: str | os.PathLike) -> dict:
    """Read run_dir/history.json as {"best_epoch": N, "epochs": [...]}, whichever form the file has.

    A missing file (the run completed no epoch) gives {"best_epoch": None, "epochs": []}.
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return {"best_epoch": None, "epochs": []}
    return as_history(_read_json(path), str(path), MetricsError)


def as_history(history: Any, where: str = "history", error: type[Exception] = ValueError) -> dict:
    """A history in the object form, from the object form or the older bare list of epochs.

    Raises `error` naming the bad part unless the epochs are a list of objects and best_epoch
    is an integer or null. Other top-level keys are kept.
    """
    if isinstance(history, list):
        history = {"best_epoch": best_epoch_of(history), "epochs": history}
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list):
        raise error(f"{where}: expected {{\"best_epoch\": N, \"epochs\": [per-epoch objects]}} "
                    f"(or a list of per-epoch objects), got {_kind(history)}")
    for i, record in enumerate(history["epochs"]):
        if not isinstance(record, dict):
            raise error(f"{where}: epochs[{i}] must be an object, got {type(record).__name__}")
    best = history.get("best_epoch", best_epoch_of(history["epochs"]))
    if best is not None and (isinstance(best, bool) or not isinstance(best, int)):
        raise error(f"{where}: best_epoch must be an epoch number or null, got {best!r}")
    return {"best_epoch": best, **history}


def best_epoch_of(epochs: list) -> int | None:
    """The `epoch` (1-based position if absent) with the lowest finite val_mse; None if none."""
    best, best_val = None, math.inf
    for i, record in enumerate(epochs):
        if not isinstance(record, dict):
            continue
        val, epoch = record.get("val_mse"), record.get("epoch")
        if isinstance(val, (int, float)) and not isinstance(val, bool) and val < best_val:
            best, best_val = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else i + 1, val
    return best


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:5]}"
    return type(value).__name__


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
