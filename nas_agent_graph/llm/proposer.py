"""LLM proposers: the local LLM alone ("llm"), or the LLM choosing among Optuna's candidates ("hybrid").

One proposal is one request to the chat model (langchain-core messages rendered from
prompts/*.j2), decoded under the JSON schema of the search space, so the reply parses and every
value is inside its range by construction (xgrammar). If constrained decoding is unavailable or
its reply still does not make a config (e.g. cut off at max_new_tokens), the reply is read by
extraction and validation, and the model gets one repair prompt with the error. A proposal that
is still unusable raises ProposalError carrying the record of both calls, so the loop stores the
failure (and its validity) as data and asks again with the error as feedback.

hybrid: the Optuna sampler (TPE or CMA-ES, rebuilt from agent_state.json as in
nas_agent_graph.proposers) suggests `n_candidates` configs; the LLM sees them with the sampler's
state (best run, and PED-ANOVA parameter importances once `IMPORTANCE_MIN_RUNS` runs are scored)
and answers with a full config: one candidate as is, or edited. Every `sampler_fraction` of runs
comes from the sampler alone. Runs the LLM made are shown to the sampler like any other run,
since the sampler's study is rebuilt from every run in agent_state.json on each call: that is
how the LLM's configs are "told" to TPE/CMA-ES.

Reproducible: the generation seed is the proposer's sampler_seed(seed, runs, attempt).
Every proposal's meta holds what is needed to trace it: "prompt" (the conversation as text),
"response" (the final reply) and "llm" (model, quant, adapter, generation settings, tokens,
latency, validity, calls); the loop writes them to prompt.txt, response.txt and llm.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Any

from nas_agent.agent_state import AgentState, get_best_run
from nas_agent.config import apply_overrides
from nas_agent.run_folder import SCORED
from nas_agent_graph.paths import PROJECT_MODEL
from nas_agent_graph.llm.chat_model import DECODING_STATS, LocalChatModel, from_dicts
from nas_agent_graph.llm.proposal_schema import params_from_json, proposal_json_schema
from nas_agent_graph.prompting import (
    Messages,
    PromptLimits,
    code_messages,
    config_messages,
    messages_text,
    params_text,
    repair_messages,
    run_params,
)
from nas_agent_graph.proposers import OptunaProposer, Proposal, ProposalError, sampler_seed
from nas_agent_graph.search_space import SearchSpace
from nas_agent_graph.code_check import check_model_code

log = logging.getLogger(__name__)

# Times the LLM is asked again when its config already ran, before a fallback is used.
REPEAT_RETRIES = 2
# Parameter importances are shown once this many runs are scored (fewer make them noise).
IMPORTANCE_MIN_RUNS = 8
CANDIDATE_LABELS = "ABCDEFGHIJKLMNOP"


def sampler_turn(n_runs: int, fraction: float) -> bool:
    """Whether run number n_runs (0-based) comes from the sampler alone: exactly `fraction` of
    runs, evenly spread (0.25 -> runs 3, 7, 11, ...), the same on every resume."""
    if fraction <= 0:
        return False
    return math.floor((n_runs + 1) * fraction + 1e-9) > math.floor(n_runs * fraction + 1e-9)


def importances(study_obj: Any) -> dict[str, float] | None:
    """PED-ANOVA importances of the sampler's study (Optuna's, no scikit-learn needed), rounded, or
    None when too few runs are scored."""
    import optuna
    from optuna.trial import TrialState

    n = len(study_obj.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < IMPORTANCE_MIN_RUNS:
        return None
    try:
        # target_quantile 0.25: with tens of runs, the default top 10% is one or two trials.
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=0.25)
        found = optuna.importance.get_param_importances(study_obj, evaluator=evaluator)
    except Exception as e:  # noqa: BLE001 - importances are a hint in the prompt; never lose a proposal to them
        log.warning("parameter importances unavailable (%s: %s); the prompt goes without them", type(e).__name__, e)
        return None
    return {k: round(float(v), 3) for k, v in found.items()}


def _reply_for(params: dict) -> str:
    """A reply in the constrained decoder's compact layout for params the proposer chose itself."""
    return json.dumps(params, separators=(",", ":"))


def _params_key(params: dict) -> str:
    """Params as a comparable string: floats to 4 significant digits, as the prompt shows them."""
    return json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in params.items()}, sort_keys=True)


def _random_value(entry: dict, rng: random.Random) -> Any:
    """A random value of one search-space entry."""
    if entry["type"] == "categorical":
        return rng.choice(entry["choices"])
    if entry["type"] == "int":
        step = int(entry.get("step", 1))
        return rng.randrange(int(entry["low"]), int(entry["high"]) + 1, step)
    low, high = float(entry["low"]), float(entry["high"])
    if entry.get("log") and low > 0:
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def _same_value(a: Any, b: Any) -> bool:
    """Equal, or floats equal to the 4 significant digits a prompt shows."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-12)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _diff_keys(a: dict, b: dict) -> list[str]:
    return [k for k in a if not _same_value(a.get(k), b.get(k))]


class LLMProposer:
    """Proposes configs with a local chat model; with `sampler`, it is the hybrid proposer."""

    def __init__(self, chat: LocalChatModel, space: SearchSpace, seed: int, *,
                 limits: PromptLimits | None = None, sampler: OptunaProposer | None = None,
                 sampler_fraction: float = 0.25, n_candidates: int = 4, prompts_dir: Any = None,
                 allow_code: bool = False, code_fraction: float = 0.2,
                 model_path: Path | None = None, code_max_new_tokens: int = 2048, overrides: list[str] | None = None):
        if not 0.0 <= sampler_fraction <= 1.0:
            raise ValueError(f"sampler_fraction must be in [0, 1], got {sampler_fraction}")
        if not 1 <= n_candidates <= len(CANDIDATE_LABELS):
            raise ValueError(f"n_candidates must be in [1, {len(CANDIDATE_LABELS)}], got {n_candidates}")
        self.chat = chat
        self.space = space
        self.seed = seed
        self.limits = limits or PromptLimits()
        self.sampler = sampler
        self.sampler_fraction = sampler_fraction if sampler is not None else 0.0
        self.n_candidates = n_candidates
        self.prompts_dir = prompts_dir
        self.name = "hybrid" if sampler is not None else "llm"
        self.schema = proposal_json_schema(space)
        self.allow_code = allow_code
        self.code_fraction = code_fraction if allow_code else 0.0
        self.model_path = Path(model_path) if model_path else PROJECT_MODEL
        self.code_max_new_tokens = code_max_new_tokens
        self.overrides = list(overrides or [])
        """The study's --set items: the prompt states the per-run budget that runs really get."""

    # ------------------------------------------------------------------ the proposal

    def use_adapter(self, record: dict | None) -> None:
        """Generate with a LoRA adapter (the study's promoted one, meta.lora's record, which the graph
        hands over), or with the base model when there is none, or when its folder is gone or it was
        trained on another base model."""
        if record is not None:
            _, _, info = self.chat.load()
            trained_on = (record.get("gate") or {}).get("base_model")
            if not (Path(record["path"]) / "adapter_config.json").is_file():
                log.warning("LoRA adapter v%s: %s is missing; proposing with the base model", record["version"],
                            record["path"])
                record = None
            elif trained_on and trained_on != info["model"]:
                log.warning("LoRA adapter v%s was trained on %s, not on %s; proposing with the base model",
                            record["version"], trained_on, info["model"])
                record = None
        name = f"v{record['version']}" if record else None
        if name != self.chat.adapter:
            log.info("the LLM now uses %s", f"LoRA adapter {name} ({record['path']})" if record else "its base weights")
            self.chat = self.chat.model_copy(update={"adapter": name, "adapter_path": record["path"] if record else None})

    def propose(self, state: AgentState, base_config: dict, attempt: int = 0,
                feedback: str | None = None) -> Proposal:
        n_runs = len(state.runs)
        # A code turn asks for code once; a retry of that run (the file was rejected) gets a config,
        # so a model that cannot write working code never stalls the search.
        if (self.allow_code and attempt == 0 and get_best_run(state) is not None
                and sampler_turn(n_runs + 1, self.code_fraction)):
            return self.propose_code(state, attempt, feedback)
        if self.sampler is not None and sampler_turn(n_runs, self.sampler_fraction):
            proposal = self.sampler.propose(state, base_config, attempt, feedback)
            proposal.meta["hybrid"] = {"mode": "sampler only", "sampler_fraction": self.sampler_fraction}
            return proposal

        candidates, sampler_info, study_obj = [], None, None
        if self.sampler is not None:
            study_obj = self.sampler.build_study(state, attempt)
            candidates = self.sampler.suggest_candidates(state, base_config, self.n_candidates, attempt)
            sampler_info = self._sampler_info(state, study_obj)
        shown = [{"label": CANDIDATE_LABELS[i], "params": params_text(c.meta["optuna"]["params"])}
                 for i, c in enumerate(candidates)]
        messages, prompt_info = config_messages(
            state, self.space, apply_overrides(base_config, self.overrides), limits=self.limits,
            count_tokens=self.chat.count_tokens,
            feedback=feedback, candidates=shown, sampler=sampler_info, prompts_dir=self.prompts_dir)
        seed = sampler_seed(self.seed, n_runs, attempt)

        calls: list[dict] = []
        params, error, reply = self._ask(messages, seed, calls)
        conversation = messages
        if error is not None:
            log.info("LLM reply unusable (%s); sending one repair prompt", error)
            conversation = repair_messages(messages, reply, error, self.space, self.prompts_dir)
            params, error, reply = self._ask(conversation, seed + 1, calls)
        dedup = None
        if error is None:
            params, reply, conversation, dedup = self._avoid_repeat(state, params, reply, conversation, calls, seed,
                                                                    candidates)
        config = None
        if error is None:
            try:
                config = self.space.to_config(params, base_config)
            except ValueError as e:
                error = str(e)
        meta = self._meta(attempt, conversation, reply, calls, prompt_info, error is None)
        if dedup:
            meta["dedup"] = dedup
        if error is not None:
            raise ProposalError(f"the LLM gave no usable config after a repair prompt: {error}", meta)
        if candidates:
            meta.update(self._hybrid_meta(params, candidates, sampler_info))
            if "picked" in meta["hybrid"]:  # the candidate's exact values, not the prompt's rounded ones
                config = candidates[CANDIDATE_LABELS.index(meta["hybrid"]["picked"])].config
        return Proposal(config=config, proposer=self.name, meta=meta)

    # ------------------------------------------------------------------ repeats

    def _avoid_repeat(self, state: AgentState, params: dict, reply: str, conversation: Messages, calls: list[dict],
                      seed: int, candidates: list[Proposal]) -> tuple[dict, str, Messages, dict | None]:
        """A small model at low temperature often repeats a config that already ran. Ask again (at
        most REPEAT_RETRIES times, hotter each time, told which run it repeats); if it still
        repeats, take the first new candidate (hybrid) or change one key at random (llm), and say
        so in the record. Returns (params, reply, conversation, what was done or None)."""
        seen = {}
        for run in state.runs:
            p = run_params(run, self.space)
            if p is not None:
                seen.setdefault(_params_key(p), run.run_id)
        if _params_key(params) not in seen:
            return params, reply, conversation, None
        first_dup = seen[_params_key(params)]
        for i in range(1, REPEAT_RETRIES + 1):
            dup = seen[_params_key(params)]
            conversation = [*conversation, {"role": "assistant", "content": reply},
                            {"role": "user", "content": f"That configuration already ran as {dup}. Propose a "
                                                        "different one: change at least one key."}]
            temperature = min(1.5, self.chat.temperature + 0.4 * i)
            new_params, error, reply = self._ask(conversation, seed + 100 + i, calls, temperature=temperature)
            calls[-1]["purpose"] = "repeat"
            if error is None:
                params = new_params
                if _params_key(params) not in seen:
                    return params, reply, conversation, {"repeated": first_dup, "asked_again": i}
        # The reply recorded (and learned from by LoRA) is then the config that runs, not the repeat.
        novel = [c.meta["optuna"]["params"] for c in candidates if _params_key(c.meta["optuna"]["params"]) not in seen]
        if novel:
            return novel[0], _reply_for(novel[0]), conversation, {
                "repeated": first_dup, "asked_again": REPEAT_RETRIES, "fallback": "the first new sampler candidate"}
        rng = random.Random(seed)
        changed: list[str] = []
        base = self.space.full_config(None)
        for _ in range(100):
            key = rng.choice(self.space.active_keys(params, base))
            params = self.space.complete({**params, key: _random_value(self.space.entries[key], rng)}, base,
                                         lambda _, entry: _random_value(entry, rng))
            changed.append(key)
            if _params_key(params) not in seen:
                break
        return params, _reply_for(params), conversation, {
            "repeated": first_dup, "asked_again": REPEAT_RETRIES,
            "fallback": "changed at random: " + ", ".join(dict.fromkeys(changed))}

    # ------------------------------------------------------------------ model code (--allow-code)

    def propose_code(self, state: AgentState, attempt: int = 0, feedback: str | None = None) -> Proposal:
        """A new model file for the incumbent config: prompt, free generation, AST check, one repair.

        The code is only parsed here (never imported or run); the loop's validate node runs the
        AST allowlist again and the smoke test in a subprocess before any training.
        """
        best = get_best_run(state)
        config = best.extra.get("incumbent_config") or best.config
        current = self.model_path.read_text(encoding="utf-8") if self.model_path.is_file() else ""
        messages, prompt_info = code_messages(state, self.space,
                                              apply_overrides(state.meta.get("base_config") or config, self.overrides),
                                              current, limits=self.limits, count_tokens=self.chat.count_tokens,
                                              feedback=feedback, prompts_dir=self.prompts_dir)
        seed = sampler_seed(self.seed, len(state.runs), attempt)
        calls: list[dict] = []
        code, error, reply = self._ask_code(messages, seed, calls)
        conversation = messages
        if error is not None:
            conversation = [*messages, {"role": "assistant", "content": reply[-3000:]},
                            {"role": "user", "content": f"That file cannot be used: {error}\nReply with the "
                                                        "corrected complete file in one ```python block."}]
            code, error, reply = self._ask_code(conversation, seed + 1, calls)
        meta = self._meta(attempt, conversation, reply, calls, prompt_info, error is None)
        if error is not None:
            raise ProposalError(f"the LLM gave no usable model file after a repair prompt: {error}", meta)
        meta.update(model_code=code, code_sha256=hashlib.sha256(code.encode()).hexdigest(),
                    base_run_id=best.run_id)
        return Proposal(config=json.loads(json.dumps(config)), proposer="llm-code", parent_run_id=best.run_id,
                        meta=meta)

    def _ask_code(self, messages: Messages, seed: int, calls: list[dict]) -> tuple[str | None, str | None, str]:
        t0 = time.perf_counter()
        reply = self.chat.invoke(from_dicts(messages), seed=seed, max_new_tokens=self.code_max_new_tokens)
        md = reply.response_metadata
        text = reply.content if isinstance(reply.content, str) else str(reply.content)
        code = extract_code(text)
        error = None
        if code is None:
            error = "the reply holds no ```python block that defines build_model"
        else:
            problems = check_model_code(code)
            if problems:
                error = "; ".join(problems[:5])
        calls.append({"prompt_tokens": md.get("prompt_tokens"), "completion_tokens": md.get("completion_tokens"),
                      "latency_s": round(time.perf_counter() - t0, 3), "constrained": False,
                      "fallback_reason": "model code is free text", "seed": seed, "valid": error is None,
                      "error": error})
        return code, error, text

    def _ask(self, messages: Messages, seed: int, calls: list[dict],
             temperature: float | None = None) -> tuple[dict | None, str | None, str]:
        """One generation; returns (params or None, error or None, reply text) and records the call."""
        t0 = time.perf_counter()
        extra = {} if temperature is None else {"temperature": temperature}
        reply = self.chat.invoke(from_dicts(messages), json_schema=self.schema, seed=seed, **extra)
        md = reply.response_metadata
        text = reply.content if isinstance(reply.content, str) else str(reply.content)
        parsed = reply.additional_kwargs.get("parsed")
        params, error = None, None
        if parsed is None:
            cut = md.get("completion_tokens", 0) >= self.chat.max_new_tokens
            error = ("the reply holds no JSON object" + (f" (cut off at max_new_tokens={self.chat.max_new_tokens})"
                                                         if cut else ""))
        else:
            try:
                params = params_from_json(parsed, self.space)
            except ValueError as e:
                error = str(e)
        calls.append({"prompt_tokens": md.get("prompt_tokens"), "completion_tokens": md.get("completion_tokens"),
                      "latency_s": round(time.perf_counter() - t0, 3), "constrained": md.get("constrained"),
                      "fallback_reason": md.get("fallback_reason"), "seed": seed, "valid": error is None,
                      "error": error, **{k: md[k] for k in DECODING_STATS if k in md}})
        return params, error, text

    # ------------------------------------------------------------------ records

    def _meta(self, attempt: int, conversation: Messages, reply: str, calls: list[dict],
              prompt_info: dict, valid: bool) -> dict[str, Any]:
        _, _, info = self.chat.load()
        llm = {
            "model": info["model"], "path": info["path"], "quant": info["quant"], "device": info["device"],
            "dtype": info["dtype"], "adapter": self.chat.adapter, "adapter_path": self.chat.adapter_path,
            "generation": self.chat.settings(),
            "prompt_tokens": sum(c["prompt_tokens"] or 0 for c in calls),
            "completion_tokens": sum(c["completion_tokens"] or 0 for c in calls),
            "latency_s": round(sum(c["latency_s"] for c in calls), 3),
            "valid_first": calls[0]["valid"], "repaired": valid and any(not c["valid"] for c in calls), "valid": valid,
            "constrained": bool(calls[0]["constrained"]), "calls": calls, "prompt": prompt_info,
        }
        # messages: the conversation the reply answers, for LoRA samples (rendered the same way at
        # training and inference); prompt: the same as text, for prompt.txt.
        return {"attempt": attempt, "prompt": messages_text(conversation), "messages": conversation,
                "response": reply, "llm": llm}

    def _sampler_info(self, state: AgentState, study_obj: Any) -> dict[str, Any]:
        best = get_best_run(state)
        imp = importances(study_obj)
        return {"name": self.sampler.name, "n_complete": sum(1 for r in state.runs if r.status in SCORED
                                                             and r.val_mse is not None),
                "best": best.run_id if best else None,
                "importances": ", ".join(f"{k} {v:.2f}" for k, v in imp.items()) if imp else "",
                "importance_values": imp}

    def _hybrid_meta(self, params: dict, candidates: list[Proposal], sampler_info: dict) -> dict[str, Any]:
        """Which candidate the LLM picked, or edited (the nearest), and the sampler's record of it."""
        diffs = [_diff_keys(params, c.meta["optuna"]["params"]) for c in candidates]
        nearest = min(range(len(candidates)), key=lambda i: len(diffs[i]))
        label = CANDIDATE_LABELS[nearest]
        choice = ({"picked": label} if not diffs[nearest]
                  else {"edited": label, "changed": diffs[nearest]})
        optuna_meta = dict(candidates[nearest].meta["optuna"])
        optuna_meta["params"] = params if diffs[nearest] else candidates[nearest].meta["optuna"]["params"]
        if diffs[nearest]:  # CMA-ES's stored x belongs to the candidate, not to the edited config
            optuna_meta["system_attrs"] = {}
        return {"optuna": optuna_meta, "hybrid": {
            "mode": "llm", **choice, "sampler": sampler_info["name"],
            "candidates": [c.meta["optuna"]["params"] for c in candidates],
            "importances": sampler_info["importance_values"]}}


# ----------------------------------------------------------------------------- model code helpers

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str | None:
    """The first fenced code block that defines build_model (or the whole reply, when it does and
    has no fence); None when there is none."""
    for block in _FENCE.findall(text):
        if "def build_model" in block:
            return block.strip() + "\n"
    if "```" not in text and "def build_model" in text:
        return text.strip() + "\n"
    return None
