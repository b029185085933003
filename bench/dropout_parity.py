"""model.py's CPU dropout masks against torch's own: same configs, same seeds, only the mask differs.

    NAS_DATA_DIR=../shared/data python bench/dropout_parity.py [--configs configs/patchtst42.py ...]
        [--seeds 3] [--set training.max_epochs=3 ...] [--out /tmp/nas_dropout_parity] [--threads 2]

model.apply_dropout draws a CPU dropout mask from 15-bit integers instead of torch's bernoulli_
(cheaper; the rate used is p to within 2^-16). The tests check the mask's rate, scale, gradient
and independence; this checks what matters to a user, that models train as well. Each config is
trained once per seed with model.py ("own") and once with a copy of model.py whose apply_dropout
is torch's F.dropout and whose MLPs are model.plain_mlp, not the fused model.mlp_forward ("torch",
written into --out and passed as train.py --model), one train.py
subprocess at a time. It prints val and test MSE as mean +- std over the seeds, samples/s, and
amp_parity's verdict on val MSE ("parity" when the means differ by less than twice the standard
error of the difference). Test MSE is shown, never used for the verdict.

Runs whose metrics.json says ok or timeout are reused, so a killed benchmark resumes; a run's tag
holds its model file's hash, so an edit of model.py trains anew. A
benchmark: it prints a table, asserts nothing.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import train
from amp_parity import SEED0, mean_std, train_once, verdict  # bench/ is this script's folder
from train_speed import BASELINE

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/patchtst42.py", "configs/itransformer.py"]
DEFAULT_SETS = ["training.max_epochs=3"]
VARIANTS = ("own", "torch")


def torch_dropout_model(out: Path) -> Path:
    """A copy of model.py in which every dropout is torch's F.dropout and every MLP the plain
    sequence: Dropout.forward, the attention and the MLP modules look up the module's
    apply_dropout and mlp_forward when they run, so rebinding them at the end suffices."""
    path = out / "model_torch_dropout.py"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text((ROOT / "model.py").read_text() + "\n\n# dropout_parity's baseline\n"
                    + "".join(f"{name} = {expr}\n" for name, expr in BASELINE.items()))
    return path


def run_one(config: str, variant: str, seed: int, sets: list[str], out: Path, threads: int) -> dict:
    model = ROOT / "model.py" if variant == "own" else torch_dropout_model(out)
    # The model file's hash in the tag: a run of an earlier model.py is not reused.
    tag = f"{Path(config).stem}_{variant}_{train.model_file_hash(str(model))[:10]}_s{seed}"
    return train_once(tag, config, seed, ["--model", str(model), "--device", "cpu"], sets, out, threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files, relative to the repository")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"passed to every run (default: {' '.join(DEFAULT_SETS)})")
    p.add_argument("--out", type=Path, default=Path("/tmp/nas_dropout_parity"))
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    args = p.parse_args()
    sets = DEFAULT_SETS if args.set is None else args.set
    rows = []
    for config in args.configs:
        results = {v: [run_one(config, v, SEED0 + i, sets, args.out, args.threads) for i in range(args.seeds)]
                   for v in VARIANTS}
        rows.append((config, results))
    print(f"\nsettings: --set {' '.join(sets)}; seeds {SEED0}..{SEED0 + args.seeds - 1}; threads {args.threads}; "
          f"precision of the runs: {rows[0][1]['own'][0].get('amp')}")
    print("\n| config | dropout masks | val MSE | test MSE | samples/s | epochs | verdict (val) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for config, results in rows:
        vals = {v: [m["val_mse"] for m in ms] for v, ms in results.items()}
        word, diff, bound = verdict(vals["torch"], vals["own"])
        speed = {v: statistics.fmean(m.get("samples_per_s") or math.nan for m in ms) for v, ms in results.items()}
        for v, ms in results.items():
            val, test = mean_std(vals[v]), mean_std([m["test_mse"] for m in ms])
            cell = f"{word}: own - torch = {diff:+.4f}, 2 SE = {bound:.4f}" if v == "own" else ""
            print(f"| {config} | {v} | {val[0]:.4f} ± {val[1]:.4f} | {test[0]:.4f} ± {test[1]:.4f} | "
                  f"{speed[v]:.0f} | {statistics.fmean(m['epochs_run'] for m in ms):.1f} | {cell} |")
        print(f"| {config} | own / torch speed | | | {speed['own'] / speed['torch']:.2f}x | | |")


if __name__ == "__main__":
    main()
