"""The LLM's self-improvement: LoRA samples, training, the promotion gate, and rollback.

Data flow, all of it in plain files:

    runs/lora/samples.jsonl       one line per LLM-proposed run (collect_lora): key, run_id,
                                  messages (the prompt), response, status, val_mse, reward,
                                  adapter_version; fsynced appends, deduplicated by key
    runs/lora/adapter_vK/         the adapter, meta.json and loss_curve.png (finetune.py)
    runs/lora/job_vK.json         what the training subprocess was given
    agent_state.json meta.lora    the registry (below): the single source of truth about which
                                  adapter is in use

Positive samples have reward >= LoraSettings.reward_threshold (nas_agent_graph/study/reward.py
defines the reward). When `trigger` positives exist that no earlier training attempt has seen,
the graph routes to the `finetune` node: the `held_out` most recent samples are set aside, the
remaining positives train adapter vK in a subprocess, and the gate evaluates vK against the
adapter in use (or the base model) on the held-out prompts:

    validity   replies, decoded WITHOUT constraints (greedy), that parse and lie inside the space
    closeness  1 - the normalised distance of a valid reply to the nearest of the 3 best configs
               known so far (0 for an invalid reply), averaged

vK is promoted only if neither is worse (closeness within gate_tolerance) and its validity is
above zero; otherwise the old adapter stays and the reason is recorded. (`gate_tolerance`, 0.02 by
default, is how much lower closeness may be; 1 compares validity only.) After a promotion, once
`rollback_window` LLM runs used vK, their mean reward is compared with the same number of the
previous version's runs: if it is lower by more than `rollback_margin`, vK is rolled back.

Registry (agent_state.json meta.lora):
    {"active": K | null, "seen_keys": [...positives seen at the last training attempt...],
     "adapters": [{"version", "path", "status": "promoted"|"rejected"|"failed"|"rolled_back",
                   "reason", "created", "train": {...}, "gate": {...}, "previous": K | null,
                   "promoted_at_run": n, "rollback_checked": bool}],
     "events": [{"at", "kind", "version", "reason"}]}
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nas_agent.agent_state import AgentState, utc_now_iso
from nas_agent.atomic import append_jsonl
from nas_agent.run_folder import SCORED
from nas_agent_graph.limits import Caps, cpu_cap_s, cpu_count, parse_memory_gb, ran_out_of_memory
from nas_agent_graph.process import run_child
from nas_agent_graph.llm.proposal_schema import params_from_json

log = logging.getLogger(__name__)

TOP_CONFIGS = 3         # closeness is measured to the nearest of this many best configs
_OPTIONAL_INTS = ("max_len", "batch_size")  # settings where None means the device's default


@dataclass(frozen=True)
class LoraSettings:
    """How the LLM is fine-tuned; the CLI's --lora KEY=VALUE items set these."""
    enabled: bool = True
    trigger: int = 10
    """New positive samples (unseen by any training attempt) that start a fine-tune."""
    reward_threshold: float = 0.7
    """A sample is positive when its reward is at least this (0.7: about 2 % better than the incumbent)."""
    held_out: int = 4
    """Most recent samples kept out of training and used by the gate."""
    steps: int = 40
    lr: float = 5e-4
    batch_size: int | None = None
    """Samples per step (None: the device's default in finetune.DEVICE_DEFAULTS, 1 on the CPU)."""
    max_len: int | None = None
    """Tokens per training sample (None: finetune.DEVICE_DEFAULTS; a longer prompt loses its middle)."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gate_max_new_tokens: int = 320
    gate_tolerance: float = 0.02
    """Closeness of the new adapter may be this much lower than the one in use and count as "not worse"."""
    rollback_window: int = 5
    rollback_margin: float = 0.15
    timeout_s: float = 3600.0
    """Wall-clock limit of one training subprocess."""
    memory_gb: float | None = None
    """Memory cap of the training subprocess in GB (RLIMIT_DATA; nas_agent_graph/limits.py). None: no
    cap; the CLI sets its default, limits.default_lora_memory_gb (the fine-tune peaks at ~8.2 GB)."""

    @classmethod
    def from_items(cls, items: list[str]) -> "LoraSettings":
        """From KEY=VALUE strings (the CLI's --lora); a bad item raises ValueError naming it."""
        kinds = {f: type(v) for f, v in asdict(cls()).items()}
        values: dict[str, Any] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if key == "off" and not sep:
                values["enabled"] = False
                continue
            if not sep or key not in kinds:
                raise ValueError(f"--lora {item!r}: expected KEY=VALUE (or 'off') with KEY one of {', '.join(kinds)}")
            if key == "memory_gb":  # a number of GB, 'off', or none (the CLI's default); CapError says why not
                word = raw.strip().lower()  # off: 0, no cap; none: None, the CLI's default
                values[key] = 0.0 if word == "off" else None if word in ("", "none") else \
                    parse_memory_gb(raw, "--lora memory_gb", default=None)
                continue
            try:
                if key == "target_modules":
                    values[key] = tuple(x.strip() for x in raw.split(",") if x.strip())
                elif key in _OPTIONAL_INTS:
                    values[key] = None if raw.lower() in ("", "none") else int(raw)
                elif kinds[key] is bool:
                    if raw.lower() not in ("true", "false", "1", "0", "on", "off"):
                        raise ValueError(raw)
                    values[key] = raw.lower() in ("true", "1", "on")
                else:
                    values[key] = kinds[key](raw)
            except ValueError:
                kind = "int" if key in _OPTIONAL_INTS else kinds[key].__name__
                raise ValueError(f"--lora {item!r}: {raw!r} is not a valid {kind}") from None
        settings = cls(**values)
        if min(settings.trigger, settings.held_out, settings.steps, settings.rollback_window,
               1 if settings.batch_size is None else settings.batch_size) < 1:
            raise ValueError("--lora: trigger, held_out, steps, rollback_window and batch_size must be >= 1 "
                             f"({settings})")
        return settings


# ----------------------------------------------------------------------------- samples

def samples_path(runs_dir: Path) -> Path:
    return Path(runs_dir) / "lora" / "samples.jsonl"


def read_samples(path: Path) -> list[dict]:
    """Every well-formed sample line (a torn last line after a crash is skipped), first occurrence of each key."""
    if not Path(path).exists():
        return []
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(sample, dict) and sample.get("key") not in seen:
                seen.add(sample.get("key"))
                out.append(sample)
    return out


def trainable(sample: dict) -> bool:
    """A sample an LLM can learn from: a chat prompt and a reply (samples of Optuna's runs have no prompt)."""
    return isinstance(sample.get("messages"), list) and bool(sample["messages"]) and isinstance(sample.get("response"), str)


def is_positive(sample: dict, settings: LoraSettings) -> bool:
    reward = sample.get("reward")
    return trainable(sample) and isinstance(reward, (int, float)) and reward >= settings.reward_threshold


# ----------------------------------------------------------------------------- the registry

def registry(state: AgentState) -> dict:
    """agent_state.json meta.lora, created empty when missing."""
    reg = state.meta.setdefault("lora", {})
    reg.setdefault("active", None)
    reg.setdefault("seen_keys", [])
    reg.setdefault("adapters", [])
    reg.setdefault("events", [])
    return reg


def active_adapter(state: AgentState) -> dict | None:
    """The adapter record in use, or None for the base model."""
    reg = state.meta.get("lora") or {}
    version = reg.get("active")
    return next((a for a in reg.get("adapters", []) if a.get("version") == version), None) if version else None


def finetune_due(state: AgentState, runs_dir: Path, settings: LoraSettings) -> bool:
    """Whether `trigger` positive samples exist that no training attempt has seen yet."""
    if not settings.enabled:
        return False
    seen = set((state.meta.get("lora") or {}).get("seen_keys", []))
    fresh = [s for s in read_samples(samples_path(runs_dir)) if is_positive(s, settings) and s["key"] not in seen]
    return len(fresh) >= settings.trigger


def _event(reg: dict, kind: str, version: int | None, reason: str) -> None:
    reg["events"].append({"at": utc_now_iso(), "kind": kind, "version": version, "reason": reason})
    log.info("LoRA %s v%s: %s", kind, version, reason)


# ----------------------------------------------------------------------------- training

def split(samples: list[dict], settings: LoraSettings) -> tuple[list[dict], list[dict]]:
    """(training positives, held-out prompts): the latest `held_out` trainable samples are held out."""
    usable = [s for s in samples if trainable(s)]
    held = usable[-settings.held_out:]
    held_keys = {s["key"] for s in held}
    train = [s for s in usable if is_positive(s, settings) and s["key"] not in held_keys]
    return train, held


def train_adapter(samples: list[dict], out: Path, version: int, settings: LoraSettings, *,
                  base: str | None = None, quant: str | None = None, python: str = sys.executable,
                  env: dict | None = None) -> dict:
    """Train adapter v`version` on `samples` in a subprocess; returns its JSON verdict (never raises)."""
    out = Path(out).resolve()  # the subprocess runs from the project root, not from the study's folder
    job = {"base": base, "quant": quant, "out": str(out), "version": version,
           "samples": [{"key": s["key"], "messages": s["messages"], "response": s["response"]} for s in samples],
           **{k: v for k, v in asdict(settings).items()
              if k in ("steps", "lr", "batch_size", "max_len", "r", "alpha", "dropout")},
           "target_modules": list(settings.target_modules), "seed": version}
    out.parent.mkdir(parents=True, exist_ok=True)
    job_file = out.parent / f"job_v{version}.json"
    job_file.write_text(json.dumps(job))
    child_env = dict(os.environ if env is None else env)
    log_file = out.parent / f"train_v{version}.log"
    # The same caps as a run's: memory (its own default), CPU time, and the OOM killer's first pick.
    caps = Caps(memory_gb=settings.memory_gb, cpu_s=cpu_cap_s(settings.timeout_s, cpu_count()))
    try:
        # Its own session, and SIGTERM when the orchestrator dies: a killed search leaves no
        # training behind to race the resumed one for the same adapter folder.
        with open(log_file, "w") as err:
            proc = run_child([python, "-m", "nas_agent_graph.lora.finetune", str(job_file)],
                             timeout_s=settings.timeout_s, caps=caps, env=child_env, stderr=err)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"training timed out after {settings.timeout_s:g}s (see {log_file})"}
    lines = proc.stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        verdict = {"ok": False, "error": f"training exited with code {proc.returncode} and no verdict; see {log_file}"}
    return _label_memory_cap(verdict, log_file, settings.memory_gb)


def _label_memory_cap(verdict: dict, log_file: Path, memory_gb: float | None) -> dict:
    """A fine-tune that ran out of memory under its cap says so first (meta.lora records the reason)."""

    if verdict.get("ok") or not memory_gb:
        return verdict
    error = str(verdict.get("error"))
    try:
        log_tail = log_file.read_text(encoding="utf-8", errors="replace")[-8000:]
    except OSError:
        log_tail = ""
    if not (ran_out_of_memory(error) or ran_out_of_memory(log_tail)):
        return verdict
    return {**verdict, "error": f"exceeded its memory cap of {memory_gb:g} GB (--lora memory_gb); "
                                f"lower max_len or batch_size, or raise memory_gb: {error[:300]}"}


# ----------------------------------------------------------------------------- the gate

def _norm(entry: dict, value: Any) -> float | None:
    if entry["type"] == "categorical" or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    low, high = float(entry["low"]), float(entry["high"])
    if entry.get("log") and low > 0 and value > 0:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low) if high > low else 0.0


def distance(a: dict, b: dict, space: Any) -> float:
    """Mean per-key distance in [0, 1]: 0/1 for a categorical, normalised |a-b| for a number."""
    total = 0.0
    for key, entry in space.entries.items():
        na, nb = _norm(entry, a.get(key)), _norm(entry, b.get(key))
        total += abs(na - nb) if na is not None and nb is not None else float(a.get(key) != b.get(key))
    return total / max(len(space.entries), 1)


def best_params(state: AgentState, space: Any, k: int = TOP_CONFIGS) -> list[dict]:
    scored = sorted((r for r in state.runs if r.status in SCORED and r.val_mse is not None),
                    key=lambda r: r.val_mse)
    out = []
    for run in scored:
        params = space.from_config(run.config) if run.config else None
        if params is not None:
            out.append(params)
        if len(out) == k:
            break
    return out


def evaluate(chat: Any, adapter: tuple[str, str] | None, prompts: list[list[dict]], space: Any,
             targets: list[dict], max_new_tokens: int) -> dict:
    """Unconstrained greedy replies of the base model (adapter None) or an adapter (name, path)
    to each prompt: validity and closeness to the target configs, each reply's params (None
    when invalid), and how many replies were JSON objects at all (valid or not)."""
    from nas_agent_graph.llm.chat_model import from_dicts  # lazy: transformers, for the gate only

    model = chat.model_copy(update={"adapter": adapter[0] if adapter else None,
                                    "adapter_path": adapter[1] if adapter else None,
                                    "temperature": 0.0, "max_new_tokens": max_new_tokens})
    valid, objects, closeness, replies, proposed = 0, 0, [], [], []
    for messages in prompts:
        reply = model.invoke(from_dicts(messages))
        parsed = reply.additional_kwargs.get("parsed")
        objects += isinstance(parsed, dict)
        score = 0.0
        try:
            params = params_from_json(parsed, space) if parsed is not None else None
        except ValueError:
            params = None
        if params is not None:
            valid += 1
            score = 1.0 - min((distance(params, t, space) for t in targets), default=1.0)
        closeness.append(score)
        replies.append(str(reply.content)[:400])
        proposed.append(params)
    n = max(len(prompts), 1)
    return {"n": len(prompts), "valid": valid, "validity": round(valid / n, 4), "json_objects": objects,
            "closeness": round(sum(closeness) / n, 4), "replies": replies, "params": proposed}


def gate_decision(candidate: dict, incumbent: dict, tolerance: float = 0.02) -> tuple[bool, str]:
    """(promote, why): not worse on validity nor (within `tolerance`) on closeness, and some validity."""
    if candidate["validity"] <= 0:
        return False, f"no valid reply without constraints ({candidate['valid']}/{candidate['n']})"
    if candidate["validity"] < incumbent["validity"]:
        return False, f"validity {candidate['validity']:.2f} < {incumbent['validity']:.2f} of the adapter in use"
    if candidate["closeness"] < incumbent["closeness"] - tolerance:
        return False, (f"closeness to the best configs {candidate['closeness']:.3f} < "
                       f"{incumbent['closeness']:.3f} of the adapter in use")
    return True, (f"validity {candidate['validity']:.2f} (in use: {incumbent['validity']:.2f}), closeness "
                  f"{candidate['closeness']:.3f} (in use: {incumbent['closeness']:.3f})")


def _start_attempt(state: AgentState, runs_dir: Path, settings: LoraSettings) -> tuple[dict, list[dict], int]:
    """(registry, samples, next version) for a training attempt; marks today's positives as seen,
    so the same samples do not trigger again whether the attempt succeeds or fails."""
    reg = registry(state)
    samples = read_samples(samples_path(runs_dir))
    reg["seen_keys"] = sorted({s["key"] for s in samples if is_positive(s, settings)} | set(reg["seen_keys"]))
    return reg, samples, max((a["version"] for a in reg["adapters"]), default=0) + 1


def finetune_and_gate(state: AgentState, runs_dir: Path, settings: LoraSettings, chat: Any, space: Any, *,
                      python: str = sys.executable, env: dict | None = None) -> dict:
    """Train the next adapter on the samples so far, gate it, and update the registry in `state`
    (the caller saves it). Returns the adapter record."""
    reg, samples, version = _start_attempt(state, runs_dir, settings)
    train, held = split(samples, settings)
    out = Path(runs_dir) / "lora" / f"adapter_v{version}"
    record: dict[str, Any] = {"version": version, "path": str(out), "created": utc_now_iso(),
                              "n_train": len(train), "held_out": [s["key"] for s in held],
                              "previous": reg["active"], "promoted_at_run": None, "rollback_checked": False}
    if not train:
        record.update(status="failed", reason="no positive samples outside the held-out set")
        reg["adapters"].append(record)
        _event(reg, "failed", version, record["reason"])
        return record
    verdict = train_adapter(train, out, version, settings, base=chat.model_spec, quant=chat.quant,
                            python=python, env=env)
    record["train"] = {k: v for k, v in verdict.items() if k != "out"}
    if not verdict.get("ok"):
        record.update(status="failed", reason=f"training failed: {verdict.get('error')}")
        reg["adapters"].append(record)
        _event(reg, "failed", version, record["reason"])
        return record
    _, _, info = chat.load()  # after training: the caller may have freed it for the subprocess
    targets = best_params(state, space)
    prompts = [s["messages"] for s in held]
    current = active_adapter(state)
    current_ref = (f"v{current['version']}", current["path"]) if current else None
    incumbent = evaluate(chat, current_ref, prompts, space, targets, settings.gate_max_new_tokens)
    candidate = evaluate(chat, (f"v{version}", str(out)), prompts, space, targets, settings.gate_max_new_tokens)
    promote, why = gate_decision(candidate, incumbent, settings.gate_tolerance)
    record["gate"] = {"candidate": candidate, "in_use": incumbent, "in_use_version": reg["active"],
                      "base_model": info["model"]}
    if promote:
        record.update(status="promoted", reason=why, promoted_at_run=len(state.runs))
        reg["active"] = version
        _event(reg, "promoted", version, why)
    else:
        record.update(status="rejected", reason=why)
        _event(reg, "rejected", version, why)
    reg["adapters"].append(record)
    return record


def record_failed_finetune(state: AgentState, runs_dir: Path, settings: LoraSettings, error: str) -> dict:
    """Record a fine-tune that crashed (e.g. out of memory in the gate) so it is not retried at once."""
    reg, _, version = _start_attempt(state, runs_dir, settings)
    record = {"version": version, "path": str(Path(runs_dir) / "lora" / f"adapter_v{version}"),
              "created": utc_now_iso(), "status": "failed", "reason": error, "previous": reg["active"],
              "promoted_at_run": None, "rollback_checked": False}
    reg["adapters"].append(record)
    _event(reg, "failed", version, error)
    return record


# ----------------------------------------------------------------------------- rollback

def _llm_rewards(state: AgentState, version: int | None) -> list[float]:
    """Rewards of the LLM-proposed runs made with adapter `version` (None: the base model), in order."""
    want = f"v{version}" if version else None
    out = []
    for run in state.runs:
        llm = run.extra.get("proposal", {}).get("llm")
        if isinstance(llm, dict) and llm.get("adapter") == want and isinstance(run.extra.get("reward"), (int, float)):
            out.append(float(run.extra["reward"]))
    return out


def check_rollback(state: AgentState, settings: LoraSettings) -> dict | None:
    """Roll the active adapter back when its first `rollback_window` LLM runs did clearly worse
    than the previous version's last ones; returns the event or None. Each version is judged once."""
    reg = state.meta.get("lora") or {}
    current = active_adapter(state)
    if current is None or current.get("rollback_checked"):
        return None
    mine = _llm_rewards(state, current["version"])
    if len(mine) < settings.rollback_window:
        return None
    before = _llm_rewards(state, current.get("previous"))[-settings.rollback_window:]
    current["rollback_checked"] = True
    if not before:
        return None
    mean_new = sum(mine[:settings.rollback_window]) / settings.rollback_window
    mean_old = sum(before) / len(before)
    current["rollback_check"] = {"mean_reward": round(mean_new, 4), "previous_mean_reward": round(mean_old, 4),
                                 "window": settings.rollback_window, "margin": settings.rollback_margin}
    if mean_new < mean_old - settings.rollback_margin:
        reason = (f"mean reward of its first {settings.rollback_window} runs {mean_new:.3f} < "
                  f"{mean_old:.3f} of v{current.get('previous') or '0 (base)'} - margin {settings.rollback_margin}")
        current["status"] = "rolled_back"
        current["reason"] = reason
        reg["active"] = current.get("previous")
        _event(reg, "rolled_back", current["version"], reason)
        return reg["events"][-1]
    return None


def append_sample(runs_dir: Path, run_id: str, proposal: dict, launch_out: dict, reward: float | None) -> None:
    """Append a finished run's LoRA sample (prompt, response, status, val MSE, reward) to the
    study's samples file, once: a pass re-run after a crash finds its key there."""
    meta = proposal.get("meta", {})
    response = meta.get("response") or json.dumps(proposal["config"], sort_keys=True)
    messages = meta.get("messages")
    key = hashlib.sha256(json.dumps([messages or meta.get("prompt"), response]).encode()).hexdigest()[:16]
    path = samples_path(runs_dir)
    if key in {s.get("key") for s in read_samples(path)}:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, {"key": key, "run_id": run_id, "prompt": meta.get("prompt"), "messages": messages,
                        "response": response, "proposer": proposal["proposer"], "status": launch_out["status"],
                        "val_mse": launch_out["metrics"].get("val_mse"), "reward": reward,
                        "adapter_version": (meta.get("llm") or {}).get("adapter")})
