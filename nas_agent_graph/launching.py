"""From a proposal to a run in the pool: the run's files and train.py flags, the pool itself,
the per-epoch watch that prunes, and the trace files a finished run keeps."""
from __future__ import annotations

import logging
from pathlib import Path

from nas_agent.agent_state import load_agent_state
from nas_agent.atomic import atomic_write_json, atomic_write_text
from nas_agent.config import render_config
from nas_agent.run_folder import CONFIG_FILE, MODEL_FILE
from nas_agent.run_manager import get_run_dir
from nas_agent_graph.context import Context
from nas_agent_graph.launcher import is_finished, move_aside, request_prune
from nas_agent_graph.limits import run_caps
from nas_agent_graph.pool import RunPool, RunSpec
from nas_agent_graph.pruning import past_curves, prune_decision
from nas_agent_graph.study.rules import record_meta

log = logging.getLogger(__name__)

def get_pool(ctx: Context) -> RunPool:
    """The session's pool of runs in flight, made on first use (the CLI may also set ctx.session.pool)."""
    if ctx.session.pool is None:
        ctx.session.pool = RunPool(ctx.parallel, ctx.launcher, env=ctx.env, ray_options=ctx.ray_options,
                           ray_local=ctx.ray_address is None,
                           launch_kwargs=dict(python=ctx.python, train_script=ctx.train_script,
                                              runs_dir=ctx.runs_dir, timeout_s=ctx.run_timeout,
                                              caps=run_caps(ctx.run_memory_gb, ctx.run_timeout)))
    return ctx.session.pool


def resubmit(in_flight: list[dict], ctx: Context) -> None:
    """Put runs in flight that this session has not started (a resume) back into the pool;
    launch_run reuses a folder that finished meanwhile and reruns one that did not."""
    pool = get_pool(ctx)
    for entry in in_flight:
        if entry["run_id"] not in pool:
            pool.submit(run_spec(entry["run_id"], entry["proposal"], ctx, entry.get("smoke")))


def run_spec(run_id: str, proposal: dict, ctx: Context, smoke: dict | None) -> RunSpec:
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
    elif (model_file := ctx.model_file) is not None:
        extra_args = ["--model", str(model_file)]
    if (smoke or {}).get("in_run"):
        extra_args += ["--smoke-test", "--smoke-timeout", f"{ctx.smoke_timeout:g}"]
        if ctx.max_params is not None:
            extra_args += ["--max-params", str(ctx.max_params)]
    return RunSpec(run_id=run_id, run_dir=run_dir, config_text=config_text, extra_args=extra_args, files=files,
                   on_progress=pruning_watch(run_dir, run_id, ctx))


def pruning_watch(run_dir: Path, run_id: str, ctx: Context):
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
        ctx.session.show("on_epoch", run_id=run_id, history=history)

    return on_progress


def set_aside_stale_folder(run_dir: Path, config_text: str) -> None:
    """A finished folder whose config is not this proposal's belongs to a lost pass: move it aside."""
    cfg_file = run_dir / CONFIG_FILE
    if is_finished(run_dir) and cfg_file.exists() and cfg_file.read_text() != config_text:
        log.warning("%s held the results of another proposal; moving them aside", run_dir)
        move_aside(run_dir)


def write_trace(run_dir: Path, proposal: dict) -> None:
    """proposal.json, and for LLM proposals prompt.txt, response.txt and llm.json, next to the run."""
    meta = proposal.get("meta", {})
    atomic_write_json(run_dir / "proposal.json", {**proposal, "meta": record_meta(meta)})
    if meta.get("llm"):
        atomic_write_text(run_dir / "prompt.txt", meta.get("prompt") or "")
        atomic_write_text(run_dir / "response.txt", (meta.get("response") or "") + "\n")
        atomic_write_json(run_dir / "llm.json", meta["llm"])
