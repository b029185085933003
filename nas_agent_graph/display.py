"""What the person at the terminal sees while the search runs.

On a terminal: a rich live panel with the study (runs done, best so far, elapsed time and an
ETA from the measured run times), one line per run in flight with its progress through the
epoch (read every second from the progress.json train.py rewrites every 2 s: steps done, rate,
ETAs of the epoch and of the run), the best run so far and the last decisions. Elsewhere (a log
file, CI): one plain line per event, no control characters.
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from nas_agent.agent_state import AgentState, RunInfo, get_best_run
from nas_agent.run_folder import PROGRESS_FILE
from nas_agent_graph.report import format_duration


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


class PlainDisplay:
    """One line per event on stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.max_runs: Optional[int] = None

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_study(self, state: AgentState) -> None:
        self.max_runs = state.max_runs
        best = get_best_run(state)
        self._say(f"study: {len(state.runs)}/{state.max_runs} runs done; best "
                  f"{best.run_id + ' val_mse ' + _fmt(best.val_mse) if best else '-'}")

    def on_propose(self, run_id: str, proposer: str, attempt: int) -> None:
        self._say(f"{run_id}: proposing ({proposer}{', attempt ' + str(attempt + 1) if attempt else ''})")

    def on_rejected(self, run_id: str, error: str) -> None:
        self._say(f"{run_id}: proposal rejected: {error.splitlines()[0][:300]}")

    def on_launch(self, run_id: str, config: dict) -> None:
        self._say(f"{run_id}: training ({config['training'].get('max_epochs')} epochs max)")

    def on_epoch(self, run_id: str, history: list[dict]) -> None:
        if history:
            h = history[-1]
            self._say(f"{run_id}: epoch {h['epoch']} val_mse {_fmt(h.get('val_mse'))}")

    def on_decision(self, run: RunInfo, state: AgentState) -> None:
        verdict = "ACCEPTED" if run.accepted else "rejected"
        self._say(f"{run.run_id}: {run.status}, val_mse {_fmt(run.val_mse)}, {verdict}: {run.reason}")

    def on_message(self, text: str) -> None:
        self._say(text)

    def on_stop(self, message: str) -> None:
        self._say(message)


def read_progress(run_dir: Path) -> Optional[dict]:
    """train.py's progress.json, or None (not written yet, or caught mid-replace)."""
    try:
        data = json.loads((run_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def progress_text(p: dict) -> str:
    """'epoch 2/20 [#####.....] 120/264 3.1 it/s, epoch ETA 0m46s, run ETA 15m10s'."""
    width = 20
    done = width * p.get("step", 0) // max(p.get("steps") or 1, 1)
    rate = p.get("steps_per_s")
    speed = ""
    if isinstance(rate, (int, float)):
        speed = (f" {rate:.1f} it/s, epoch ETA {format_duration(p.get('epoch_eta_s'))}, "
                 f"run ETA {format_duration(p.get('run_eta_s'))}")
    return (f"epoch {p.get('epoch')}/{p.get('max_epochs')} [{'#' * done}{'.' * (width - done)}] "
            f"{p.get('step')}/{p.get('steps')}{speed}")


def study_eta(state: AgentState, parallel: int) -> Optional[float]:
    """Seconds left for the study: the median recorded run time x runs left / runs at once."""
    times = [r.duration_s for r in state.runs if isinstance(r.duration_s, (int, float))]
    left = max((state.max_runs or 0) - len(state.runs), 0)
    return statistics.median(times) * left / max(parallel, 1) if times else None


class RichDisplay(PlainDisplay):
    """A live panel; use as a context manager around the search."""

    def __init__(self, console: Optional[Console] = None, runs_dir: Optional[Path] = None, parallel: int = 1):
        super().__init__()
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.runs_dir = runs_dir
        self.parallel = parallel
        self.started = time.monotonic()
        self.state: Optional[AgentState] = None
        self.stopping = threading.Event()
        self.ticker: Optional[threading.Thread] = None
        self.study_line = ""
        self.best_line = "best: -"
        self.current = ""
        self.progress = ""
        self.training: dict[str, str] = {}  # run id -> its epoch progress, for each run in flight
        self.max_epochs: dict[str, Optional[int]] = {}
        self.last_val: dict[str, str] = {}  # run id -> its last epoch's val MSE, shown beside the progress
        self.decisions: deque[str] = deque(maxlen=6)
        self.lock = threading.RLock()

    def __enter__(self):
        self.live.start()
        self.ticker = threading.Thread(target=self._tick, name="display-ticker", daemon=True)
        self.ticker.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.live.stop()
        return False

    def _tick(self) -> None:
        """Every second: each run in flight's progress.json, and the study's clock."""
        while not self.stopping.wait(1.0):
            if self.runs_dir is not None:
                with self.lock:
                    flying = list(self.training)
                for run_id in flying:
                    progress = read_progress(self.runs_dir / run_id)
                    if progress is not None:
                        with self.lock:
                            if run_id in self.training:  # not decided meanwhile
                                self.training[run_id] = progress_text(progress) + self.last_val.get(run_id, "")
            if self.state is not None:
                self._update_study(self.state)
            self._refresh()

    def _refresh(self) -> None:
        # on_epoch comes from the runs' threads (nas_agent_graph.pool) while the graph's thread
        # appends decisions: the panel is built from copies, under a lock.
        with self.lock:
            decisions, training = list(self.decisions), dict(self.training)
            table = Table.grid(padding=(0, 1))
            for line in decisions:
                table.add_row(Text.from_markup(line))
            flying = [Text(f"{run_id}: training, {progress}") for run_id, progress in sorted(training.items())]
            body = Group(Text(self.study_line, style="bold"), Text(self.best_line, style="green"),
                         Text(f"{self.current} {self.progress}"), *flying, table)
            self.live.update(Panel(body, title="nas_agent_graph", border_style="blue"))

    def on_study(self, state: AgentState) -> None:
        self.max_runs = state.max_runs
        self._update_study(state)
        self._refresh()

    def _update_study(self, state: AgentState) -> None:
        self.state = state
        best = get_best_run(state)
        elapsed = time.monotonic() - self.started
        self.study_line = (f"runs {len(state.runs)}/{state.max_runs}   elapsed {format_duration(elapsed)}   "
                           f"ETA {format_duration(study_eta(state, self.parallel))}   "
                           f"rejected proposals {len(state.rejected)}")
        if best:
            self.best_line = f"best: {best.run_id} val_mse {_fmt(best.val_mse)} test_mse {_fmt(best.test_mse)}"

    def on_propose(self, run_id: str, proposer: str, attempt: int) -> None:
        self.current, self.progress = f"{run_id}: proposing with {proposer}", ""
        self._refresh()

    def on_rejected(self, run_id: str, error: str) -> None:
        with self.lock:
            self.training.pop(run_id, None)  # a run that failed its in-run smoke test (reject_run)
            self.last_val.pop(run_id, None)
            self.decisions.append(f"[yellow]{run_id} proposal rejected[/]: {error.splitlines()[0][:120]}")
        self._refresh()

    def on_launch(self, run_id: str, config: dict) -> None:
        self.max_epochs[run_id] = config["training"].get("max_epochs")
        self.current, self.progress = "", ""
        self.training[run_id] = f"epoch 0/{self.max_epochs[run_id]}"
        self._refresh()

    def on_epoch(self, run_id: str, history: list[dict]) -> None:
        # Called from the run's supervising thread (nas_agent_graph.pool); rich's Live is thread-safe.
        if history:
            h = history[-1]
            with self.lock:
                self.last_val[run_id] = f", last val_mse {_fmt(h.get('val_mse'))}"
                self.training[run_id] = (f"epoch {h['epoch']}/{self.max_epochs.get(run_id)} "
                                         f"val_mse {_fmt(h.get('val_mse'))}")
            self._refresh()

    def on_decision(self, run: RunInfo, state: AgentState) -> None:
        with self.lock:
            self.training.pop(run.run_id, None)
            self.last_val.pop(run.run_id, None)
        mark = "[green]accepted[/]" if run.accepted else "[red]rejected[/]" if run.status != "ok" else "rejected"
        with self.lock:
            self.decisions.append(f"{run.run_id} {run.status} val_mse {_fmt(run.val_mse)} {mark}")
        self._update_study(state)
        self._refresh()

    def on_message(self, text: str) -> None:
        with self.lock:
            self.decisions.append(Text(text).markup)
        self._refresh()

    def on_stop(self, message: str) -> None:
        self.stopping.set()
        self.current, self.progress = "", ""
        self._refresh()
        self.live.stop()
        self.console.print(message)
