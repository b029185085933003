"""The graph's state: only the proposal being made and the runs in flight.

agent_state.json is the single source of truth about runs; nodes read it from disk
when they need history, and only `decide` (and `validate` or `reject_run`, for rejected proposals)
writes it. The graph state below carries just what one pass through the loop needs
between nodes, and is checkpointed after every step (SqliteSaver, durability="sync"),
so a killed orchestrator resumes at the node it was in. Every field must be plain JSON.
"""
from __future__ import annotations

from typing import Any, Optional, TypedDict


class GraphState(TypedDict, total=False):
    run_id: Optional[str]
    """Id of the run being prepared ("run_0007"), fixed by `propose` for the whole pass."""

    attempt: int
    """0-based proposal attempt for this run id, counting rejections of earlier sessions too
    (it seeds the proposer, so a re-run does not repeat the rejected proposals)."""

    tries: int
    """Invalid proposals for this run in this pass, for --max-retries (kept with a run in flight, so
    a run that fails its in-run smoke test counts too)."""

    proposal: Optional[dict[str, Any]]
    """The current proposal: {config, raw_config, proposer, parent_run_id, meta, error}.
    `config` is what runs: the proposer's `raw_config` with the user's --set overrides applied.
    `config` is None (and `error` says why) when the proposer could not build one."""

    feedback: Optional[str]
    """Why the previous proposal was rejected; given to the proposer on the retry."""

    validation_error: Optional[str]
    """Set by `validate` (or `reject_run`) when the proposal is invalid; None when it passed."""

    smoke: Optional[dict[str, Any]]
    """Smoke-test result of a valid proposal: {n_params, seconds}; {in_run: true} when the run's own
    train.py smoke-tests it before training (validation.smoke_in_run), whose failure ends the run
    "invalid" and sends it to `reject_run`."""

    launch: Optional[dict[str, Any]]
    """Outcome of `launch`: {status, metrics, duration_s, error_tail, returncode, reused, attempt}."""

    summary: Optional[str]
    """Plain-English learning-curve summary written by `summarise`."""

    decision: Optional[dict[str, Any]]
    """Outcome of `decide`: {accepted, reason, reward}."""

    in_flight: list[dict[str, Any]]
    """Runs launched and not yet recorded (--parallel): [{run_id, attempt, tries, proposal, smoke}], in
    launch order. `launch` adds one, `wait` takes out the one that finished. Proposals see them as
    runs with status "running" (study.rules.study_view), so parallel proposals differ."""

    can_propose: bool
    """Set by the nodes before a routing decision: a slot is free (fewer than --parallel runs in
    flight), --max-runs leaves room for one more run, and no stop reason is set."""

    finetune_due: bool
    """Set by `load_state` and `collect_lora`: enough new positive LoRA samples for a fine-tune."""

    lora: Optional[dict[str, Any]]
    """Outcome of `finetune`: the adapter record (version, status, reason, train, gate)."""

    stop_reason: Optional[str]
    """Why the search stops (set by `load_state`, `validate`, `reject_run` or `decide`); None to go on."""

    stop_failed: bool
    """True when the stop is a failure (runs or proposals failing in a row): exit code 1."""

    message: Optional[str]
    """The final message, set by `stop`."""


def fresh_pass() -> dict[str, Any]:
    """The partial update that clears the in-flight fields before the next proposal."""
    return {"run_id": None, "attempt": 0, "tries": 0, "proposal": None, "feedback": None, "validation_error": None,
            "smoke": None, "launch": None, "summary": None, "decision": None}
