"""Graph nodes. Each is one function from the state (plus the run context) to a partial update.

Nodes read the study from agent_state.json whenever they need it: the file is the
single source of truth, the graph state only carries the proposal in flight. Every
node is safe to re-run after a crash (the checkpointer resumes at the interrupted
node): proposals are deterministic for a given study, `launch` reuses a finished run
folder, and `decide`, `validate` and `reject_run` do not record the same run or rejection twice.
The rules the nodes apply live in nas_agent_graph/study/; the way a proposal becomes a run in
nas_agent_graph/launching.py.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from langgraph.runtime import Runtime

from nas_agent.agent_state import AgentState, add_run, get_run, load_agent_state, utc_now_iso
from nas_agent.config import ConfigError, apply_overrides, load_config
from nas_agent.history_summary import build_history_summary
from nas_agent.logging_utils import load_history
from nas_agent.run_manager import get_run_dir, run_id_for
from nas_agent_graph import retention
from nas_agent_graph.archetypes import PROPOSER as ARCHETYPE
from nas_agent_graph.context import Context
from nas_agent_graph.disk import check_room_for_run
from nas_agent_graph.launcher import is_finished, move_aside
from nas_agent_graph.launching import get_pool, resubmit, run_spec, set_aside_stale_folder, write_trace
from nas_agent_graph.limits import smoke_caps
from nas_agent_graph.llm.backend import free_memory
from nas_agent_graph.lora.adapters import (
    LoraSettings,
    active_adapter,
    append_sample,
    check_rollback,
    finetune_and_gate,
    finetune_due,
    record_failed_finetune,
)
from nas_agent_graph.phases import phase_log
from nas_agent_graph.proposers import BaselineProposer, ProposalError
from nas_agent_graph.search_space import SpaceError
from nas_agent_graph.state import GraphState, fresh_pass
from nas_agent_graph.study.confirmation import (
    CONFIRM_PROPOSER,
    conclude,
    confirmation_proposal,
    next_confirmation,
    retarget_pending,
)
from nas_agent_graph.study.incumbent import sync_incumbent, sync_model, without_channels
from nas_agent_graph.study.rules import (
    can_propose,
    consistent_flights,
    make_record,
    rejection_entry,
    stop_message,
    stop_update,
    study_view,
)
from nas_agent_graph.study.store import mirror_study, save_study, tick_time
from nas_agent_graph.testing import pause_point
from nas_agent_graph.validation import (
    Verdict,
    check_code_proposal,
    check_proposal,
    labelled_smoke_error,
    smoke_in_run,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- nodes

def load_state(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Open (or start) the study, bring config.py in line with it, and check the stop rules."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    if "created_at" not in study.meta:
        base = load_config(ctx.config_path)  # the starting point, validated
        study.meta.update(created_at=utc_now_iso(), seed=ctx.seed, proposer=ctx.proposer,
                          base_config=without_channels(base.model_dump()), config_path=str(ctx.config_path))
    study.max_runs = ctx.max_runs
    study.meta["space_path"] = str(ctx.space_path) if ctx.space_path else None  # for export-optuna
    save_study(study, ctx, "load_state")
    sync_incumbent(study, ctx)
    sync_model(study, ctx)
    ctx.session.show("on_study", state=study)
    in_flight = consistent_flights(study, state.get("in_flight") or [], ctx)
    resubmit(in_flight, ctx)
    stop = stop_update(study, ctx)
    return {**fresh_pass(), **stop, "message": None, "finetune_due": _finetune_due(study, ctx),
            "in_flight": in_flight, "can_propose": can_propose(study, in_flight, ctx, stop["stop_reason"])}


def propose(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ask the proposer for a config; the first run of a study is the base config itself."""
    ctx = runtime.context
    in_flight = state.get("in_flight") or []
    resubmit(in_flight, ctx)
    study = study_view(load_agent_state(ctx.state_path), in_flight)
    run_id = state.get("run_id") or run_id_for(len(study.runs))
    earlier = sum(1 for r in study.rejected if r.get("run_id") == run_id)
    attempt = max(state.get("attempt", 0), earlier)
    plan = next_confirmation(study)
    if plan is not None:  # a pending candidate's confirmations come first, straight from configs
        ctx.session.show("on_propose", run_id=run_id, proposer=CONFIRM_PROPOSER, attempt=0)
        return {"run_id": run_id, "attempt": attempt, "proposal": confirmation_proposal(study, plan, ctx.overrides),
                "validation_error": None}
    proposer = _proposer_for(study, attempt, ctx)
    pause_point("propose", run_id, ctx.runs_dir)
    ctx.session.show("on_propose", run_id=run_id, proposer=proposer.name, attempt=attempt)
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
    if ctx.session.archetypes is not None and ctx.session.archetypes.pending(study):
        return ctx.session.archetypes
    return ctx.session.proposer


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
        verdict = check_code_proposal(proposal, code, view, state, ctx)
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
                                     model_file=ctx.model_file, caps=smoke_caps(ctx.run_memory_gb, ctx.smoke_timeout))
    if verdict.ok:
        return {"validation_error": None, "smoke": {"n_params": verdict.n_params, "seconds": verdict.smoke_seconds},
                "proposal": {**proposal, "config": verdict.config}}
    return _reject(state, study, verdict.message, ctx, "validate")


def _reject(state: GraphState, study: AgentState, message: str, ctx: Context, node: str) -> dict[str, Any]:
    """Record an invalid proposal in agent_state.json's rejected list (it is not a run) and send it
    back to `propose` with the error as feedback; stop after --max-retries in a row."""
    proposal = state["proposal"]
    attempt = state.get("attempt", 0)
    key = f"{state['run_id']}#{attempt}"  # rejection_entry's key
    if not any(r.get("key") == key for r in study.rejected):  # idempotent on re-run after a crash
        study.rejected.append(rejection_entry(proposal, attempt, state["run_id"], message))
        save_study(study, ctx, node)
    ctx.session.show("on_rejected", run_id=state["run_id"], error=message)
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


def launch(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Start train.py for the proposal (in the pool, without waiting) and add it to the runs in flight."""
    ctx = runtime.context
    run_id, proposal = state["run_id"], state["proposal"]
    in_flight = state.get("in_flight") or []
    resubmit(in_flight, ctx)
    if ctx.session.free_llm and ctx.parallel == 1:  # with --parallel, in `wait` (not before every proposal)
        free_memory()
    spec = run_spec(run_id, proposal, ctx, state.get("smoke"))
    # else stop before starting; an in-run smoke test checks again once train.py knows the parameter count
    check_room_for_run(spec.run_dir, (state.get("smoke") or {}).get("n_params"))
    set_aside_stale_folder(spec.run_dir, spec.config_text)
    ctx.session.show("on_launch", run_id=run_id, config=proposal["config"])
    get_pool(ctx).submit(spec)
    entry = {"run_id": run_id, "attempt": state.get("attempt", 0), "tries": state.get("tries", 0), "proposal": proposal,
             "smoke": state.get("smoke")}
    in_flight = [*in_flight, entry]
    study = load_agent_state(ctx.state_path)
    mirror_study(study_view(study, in_flight), ctx, "launch")
    return {**fresh_pass(), "in_flight": in_flight,
            "can_propose": can_propose(study, in_flight, ctx, state.get("stop_reason"))}


def wait(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Block until a run in flight ends (the lowest run id first when several have), and make it
    the pass's run: summarise, decide and collect_lora then record it."""
    ctx = runtime.context
    in_flight = state.get("in_flight") or []
    resubmit(in_flight, ctx)
    if ctx.session.free_llm and ctx.parallel > 1:  # every slot is busy: give the runs the LLM's memory
        free_memory()
    run_id, result = get_pool(ctx).wait_any()
    entry = next(e for e in in_flight if e["run_id"] == run_id)
    # Written after the run: launch_run moves the files of an unfinished folder aside first.
    write_trace(get_run_dir(run_id, ctx.runs_dir, create=False), entry["proposal"])
    out = dataclasses.asdict(result)
    out.pop("history", None)  # read from disk by summarise; keeps checkpoints small
    return {"run_id": run_id, "attempt": entry.get("attempt", 0), "tries": entry.get("tries", 0),
            "proposal": entry["proposal"], "smoke": entry.get("smoke"), "launch": out,
            "in_flight": [e for e in in_flight if e["run_id"] != run_id]}


def reject_run(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """A run whose in-run smoke test failed (train.py ended "invalid"; see smoke_in_run): record the
    proposal as rejected, as `validate` does (it is not a run), set the folder's files aside into
    attempt_N/ so the run id is free again, and go back to `propose` with the error as feedback.
    Safe to re-run after a crash: the rejection is recorded once, and a folder already set aside
    is left alone."""
    ctx = runtime.context
    run_id = state["run_id"]
    message = labelled_smoke_error(state["launch"]["metrics"].get("error"), ctx)
    update = _reject(state, load_agent_state(ctx.state_path), message, ctx, "reject_run")
    pause_point("reject_run", run_id, ctx.runs_dir)
    run_dir = get_run_dir(run_id, ctx.runs_dir, create=False)
    if is_finished(run_dir):
        move_aside(run_dir)
    return {**update, "smoke": None, "launch": None}


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
        record = make_record(state, study, ctx)
        add_run(study, record)
        retarget_pending(study, ctx.min_delta)  # a run accepted at once (model code) while a candidate waits
        concluded = conclude(study, ctx.min_delta)  # the last confirmation: accept or reject the candidate
        if concluded is not None:
            log.info("%s %s", concluded.run_id, concluded.reason)
            ctx.session.show("on_message", text=f"{concluded.run_id} {concluded.reason}")
        tick_time(study, ctx)
        doomed = retention.mark_for_deletion(study, ctx.runs_dir, ctx.keep_checkpoints)
        save_study(study, ctx, "decide")
        if doomed:  # recorded first, deleted after: a crash in between only leaves a file to delete again
            log.info("deleted %d checkpoint(s) (%.0f MB) under --keep-checkpoints %d: %s", len(doomed),
                     retention.delete(doomed) / 1e6, ctx.keep_checkpoints, ", ".join(p.parent.name for p in doomed))
    else:
        record = recorded  # recorded before a crash; do not count it twice
    sync_incumbent(study, ctx)
    sync_model(study, ctx)
    mirror_study(study_view(study, state.get("in_flight")), ctx, "decide")
    decision = {"accepted": record.accepted, "reason": record.reason, "reward": record.extra.get("reward")}
    ctx.session.show("on_decision", run=record, state=study)
    log.info("%s %s val_mse %s: %s", run_id, launch_out["status"], record.val_mse, record.reason)
    if state.get("stop_reason"):  # decided while other runs were in flight: they finish, nothing new starts
        return {"decision": decision}
    return {"decision": decision, **stop_update(study, ctx)}


def collect_lora(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Append the run's LoRA sample (prompt, response, reward, ...), check whether the adapter in
    use must be rolled back and whether a fine-tune is due, then clear the pass."""
    ctx = runtime.context
    proposal, decision = state["proposal"], state["decision"]
    append_sample(ctx.runs_dir, state["run_id"], proposal, state["launch"], decision["reward"])
    study = load_agent_state(ctx.state_path)
    before = repr(study.meta.get("lora"))
    event = check_rollback(study, ctx.lora or LoraSettings())
    if repr(study.meta.get("lora")) != before:  # a check ran: record it, rollback or not
        save_study(study, ctx, "collect_lora")
    if event is not None:
        ctx.session.show("on_message", text=f"LoRA adapter v{event['version']} rolled back: {event['reason']}")
    return {**fresh_pass(), "finetune_due": _finetune_due(study, ctx),
            "can_propose": can_propose(study, state.get("in_flight"), ctx, state.get("stop_reason"))}


def _finetune_due(study: AgentState, ctx: Context) -> bool:
    """A fine-tune is due: the proposer has an LLM, LoRA is on, and enough new positive samples exist."""
    has_llm = getattr(ctx.session.proposer, "chat", None) is not None
    return has_llm and finetune_due(study, ctx.runs_dir, ctx.lora or LoraSettings())


def finetune(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Train the next LoRA adapter in a subprocess, gate it against the one in use, and record the
    outcome in agent_state.json (meta.lora); the proposer picks up a promoted adapter at once."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    chat = getattr(ctx.session.proposer, "chat", None)
    if chat is None or not _finetune_due(study, ctx):  # e.g. resumed after the record was saved
        return {"finetune_due": False,
                "can_propose": can_propose(study, state.get("in_flight"), ctx, state.get("stop_reason"))}
    ctx.session.show("on_message", text="fine-tuning the LLM (LoRA) on the winning proposals so far")
    if ctx.session.free_llm:
        free_memory()
    try:
        record = finetune_and_gate(study, ctx.runs_dir, ctx.lora or LoraSettings(), chat, ctx.session.space,
                                   python=ctx.python, env=ctx.env)
    except Exception as e:  # noqa: BLE001 - a failed fine-tune is recorded as data; the search goes on
        log.exception("LoRA fine-tuning failed")
        study = load_agent_state(ctx.state_path)  # without the attempt's partial changes
        record = record_failed_finetune(study, ctx.runs_dir, ctx.lora or LoraSettings(), f"{type(e).__name__}: {e}")
    tick_time(study, ctx)
    save_study(study, ctx, "finetune")
    summary = {k: record.get(k) for k in ("version", "status", "reason", "path", "n_train")}
    ctx.session.show("on_message", text=f"LoRA adapter v{record['version']}: {record['status']} ({record['reason']})")
    stop = {"stop_reason": state["stop_reason"], "stop_failed": state.get("stop_failed", False)} \
        if state.get("stop_reason") else stop_update(study, ctx)
    return {"finetune_due": False, "lora": summary, **stop,
            "can_propose": can_propose(study, state.get("in_flight"), ctx, stop["stop_reason"])}


def stop(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Say why the search stopped, which run is best, and how to re-run it."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    tick_time(study, ctx)
    save_study(study, ctx, "stop")
    message = stop_message(study, state.get("stop_reason"), ctx)
    ctx.session.show("on_stop", message=message)
    return {"message": message}
