"""Training speed on this machine: samples/s and seconds per epoch for two Informer sizes.

    NAS_DATA_DIR=../shared/data python bench/train_speed.py [--steps 20] [--device cpu]

Times real training steps (forward, backward, optimizer step) on real ETTh1 batches,
after warm-up, and full-split evaluation. Both configs are measured in the same run, so
the ratio column is meaningful even on a noisy shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import build_model  # noqa: E402
from nas_agent.config import load_config  # noqa: E402
from nas_agent.data import load_dataset  # noqa: E402
import train  # noqa: E402

CONFIGS = {
    "default config.py (d256, e3, 96->96)": [],
    "Informer paper (d512, e2, 96->24)": [
        "model.d_model=512", "model.n_heads=8", "model.e_layers=2", "model.d_layers=1", "model.d_ff=2048",
        "model.factor=5", "model.dropout=0.05", "data.seq_len=96", "data.label_len=48", "data.pred_len=24",
        "training.batch_size=32",
    ],
}


def measure(overrides: list[str], steps: int, device: torch.device) -> dict:
    cfg = load_config(ROOT / "config.py", overrides)
    ds = load_dataset(cfg.data, cfg.model.embed, device)
    cfg.model.enc_in = cfg.model.dec_in = ds.enc_in
    cfg.model.c_out = ds.c_out
    torch.manual_seed(0)
    model = build_model(cfg.model_dump()).to(device)
    optimizer, _, criterion = train.make_optim(model, cfg.training)
    bs = cfg.training.batch_size
    gen = torch.Generator().manual_seed(0)
    batches = ds.train.batches(bs, shuffle=True, generator=gen, drop_last=True)
    model.train()
    times = []
    for i in range(steps + 3):
        x_enc, m_enc, x_dec, m_dec, y = next(batches)
        t = time.perf_counter()
        loss = criterion(model(x_enc, m_enc, x_dec, m_dec), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    t = time.perf_counter()
    train.evaluate(model, ds.val, device, amp=False)
    eval_s = time.perf_counter() - t
    steps_per_epoch = len(ds.train) // bs
    return {"params": sum(p.numel() for p in model.parameters()), "samples_s": bs / step_s,
            "train_epoch_s": step_s * steps_per_epoch, "eval_s": eval_s,
            "epoch_s": step_s * steps_per_epoch + eval_s, "steps_per_epoch": steps_per_epoch}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="timed training steps per config")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"median of {args.steps} steps after 3 warm-up")
    rows = {name: measure(ov, args.steps, device) for name, ov in CONFIGS.items()}
    base = next(iter(rows.values()))
    print("\n| config | params | samples/s | train s/epoch | val eval s | s/epoch | epoch time vs default |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['samples_s']:.0f} | {r['train_epoch_s']:.1f} | {r['eval_s']:.1f} | "
              f"{r['epoch_s']:.1f} | {r['epoch_s'] / base['epoch_s']:.2f}x |")


if __name__ == "__main__":
    main()
