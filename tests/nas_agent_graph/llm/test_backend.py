"""The local LLM backend with the REAL embedded model (Gemma-3-270M) on CPU.

The first run converts the embedded GGUF into the converted
cache ($NAS_LLM_CACHE, default ~/.cache/nas_agent_graph; about a minute, once); later runs
load it in seconds. Sampling settings use one torch thread per process (2-core machines).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from nas_agent.config import load_config, validate_config
from nas_agent_graph.llm import backend
from nas_agent_graph.llm.proposal_schema import params_from_json, proposal_json_schema
from nas_agent_graph.search_space import load_space

ROOT = Path(__file__).resolve().parents[3]
SPACE = load_space(None)
SCHEMA = proposal_json_schema(SPACE)
# Enough for one full proposal of the default space (~206 tokens with the compact layout).
PROPOSAL_TOKENS = 260
MESSAGES = [
    {"role": "system", "content": "You propose hyperparameters for an Informer forecaster on ETTh1 "
                                  "(hourly, 7 channels, 96 steps ahead). Reply with one JSON object."},
    {"role": "user", "content": "Search space:\n" + SPACE.describe() + "\n\nPropose the next config to "
                                "train as a JSON object with a value for every key."},
]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def converted():
    """The embedded model's converted cache, built once (the first run converts, ~1 minute)."""
    spec = backend.resolve_llm(None)
    path, build = backend.ensure_converted(spec)
    print(f"\nconverted cache {path}: {build}")
    return path, build


@pytest.fixture(scope="session")
def embedded(converted):
    model, tokenizer, info = backend.load_model(None)
    print(f"\nloaded: {info}")
    return model, tokenizer, info


@pytest.fixture(scope="session")
def base_config():
    return load_config(ROOT / "config.py").model_dump()


def _validity(results, base_config) -> tuple[int, list[str]]:
    """How many results make a valid config through the whole pipeline, and the first errors."""
    ok, errors = 0, []
    for r in results:
        try:
            obj = r.parsed if r.parsed is not None else json.loads(r.text)
            params = params_from_json(obj, SPACE)
            validate_config(SPACE.to_config(params, base_config), where="llm proposal")
            ok += 1
        except Exception as e:  # noqa: BLE001 - counted, shown
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    return ok, errors


# ----------------------------------------------------------------------------- spec resolution

@pytest.mark.parametrize("spec, words", [
    ("/nonexistent/path", ["/nonexistent/path", "does not exist"]),
    ("no-such-org/no-such-model", ["no-such-org/no-such-model", "not in the local Hugging Face cache",
                                   "HF_HUB_OFFLINE=1", "hf download no-such-org/no-such-model", "local"]),
])
def test_resolve_fails_fast_with_a_clear_message(monkeypatch, tmp_path, spec, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(backend.LLMError) as info:
        backend.resolve_llm(spec)
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    for word in words:
        assert word in message, message
    if "/" in spec and not spec.startswith("/"):
        assert str(tmp_path / "hub") in message  # says where it looked


def test_resolve_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE, an unreachable Hub also means: local cache only, fail fast."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(backend.LLMError, match="cannot be reached"):
        backend.resolve_llm("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 5


def test_resolve_kinds(tmp_path):
    assert backend.resolve_llm(None).kind == "embedded"
    assert backend.resolve_llm("").kind == "embedded"
    (tmp_path / "m").mkdir()
    with pytest.raises(backend.LLMError, match="no config.json"):
        backend.resolve_llm(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    spec = backend.resolve_llm(str(tmp_path / "m"))
    assert spec.kind == "local" and spec.path == str((tmp_path / "m").resolve())


# ----------------------------------------------------------------------------- the converted cache

def test_cache_detects_damage_and_rebuilds(monkeypatch, tmp_path):
    """Marker missing, a weights file missing or truncated, a changed source: each rebuilds."""
    monkeypatch.setenv("NAS_LLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    calls = []

    def fake_convert(spec, gguf_path, out_dir):
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"w" * 1000)

    monkeypatch.setattr(backend, "_convert_gguf", fake_convert)
    spec = backend.resolve_llm(str(gguf))
    assert spec.kind == "gguf"
    path, build = backend.ensure_converted(spec)
    assert build["built"] and len(calls) == 1
    assert backend.ensure_converted(spec)[1]["built"] is False and len(calls) == 1

    (path / backend.META_FILE).unlink()
    _, build = backend.ensure_converted(spec)
    assert build["built"] and backend.META_FILE in build["reason"]

    (path / "model.safetensors").unlink()
    _, build = backend.ensure_converted(spec)
    assert build["built"] and "model.safetensors is missing" in build["reason"]

    (path / "model.safetensors").write_bytes(b"w" * 10)
    _, build = backend.ensure_converted(spec)
    assert build["built"] and "bytes" in build["reason"]

    os.utime(gguf, ns=(1, 1))
    _, build = backend.ensure_converted(spec)
    assert build["built"] and "another source" in build["reason"]
    assert len(calls) == 5
    # Nothing half-written is left beside the cache.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name, path.name + ".lock"]


def test_cache_is_built_once_and_reloads_fast(converted):
    path, first = converted
    print(f"\nfirst ensure_converted: {first}")
    again_path, again = backend.ensure_converted(backend.resolve_llm(None))
    assert again_path == path and again["built"] is False
    assert backend.cache_problem(path, backend._source_identity(backend.resolve_llm(None))) is None
    backend.clear_model_cache()
    model, tokenizer, info = backend.load_model(None)
    print(f"\ncached load: {info}")
    assert info["converted"] is False and info["path"] == str(path)
    assert info["load_s"] < 60
    assert info["quant"] == "none" and info["device"] == "cpu"
    assert backend.load_model(None)[0] is model  # cached per process


@pytest.mark.slow
def test_real_cache_rebuilds_after_corruption(converted, monkeypatch, tmp_path):
    """A copy of the real cache with its weights deleted is rebuilt by load_model and works."""
    path, _ = converted
    monkeypatch.setenv("NAS_LLM_CACHE", str(tmp_path))
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    (copy / "model.safetensors").unlink()
    backend.clear_model_cache()
    try:
        model, tokenizer, info = backend.load_model(None)
        assert info["converted"] is True and info["path"] == str(copy)
        assert (copy / "model.safetensors").is_file()
        result = backend.generate_json(model, tokenizer, "Pick x.", {
            "type": "object", "properties": {"x": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["x"], "additionalProperties": False}, max_new_tokens=20, seed=0)
        assert result.constrained and 1 <= result.parsed["x"] <= 5
    finally:
        backend.clear_model_cache()


# ----------------------------------------------------------------------------- the proposal schema

def _good() -> dict:
    """The baseline config's params (Informer: the decoder branch)."""
    return SPACE.from_config(load_config(Path(__file__).resolve().parents[3] / "config.py").model_dump())


def test_proposal_schema_is_exact():
    # One branch per way the conditions play out, each with exactly its active keys, all required.
    assert [list(b["properties"]) for b in SCHEMA["anyOf"]] == [keys for _, keys in SPACE.branches()]
    for branch in SCHEMA["anyOf"]:
        assert branch["required"] == list(branch["properties"]) and branch["additionalProperties"] is False
    decoder = next(b["properties"] for b in SCHEMA["anyOf"] if b["properties"]["model.head"] == {"enum": ["decoder"]})
    assert decoder["training.lr"] == {"type": "number", "minimum": 1e-5, "maximum": 1e-2}
    assert decoder["model.e_layers"] == {"type": "integer", "minimum": 1, "maximum": 6}
    assert decoder["training.scheduler_class"]["enum"][-1] is None
    assert decoder["model.distil"] == {"enum": [True, False]}
    assert "model.patch_len" not in decoder
    patch = next(b["properties"] for b in SCHEMA["anyOf"] if b["properties"].get("model.tokens") == {"enum": ["patch"]})
    assert patch["model.patch_len"] == {"enum": [8, 16, 24, 32]} and "model.d_layers" not in patch
    json.dumps(SCHEMA)
    informer = proposal_json_schema(load_space(Path(__file__).resolve().parents[3] / "spaces" / "informer.json"))
    prob, full = informer["anyOf"]  # the only condition left: factor exists with ProbSparse attention
    assert set(prob["properties"]) - set(full["properties"]) == {"model.factor"}
    unconditional = {k: v for k, v in SPACE.entries.items() if "when" not in v}
    flat = proposal_json_schema(type(SPACE)(unconditional))
    assert "anyOf" not in flat and list(flat["properties"]) == list(unconditional)  # one branch: a plain object


def test_params_from_json_names_the_key():
    good = _good()
    assert params_from_json(good, SPACE) == good
    assert params_from_json(dict(good, **{"model.patch_len": 16}), SPACE) == good  # unused with a decoder: ignored
    for key, bad in [("training.lr", 0.5), ("model.e_layers", 7), ("model.e_layers", 1.5),
                     ("model.attn", "sparse"), ("model.distil", 1), ("data.seq_len", "96")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            params_from_json(dict(good, **{key: bad}), SPACE)
    with pytest.raises(ValueError, match="model.dropout: missing"):
        params_from_json({k: v for k, v in good.items() if k != "model.dropout"}, SPACE)
    with pytest.raises(ValueError, match="model.bogus: not a search-space key"):
        params_from_json(dict(good, **{"model.bogus": 1}), SPACE)
    patch = dict(good, **{"model.head": "linear", "model.tokens": "patch"})
    with pytest.raises(ValueError, match="model.channels: missing.*model.patch_len"):
        params_from_json(patch, SPACE)


def test_xgrammar_enforces_the_ranges_and_the_families(converted):
    import xgrammar as xgr
    from transformers import AutoTokenizer
    path, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(path)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    grammar = compiler.compile_json_schema(SCHEMA, any_whitespace=False)
    good = _good()
    # The grammar writes numbers in decimal form (json.dumps would write 1e-05 for lr's low).
    good.update({"training.lr": 0.0003})

    def accepts(obj):
        matcher = xgr.GrammarMatcher(grammar)
        text = json.dumps(obj).replace("1e-05", "0.00001")
        return matcher.accept_string(text) and matcher.is_completed()

    assert accepts(good)
    assert accepts(dict(good, **{"training.lr": 0.01, "model.dropout": 0.3, "model.e_layers": 6}))  # ends
    for key, bad in [("training.lr", 0.02), ("training.lr", 0.000001), ("model.dropout", 0.95),
                     ("model.dropout", -0.1), ("model.e_layers", 7), ("model.e_layers", 0),
                     ("model.attn", "sparse"), ("data.seq_len", 97)]:
        assert not accepts(dict(good, **{key: bad})), (key, bad)
    assert not accepts({k: v for k, v in good.items() if k != "model.dropout"})
    assert not accepts(dict(good, extra=1))
    # The families: a decoder has no patch_len; patch tokens need it; variate tokens have no channels key.
    assert not accepts({**good, "model.patch_len": 16})
    linear = {"data.seq_len": 336, "model.head": "linear", "model.tokens": "patch", "model.channels": "independent",
              "model.patch_len": 16, "model.stride": 8, "model.mixer": "none", "model.decomp": "none",
              "model.revin": True, **{k: good[k] for k in good if k.startswith("training.") or k == "model.dropout"}}
    assert accepts(linear)
    assert not accepts({k: v for k, v in linear.items() if k != "model.patch_len"})
    variate = {**{k: v for k, v in linear.items() if k not in ("model.patch_len", "model.stride")},
               "model.tokens": "variate"}
    assert not accepts(variate)  # still has model.channels
    assert accepts({k: v for k, v in variate.items() if k != "model.channels"})


def test_extract_json():
    assert backend.extract_json('noise {"a": {"b": "}"}} tail {"c": 1}') == {"a": {"b": "}"}}
    assert backend.extract_json("{bad} then {\"ok\": true}") == {"ok": True}
    assert backend.extract_json("no json here") is None


# ----------------------------------------------------------------------------- generation

def _sample(embedded, n, seed=0):
    """n constrained replies at temperature 0.8 (bench/llm_speed.py measures unconstrained ones too)."""
    model, tokenizer, _ = embedded
    return backend.generate_json_batch(model, tokenizer, MESSAGES, SCHEMA, n=n, temperature=0.8, top_p=0.95,
                                       max_new_tokens=PROPOSAL_TOKENS, seed=seed, constrain=True)


def _report(label, results, ok, errors):
    steps = max(r.completion_tokens for r in results)
    tokens = sum(r.completion_tokens for r in results)
    latency = results[0].latency_s
    print(f"\n{label}: valid {ok}/{len(results)} ({ok / len(results):.0%}); prompt {results[0].prompt_tokens} "
          f"tokens; {steps} steps in {latency:.1f} s ({1000 * latency / steps:.0f} ms/step, "
          f"{tokens / latency:.1f} tokens/s over the batch)")
    for e in errors[:3]:
        print("  ", e)


# ~45 s of generation here; the default suite keeps the grammar tests (xgrammar, fallback). The
# validity rate over 20 replies, constrained and not, is a measurement: bench/llm_speed.py.
@pytest.mark.slow
def test_constrained_proposals_are_all_valid(embedded, base_config):
    n = 4
    results = _sample(embedded, n)
    ok, errors = _validity(results, base_config)
    _report(f"constrained n={n}", results, ok, errors)
    assert all(r.constrained and r.fallback_reason is None for r in results)
    assert ok == n, errors


def test_schema_that_does_not_compile_falls_back(embedded, monkeypatch):
    model, tokenizer, _ = embedded

    def broken(*args, **kwargs):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(backend, "compile_schema", broken)
    result = backend.generate_json(model, tokenizer, "Say hi.", SCHEMA, max_new_tokens=8, seed=0)
    assert result.constrained is False and "cannot compile" in result.fallback_reason
    assert result.completion_tokens <= 8


def test_generation_is_reproducible_with_a_seed(embedded):
    model, tokenizer, _ = embedded
    schema = {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
              "required": ["x"], "additionalProperties": False}
    a = backend.generate_json(model, tokenizer, "Pick x.", schema, max_new_tokens=20, seed=7)
    b = backend.generate_json(model, tokenizer, "Pick x.", schema, max_new_tokens=20, seed=7)
    assert a.text == b.text and 0 <= a.parsed["x"] <= 1


@pytest.mark.slow  # ~18 s here
def test_4bit_loads_and_generates_on_cpu(converted):
    try:
        model, tokenizer, info = backend.load_model(None, quant="4bit", device="cpu")
    except Exception as e:  # noqa: BLE001 - the exact reason becomes the skip message
        pytest.skip(f"4-bit loading does not work on this machine: {type(e).__name__}: {e}")
    import bitsandbytes as bnb
    assert info["quant"] == "4bit" and info["device"] == "cpu"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["x"], "additionalProperties": False}
    result = backend.generate_json(model, tokenizer, "Pick x.", schema, max_new_tokens=20, seed=0)
    print(f"\n4-bit: {info}; {result}")
    assert result.constrained and 1 <= result.parsed["x"] <= 5


# ----------------------------------------------------------------------------- langchain

def test_local_chat_model_invoke(embedded):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from nas_agent_graph.llm.chat_model import LocalChatModel

    llm = LocalChatModel(max_new_tokens=PROPOSAL_TOKENS, temperature=0.8, seed=3)
    assert llm._llm_type == "nas-agent-local-hf"
    messages = [SystemMessage(MESSAGES[0]["content"]), HumanMessage(MESSAGES[1]["content"])]
    reply = llm.bind(json_schema=SCHEMA).invoke(messages)
    assert isinstance(reply, AIMessage)
    meta = reply.response_metadata
    assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] > 0 and meta["latency_s"] > 0
    assert meta["constrained"] is True and meta["quant"] == "none" and meta["model"]
    assert reply.usage_metadata["output_tokens"] == meta["completion_tokens"]
    params_from_json(json.loads(reply.content), SPACE)
    assert reply.additional_kwargs["parsed"] == json.loads(reply.content)
    # Without a schema: free text, unconstrained; per-call settings override the fields.
    free = llm.invoke([HumanMessage("Hello")], max_new_tokens=5)
    assert free.response_metadata["constrained"] is False and free.response_metadata["completion_tokens"] <= 5
