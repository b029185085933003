"""The LLM proposer's cost and validity on this machine, with the embedded model (or --llm).

    NAS_DATA_DIR=../shared/data python bench/llm_speed.py --samples 20 --threads 1

Prints three tables:
  1. load: converting the GGUF (first use only) and loading the converted cache;
  2. generation: tokens/s of prefill and decode, and the latency of one full proposal
     (the real propose_config prompt of a 30-run study, constrained JSON, one call);
  3. validity: of `--samples` replies at temperature 0.8 to the same prompt, how many make a
     config inside the search space, with constrained decoding (xgrammar) and without it
     (free text, first balanced {...} extracted), and the time per reply of each; the
     unconstrained row is the baseline the ratios refer to.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study_prompt(n_runs: int):
    """The real hybrid-free prompt for a synthetic study of n_runs runs of the default space."""
    sys.path.insert(0, str(ROOT / "tests"))
    from nas_agent.config import load_config
    from nas_agent_graph.prompting import PromptLimits
    from nas_agent_graph.search_space import load_space
    from tests.nas_agent_graph.test_prompting import synthetic_study

    space = load_space(None)
    base = load_config(ROOT / "config.py").model_dump()
    return space, base, synthetic_study(n_runs), PromptLimits()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llm", default=None, help="model spec (default: the embedded model)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core for training)")
    p.add_argument("--runs-in-prompt", type=int, default=30)
    a = p.parse_args()

    import torch

    from nas_agent_graph.llm import backend
    from nas_agent_graph.llm.chat_model import LocalChatModel
    from nas_agent_graph.llm.proposal_schema import params_from_json, proposal_json_schema
    from nas_agent_graph.llm.proposer import LLMProposer
    from nas_agent_graph.prompting import config_messages

    torch.set_num_threads(a.threads)
    spec = backend.resolve_llm(a.llm)
    t0 = time.perf_counter()
    model, tokenizer, info = backend.load_model(spec)
    load_s = time.perf_counter() - t0
    print(f"model: {info['model']} ({info['n_params'] / 1e6:.0f}M parameters, {info['dtype']}, {info['quant']}, "
          f"{info['device']}); torch threads {a.threads}; cpu cores {os.cpu_count()}")
    print("\n| step | seconds |\n|---|---:|")
    print(f"| GGUF -> HF conversion (first use only{'' if info['converted'] else '; cached now'}) | "
          f"{info['convert_s']:.1f} |")
    print(f"| load (cached) | {load_s - info['convert_s']:.1f} |")

    space, base, state, limits = study_prompt(a.runs_in_prompt)
    schema = proposal_json_schema(space)
    chat = LocalChatModel(model_spec=a.llm, temperature=0.7, max_new_tokens=384)
    messages, prompt_info = config_messages(state, space, base, limits=limits, count_tokens=chat.count_tokens)

    # Prefill alone: one generated token.
    t0 = time.perf_counter()
    r = backend.generate_json(model, tokenizer, messages, None, temperature=0, max_new_tokens=1, constrain=False)
    prefill_s = time.perf_counter() - t0
    proposer = LLMProposer(chat, space, seed=0, limits=limits)
    t0 = time.perf_counter()
    proposal = proposer.propose(state, base, 0, None)
    propose_s = time.perf_counter() - t0
    llm = proposal.meta["llm"]
    decode_s = max(llm["latency_s"] - prefill_s, 1e-9)
    print("\n| measure | value |\n|---|---:|")
    print(f"| prompt tokens ({a.runs_in_prompt}-run study) | {r.prompt_tokens} |")
    print(f"| prefill tokens/s | {r.prompt_tokens / prefill_s:.0f} |")
    print(f"| proposal: completion tokens | {llm['completion_tokens']} |")
    print(f"| decode tokens/s (constrained) | {llm['completion_tokens'] / decode_s:.1f} |")
    print(f"| ms per generated token | {1000 * decode_s / llm['completion_tokens']:.0f} |")
    print(f"| one proposal, end to end (prompt, generate, validate) | {propose_s:.1f} s |")

    rows = []
    for constrained in (False, True):
        t0 = time.perf_counter()
        results = backend.generate_json_batch(model, tokenizer, messages, schema, n=a.samples, temperature=0.8,
                                              max_new_tokens=384, seed=0, constrain=constrained)
        seconds = time.perf_counter() - t0
        ok = 0
        for res in results:
            try:
                if res.parsed is not None:
                    space.to_config(params_from_json(res.parsed, space), base)
                    ok += 1
            except ValueError:
                pass
        tokens = sum(res.completion_tokens for res in results)
        rows.append((constrained, ok, seconds, tokens))
    base_row = rows[0]
    print(f"\n| decoding | valid / {a.samples} | s per reply | tokens per reply | time vs unconstrained |")
    print("|---|---:|---:|---:|---:|")
    for constrained, ok, seconds, tokens in rows:
        print(f"| {'constrained (xgrammar)' if constrained else 'unconstrained + extraction'} | {ok} | "
              f"{seconds / a.samples:.1f} | {tokens / a.samples:.0f} | {seconds / base_row[2]:.2f}x |")


if __name__ == "__main__":
    main()
