"""How much cheaper per window a full evaluation batch is than train.py's quick look.

    NAS_DATA_DIR=../shared/data python bench/eval_probe.py [CONFIG ...] [--write]

train.py first times batches of 8 and 16 validation windows and extrapolates them to a full batch
(train.full_batch_cost); only a model whose estimate stays
under PROBE_MARGIN (4) times the run budget is timed again on a full evaluation batch
(EVAL_BATCH, 256). A model whose quick estimate is over PROBE_MARGIN x the budget fails at once,
so the margin must exceed how far that estimate can be above a full batch's cost per window, for
every model slow enough to be near the budget. This prints, for each config (default:
config.py and every shipped config; add the slowest configs a study proposed, e.g. its
runs/run_XXXX/config_used.py), seconds per window on 16 windows, the quick look's estimate
(batches of 8 and 16 extrapolated to a full one, train.full_batch_cost) and a full batch (warm:
one untimed batch of each size first; the median of 3 small batches, one full batch), and the
ratio of the estimate to the full batch. A benchmark: it
prints a table and asserts nothing about timing.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from model import build_model  # noqa: E402
from nas_agent.config import load_config  # noqa: E402
from nas_agent.data import load_dataset  # noqa: E402
import train  # noqa: E402

RESULTS_MD = ROOT / "bench" / "results" / "eval_probe.md"


def per_window(model, windows, device, batch: int, repeats: int) -> float:
    train.eval_seconds_per_window(model, windows, device, batch)  # warm-up: kernels, allocations
    return statistics.median(train.eval_seconds_per_window(model, windows, device, batch) for _ in range(repeats))


def measure(path: Path, device: torch.device) -> dict:
    cfg = load_config(path)
    ds = load_dataset(cfg.data, cfg.model.embed, device)
    cfg.model.enc_in = cfg.model.dec_in = ds.enc_in
    cfg.model.c_out = ds.c_out
    torch.manual_seed(0)
    model = build_model(cfg.model_dump()).to(device)
    half = train.PROBE_WINDOWS // 2
    half_s = per_window(model, ds.val, device, half, repeats=3) * half
    small = per_window(model, ds.val, device, train.PROBE_WINDOWS, repeats=3)
    full = per_window(model, ds.val, device, train.EVAL_BATCH, repeats=1)
    # What train.py's quick look decides on: the two small batches extrapolated to a full one.
    quick = train.full_batch_cost(half_s, small * train.PROBE_WINDOWS, half, train.PROBE_WINDOWS)
    return {"params": sum(p.numel() for p in model.parameters()), "window": f"{cfg.data.seq_len}->{cfg.data.pred_len}",
            "small_ms": small * 1e3, "quick_ms": quick * 1e3, "full_ms": full * 1e3, "ratio": quick / full,
            "eval_s": full * (len(ds.val) + len(ds.test))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", type=Path, help="config files (default: config.py and configs/*.py)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--write", action="store_true", help=f"also write the table to {RESULTS_MD.relative_to(ROOT)}")
    args = p.parse_args()
    device = torch.device(args.device)
    paths = [c.resolve() for c in args.configs] or [ROOT / "config.py", *sorted((ROOT / "configs").glob("*.py"))]
    lines = [f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
             f"quick look {train.PROBE_WINDOWS} windows, full batch {train.EVAL_BATCH}, margin {train.PROBE_MARGIN:g}",
             "", f"| config | in->out | params | ms/window, {train.PROBE_WINDOWS} windows | quick look "
             f"(extrapolated) ms/window | ms/window, {train.EVAL_BATCH} windows | quick / full | val+test eval s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        r = measure(path, device)
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        lines.append(f"| {name} | {r['window']} | {r['params']:,} | {r['small_ms']:.2f} | {r['quick_ms']:.2f} | "
                     f"{r['full_ms']:.2f} | {r['ratio']:.2f}x | {r['eval_s']:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.write:
        RESULTS_MD.write_text("# The evaluation probe's quick look against a full batch\n\n"
                              "Command: `NAS_DATA_DIR=../shared/data python bench/eval_probe.py "
                              f"{' '.join(str(c) for c in args.configs)} --write`\n\n{text}\n", encoding="utf-8")
        print(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    main()
