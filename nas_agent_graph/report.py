"""What a person looks at during and after a search: the `status` table and the HTML report.

Both views read only the AgentState (and, for learning curves, each run's
history.json), never a live process, so they can be produced at any time while
a training job runs in the background, or long after the search ended.

* `status_table` / `render_status` give a terminal table with one row per run
  (used by `python -m nas_agent_graph status`). Rendered to a string without a
  terminal, the text carries no ANSI codes, so it can be logged, diffed or
  asserted on in tests.
* `write_report` writes one self-contained `runs/report.html`: inline CSS and
  every plot embedded as a base64 PNG, so the page opens on an air-gapped
  machine, as a mail attachment, or from a CI artefact, with nothing fetched.

matplotlib is imported only inside the plotting functions: `status` stays fast
and importing this module never touches a plotting backend.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import shlex
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nas_agent.atomic import atomic_write_text
from nas_agent.agent_state import AgentState, RunInfo, utc_now_iso
from nas_agent.logging_utils import HISTORY_FILE, MetricsError, load_history
from nas_agent.run_folder import CONFIG_USED_FILE
from nas_agent_graph.study.confirmation import noise_floor_text, pending_candidate
from nas_agent_graph.lineage import CSS as LINEAGE_CSS
from nas_agent_graph.lineage import lineage_html
from nas_agent_graph.proposers import llm_validity
from nas_agent_graph.retention import checkpoint_cell, checkpoint_counts

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

# The handful of config settings that distinguish one proposal from another.
# They are what a reader needs to tell runs apart in the status table, the
# report's runs table and the parameter-versus-metric plots; the other config
# keys (paths, seeds, scheduler details) rarely change during a search and
# would only widen the table. Each entry is a dotted path into the config dict
# ("<section>.<key>", sections data/model/training); read one with param_value.
KEY_PARAMS: tuple[str, ...] = (
    "model.d_model",             # transformer width
    "model.n_heads",             # attention heads
    "model.e_layers",            # encoder layers
    "model.d_layers",            # decoder layers
    "model.attn",                # "prob" (ProbSparse) or "full"
    "model.revin",               # reversible instance normalisation on/off
    "training.optimizer_class",  # e.g. "optim.Adam"
    "training.lr",               # learning rate
    "training.batch_size",
    "data.seq_len",              # input window length
)

# Terminal colours: green = usable result, red = broken, yellow = cut short.
STATUS_STYLES = {
    "ok": "green",
    "failed": "red",
    "diverged": "red",
    "timeout": "yellow",
    "interrupted": "yellow",
    "pruned": "yellow",
}
# Plot colours: the same families, but distinct hues so a legend can tell them apart.
_STATUS_COLOURS = {
    "ok": "#2e7d32",
    "diverged": "#d32f2f",
    "failed": "#7b1fa2",
    "timeout": "#ef6c00",
    "interrupted": "#c9a400",
    "pruned": "#757575",
}
_FALLBACK_COLOUR = "#000000"

COLUMNS = ("run", "status", "val MSE", "test MSE", "accepted", "duration", "proposer", "checkpoint", "params")
_RIGHT_ALIGNED = {"val MSE", "test MSE", "duration"}
BEST_MARK = "★"
ACCEPTED_MARK = "✓"
MISSING = "—"

_DPI = 90                 # small PNGs: the whole report stays a few hundred kB
_TOP_K_CURVES = 5
_LAST_REJECTED = 5
_PLAIN_WIDTH = 200        # wide enough that a 10-column table does not wrap in a log file
_Y_MARGIN = 0.12         # headroom above the highest point for the × row of failed runs
_JITTER = 0.15           # horizontal jitter of categories, in category widths
_MAX_CELL_CHARS = 300     # reasons / errors are cut so one bad run cannot bloat the page


# --------------------------------------------------------------------------- config values

def param_value(config: dict, path: str) -> Any:
    """The value at a dotted `path` such as "model.d_model" in a config dict; None if absent.

    Missing is not an error: a rejected or partial proposal may lack any key,
    and the views must still show the rest of the run.
    """
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise ValueError(f"param_value: bad config path {path!r}; use a dotted path such as "
                         "'model.d_model'")
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _short_class(value: Any) -> str:
    """'optim.Adam' -> 'Adam': the module prefix is the same for every proposal."""
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else str(value)


def format_sci(value: float) -> str:
    """Compact scientific notation for rates: 1e-4 -> '1e-4', 0.00025 -> '2.5e-4'."""
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _fmt_lr(value: Any) -> str:
    return format_sci(value) if _is_number(value) else str(value)


def _fmt_revin(value: Any) -> str:
    return {True: "revin+", False: "revin-"}.get(value, f"revin={value}")


# Token builders for compact_params, in KEY_PARAMS order. Each takes the values
# of its paths; d_layers shares a token with e_layers ("e3/1").
_TOKENS: tuple[tuple[tuple[str, ...], Callable[..., str]], ...] = (
    (("model.d_model",), lambda v: f"d{v}"),
    (("model.n_heads",), lambda v: f"h{v}"),
    (("model.e_layers", "model.d_layers"), lambda e, d: f"e{e}/{d}"),
    (("model.attn",), str),
    (("model.revin",), _fmt_revin),
    (("training.optimizer_class",), _short_class),
    (("training.lr",), lambda v: "lr" + _fmt_lr(v)),
    (("training.batch_size",), lambda v: f"bs{v}"),
    (("data.seq_len",), lambda v: f"seq{v}"),
)


def compact_params(config: dict) -> str:
    """The key params in one short string, e.g. 'd256 h4 e3/1 prob revin- Adam lr1e-4 bs32 seq96'.

    A token whose values are all missing is left out; a partly missing one shows '?'.
    """
    tokens = []
    for paths, build in _TOKENS:
        values = [param_value(config, p) for p in paths]
        if all(v is None for v in values):
            continue
        tokens.append(build(*("?" if v is None else v for v in values)))
    return " ".join(tokens)


# --------------------------------------------------------------------------- cell formatting

def _is_number(value: Any) -> bool:
    """int or float but not bool (True is an int in Python, but not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """The value as a float if it is a finite number, else None (missing, NaN, inf)."""
    return float(value) if _is_number(value) and math.isfinite(value) else None


def format_metric(value: float | None) -> str:
    """MSE/MAE for display: 4 decimals in the usual range, scientific outside it."""
    value = _finite(value)
    if value is None:
        return MISSING
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"


def format_duration(seconds: float | None) -> str:
    """Wall-clock time for humans: '42s', '1m05s', '2h03m'."""
    seconds = _finite(seconds)
    if seconds is None or seconds < 0:
        return MISSING
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def accepted_mark(run: RunInfo, best_run_id: str | None) -> str:
    """★ for the current best, ✓ for a run that was accepted when it finished, else ''."""
    if run.run_id == best_run_id:
        return BEST_MARK
    return ACCEPTED_MARK if run.accepted else ""


def _clip(text: str, limit: int = _MAX_CELL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_last_line(error_tail: str | None) -> str:
    """The last non-blank line of a run's error output: usually the exception itself."""
    if not error_tail:
        return ""
    lines = [line.strip() for line in error_tail.splitlines() if line.strip()]
    return _clip(lines[-1]) if lines else ""


def status_text(run: RunInfo) -> str:
    """The status as shown: a pruned run says at which epoch (the reason column says why)."""
    pruned = run.extra.get("pruned") if isinstance(run.extra, dict) else None
    if run.status == "pruned" and isinstance(pruned, dict) and isinstance(pruned.get("epoch"), int):
        return f"pruned@{pruned['epoch']}"
    return run.status


def run_cells(run: RunInfo, best_run_id: str | None) -> dict[str, str]:
    """The COLUMNS of one run as display strings, shared by the terminal and HTML tables
    so the two views can never disagree."""
    return {
        "run": run.run_id,
        "status": status_text(run),
        "val MSE": format_metric(run.val_mse),
        "test MSE": format_metric(run.test_mse),
        "accepted": accepted_mark(run, best_run_id),
        "duration": format_duration(run.duration_s),
        "proposer": run.proposer or MISSING,
        "checkpoint": checkpoint_cell(run),
        "params": compact_params(run.config),
    }


# --------------------------------------------------------------------------- summary

def _best_run(state: AgentState) -> RunInfo | None:
    return next((r for r in state.runs if r.run_id == state.best_run_id), None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def study_summary(state: AgentState) -> str:
    """One line: runs done / budget, best run and its scores, rejected proposals."""
    done = len(state.runs)
    budget = f"{done}/{state.max_runs} runs" if state.max_runs else f"{_plural(done, 'run')} (no budget)"
    best = _best_run(state)
    best_text = (f"best {best.run_id} (val MSE {format_metric(best.val_mse)}, "
                 f"test MSE {format_metric(best.test_mse)})" if best else "no accepted run yet")
    counts = Counter(r.status for r in state.runs)
    by_status = ", ".join(f"{s} {n}" for s, n in counts.most_common())
    parts = [budget, best_text, _plural(len(state.rejected), "rejected proposal")]
    if by_status:
        parts.append(by_status)
    if noise := noise_floor_text(state):
        parts.append(noise)
    kept, deleted = checkpoint_counts(state)
    if deleted:
        parts.append(f"checkpoints: {kept} kept, {deleted} deleted")
    if (pending := pending_candidate(state)) is not None:
        parts.append(f"{pending.run_id} pending confirmation")
    validity = llm_validity(state)
    if validity:
        parts.append(f"LLM valid {validity['valid']}/{validity['proposals']} "
                     f"(first reply {validity['valid_first']}/{validity['proposals']})")
    return " · ".join(parts)


def _empty_message(state: AgentState, state_path: Path | None) -> str:
    where = str(state_path) if state_path is not None else "this search"
    text = f"no runs yet in {where}"
    if state.rejected:
        text += f" ({_plural(len(state.rejected), 'rejected proposal')})"
    return text


# --------------------------------------------------------------------------- terminal table

def status_table(state: AgentState, *, width: int | None = None) -> Table:
    """A rich Table of every run in launch order (see COLUMNS).

    `width` fixes the table's total width in characters; None lets it take
    what its content needs. The status is coloured and the best row is bold.
    """
    table = Table(box=box.SIMPLE_HEAD, width=width, pad_edge=False, show_edge=False)
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in _RIGHT_ALIGNED else "left",
                         no_wrap=name != "params", overflow="fold")
    for run in state.runs:
        cells = run_cells(run, state.best_run_id)
        row = [Text(cells[name], style=STATUS_STYLES.get(run.status, "") if name == "status" else "")
               for name in COLUMNS]
        table.add_row(*row, style="bold" if run.run_id == state.best_run_id else None)
    return table


def _plain_console() -> Console:
    """A console that writes nowhere and never emits ANSI codes, for string output."""
    return Console(file=io.StringIO(), width=_PLAIN_WIDTH, color_system=None,
                   force_terminal=False, highlight=False, emoji=False)


def render_status(state: AgentState, console: Console | None = None, *,
                  state_path: Path | None = None) -> str:
    """The summary line and status table as text.

    Rendered with `console`'s settings: a terminal console gives colours, and
    the default (no console) gives plain text without ANSI codes, for logs,
    pipes and tests. An empty state gives "no runs yet in <state_path>".
    """
    console = console if console is not None else _plain_console()
    with console.capture() as capture:
        if not state.runs:
            console.print(_empty_message(state, state_path), markup=False, highlight=False)
        else:
            console.print(study_summary(state), markup=False, highlight=False)
            console.print(status_table(state))
    return capture.get()


# --------------------------------------------------------------------------- plotting helpers

def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by the Agg canvas.

    Attaching FigureCanvasAgg to each figure selects Agg for our figures only:
    nothing global (pyplot's backend, its figure registry) changes, so the report
    can be written from a process that plots elsewhere, and needs no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_data_uri(fig: Any) -> str:
    """Render a figure to a PNG and return it as a data: URI, so the HTML needs no side files."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _wants_log(values: Sequence[float]) -> bool:
    """Log scale when positive values span more than one decade (e.g. learning rates)."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > 10


def _mark_missing(ax: Any, xs: Sequence[float], colours: Sequence[str]) -> None:
    """Draw × at the top edge for runs without a val MSE, so failures stay visible.

    The markers use axes coordinates vertically, which matplotlib leaves out of
    autoscaling, so their x positions are added to the data limits by hand:
    otherwise a failure at an unusual value (lr=1e-2) would fall off the plot.
    """
    if not xs:
        return
    ax.scatter(xs, [0.97] * len(xs), marker="x", s=40, c=list(colours), linewidths=1.8,
               transform=ax.get_xaxis_transform(), clip_on=False, zorder=4)
    ax.update_datalim([(x, 0.0) for x in xs], updatex=True, updatey=False)
    ax.autoscale_view(scaley=False)


def _status_colour(status: str) -> str:
    return _STATUS_COLOURS.get(status, _FALLBACK_COLOUR)


def _val_points(runs: Sequence[RunInfo]) -> tuple[list[int], list[float], list[int]]:
    """Indices and values of runs with a finite val MSE, and indices of those without."""
    xs, ys, missing = [], [], []
    for i, run in enumerate(runs):
        value = _finite(run.val_mse)
        if value is None:
            missing.append(i)
        else:
            xs.append(i)
            ys.append(value)
    return xs, ys, missing


def _set_val_axis(ax: Any, values: Sequence[float]) -> None:
    """val MSE y axis, with headroom so the × row on top does not hide the worst points."""
    ax.set_ylabel("val MSE")
    ax.set_ymargin(_Y_MARGIN)
    if _wants_log(values):
        ax.set_yscale("log")


def _set_run_ticks(ax: Any, runs: Sequence[RunInfo]) -> None:
    """Run ids as x tick labels while they fit; plain indices beyond that."""
    ax.set_xlabel("run (launch order)")
    if len(runs) <= 24:
        ax.set_xticks(range(len(runs)), [r.run_id for r in runs], rotation=60, ha="right",
                      fontsize=7)


# --------------------------------------------------------------------------- plots

def _plot_progress(runs: Sequence[RunInfo], best_run_id: str | None) -> Any:
    """Plot 1: best val MSE so far against run index, accepted runs starred."""
    import numpy as np

    fig = _new_figure(8, 3.6)
    ax = fig.add_subplot()
    xs, ys, missing = _val_points(runs)
    values = np.full(len(runs), np.nan)
    values[xs] = ys
    best_so_far = np.fmin.accumulate(values)
    ax.step(range(len(runs)), best_so_far, where="post", color="#1565c0", lw=2,
            label="best val MSE so far")
    ax.scatter(xs, ys, s=18, color="#9e9e9e", zorder=3, label="each run")
    accepted = [(i, _finite(r.val_mse)) for i, r in enumerate(runs)
                if r.accepted and _finite(r.val_mse) is not None]
    if accepted:
        ax.scatter(*zip(*accepted), marker="*", s=140, color="#ffb300", edgecolors="black",
                   linewidths=0.6, zorder=5, label="accepted")
    _annotate_best(ax, runs, best_run_id)
    _mark_missing(ax, missing, ["#d32f2f"] * len(missing))
    _set_val_axis(ax, ys)
    _set_run_ticks(ax, runs)
    ax.set_title("Search progress")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _annotate_best(ax: Any, runs: Sequence[RunInfo], best_run_id: str | None) -> None:
    """Label the current best run's point with its id."""
    for i, run in enumerate(runs):
        value = _finite(run.val_mse)
        if run.run_id == best_run_id and value is not None:
            ax.annotate(f"best: {run.run_id}", (i, value), xytext=(6, -14),
                        textcoords="offset points", fontsize=8)


def _plot_val_by_status(runs: Sequence[RunInfo]) -> Any:
    """Plot 2: every run's val MSE coloured by status; runs without one as × on top."""
    from matplotlib.lines import Line2D

    fig = _new_figure(8, 3.6)
    ax = fig.add_subplot()
    xs, ys, missing = _val_points(runs)
    ax.scatter(xs, ys, s=36, c=[_status_colour(runs[i].status) for i in xs], zorder=3)
    _mark_missing(ax, missing, [_status_colour(runs[i].status) for i in missing])
    _set_val_axis(ax, ys)
    _set_run_ticks(ax, runs)
    counts = Counter(r.status for r in runs)
    handles = [Line2D([], [], ls="", marker="o", color=_status_colour(s), label=f"{s} ({n})")
               for s, n in counts.items()]
    if missing:
        handles.append(Line2D([], [], ls="", marker="x", color="black", label="no val MSE"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Validation MSE of every run, by status")
    ax.grid(alpha=0.3)
    return fig


def _safe_history(runs_dir: Path, run_id: str) -> list[dict]:
    """A run's history.json, or [] when it is missing or unreadable (logged, not raised),
    because one broken run folder must not cost the whole report."""
    try:
        return load_history(runs_dir / run_id)["epochs"]
    except (MetricsError, OSError) as exc:
        log.warning("skipping learning curve of %s: %s", run_id, exc)
        return []


def _plot_learning_curves(runs: Sequence[RunInfo], runs_dir: Path,
                          k: int = _TOP_K_CURVES) -> tuple[Any | None, list[str]]:
    """Plot 3: val MSE per epoch of the k best runs; returns (figure or None, skipped run ids)."""
    ranked = sorted((r for r in runs if _finite(r.val_mse) is not None),
                    key=lambda r: _finite(r.val_mse))[:k]
    curves, skipped = [], []
    for run in ranked:
        history = _safe_history(runs_dir, run.run_id)
        if history:
            curves.append((run, history))
        else:
            skipped.append(run.run_id)
    if not curves:
        return None, skipped
    fig = _new_figure(8, 3.6)
    ax = fig.add_subplot()
    for run, history in curves:
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
        values = [_finite(h.get("val_mse")) for h in history]
        ax.plot(epochs, [math.nan if v is None else v for v in values], "o-", ms=3,
                label=f"{run.run_id} ({format_metric(run.val_mse)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val MSE")
    ax.set_title(f"Learning curves of the {len(curves)} best runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, skipped


def varying_params(runs: Sequence[RunInfo]) -> list[str]:
    """The KEY_PARAMS that take more than one value across `runs` (others say nothing)."""
    return [p for p in KEY_PARAMS
            if len({repr(param_value(r.config, p)) for r in runs}) > 1]


def _param_panel(ax: Any, runs: Sequence[RunInfo], path: str, best_run_id: str | None,
                 rng: Any) -> None:
    """One small scatter of val MSE against one parameter (numeric or categorical)."""
    raw = [param_value(r.config, path) for r in runs]
    numeric = all(v is None or _is_number(v) for v in raw)
    xs = (_numeric_positions(ax, raw, rng) if numeric
          else _category_positions(ax, raw, rng))
    _scatter_param(ax, runs, xs, best_run_id)
    ax.set_ymargin(_Y_MARGIN)
    ax.set_title(path, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _numeric_positions(ax: Any, raw: Sequence[Any], rng: Any) -> list[float]:
    """x positions for a numeric param, NaN where unset.

    Log axis beyond one decade. Search grids reuse a few values (d_model 128/256),
    so points get a small jitter (1.5% of the span) to keep them from hiding
    each other, and a few integer values are labelled exactly.
    """
    values = [float(v) for v in raw if v is not None]
    log_axis = _wants_log(values)
    if log_axis:
        ax.set_xscale("log")
    distinct = sorted(set(values))
    if len(distinct) <= 8 and all(v.is_integer() for v in distinct):
        ax.set_xticks(distinct, [f"{v:g}" for v in distinct])
        ax.set_xticks([], minor=True)  # a log axis would add minor labels (2x10^1 ...) over the exact ones
    span = (max(values) - min(values)) if values else 0.0
    out = []
    for v in raw:
        if v is None:
            out.append(math.nan)
        elif log_axis:
            out.append(float(v) * 10 ** rng.uniform(-0.03, 0.03))
        else:
            out.append(float(v) + rng.uniform(-0.015, 0.015) * (span or 1.0))
    return out


def _category_positions(ax: Any, raw: Sequence[Any], rng: Any) -> list[float]:
    """x positions for a categorical param: one slot per value, jittered within it."""
    labels = sorted({_category_label(v) for v in raw})
    position = {label: i for i, label in enumerate(labels)}
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    return [position[_category_label(v)] + rng.uniform(-_JITTER, _JITTER) for v in raw]


def _category_label(value: Any) -> str:
    """Tick label of a categorical value ('optim.Adam' -> 'Adam', None -> 'unset')."""
    return "unset" if value is None else _short_class(value)


def _scatter_param(ax: Any, runs: Sequence[RunInfo], xs: Sequence[float],
                   best_run_id: str | None) -> None:
    """Points coloured by status; × on top for runs without val MSE; the best run starred."""
    points = [(x, _finite(r.val_mse), r) for x, r in zip(xs, runs) if not math.isnan(x)]
    shown = [(x, y, r) for x, y, r in points if y is not None]
    if shown:
        ax.scatter([p[0] for p in shown], [p[1] for p in shown], s=16,
                   c=[_status_colour(p[2].status) for p in shown], zorder=3)
    best = [(x, y) for x, y, r in shown if r.run_id == best_run_id]
    if best:
        ax.scatter(*zip(*best), marker="*", s=110, color="#ffb300", edgecolors="black",
                   linewidths=0.6, zorder=5)
    failed = [(x, r.status) for x, y, r in points if y is None]
    _mark_missing(ax, [f[0] for f in failed], [_status_colour(f[1]) for f in failed])


def _plot_params(runs: Sequence[RunInfo], best_run_id: str | None) -> Any | None:
    """Plot 4: a grid of val MSE against each varying key param; None if none varies."""
    import numpy as np

    params = varying_params(runs)
    if not params:
        return None
    ncols = min(4, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig = _new_figure(2.6 * ncols, 2.3 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    rng = np.random.default_rng(0)  # fixed jitter: the same state gives the same picture
    for ax, path in zip(axes, params):
        _param_panel(ax, runs, path, best_run_id, rng)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    if _wants_log(_val_points(runs)[1]):
        axes[0].set_yscale("log")
    for ax in axes[::ncols]:
        ax.set_ylabel("val MSE", fontsize=8)
    fig.suptitle("Validation MSE against each key parameter that varies (★ best, × no val MSE)",
                 fontsize=10)
    return fig


# --------------------------------------------------------------------------- HTML pieces

_CSS = """
:root { color-scheme: light; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0; background: #f5f6f8; color: #1f2328; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px;
        margin: 12px 0; }
.muted { color: #57606a; font-size: 0.9em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px;
      overflow-x: auto; white-space: pre-wrap; }
figure { margin: 12px 0; background: #fff; border: 1px solid #d0d7de; border-radius: 8px;
         padding: 8px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #57606a; font-size: 0.85em; padding: 4px 8px 0; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 0.85em; }
th, td { border-bottom: 1px solid #e1e4e8; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.best { background: #fff8e1 !important; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.params { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
td.error { color: #b42318; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
.status { border-radius: 10px; padding: 1px 8px; font-size: 0.85em; white-space: nowrap; }
.st-green { background: #dafbe1; color: #116329; }
.st-red { background: #ffebe9; color: #a40e26; }
.st-yellow { background: #fff8c5; color: #7d4e00; }
.st-other { background: #eaeef2; color: #24292f; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _status_badge(status: str) -> str:
    """A coloured pill for a status, in the same colour family as the terminal table."""
    family = STATUS_STYLES.get(status, "other")
    return f'<span class="status st-{_esc(family)}">{_esc(status)}</span>'


def _rerun_command(runs_dir: Path, best: RunInfo) -> str:
    """The command that re-trains the best config under a new tag."""
    config = runs_dir / best.run_id / CONFIG_USED_FILE
    return (f"python train.py --config {shlex.quote(str(config))} "
            f"--tag {shlex.quote(best.run_id + '_rerun')}")


def _html_header(state: AgentState, runs_dir: Path, state_path: Path | None) -> str:
    """Title card: summary line, best run with its re-run command, time and state file."""
    best = _best_run(state)
    parts = ["<h1>NAS search report</h1>",
             f'<p class="muted">generated {_esc(utc_now_iso())} · state file '
             f'<code>{_esc(state_path if state_path is not None else "(not given)")}</code> · '
             f'runs folder <code>{_esc(runs_dir)}</code></p>',
             f'<div class="card"><p>{_esc(study_summary(state))}</p>']
    if best is not None:
        parts.append(f"<p>Best run <strong>{_esc(best.run_id)}</strong>: val MSE "
                     f"{_esc(format_metric(best.val_mse))}, test MSE "
                     f"{_esc(format_metric(best.test_mse))} "
                     f'<span class="muted">({_esc(compact_params(best.config))})</span>. '
                     "Re-run it with:</p>"
                     f"<pre>{_esc(_rerun_command(runs_dir, best))}</pre>")
    parts.append(_html_meta(state.meta) + "</div>")
    return "\n".join(parts)


def _html_meta(meta: dict) -> str:
    """Scalar study metadata (seed, proposer, dataset, ...) as one muted line."""
    items = [f"{_esc(k)}: {_esc(v)}" for k, v in meta.items()
             if isinstance(v, (str, int, float, bool)) or v is None]
    return f'<p class="muted">{" · ".join(items)}</p>' if items else ""


def _html_figure(uri: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{_esc(alt)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _html_plots(state: AgentState, runs_dir: Path) -> str:
    """The four plots (or a note where one has nothing to show), each embedded as PNG."""
    runs, best_id = state.runs, state.best_run_id
    parts = ["<h2>Plots</h2>",
             _html_figure(_png_data_uri(_plot_progress(runs, best_id)), "search progress",
                          "Best validation MSE so far against run index; accepted runs starred, "
                          "runs without a val MSE as × on the top edge."),
             _html_figure(_png_data_uri(_plot_val_by_status(runs)), "val MSE by status",
                          "Validation MSE of every run, coloured by status; × = no val MSE "
                          "(failed, diverged, ...).")]
    curves, skipped = _plot_learning_curves(runs, runs_dir)
    note = f" No readable {HISTORY_FILE} for: {', '.join(skipped)}." if skipped else ""
    if curves is not None:
        parts.append(_html_figure(_png_data_uri(curves), "learning curves",
                                  "Validation MSE per epoch of the best runs." + note))
    else:
        parts.append(f'<p class="muted">No learning curves: no {HISTORY_FILE} found for the '
                     f"best runs.{_esc(note)}</p>")
    params = _plot_params(runs, best_id)
    if params is not None:
        parts.append(_html_figure(_png_data_uri(params), "parameters against val MSE",
                                  "Validation MSE against each key parameter that varies; "
                                  "categories are jittered horizontally."))
    else:
        parts.append('<p class="muted">No key parameter varies across runs yet.</p>')
    return "\n".join(parts)


_HTML_COLUMNS = COLUMNS + ("reason", "error")


def _html_run_row(run: RunInfo, best_run_id: str | None) -> str:
    """One <tr>: the status-table cells plus the accept/reject reason and the error line."""
    cells = run_cells(run, best_run_id)
    cells["reason"] = _clip(run.reason)
    cells["error"] = error_last_line(run.error_tail)
    tds = []
    for name in _HTML_COLUMNS:
        if name == "status":
            tds.append(f"<td>{_status_badge(run.status)}</td>")
            continue
        css = ("num" if name in _RIGHT_ALIGNED else
               "params" if name == "params" else "error" if name == "error" else "")
        attr = f' class="{css}"' if css else ""
        tds.append(f"<td{attr}>{_esc(cells[name])}</td>")
    row_class = ' class="best"' if run.run_id == best_run_id else ""
    return f"<tr{row_class}>{''.join(tds)}</tr>"


def _html_runs_table(state: AgentState) -> str:
    """Every run in launch order, same columns as `status` plus reason and error."""
    head = "".join(f"<th>{_esc(name)}</th>" for name in _HTML_COLUMNS)
    rows = "\n".join(_html_run_row(run, state.best_run_id) for run in state.runs)
    return (f'<h2 id="runs-heading">Runs ({len(state.runs)})</h2>\n'
            f'<div class="table-wrap"><table id="runs"><thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{rows}\n</tbody></table></div>")


def _html_rejected(state: AgentState) -> str:
    """Proposals that failed validation: their count and the last few errors."""
    if not state.rejected:
        return ""
    items = "\n".join(
        f"<li><code>{_esc(e.get('at', '?'))}</code> attempt {_esc(e.get('attempt', '?'))} "
        f"by {_esc(e.get('proposer', '?'))}: <pre>{_esc(_clip(str(e.get('error', ''))))}</pre></li>"
        for e in state.rejected[-_LAST_REJECTED:])
    shown = min(len(state.rejected), _LAST_REJECTED)
    return (f"<h2>Rejected proposals ({len(state.rejected)})</h2>\n"
            f'<div class="card"><p class="muted">The last {shown}, newest last; '
            f"these configs failed validation and were never trained.</p>\n"
            f"<ul>\n{items}\n</ul></div>")


def _html_page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}{LINEAGE_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def _report_body(state: AgentState, runs_dir: Path, state_path: Path | None) -> str:
    parts = [_html_header(state, runs_dir, state_path)]
    if state.runs:
        parts += [_html_plots(state, runs_dir), _html_runs_table(state), lineage_html(state)]
    else:
        parts.append(f'<div class="card"><p>No runs yet in <code>{_esc(runs_dir)}</code>. '
                     "The report fills in as the search trains models.</p></div>")
    parts.append(_html_rejected(state))
    return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- report

def _check_paths(runs_dir: Path, out: Path) -> None:
    """Fail early, with the fix, on paths that would make the write fail obscurely."""
    if runs_dir.exists() and not runs_dir.is_dir():
        raise NotADirectoryError(f"write_report: runs_dir {runs_dir} is a file, not a folder; "
                                 "pass the folder that holds the run_XXXX folders")
    if out.is_dir():
        raise IsADirectoryError(f"write_report: out {out} is a folder; pass a file path such as "
                                f"{out / REPORT_FILE}")


def write_report(state: AgentState, runs_dir: Path, out: Path | None = None,
                 state_path: Path | None = None) -> Path:
    """Write the self-contained HTML report (default runs_dir/report.html); return its path.

    Written atomically, so a browser refreshing during a search never sees half a
    page. Run folders are only read: a missing or broken history.json drops that
    run's learning curve, never the report.
    """
    runs_dir = Path(runs_dir)
    out = Path(out) if out is not None else runs_dir / REPORT_FILE
    state_path = Path(state_path) if state_path is not None else None
    _check_paths(runs_dir, out)
    page = _html_page("NAS search report", _report_body(state, runs_dir, state_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    log.info("wrote report for %d runs to %s (%d kB)", len(state.runs), out, len(page) // 1024)
    return out
