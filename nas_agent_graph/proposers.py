"""Proposers: where the next config to train comes from.

Every proposer answers `propose(state, base_config, attempt, feedback) -> Proposal`. The
Optuna proposers ("random", "tpe", "cmaes") keep no state of their own: each call rebuilds
an in-memory Optuna study from agent_state.json's runs (the single source of truth, so there
is no Optuna storage file to drift out of sync), asks it for one trial, and turns the trial's
params into a config with the search space.

Reproducible and resume-safe: the sampler's seed is a function of (seed, number of runs,
attempt) only, so the same state and attempt always give the same proposal; a crash while
proposing re-proposes the same config. `attempt` > 0 (the previous proposal was rejected,
e.g. as a duplicate) changes the seed and so the sample.

CMA-ES keeps its evolving distribution in the trial's system attributes (a pickled optimizer,
hex-encoded, and its generation number). They are stored with the proposal
(`Proposal.meta["optuna"]["system_attrs"]`, kept by the loop in `RunInfo.extra["proposal"]`)
and handed back when the study is rebuilt, so CMA-ES moves on from generation to generation.
Optuna unpickles that optimizer, so agent_state.json must be trusted like code: never load a
state file from someone you do not trust. Only "cma:"-style keys are handed back.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_agent.agent_state import AgentState, RunInfo
from nas_agent.config import config_hash
from nas_agent.run_folder import SCORED
from nas_agent_graph.search_space import SearchSpace

log = logging.getLogger(__name__)

SAMPLERS = ("random", "tpe", "cmaes")
# Run statuses whose val_mse is a real score (a timeout's metrics are from its best epoch).
# TPE samples at random until this many runs have finished: the default 10 would spend half of
# a typical 20-run budget before the model is used at all; 5 still covers the space a little.
TPE_STARTUP_TRIALS = 5
# System attributes of Optuna's CMA-ES family (plain, separable, with margin) worth keeping.
_CMA_ATTR_PREFIXES = ("cma:", "sepcma:", "cmawm:", "x_for_tell")


@dataclass
class Proposal:
    """A config to train, who proposed it, and why (meta is JSON-serialisable)."""
    config: dict                  # full raw config dict (data/model/training), before --set overrides
    proposer: str                 # "baseline" | "random" | "tpe" | "cmaes" | "llm" | "hybrid" | "llm-code"
    parent_run_id: str | None = None
    meta: dict = field(default_factory=dict)  # stored in RunInfo.extra["proposal"]


class ProposalError(ValueError):
    """A proposer could not make a config (e.g. the LLM's reply was unusable even after a repair
    prompt). `meta` is the record of the attempt, kept with the rejection as data."""

    def __init__(self, message: str, meta: dict[str, Any] | None = None):
        super().__init__(message)
        self.meta = meta or {}


class Proposer(Protocol):
    """Anything that proposes configs; `feedback` says why the previous attempt was rejected."""
    name: str

    def propose(self, state: AgentState, base_config: dict, attempt: int,
                feedback: str | None) -> Proposal: ...


# ----------------------------------------------------------------------------- baseline

class BaselineProposer:
    """Proposes the base config unchanged, so every study measures its starting point first."""
    name = "baseline"

    def propose(self, state: AgentState, base_config: dict, attempt: int = 0,
                feedback: str | None = None) -> Proposal:
        return Proposal(config=json.loads(json.dumps(base_config)), proposer=self.name,
                        meta={"attempt": attempt})


# ----------------------------------------------------------------------------- study rebuilding

def sampler_seed(seed: int, n_runs: int, attempt: int) -> int:
    """The sampler's seed: depends on nothing but the search seed, the run count and the attempt."""
    return (seed * 1_000_003 + 1009 * n_runs + attempt) % 2**31


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """A fresh Optuna sampler of one of SAMPLERS."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        # multivariate=True models the parameters jointly (Optuna 5's default for one objective,
        # not experimental); the RUNNING trials of suggest_candidates get Optuna's constant liar.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True)
    if kind == "cmaes":
        # CMA-ES handles only numeric parameters; categorical ones are sampled independently (at
        # random) by design, so the per-parameter warning about it would only be noise.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


def run_value(run: RunInfo) -> float | None:
    """The score a sampler sees: val_mse of a scored run, else None (the trial is a FAIL)."""
    value = run.val_mse
    ok = run.status in SCORED and isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def stored_system_attrs(run: RunInfo) -> dict[str, Any]:
    """The CMA-ES system attributes saved with a run's proposal ({} if none or malformed)."""
    proposal = run.extra.get("proposal") if isinstance(run.extra, dict) else None
    optuna_meta = proposal.get("optuna") if isinstance(proposal, dict) else None
    attrs = optuna_meta.get("system_attrs") if isinstance(optuna_meta, dict) else None
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        log.warning("run %s: extra.proposal.optuna.system_attrs is %s, not an object; ignoring it "
                    "(CMA-ES may restart its distribution)", run.run_id, type(attrs).__name__)
        return {}
    return {k: v for k, v in attrs.items() if isinstance(k, str) and k.startswith(_CMA_ATTR_PREFIXES)}


def trial_for_run(run: RunInfo, space: SearchSpace) -> FrozenTrial | None:
    """A finished Optuna trial for a past run, or None when the space cannot express its config.

    A run without a recorded config is skipped too: validation would fill it with the schema's
    defaults and credit its score to a config that may never have run.
    """
    params = space.from_config(run.config) if run.config else None
    if params is None:
        return None
    value = run_value(run)
    state = TrialState.COMPLETE if value is not None else TrialState.FAIL
    if run.status == "running":
        # A run in flight (--parallel; see study.rules.study_view): a RUNNING trial, so TPE's constant
        # liar steers the next proposal away from it instead of ignoring it like a FAIL.
        state = TrialState.RUNNING
    intermediate = {}
    if isinstance(run.extra, dict) and run.extra.get("over_budget"):
        # Too slow to evaluate within the run budget: a property of the config on this machine.
        # A FAIL is invisible to TPE, which then keeps proposing the same slow region (a quarter
        # of a 90-minute study's runs on a CPU without bf16); a PRUNED trial that got nowhere
        # ranks behind every other trial, so TPE learns to avoid it. (It also counts towards TPE's
        # start-up trials; CMA-ES ignores it, as it ignores pruned runs; random search ignores history.)
        state = TrialState.PRUNED
    if run.status == "pruned":
        # A pruned run is shown as Optuna's PRUNED trial with its learning curve: TPE ranks it
        # behind every complete trial (by how far it got, then its last value), so it counts as
        # a bad region without its truncated val_mse being compared with full runs as an equal.
        state = TrialState.PRUNED
        curve = run.extra.get("curve") if isinstance(run.extra, dict) else None
        intermediate = {i + 1: float(v) for i, v in enumerate(curve or [])
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return optuna.trial.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None, params=params,
        distributions=space.distributions(params), intermediate_values=intermediate,
        user_attrs={"run_id": run.run_id}, system_attrs=stored_system_attrs(run))


def _plain(value: Any) -> Any:
    """numpy scalars (which some samplers return) as plain Python values."""
    return value.item() if hasattr(value, "item") else value


def _json_attrs(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    """The JSON-serialisable part of a trial's system attributes, as plain JSON values."""
    out = {}
    for key, value in attrs.items():
        try:
            out[key] = json.loads(json.dumps(_plain(value)))
        except (TypeError, ValueError):
            log.warning("%s: system attribute %r (%s) is not JSON-serialisable and is not stored; "
                        "the sampler may lose state across runs", where, key, type(value).__name__)
    return out


# ----------------------------------------------------------------------------- the Optuna proposer

class OptunaProposer:
    """Random search, TPE or CMA-ES over a SearchSpace, rebuilt from the state on every call."""

    def __init__(self, sampler: str, space: SearchSpace, seed: int):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.name = sampler
        self.space = space
        self.seed = seed

    def build_study(self, state: AgentState, attempt: int = 0) -> optuna.Study:
        """An in-memory study holding every representable past run, with this call's seeded sampler."""
        seed = sampler_seed(self.seed, len(state.runs), attempt)
        study = optuna.create_study(direction="minimize", sampler=make_sampler(self.name, seed))
        skipped = []
        for run in state.runs:
            trial = trial_for_run(run, self.space)
            if trial is None:
                skipped.append(run.run_id)
                continue
            study.add_trial(trial)
        if skipped:
            log.debug("%s: %d run(s) outside the search space are not shown to the sampler: %s",
                      self.name, len(skipped), ", ".join(skipped))
        study.set_user_attr("sampler_seed", seed)
        study.set_user_attr("skipped_runs", skipped)
        return study

    def _ask(self, study: optuna.Study, base_config: dict, attempt: int) -> Proposal:
        """Ask one trial and turn it into a Proposal (the trial stays RUNNING in the study)."""
        trial = study.ask()
        # Define-by-run: a conditional key (patch_len, say) is only suggested where it exists.
        params = {k: _plain(v) for k, v in self.space.sample(trial, base_config).items()}
        config = self.space.to_config(params, base_config)
        frozen = study.get_trials(deepcopy=False)[trial.number]
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        meta = {
            "attempt": attempt,
            "optuna": {
                "sampler": self.name,
                "sampler_seed": study.user_attrs["sampler_seed"],
                "trial_number": trial.number,
                "params": params,
                "system_attrs": _json_attrs(frozen.system_attrs, f"{self.name} trial {trial.number}"),
                "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
                "n_failed": sum(t.state == TrialState.FAIL for t in trials),
                # pruned runs and runs too slow for the budget (see trial_for_run)
                "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
                # runs in flight, without the trial asked just now
                "n_running": sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)) - 1,
                "skipped_runs": list(study.user_attrs["skipped_runs"]),
            },
        }
        return Proposal(config=config, proposer=self.name, meta=meta)

    def propose(self, state: AgentState, base_config: dict, attempt: int = 0,
                feedback: str | None = None) -> Proposal:
        """One proposal; `feedback` is for LLM proposers and ignored here."""
        proposal = self._ask(self.build_study(state, attempt), base_config, attempt)
        log.debug("%s proposes %s", self.name, json.dumps(proposal.meta["optuna"]["params"]))
        return proposal

    def suggest_candidates(self, state: AgentState, base_config: dict, n: int,
                           attempt: int = 0) -> list[Proposal]:
        """Up to `n` distinct proposals from one rebuilt study, asked in a row.

        The asked trials stay RUNNING, so TPE's constant liar steers later asks away from earlier
        ones; random search and CMA-ES draw independent samples. Configs equal to one another or
        to a past run are skipped; if the space runs dry after 10*n asks, fewer are returned.
        """
        if n < 1:
            raise ValueError(f"suggest_candidates: n must be >= 1, got {n}")
        study = self.build_study(state, attempt)
        seen = {_hash_or_none(run.config) for run in state.runs} - {None}
        out: list[Proposal] = []
        for _ in range(10 * n):
            proposal = self._ask(study, base_config, attempt)
            key = config_hash(proposal.config)
            if key not in seen:
                seen.add(key)
                out.append(proposal)
                if len(out) == n:
                    break
        if len(out) < n:
            log.warning("%s: only %d distinct new candidates out of %d asked for after %d tries; "
                        "the search space may be nearly exhausted", self.name, len(out), n, 10 * n)
        return out


def _hash_or_none(config: dict) -> str | None:
    """config_hash, or None for a config that no longer validates (it cannot be a duplicate)."""
    try:
        return config_hash(config)
    except ValueError:
        return None


def make_proposer(name: str, space: SearchSpace, seed: int) -> OptunaProposer:
    """The Optuna proposer called `name` ("random", "tpe" or "cmaes")."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown proposer {name!r}; choose one of {', '.join(SAMPLERS)} "
                         "(the baseline run is proposed by BaselineProposer)")
    return OptunaProposer(name, space, seed)


# ----------------------------------------------------------------------------- study statistics

def llm_records(state: AgentState) -> list[dict]:
    """The LLM's record of every proposal in the study: runs' extra.proposal.llm and rejected entries' llm."""
    records = [r.extra.get("proposal", {}).get("llm") for r in state.runs] + [e.get("llm") for e in state.rejected]
    return [r for r in records if isinstance(r, dict)]


def llm_validity(state: AgentState) -> dict[str, Any] | None:
    """LLM validity over the study: proposals that ran and proposals rejected, from their records.

    valid_first: the first reply made a config; valid: it did after at most one repair prompt.
    None when no LLM proposal was made.
    """
    records = [r for r in llm_records(state) if "valid" in r]
    if not records:
        return None
    n = len(records)
    first = sum(1 for r in records if r.get("valid_first"))
    valid = sum(1 for r in records if r.get("valid"))
    return {"proposals": n, "valid_first": first, "valid": valid, "valid_first_rate": round(first / n, 4),
            "valid_rate": round(valid / n, 4),
            "constrained": sum(1 for r in records if r.get("constrained"))}


def llm_validity_text(state: AgentState) -> str | None:
    """One line about the LLM's validity over the study, or None when it made no proposal."""
    stats = llm_validity(state)
    if stats is None:
        return None
    return (f"LLM proposals: {stats['proposals']}, valid at the first reply {stats['valid_first_rate']:.0%}, "
            f"valid after at most one repair {stats['valid_rate']:.0%}, constrained decoding "
            f"{stats['constrained']}/{stats['proposals']}")


def route_optuna_logging() -> None:
    """Send Optuna's log records through the standard `logging` tree instead of its own stderr
    handler, so the CLI's logging setup governs them (every rebuilt study otherwise prints
    "A new study created in memory" at INFO). Call once from the CLI, not at import."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    # Every proposal rebuilds an in-memory study, and each says so at INFO: keep warnings only.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
