"""The orchestrator's overhead per run: what happens between two train.py processes (issue 15).

    NAS_DATA_DIR=../shared/data python bench/overhead.py                      # 20-run TPE study
    NAS_DATA_DIR=../shared/data python bench/overhead.py --save after.json --baseline before.json

Runs one `python -m nas_agent_graph` study of --runs tiny runs (a tiny config and space, one
epoch of 2 steps, so train.py itself takes a few seconds) in a temporary folder, then reads
what the study left behind:

    runs/phases.jsonl   the orchestrator's phases (nas_agent_graph/phases.py): each graph node,
                        the checkpoint writes, and NODE/PART spans inside nodes
    agent_state.json    each run's duration_s: the train.py process, from start to exit
    runs/*/metrics.json train.py's startup_s (process start to first training step),
                        startup_marks, train_time_sec, eval_s and, when the smoke test ran
                        inside the run, smoke_s

and prints a per-phase table (per run: the phase's time summed over the run's passes; median
and max over runs) and the share of the study's wall time spent outside train.py. The overhead
per run is (study wall - time inside train.py processes + in-run smoke tests) / runs: the smoke
test counts as overhead wherever it runs. `launch` + `wait` minus the run's train.py process is
what launching adds around the process (folder set-up, the mirror's sync, which overlaps the
run's start-up, process start and exit, reading the results).

Timings on a busy machine are contended; say so when quoting them (--note).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from nas_agent_graph.testing import TINY_SPACE as CLI_TINY_SPACE  # noqa: E402

from nas_agent.agent_state import load_agent_state  # noqa: E402
from nas_agent.logging_utils import load_metrics  # noqa: E402
from nas_agent_graph.phases import read_phases  # noqa: E402

TINY_CONFIG = '''
import torch.nn as nn
import torch.optim as optim
data = {"path": "data/ETTh1.csv", "seq_len": 48, "label_len": 24, "pred_len": 24}
model = {"d_model": 16, "n_heads": 2, "e_layers": 2, "d_layers": 1, "d_ff": 32, "dropout": 0.0}
training = {"max_epochs": 1, "batch_size": 32, "lr": 1e-3, "max_steps_per_epoch": 2,
            "scheduler_class": None, "scheduler_kwargs": {}, "patience": 2}
'''
# every family of the default space at tiny sizes, as the CLI tests use it, with the learning rate searched
TINY_SPACE = {**CLI_TINY_SPACE, "training.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
BUDGET = ["training.max_epochs=1", "training.max_steps_per_epoch=2"]
# train.py's startup_marks (process ages), shown as the time of each step of start-up.
STARTUP_STEPS = [("imports", "python and imports"), ("setup", "config, device, bf16 probe"), ("data", "data"),
                 ("model", "model"),
                 ("optimizer", "to the optimizer (imports torch._dynamo; the in-run smoke test)"),
                 ("eval_probe", "evaluation probe (small timed batches, then full ones unless far over; for the run budget)"),
                 ("first_step", "first batch")]
# Rows of the table, in loop order; a NODE/PART row is part of its node's time.
NODE_ROWS = ["load_state", "propose", "validate", "validate/smoke", "launch", "launch/mirror", "wait",
             "summarise", "decide", "decide/save_state", "decide/mirror", "collect_lora", "checkpoint", "stop"]


def run_study(folder: Path, runs: int, proposer: str, threads: int, extra: list[str]) -> float:
    """One study in `folder`; its wall-clock seconds (the orchestrator's output: orchestrator.log)."""
    (folder / "config.py").write_text(TINY_CONFIG)
    (folder / "space.json").write_text(json.dumps(TINY_SPACE))
    cmd = [sys.executable, "-m", "nas_agent_graph", "--max-runs", str(runs), "--proposer", proposer,
           "--space", "space.json", "--warm-start", "off", "--run-budget", "none", *extra]
    for item in BUDGET:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.monotonic()
    with open(folder / "orchestrator.log", "w") as log:
        rc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    if rc != 0:
        raise SystemExit(f"the study exited {rc}; see {folder / 'orchestrator.log'}")
    return wall


def measure(folder: Path, wall: float, started_at: float) -> dict:
    """The numbers of one finished study folder (see the module docstring)."""
    state = load_agent_state(folder / "agent_state.json")
    runs = [r.run_id for r in state.runs]
    phases = read_phases(folder / "runs")
    per_run: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    session = defaultdict(float)  # phases of no run (load_state, stop) or of the whole session
    for p in phases:
        if p["run_id"] in runs:
            per_run[p["phase"]][p["run_id"]] += p["s"]
        else:
            session[p["phase"]] += p["s"]
    train = {r.run_id: r.duration_s or 0.0 for r in state.runs}
    metrics = {rid: load_metrics(folder / "runs" / rid) or {} for rid in runs}
    startup = {rid: m.get("startup_s") for rid, m in metrics.items() if m.get("startup_s") is not None}
    in_run_smoke = {rid: m.get("smoke_s") for rid, m in metrics.items() if m.get("smoke_s") is not None}
    rows = {}
    for name in NODE_ROWS:
        values = [per_run[name].get(rid, 0.0) for rid in runs]
        if any(values) or session.get(name):
            rows[name] = values + ([session[name]] if session.get(name) else [])
    rows["launch + wait - train.py (launcher)"] = [per_run["launch"].get(rid, 0.0) + per_run["wait"].get(rid, 0.0)
                                                   - train[rid] for rid in runs]
    rows["in-run smoke test (train.py)"] = [in_run_smoke.get(rid, 0.0) for rid in runs]
    rows["train.py process"] = [train[rid] for rid in runs]
    rows["  start-up to first step"] = list(startup.values())
    marks = [m.get("startup_marks") or {} for m in metrics.values()]
    previous = None
    for key, label in STARTUP_STEPS:
        values = [mk[key] - (mk[previous] if previous else 0.0) for mk in marks if key in mk and (
            previous is None or previous in mk)]
        if values:
            rows[f"    {label}"] = values
        previous = key
    first = min((p["at"] - p["s"] for p in phases), default=started_at)
    last = max((p["at"] for p in phases), default=started_at + wall)
    timed = sum(p["s"] for p in phases if "/" not in p["phase"])
    inside = sum(train.values())
    smoke = sum(in_run_smoke.values())
    outside = wall - inside + smoke
    n = max(len(runs), 1)
    return {
        "runs": len(runs), "rejected": len(state.rejected), "wall_s": wall, "train_s": inside, "in_run_smoke_s": smoke,
        "outside_s": outside, "overhead_per_run_s": outside / n, "outside_share": outside / wall,
        "orchestrator_start_s": first - started_at, "orchestrator_exit_s": started_at + wall - last,
        "untimed_s": wall - timed - (first - started_at) - (started_at + wall - last),
        "rows": rows,
    }


def table(result: dict, baseline: dict | None = None) -> str:
    head = "| phase | median s | max s | total s |"
    sep = "|---|---:|---:|---:|"
    if baseline:
        head += " before: median | max | total |"
        sep += "---:|---:|---:|"
    out = [head, sep]
    names = list(result["rows"]) + [k for k in (baseline or {}).get("rows", {}) if k not in result["rows"]]
    for name in names:
        line = f"| {name} | {_cells(result['rows'].get(name), name)} |"
        if baseline:
            line += f" {_cells(baseline['rows'].get(name), name)} |"
        out.append(line)
    out.append("")
    keys = [("runs", "runs recorded", "{:d}"), ("rejected", "proposals rejected", "{:d}"),
            ("wall_s", "study wall time, s", "{:.1f}"), ("train_s", "inside train.py processes, s", "{:.1f}"),
            ("in_run_smoke_s", "of which in-run smoke tests, s", "{:.2f}"),
            ("outside_s", "outside train.py (+ in-run smoke), s", "{:.1f}"),
            ("overhead_per_run_s", "overhead per run, s", "{:.2f}"),
            ("outside_share", "share of wall time outside train.py", "{:.1%}"),
            ("orchestrator_start_s", "orchestrator start-up (process start to first node), s", "{:.2f}"),
            ("orchestrator_exit_s", "orchestrator exit (last node to process end), s", "{:.2f}"),
            ("untimed_s", "between nodes, untimed (graph machinery), s", "{:.2f}")]
    out += ["| | after |" + (" before |" if baseline else ""), "|---|---:|" + ("---:|" if baseline else "")]
    for key, label, fmt in keys:
        line = f"| {label} | {fmt.format(result[key])} |"
        if baseline:
            line += f" {fmt.format(baseline[key]) if key in baseline else '-'} |"
        out.append(line)
    return "\n".join(out)


def _cells(values, name: str) -> str:
    if not values:
        return "- | - | -"
    total = f"{sum(values):.2f}"
    return f"{statistics.median(values):.3f} | {max(values):.3f} | {total}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--proposer", default="tpe")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the study (default: 1)")
    p.add_argument("--out", type=Path, default=None, help="study folder (default: a temporary one, removed)")
    p.add_argument("--read", type=Path, default=None, help="only read a finished study folder (no run)")
    p.add_argument("--save", type=Path, default=None, help="write the numbers as JSON")
    p.add_argument("--baseline", type=Path, default=None, help="a --save file to compare with")
    p.add_argument("--note", default="", help="printed under the table (e.g. 'contended: 2 cores, another study')")
    p.add_argument("extra", nargs="*", help="more orchestrator arguments, after --")
    a = p.parse_args()
    if a.read:
        result = measure(a.read, *json.loads((a.read / "bench_wall.json").read_text()).values())
    else:
        folder = a.out or Path(tempfile.mkdtemp(prefix="nas_overhead_"))
        if a.out and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        started_at = time.time()
        wall = run_study(folder, a.runs, a.proposer, a.threads, a.extra)
        (folder / "bench_wall.json").write_text(json.dumps({"wall_s": wall, "started_at": started_at}))
        result = measure(folder, wall, started_at)
        if a.out is None:
            shutil.rmtree(folder)
    result.update(command="NAS_DATA_DIR=../shared/data python bench/overhead.py " + " ".join(sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d %H:%M"), note=a.note)
    baseline = json.loads(a.baseline.read_text()) if a.baseline else None
    print(table(result, baseline))
    if a.note:
        print(f"\n{a.note}")
    if a.save:
        a.save.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
