"""The run-folder contract, defined once: the files a run folder holds, train.py's status
vocabulary and exit codes, and which statuses are scored. train.py writes the folder; the
launchers, the study's rules, the ensemble and the report read it.

    runs/<run_id>/
        config.py          the proposal as launched (the launcher writes it)
        model.py           a proposed model file, beside it (code proposals only)
        launch.json        the child's pid, process group, command line and start time
        train.log          the child's output
        config_used.py     the effective config, re-runnable as is
        history.json       one record per epoch, rewritten after each
        progress.json      where training is inside its epoch (the live panel)
        best_model.pth     the best checkpoint
        resume_state.pt    with train.py --resume: everything needed to continue after the last
                           completed epoch (weights, optimizer, RNG streams, curve); removed
                           once the run ends with a verdict (not RESUMABLE_STATUSES)
        forecasts.npz      its forecasts of every validation and test window
        learning_curve.png
        PRUNE              the search's request to stop (first line: why)
        .lock              while a train.py runs in the folder: its flock (nas_agent.lock)
        metrics.json       written last: its presence means the run finished
"""
from __future__ import annotations

CONFIG_FILE = "config.py"
MODEL_FILE = "model.py"
LAUNCH_FILE = "launch.json"
LOG_FILE = "train.log"
CONFIG_USED_FILE = "config_used.py"
HISTORY_FILE = "history.json"
PROGRESS_FILE = "progress.json"
CHECKPOINT_FILE = "best_model.pth"
FORECASTS_FILE = "forecasts.npz"
CURVE_FILE = "learning_curve.png"
RESUME_FILE = "resume_state.pt"
PRUNE_FILE = "PRUNE"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.json"

# Files that mean "this folder already holds a run". train.log is not one of them: the launcher
# opens it before train.py starts, to stream the child's output into it.
OUTPUT_FILES = (METRICS_FILE, HISTORY_FILE, CONFIG_USED_FILE, CHECKPOINT_FILE, CURVE_FILE, FORECASTS_FILE,
                RESUME_FILE)

# train.py's statuses and exit codes (its docstring says what each means).
EXIT_CODES = {"ok": 0, "failed": 1, "diverged": 3, "timeout": 4, "pruned": 5, "invalid": 6, "interrupted": 130}
USAGE_ERROR = 2  # bad flags or config; no status, nothing written
# Statuses that end training early but still restore and test the best checkpoint.
TESTED_EARLY_STOPS = ("timeout", "pruned")
# Statuses after which train.py --resume continues a run from its resume state: it was stopped
# from outside (interrupted), or by something passing (failed: the data not found, a full disk,
# out of memory; invalid: a smoke-test timeout). The others are a verdict on the config.
RESUMABLE_STATUSES = ("interrupted", "failed", "invalid")
# Statuses whose val_mse is a fair, complete measurement: the ones a study compares and selects on.
SCORED = ("ok", "timeout")
