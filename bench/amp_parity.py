"""bf16 autocast against fp32 (issue 15): same configs, same seeds, only training.amp differs.

    NAS_DATA_DIR=../shared/data python bench/amp_parity.py [--configs config.py configs/dlinear.py]
        [--seeds 3] [--set training.max_epochs=3 ...] [--out /tmp/nas_amp_parity] [--threads 2]

Trains each config once per seed with training.amp=false (fp32) and once with training.amp=true
(bf16 where train.amp_mode finds the machine able), one train.py subprocess at a time, and
prints val and test MSE as mean +- std over the seeds, the samples/s of each precision, and a
verdict: "parity" when the mean val MSEs differ by less than twice the standard error of the
difference (sqrt(s_fp32^2/n + s_bf16^2/n)), else "differs". Evaluation is always fp32 in
train.py, so only the training precision differs. Selection is by val MSE; test MSE is shown,
never used for the verdict.

Runs whose metrics.json says ok or timeout are reused, so a killed benchmark resumes. The
default --set trains the default config for 3 epochs (a full default run is ~1 h on 2 cores);
the table says which settings it used. A benchmark: it prints a table, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED0 = 2021
DONE = ("ok", "timeout")
DEFAULT_CONFIGS = ["config.py", "configs/dlinear.py"]
DEFAULT_SETS = ["training.max_epochs=3"]
PRECISIONS = {"fp32": "False", "bf16": "True"}


def train_once(tag: str, config: str, seed: int, extra: list[str], sets: list[str], out: Path, threads: int) -> dict:
    """The metrics of one train.py run into out/tag (reused when it already ended ok or timeout)."""
    metrics_path = out / tag / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("status") in DONE:
            return metrics
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config), "--tag", tag,
           "--runs-dir", str(out), "--seed", str(seed), "--overwrite", *extra,
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if not metrics_path.exists():
        raise SystemExit(f"{tag}: train.py wrote no metrics.json (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(metrics_path.read_text())


def run_one(config: str, precision: str, seed: int, sets: list[str], out: Path, threads: int) -> dict:
    return train_once(f"{Path(config).stem}_{precision}_s{seed}", config, seed,
                      ["--set", f"training.amp={PRECISIONS[precision]}"], sets, out, threads)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(fp32: list[float], bf16: list[float]) -> tuple[str, float, float]:
    """("parity" | "differs", difference of the means, 2 x its standard error)."""
    (m1, s1), (m2, s2) = mean_std(fp32), mean_std(bf16)
    bound = 2 * math.sqrt(s1 ** 2 / len(fp32) + s2 ** 2 / len(bf16))
    return ("parity" if abs(m2 - m1) <= bound else "differs"), m2 - m1, bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files, relative to the repository")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"passed to every run (default: {' '.join(DEFAULT_SETS)})")
    p.add_argument("--out", type=Path, default=Path("/tmp/nas_amp_parity"))
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    args = p.parse_args()
    sets = DEFAULT_SETS if args.set is None else args.set
    rows = []
    for config in args.configs:
        results = {prec: [run_one(config, prec, SEED0 + i, sets, args.out, args.threads) for i in range(args.seeds)]
                   for prec in PRECISIONS}
        rows.append((config, results))
    print(f"\nsettings: --set {' '.join(sets)}; seeds {SEED0}..{SEED0 + args.seeds - 1}; "
          f"threads {args.threads}; amp of the bf16 runs: {rows[0][1]['bf16'][0].get('amp_reason')}")
    print("\n| config | precision | val MSE | test MSE | samples/s | epochs | verdict (val) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for config, results in rows:
        vals = {prec: [m["val_mse"] for m in ms] for prec, ms in results.items()}
        word, diff, bound = verdict(vals["fp32"], vals["bf16"])
        for prec, ms in results.items():
            v, t = mean_std(vals[prec]), mean_std([m["test_mse"] for m in ms])
            speed = statistics.fmean(m.get("samples_per_s") or math.nan for m in ms)
            ran = "bf16" if prec == "bf16" and all(m.get("amp") == "bf16" for m in ms) else "fp32"
            cell = (f"{word}: bf16 - fp32 = {diff:+.4f}, 2 SE = {bound:.4f}" if prec == "bf16" else "")
            print(f"| {config} | {prec} (ran {ran}) | {v[0]:.4f} ± {v[1]:.4f} | {t[0]:.4f} ± {t[1]:.4f} | "
                  f"{speed:.0f} | {statistics.fmean(m['epochs_run'] for m in ms):.1f} | {cell} |")
        fp32_speed = statistics.fmean(m.get("samples_per_s") or math.nan for m in results["fp32"])
        bf16_speed = statistics.fmean(m.get("samples_per_s") or math.nan for m in results["bf16"])
        print(f"| {config} | bf16 / fp32 speed | | | {bf16_speed / fp32_speed:.2f}x | | |")


if __name__ == "__main__":
    main()
