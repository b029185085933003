"""The study's rules: how a finished run is recorded and whether it is accepted, when the study
stops, and how runs in flight count. Pure functions of the study, the settings and the run's
outcome, so each is tested without the graph (tests/nas_agent_graph/study/)."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from nas_agent.agent_state import AgentState, RunInfo, get_best_run, utc_now_iso
from nas_agent.config import config_hash
from nas_agent.logging_utils import load_history
from nas_agent.run_folder import CONFIG_USED_FILE, SCORED
from nas_agent.run_manager import get_run_dir, ids_in_order
from nas_agent_graph import retention
from nas_agent_graph.context import Context
from nas_agent_graph.launcher import error_headline, read_prune_request
from nas_agent_graph.proposers import llm_validity_text
from nas_agent_graph.study.confirmation import CONFIRM_PROPOSER, noise_floor_text
from nas_agent_graph.study.reward import compute_reward

log = logging.getLogger(__name__)

# What a rejected entry keeps of an LLM proposal's record, for the study's validity rate.
LLM_SUMMARY_KEYS = ("model", "adapter", "valid_first", "repaired", "valid", "constrained", "prompt_tokens",
                    "completion_tokens", "latency_s")

# A pruned run has a val_mse (of its best epoch before it was stopped) but is never accepted;
# it is not a failure either (--max-failures counts failures only).
NOT_FAILED = SCORED + ("pruned",)


def stop_update(state: AgentState, ctx: Context) -> dict[str, Any]:
    """The stop fields of a partial update: {stop_reason, stop_failed}."""
    reason, failed = stop_reason_for(state, ctx)
    return {"stop_reason": reason, "stop_failed": failed}


def stop_reason_for(state: AgentState, ctx: Context) -> tuple[str | None, bool]:
    """(why the study should stop now or None, whether that is a failure). Pure function of
    the study and the settings."""
    runs = state.runs
    if len(runs) >= ctx.max_runs:
        return f"reached --max-runs {ctx.max_runs}", False
    best = get_best_run(state)
    if ctx.target_mse is not None and best is not None and best.val_mse is not None \
            and best.val_mse <= ctx.target_mse:
        return f"reached --target-mse {ctx.target_mse:g} (best val_mse {best.val_mse:.4f}, {best.run_id})", False
    if ctx.patience is not None and runs:
        last_accept = max((i for i, r in enumerate(runs) if r.accepted), default=-1)
        since = len(runs) - 1 - last_accept
        if since >= ctx.patience:
            return f"no improvement in the last {since} runs (--patience {ctx.patience})", False
    used = state.meta.get("time_used_s", 0.0)
    if ctx.time_budget is not None and used >= ctx.time_budget:
        return f"used {used:.0f}s of --time-budget {ctx.time_budget:g}s", False
    # A model too slow to evaluate within the run budget failed for what it is, not because
    # something is broken: it neither counts nor breaks a streak of failures.
    tail = [r for r in runs if not r.extra.get("over_budget")][-ctx.max_failures:]
    if ctx.max_failures and len(tail) == ctx.max_failures and \
            all(r.status not in NOT_FAILED or r.val_mse is None for r in tail):
        errors = "\n".join(f"  {r.run_id}: {r.reason}" for r in tail)
        return (f"the last {ctx.max_failures} runs all failed, so the search stops instead of burning its budget. "
                f"Look at their train.log files; the last errors were:\n{errors}"), True
    # ... unless nearly every proposal is: then the budget does not fit the space.
    slow = runs[-2 * ctx.max_failures:]
    if ctx.max_failures and len(slow) == 2 * ctx.max_failures and all(r.extra.get("over_budget") for r in slow):
        return (f"the last {len(slow)} runs were all too slow to evaluate within the run budget "
                f"(training.time_budget_s), so the search stops: give each run more time (--run-budget) or "
                f"search smaller models (--space); the last was {slow[-1].run_id}: {slow[-1].reason}"), True
    return None, False


def study_view(study: AgentState, in_flight: list[dict] | None) -> AgentState:
    """The study as proposers and the duplicate check see it: recorded runs, then the runs in
    flight as runs with status "running" and no score (never saved). Seeds, run ids, pending
    Optuna trials, the LLM's prompt and planned confirmations all take them into account."""
    if not in_flight:
        return study
    recorded = {r.run_id for r in study.runs}
    extra_runs = []
    for entry in in_flight:
        if entry["run_id"] in recorded:
            continue
        proposal = entry["proposal"]
        extra = {"proposal": record_meta(proposal.get("meta", {})), "incumbent_config": proposal.get("raw_config")}
        if proposal["proposer"] == CONFIRM_PROPOSER:
            extra["confirms"] = proposal["parent_run_id"]
        extra_runs.append(RunInfo(run_id=entry["run_id"], status="running", proposer=proposal["proposer"],
                                  config=proposal["config"], parent_run_id=proposal.get("parent_run_id"),
                                  reason="in flight", extra=extra))
    return dataclasses.replace(study, runs=[*study.runs, *extra_runs])


def can_propose(study: AgentState, in_flight: list[dict] | None, ctx: Context, stop_reason: str | None) -> bool:
    """Room for one more run now: a free slot, --max-runs not used up (in-flight runs count), no stop."""
    n = len(in_flight or [])
    return stop_reason is None and n < ctx.parallel and len(study.runs) + n < ctx.max_runs


def make_record(state: dict, study: AgentState, ctx: Context) -> RunInfo:
    """The record of the pass's finished run (state: the graph state after `wait` and `summarise`):
    its metrics, and whether it is accepted, pending confirmation, or rejected, and why."""
    launch_out, proposal = state["launch"], state["proposal"]
    metrics, status = launch_out["metrics"], launch_out["status"]
    val = metrics.get("val_mse")
    val = val if isinstance(val, (int, float)) and math.isfinite(val) else None
    best = get_best_run(study)
    best_val = best.val_mse if best else None
    run_dir = get_run_dir(state["run_id"], ctx.runs_dir, create=False)
    pruned = read_prune_request(run_dir) if status == "pruned" else None
    confirm_meta = proposal.get("meta", {}) if proposal["proposer"] == CONFIRM_PROPOSER else None
    pending = None
    if status == "pruned":  # never the incumbent: its curve was cut short because it looked worse
        why = pruned["text"] if pruned and pruned.get("text") else error_headline(metrics.get("error"))
        accepted, reason = False, why
    elif confirm_meta is not None:  # a confirmation is a measurement, never a candidate itself
        shown = "n/a" if val is None else f"{val:.6f}"
        accepted, reason = False, (f"confirmation {confirm_meta['index']} of {confirm_meta['confirms']} "
                                   f"(seed {confirm_meta['seed']}): status {status}, val_mse {shown}")
    elif status not in SCORED or val is None:
        accepted, reason = False, f"status {status}: {error_headline(metrics.get('error') or 'no validation MSE')}"
    elif best_val is None:
        accepted, reason = True, f"first successful run: val_mse {val:.6f}"
    elif val < best_val - ctx.min_delta:
        accepted, reason = True, f"val_mse {val:.6f} < best {best_val:.6f} ({best.run_id}) - min_delta {ctx.min_delta:g}"
        if ctx.confirm_seeds > 1 and not proposal.get("meta", {}).get("model_code"):
            accepted = False
            pending = {"status": "pending", "k": ctx.confirm_seeds, "incumbent": best.run_id}
            reason = f"pending confirmation with {ctx.confirm_seeds} seeds: {reason}"
    else:
        accepted, reason = False, f"val_mse {val:.6f} is not below best {best_val:.6f} ({best.run_id}) - min_delta {ctx.min_delta:g}"
    extra = {"proposal": record_meta(proposal.get("meta", {})), "reward": compute_reward(status, val, best_val),
             "n_params": metrics.get("n_params"), "config_hash": config_hash(proposal["config"]),
             "incumbent_before": best.run_id if best else None, "attempts_moved_aside": launch_out.get("attempt", 0),
             "reused": launch_out.get("reused", False), "best_epoch": metrics.get("best_epoch"),
             "epochs_run": metrics.get("epochs_run"), "smoke": smoke_record(state.get("smoke"), metrics),
             "incumbent_config": proposal.get("raw_config"),
             "curve": [h.get("val_mse") for h in load_history(run_dir)["epochs"]],
             "checkpoint": retention.checkpoint_record(run_dir)}
    if pruned is not None:
        extra["pruned"] = pruned
    if metrics.get("over_budget"):
        extra["over_budget"] = True
    if pending is not None:
        extra["confirm"] = pending
    if confirm_meta is not None:
        extra["confirms"] = confirm_meta["confirms"]
    return RunInfo(run_id=state["run_id"], status=status, val_mse=val, val_mae=metrics.get("val_mae"),
                   test_mse=metrics.get("test_mse"), test_mae=metrics.get("test_mae"),
                   history_summary=state.get("summary") or "", accepted=accepted, reason=reason,
                   proposer=proposal["proposer"], config=proposal["config"],
                   parent_run_id=proposal.get("parent_run_id") or (best.run_id if best else None),
                   started_at=utc_now_iso(), duration_s=launch_out.get("duration_s"),
                   error_tail=launch_out.get("error_tail"), extra=extra)


def smoke_record(smoke: dict | None, metrics: dict) -> dict | None:
    """The run record's smoke test: validate's {n_params, seconds}, or train.py's own (in_run)."""
    if smoke and smoke.get("in_run"):
        return {"n_params": metrics.get("n_params"), "seconds": metrics.get("smoke_s"), "in_run": True}
    return smoke


def record_meta(meta: dict) -> dict:
    """A proposal's meta without the prompt text and model code, which live in prompt.txt and
    model.py (a study of 1,000 runs would otherwise carry megabytes of text in agent_state.json)."""
    return {k: v for k, v in meta.items() if k not in ("prompt", "messages", "model_code")}


def consistent_flights(study: AgentState, in_flight: list[dict], ctx: Context) -> list[dict]:
    """The checkpoint's runs in flight that agent_state.json has not recorded (it always wins)."""
    recorded = {r.run_id for r in study.runs}
    kept = [e for e in in_flight if e["run_id"] not in recorded]
    if len(kept) < len(in_flight):
        log.info("%d run(s) in flight at the crash were recorded already", len(in_flight) - len(kept))
    ids = recorded | {e["run_id"] for e in kept}
    if len(ids) < len(recorded) + len(kept) or not ids_in_order(ids):
        # e.g. agent_state.json was restored from a backup: the ids would clash with new runs.
        log.warning("the checkpoint's runs in flight (%s) do not follow the %d runs of %s, which wins; "
                    "they are dropped (their folders are set aside when their ids are used again)",
                    ", ".join(e["run_id"] for e in kept), len(recorded), ctx.state_path)
        return []
    if kept:
        log.info("resuming %d run(s) in flight: %s", len(kept), ", ".join(e["run_id"] for e in kept))
    return kept


def rejection_entry(proposal: dict, attempt: int, run_id: str, message: str) -> dict:
    """agent_state.json's record of an invalid proposal (it is not a run); its key RUN_ID#ATTEMPT
    makes recording it idempotent."""
    entry = {"attempt": attempt, "proposer": proposal["proposer"], "config": proposal["config"],
             "error": message, "at": utc_now_iso(), "key": f"{run_id}#{attempt}", "run_id": run_id}
    if proposal.get("meta", {}).get("archetype"):  # so the warm start moves on to the next one
        entry["archetype"] = proposal["meta"]["archetype"]
    llm = proposal.get("meta", {}).get("llm")
    if llm:  # the LLM's validity counts rejected proposals too
        entry["llm"] = {k: llm.get(k) for k in LLM_SUMMARY_KEYS}
        entry["response"] = proposal["meta"].get("response")
    return entry


def stop_message(study: AgentState, reason: str | None, ctx: Context) -> str:
    """What the search says when it stops: why, the best run and how to re-run it."""
    best = get_best_run(study)
    lines = [f"Search stopped: {reason}.", f"Runs in the study: {len(study.runs)}."]
    if best is None:
        lines.append("No run succeeded yet.")
    else:
        test = "n/a" if best.test_mse is None else f"{best.test_mse:.6f}"
        lines.append(f"Best run: {best.run_id} (val_mse {best.val_mse:.6f}, test_mse {test}, "
                     f"proposer {best.proposer}).")
        lines.append(f"Re-run it: python train.py --config {ctx.runs_dir / best.run_id / CONFIG_USED_FILE} "
                     f"--tag {best.run_id}_rerun")
        lines.append(f"{ctx.config_path} now holds this config.")
    if validity := llm_validity_text(study):
        lines.append(validity + ".")
    if noise := noise_floor_text(study):
        lines.append(noise[0].upper() + noise[1:] + ".")
    return "\n".join(lines)
