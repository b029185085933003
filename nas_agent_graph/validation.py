"""Validation of a proposal, shared by the loop's `validate` node and the `check` command.

Four gates, in order: the config loader's schema, the duplicate check against the
study, a smoke test in a subprocess with a timeout, and the parameter budget. With a
model file (LLM-written code, --allow-code) a static check comes before the smoke test:
the file must pass nas_agent_graph.code_check's AST allowlist, or no subprocess runs it.

With smoke=False only the first two gates run here: the search's `validate` node does that for
a config proposal that trains the project's own model file one run at a time, whose smoke test
and parameter budget then run inside the run's own train.py, before training (train.py
--smoke-test --max-params; see smoke_in_run below). That saves a subprocess that imports torch
(~2 s a proposal); a model that fails there ends the run "invalid", which the search records
as a rejected proposal like the ones rejected here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nas_agent.agent_state import AgentState
from nas_agent.atomic import atomic_write_text
from nas_agent.config import ConfigError, config_hash, validate_config
from nas_agent.run_folder import MODEL_FILE
from nas_agent_graph.code_check import check_model_file
from nas_agent_graph.context import Context
from nas_agent_graph.process import run_child
from nas_agent_graph.limits import Caps, ran_out_of_memory, smoke_caps

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    ok: bool
    errors: list[str] = field(default_factory=list)
    n_params: Optional[int] = None
    smoke_seconds: Optional[float] = None
    config: Optional[dict[str, Any]] = None
    """The validated config (plain dict), when the schema passed."""

    @property
    def message(self) -> str:
        return "; ".join(self.errors)


def find_duplicate(config: dict, state: AgentState) -> Optional[str]:
    """The run id of an earlier run with the same effective settings, if any."""
    h = config_hash(config)
    for run in state.runs:
        try:
            if config_hash(run.config) == h:
                return run.run_id + (" (still training)" if run.status == "running" else "")
        except ConfigError:
            continue  # a run whose config no longer validates cannot be a duplicate
    return None


def run_smoke(config: dict, *, python: str, timeout_s: float, env: Optional[dict] = None,
              model_file: Optional[Path] = None, caps: Optional[Caps] = None) -> dict:
    """Run nas_agent_graph.smoke in a subprocess; the verdict is a dict, never an exception.

    It runs from the project root, whatever the caller's cwd.
    A model file that fails the static code check is never run. `caps` (memory, CPU time,
    oom_score_adj) are set in the child: the static check cannot see a build_model that
    allocates 12 GB, the cap makes it fail at once ("exceeded its memory cap of N GB").
    """
    if model_file is not None and (problems := check_model_file(model_file)):
        return {"ok": False, "error": "model code rejected: " + "; ".join(problems)}
    env = dict(os.environ if env is None else env)
    env["NAS_SMOKE_NONCE"] = nonce = secrets.token_hex(16)  # only smoke.py's own verdict line carries it
    env.update(caps.env() if caps else {})
    with tempfile.TemporaryDirectory(prefix="nas_smoke_") as tmp:
        cfg_file = Path(tmp) / "config.json"
        cfg_file.write_text(json.dumps(config))
        cmd = [python, "-m", "nas_agent_graph.smoke", str(cfg_file)]
        if model_file is not None:
            cmd += ["--model", str(model_file)]
        try:
            proc = run_child(cmd, timeout_s=timeout_s, caps=caps, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"smoke test timed out after {timeout_s:g}s"}
    return _label_memory_cap(_read_verdict(proc, nonce), proc.stderr, caps)


def _read_verdict(proc: subprocess.CompletedProcess, nonce: str) -> dict:
    """smoke.py's verdict line (the one carrying the nonce), or a failure with stderr's tail."""
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            verdict = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(verdict, dict) and verdict.pop("nonce", None) == nonce:
            return verdict
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    return {"ok": False, "error": f"smoke test exited with code {proc.returncode} and no verdict: {tail}"}


def _label_memory_cap(verdict: dict, stderr: str, caps: Optional[Caps]) -> dict:
    """A failed smoke test that ran out of memory under the cap says so first, for the proposer."""
    if verdict.get("ok") or caps is None or not caps.memory_gb:
        return verdict
    error = str(verdict.get("error"))
    if not (ran_out_of_memory(error) or ran_out_of_memory(stderr)):
        return verdict
    return {**verdict, "error": f"the model exceeded its memory cap of {caps.memory_gb:g} GB "
                                f"(--run-memory); propose a smaller one. {error[:300]}"}


def check_proposal(raw: dict, state: Optional[AgentState], *, python: str, smoke_timeout: float,
                   max_params: Optional[int] = None, env: Optional[dict] = None,
                   model_file: Optional[Path] = None, caps: Optional[Caps] = None, smoke: bool = True) -> Verdict:
    """The gates above; smoke=False stops after the duplicate check (the run smoke-tests itself)."""
    if not smoke and model_file is not None:
        raise ValueError("check_proposal: a model file is always checked here (AST allowlist, then a capped "
                         "subprocess); smoke=False is for the project's own model file only")
    try:
        cfg = validate_config(raw, "proposal").model_dump()
    except ConfigError as e:
        return Verdict(False, [str(e)])
    if state is not None and (dup := find_duplicate(cfg, state)):
        return Verdict(False, [f"duplicate: the same settings already ran as {dup}"], config=cfg)
    if not smoke:
        return Verdict(True, config=cfg)
    if model_file is not None and (problems := check_model_file(model_file)):
        return Verdict(False, problems, config=cfg)  # untrusted code: not run at all
    result = run_smoke(cfg, python=python, timeout_s=smoke_timeout, env=env, model_file=model_file, caps=caps)
    if not result.get("ok"):
        return Verdict(False, [f"smoke test failed: {result.get('error')}"], config=cfg)
    n_params = result["n_params"]
    if max_params is not None and n_params > max_params:
        return Verdict(False, [f"too many parameters: {n_params:,} > --max-params {max_params:,}"],
                       n_params=n_params, config=cfg)
    return Verdict(True, n_params=n_params, smoke_seconds=result.get("seconds"), config=cfg)


# --------------------------------------------------------------------------- in the search

def smoke_in_run(proposal: dict, ctx: Context) -> bool:
    """Whether the proposal's smoke test and --max-params check run inside its own train.py, before
    training (train.py --smoke-test), instead of in a subprocess of `validate`: a config proposal
    (no model code) for the project's own model file (--allow-code off), one run at a time on the
    local launcher. An invalid model then ends the run "invalid" and `reject_run` records it as a
    rejected proposal; run ids stay in order because no other run is in flight to take the next id.
    Model code written by the LLM is always checked first (AST allowlist, capped subprocess)."""
    return (ctx.smoke_in_run and ctx.parallel == 1 and ctx.launcher == "local" and not ctx.allow_code
            and ctx.model_file is None and proposal.get("meta", {}).get("model_code") is None)


def check_code_proposal(proposal: dict, code: str, study: AgentState, state: dict, ctx: Context) -> Verdict:
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


def labelled_smoke_error(error: str | None, ctx: Context) -> str:
    """train.py's "invalid" error, said first as exceeding the memory cap when it ran out of memory
    under it (as validation's subprocess smoke test says it)."""
    text = error or "smoke test failed: train.py gave no reason"
    if ctx.run_memory_gb and ran_out_of_memory(text):
        return (f"smoke test failed: the model exceeded its memory cap of {ctx.run_memory_gb:g} GB "
                f"(--run-memory); propose a smaller one. {text.removeprefix('smoke test failed: ')[:300]}")
    return text
