"""Compare proposers on ETTh1 at a fixed small per-run budget, and measure the graph's overhead.

    NAS_DATA_DIR=../shared/data python bench/search_compare.py --proposers tpe random --runs 20 --seeds 0
    NAS_DATA_DIR=../shared/data python bench/search_compare.py --proposers llm hybrid tpe random \
        --runs 20 --seeds 0 1 --budget training.max_epochs=2 training.max_steps_per_epoch=40 training.patience=2

Each (proposer, seed) is one full `python -m nas_agent_graph` study in its own folder under
--out, started from the top-level config.py with every run capped by --set (the budget
below) and the search space narrowed by bench/cpu_space.json. Studies run --jobs at a time,
each with OMP_NUM_THREADS = cores / jobs so that they share the machine evenly.

Overhead per run = (study wall-clock - time inside train.py - smoke tests) / runs: what
the graph itself costs (proposing, checkpoints, state saves, process start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nas_agent.agent_state import get_best_run, load_agent_state  # noqa: E402
from nas_agent_graph.proposers import llm_records, llm_validity  # noqa: E402

BUDGET = ["training.max_epochs=3", "training.max_steps_per_epoch=60", "training.patience=3"]


def llm_seconds(state) -> tuple[float, int]:
    """Seconds spent generating and the number of LLM proposals (runs and rejections)."""
    records = llm_records(state)
    return sum(r.get("latency_s") or 0.0 for r in records), len(records)


def run_orchestrator(cmd: list[str], folder: Path, env: dict) -> tuple[int, float]:
    """Run one study's orchestrator in `folder` (its output in orchestrator.log): (exit code, seconds)."""
    t0 = time.monotonic()
    with open(folder / "orchestrator.log", "w") as log:
        rc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.monotonic() - t0


def run_study(proposer: str, seed: int, runs: int, out: Path, threads: int, budget: list[str]) -> dict:
    folder = out / f"{proposer}_seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "config.py", folder / "config.py")
    cmd = [sys.executable, "-m", "nas_agent_graph", "--max-runs", str(runs), "--proposer", proposer,
           "--seed", str(seed), "--space", str(ROOT / "bench" / "cpu_space.json")]
    for s in budget:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    rc, wall = run_orchestrator(cmd, folder, env)
    state = load_agent_state(folder / "agent_state.json")
    best = get_best_run(state)
    train_s = sum(r.duration_s or 0.0 for r in state.runs)
    smoke_s = sum(((r.extra.get("smoke") or {}).get("seconds") or 0.0) for r in state.runs)
    n = len(state.runs)
    llm_s, llm_n = llm_seconds(state)
    validity = llm_validity(state)
    best_idx = next((i for i, r in enumerate(state.runs) if best and r.run_id == best.run_id), None)
    return {"proposer": proposer, "seed": seed, "rc": rc, "runs": n, "wall_s": wall,
            "best_val": best.val_mse if best else None, "best_test": best.test_mse if best else None,
            "best_run": best.run_id if best else None, "best_idx": best_idx,
            "time_to_best_s": sum(r.duration_s or 0.0 for r in state.runs[: (best_idx or 0) + 1]),
            "failed": sum(r.status not in ("ok", "timeout") for r in state.runs),
            "rejected": len(state.rejected), "train_s": train_s, "smoke_s": smoke_s,
            "overhead_per_run_s": (wall - train_s - smoke_s - llm_s) / max(n, 1), "smoke_per_run_s": smoke_s / max(n, 1),
            "llm_s_per_proposal": llm_s / llm_n if llm_n else None, "llm_proposals": llm_n,
            "llm_valid": f"{validity['valid']}/{validity['proposals']}" if validity else "-",
            "baseline_val": state.runs[0].val_mse if state.runs else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--proposers", nargs="+", default=["tpe", "random"])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/nas_search_compare"))
    p.add_argument("--budget", nargs="+", default=BUDGET, metavar="KEY=VALUE", help="--set items for every run")
    a = p.parse_args()
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    tasks = [(pr, s) for s in a.seeds for pr in a.proposers]
    print(f"{len(tasks)} studies of {a.runs} runs, {a.jobs} at a time, {threads} thread(s) each; "
          f"budget per run: {' '.join(a.budget)}; space: bench/cpu_space.json")
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda t: run_study(t[0], t[1], a.runs, a.out, threads, a.budget), tasks))
    (a.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| proposer | seed | runs | failed | rejected | baseline val | best val MSE | test MSE of best | "
          "best run | train time to best | study wall | overhead/run | smoke/run | LLM s/proposal | LLM valid |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"| {r['proposer']} | {r['seed']} | {r['runs']} | {r['failed']} | {r['rejected']} | {f(r['baseline_val'])} | "
              f"{f(r['best_val'])} | {f(r['best_test'])} | {r['best_run']} | {r['time_to_best_s']:.0f}s | "
              f"{r['wall_s']:.0f}s | {r['overhead_per_run_s']:.2f}s | {r['smoke_per_run_s']:.2f}s | "
              f"{'-' if r['llm_s_per_proposal'] is None else format(r['llm_s_per_proposal'], '.1f') + 's'} | "
              f"{r['llm_valid']} |")
    print("\n| proposer | seeds | mean best val MSE | std | mean test MSE of best | best val vs tpe |")
    print("|---|---:|---:|---:|---:|---:|")
    means = {}
    for pr in a.proposers:
        vals = [r["best_val"] for r in rows if r["proposer"] == pr and r["best_val"] is not None]
        if vals:
            means[pr] = statistics.mean(vals)
    for pr in a.proposers:
        vals = [r["best_val"] for r in rows if r["proposer"] == pr and r["best_val"] is not None]
        tests = [r["best_test"] for r in rows if r["proposer"] == pr and r["best_test"] is not None]
        if not vals:
            continue
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        ratio = f"{means[pr] / means['tpe']:.3f}x" if "tpe" in means else "-"
        print(f"| {pr} | {len(vals)} | {means[pr]:.4f} | {std:.4f} | "
              f"{statistics.mean(tests) if tests else float('nan'):.4f} | {ratio} |")


if __name__ == "__main__":
    main()
