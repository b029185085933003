"""Graph nodes. Each is one function from the state (plus the run context) to a partial update.

Nodes read the study from agent_state.json whenever they need it: the file is the
single source of truth, the graph state only carries the proposal in flight. Every
node is safe to re-run after a crash (the checkpointer resumes at the interrupted
node): proposals are deterministic for a given study, `launch` reuses a finished run
folder, and `decide` and `validate` do not record the same run or rejection twice.
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

from nas_agent._atomic import append_jsonl, atomic_write_json, atomic_write_text
from nas_agent.agent_state import (AgentState, RunInfo, add_run, get_best_run, get_run, load_agent_state,
                                   save_agent_state, utc_now_iso)
from nas_agent.config import ConfigError, apply_overrides, config_hash, load_config, parse_config_source, render_config
from nas_agent.history_summary import build_history_summary
from nas_agent.logging_utils import load_history
from nas_agent.run_manager import get_run_dir, run_id_for
from nas_agent_graph.context import Context
from nas_agent_graph.launcher import error_headline, is_finished, launch_run, move_aside
from nas_agent_graph.proposers import BaselineProposer
from nas_agent_graph.reward import compute_reward
from nas_agent_graph.state import GraphState, fresh_pass
from nas_agent_graph.search_space import SpaceError
from nas_agent_graph.validation import Verdict, check_proposal

log = logging.getLogger(__name__)

SUCCESS = ("ok", "timeout")  # statuses whose val_mse is a fair measurement


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
            all(r.status not in SUCCESS or r.val_mse is None for r in tail):
        errors = "\n".join(f"  {r.run_id}: {r.reason}" for r in tail)
        return (f"the last {ctx.max_failures} runs all failed, so the search stops instead of burning its budget. "
                f"Look at their train.log files; the last errors were:\n{errors}"), True
    return None, False


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
    incumbent is kept under runs/incumbents/ before it is replaced.
    """
    best = get_best_run(state)
    if best is None:
        return
    incumbent = best.extra.get("incumbent_config") or best.config
    want = config_hash(incumbent)
    if ctx.config_path.exists():
        try:
            current = parse_config_source(ctx.config_path.read_text(), str(ctx.config_path))
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
    atomic_write_text(ctx.config_path, render_config(_without_channels(incumbent), header=header))
    log.info("config.py now holds the incumbent %s", best.run_id)


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
    save_agent_state(study, ctx.state_path)
    sync_incumbent(study, ctx)
    _display(ctx, "on_study", state=study)
    return {**fresh_pass(), **stop_update(study, ctx), "message": None}


def propose(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ask the proposer for a config; the first run of a study is the base config itself."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    run_id = state.get("run_id") or run_id_for(len(study.runs))
    earlier = sum(1 for r in study.rejected if r.get("run_id") == run_id)
    attempt = max(state.get("attempt", 0), earlier)
    proposer = BaselineProposer() if not study.runs and attempt == 0 else ctx.proposer_obj
    _test_pause("propose", run_id, ctx)
    _display(ctx, "on_propose", run_id=run_id, proposer=proposer.name, attempt=attempt)
    try:
        proposal = proposer.propose(study, study.meta["base_config"], attempt, state.get("feedback"))
        out = {**dataclasses.asdict(proposal), "raw_config": proposal.config, "error": None,
               "config": apply_overrides(proposal.config, ctx.overrides)}
    except (SpaceError, ConfigError) as e:  # no config could be built: an invalid proposal, with feedback
        out = {"config": None, "raw_config": None, "proposer": proposer.name, "parent_run_id": None, "meta": {},
               "error": str(e)}
    return {"run_id": run_id, "attempt": attempt, "proposal": out, "validation_error": None}


def validate(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Schema, duplicate check, smoke test and parameter budget; invalid goes back to propose."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    proposal = state["proposal"]
    if proposal["config"] is None:
        verdict = Verdict(False, [f"the {proposal['proposer']} proposer could not build a config: {proposal['error']}"])
    else:
        verdict = check_proposal(proposal["config"], study, python=ctx.python, smoke_timeout=ctx.smoke_timeout,
                                 max_params=ctx.max_params, env=ctx.env)
    if verdict.ok:
        return {"validation_error": None, "smoke": {"n_params": verdict.n_params, "seconds": verdict.smoke_seconds},
                "proposal": {**proposal, "config": verdict.config}}
    attempt = state.get("attempt", 0)
    key = f"{state['run_id']}#{attempt}"
    if not any(r.get("key") == key for r in study.rejected):  # idempotent on re-run after a crash
        study.rejected.append({"attempt": attempt, "proposer": proposal["proposer"], "config": proposal["config"],
                               "error": verdict.message, "at": utc_now_iso(), "key": key,
                               "run_id": state["run_id"]})
        save_agent_state(study, ctx.state_path)
    _display(ctx, "on_rejected", run_id=state["run_id"], error=verdict.message)
    tries = state.get("tries", 0) + 1
    update: dict[str, Any] = {"validation_error": verdict.message, "feedback": verdict.message,
                              "attempt": attempt + 1, "tries": tries}
    if tries > ctx.max_retries:
        update["stop_failed"] = True
        update["stop_reason"] = (f"the {proposal['proposer']} proposer gave {tries} invalid proposals in a "
                                 f"row for {state['run_id']} (--max-retries {ctx.max_retries}); last error: "
                                 f"{verdict.message}")
    return update


def launch(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Write the config into the run folder and run train.py there (or reuse a finished run)."""
    ctx = runtime.context
    run_id, proposal = state["run_id"], state["proposal"]
    run_dir = get_run_dir(ctx.runs_dir, run_id)
    config_text = render_config(proposal["config"], header=f"{run_id}: proposed by {proposal['proposer']}")
    _set_aside_stale_folder(run_dir, config_text)
    _display(ctx, "on_launch", run_id=run_id, config=proposal["config"])
    result = launch_run(run_dir, config_text, run_id=run_id, runs_dir=ctx.runs_dir, python=ctx.python,
                        train_script=ctx.train_script, timeout_s=ctx.run_timeout, env=ctx.env,
                        on_progress=lambda history: _display(ctx, "on_epoch", run_id=run_id, history=history))
    # Written after the launch: launch_run moves any file of an unfinished folder aside.
    atomic_write_json(run_dir / "proposal.json", proposal)
    out = dataclasses.asdict(result)
    out.pop("history", None)  # read from disk by summarise; keeps checkpoints small
    return {"launch": out}


def _set_aside_stale_folder(run_dir: Path, config_text: str) -> None:
    """A finished folder whose config is not this proposal's belongs to a lost pass: move it aside."""
    cfg_file = run_dir / "config.py"
    if is_finished(run_dir) and cfg_file.exists() and cfg_file.read_text() != config_text:
        log.warning("%s held the results of another proposal; moving them aside", run_dir)
        move_aside(run_dir)


def summarise(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """A few sentences about the learning curve, for the study record and LLM prompts."""
    ctx = runtime.context
    run_dir = get_run_dir(ctx.runs_dir, state["run_id"])
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
        _tick_time(study, ctx)
        save_agent_state(study, ctx.state_path)
    else:
        record = recorded  # recorded before a crash; do not count it twice
    sync_incumbent(study, ctx)
    decision = {"accepted": record.accepted, "reason": record.reason, "reward": record.extra.get("reward")}
    _display(ctx, "on_decision", run=record, state=study)
    log.info("%s %s val_mse %s: %s", run_id, launch_out["status"], record.val_mse, record.reason)
    return {"decision": decision, **stop_update(study, ctx)}


def _make_record(state: GraphState, study: AgentState, ctx: Context) -> RunInfo:
    launch_out, proposal = state["launch"], state["proposal"]
    metrics, status = launch_out["metrics"], launch_out["status"]
    val = metrics.get("val_mse")
    val = val if isinstance(val, (int, float)) and math.isfinite(val) else None
    best = get_best_run(study)
    best_val = best.val_mse if best else None
    if status not in SUCCESS or val is None:
        accepted, reason = False, f"status {status}: {error_headline(metrics.get('error') or 'no validation MSE')}"
    elif best_val is None:
        accepted, reason = True, f"first successful run: val_mse {val:.6f}"
    elif val < best_val - ctx.min_delta:
        accepted, reason = True, f"val_mse {val:.6f} < best {best_val:.6f} ({best.run_id}) - min_delta {ctx.min_delta:g}"
    else:
        accepted, reason = False, f"val_mse {val:.6f} is not below best {best_val:.6f} ({best.run_id}) - min_delta {ctx.min_delta:g}"
    extra = {"proposal": proposal.get("meta", {}), "reward": compute_reward(status, val, best_val),
             "n_params": metrics.get("n_params"), "config_hash": config_hash(proposal["config"]),
             "incumbent_before": best.run_id if best else None, "attempts_moved_aside": launch_out.get("attempt", 0),
             "reused": launch_out.get("reused", False), "best_epoch": metrics.get("best_epoch"),
             "epochs_run": metrics.get("epochs_run"), "smoke": state.get("smoke"),
             "incumbent_config": proposal.get("raw_config")}
    return RunInfo(run_id=state["run_id"], status=status, val_mse=val, val_mae=metrics.get("val_mae"),
                   test_mse=metrics.get("test_mse"), test_mae=metrics.get("test_mae"),
                   history_summary=state.get("summary") or "", accepted=accepted, reason=reason,
                   proposer=proposal["proposer"], config=proposal["config"],
                   parent_run_id=proposal.get("parent_run_id") or (best.run_id if best else None),
                   started_at=utc_now_iso(), duration_s=launch_out.get("duration_s"),
                   error_tail=launch_out.get("error_tail"), extra=extra)


def collect_lora(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Record a {prompt, response, run_id, reward} sample for later fine-tuning, then clear the pass."""
    ctx = runtime.context
    proposal, decision = state["proposal"], state["decision"]
    meta = proposal.get("meta", {})
    response = meta.get("response") or json.dumps(proposal["config"], sort_keys=True)
    prompt = meta.get("prompt")
    key = hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()[:16]
    path = ctx.runs_dir / "lora" / "samples.jsonl"
    if key not in _sample_keys(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        launch_out = state["launch"]
        append_jsonl(path, {"key": key, "run_id": state["run_id"], "prompt": prompt, "response": response,
                            "proposer": proposal["proposer"], "status": launch_out["status"],
                            "val_mse": launch_out["metrics"].get("val_mse"), "reward": decision["reward"],
                            "adapter_version": meta.get("adapter_version")})
    return fresh_pass()


def _sample_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    keys = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line after a crash: ignore it
    return keys


def stop(state: GraphState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Say why the search stopped, which run is best, and how to re-run it."""
    ctx = runtime.context
    study = load_agent_state(ctx.state_path)
    _tick_time(study, ctx)
    save_agent_state(study, ctx.state_path)
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
    message = "\n".join(lines)
    _display(ctx, "on_stop", message=message)
    return {"message": message}
