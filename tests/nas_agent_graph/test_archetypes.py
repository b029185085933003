"""Warm start: the shipped archetypes run right after the baseline, once each, and the samplers learn from them."""
import json
import subprocess

import pytest

from nas_agent.agent_state import AgentState, RunInfo, load_agent_state
from nas_agent.config import ConfigError, load_config, render_config
from nas_agent.schema import model_family
from nas_agent_graph.archetypes import (DEFAULT_ARCHETYPES, TASK_AND_BUDGET, ArchetypeProposer, archetype_config,
                                        load_archetypes)
from nas_agent_graph.proposers import make_proposer
from nas_agent_graph.search_space import load_space
from tests.conftest import PYTHON, ROOT, TINY_CONFIG, run_env

# Tiny members of four families, at a 48-step look-back (the CLI study below trains each).
TINY_ARCHETYPES = {
    "tiny_dlinear": {"head": "linear", "tokens": "time", "channels": "independent", "mixer": "none",
                     "decomp": "moving_avg", "decomp_kernel": 13},
    "tiny_patchtst": {"head": "linear", "tokens": "patch", "patch_len": 16, "stride": 8, "channels": "independent",
                      "mixer": "attention", "attn": "full", "revin": True, "d_model": 16, "n_heads": 2, "d_ff": 32,
                      "e_layers": 1},
    "tiny_itransformer": {"head": "linear", "tokens": "variate", "mixer": "attention", "attn": "full", "revin": True,
                          "d_model": 16, "n_heads": 2, "d_ff": 32, "e_layers": 1},
    "tiny_tsmixer": {"head": "linear", "tokens": "time", "mixer": "mlp", "revin": True, "d_model": 16, "d_ff": 32,
                     "e_layers": 1},
}


@pytest.fixture(scope="module")
def base() -> dict:
    return load_config(ROOT / "config.py").model_dump()


def test_shipped_archetypes_are_five_families_and_points_of_the_default_space(base):
    space = load_space(None)
    archetypes = load_archetypes(DEFAULT_ARCHETYPES)
    families = {model_family(config["model"]) for _, config in archetypes}
    assert families == {"time-none-ci", "patch-attention-ci", "variate-attention", "time-mlp-raw"}
    for name, config in archetypes:
        assert space.from_config(archetype_config(config, base)) is not None, name


def test_an_archetype_keeps_its_model_and_takes_the_studys_task_and_budget(base):
    study_base = json.loads(json.dumps(base))
    study_base["data"].update(path="data/ETTh2.csv", pred_len=192)
    study_base["training"].update(max_epochs=3, time_budget_s=60.0)
    (_, patchtst), = load_archetypes([ROOT / "configs" / "patchtst42.py"])
    config = archetype_config(patchtst, study_base)
    assert config["model"] == patchtst["model"]
    assert config["data"]["seq_len"] == 336 and config["training"]["lr"] == 1e-4 and config["training"]["batch_size"] == 128
    for section, keys in TASK_AND_BUDGET.items():
        for key in keys:
            assert config[section][key] == study_base[section][key], f"{section}.{key}"


def test_each_archetype_is_proposed_once_and_a_refused_one_is_skipped(base):
    proposer = ArchetypeProposer(load_archetypes(DEFAULT_ARCHETYPES))
    state = AgentState(runs=[RunInfo(run_id="run_0000", status="ok", val_mse=1.0, proposer="baseline", config=base)])
    first = proposer.propose(state, base)
    assert first.proposer == "archetype" and first.meta["archetype"] == "dlinear"
    state.runs.append(RunInfo(run_id="run_0001", status="failed", proposer="archetype", config=first.config,
                              extra={"proposal": first.meta}))
    assert proposer.propose(state, base).meta["archetype"] == "patchtst42"  # a failed run counts as tried
    state.rejected.append({"proposer": "archetype", "archetype": "patchtst42", "error": "too many parameters"})
    assert proposer.propose(state, base).meta["archetype"] == "itransformer"
    state.rejected += [{"proposer": "archetype", "archetype": n} for n in ("itransformer", "tsmixer", "patchtst64")]
    assert proposer.pending(state) == []
    with pytest.raises(ValueError, match="every warm-start config has run"):
        proposer.propose(state, base)
    # An older study (another proposer already ran) is never interrupted by the warm start.
    older = AgentState(runs=[RunInfo(run_id="run_0000", proposer="baseline", config=base),
                             RunInfo(run_id="run_0001", proposer="tpe", config=base)])
    assert proposer.pending(older) == []


def test_two_warm_start_files_with_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    for folder in (tmp_path, tmp_path / "a"):
        (folder / "dlinear.py").write_text((ROOT / "configs" / "dlinear.py").read_text())
    with pytest.raises(ConfigError, match="two files are named 'dlinear'"):
        load_archetypes([tmp_path / "dlinear.py", tmp_path / "a" / "dlinear.py"])


def test_samplers_reach_every_family_after_the_warm_start(base):
    """Random search and TPE, shown the baseline and the archetype runs, propose all five families."""
    space = load_space(None)
    state = AgentState(runs=[RunInfo(run_id="run_0000", status="ok", val_mse=1.0, proposer="baseline", config=base)])
    for i, (name, config) in enumerate(load_archetypes(DEFAULT_ARCHETYPES), 1):
        state.runs.append(RunInfo(run_id=f"run_{i:04d}", status="ok", val_mse=0.7 + 0.01 * i, proposer="archetype",
                                  config=archetype_config(config, base), extra={"proposal": {"archetype": name}}))
    wanted = {"informer", "time-none", "patch-attention", "variate-attention", "time-mlp", "time-mlp-raw"}
    for sampler in ("random", "tpe"):
        proposer = make_proposer(sampler, space, seed=0)
        assert proposer.build_study(state).user_attrs["skipped_runs"] == []  # every archetype is a trial
        seen = {model_family(p.config["model"]).removesuffix("-ci")
                for p in proposer.suggest_candidates(state, base, 60)}
        assert wanted <= seen, (sampler, wanted - seen)


@pytest.mark.slow  # 7 real runs through the CLI: about a minute
def test_a_short_study_runs_the_baseline_then_each_archetype_then_the_sampler(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    tiny = load_config(tmp_path / "config.py").model_dump()
    files = []
    for name, model in TINY_ARCHETYPES.items():
        config = json.loads(json.dumps(tiny))
        config["model"].update(model)
        config["training"].update(lr=3e-3, max_epochs=50)  # max_epochs is the study's budget: ignored
        (tmp_path / f"{name}.py").write_text(render_config(config))
        files.append(f"{name}.py")
    space = {"data.seq_len": {"type": "categorical", "choices": [48]}, "model.d_model": {"type": "categorical",
             "choices": [8, 16]}, "model.n_heads": {"type": "categorical", "choices": [2]},
             "model.d_ff": {"type": "categorical", "choices": [16, 32]}, "model.e_layers": {"type": "int", "low": 1,
             "high": 2}, "model.decomp_kernel": {"type": "categorical", "choices": [13]}}
    (tmp_path / "space.json").write_text(json.dumps(space))
    proc = subprocess.run([PYTHON, "-m", "nas_agent_graph", "--max-runs", "7", "--proposer", "tpe", "--space",
                           "space.json", "--set", "training.max_epochs=1", "--set", "training.max_steps_per_epoch=5",
                           "--warm-start", *files], cwd=tmp_path, env=run_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_agent_state(tmp_path / "agent_state.json")
    assert [r.proposer for r in state.runs] == ["baseline"] + ["archetype"] * 4 + ["tpe"] * 2
    assert [r.extra["proposal"]["archetype"] for r in state.runs[1:5]] == list(TINY_ARCHETYPES)
    assert all(r.status == "ok" and r.val_mse is not None for r in state.runs), [(r.run_id, r.status) for r in state.runs]
    assert {model_family(r.config["model"]) for r in state.runs[:5]} == {
        "informer", "time-none-ci", "patch-attention-ci", "variate-attention", "time-mlp"}
    for run in state.runs[1:5]:  # the study's budget, not the archetype's max_epochs 50
        assert run.extra["incumbent_config"]["training"]["max_epochs"] == tiny["training"]["max_epochs"]
        assert run.config["training"]["max_epochs"] == 1  # --set, as for every run
    for run in state.runs[5:]:  # the sampler saw every earlier run as a trial
        optuna_meta = run.extra["proposal"]["optuna"]
        assert optuna_meta["skipped_runs"] == [] and optuna_meta["n_complete"] == int(run.run_id[-4:])
