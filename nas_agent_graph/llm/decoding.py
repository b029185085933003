"""The token loop behind backend.generate_json: prefix-cached prefill, grammar-masked sampling,
and jump-forward over the text the grammar forces.

Why not `model.generate`: on a 2-core CPU one proposal of the embedded model took about 24 s,
5 s of prefill and 19 s decoding some 210 tokens one forward pass each. Two facts make most of
that avoidable:

1. Consecutive prompts of a study share a long prefix (system message, task, search space).
   `PrefixCache` keeps the KV cache of the longest such prefix (a deep copy, so later steps
   cannot change it), cut at a chunk end (`chunk_ends`), and the next prompt that starts with
   it prefills only its own tail. Snapshots are taken on the way rather than cropped from a
   longer cache because sliding-window layers (Gemma 3) drop old keys, so a cache cannot be cut
   back to an earlier length.
2. Most of a constrained JSON reply is fixed by the schema: key names, quotes, separators.
   After each sampled token the grammar matcher reports the longest string every valid
   continuation starts with; its tokens are accepted without sampling and fed together with
   the sampled token in one forward pass, so a proposal costs about one pass per free token.

Sampling order per free token: grammar mask, temperature, top-k, top-p; temperature 0 is greedy.
A seed drives a private torch.Generator, so results are reproducible for a seed and the global
RNG is left alone.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

# Prefill works in chunks that end at the first line end at least this many tokens after the
# previous chunk's end.
CHUNK_TOKENS = 256
# Snapshots kept per model and adapter: config, code and repair prompts each have their own prefix.
MAX_SNAPSHOTS = 4


@dataclass
class _Snapshot:
    ids: list[int]
    cache: Any


@dataclass
class _Slot:
    last_ids: list[int] = field(default_factory=list)
    snapshots: list[_Snapshot] = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def chunk_ends(ids: list[int], line_ends: Callable[[int], bool]) -> list[int]:
    """Where prefill chunks end, before the last one: the first line end CHUNK_TOKENS or more
    tokens after the previous end.

    Each end depends only on the tokens before it, so two prompts that share a prefix share its
    chunk ends, and a snapshot taken at one is a chunk end of the next prompt too. That is what
    makes a reply independent of what was cached: a prompt is always prefilled in the same
    chunks, from a snapshot or not, so its numbers (bf16 sums depend on the chunking) are the same
    bit for bit, and a resumed study proposes what an uninterrupted one would have. Whole lines,
    because a token-level prefix can end inside a word the next prompt tokenises differently.
    """
    ends, at = [], CHUNK_TOKENS
    while at < len(ids):
        while at < len(ids) and not line_ends(ids[at - 1]):
            at += 1
        if at >= len(ids):
            break
        ends.append(at)
        at += CHUNK_TOKENS
    return ends


class PrefixCache:
    """KV-cache snapshots at prompt chunk ends, per (model, adapter) key; see the module docstring."""

    def __init__(self) -> None:
        self._slots: dict[Any, _Slot] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()

    def plan(self, key: Any, ids: list[int], ends: list[int]) -> tuple[int, Any, int]:
        """(tokens already cached, a private copy of their cache or None, chunk end to snapshot or 0).

        The snapshot goes at the last chunk end inside the prefix this prompt shares with the
        previous prompt of the same key: the part the next prompt most likely shares too.
        """
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
            best = max((s for s in slot.snapshots if len(s.ids) in ends and ids[:len(s.ids)] == s.ids),
                       key=lambda s: len(s.ids), default=None)
            start = len(best.ids) if best else 0
            shared = _common_prefix(ids, slot.last_ids)
            slot.last_ids = list(ids)
            cache = copy.deepcopy(best.cache) if best else None
        snapshot_at = max((e for e in ends if start < e <= shared), default=0)
        return start, cache, snapshot_at

    def store(self, key: Any, ids: list[int], cache: Any) -> None:
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
            slot.snapshots = [s for s in slot.snapshots if s.ids != ids][-(MAX_SNAPSHOTS - 1):]
            slot.snapshots.append(_Snapshot(list(ids), copy.deepcopy(cache)))


PREFIXES = PrefixCache()


def _forward(model: Any, ids: list[int], cache: Any, device: Any) -> tuple[Any, Any]:
    """(last position's logits as float32, the updated cache) for ids appended to cache."""
    import torch

    out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[0, -1].float(), out.past_key_values


def _line_end_test(tokenizer: Any) -> Callable[[int], bool]:
    memo: dict[int, bool] = {}

    def line_ends(token: int) -> bool:
        if token not in memo:
            memo[token] = "\n" in tokenizer.decode([token])
        return memo[token]
    return line_ends


def prefill(model: Any, tokenizer: Any, ids: list[int], key: Any, device: Any) -> tuple[Any, Any, dict]:
    """(first logits, cache after the whole prompt, stats), chunk by chunk, reusing and
    refreshing PREFIXES."""
    ends = chunk_ends(ids, _line_end_test(tokenizer))
    start, cache, snapshot_at = PREFIXES.plan(key, ids, ends)
    at = start
    for end in [e for e in ends if e > start] + [len(ids)]:
        logits, cache = _forward(model, ids[at:end], cache, device)
        at = end
        if end == snapshot_at:
            PREFIXES.store(key, ids[:end], cache)
    return logits, cache, {"reused_tokens": start, "prefilled_tokens": len(ids) - start}


def sample_token(logits: Any, temperature: float, top_k: int | None, top_p: float, generator: Any) -> int:
    """One token id from masked logits: greedy at temperature 0, else temperature, top-k, top-p."""
    import torch

    if not temperature or temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits / float(temperature)
    if top_k and top_k > 0:
        values, index = torch.topk(scaled, min(int(top_k), scaled.numel()))
    else:
        values, index = torch.sort(scaled, descending=True)
    probs = torch.softmax(values, dim=-1)
    if top_p < 1.0:
        # keep the smallest head whose mass reaches top_p (the first token always stays)
        probs = probs * ((torch.cumsum(probs, dim=-1) - probs) < top_p)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(index[choice])


class Grammar:
    """An xgrammar matcher with its token bitmask: masks logits, accepts tokens, finds forced text."""

    def __init__(self, compiled: Any, vocab_size: int, tokenizer: Any):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.tokenizer = tokenizer

    def mask(self, logits: Any) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self.bitmask.to(logits.device))

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token} that its own mask allowed")

    def done(self) -> bool:
        return self.matcher.is_terminated()

    def forced(self) -> list[int]:
        """Tokens of the text every valid continuation starts with, accepted by the matcher."""
        text = self.matcher.find_jump_forward_string()
        if not text:
            return []
        out = []
        for token in self.tokenizer.encode(text, add_special_tokens=False):
            # a tokenisation the grammar does not take token by token: sample the rest instead
            if not self.matcher.accept_token(token):
                break
            out.append(token)
        return out


def decode(model: Any, logits: Any, cache: Any, device: Any, *, grammar: Grammar | None, stop: list[int],
           max_new_tokens: int, temperature: float, top_k: int | None, top_p: float,
           generator: Any) -> tuple[list[int], dict]:
    """(generated token ids, ending with the stop token if one came; stats) from first logits."""
    tokens: list[int] = []
    passes = forced_count = 0
    while True:
        if grammar is not None:
            grammar.mask(logits)
        token = sample_token(logits, temperature, top_k, top_p, generator)
        tokens.append(token)
        if token in stop or len(tokens) >= max_new_tokens:
            break
        feed = [token]
        if grammar is not None:
            grammar.accept(token)
            if grammar.done():
                break
            extra = grammar.forced()[:max_new_tokens - len(tokens)]
            tokens += extra
            feed += extra
            forced_count += len(extra)
            if len(tokens) >= max_new_tokens:
                break
        logits, cache = _forward(model, feed, cache, device)
        passes += 1
    return tokens, {"decode_passes": passes, "forced_tokens": forced_count}
