"""Parallel runs and learning-curve pruning against one plain run at a time, and the noise floor
of the base config, on this machine.

    NAS_DATA_DIR=../shared/data python bench/prune_compare.py --parallel 2        # 12-run tpe studies
    NAS_DATA_DIR=../shared/data python bench/prune_compare.py --runs 4 --noise-seeds 3 \
        --budget training.max_epochs=2 training.max_steps_per_epoch=5 --config tiny_config.py   # a quick check

1. One `python -m nas_agent_graph --proposer tpe` study per variant, the same seed, config, space
   (bench/cpu_space.json) and per-run budget, run one after the other: `--parallel 1 --prune none`
   (the baseline), then each --prune mode at --parallel 1, then each --parallel N > 1 without
   pruning. A --parallel 1 study runs with OMP_NUM_THREADS=--threads; a parallel one leaves it
   unset, so the agent splits the cores between its runs. Printed per variant: the final best val/test MSE, the study's wall-clock,
   the wall-clock until the run that holds the final best was recorded (from the study's
   `meta.created_at` to that run's record time, one-second resolution), the runs pruned and the
   epochs trained; ratios against `none` measured in the same invocation.
   Pruning changes what TPE sees (pruned runs are PRUNED trials), so the studies may find
   different bests: compare best MSE and time together.
2. The noise floor: the base config trained with --noise-seeds seeds (`train.py --seed`) at the
   same budget; mean and std of val MSE. A difference between two configs smaller than this std
   is not evidence (see --confirm-seeds).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from search_compare import run_orchestrator  # noqa: E402 - a sibling script (bench/ is on sys.path as the script's folder)
from nas_agent.agent_state import get_best_run, load_agent_state  # noqa: E402

BUDGET = ["training.max_epochs=6", "training.max_steps_per_epoch=60", "training.patience=6"]


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def run_study(mode: str, parallel: int, a, out: Path, env: dict) -> dict:
    folder = out / f"prune_{mode}_p{parallel}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(a.config, folder / "config.py")
    cmd = [sys.executable, "-m", "nas_agent_graph", "--max-runs", str(a.runs), "--proposer", "tpe",
           "--seed", str(a.seed), "--space", str(a.space), "--prune", mode, "--prune-warmup", a.prune_warmup,
           "--warm-start", "off", "--run-budget", "none",  # the epoch budget below is the budget
           "--parallel", str(parallel)]
    if parallel > 1:
        env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    for s in a.budget:
        cmd += ["--set", s]
    rc, wall = run_orchestrator(cmd, folder, env)
    state = load_agent_state(folder / "agent_state.json")
    best = get_best_run(state)
    to_best = _ts(best.started_at) - _ts(state.meta["created_at"]) if best else None
    return {"mode": mode, "parallel": parallel, "rc": rc, "runs": len(state.runs), "wall_s": wall, "to_best_s": to_best,
            "best": best.run_id if best else None, "val": best.val_mse if best else None,
            "test": best.test_mse if best else None,
            "pruned": sum(r.status == "pruned" for r in state.runs),
            "epochs": sum(r.extra.get("epochs_run") or 0 for r in state.runs)}


def noise_floor(a, out: Path, env: dict) -> list[float]:
    values = []
    for seed in range(a.noise_seeds):
        tag = f"seed_{seed}"
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(a.config), "--tag", tag, "--runs-dir",
               str(out / "noise"), "--seed", str(1000 + seed), "--overwrite"]
        for s in a.budget:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((out / "noise" / tag / "metrics.json").read_text())
        if metrics.get("val_mse") is not None:
            values.append(metrics["val_mse"])
    return values


def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def _ratio(x, base):
    return "n/a" if x is None or not base else f"{x / base:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune", nargs="*", default=["median"], choices=["median", "asha"])
    p.add_argument("--parallel", nargs="*", type=int, default=[2], help="--parallel values > 1 to compare")
    p.add_argument("--prune-warmup", default="1,3")
    p.add_argument("--budget", nargs="+", default=BUDGET, metavar="KEY=VALUE")
    p.add_argument("--config", type=Path, default=ROOT / "config.py")
    p.add_argument("--space", type=Path, default=ROOT / "bench" / "cpu_space.json")
    p.add_argument("--noise-seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench_out") / "prune_compare")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    a.config, a.space, out = a.config.resolve(), a.space.resolve(), a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))

    variants = [("none", 1), *((m, 1) for m in a.prune), *(("none", n) for n in a.parallel if n > 1)]
    rows = [run_study(mode, n, a, out, env) for mode, n in variants]
    base = rows[0]
    print(f"\n{a.runs}-run tpe studies, seed {a.seed}, budget {' '.join(a.budget)}, --prune-warmup {a.prune_warmup}")
    head = ("prune", "parallel", "rc", "runs", "pruned", "epochs", "best", "val MSE", "test MSE", "wall s", "to best s",
            "wall ratio", "to-best ratio", "val ratio")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["mode"], str(r["parallel"]), str(r["rc"]), str(r["runs"]), str(r["pruned"]), str(r["epochs"]),
                          str(r["best"]), _f(r["val"], ".4f"), _f(r["test"], ".4f"), f"{r['wall_s']:.0f}",
                          _f(r["to_best_s"], ".0f"), _ratio(r["wall_s"], base["wall_s"]),
                          _ratio(r["to_best_s"], base["to_best_s"]), _ratio(r["val"], base["val"])]))

    values = noise_floor(a, out, env)
    print(f"\nnoise floor of {a.config.name} at this budget ({len(values)} of {a.noise_seeds} seeds ran):")
    if len(values) >= 2:
        print(f"val MSE {statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (std); values "
              + ", ".join(f"{v:.4f}" for v in values))
        if base["val"]:
            print(f"std / best val MSE of the none study: {statistics.stdev(values) / base['val']:.2%}")
    else:
        print("too few successful seeds for a std")


if __name__ == "__main__":
    main()
