"""forecasts.npz, a run's forecasts of every validation and test window, defined once: train.py
writes it with its checkpoint, the study's ensemble (nas_agent_graph/ensemble.py) reads it.

    val, test                        fp32 (windows, pred_len, channels): the best checkpoint's forecasts
    val_target_rows, test_target_rows fp32 (windows + pred_len - 1, channels): the rows the targets
                                     come from; window i's target is rows [i, i + pred_len)

The targets overlap, so they are stored once (Windows.target_rows) and cut back into windows
here, as views. `errors` is the one definition of a split's MSE and MAE from such arrays.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SPLITS = ("val", "test")
KEYS = ("val", "test", "val_target_rows", "test_target_rows")


def windows(rows: np.ndarray, pred_len: int) -> np.ndarray:
    """(n, pred_len, channels) targets from the rows they overlap in (a view, no copy)."""
    return np.lib.stride_tricks.sliding_window_view(rows, pred_len, axis=0).transpose(0, 2, 1)


def errors(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """MSE and MAE over every element: the differences in the inputs' precision (fp32 for a run, as
    train.evaluate takes them), summed in fp64."""
    err = np.asarray(pred - target, dtype=np.float64)
    return float(np.square(err).mean()), float(np.abs(err).mean())


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the four arrays atomically (a temporary file, then a rename)."""
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise ValueError(f"forecasts file {path}: missing arrays {missing}; expected {list(KEYS)}")
    tmp = Path(path).with_name(Path(path).name + ".tmp.npz")  # np.savez appends .npz to a name without it
    np.savez(tmp, **{k: arrays[k] for k in KEYS})
    os.replace(tmp, path)


def load(path: Path) -> dict[str, np.ndarray]:
    """{val, test, val_target, test_target}: forecasts and their targets cut into windows. A file
    that is unreadable or lacks an array raises ValueError naming it."""
    try:
        with np.load(path) as d:
            arrays = {k: d[k] for k in KEYS}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None
    pred_len = arrays["val"].shape[1]
    return {**{s: arrays[s] for s in SPLITS},
            **{f"{s}_target": windows(arrays[f"{s}_target_rows"], pred_len) for s in SPLITS}}
