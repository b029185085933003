"""Prompts rendered from prompts/*.j2: content, the token bound with 1,000 runs, and clear errors."""
import shutil

import pytest

from nas_agent.agent_state import AgentState
from nas_agent.config import load_config
from nas_agent_graph.prompting import (
    PROMPTS_DIR,
    TEMPLATES,
    PromptError,
    PromptLimits,
    code_messages,
    config_messages,
    estimate_tokens,
    messages_text,
    params_text,
    render,
    repair_messages,
)
from nas_agent_graph.search_space import load_space
from nas_agent_graph.testing import synthetic_study
from tests.conftest import ROOT

SPACE = load_space(None)
BASE = load_config(ROOT / "config.py").model_dump()


@pytest.fixture(scope="module")
def count_tokens():
    """Token counts from the embedded model's own tokenizer (its chat rendering included)."""
    from transformers import AutoTokenizer

    from nas_agent_graph.llm.backend import ensure_converted, render_prompt, resolve_llm
    path, _ = ensure_converted(resolve_llm(None))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return lambda messages: len(tokenizer(render_prompt(tokenizer, messages))["input_ids"])


def test_every_template_exists_and_renders():
    assert sorted(p.name for p in PROMPTS_DIR.glob("*.j2")) == sorted(TEMPLATES)
    state = synthetic_study(12)
    messages, info = config_messages(state, SPACE, BASE, limits=PromptLimits(), feedback="duplicate: run_0003")
    system, user = messages[0]["content"], messages[1]["content"]
    assert "ETTh1" in system and "JSON" in system
    for key in SPACE.entries:  # the whole space, with ranges
        assert key in user
    assert "## Incumbent" in user and "## Best runs" in user and "## Latest runs" in user
    assert "## Recent failures" in user and "CUDA out of memory" in user  # the end of the error is kept
    assert "duplicate: run_0003" in user
    assert info["counted_with"] == "estimate" and info["tokens"] == estimate_tokens(messages)
    repaired = repair_messages(messages, '{"a": 1}', "a: not a search-space key", SPACE)
    assert repaired[-2] == {"role": "assistant", "content": '{"a": 1}'}
    assert "not a search-space key" in repaired[-1]["content"] and "training.lr" in repaired[-1]["content"]
    code, _ = code_messages(state, SPACE, BASE, (ROOT / "model.py").read_text(), limits=PromptLimits())
    assert "build_model(config)" in code[1]["content"] and "```python" in code[1]["content"]
    assert messages_text(messages).startswith("### system\n")


def test_prompt_shows_validation_but_never_test_metrics():
    state = synthetic_study(30)
    messages, _ = config_messages(state, SPACE, BASE, limits=PromptLimits())
    text = messages_text(messages)
    best = min((r for r in state.runs if r.val_mse is not None), key=lambda r: r.val_mse)
    assert f"{best.val_mse:.4f}" in text
    assert "7.654" not in text and "test" not in text.lower().replace("latest", "")


def test_runs_in_flight_are_listed_as_running_not_as_failures():
    from nas_agent_graph.study.rules import study_view
    state = synthetic_study(6)
    flying = {"run_id": "run_0006", "proposal": {"config": state.runs[1].config, "raw_config": state.runs[1].config,
                                                 "proposer": "tpe", "parent_run_id": None, "meta": {}}}
    view = study_view(state, [flying])
    assert [r.run_id for r in view.runs][-1] == "run_0006" and len(state.runs) == 6  # the study is untouched
    user = config_messages(view, SPACE, BASE, limits=PromptLimits())[0][1]["content"]
    assert "- run_0006 [running] val_mse" in user
    assert "run_0006" not in user.split("## Recent failures", 1)[-1] or "## Recent failures" not in user
    tiny = config_messages(view, SPACE, BASE, limits=PromptLimits(last_k=0))[0][1]["content"]
    assert "run_0006" not in tiny.split("## Recent failures", 1)[1]


def test_incumbent_in_full_and_other_runs_as_differences():
    state = synthetic_study(10)
    user = config_messages(state, SPACE, BASE, limits=PromptLimits())[0][1]["content"]
    incumbent_line = user.split("## Incumbent (best so far)\n", 1)[1].splitlines()[0]
    assert incumbent_line.count('"model.') >= 8  # every key
    assert "differs from the incumbent in" in user


def test_family_guide_only_when_the_space_chooses_a_family():
    study = synthetic_study(3)
    guide = "several model families"
    system = config_messages(study, SPACE, BASE, limits=PromptLimits())[0][0]["content"]
    assert guide in system and "PatchTST-like" in system
    informer = load_space(ROOT / "spaces" / "informer.json")
    system = config_messages(study, informer, BASE, limits=PromptLimits())[0][0]["content"]
    assert guide not in system and "PatchTST" not in system and "Reply with exactly one JSON object" in system


# 2048: the model space's description (28 keys with their conditions) and the families take ~1700
# tokens with no run shown, so a tight budget still has room for a trimmed study.
@pytest.mark.parametrize("budget", [3072, 2048])
def test_prompt_bound_holds_with_1000_runs(count_tokens, budget):
    state = synthetic_study(1000)
    limits = PromptLimits(max_tokens=budget)
    messages, info = config_messages(state, SPACE, BASE, limits=limits, count_tokens=count_tokens,
                                     feedback="smoke test failed: " + "x" * 5000)
    assert info["counted_with"] == "tokenizer"
    assert info["tokens"] == count_tokens(messages) <= budget
    user = messages[1]["content"]
    assert "## Incumbent" in user and "run_0" in user  # still shows the study, trimmed
    if budget == 2048:
        assert info["trimmed"] and info["limits"]["last_k"] < limits.last_k
        return
    # at the default budget, the hybrid's candidates and the code prompt fit too
    candidates = [{"label": c, "params": params_text(SPACE.from_config(state.runs[i].config))}
                  for i, c in enumerate("ABCD")]
    messages, info = config_messages(state, SPACE, BASE, limits=limits, count_tokens=count_tokens,
                                     candidates=candidates, sampler={"name": "tpe", "n_complete": 857,
                                                                     "importances": "training.lr 0.41"})
    assert count_tokens(messages) <= budget and "D: {" in messages[1]["content"]
    messages, info = code_messages(state, SPACE, BASE, (ROOT / "model.py").read_text(), limits=limits,
                                   count_tokens=count_tokens)
    assert count_tokens(messages) <= budget


def test_budget_too_small_for_the_space_is_a_clear_error(count_tokens):
    with pytest.raises(PromptError, match=r"even with no past runs shown.*--prompt-tokens"):
        config_messages(synthetic_study(20), SPACE, BASE, limits=PromptLimits(max_tokens=300),
                        count_tokens=count_tokens)


def test_broken_templates_name_the_file(tmp_path):
    with pytest.raises(PromptError, match=r"nope\.j2 does not exist"):
        render("nope.j2")
    for name in TEMPLATES:
        shutil.copy(PROMPTS_DIR / name, tmp_path / name)
    (tmp_path / "system.j2").write_text("{{ task.dataset }} {{ missing_variable }}")
    with pytest.raises(PromptError, match=r"system\.j2.*missing_variable"):
        config_messages(AgentState(), SPACE, BASE, limits=PromptLimits(), prompts_dir=tmp_path)
    (tmp_path / "system.j2").write_text("line one\n{% if %}")
    with pytest.raises(PromptError, match=r"system\.j2:2"):
        config_messages(AgentState(), SPACE, BASE, limits=PromptLimits(), prompts_dir=tmp_path)


def test_task_names_the_data_set_and_the_budget_runs_really_get():
    base = {**BASE, "data": {**BASE["data"], "path": "data/exchange_rate.csv"},
            "training": {**BASE["training"], "max_epochs": 3, "max_steps_per_epoch": 50}}
    system, user = (m["content"] for m in config_messages(AgentState(), SPACE, base, limits=PromptLimits())[0])
    assert "exchange_rate" in system and "ETTh1" not in system + user
    assert "at most 3 epochs, 50 batches per epoch" in user
