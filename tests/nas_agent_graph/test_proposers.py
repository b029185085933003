"""Proposers on a synthetic objective (no training): validity, determinism, learning, failures."""
import json
import math
import statistics
import subprocess

import pytest
from optuna.trial import TrialState

from nas_agent.agent_state import AgentState, RunInfo
from nas_agent.config import config_hash, load_config, validate_config
from nas_agent_graph.proposers import (SAMPLERS, BaselineProposer, OptunaProposer, Proposal, make_proposer,
                                       sampler_seed)
from nas_agent_graph.search_space import load_space
from tests.conftest import PYTHON, ROOT

# Any warning (Optuna's ExperimentalWarning, FutureWarning, ...) is a test failure here.
pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(scope="module")
def base() -> dict:
    return load_config(ROOT / "config.py").model_dump()


@pytest.fixture(scope="module")
def space():
    return load_space(None)


def score(config: dict) -> float:
    """A cheap stand-in for val_mse: best at lr = 1e-3 and no dropout."""
    return abs(math.log10(config["training"]["lr"]) + 3) + config["model"]["dropout"]


def record(state: AgentState, proposal: Proposal, status: str = "ok", value: float | None = None) -> RunInfo:
    """Append a finished run for a proposal, as the loop would."""
    run = RunInfo(run_id=f"run_{len(state.runs):04d}", status=status,
                  val_mse=score(proposal.config) if value is None and status == "ok" else value,
                  config=proposal.config, proposer=proposal.proposer,
                  extra={"proposal": json.loads(json.dumps(proposal.meta))})  # as stored in the JSON file
    state.runs.append(run)
    return run


def synthetic_search(proposer, base: dict, n: int = 25) -> AgentState:
    state = AgentState()
    for _ in range(n):
        proposal = proposer.propose(state, base, 0, None)
        validate_config(proposal.config)
        assert proposal.proposer == proposer.name
        record(state, proposal)
    return state


@pytest.fixture(scope="module")
def searches(space, base) -> dict[str, AgentState]:
    """One 25-run synthetic search per sampler, seed 0 (shared by several tests)."""
    return {name: synthetic_search(make_proposer(name, space, seed=0), base) for name in SAMPLERS}


@pytest.mark.parametrize("name", SAMPLERS)
def test_synthetic_search_gives_valid_json_proposals(searches, space, name):
    state = searches[name]
    assert len(state.runs) == 25
    for run in state.runs:
        optuna_meta = run.extra["proposal"]["optuna"]
        assert optuna_meta["sampler"] == name
        # Define-by-run: exactly the keys the sampled family uses.
        assert list(optuna_meta["params"]) == space.active_keys(optuna_meta["params"], run.config)
    assert len({config_hash(r.config) for r in state.runs}) >= 20  # mostly new configs


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_state_and_attempt_give_the_same_proposal(searches, space, base, name):
    state = AgentState(runs=searches[name].runs[:12])
    first = make_proposer(name, space, seed=0).propose(state, base, 0, None)
    again = make_proposer(name, space, seed=0).propose(state, base, 0, "feedback is ignored")  # a resumed agent
    assert again.config == first.config and again.meta == first.meta
    retry = make_proposer(name, space, seed=0).propose(state, base, 1, None)
    assert retry.config != first.config
    other_seed = make_proposer(name, space, seed=1).propose(state, base, 0, None)
    assert other_seed.config != first.config


def test_sampler_seed_is_a_pure_function():
    assert sampler_seed(0, 3, 1) == sampler_seed(0, 3, 1) == 1009 * 3 + 1
    assert len({sampler_seed(7, n, a) for n in range(50) for a in range(5)}) == 250
    assert 0 <= sampler_seed(2**40, 10**9, 99) < 2**31


def test_tpe_beats_random_on_the_synthetic_objective(space, base, searches):
    """Averaged over 3 seeds. The single best of 25 runs is luck-dominated when 19 of 21 parameters
    do not matter (random search sometimes hits lr ~ 1e-3 early), so this compares the mean of the
    5 best runs and of the last 10 runs, where TPE's model shows: it wins both on every seed 0-7."""
    def scores(name, seed):
        state = searches[name] if seed == 0 else synthetic_search(make_proposer(name, space, seed), base)
        return [r.val_mse for r in state.runs]
    tpe = [scores("tpe", s) for s in range(3)]
    rnd = [scores("random", s) for s in range(3)]
    best5 = lambda runs: statistics.mean(statistics.mean(sorted(v)[:5]) for v in runs)  # noqa: E731
    last10 = lambda runs: statistics.mean(statistics.mean(v[-10:]) for v in runs)  # noqa: E731
    assert best5(tpe) < best5(rnd), (best5(tpe), best5(rnd))
    assert last10(tpe) < last10(rnd), (last10(tpe), last10(rnd))


def test_cmaes_moves_on_through_generations_when_rebuilt(searches, space, base):
    state = searches["cmaes"]
    generations = [r.extra["proposal"]["optuna"]["system_attrs"].get("cma:generation") for r in state.runs]
    assert max(g for g in generations if g is not None) >= 2, generations
    assert any(k.startswith("cma:optimizer") for r in state.runs for k in r.extra["proposal"]["optuna"]["system_attrs"])
    # Control: without the stored attributes CMA-ES never gets to tell its first generation.
    stripped = AgentState(runs=[RunInfo(**{**r.to_dict(), "extra": {}}) for r in state.runs])
    proposal = make_proposer("cmaes", space, seed=0).propose(stripped, base, 0, None)
    assert proposal.meta["optuna"]["system_attrs"]["cma:generation"] == 0
    # The later generations concentrate on the good region of the numeric parameters.
    early = statistics.mean(score(r.config) for r in state.runs[1:9])
    late = statistics.mean(score(r.config) for r in state.runs[-8:])
    assert late < early, (early, late)


def test_failures_become_fail_trials(space, base):
    proposer = make_proposer("tpe", space, seed=3)
    state = AgentState()
    outcomes = [("ok", 0.5), ("failed", None), ("diverged", None), ("timeout", 0.7),
                ("ok", float("nan")), ("interrupted", None), ("pruned", 0.9)]
    for status, value in outcomes:
        proposal = proposer.propose(state, base, 0, None)
        run = record(state, proposal, status=status, value=value)
        run.val_mse = value  # a NaN as an in-memory state may hold it
    study = proposer.build_study(state)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                               TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                               TrialState.PRUNED]  # a pruned run: see test_pruning.py
    assert [t.value for t in study.trials if t.state == TrialState.COMPLETE] == [0.5, 0.7]
    assert [t.user_attrs["run_id"] for t in study.trials] == [r.run_id for r in state.runs]
    validate_config(proposer.propose(state, base, 0, None).config)


def test_runs_in_flight_are_running_trials_that_steer_tpe_away(space, base):
    """--parallel: a run still training is a RUNNING trial (constant liar), not a FAIL that TPE ignores."""
    from nas_agent_graph.study.rules import study_view

    proposer = make_proposer("tpe", space, seed=3)
    state = AgentState()
    for value in (0.9, 0.8, 0.7, 0.6, 0.5, 0.55):
        record(state, proposer.propose(state, base, 0, None), status="ok", value=value)
    flying = proposer.propose(state, base, 0, None)
    view = study_view(state, [{"run_id": "run_0006", "proposal": {"config": flying.config, "raw_config": flying.config,
                                                                  "proposer": "tpe", "parent_run_id": None, "meta": {}}}])
    study = proposer.build_study(view)
    assert study.trials[-1].state == TrialState.RUNNING and study.trials[-1].user_attrs["run_id"] == "run_0006"
    nxt = proposer.propose(view, base, 0, None)
    assert nxt.meta["optuna"]["n_running"] == 1
    assert config_hash(nxt.config) != config_hash(flying.config)


def test_runs_outside_the_space_are_skipped(space, base):
    odd = json.loads(json.dumps(base))
    odd["model"].update({"d_model": 100, "n_heads": 4, "d_ff": 400})
    state = AgentState(runs=[
        RunInfo(run_id="run_0000", status="ok", val_mse=1.0, config=base, proposer="baseline"),
        RunInfo(run_id="run_0001", status="ok", val_mse=0.9, config=odd, proposer="llm"),
        RunInfo(run_id="run_0002", status="failed", config={"model": {"d_model": 7}}, proposer="llm"),
        RunInfo(run_id="run_0003", status="failed", config={}, proposer="llm"),  # no config recorded
    ])
    for name in SAMPLERS:
        proposer = make_proposer(name, space, seed=0)
        study = proposer.build_study(state)
        assert [t.user_attrs["run_id"] for t in study.trials] == ["run_0000"]
        proposal = proposer.propose(state, base, 0, None)
        assert proposal.meta["optuna"]["skipped_runs"] == ["run_0001", "run_0002", "run_0003"]
        validate_config(proposal.config)


@pytest.mark.parametrize("name", SAMPLERS)
def test_suggest_candidates_are_distinct_and_reproducible(searches, space, base, name):
    state = AgentState(runs=searches[name].runs[:10])
    proposer = make_proposer(name, space, seed=0)
    candidates = proposer.suggest_candidates(state, base, 4)
    hashes = [config_hash(c.config) for c in candidates]
    assert len(set(hashes)) == 4
    assert not set(hashes) & {config_hash(r.config) for r in state.runs}
    assert [c.config for c in proposer.suggest_candidates(state, base, 4)] == [c.config for c in candidates]
    json.dumps([c.meta for c in candidates])


def test_baseline_proposer_and_factory(space, base):
    proposal = BaselineProposer().propose(AgentState(), base, 0, None)
    assert proposal.config == base and proposal.config is not base and proposal.proposer == "baseline"
    assert isinstance(make_proposer("cmaes", space, 1), OptunaProposer)
    with pytest.raises(ValueError, match="unknown proposer 'bayes'; choose one of random, tpe, cmaes"):
        make_proposer("bayes", space, 0)


def test_import_is_clean_of_deprecation_warnings():
    result = subprocess.run([PYTHON, "-W", "error::DeprecationWarning", "-c", "import nas_agent_graph.proposers"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_tpe_learns_to_avoid_configs_too_slow_for_the_run_budget(space, base):
    """A run that failed as too slow to evaluate within its budget (extra.over_budget) is a PRUNED
    trial that got nowhere, which TPE ranks behind every other trial; a plain FAIL is invisible
    to TPE, which then keeps proposing the slow region. Here the long look-backs are "too slow"."""
    def slow(config: dict) -> bool:
        return config["data"]["seq_len"] >= 512

    def search(mark_over_budget: bool, seed: int) -> list[bool]:
        proposer, state = make_proposer("tpe", space, seed=seed), AgentState()
        for _ in range(40):
            proposal = proposer.propose(state, base, 0, None)
            if slow(proposal.config):
                run = record(state, proposal, status="failed")
                if mark_over_budget:
                    run.extra["over_budget"] = True
            else:
                record(state, proposal)
        if mark_over_budget:
            assert {t.state for t in proposer.build_study(state).trials
                    if slow(t.params and state.runs[t.number].config)} == {TrialState.PRUNED}
        return [slow(r.config) for r in state.runs]

    # The slow proposals among the last 20 of 40 runs, over 8 seeds: 18 against 37 when measured
    # (2026-12-03, with encoder_norm and res_attention in the space; over 3 seeds 9 against 16,
    # and 7 against 20 on the space before them, so 3 seeds were too few to tell a 2x effect).
    told = sum(sum(search(True, seed)[20:]) for seed in range(8))
    untold = sum(sum(search(False, seed)[20:]) for seed in range(8))
    assert told < 0.6 * untold, (told, untold)
