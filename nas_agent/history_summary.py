"""Turn a run's per-epoch history into a few sentences for an LLM prompt.

The agent sees dozens of past runs in one prompt, so each gets a short text
(aim < 400 characters, hard cap MAX_CHARS) that states the facts an expert
would look at on a loss curve: where the best epoch was, where the curves were
heading at the end, over- or under-fitting, plateaus, divergence and learning
rate changes. Numbers are given with 4 significant digits so the LLM can
compare runs without drowning in digits.

The output is deterministic (same input, same string) so prompts are
reproducible and cacheable.

A history is history.json's object, {"best_epoch": N, "epochs": [...]}, or the bare
list of epochs; the records are the dicts described in `nas_agent.logging_utils`. A metric
whose key is present but whose value is null, NaN or inf counts as
non-finite (history.json stores NaN as null).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nas_agent.logging_utils import as_history

TREND_WINDOW = 3          # epochs looked back over for "improving / flat / worsening"
PLATEAU_EPOCHS = 3        # no improvement for this many epochs counts as a plateau
FLAT_REL_TOL = 0.01       # relative change below 1% is "flat"
PLATEAU_REL_TOL = 1e-3    # an improvement under 0.1% does not end a plateau
EXPLODE_FACTOR = 10.0     # final loss this many times the best counts as divergence
TARGET_CHARS = 400        # drop nice-to-have sentences beyond this length
MAX_CHARS = 600           # never return more than this
ERROR_CHARS = 120         # longest error line quoted

# Sentence priorities: lower is more important; higher ones are dropped first
# when the summary gets too long.
_ESSENTIAL, _KEY, _USEFUL, _NICE = 0, 1, 2, 3


@dataclass
class _Curves:
    """The per-epoch series a summary is computed from.

    A series is None when the key never appears in the history; inside a
    series, None marks a non-finite or missing value.
    """
    epochs: list[int]
    val: list[float | None] | None
    val_mae: list[float | None] | None
    train: list[float | None] | None
    train_name: str
    train_loss: list[float | None] | None
    lr: list[float | None] | None


def fmt(x: float | None) -> str:
    """Format a number compactly with 4 significant digits: 0.3412, 1e-4, 2.5e-6."""
    if x is None or isinstance(x, float) and math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        text = f"{x:.4g}"
        if "e" not in text:
            return text
    mantissa, exponent = f"{x:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def build_history_summary(history: dict | list[dict], metrics: dict | None = None) -> str:
    """Summarise a training history in plain English for an LLM prompt.

    `history` is what load_history returns (or its list of epochs). `metrics` (the
    run's metrics.json) is optional; when its status is not "ok" the summary opens
    with the status and the first line of the error, since that matters more than
    any curve. The best epoch is worked out from val_mse, so the text agrees with
    the curve even when a hand-written best_epoch does not.
    """
    history = as_history(history)["epochs"]
    sentences: list[tuple[int, str]] = []
    status = _status_sentence(metrics)
    if status:
        sentences.append((_ESSENTIAL, status))
    if not history:
        sentences.append((_ESSENTIAL, "No epoch completed, so there is no training history."))
        return _join(sentences)
    curves = _extract(history)
    best = _best_index(curves.val)
    sentences.append((_ESSENTIAL, _epochs_sentence(curves, best)))
    divergence = _divergence_sentence(curves, best)
    if divergence:
        sentences.append((_KEY, divergence))
    sentences.extend(_optional(_NICE, _trend_sentence(curves)))
    if best is not None:
        sentences.extend(_optional(_NICE, _gap_sentence(curves, best)))
        if not divergence:
            sentences.extend(_optional(_KEY, _overfit_or_plateau_sentence(curves, best)))
    sentences.extend(_optional(_USEFUL, _lr_sentence(curves)))
    return _join(sentences)


def _optional(priority: int, sentence: str | None) -> list[tuple[int, str]]:
    """Wrap a sentence that may be absent, for list.extend."""
    return [(priority, sentence)] if sentence else []


def _join(sentences: list[tuple[int, str]]) -> str:
    """Join sentences in order, dropping the least important ones if too long.

    Nice-to-have sentences go once the text passes TARGET_CHARS; anything but
    the essentials goes if it still passes MAX_CHARS; a final cut guarantees
    the cap even for a pathological error message.
    """
    kept = list(sentences)
    for limit, lowest in ((TARGET_CHARS, _NICE), (MAX_CHARS, _KEY)):
        while len(" ".join(s for _, s in kept)) > limit:
            droppable = [i for i, (p, _) in enumerate(kept) if p >= lowest]
            if not droppable:
                break
            worst = max(droppable, key=lambda i: (kept[i][0], i))
            del kept[worst]
    text = " ".join(s for _, s in kept)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


# --------------------------------------------------------------------------- extraction

def _finite(value: Any) -> float | None:
    """The value as a float if it is a finite real number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(history: list[dict], key: str) -> list[float | None] | None:
    """Per-epoch values of `key`, or None if no record has that key at all."""
    if not any(key in record for record in history):
        return None
    return [_finite(record.get(key)) for record in history]


def _extract(history: list[dict]) -> _Curves:
    """Pull the series out of the raw records.

    The training curve is train_mse when recorded (comparable to val_mse),
    otherwise train_loss.
    """
    epochs = []
    for i, record in enumerate(history):
        epoch = record.get("epoch")
        epochs.append(epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else i + 1)
    train_loss = _series(history, "train_loss")
    train_mse = _series(history, "train_mse")
    train_name = "train_mse" if train_mse is not None else "train_loss"
    return _Curves(
        epochs=epochs,
        val=_series(history, "val_mse"),
        val_mae=_series(history, "val_mae"),
        train=train_mse if train_mse is not None else train_loss,
        train_name=train_name,
        train_loss=train_loss,
        lr=_series(history, "lr"),
    )


def _best_index(values: list[float | None] | None) -> int | None:
    """Index of the lowest finite value (first one on ties), or None."""
    if values is None:
        return None
    finite = [(v, i) for i, v in enumerate(values) if v is not None]
    return min(finite)[1] if finite else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- sentences

def _status_sentence(metrics: dict | None) -> str | None:
    """'Run failed: <first error line>.' when the run did not finish normally."""
    if not metrics:
        return None
    status = metrics.get("status")
    if status in (None, "ok"):
        return None
    error = metrics.get("error")
    first_line = ""
    if isinstance(error, str):
        lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
        first_line = lines[0].rstrip(".") if lines else ""
    if not first_line:
        return f"Run {status}."
    if len(first_line) > ERROR_CHARS:
        return f"Run {status}: {first_line[: ERROR_CHARS - 3]}..."
    return f"Run {status}: {first_line}."


def _epochs_sentence(c: _Curves, best: int | None) -> str:
    """Epoch count plus the best epoch and its validation scores."""
    ran = f"Ran {_plural(len(c.epochs), 'epoch')}"
    if c.val is None:
        return f"{ran}; no val_mse was recorded."
    if best is None:
        return f"{ran}; val_mse was never finite."
    text = f"{ran}; best epoch {c.epochs[best]} with val_mse {fmt(c.val[best])}"
    if c.val_mae is not None and c.val_mae[best] is not None:
        text += f" (val_mae {fmt(c.val_mae[best])})"
    return text + "."


def _divergence_sentence(c: _Curves, best: int | None) -> str | None:
    """Report the first non-finite metric, or a loss that exploded after its best."""
    named = [("train_loss", c.train_loss), (c.train_name, c.train),
             ("val_mse", c.val), ("val_mae", c.val_mae)]
    named = [(name, s) for name, s in dict(named).items() if s is not None]
    for i, epoch in enumerate(c.epochs):
        bad = [name for name, s in named if s[i] is None]
        if bad:
            return f"Training diverged: non-finite {'/'.join(bad)} from epoch {epoch}."
    val_exploded = _explosion(c.val)
    if val_exploded and not _still_improving(c.train, best):
        return f"Training diverged: val_mse {val_exploded}."
    train_exploded = _explosion(c.train)
    if train_exploded:
        return f"Training diverged: {c.train_name} {train_exploded}."
    return None


def _explosion(values: list[float | None] | None) -> str | None:
    """'exploded to X (Nx its best)' if the last value dwarfs the best one."""
    best = _best_index(values)
    if best is None or values[-1] is None or best == len(values) - 1:
        return None
    low, last = values[best], values[-1]
    if low > 0 and last > EXPLODE_FACTOR * low:
        return f"exploded to {fmt(last)} ({fmt(last / low)}x its best)"
    return None


def _still_improving(train: list[float | None] | None, best: int | None) -> bool:
    """True if the training curve ended lower than at the best val epoch.

    A val loss blowing up while train keeps falling is (severe) overfitting,
    not divergence, and must be reported as such.
    """
    if train is None or best is None or train[best] is None or train[-1] is None:
        return False
    return train[-1] < train[best] * (1 - FLAT_REL_TOL)


def _direction(start: float, end: float) -> str:
    """Describe a loss change: lower is better."""
    if start == 0:
        return "flat" if end == 0 else "worsening"
    rel = (end - start) / abs(start)
    if rel < -FLAT_REL_TOL:
        return "improving"
    if rel > FLAT_REL_TOL:
        return "worsening"
    return "flat"


def _trend_sentence(c: _Curves) -> str | None:
    """Where train and val curves were heading over the last TREND_WINDOW epochs."""
    n = len(c.epochs)
    if n < 2:
        return None
    window = min(TREND_WINDOW, n - 1)
    parts = []
    for name, values in ((c.train_name, c.train), ("val_mse", c.val)):
        if values is None or values[-1 - window] is None or values[-1] is None:
            continue
        start, end = values[-1 - window], values[-1]
        parts.append(f"{name} {_direction(start, end)} ({fmt(start)}->{fmt(end)})")
    if not parts:
        return None
    return f"Last {_plural(window, 'epoch')}: {', '.join(parts)}."


def _gap_sentence(c: _Curves, best: int) -> str | None:
    """How far validation sits above training at the best epoch (generalisation gap)."""
    if c.train is None or c.train[best] is None:
        return None
    train, val = c.train[best], c.val[best]
    side = "above" if val >= train else "below"
    ratio = f" ({fmt(val / train)}x)" if train > 0 else ""
    return f"At the best epoch val_mse is {fmt(abs(val - train))} {side} {c.train_name}{ratio}."


def _overfit_or_plateau_sentence(c: _Curves, best: int) -> str | None:
    """Overfitting (val up while train down after the best) beats plateau (no gain)."""
    return _overfit_sentence(c, best) or _plateau_sentence(c, best)


def _overfit_sentence(c: _Curves, best: int) -> str | None:
    """Val rose while train kept falling for at least two epochs after the best."""
    last = len(c.epochs) - 1
    if c.train is None or last - best < 2:
        return None
    v0, v1 = c.val[best], c.val[last]
    t0, t1 = c.train[best], c.train[last]
    if None in (v1, t0, t1):
        return None
    if v1 > v0 * (1 + FLAT_REL_TOL) and t1 < t0 * (1 - FLAT_REL_TOL):
        return (f"Likely overfitting: after epoch {c.epochs[best]} val_mse rose "
                f"{fmt(v0)}->{fmt(v1)} while {c.train_name} fell {fmt(t0)}->{fmt(t1)}.")
    return None


def _plateau_sentence(c: _Curves, best: int) -> str | None:
    """No meaningful val improvement over the last PLATEAU_EPOCHS epochs."""
    n = len(c.epochs)
    if n <= PLATEAU_EPOCHS:
        return None
    earlier = [v for v in c.val[:-PLATEAU_EPOCHS] if v is not None]
    recent = [v for v in c.val[-PLATEAU_EPOCHS:] if v is not None]
    if not earlier or not recent:
        return None
    if min(recent) < min(earlier) * (1 - PLATEAU_REL_TOL):
        return None
    stalled = max(PLATEAU_EPOCHS, n - 1 - best)
    return f"val_mse on a plateau: no real improvement in the last {stalled} epochs."


def _lr_sentence(c: _Curves) -> str | None:
    """Learning-rate schedule: constant, decayed, increased, or warmed up then decayed."""
    if c.lr is None:
        return None
    points = [(e, v) for e, v in zip(c.epochs, c.lr) if v is not None]
    if not points:
        return None
    values = [v for _, v in points]
    changes = [e for (e, v), (_, prev) in zip(points[1:], points) if not math.isclose(v, prev)]
    first, last, peak = values[0], values[-1], max(values)
    if not changes:
        return f"lr constant at {fmt(first)}."
    when = f"({_plural(len(changes), 'change')}, last at epoch {changes[-1]})"
    if peak > first and peak > last and not math.isclose(peak, last):
        return f"lr warmed up from {fmt(first)} to {fmt(peak)} then decayed to {fmt(last)} {when}."
    if last < first:
        return f"lr decayed from {fmt(first)} to {fmt(last)} {when}."
    if last > first:
        return f"lr increased from {fmt(first)} to {fmt(last)} {when}."
    return f"lr varied between {fmt(min(values))} and {fmt(peak)}, ending at {fmt(last)} {when}."
