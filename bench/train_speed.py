"""Training speed on this machine: samples/s and seconds per epoch for the default config and
every shipped config in configs/, in fp32 and with bf16 autocast (training.amp), and in fp32
with torch's own dropout in place of model.py's and model.plain_mlp in place of the fused
model.mlp_forward (the baseline of model.py's CPU dropout masks and fused MLPs).

    NAS_DATA_DIR=../shared/data python bench/train_speed.py [--steps 20] [--device cpu]

Times real training steps (forward, backward, optimizer step, as train.py runs them) on real
batches of each config's data, after warm-up, once in fp32 and once in bf16 where train.amp_mode
finds this device able (else the bf16 column says why not). Seconds per
epoch = median step time x training windows // batch size (train.py drops the last partial
batch), plus one measured evaluation of the val split. All configs are measured in the same
run, so the ratio column against the default config.py is meaningful even on a noisy shared
machine. A benchmark: it prints a table and asserts nothing about timing.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# bench/ is a folder of scripts, not a package: `python bench/train_speed.py` puts bench/ on
# the path, not the repository root that model.py, train.py and nas_agent live in.

import model as model_py  # noqa: E402
from model import build_model  # noqa: E402
from nas_agent.config import load_config  # noqa: E402
from nas_agent.data import load_dataset  # noqa: E402
import train  # noqa: E402

WARMUP = 3  # steps left out of the timing: first calls allocate and pick kernels


def config_files() -> list[Path]:
    """The default config first (the baseline of the ratio column), then the shipped ones."""
    return [ROOT / "config.py", *sorted((ROOT / "configs").glob("*.py"))]


def endless_batches(windows, batch_size: int):
    """Shuffled training batches as train.py draws them, starting a new epoch when one runs out."""
    gen = torch.Generator().manual_seed(0)
    while True:
        yield from windows.batches(batch_size, shuffle=True, generator=gen, drop_last=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_step_s(model, ds, cfg, steps: int, device: torch.device, amp: str) -> float:
    optimizer, _, criterion = train.make_optim(model, cfg.training)
    batches = endless_batches(ds.train, cfg.training.batch_size)
    model.train()
    times = []
    for i in range(WARMUP + steps):
        x_enc, m_enc, x_dec, m_dec, y = next(batches)
        sync(device)
        t = time.perf_counter()
        with train.autocast(device, amp):
            loss = criterion(model(x_enc, m_enc, x_dec, m_dec).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# The baseline, as model.py names rebound to model.py expressions: torch's dropout and the plain
# MLP. torch_dropout() rebinds them in this process; dropout_parity writes them into a model file.
BASELINE = {"apply_dropout": "F.dropout", "mlp_forward": "plain_mlp"}


@contextmanager
def torch_dropout():
    """Inside: every dropout of model.py is torch's F.dropout (bernoulli_ masks on a CPU) and
    every MLP is model.plain_mlp, the baseline against which model.py's own CPU masks and its
    fused MLPs (model.mlp_forward) are timed."""
    own = {name: getattr(model_py, name) for name in BASELINE}
    for name, expr in BASELINE.items():
        setattr(model_py, name, attrgetter(expr)(model_py))
    try:
        yield
    finally:
        for name, value in own.items():
            setattr(model_py, name, value)


def measure(path: Path, steps: int, device: torch.device) -> dict:
    cfg = load_config(path)
    ds = load_dataset(cfg.data, cfg.model.embed, device)
    cfg.model.enc_in = cfg.model.dec_in = ds.enc_in
    cfg.model.c_out = ds.c_out
    bf16, why = train.amp_mode(device, True)
    step_s = {}
    for amp in ("off", bf16) if bf16 == "bf16" else ("off",):
        torch.manual_seed(0)  # the same weights for both precisions
        model = build_model(cfg.model_dump()).to(device)
        step_s[amp] = median_step_s(model, ds, cfg, steps, device, amp)
    if device.type == "cpu":  # on CUDA model.py's dropout is torch's
        torch.manual_seed(0)
        with torch_dropout():
            step_s["torch dropout"] = median_step_s(build_model(cfg.model_dump()).to(device), ds, cfg, steps,
                                                    device, "off")
    t = time.perf_counter()
    train.evaluate(model, ds.val, device)  # always fp32, as train.py evaluates
    sync(device)
    eval_s = time.perf_counter() - t
    bs = cfg.training.batch_size
    steps_per_epoch = len(ds.train) // bs
    fast = step_s["bf16" if cfg.training.amp and "bf16" in step_s else "off"]  # as train.py would train it
    return {"window": f"{cfg.data.seq_len}->{cfg.data.pred_len}", "batch": bs,
            "params": sum(p.numel() for p in model.parameters()), "samples_s": bs / step_s["off"],
            "bf16_samples_s": bs / step_s["bf16"] if "bf16" in step_s else None, "bf16_why": why,
            "torch_dropout_samples_s": bs / step_s["torch dropout"] if "torch dropout" in step_s else None,
            "train_epoch_s": fast * steps_per_epoch, "eval_s": eval_s, "epoch_s": fast * steps_per_epoch + eval_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="timed training steps per config")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"median of {args.steps} steps after {WARMUP} warm-up")
    rows = {str(path.relative_to(ROOT)): measure(path, args.steps, device) for path in config_files()}
    base = rows["config.py"]
    print(f"bf16: {base['bf16_why']}")
    print("\n| config | in->out | params | batch | samples/s fp32, torch's dropout, plain MLP | samples/s fp32 | "
          "vs that baseline | samples/s bf16 | bf16 vs fp32 | "
          "train s/epoch | val eval s (fp32) | s/epoch | epoch time vs config.py |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        bf16 = r["bf16_samples_s"]
        bf16_cells = "n/a | n/a" if bf16 is None else f"{bf16:.0f} | {bf16 / r['samples_s']:.2f}x"
        td = r["torch_dropout_samples_s"]
        td_cells = "n/a | " if td is None else f"{td:.0f} | "
        ratio = "n/a" if td is None else f"{r['samples_s'] / td:.2f}x"
        print(f"| {name} | {r['window']} | {r['params']:,} | {r['batch']} | {td_cells}{r['samples_s']:.0f} | "
              f"{ratio} | {bf16_cells} | "
              f"{r['train_epoch_s']:.1f} | {r['eval_s']:.1f} | {r['epoch_s']:.1f} | "
              f"{r['epoch_s'] / base['epoch_s']:.3f}x |")


if __name__ == "__main__":
    main()
