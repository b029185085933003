"""LoRA fine-tuning of the proposer's LLM, run as a subprocess so its memory is returned after.

    python -m nas_agent_graph.lora.finetune JOB.json

JOB.json (written by nas_agent_graph.lora.train_adapter):

    {"base": <model spec or null>, "quant": <"4bit"|"8bit"|"none"|null>, "device": <null|"cpu"|"cuda">,
     "out": <adapter folder>, "version": <int>, "samples": [{"key", "messages", "response"}, ...],
     "steps", "lr", "batch_size", "max_len", "seed", "r", "alpha", "dropout", "target_modules"}

Supervised fine-tuning on prompt -> response: each sample is the chat rendering of its
messages (exactly as at inference, nas_agent_graph.llm.backend.render_prompt) followed by the
response and the end-of-sequence token. The loss is on the response tokens only, and only the
response positions are sent through the output layer (`logits_to_keep`), because with a
262k-token vocabulary the full logits dominate memory. A prompt too long for max_len loses its
middle: its head (instructions, search space) and its tail (candidates, the request) stay,
because those decide the reply's format; the runs listed in between are what is dropped.

On CUDA with a 4-bit base this is QLoRA (peft's k-bit preparation); on the CPU it is plain LoRA
over the bf16/fp32 base. The adapter folder is written into a temporary sibling and renamed into
place, so a killed job leaves no half adapter:

    adapter_model.safetensors, adapter_config.json   the peft adapter
    meta.json        base model, sample keys, steps, seconds, losses, final loss, settings,
                     peak resident memory of the training process
    loss_curve.png   training loss per step

The last line on stdout is a JSON summary ({"ok": true, ...} or {"ok": false, "error": ...}).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any
from nas_agent_graph.llm import backend
from nas_agent_graph.llm.backend import render_prompt

log = logging.getLogger(__name__)

# Gemma, Llama and DeepSeek-Coder all name their attention and MLP projections this way.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = {"steps": 40, "lr": 5e-4, "batch_size": None, "max_len": None, "seed": 0, "r": 8, "alpha": 16,
            "dropout": 0.05, "target_modules": DEFAULT_TARGETS}
# What a job leaves None is set per device. max_len: on the CPU a step costs about linearly in
# tokens; the agent's prompts are ~3000 tokens and a reply ~200, and 1664 keeps half of the rest
# from the prompt's head (system, task, search space: ~720 tokens) and half from its tail (the
# request, sampler candidates). An adapter trained on the last 180 prompt tokens only (384 in all)
# replied in the right format but dropped keys that the full prompt's run listings omit. On a GPU
# the whole prompt fits. batch_size: at 1664 tokens on the CPU a batch of 2 peaked at 14.0 GB
# resident and 26 s per step, a batch of 1 at 8.2 GB and 13 s: 2 is too close to a 24 GB
# machine's limit with runs beside it.
DEVICE_DEFAULTS = {"cpu": {"max_len": 1664, "batch_size": 1}, "cuda": {"max_len": 4096, "batch_size": 2}}
CUT_MARK = "\n[...]\n"  # stands where a prompt's middle was dropped


def with_device_defaults(settings: dict, device: str) -> dict:
    """`settings` with every None that DEVICE_DEFAULTS covers set for `device` ("cpu" or a CUDA device)."""
    defaults = DEVICE_DEFAULTS["cpu" if device == "cpu" else "cuda"]
    return {**settings, **{k: v for k, v in defaults.items() if settings.get(k) is None}}


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def encode(tokenizer: Any, messages: list[dict], response: str, max_len: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS, number of response tokens). A prompt too long for
    max_len keeps its first and last tokens, half the room each, with CUT_MARK between (the
    response is never cut)."""
    prompt = render_prompt(tokenizer, messages)
    add_special = not getattr(tokenizer, "chat_template", None)
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max(max_len - len(response_ids), 8)
    if len(prompt_ids) > room:
        mark = tokenizer(CUT_MARK, add_special_tokens=False)["input_ids"]
        keep = max(room - len(mark), 2)
        prompt_ids = prompt_ids[:keep // 2] + mark + prompt_ids[len(prompt_ids) - (keep - keep // 2):]
    return prompt_ids + response_ids, len(response_ids)


def response_loss(model: Any, batch: list[tuple[list[int], int]], pad_id: int) -> Any:
    """Mean cross-entropy over the response tokens of a left-padded batch."""
    import torch
    import torch.nn.functional as F

    device = next(p for p in model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    keep = max(n for _, n in batch) + 1  # the logits that predict every response token
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    target_mask = torch.zeros((len(batch), keep - 1), dtype=torch.bool)
    for row, (seq, n_resp) in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
        target_mask[row, keep - 1 - n_resp:] = True
    ids, mask, target_mask = ids.to(device), mask.to(device), target_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [B, keep, V]
    pred = logits[:, :-1].float()
    targets = ids[:, width - keep + 1:]
    return F.cross_entropy(pred[target_mask], targets[target_mask])


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss on response tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path)


def run(job: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model


    settings = {**DEFAULTS, **{k: v for k, v in job.items() if k in DEFAULTS and v is not None}}
    samples = job["samples"]
    if not samples:
        raise ValueError("no samples to train on")
    random.seed(settings["seed"])
    torch.manual_seed(settings["seed"])
    t0 = time.perf_counter()
    device = job.get("device") or backend.default_device()
    quant = job.get("quant") or backend.default_quant(device)
    # fp32 master weights on the CPU: bf16 LoRA updates of a few steps would round away.
    dtype = torch.float32 if device == "cpu" else None
    model, tokenizer, info = backend.load_model(job.get("base"), quant, device, dtype=dtype)
    settings = with_device_defaults(settings, device)
    if quant in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=int(settings["r"]), lora_alpha=int(settings["alpha"]), lora_dropout=float(settings["dropout"]),
                      target_modules=list(settings["target_modules"]), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    encoded = [encode(tokenizer, s["messages"], s["response"], int(settings["max_len"])) for s in samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(settings["lr"]), weight_decay=0.0)
    losses: list[float] = []
    order: list[int] = []
    for step in range(int(settings["steps"])):
        if len(order) < settings["batch_size"]:
            refill = list(range(len(encoded)))
            random.shuffle(refill)
            order += refill
        batch = [encoded[order.pop()] for _ in range(min(int(settings["batch_size"]), len(encoded)))]
        loss = response_loss(model, batch, pad_id)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower lr (now {settings['lr']})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(round(float(loss.item()), 5))
        log.info("step %d/%d loss %.4f", step + 1, settings["steps"], losses[-1])

    out = Path(job["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        meta = {
            "version": job.get("version"), "base_model": info["model"], "base_path": info["path"],
            "quant": quant, "device": device, "sample_keys": [s["key"] for s in samples],
            "n_samples": len(samples), "steps": int(settings["steps"]), "seconds": round(time.perf_counter() - t0, 2),
            "losses": losses, "first_loss": losses[0], "final_loss": losses[-1],
            "response_tokens": sum(n for _, n in encoded), "settings": settings, "peak_rss_bytes": peak_rss_bytes(),
            "adapter_bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        plot_losses(losses, tmp / "loss_curve.png", f"adapter v{job.get('version')}: {len(samples)} samples")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an adapter is a normal output folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"ok": True, "out": str(out), **{k: meta[k] for k in ("steps", "seconds", "first_loss", "final_loss",
                                                                  "n_samples", "adapter_bytes")}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    if len(argv) != 1:
        print(json.dumps({"ok": False, "error": "usage: python -m nas_agent_graph.lora.finetune JOB.json"}))
        return 2
    try:
        with open(argv[0], encoding="utf-8") as f:
            job = json.load(f)
        result = run(job)
    except Exception as e:  # the verdict is data for the parent
        tb = traceback.format_exc().strip().splitlines()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback_tail": "\n".join(tb[-6:])}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
