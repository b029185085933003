"""LoRA on this machine: training cost of an adapter, and what it changes in the LLM's replies.

    NAS_DATA_DIR=../shared/data python bench/lora_speed.py --study /tmp/nas_search_compare/hybrid_seed0 \\
        --steps 30 --held-out 6

Takes the LLM samples of a finished study (runs/lora/samples.jsonl; the prompt is rebuilt from
the sample's messages, or from its prompt text), holds out the `--held-out` latest, trains one
adapter on the rest (the samples with the best rewards first, at most --max-train) in the same
subprocess the agent uses, and prints:

  1. cost: seconds per step, seconds per adapter, adapter size, first and final loss;
  2. replies to the held-out prompts WITHOUT constrained decoding (greedy), base model against
     the adapter: validity (parses, inside the space), closeness to the study's 3 best configs
     (the gate's two measures);
  3. with --reward-budget: the mean reward of those replies. Each valid reply's config is trained
     (train.py, the given budget) and rewarded against the incumbent of the held-out run's time
     (nas_agent_graph/study/reward.py); an invalid reply gets the reward of a failed run (-1).

The adapter and the replies (eval.json) are left in /tmp/nas_lora_bench/ for inspection.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def messages_from_text(text: str) -> list[dict]:
    """The inverse of prompting.messages_text ("### role\\ncontent" blocks)."""
    out = []
    for block in ("\n" + text).split("\n### ")[1:]:
        role, _, content = block.partition("\n")
        out.append({"role": role.strip(), "content": content.strip()})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--study", type=Path, required=True, help="a study folder (agent_state.json, runs/)")
    p.add_argument("--space", type=Path, default=ROOT / "bench" / "cpu_space.json")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--held-out", type=int, default=6)
    p.add_argument("--max-train", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the agent's, 1 on the CPU)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per training sample (default: the agent's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reward-budget", nargs="*", default=None, metavar="KEY=VALUE",
                   help="train each reply's config with these --set overrides and report the mean reward, "
                        "e.g. training.max_epochs=1 training.max_steps_per_epoch=30 training.patience=1")
    a = p.parse_args()

    import torch

    # Lazy, as every project import here: --help answers without loading torch or transformers.
    from nas_agent.agent_state import load_agent_state
    from nas_agent_graph.llm.chat_model import LocalChatModel
    from nas_agent_graph.lora.adapters import LoraSettings, best_params, evaluate, read_samples, train_adapter
    from nas_agent_graph.search_space import load_space

    torch.set_num_threads(a.threads)
    space = load_space(a.space)
    state = load_agent_state(a.study / "agent_state.json")
    samples = []
    for s in read_samples(a.study / "runs" / "lora" / "samples.jsonl"):
        messages = s.get("messages") or (messages_from_text(s["prompt"]) if s.get("prompt") else None)
        if messages and isinstance(s.get("reward"), (int, float)):
            samples.append({**s, "messages": messages})
    if len(samples) <= a.held_out:
        sys.exit(f"only {len(samples)} LLM samples in {a.study}; need more than --held-out {a.held_out}")
    held, rest = samples[-a.held_out:], samples[:-a.held_out]
    train = sorted(rest, key=lambda s: -s["reward"])[:a.max_train]
    settings = LoraSettings(steps=a.steps, batch_size=a.batch_size, max_len=a.max_len)
    out = Path("/tmp/nas_lora_bench/adapter")
    t0 = time.perf_counter()
    verdict = train_adapter(train, out, 1, settings)
    wall = time.perf_counter() - t0
    if not verdict.get("ok"):
        sys.exit(f"training failed: {verdict}")
    meta = json.loads((out / "meta.json").read_text())
    print(f"study {a.study}: {len(samples)} LLM samples; trained on {len(train)} (rewards "
          f"{min(s['reward'] for s in train):.2f}..{max(s['reward'] for s in train):.2f}), held out {len(held)}")
    print(f"settings: {json.dumps(meta['settings'])}")
    print("\n| measure | value |\n|---|---:|")
    print(f"| steps | {meta['steps']} |")
    print(f"| training seconds (in the subprocess) | {meta['seconds']:.0f} |")
    print(f"| seconds per step (incl. load) | {meta['seconds'] / meta['steps']:.1f} |")
    print(f"| adapter wall time (subprocess start to verdict) | {wall:.0f} s |")
    print(f"| adapter size | {meta['adapter_bytes'] / 1e6:.1f} MB |")
    if meta.get("peak_rss_bytes"):
        print(f"| peak resident memory of the training process | {meta['peak_rss_bytes'] / 1e9:.1f} GB |")
    print(f"| loss first -> final | {meta['first_loss']:.3f} -> {meta['final_loss']:.3f} |")

    chat = LocalChatModel(temperature=0.0, max_new_tokens=320)
    targets = best_params(state, space)
    prompts = [s["messages"] for s in held]
    rows = []
    for name, adapter in (("base model", None), ("adapter", ("bench", str(out)))):
        t0 = time.perf_counter()
        r = evaluate(chat, adapter, prompts, space, targets, 320)
        rows.append((name, r, (time.perf_counter() - t0) / len(prompts)))
    (out.parent / "eval.json").write_text(json.dumps({name: r for name, r, _ in rows}, indent=1))
    print(f"\nheld-out prompts: {len(prompts)}; closeness to the study's {len(targets)} best configs")
    print("| model | JSON objects | valid (unconstrained) | closeness | s per reply | vs base validity |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, r, sec in rows:
        print(f"| {name} | {r['json_objects']}/{r['n']} | {r['valid']}/{r['n']} | {r['closeness']:.3f} | {sec:.1f} | "
              f"{r['validity'] - rows[0][1]['validity']:+.2f} |")
    if a.reward_budget is not None:
        print(f"\nmean reward of the held-out replies (trained with {' '.join(a.reward_budget) or 'the full budget'})")
        print("| model | rewards | mean reward |\n|---|---|---:|")
        for name, r, _ in rows:
            rewards = [reply_reward(params, s, state, space, a.reward_budget, f"{name.replace(' ', '_')}_{i}")
                       for i, (params, s) in enumerate(zip(r["params"], held))]
            print(f"| {name} | {', '.join(f'{x:+.2f}' for x in rewards)} | {sum(rewards) / len(rewards):+.3f} |")


def reply_reward(params, sample, state, space, budget, tag) -> float:
    """Train a reply's config like the agent would and reward it against the incumbent of the
    held-out run's time; an invalid reply (params None) is a failure."""
    import subprocess

    # Lazy (see main).
    from nas_agent.agent_state import get_run
    from nas_agent.config import apply_overrides, parse_config_source, render_config
    from nas_agent_graph.study.reward import FAILURE, compute_reward

    if params is None:
        return FAILURE
    base = state.meta.get("base_config") or parse_config_source((ROOT / "config.py").read_text())
    config = apply_overrides(space.to_config(params, base), list(budget))
    runs = Path("/tmp/nas_lora_bench/runs")
    runs.mkdir(parents=True, exist_ok=True)
    cfg = runs / f"{tag}.py"
    cfg.write_text(render_config(config))
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--tag", tag, "--runs-dir",
                    str(runs), "--overwrite"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((runs / tag / "metrics.json").read_text())
    run = get_run(state, sample["run_id"])
    before = get_run(state, run.extra.get("incumbent_before")) if run and run.extra.get("incumbent_before") else None
    return compute_reward(metrics["status"], metrics.get("val_mse"), before.val_mse if before else None)


if __name__ == "__main__":
    main()
