"""Smoke test of a proposal, run in a subprocess: build the model, one real batch forward, backward and step.

    python -m nas_agent_graph.smoke CONFIG_FILE [--model MODEL_FILE]

CONFIG_FILE is a config (.py, parsed without exec) or a JSON dict. Prints one JSON line:
{"ok": true, "n_params": ..., "seconds": ..., "output_shape": [...]} or {"ok": false, "error": ...},
and exits 0 or 1. The line carries the nonce the parent put in $NAS_SMOKE_NONCE, which is removed
from the environment before the model file runs, so model code cannot print a verdict of its own.
It runs in its own process so a model that crashes, hangs or eats memory costs a rejected
proposal, not the orchestrator.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


def smoke(config_file: Path, model_file: Path | None) -> dict:
    import torch

    # Imported here, inside main's try: an import that fails (a broken install) is a verdict too.
    from nas_agent.config import load_config, validate_config
    import train  # (as above) the checks a run makes: build_model loading, the optimizer and scheduler

    t0 = time.monotonic()
    if config_file.suffix == ".json":
        cfg = validate_config(json.loads(config_file.read_text()), str(config_file))
    else:
        cfg = load_config(config_file)
    ds = train.load_data(cfg, "cpu")
    torch.manual_seed(cfg.training.seed)
    model = train.load_build_model(str(model_file) if model_file else None)(cfg.model_dump())
    n_params = sum(p.numel() for p in model.parameters())
    batch = ds.train.batch(torch.arange(min(cfg.training.batch_size, len(ds.train))))
    x_enc, m_enc, x_dec, m_dec, y = batch
    model.train()
    out = model(x_enc, m_enc, x_dec, m_dec)
    if tuple(out.shape) != tuple(y.shape):
        raise ValueError(f"model output: expected shape {list(y.shape)} [batch, pred_len, c_out], "
                         f"got {list(out.shape)}")
    # The training classes are built and stepped once too: a bad optimizer, loss or scheduler
    # argument (a negative momentum, T_max 0, fused Adam on a CPU) fails here, not after an epoch.
    optimizer, scheduler, criterion = train.make_optim(model, cfg.training)
    loss = criterion(out, y)
    if not torch.isfinite(loss):
        raise ValueError(f"loss on one real batch is {loss.item()}")
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        train.step_scheduler(scheduler, loss.item())
    return {"ok": True, "n_params": n_params, "seconds": round(time.monotonic() - t0, 3),
            "output_shape": list(out.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--model", type=Path, default=None)
    args = p.parse_args(argv)
    nonce = os.environ.pop("NAS_SMOKE_NONCE", None)
    try:
        result = smoke(args.config, args.model)
    except Exception as e:  # any failure is the verdict, reported as data
        tb = traceback.format_exc().strip().splitlines()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback_tail": "\n".join(tb[-6:])}
    result["nonce"] = nonce
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
