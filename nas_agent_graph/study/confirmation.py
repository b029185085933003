"""Acceptance that beats the noise: re-run a winning candidate and the incumbent with more seeds.

With --confirm-seeds K > 1, a run that would be accepted (it beats the incumbent) is recorded
as *pending confirmation* instead (accepted=false, extra.confirm.status = "pending"). The next
runs are its confirmations, built here straight from configs (no proposer call): the candidate
with K-1 other seeds, then the incumbent with K-1 other seeds unless it already has them (once
per incumbent). Each confirmation is a run of its own (proposer "confirm", parent_run_id and
extra.confirms = the run it repeats) and counts towards --max-runs. When the last one is
recorded, `conclude` compares the K values of each side: the candidate is accepted only if its
mean is lower than the incumbent's by more than --min-delta and a one-sided Welch's t-test gives
p < CONFIRM_ALPHA. The statistics (mean, std, values, t, df, p) go into the candidate's
extra.confirm; the incumbent's std over its seeds is the study's noise floor (meta.noise_floor,
set once, from the first incumbent confirmed).

Everything is derived from agent_state.json (`next_confirmation` is a pure function of the
study), so a search killed mid-confirmation resumes with no confirmation lost or repeated.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from nas_agent.agent_state import AgentState, RunInfo, get_best_run, get_run, replace_run
from nas_agent.config import apply_overrides
from nas_agent.run_folder import SCORED

CONFIRM_PROPOSER = "confirm"
CONFIRM_ALPHA = 0.05
SEED_STRIDE = 7919  # confirmation seeds: seed + SEED_STRIDE * j + 101 * (index of the run repeated)


@dataclass(frozen=True)
class ConfirmationPlan:
    """The next confirmation run to launch: the run it repeats, with which seed."""
    target: str
    candidate: str
    seed: int
    index: int  # 1..K-1: which extra seed of the target this is


def pending_candidate(state: AgentState) -> RunInfo | None:
    """The run waiting for its confirmations, or None. With --parallel, a run in flight may beat
    the incumbent while another waits: candidates are then confirmed one at a time, oldest first."""
    for run in state.runs:
        confirm = run.extra.get("confirm") if isinstance(run.extra, dict) else None
        if isinstance(confirm, dict) and confirm.get("status") == "pending":
            return run
    return None


def confirmations_of(state: AgentState, run_id: str) -> list[RunInfo]:
    """The confirmation runs that repeat `run_id`, in launch order (whatever their status)."""
    return [r for r in state.runs if r.proposer == CONFIRM_PROPOSER and r.extra.get("confirms") == run_id]


def _seed_for(state: AgentState, target: RunInfo, j: int) -> int:
    base = int(target.config.get("training", {}).get("seed", 2021))
    index = next(i for i, r in enumerate(state.runs) if r.run_id == target.run_id)
    return (base + SEED_STRIDE * j + 101 * index) % 2**31


def next_confirmation(state: AgentState) -> ConfirmationPlan | None:
    """The next confirmation run the study needs, or None (nothing pending, or all done)."""
    cand = pending_candidate(state)
    if cand is None:
        return None
    k = int(cand.extra["confirm"]["k"])
    for target_id in (cand.run_id, cand.extra["confirm"]["incumbent"]):
        target = get_run(state, target_id)
        done = len(confirmations_of(state, target_id))
        if target is not None and done < k - 1:
            return ConfirmationPlan(target=target_id, candidate=cand.run_id, seed=_seed_for(state, target, done + 1),
                                    index=done + 1)
    return None


def confirmation_config(target: RunInfo, seed: int) -> dict:
    """The raw config of a confirmation: the repeated run's (without --set), another seed."""
    raw = json.loads(json.dumps(target.extra.get("incumbent_config") or target.config))
    raw.setdefault("training", {})["seed"] = seed
    return raw


def _values(state: AgentState, run: RunInfo) -> list[float]:
    runs = [run] + confirmations_of(state, run.run_id)
    return [r.val_mse for r in runs if r.status in SCORED and r.val_mse is not None]


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def welch_one_sided(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t-test of H1: mean(a) < mean(b). Returns (t, degrees of freedom, p)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per side, got {na} and {nb}")
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:  # no spread at all (e.g. a deterministic run): the sign decides
        return (-math.inf if diff < 0 else math.inf if diff > 0 else 0.0), float(na + nb - 2), \
            (0.0 if diff < 0 else 1.0 if diff > 0 else 0.5)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return t, df, student_t_cdf(t, df)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (via the regularised incomplete beta)."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)  # P(T <= -|t|)
    return tail if t < 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        d = 1.0 / d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0) / a


def conclude(state: AgentState, min_delta: float) -> RunInfo | None:
    """Once the pending candidate has all its confirmations, accept or reject it (mutating
    `state`: the candidate's record, best_run_id, meta.noise_floor) and return it; else None."""
    cand = pending_candidate(state)
    if cand is None or next_confirmation(state) is not None:
        return None
    info = dict(cand.extra["confirm"])
    incumbent = get_run(state, info["incumbent"])
    a, b = _values(state, cand), _values(state, incumbent)
    info.update(candidate_stats=_summary(a), incumbent_stats=_summary(b), alpha=CONFIRM_ALPHA)
    if len(a) < 2 or len(b) < 2:
        accepted = False
        reason = (f"not confirmed: too few successful seeds to compare ({len(a)} for {cand.run_id}, {len(b)} for "
                  f"{incumbent.run_id})")
    else:
        t, df, p = welch_one_sided(a, b)
        info.update(t=t if math.isfinite(t) else None, df=df, p=p)
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        sa, sb = statistics.stdev(a), statistics.stdev(b)
        accepted = ma < mb - min_delta and p < CONFIRM_ALPHA
        verdict = "confirmed" if accepted else "not confirmed"
        reason = (f"{verdict}: val_mse {ma:.6f} ± {sa:.6f} over {len(a)} seeds vs {incumbent.run_id} "
                  f"{mb:.6f} ± {sb:.6f} over {len(b)}; Welch one-sided p = {p:.3g} "
                  f"({'<' if p < CONFIRM_ALPHA else '>='} {CONFIRM_ALPHA}), min_delta {min_delta:g}")
        if "noise_floor" not in state.meta:
            state.meta["noise_floor"] = {"run_id": incumbent.run_id, "std": sb, "mean": mb, "n": len(b),
                                         "values": b}
    info["status"] = "accepted" if accepted else "rejected"
    updated = RunInfo(**{**cand.to_dict(), "accepted": accepted, "reason": reason,
                         "extra": {**cand.extra, "confirm": info}})
    replace_run(state, updated)  # an accepted candidate becomes the best (the latest accepted run)
    retarget_pending(state, min_delta)
    return updated


def retarget_pending(state: AgentState, min_delta: float) -> None:
    """The pending candidate is compared with the incumbent of now: when another run became the
    best while it waited (--parallel: a candidate concluded before it, or model code accepted at
    once), it must beat that one instead, and one that no longer does on its own seed is rejected
    at once. A no-op when nothing is pending or the incumbent has not changed."""
    nxt = pending_candidate(state)
    best = get_best_run(state)
    if nxt is None or best is None or best.run_id == nxt.extra["confirm"]["incumbent"]:
        return
    info = {**nxt.extra["confirm"], "incumbent": best.run_id}
    if nxt.val_mse is None or best.val_mse is None or nxt.val_mse >= best.val_mse - min_delta:
        info["status"] = "rejected"
        reason = (f"not confirmed: val_mse {nxt.val_mse} no longer beats the incumbent {best.run_id} "
                  f"({best.val_mse}), accepted while this run waited for its confirmations")
        replace_run(state, RunInfo(**{**nxt.to_dict(), "reason": reason, "extra": {**nxt.extra, "confirm": info}}))
        retarget_pending(state, min_delta)
    else:
        replace_run(state, RunInfo(**{**nxt.to_dict(), "extra": {**nxt.extra, "confirm": info}}))


def noise_floor_text(state: AgentState) -> str | None:
    """'noise floor ± 0.0123 (run_0000, 3 seeds)' when measured, else None."""
    nf = state.meta.get("noise_floor")
    if not isinstance(nf, dict) or nf.get("std") is None:
        return None
    return f"noise floor ±{nf['std']:.4f} val MSE ({nf.get('run_id')}, {nf.get('n')} seeds)"


def confirmation_proposal(study: AgentState, plan: ConfirmationPlan, overrides: list[str]) -> dict[str, Any]:
    """The proposal of a confirmation run: the repeated run's config with another seed, the
    study's --set overrides applied as to any proposal."""
    target = get_run(study, plan.target)
    raw = confirmation_config(target, plan.seed)
    meta = {"confirms": plan.target, "candidate": plan.candidate, "seed": plan.seed, "index": plan.index}
    return {"config": apply_overrides(raw, overrides), "raw_config": raw, "proposer": CONFIRM_PROPOSER,
            "parent_run_id": plan.target, "meta": meta, "error": None}
