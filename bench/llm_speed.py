"""The LLM proposer's cost and validity on this machine, with the embedded model (or --llm).

    NAS_DATA_DIR=../shared/data python bench/llm_speed.py --proposals 6 --samples 20 --threads 2

Prints four tables:
  1. load: converting the GGUF (first use only) and loading the converted cache;
  2. proposals: --proposals successive proposals of a growing study (the real propose_config
     prompt of a study with --runs-in-prompt runs, then one run more each time), each through
     LLMProposer.propose, with prefill and decode apart, the prompt tokens reused from the prefix
     cache, and the forward passes decoding took; then the median and the max seconds;
  3. the same first prompt through transformers' model.generate with xgrammar's logits processor
     (the path before nas_agent_graph.llm.decoding), the baseline of the ratio;
  4. validity: of `--samples` replies at temperature 0.8 to the same prompt, how many make a
     config inside the search space, with constrained decoding (xgrammar) and without it
     (free text, first balanced {...} extracted), and the time per reply of each.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def study_prompt(n_runs: int):
    """The real hybrid-free prompt for a synthetic study of n_runs runs of the default space."""
    # Lazy, as every project import here: --help answers without loading torch or transformers.
    from nas_agent.config import load_config
    from nas_agent_graph.prompting import PromptLimits
    from nas_agent_graph.search_space import load_space
    from nas_agent_graph.testing import synthetic_study

    space = load_space(None)
    base = load_config(ROOT / "config.py").model_dump()
    return space, base, synthetic_study(n_runs), PromptLimits()


def hf_generate_seconds(model, tokenizer, messages, schema, backend) -> tuple[float, int]:
    """(seconds, completion tokens) of one constrained reply through model.generate: the baseline."""
    import torch
    import xgrammar as xgr
    import xgrammar.contrib.hf  # noqa: F401

    ids = tokenizer(backend.render_prompt(tokenizer, messages), return_tensors="pt",
                    add_special_tokens=not getattr(tokenizer, "chat_template", None))
    processor = xgr.contrib.hf.LogitsProcessor(backend.compile_schema(model, tokenizer, schema))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, logits_processor=[processor], max_new_tokens=384, do_sample=True,
                             temperature=0.7, top_p=0.95, top_k=backend.DEFAULT_TOP_K,
                             eos_token_id=backend.stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - t0, int(out.shape[1] - ids["input_ids"].shape[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llm", default=None, help="model spec (default: the embedded model)")
    p.add_argument("--proposals", type=int, default=6, help="successive proposals timed")
    p.add_argument("--samples", type=int, default=20, help="replies in the validity table (0: skip it)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--runs-in-prompt", type=int, default=30)
    a = p.parse_args()

    import statistics

    import torch

    # Lazy (see study_prompt).
    from nas_agent_graph.llm import backend
    from nas_agent_graph.llm.chat_model import LocalChatModel
    from nas_agent_graph.llm.proposal_schema import params_from_json, proposal_json_schema
    from nas_agent_graph.llm.proposer import LLMProposer
    from nas_agent_graph.prompting import config_messages
    from nas_agent_graph.testing import synthetic_study

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

    space, base, _, limits = study_prompt(a.runs_in_prompt)
    schema = proposal_json_schema(space)
    chat = LocalChatModel(model_spec=a.llm, temperature=0.7, max_new_tokens=384)
    proposer = LLMProposer(chat, space, seed=0, limits=limits)
    print(f"\n{a.proposals} successive proposals of a growing study ({a.runs_in_prompt} runs and up), "
          "each one LLMProposer.propose:\n")
    print("| proposal | prompt tokens | reused | prefill s | completion tokens | forward passes | decode s | "
          "total s | valid |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    totals = []
    for i in range(a.proposals):
        state = synthetic_study(a.runs_in_prompt + i)
        t0 = time.perf_counter()
        proposal = proposer.propose(state, base, 0, None)
        total = time.perf_counter() - t0
        totals.append(total)
        for call in proposal.meta["llm"]["calls"]:
            decode_s = call["latency_s"] - call.get("prefill_s", 0.0)
            print(f"| {i + 1} | {call['prompt_tokens']} | {call.get('reused_tokens', 0)} | "
                  f"{call.get('prefill_s', 0.0):.1f} | {call['completion_tokens']} | {call.get('decode_passes', '-')} | "
                  f"{decode_s:.1f} | {total:.1f} | {call['valid']} |")
    print(f"\nseconds per proposal: median {statistics.median(totals):.1f}, max {max(totals):.1f} "
          f"(first proposal, nothing cached: {totals[0]:.1f})")

    messages, _ = config_messages(synthetic_study(a.runs_in_prompt), space, base, limits=limits,
                                  count_tokens=chat.count_tokens)
    hf_s, hf_tokens = hf_generate_seconds(model, tokenizer, messages, schema, backend)
    print("\n| path, first prompt, nothing cached | seconds | completion tokens | vs model.generate |")
    print("|---|---:|---:|---:|")
    print(f"| model.generate + xgrammar logits processor (baseline) | {hf_s:.1f} | {hf_tokens} | 1.00x |")
    print(f"| nas_agent_graph.llm.decoding, first proposal | {totals[0]:.1f} | - | {hf_s / totals[0]:.2f}x |")
    print(f"| nas_agent_graph.llm.decoding, median proposal | {statistics.median(totals):.1f} | - | "
          f"{hf_s / statistics.median(totals):.2f}x |")

    if a.samples <= 0:
        return
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
