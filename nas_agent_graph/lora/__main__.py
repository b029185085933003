"""Standalone LoRA tools, on a samples file (e.g. an old study's runs/lora/samples.jsonl).

    python -m nas_agent_graph.lora list  [--runs-dir runs] [--state agent_state.json]
    python -m nas_agent_graph.lora train --samples runs/lora/samples.jsonl --out my_adapter
                                         [--llm MODEL] [--lora KEY=VALUE ...]
    python -m nas_agent_graph.lora eval  --samples runs/lora/samples.jsonl [--adapter DIR ...]
                                         [--llm MODEL] [--space space.json] [--held-out N]

`train` fits one adapter on every positive sample (no gate, nothing in agent_state.json changes).
`eval` scores the base model and each adapter on the N most recent prompts of the samples file
(unconstrained greedy replies: validity, and closeness to the 3 best configs in the file).
Exit codes: 0 done, 1 training failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nas_agent.agent_state import AgentStateError, load_agent_state
from nas_agent_graph.lora.adapters import (
    LoraSettings,
    evaluate,
    is_positive,
    read_samples,
    registry,
    split,
    train_adapter,
    trainable,
)
from nas_agent_graph.llm.proposal_schema import params_from_json
from nas_agent_graph.search_space import load_space

log = logging.getLogger(__name__)


def _samples(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist; a study writes it to runs/lora/samples.jsonl")
    return read_samples(path)


def cmd_list(a: argparse.Namespace) -> int:
    samples = read_samples(a.runs_dir / "lora" / "samples.jsonl")
    settings = LoraSettings()
    positives = sum(1 for s in samples if is_positive(s, settings))
    print(f"samples: {len(samples)} ({sum(map(trainable, samples))} from the LLM, {positives} positive at reward "
          f">= {settings.reward_threshold}) in {a.runs_dir / 'lora' / 'samples.jsonl'}")
    reg = registry(load_agent_state(a.state)) if a.state.exists() else {"adapters": [], "active": None}
    print(f"adapter in use: {'v' + str(reg['active']) if reg['active'] else 'none (base model)'}")
    print("| version | status | train samples | steps | s | first loss | final loss | gate validity | "
          "gate closeness | reason |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for ad in reg["adapters"]:
        t, g = ad.get("train") or {}, ad.get("gate") or {}
        cand, used = g.get("candidate") or {}, g.get("in_use") or {}
        print(f"| v{ad['version']} | {ad['status']} | {ad.get('n_train')} | {t.get('steps', '-')} | "
              f"{t.get('seconds', '-')} | {t.get('first_loss', '-')} | {t.get('final_loss', '-')} | "
              f"{cand.get('validity', '-')} vs {used.get('validity', '-')} | "
              f"{cand.get('closeness', '-')} vs {used.get('closeness', '-')} | {ad.get('reason', '')} |")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    settings = LoraSettings.from_items(a.lora)
    positives = [s for s in _samples(a.samples) if is_positive(s, settings)]
    if not positives:
        print(f"error: no positive samples (reward >= {settings.reward_threshold}, with a prompt) in {a.samples}",
              file=sys.stderr)
        return 2
    verdict = train_adapter(positives, a.out, 1, settings, base=a.llm)
    print(json.dumps(verdict, indent=2))
    return 0 if verdict.get("ok") else 1


def _targets(samples: list[dict], space) -> list[dict]:
    """Params of the 3 best-scoring sample responses that lie in the space."""
    ranked = sorted((s for s in samples if isinstance(s.get("val_mse"), (int, float))), key=lambda s: s["val_mse"])
    out = []
    for s in ranked:
        try:
            out.append(params_from_json(s["response"], space))
        except (ValueError, TypeError):
            continue
        if len(out) == 3:
            break
    return out


def cmd_eval(a: argparse.Namespace) -> int:
    from nas_agent_graph.llm.chat_model import LocalChatModel  # lazy: transformers, for eval only

    samples = _samples(a.samples)
    settings = LoraSettings(held_out=a.held_out)
    _, held = split(samples, settings)
    if not held:
        print(f"error: no sample with a prompt in {a.samples}", file=sys.stderr)
        return 2
    space = load_space(a.space)
    targets = _targets(samples, space)
    chat = LocalChatModel(model_spec=a.llm)
    prompts = [s["messages"] for s in held]
    rows = [("base model", evaluate(chat, None, prompts, space, targets, settings.gate_max_new_tokens))]
    for i, adapter in enumerate(a.adapter, 1):
        rows.append((str(adapter), evaluate(chat, (f"eval{i}", str(adapter)), prompts, space, targets,
                                            settings.gate_max_new_tokens)))
    print(f"{len(prompts)} held-out prompts from {a.samples}; closeness to {len(targets)} best configs")
    print("| model | valid | validity | closeness |\n|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['valid']}/{r['n']} | {r['validity']:.2f} | {r['closeness']:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m nas_agent_graph.lora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="samples and adapters of a study")
    ls.add_argument("--runs-dir", type=Path, default=Path("runs"))
    ls.add_argument("--state", type=Path, default=Path("agent_state.json"))
    tr = sub.add_parser("train", help="train one adapter on a samples file")
    tr.add_argument("--samples", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--llm", default=None)
    tr.add_argument("--lora", action="append", default=[], metavar="KEY=VALUE")
    ev = sub.add_parser("eval", help="compare the base model and adapters on held-out prompts")
    ev.add_argument("--samples", type=Path, required=True)
    ev.add_argument("--adapter", type=Path, action="append", default=[])
    ev.add_argument("--llm", default=None)
    ev.add_argument("--space", type=Path, default=None)
    ev.add_argument("--held-out", type=int, default=4)
    a = p.parse_args(argv)
    try:
        return {"list": cmd_list, "train": cmd_train, "eval": cmd_eval}[a.cmd](a)
    except (AgentStateError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
