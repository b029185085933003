"""The token loop (nas_agent_graph.llm.decoding) on the embedded model: it must decode what
`model.generate` decodes, reuse a prompt prefix without changing a token, and skip the forward
passes of the text a grammar forces."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas_agent.config import load_config
from nas_agent_graph.llm import backend, decoding
from nas_agent_graph.llm.proposal_schema import params_from_json, proposal_json_schema
from nas_agent_graph.search_space import load_space
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    model, tokenizer, _ = backend.load_model(None)
    return model, tokenizer


def _ids(tokenizer, messages) -> list[int]:
    prompt = backend.render_prompt(tokenizer, messages)
    return tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def _long_messages(tail: str) -> list[dict]:
    # Past Gemma 3's 512-token sliding window, so the reused snapshot holds sliding layers that
    # have already dropped their oldest keys.
    space = load_space(None)
    return [{"role": "system", "content": "You tune forecasters. " + space.describe() * 2},
            {"role": "user", "content": tail}]


def test_greedy_decoding_matches_model_generate(embedded):
    model, tokenizer = embedded
    messages = [{"role": "user", "content": "List three uses of a moving average."}]
    ids = _ids(tokenizer, messages)
    with torch.inference_mode():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, temperature=None,
                                   top_p=None, top_k=None)[0, len(ids):].tolist()
    decoding.PREFIXES.clear()
    result = backend.generate_json(model, tokenizer, messages, None, temperature=0, max_new_tokens=24,
                                   constrain=False)
    expected = tokenizer.decode([t for t in reference if t not in backend.stop_ids(model, tokenizer)],
                                skip_special_tokens=True)
    assert result.text == expected


@pytest.mark.slow  # ~50 s of generation here
def test_a_reused_prefix_changes_no_token(embedded):
    model, tokenizer = embedded
    decoding.PREFIXES.clear()
    first = backend.generate_json(model, tokenizer, _long_messages("Run 1 scored 0.70."), None, temperature=0,
                                  max_new_tokens=1, constrain=False)
    second = backend.generate_json(model, tokenizer, _long_messages("Run 2 scored 0.65."), None, temperature=0,
                                   max_new_tokens=1, constrain=False)
    assert first.meta["reused_tokens"] == 0 and second.meta["reused_tokens"] == 0  # the snapshot is made here
    third_messages = _long_messages("Runs 1 and 2 scored 0.70 and 0.65. Propose run 3 in one sentence.")
    reused = backend.generate_json(model, tokenizer, third_messages, None, temperature=0, max_new_tokens=20,
                                   constrain=False)
    assert reused.meta["reused_tokens"] > 512, reused.meta
    assert reused.meta["prefilled_tokens"] == reused.prompt_tokens - reused.meta["reused_tokens"]
    decoding.PREFIXES.clear()
    fresh = backend.generate_json(model, tokenizer, third_messages, None, temperature=0, max_new_tokens=20,
                                  constrain=False)
    assert fresh.meta["reused_tokens"] == 0
    assert reused.text == fresh.text


@pytest.mark.slow  # ~42 s of generation here
def test_an_adapter_tag_keeps_its_own_prefixes(embedded):
    model, tokenizer = embedded
    decoding.PREFIXES.clear()
    for tail in ("a", "b"):
        backend.generate_json(model, tokenizer, _long_messages(tail), None, temperature=0, max_new_tokens=1,
                              constrain=False, cache_tag="adapter-1")
    other = backend.generate_json(model, tokenizer, _long_messages("c"), None, temperature=0, max_new_tokens=1,
                                  constrain=False, cache_tag="adapter-2")
    same = backend.generate_json(model, tokenizer, _long_messages("c"), None, temperature=0, max_new_tokens=1,
                                 constrain=False, cache_tag="adapter-1")
    assert other.meta["reused_tokens"] == 0 and same.meta["reused_tokens"] > 0


@pytest.mark.slow  # ~38 s of generation here
def test_forced_text_costs_no_forward_pass_and_replies_stay_valid(embedded):
    model, tokenizer = embedded
    space = load_space(None)
    base = load_config(ROOT / "config.py").model_dump()
    messages = [{"role": "user", "content": "Propose a forecaster config as JSON.\n" + space.describe()}]
    for seed in (0, 1, 2):
        result = backend.generate_json(model, tokenizer, messages, proposal_json_schema(space), temperature=0.8,
                                       max_new_tokens=400, seed=seed)
        assert result.constrained
        space.to_config(params_from_json(result.parsed, space), base)  # raises if invalid
        # most of a reply is key names and punctuation: far fewer passes than tokens
        assert result.meta["forced_tokens"] > result.completion_tokens / 2, result.meta
        assert result.meta["decode_passes"] < result.completion_tokens - result.meta["forced_tokens"] + 1


@pytest.mark.slow  # ~27 s of generation here
def test_the_same_seed_gives_the_same_reply_and_leaves_the_global_rng_alone(embedded):
    model, tokenizer = embedded
    space = load_space(None)
    messages = [{"role": "user", "content": "Propose a config.\n" + space.describe()}]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = backend.generate_json(model, tokenizer, messages, proposal_json_schema(space), seed=5, max_new_tokens=400)
    assert torch.rand(1) == before
    b = backend.generate_json(model, tokenizer, messages, proposal_json_schema(space), seed=5, max_new_tokens=400)
    assert a.text == b.text


def test_max_new_tokens_bounds_forced_text_too(embedded):
    model, tokenizer = embedded
    space = load_space(None)
    messages = [{"role": "user", "content": "Propose a config.\n" + space.describe()}]
    for limit in (1, 5, 17):
        result = backend.generate_json(model, tokenizer, messages, proposal_json_schema(space), seed=0,
                                       max_new_tokens=limit)
        assert result.completion_tokens == limit and result.parsed is None


def test_sample_token_follows_temperature_top_k_and_top_p():
    logits = torch.tensor([0.0, 3.0, 1.0, float("-inf"), 2.9])
    assert decoding.sample_token(logits, 0, None, 1.0, None) == 1  # greedy
    assert decoding.sample_token(logits, 1.0, 1, 1.0, None) == 1  # top-k 1 is greedy
    assert decoding.sample_token(logits, 1.0, None, 1e-6, None) == 1  # a tiny top-p keeps the head
    g = torch.Generator().manual_seed(0)
    draws = {decoding.sample_token(logits, 1.0, 2, 1.0, g) for _ in range(200)}
    assert draws == {1, 4}  # top-k 2: only the two likeliest, never the masked token
    g = torch.Generator().manual_seed(0)
    draws = {decoding.sample_token(logits, 1.0, None, 1.0, g) for _ in range(400)}
    assert 3 not in draws and draws >= {1, 4}


def test_chunk_ends_depend_only_on_the_tokens_before_them():
    newline = 0
    line_ends = (lambda t: t == newline)
    ids = ([1] * 300 + [newline]) * 3 + [2] * 50
    ends = decoding.chunk_ends(ids, line_ends)
    assert ends == [301, 602, 903]  # the first line end at least CHUNK_TOKENS after the last end
    assert decoding.chunk_ends(ids[:700] + [3] * 400, line_ends) == ends[:2]  # a shared prefix shares its ends
    assert decoding.chunk_ends([1] * 1000, line_ends) == []  # no line end: one chunk
