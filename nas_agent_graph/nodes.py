"""Graph nodes. Each is one function from the state (plus the run context) to a partial update.

Nodes read the study from agent_state.json whenever they need it: the file is the
single source of truth, the graph state only carries the proposal in flight. Every
node is safe to re-run after a crash (the checkpointer resumes at the interrupted
node): proposals are deterministic for a given study, `launch` reuses a finished run
folder, and `decide`, `validate` and `reject_run` do not record the same run or rejection twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from langgraph.runtime import Runtime

from nas_agent.atomic import append_jsonl, atomic_write_json, atomic_write_text
from nas_agent.agent_state import (
    AgentState,
    RunInfo,
    add_run,
    get_best_run,
    get_run,
    load_agent_state,
    save_agent_state,
    utc_now_iso,
)
from nas_agent.config import (ConfigError, apply_overrides, config_hash, load_config, parse_config_source,
                              render_config, write_config)
from nas_agent.legacy import style_of
from nas_agent.history_summary import build_history_summary
from nas_agent.logging_utils import load_history
from nas_agent.run_folder import CONFIG_FILE, MODEL_FILE, SCORED
from nas_agent.run_manager import get_run_dir, ids_in_order, run_id_for
from nas_agent_graph.confirmation import (
    CONFIRM_PROPOSER,
    conclude,
    confirmation_config,
    next_confirmation,
    noise_floor_text,
    retarget_pending,
)
from nas_agent_graph.context import Context
from nas_agent_graph.paths import PROJECT_MODEL
from nas_agent_graph.launcher import (
    error_headline,
    is_finished,
    move_aside,
    read_prune_request,
    request_prune,
)
from nas_agent_graph.disk import check_room_for_run
from nas_agent_graph.limits import ran_out_of_memory, run_caps, smoke_caps
from nas_agent_graph.phases import phase_log
from nas_agent_graph.pool import RunPool, RunSpec
from nas_agent_graph.pruning import past_curves, prune_decision
from nas_agent_graph.lora.adapters import (
    active_adapter,
    LoraSettings,
    check_rollback,
    finetune_and_gate,
    finetune_due,
    read_samples,
    record_failed_finetune,
    samples_path,
)
from nas_agent_graph import optuna_mirror, retention
from nas_agent_graph.archetypes import PROPOSER as ARCHETYPE
from nas_agent_graph.proposers import BaselineProposer, ProposalError, llm_validity_text
from nas_agent_graph.reward import compute_reward
from nas_agent_graph.search_space import SpaceError
from nas_agent_graph.state import GraphState, fresh_pass
from nas_agent_graph.validation import Verdict, check_proposal
from nas_agent_graph.llm.backend import clear_model_cache

log = logging.getLogger(__name__)

# A pruned run has a val_mse (of its best epoch before it was stopped) but is never accepted;
# it is not a failure either (--max-failures counts failures only).
NOT_FAILED = SCORED + ("pruned",)
# What a rejected entry keeps of an LLM proposal's record, for the study's validity rate.
LLM_SUMMARY_KEYS = ("model", "adapter", "valid_first", "repaired", "valid", "constrained", "prompt_tokens",
                    "completion_tokens", "latency_s")


# --------------------------------------------------------------------------- helpers

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
    tail = runs[-ctx.max_failures:]
    if ctx.max_failures and len(tail) == ctx.max_failures and \
            all(r.status not in NOT_FAILED or r.val_mse is None for r in tail):
        errors = "\n".join(f"  {r.run_id}: {r.reason}" for r in tail)
        return (f"the last {ctx.max_failures} runs all failed, so the search stops instead of burning its budget. "
                f"Look at their train.log files; the last errors were:\n{errors}"), True
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
        extra = {"proposal": _record_meta(proposal.get("meta", {})), "incumbent_config": proposal.get("raw_config")}
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


def get_pool(ctx: Context) -> RunPool:
    """The session's pool of runs in flight, made on first use (the CLI may also set ctx.pool)."""
    if ctx.pool is None:
        ctx.pool = RunPool(ctx.parallel, ctx.launcher, env=ctx.env, ray_options=ctx.ray_options,
                           ray_local=ctx.ray_address is None,
                           launch_kwargs=dict(python=ctx.python, train_script=ctx.train_script,
                                              runs_dir=ctx.runs_dir, timeout_s=ctx.run_timeout,
                                              caps=run_caps(ctx.run_memory_gb, ctx.run_timeout)))
    return ctx.pool


def _save(study: AgentState, ctx: Context, node: str) -> None:
    """save_agent_state, timed as phase NODE/save_state (runs/phases.jsonl)."""
    with phase_log(ctx).span(f"{node}/save_state"):
        save_agent_state(study, ctx.state_path)


def _mirror(study: AgentState, ctx: Context, node: str) -> None:
    """runs/optuna.db for optuna-dashboard (nas_agent_graph/optuna_mirror.py); never stops the search."""
    if not ctx.optuna_mirror:
        return
    try:
        if ctx.mirror is None:  # kept for the session: it remembers what it wrote (see optuna_mirror.Mirror)
            ctx.mirror = optuna_mirror.Mirror(ctx.runs_dir, ctx.state_path, ctx.space)
        with phase_log(ctx).span(f"{node}/mirror"):
            done = ctx.mirror.sync(study)
        log.debug("runs/optuna.db: %s", done)
    except Exception as e:  # noqa: BLE001 - a derived view; agent_state.json already holds everything
        log.warning("%s not updated (%s); the next run tries again, or run export-optuna",
                    optuna_mirror.db_path(ctx.runs_dir), e)


def _tick_time(state: AgentState, ctx: Context) -> None:
    """Add this session's wall-clock time since the last tick to the study's total."""
    now = time.monotonic()
    last = ctx.started_at if ctx.started_at else now
    state.meta["time_used_s"] = state.meta.get("time_used_s", 0.0) + (now - last)
    ctx.started_at = now


def sync_incumbent(state: AgentState, ctx: Context) -> None:
    """Make config.py agree with the study's best run (it is derived from agent_state.json).

    config.py gets the best proposal without this study's --set overrides (a quick search's
    max_epochs=3 is a property of the search, not of the config it found). The previous
    incumbent is kept under runs/incumbents/ before it is replaced. The file keeps its key
    spelling: one in the original nas_system's format is rewritten in that format.
    """
    best = get_best_run(state)
    if best is None:
        return
    incumbent = best.extra.get("incumbent_config") or best.config
    want = config_hash(incumbent)
    style: frozenset[str] = frozenset()
    if ctx.config_path.exists():
        try:
            current = parse_config_source(ctx.config_path.read_text(), str(ctx.config_path))
            style = style_of(current)
            if config_hash(current) == want:
                return
        except ValueError:
            pass  # unreadable or invalid: replace it, but keep a copy
        keep = ctx.runs_dir / "incumbents" / f"config_before_{best.run_id}.py"
        keep.parent.mkdir(parents=True, exist_ok=True)
        if not keep.exists():
            shutil.copy2(ctx.config_path, keep)
    header = (f"Incumbent: {best.run_id}, val_mse {best.val_mse:.6f}, written by nas_agent_graph.\n"
              f"Earlier incumbents are kept in {ctx.runs_dir / 'incumbents'}/.")
    write_config(_without_channels(incumbent), ctx.config_path, header=header, style=style)
    log.info("config.py now holds the incumbent %s", best.run_id)


def sync_model(state: AgentState, ctx: Context) -> None:
    """When the best run trained its own model code, make it the incumbent model file.

    The previous model file is kept under runs/incumbents/ before it is replaced.
    """
    best = get_best_run(state)
    if best is None or not best.extra.get("proposal", {}).get("code_sha256"):
        return
    source = get_run_dir(best.run_id, ctx.runs_dir, create=False) / MODEL_FILE
    if not source.is_file():
        log.warning("%s is the best run but its model.py is missing; %s is left as it is", best.run_id, ctx.model_path)
        return
    code = source.read_text(encoding="utf-8")
    if ctx.model_path.is_file():
        if ctx.model_path.read_text(encoding="utf-8") == code:
            return
        keep = ctx.runs_dir / "incumbents" / f"model_before_{best.run_id}.py"
        keep.parent.mkdir(parents=True, exist_ok=True)
        if not keep.exists():
            shutil.copy2(ctx.model_path, keep)
    atomic_write_text(ctx.model_path, code)
    log.info("%s now holds the model code of %s", ctx.model_path, best.run_id)


def _without_channels(config: dict) -> dict:
    """A config without the data-derived channel counts, so it runs on any data set."""
    out = json.loads(json.dumps(config))
    for k in ("enc_in", "dec_in", "c_out"):
        out.get("model", {}).pop(k, None)
    return out


def _test_pause(node: str, run_id: str, ctx: Context) -> None:
    """Crash-test hook: NAS_AGENT_TEST_PAUSE="propose:run_0001:30" makes that node touch
    runs/.paused_in_propose and sleep 30 s, so a test can SIGKILL the orchestrator there."""
    spec = os.environ.get("NAS_AGENT_TEST_PAUSE", "")
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == node and parts[1] == run_id:
        (ctx.runs_dir / f".paused_in_{node}").touch()
        time.sleep(float(parts[2]))


def _display(ctx: Context, event: str, **kw) -> None:
    if ctx.display is not None:
        getattr(ctx.display, event)(**kw)


# --------------------------------------------------------------------------- nodes

def load_state(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Open (or start) the study, bring config.py in line with it, and check the stop rules."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    if "created_at" not in study.meta:
        base = load_config(ctx.config_path)  # the starting point, validated
        study.meta.update(created_at=utc_now_iso(), seed=ctx.seed, proposer=ctx.proposer,
                          base_config=_without_channels(base.model_dump()), config_path=str(ctx.config_path))
    study.max_runs = ctx.max_runs
    study.meta["space_path"] = str(ctx.space_path) if ctx.space_path else None  # for export-optuna
    _save(study, ctx, "load_state")
    sync_incumbent(study, ctx)
    sync_model(study, ctx)
    _display(ctx, "on_study", state=study)
    in_flight = _consistent_flights(study, state.get("in_flight") or [], ctx)
    _resubmit(in_flight, ctx)
    stop = stop_update(study, ctx)
    return {**fresh_pass(), **stop, "message": None, "finetune_due": _finetune_due(study, ctx),
            "in_flight": in_flight, "can_propose": can_propose(study, in_flight, ctx, stop["stop_reason"])}


def _consistent_flights(study: AgentState, in_flight: list[dict], ctx: Context) -> list[dict]:
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


def _resubmit(in_flight: list[dict], ctx: Context) -> None:
    """Put runs in flight that this session has not started (a resume) back into the pool;
    launch_run reuses a folder that finished meanwhile and reruns one that did not."""
    pool = get_pool(ctx)
    for entry in in_flight:
        if entry["run_id"] not in pool:
            pool.submit(_run_spec(entry["run_id"], entry["proposal"], ctx, entry.get("smoke")))


def propose(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ask the proposer for a config; the first run of a study is the base config itself."""
    ctx = runtime.context
    in_flight = state.get("in_flight") or []
    _resubmit(in_flight, ctx)
    study = study_view(load_agent_state(ctx.state_path), in_flight)
    run_id = state.get("run_id") or run_id_for(len(study.runs))
    earlier = sum(1 for r in study.rejected if r.get("run_id") == run_id)
    attempt = max(state.get("attempt", 0), earlier)
    plan = next_confirmation(study)
    if plan is not None:  # a pending candidate's confirmations come first, straight from configs
        return {"run_id": run_id, "attempt": attempt, "proposal": _confirmation_proposal(study, plan, run_id, ctx),
                "validation_error": None}
    proposer = _proposer_for(study, attempt, ctx)
    _test_pause("propose", run_id, ctx)
    _display(ctx, "on_propose", run_id=run_id, proposer=proposer.name, attempt=attempt)
    if hasattr(proposer, "use_adapter"):  # an LLM proposer: the study's promoted LoRA adapter, or none
        proposer.use_adapter(active_adapter(study))
    try:
        proposal = proposer.propose(study, study.meta["base_config"], attempt, state.get("feedback"))
        out = {**dataclasses.asdict(proposal), "raw_config": proposal.config, "error": None,
               "config": apply_overrides(proposal.config, ctx.overrides)}
    except (SpaceError, ConfigError, ProposalError) as e:  # no config could be built: an invalid proposal, with feedback
        out = {"config": None, "raw_config": None, "proposer": proposer.name, "parent_run_id": None,
               "meta": getattr(e, "meta", {}), "error": str(e)}
    return {"run_id": run_id, "attempt": attempt, "proposal": out, "validation_error": None}


def _proposer_for(study: AgentState, attempt: int, ctx: Context):
    """The baseline first, then each warm-start archetype once, then the search's proposer."""
    if not study.runs and attempt == 0:
        return BaselineProposer()
    if ctx.archetype_obj is not None and ctx.archetype_obj.pending(study):
        return ctx.archetype_obj
    return ctx.proposer_obj


def _confirmation_proposal(study: AgentState, plan, run_id: str, ctx: Context) -> dict[str, Any]:
    """The proposal of a confirmation run: the repeated run's config with another seed."""
    target = get_run(study, plan.target)
    raw = confirmation_config(target, plan.seed)
    meta = {"confirms": plan.target, "candidate": plan.candidate, "seed": plan.seed, "index": plan.index}
    _display(ctx, "on_propose", run_id=run_id, proposer=CONFIRM_PROPOSER, attempt=0)
    return {"config": apply_overrides(raw, ctx.overrides), "raw_config": raw, "proposer": CONFIRM_PROPOSER,
            "parent_run_id": plan.target, "meta": meta, "error": None}


def validate(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Schema, duplicate check, smoke test and parameter budget; invalid goes back to propose."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    proposal = state["proposal"]
    view = study_view(study, state.get("in_flight"))  # a run in flight counts as a duplicate too
    code = proposal.get("meta", {}).get("model_code")
    if proposal["config"] is None:
        verdict = Verdict(False, [f"the {proposal['proposer']} proposer could not build a config: {proposal['error']}"])
    elif code is not None:
        verdict = _check_code_proposal(proposal, code, view, state, ctx)
    elif smoke_in_run(proposal, ctx):  # schema and duplicates here; smoke test and --max-params in train.py
        dup_study = None if proposal["proposer"] == CONFIRM_PROPOSER else view
        verdict = check_proposal(proposal["config"], dup_study, python=ctx.python, smoke_timeout=ctx.smoke_timeout,
                                 smoke=False)
        if verdict.ok:
            return {"validation_error": None, "smoke": {"in_run": True},
                    "proposal": {**proposal, "config": verdict.config}}
    else:
        # A confirmation repeats a run with another seed on purpose: no duplicate check.
        dup_study = None if proposal["proposer"] == CONFIRM_PROPOSER else view
        with phase_log(ctx).span("validate/smoke"):  # with the (millisecond) schema and duplicate checks
            verdict = check_proposal(proposal["config"], dup_study, python=ctx.python,
                                     smoke_timeout=ctx.smoke_timeout, max_params=ctx.max_params, env=ctx.env,
                                     model_file=_model_file(ctx), caps=smoke_caps(ctx.run_memory_gb, ctx.smoke_timeout))
    if verdict.ok:
        return {"validation_error": None, "smoke": {"n_params": verdict.n_params, "seconds": verdict.smoke_seconds},
                "proposal": {**proposal, "config": verdict.config}}
    return _reject(state, study, verdict.message, ctx, "validate")


def smoke_in_run(proposal: dict, ctx: Context) -> bool:
    """Whether the proposal's smoke test and --max-params check run inside its own train.py, before
    training (train.py --smoke-test), instead of in a subprocess of `validate`: a config proposal
    (no model code) for the project's own model file (--allow-code off), one run at a time on the
    local launcher. An invalid model then ends the run "invalid" and `reject_run` records it as a
    rejected proposal; run ids stay in order because no other run is in flight to take the next id.
    Model code written by the LLM is always checked first (AST allowlist, capped subprocess)."""
    return (ctx.smoke_in_run and ctx.parallel == 1 and ctx.launcher == "local" and not ctx.allow_code
            and _model_file(ctx) is None and proposal.get("meta", {}).get("model_code") is None)


def _reject(state: GraphState, study: AgentState, message: str, ctx: Context, node: str) -> dict[str, Any]:
    """Record an invalid proposal in agent_state.json's rejected list (it is not a run) and send it
    back to `propose` with the error as feedback; stop after --max-retries in a row."""
    proposal = state["proposal"]
    attempt = state.get("attempt", 0)
    key = f"{state['run_id']}#{attempt}"
    if not any(r.get("key") == key for r in study.rejected):  # idempotent on re-run after a crash
        entry = {"attempt": attempt, "proposer": proposal["proposer"], "config": proposal["config"],
                 "error": message, "at": utc_now_iso(), "key": key, "run_id": state["run_id"]}
        if proposal.get("meta", {}).get("archetype"):  # so the warm start moves on to the next one
            entry["archetype"] = proposal["meta"]["archetype"]
        llm = proposal.get("meta", {}).get("llm")
        if llm:  # the LLM's validity counts rejected proposals too
            entry["llm"] = {k: llm.get(k) for k in LLM_SUMMARY_KEYS}
            entry["response"] = proposal["meta"].get("response")
        study.rejected.append(entry)
        _save(study, ctx, node)
    _display(ctx, "on_rejected", run_id=state["run_id"], error=message)
    # A warm-start config that does not fit this study (a duplicate, over --max-params) is skipped;
    # it says nothing about the proposer, so it does not count towards --max-retries.
    tries = state.get("tries", 0) + (proposal["proposer"] != ARCHETYPE)
    update: dict[str, Any] = {"validation_error": message, "feedback": message, "attempt": attempt + 1, "tries": tries}
    if tries > ctx.max_retries:
        update["stop_failed"] = True
        update["stop_reason"] = (f"the {proposal['proposer']} proposer gave {tries} invalid proposals in a "
                                 f"row for {state['run_id']} (--max-retries {ctx.max_retries}); last error: "
                                 f"{message}")
    return update


def _model_file(ctx: Context) -> Path | None:
    """The model file runs use: None for the project's own model.py (train.py's default)."""
    return None if ctx.model_path.resolve() == PROJECT_MODEL.resolve() else ctx.model_path


def _check_code_proposal(proposal: dict, code: str, study: AgentState, state: GraphState, ctx: Context) -> Verdict:
    """A model-code proposal: not a duplicate of earlier code, then the AST allowlist and the smoke
    test on the file (check_proposal with model_file); the config itself may repeat the incumbent's."""
    digest = hashlib.sha256(code.encode()).hexdigest()
    for run in study.runs:
        if run.extra.get("proposal", {}).get("code_sha256") == digest:
            return Verdict(False, [f"duplicate: the same model code already ran as {run.run_id}"])
    folder = ctx.runs_dir / ".proposals" / f"{state['run_id']}_a{state.get('attempt', 0)}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MODEL_FILE, code)
    return check_proposal(proposal["config"], None, python=ctx.python, smoke_timeout=ctx.smoke_timeout,
                          max_params=ctx.max_params, env=ctx.env, model_file=folder / MODEL_FILE,
                          caps=smoke_caps(ctx.run_memory_gb, ctx.smoke_timeout))


def launch(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Start train.py for the proposal (in the pool, without waiting) and add it to the runs in flight."""
    ctx = runtime.context
    run_id, proposal = state["run_id"], state["proposal"]
    in_flight = state.get("in_flight") or []
    _resubmit(in_flight, ctx)
    if ctx.free_llm and ctx.parallel == 1:  # with --parallel, in `wait` (not before every proposal)
        _free_llm()
    spec = _run_spec(run_id, proposal, ctx, state.get("smoke"))
    # else stop before starting; an in-run smoke test checks again once train.py knows the parameter count
    check_room_for_run(spec.run_dir, (state.get("smoke") or {}).get("n_params"))
    _set_aside_stale_folder(spec.run_dir, spec.config_text)
    _display(ctx, "on_launch", run_id=run_id, config=proposal["config"])
    get_pool(ctx).submit(spec)
    entry = {"run_id": run_id, "attempt": state.get("attempt", 0), "tries": state.get("tries", 0), "proposal": proposal,
             "smoke": state.get("smoke")}
    in_flight = [*in_flight, entry]
    study = load_agent_state(ctx.state_path)
    _mirror(study_view(study, in_flight), ctx, "launch")
    return {**fresh_pass(), "in_flight": in_flight,
            "can_propose": can_propose(study, in_flight, ctx, state.get("stop_reason"))}


def _run_spec(run_id: str, proposal: dict, ctx: Context, smoke: dict | None) -> RunSpec:
    """What the pool needs to run a proposal: the config text, a proposed model file, train.py's --model,
    and --smoke-test when `validate` left the smoke test to the run (smoke {"in_run": true})."""
    run_dir = get_run_dir(run_id, ctx.runs_dir, create=False)
    config_text = render_config(proposal["config"], header=f"{run_id}: proposed by {proposal['proposer']}")
    code = proposal.get("meta", {}).get("model_code")
    files, extra_args = {}, []
    if code is not None:  # a model-code proposal trains its own file, kept in the run folder
        files[MODEL_FILE] = code
        extra_args = ["--model", str(run_dir / MODEL_FILE)]
    elif ctx.allow_code and ctx.model_path.is_file():
        # model.py may be replaced by an accepted code proposal while this run waits or starts
        # (--parallel), or live on another node (Ray): the run trains a copy taken now.
        files[MODEL_FILE] = ctx.model_path.read_text(encoding="utf-8")
        extra_args = ["--model", str(run_dir / MODEL_FILE)]
    elif (model_file := _model_file(ctx)) is not None:
        extra_args = ["--model", str(model_file)]
    if (smoke or {}).get("in_run"):
        extra_args += ["--smoke-test", "--smoke-timeout", f"{ctx.smoke_timeout:g}"]
        if ctx.max_params is not None:
            extra_args += ["--max-params", str(ctx.max_params)]
    return RunSpec(run_id=run_id, run_dir=run_dir, config_text=config_text, extra_args=extra_args, files=files,
                   on_progress=_pruning_watch(run_dir, run_id, ctx))


def wait(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Block until a run in flight ends (the lowest run id first when several have), and make it
    the pass's run: summarise, decide and collect_lora then record it."""
    ctx = runtime.context
    in_flight = state.get("in_flight") or []
    _resubmit(in_flight, ctx)
    if ctx.free_llm and ctx.parallel > 1:  # every slot is busy: give the runs the LLM's memory
        _free_llm()
    run_id, result = get_pool(ctx).wait_any()
    entry = next(e for e in in_flight if e["run_id"] == run_id)
    # Written after the run: launch_run moves the files of an unfinished folder aside first.
    write_trace(get_run_dir(run_id, ctx.runs_dir, create=False), entry["proposal"])
    out = dataclasses.asdict(result)
    out.pop("history", None)  # read from disk by summarise; keeps checkpoints small
    return {"run_id": run_id, "attempt": entry.get("attempt", 0), "tries": entry.get("tries", 0),
            "proposal": entry["proposal"], "smoke": entry.get("smoke"), "launch": out,
            "in_flight": [e for e in in_flight if e["run_id"] != run_id]}


def _pruning_watch(run_dir: Path, run_id: str, ctx: Context):
    """launch_run's on_progress: show the epoch, and with --prune ask the pruner whether the run
    should stop (it then gets a PRUNE request; see train.py). The earlier runs' curves are read once."""
    past = past_curves(load_agent_state(ctx.state_path), ctx.runs_dir) if ctx.prune != "none" else []
    asked = []

    def on_progress(history: list[dict]) -> None:  # runs in the run's thread (nas_agent_graph.pool)
        if ctx.prune != "none" and not asked:
            decision = prune_decision(ctx.prune, past, [h.get("val_mse") for h in history],
                                      warmup_epochs=ctx.prune_warmup_epochs, min_runs=ctx.prune_min_runs)
            if decision is not None:
                asked.append(decision)
                request_prune(run_dir, decision.text(), decision.to_dict())
                log.info("%s: %s", run_id, decision.text())
        _display(ctx, "on_epoch", run_id=run_id, history=history)

    return on_progress


def _free_llm() -> None:
    """Give the LLM's memory back before a run that needs it (reloaded on the next proposal)."""
    import gc

    clear_model_cache()
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def write_trace(run_dir: Path, proposal: dict) -> None:
    """proposal.json, and for LLM proposals prompt.txt, response.txt and llm.json, next to the run."""
    meta = proposal.get("meta", {})
    atomic_write_json(run_dir / "proposal.json", {**proposal, "meta": _record_meta(meta)})
    if meta.get("llm"):
        atomic_write_text(run_dir / "prompt.txt", meta.get("prompt") or "")
        atomic_write_text(run_dir / "response.txt", (meta.get("response") or "") + "\n")
        atomic_write_json(run_dir / "llm.json", meta["llm"])


def _record_meta(meta: dict) -> dict:
    """A proposal's meta without the prompt text and model code, which live in prompt.txt and
    model.py (a study of 1,000 runs would otherwise carry megabytes of text in agent_state.json)."""
    return {k: v for k, v in meta.items() if k not in ("prompt", "messages", "model_code")}


def _set_aside_stale_folder(run_dir: Path, config_text: str) -> None:
    """A finished folder whose config is not this proposal's belongs to a lost pass: move it aside."""
    cfg_file = run_dir / CONFIG_FILE
    if is_finished(run_dir) and cfg_file.exists() and cfg_file.read_text() != config_text:
        log.warning("%s held the results of another proposal; moving them aside", run_dir)
        move_aside(run_dir)


def reject_run(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """A run whose in-run smoke test failed (train.py ended "invalid"; see smoke_in_run): record the
    proposal as rejected, as `validate` does (it is not a run), set the folder's files aside into
    attempt_N/ so the run id is free again, and go back to `propose` with the error as feedback.
    Safe to re-run after a crash: the rejection is recorded once, and a folder already set aside
    is left alone."""
    ctx = runtime.context
    run_id = state["run_id"]
    message = _labelled_smoke_error(state["launch"]["metrics"].get("error"), ctx)
    update = _reject(state, load_agent_state(ctx.state_path), message, ctx, "reject_run")
    _test_pause("reject_run", run_id, ctx)
    run_dir = get_run_dir(run_id, ctx.runs_dir, create=False)
    if is_finished(run_dir):
        move_aside(run_dir)
    return {**update, "smoke": None, "launch": None}


def _labelled_smoke_error(error: str | None, ctx: Context) -> str:
    """train.py's "invalid" error, said first as exceeding the memory cap when it ran out of memory
    under it (as validation's subprocess smoke test says it)."""
    text = error or "smoke test failed: train.py gave no reason"
    if ctx.run_memory_gb and ran_out_of_memory(text):
        return (f"smoke test failed: the model exceeded its memory cap of {ctx.run_memory_gb:g} GB "
                f"(--run-memory); propose a smaller one. {text.removeprefix('smoke test failed: ')[:300]}")
    return text


def summarise(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """A few sentences about the learning curve, for the study record and LLM prompts."""
    ctx = runtime.context
    run_dir = get_run_dir(state["run_id"], ctx.runs_dir, create=False)
    return {"summary": build_history_summary(load_history(run_dir), state["launch"]["metrics"])}


def decide(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Record the run in agent_state.json (the commit point), accept or reject it, check the stop rules."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    run_id, launch_out = state["run_id"], state["launch"]
    recorded = get_run(study, run_id)
    if recorded is None:
        record = _make_record(state, study, ctx)
        add_run(study, record)
        retarget_pending(study, ctx.min_delta)  # a run accepted at once (model code) while a candidate waits
        concluded = conclude(study, ctx.min_delta)  # the last confirmation: accept or reject the candidate
        if concluded is not None:
            log.info("%s %s", concluded.run_id, concluded.reason)
            _display(ctx, "on_message", text=f"{concluded.run_id} {concluded.reason}")
        _tick_time(study, ctx)
        doomed = retention.mark_for_deletion(study, ctx.runs_dir, ctx.keep_checkpoints)
        _save(study, ctx, "decide")
        if doomed:  # recorded first, deleted after: a crash in between only leaves a file to delete again
            log.info("deleted %d checkpoint(s) (%.0f MB) under --keep-checkpoints %d: %s", len(doomed),
                     retention.delete(doomed) / 1e6, ctx.keep_checkpoints, ", ".join(p.parent.name for p in doomed))
    else:
        record = recorded  # recorded before a crash; do not count it twice
    sync_incumbent(study, ctx)
    sync_model(study, ctx)
    _mirror(study_view(study, state.get("in_flight")), ctx, "decide")
    decision = {"accepted": record.accepted, "reason": record.reason, "reward": record.extra.get("reward")}
    _display(ctx, "on_decision", run=record, state=study)
    log.info("%s %s val_mse %s: %s", run_id, launch_out["status"], record.val_mse, record.reason)
    if state.get("stop_reason"):  # decided while other runs were in flight: they finish, nothing new starts
        return {"decision": decision}
    return {"decision": decision, **stop_update(study, ctx)}


def _make_record(state: GraphState, study: AgentState, ctx: Context) -> RunInfo:
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
    extra = {"proposal": _record_meta(proposal.get("meta", {})), "reward": compute_reward(status, val, best_val),
             "n_params": metrics.get("n_params"), "config_hash": config_hash(proposal["config"]),
             "incumbent_before": best.run_id if best else None, "attempts_moved_aside": launch_out.get("attempt", 0),
             "reused": launch_out.get("reused", False), "best_epoch": metrics.get("best_epoch"),
             "epochs_run": metrics.get("epochs_run"), "smoke": _smoke_record(state.get("smoke"), metrics),
             "incumbent_config": proposal.get("raw_config"),
             "curve": [h.get("val_mse") for h in load_history(run_dir)["epochs"]],
             "checkpoint": retention.checkpoint_record(run_dir)}
    if pruned is not None:
        extra["pruned"] = pruned
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


def _smoke_record(smoke: dict | None, metrics: dict) -> dict | None:
    """The run record's smoke test: validate's {n_params, seconds}, or train.py's own (in_run)."""
    if smoke and smoke.get("in_run"):
        return {"n_params": metrics.get("n_params"), "seconds": metrics.get("smoke_s"), "in_run": True}
    return smoke


def collect_lora(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Append the run's LoRA sample (prompt, response, reward, ...), check whether the adapter in
    use must be rolled back and whether a fine-tune is due, then clear the pass."""
    ctx = runtime.context
    proposal, decision = state["proposal"], state["decision"]
    meta = proposal.get("meta", {})
    response = meta.get("response") or json.dumps(proposal["config"], sort_keys=True)
    messages = meta.get("messages")
    key = hashlib.sha256(json.dumps([messages or meta.get("prompt"), response]).encode()).hexdigest()[:16]
    path = samples_path(ctx.runs_dir)
    if key not in {s.get("key") for s in read_samples(path)}:  # idempotent on re-run after a crash
        path.parent.mkdir(parents=True, exist_ok=True)
        launch_out = state["launch"]
        append_jsonl(path, {"key": key, "run_id": state["run_id"], "prompt": meta.get("prompt"), "messages": messages,
                            "response": response, "proposer": proposal["proposer"], "status": launch_out["status"],
                            "val_mse": launch_out["metrics"].get("val_mse"), "reward": decision["reward"],
                            "adapter_version": (meta.get("llm") or {}).get("adapter")})
    study = load_agent_state(ctx.state_path)
    before = json.dumps(study.meta.get("lora"), sort_keys=True)
    event = check_rollback(study, _lora_settings(ctx))
    if json.dumps(study.meta.get("lora"), sort_keys=True) != before:  # a check ran: record it, rollback or not
        _save(study, ctx, "collect_lora")
    if event is not None:
        _display(ctx, "on_message", text=f"LoRA adapter v{event['version']} rolled back: {event['reason']}")
    return {**fresh_pass(), "finetune_due": _finetune_due(study, ctx),
            "can_propose": can_propose(study, state.get("in_flight"), ctx, state.get("stop_reason"))}


def _lora_settings(ctx: Context) -> LoraSettings:
    return ctx.lora if ctx.lora is not None else LoraSettings()


def _finetune_due(study: AgentState, ctx: Context) -> bool:
    """A fine-tune is due: the proposer has an LLM, LoRA is on, and enough new positive samples exist."""
    return getattr(ctx.proposer_obj, "chat", None) is not None and finetune_due(study, ctx.runs_dir, _lora_settings(ctx))


def finetune(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Train the next LoRA adapter in a subprocess, gate it against the one in use, and record the
    outcome in agent_state.json (meta.lora); the proposer picks up a promoted adapter at once."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    chat = getattr(ctx.proposer_obj, "chat", None)
    if chat is None or not _finetune_due(study, ctx):  # e.g. resumed after the record was saved
        return {"finetune_due": False,
                "can_propose": can_propose(study, state.get("in_flight"), ctx, state.get("stop_reason"))}
    _display(ctx, "on_message", text="fine-tuning the LLM (LoRA) on the winning proposals so far")
    if ctx.free_llm:
        _free_llm()
    try:
        record = finetune_and_gate(study, ctx.runs_dir, _lora_settings(ctx), chat, ctx.space, python=ctx.python,
                                   env=ctx.env)
    except Exception as e:  # noqa: BLE001 - a failed fine-tune is recorded as data; the search goes on
        log.exception("LoRA fine-tuning failed")
        study = load_agent_state(ctx.state_path)  # without the attempt's partial changes
        record = record_failed_finetune(study, ctx.runs_dir, _lora_settings(ctx), f"{type(e).__name__}: {e}")
    _tick_time(study, ctx)
    _save(study, ctx, "finetune")
    summary = {k: record.get(k) for k in ("version", "status", "reason", "path", "n_train")}
    _display(ctx, "on_message", text=f"LoRA adapter v{record['version']}: {record['status']} ({record['reason']})")
    stop = {"stop_reason": state["stop_reason"], "stop_failed": state.get("stop_failed", False)} \
        if state.get("stop_reason") else stop_update(study, ctx)
    return {"finetune_due": False, "lora": summary, **stop,
            "can_propose": can_propose(study, state.get("in_flight"), ctx, stop["stop_reason"])}


def stop(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Say why the search stopped, which run is best, and how to re-run it."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    _tick_time(study, ctx)
    _save(study, ctx, "stop")
    best = get_best_run(study)
    lines = [f"Search stopped: {state.get('stop_reason')}.", f"Runs in the study: {len(study.runs)}."]
    if best is None:
        lines.append("No run succeeded yet.")
    else:
        test = "n/a" if best.test_mse is None else f"{best.test_mse:.6f}"
        lines.append(f"Best run: {best.run_id} (val_mse {best.val_mse:.6f}, test_mse {test}, "
                     f"proposer {best.proposer}).")
        lines.append(f"Re-run it: python train.py --config {ctx.runs_dir / best.run_id / 'config_used.py'} "
                     f"--tag {best.run_id}_rerun")
        lines.append(f"{ctx.config_path} now holds this config.")
    if validity := llm_validity_text(study):
        lines.append(validity + ".")
    if noise := noise_floor_text(study):
        lines.append(noise[0].upper() + noise[1:] + ".")
    message = "\n".join(lines)
    _display(ctx, "on_stop", message=message)
    return {"message": message}
