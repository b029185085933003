"""Time-series data: find the CSV, check it, split it, scale it, and serve windows.

Protocol (Informer paper, and ../shared/data/README.md):
- ETT hourly files: train rows [0, 8640), val [8640 - seq_len, 11520), test
  [11520 - seq_len, 14400); ETT 15-minute files use 4x those borders.
- Any other CSV: 70/10/20 % of rows in time order (configurable), val and test windows
  starting seq_len rows early so that their first target follows the previous split.
- A standard scaler is fitted on the training rows only; metrics are on scaled values.
- Feature modes: M (all columns in, all out), S (target in, target out), MS (all in,
  target out). The target column is always moved last, so "the target" is channel -1.
- Time features, each scaled to [-0.5, 0.5]: hour, weekday, day of month, day of year
  (embed="timeF"); or integer calendar fields [month, day, weekday, hour] for the
  fixed/learned embeddings.

Speed: each split's series lives on the training device once; windows are strided
views (`unfold`) of it, and a batch is one gather by index. No per-sample Python, no
DataLoader workers.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)

DATA_DIR_ENV = "NAS_DATA_DIR"
ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{name}"
ETT_SHA256 = {
    "ETTh1.csv": "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
    "ETTh2.csv": "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b",
}
# Row borders of the ETT protocol, in hours: 12 months train, 4 val, 4 test (30-day months).
_ETT_HOUR_BORDERS = (12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)


class DataError(ValueError):
    """Bad or missing data. The message names the file and says how to fix it."""


# --------------------------------------------------------------------------- locating

def resolve_data_path(path: str | Path, download: bool = True) -> Path:
    """Find the CSV: $NAS_DATA_DIR/<name> first, then the path itself, then download (ETT only)."""
    path = Path(path)
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir and not path.is_absolute():
        candidate = Path(env_dir) / path.name
        if candidate.is_file():
            return candidate
    if path.is_file():
        return path
    where = f"{path}" + (f" or {Path(env_dir) / path.name}" if env_dir and not path.is_absolute() else "")
    if path.name in ETT_SHA256 and download:
        return download_ett(path.name, path)
    raise DataError(
        f"data file not found: {where}. Put the CSV there, or set {DATA_DIR_ENV} to the folder that holds it."
    )


def download_ett(name: str, dest: Path) -> Path:
    """Download an ETT CSV from the ETDataset repository and verify its sha256."""
    url = ETT_URL.format(name=name)
    log.info("downloading %s from %s", name, url)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            blob = resp.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"data file {dest} is missing and the download from {url} failed ({e}). "
            f"Offline? Copy {name} to {dest}, or set {DATA_DIR_ENV} to a folder that holds it."
        ) from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != ETT_SHA256[name]:
        raise DataError(f"downloaded {name} has sha256 {digest}, expected {ETT_SHA256[name]}; not saved")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- reading

def read_series_csv(path: Path, target: str) -> tuple[pd.DatetimeIndex, np.ndarray, list[str]]:
    """Read and check a CSV: a `date` column plus numeric columns, target moved last.

    Returns (dates, values float32 [T, C], column names). Line numbers in errors are
    the file's own (header = line 1).
    """
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    if "date" not in df.columns:
        raise DataError(f"{path}: no 'date' column; found columns {list(df.columns)}. "
                        f"The first column must be named 'date'.")
    if target not in df.columns:
        raise DataError(f"{path}: target column {target!r} not found; columns are {list(df.columns)}. "
                        f"Set data.target to one of them.")
    if len(df) == 0:
        raise DataError(f"{path}: the file has a header but no rows")

    dates = pd.to_datetime(df["date"], errors="coerce", format="mixed")
    bad = np.flatnonzero(dates.isna().to_numpy())
    if bad.size:
        i = bad[0]
        raise DataError(f"{path}:{i + 2}: unparsable date {df['date'].iloc[i]!r} ({bad.size} bad dates in all)")
    steps = np.diff(dates.to_numpy().astype("datetime64[ns]").astype(np.int64))
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        i = bad[0] + 1
        raise DataError(f"{path}:{i + 2}: dates are not strictly increasing "
                        f"({df['date'].iloc[i - 1]!r} then {df['date'].iloc[i]!r}); sort the file by date")

    columns = [c for c in df.columns if c not in ("date", target)] + [target]
    values = np.empty((len(df), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        raw = df[col]
        num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(num))
        if bad.size:
            i = bad[0]
            cell = raw.iloc[i]
            missing = cell.strip().lower() in ("", "nan", "na", "null", "none")
            problem = "a missing value (NaN)" if missing else f"the non-numeric value {cell!r}"
            if not missing and np.isinf(pd.to_numeric(cell, errors="coerce")):
                problem = f"an infinite value {cell!r}"
            raise DataError(f"{path}:{i + 2}: column {col!r} has {problem} ({bad.size} such cells in the "
                            f"column); fill or drop those rows")
        values[:, j] = num
    return pd.DatetimeIndex(dates), values, columns


# --------------------------------------------------------------------------- splitting

def split_borders(n_rows: int, seq_len: int, split: str, ratios: list[float], name: str) -> list[tuple[int, int]]:
    """Row ranges [start, end) of train, val and test (val/test include seq_len rows of history)."""
    if split == "auto":
        split = ("ett_hour" if name.startswith("ETTh") else "ett_minute" if name.startswith("ETTm") else "ratio")
    if split in ("ett_hour", "ett_minute"):
        scale = 1 if split == "ett_hour" else 4
        b1, b2, b3 = (b * scale for b in _ETT_HOUR_BORDERS)
        if n_rows < b3:
            raise DataError(f"{name}: the {split} protocol needs {b3} rows, the file has {n_rows}; "
                            f"use data.split='ratio' for shorter files")
        return [(0, b1), (b1 - seq_len, b2), (b2 - seq_len, b3)]
    n_train = int(n_rows * ratios[0])
    n_test = int(n_rows * ratios[2])
    n_val = int(n_rows * ratios[1]) if sum(ratios) < 1 - 1e-9 else n_rows - n_train - n_test
    return [(0, n_train), (n_train - seq_len, n_train + n_val), (n_train + n_val - seq_len, n_train + n_val + n_test)]


def time_features(dates: pd.DatetimeIndex, embed: str) -> np.ndarray:
    """[T, 4] time features: continuous in [-0.5, 0.5] for timeF, calendar integers otherwise."""
    if embed == "timeF":
        feats = [dates.hour / 23.0, dates.day_of_week / 6.0, (dates.day - 1) / 30.0, (dates.day_of_year - 1) / 365.0]
        return (np.stack([np.asarray(f, dtype=np.float64) for f in feats], axis=1) - 0.5).astype(np.float32)
    cols = [dates.month, dates.day, dates.day_of_week, dates.hour]
    return np.stack([np.asarray(c) for c in cols], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- windows

class Windows:
    """All stride-1 windows of one split, as strided views of tensors on the device.

    A batch for window starts `idx` is (x_enc, mark_enc, x_dec, mark_dec, y): the encoder
    sees rows [s, s+seq_len); the decoder gets the last label_len known rows followed by
    pred_len zeros; y is the next pred_len rows of the output channels.
    """

    def __init__(self, values: torch.Tensor, marks: torch.Tensor, seq_len: int, label_len: int,
                 pred_len: int, out_channels: slice):
        self.seq_len, self.label_len, self.pred_len = seq_len, label_len, pred_len
        self.n = values.shape[0] - seq_len - pred_len + 1
        self.out_channels = out_channels
        dec_len = label_len + pred_len
        dec_start = seq_len - label_len
        # unfold gives [n_windows, C, L] views; transpose to [n_windows, L, C]. No copy.
        self._enc = values.unfold(0, seq_len, 1).transpose(1, 2)
        self._enc_mark = marks.unfold(0, seq_len, 1).transpose(1, 2)
        self._dec = values[dec_start:].unfold(0, dec_len, 1).transpose(1, 2)
        self._dec_mark = marks[dec_start:].unfold(0, dec_len, 1).transpose(1, 2)

    def __len__(self) -> int:
        return self.n

    def target_rows(self) -> np.ndarray:
        """The rows every window's target is cut from, (n + pred_len - 1, out channels), fp32 on the
        CPU: window i's target y is rows [i, i + pred_len). Stored once instead of n overlapping targets."""
        rows = self._dec[:, self.label_len, self.out_channels]  # each window's first target row
        tail = self._dec[-1, self.label_len + 1:, self.out_channels]  # the last window's other rows
        return torch.cat([rows, tail]).float().cpu().numpy()

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x_enc = self._enc[idx]
        dec = self._dec[idx]
        y = dec[:, self.label_len:, self.out_channels]
        x_dec = torch.cat([dec[:, : self.label_len], torch.zeros_like(dec[:, self.label_len:])], dim=1)
        return x_enc, self._enc_mark[idx], x_dec, self._dec_mark[idx], y

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False):
        """Yield batches; shuffled training order comes from `generator` (reproducible)."""
        device = self._enc.device
        order = (torch.randperm(self.n, generator=generator).to(device) if shuffle
                 else torch.arange(self.n, device=device))
        stop = self.n - self.n % batch_size if drop_last else self.n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size])


@dataclass
class Dataset:
    """The three splits plus what the model and the reports need to know about them."""

    train: Windows
    val: Windows
    test: Windows
    columns: list[str]
    enc_in: int
    c_out: int
    mean: np.ndarray
    std: np.ndarray
    path: Path
    borders: list[tuple[int, int]]


def load_dataset(data_cfg, embed: str, device: torch.device | str = "cpu") -> Dataset:
    """Load, check, split, scale and window the data described by a DataConfig."""
    path = resolve_data_path(data_cfg.path)
    dates, values, columns = read_series_csv(path, data_cfg.target)
    if data_cfg.features == "S":
        values, columns = values[:, -1:], columns[-1:]
    borders = split_borders(len(values), data_cfg.seq_len, data_cfg.split, data_cfg.split_ratios, path.name)
    need = data_cfg.seq_len + data_cfg.pred_len
    for name, (lo, hi) in zip(("train", "val", "test"), borders):
        if lo < 0 or hi - lo < need:
            raise DataError(
                f"{path}: the {name} split has {hi - max(lo, 0)} rows (rows {max(lo, 0)}..{hi}) but one window needs "
                f"seq_len + pred_len = {need}; use a shorter seq_len/pred_len or a longer file"
            )
    lo, hi = borders[0]
    mean = values[lo:hi].mean(axis=0)
    std = values[lo:hi].std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)  # constant columns: avoid divide-by-zero
    if data_cfg.scale:
        values = (values - mean) / std
    marks = time_features(dates, embed)
    out = slice(None) if data_cfg.features == "M" else slice(-1, None)

    def windows(lo: int, hi: int) -> Windows:
        v = torch.as_tensor(values[lo:hi], dtype=torch.float32, device=device)
        m = torch.as_tensor(marks[lo:hi], dtype=torch.float32, device=device)
        return Windows(v, m, data_cfg.seq_len, data_cfg.label_len, data_cfg.pred_len, out)

    train, val, test = (windows(lo, hi) for lo, hi in borders)
    c_out = len(columns) if data_cfg.features == "M" else 1
    return Dataset(train, val, test, columns, len(columns), c_out, mean, std, path, borders)
