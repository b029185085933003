"""The llm and hybrid proposers with the REAL embedded model (Gemma-3-270M on the CPU).

Proposals are generated, validated, smoke-tested and trained for real on a tiny space; the
only fake is the scripted chat of the model-code graph test (graph logic: what happens to
accepted code), since the 270M model cannot be relied on to write a working model file.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from langchain_core.messages import AIMessage

from nas_agent.agent_state import AgentState, RunInfo, add_run, load_agent_state
from nas_agent.config import parse_config_source, render_config, validate_config
from nas_agent_graph.cli import run_search
from nas_agent_graph.context import Context, Session
from nas_agent_graph.display import PlainDisplay
from nas_agent_graph.launcher import launch_run
from nas_agent_graph.llm import backend
from nas_agent_graph.llm.chat_model import LocalChatModel
from nas_agent_graph.llm.proposer import LLMProposer, extract_code, sampler_turn
from nas_agent_graph.prompting import PromptLimits
from nas_agent_graph.proposers import OptunaProposer, ProposalError, llm_validity
from nas_agent_graph.search_space import space_from_overrides
from nas_agent_graph.validation import check_proposal
from tests.conftest import PYTHON, ROOT, TINY_CONFIG, run_env
from nas_agent_graph.testing import TINY_SPACE

SPACE = space_from_overrides(TINY_SPACE)
BASE = validate_config(parse_config_source(TINY_CONFIG), "tiny").model_dump()


@pytest.fixture(scope="module")
def chat():
    torch.set_num_threads(1)  # the other core runs the smoke tests and training
    model = LocalChatModel(temperature=0.7, max_new_tokens=384)
    model.load()
    return model


def small_study(n: int = 3) -> AgentState:
    """n finished runs of the tiny space, the first one the best."""
    state = AgentState(max_runs=100)
    opt = OptunaProposer("random", SPACE, seed=1)
    for i in range(n):
        proposal = opt.propose(state, BASE, 0)
        add_run(state, RunInfo(run_id=f"run_{i:04d}", status="ok", val_mse=1.0 + i / 10, accepted=i == 0,
                               proposer="random", config=proposal.config, reason="test",
                               history_summary=f"Ran 1 epoch; val_mse {1.0 + i / 10:.3f}."))
    return state


def test_sampler_turns_are_an_exact_even_fraction():
    turns = [n for n in range(20) if sampler_turn(n, 0.25)]
    assert turns == [3, 7, 11, 15, 19]
    assert not any(sampler_turn(n, 0.0) for n in range(50)) and all(sampler_turn(n, 1.0) for n in range(50))


def test_llm_proposal_validates_and_launches(chat, tmp_path):
    state = small_study()
    proposer = LLMProposer(chat, SPACE, seed=3, limits=PromptLimits(max_tokens=2048))
    proposal = proposer.propose(state, BASE, attempt=0, feedback=None)
    llm = proposal.meta["llm"]
    assert proposal.proposer == "llm"
    assert llm["valid_first"] and llm["constrained"] and len(llm["calls"]) == 1
    assert llm["model"].startswith("gemma-3-270m") and llm["device"] == "cpu" and llm["quant"] == "none"
    assert 0 < llm["prompt"]["tokens"] <= 2048 and llm["completion_tokens"] > 20 and llm["latency_s"] > 0
    assert json.loads(proposal.meta["response"])  # the reply itself is the JSON
    assert "## Incumbent" in proposal.meta["prompt"] and "run_0000" in proposal.meta["prompt"]
    verdict = check_proposal(proposal.config, state, python=PYTHON, smoke_timeout=120, env=run_env())
    assert verdict.ok, verdict.message
    config = dict(verdict.config, training={**verdict.config["training"], "max_epochs": 1,
                                            "max_steps_per_epoch": 5})
    result = launch_run(tmp_path / "runs" / "run_0003", render_config(config), run_id="run_0003",
                        runs_dir=tmp_path / "runs", python=PYTHON, env=run_env())
    assert result.status == "ok", result.error_tail
    assert result.metrics["val_mse"] > 0


def test_unusable_reply_gets_one_repair_then_is_recorded_as_data(chat):
    short = chat.model_copy(update={"max_new_tokens": 12})  # every reply is cut off mid-object
    proposer = LLMProposer(short, SPACE, seed=0)
    with pytest.raises(ProposalError, match="cut off at max_new_tokens=12") as caught:
        proposer.propose(small_study(), BASE, attempt=0, feedback=None)
    llm = caught.value.meta["llm"]
    assert [c["valid"] for c in llm["calls"]] == [False, False]
    assert not llm["valid_first"] and not llm["valid"] and not llm["repaired"]
    assert "Your reply could not be used" in caught.value.meta["prompt"]  # the repair prompt was sent


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes here
def test_without_constrained_decoding_it_falls_back_to_extraction(chat, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no grammar today")
    monkeypatch.setattr(backend, "compile_schema", broken)
    proposer = LLMProposer(chat.model_copy(update={"max_new_tokens": 200}), SPACE, seed=0)
    try:
        llm = proposer.propose(small_study(), BASE, attempt=0, feedback=None).meta["llm"]
    except ProposalError as e:
        llm = e.meta["llm"]
    first = llm["calls"][0]
    assert first["constrained"] is False and "no grammar today" in first["fallback_reason"]
    assert not llm["constrained"]
    # a valid reply needed no repair; an invalid one got exactly one
    assert len(llm["calls"]) == (1 if first["valid"] else 2)


@pytest.mark.slow  # a CLI study with LLM proposals (~60 s); the default suite must stay under 15 min
def test_cli_hybrid_study_traces_every_llm_run(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    args = [PYTHON, "-m", "nas_agent_graph", "--max-runs", "3", "--space", "space.json", "--proposer", "hybrid",
            "--sampler-fraction", "0.5", "--warm-start", "off", "--set", "training.max_epochs=1", "--set", "training.max_steps_per_epoch=5"]
    proc = subprocess.run(args, cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_agent_state(tmp_path / "agent_state.json")
    assert [r.proposer for r in state.runs] == ["baseline", "tpe", "hybrid"]  # run 1 is the sampler's turn
    assert state.runs[1].extra["proposal"]["hybrid"]["mode"] == "sampler only"
    hybrid = state.runs[2].extra["proposal"]["hybrid"]
    assert hybrid["mode"] == "llm" and ("picked" in hybrid or "edited" in hybrid) and len(hybrid["candidates"]) == 4
    run_dir = tmp_path / "runs" / "run_0002"
    llm = json.loads((run_dir / "llm.json").read_text())
    assert llm["model"].startswith("gemma-3-270m") and llm["valid"] and llm["generation"]["temperature"] == 0.7
    assert llm["prompt_tokens"] > 0 and llm["completion_tokens"] > 0 and llm["latency_s"] > 0
    assert "## Candidates from the tpe sampler" in (run_dir / "prompt.txt").read_text()
    assert json.loads((run_dir / "response.txt").read_text())
    assert json.loads((run_dir / "proposal.json").read_text())["proposer"] == "hybrid"
    assert not (tmp_path / "runs" / "run_0001" / "llm.json").exists()  # the sampler's run has no LLM trace
    assert "prompt" not in state.runs[2].extra["proposal"]  # prompts stay in the run folder
    assert llm_validity(state) == {"proposals": 1, "valid_first": 1, "valid": 1, "valid_first_rate": 1.0,
                                   "valid_rate": 1.0, "constrained": 1}
    assert "LLM proposals: 1, valid at the first reply 100%" in proc.stderr + proc.stdout
    # the LLM's config is told back to the sampler: its rebuilt study holds run_0002 as a trial
    study = OptunaProposer("tpe", SPACE, 0).build_study(state)
    assert "run_0002" in [t.user_attrs["run_id"] for t in study.trials]


@pytest.mark.parametrize("llm, words", [
    ("/nonexistent/model-dir", "does not exist"),
    ("nobody-here/no-such-model-7b", "not in the local Hugging Face cache"),
])
def test_cli_bad_llm_fails_offline_with_a_clear_message(tmp_path, llm, words):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    proc = subprocess.run([PYTHON, "-m", "nas_agent_graph", "--max-runs", "2", "--proposer", "llm", "--llm", llm],
                          cwd=tmp_path, env=run_env(HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "run_0000").exists()  # nothing ran


# ----------------------------------------------------------------------------- model code (--allow-code)

LAST_VALUE_MODEL = '''
import torch
import torch.nn as nn


class LastValue(nn.Module):
    """Repeats the last observed value, plus a learned offset per channel."""

    def __init__(self, pred_len: int, channels: int):
        super().__init__()
        self.pred_len = pred_len
        self.offset = nn.Parameter(torch.zeros(channels))

    def forward(self, x_enc, x_mark_enc, x_dec, x_mark_dec):
        last = x_enc[:, -1:, :]
        return last.repeat(1, self.pred_len, 1) + self.offset


def build_model(config):
    return LastValue(config["data"]["pred_len"], config["model"]["c_out"])
'''


class ScriptedChat:
    """Graph-logic fake: answers a model-code request with LAST_VALUE_MODEL in a fence."""
    max_new_tokens = 384
    adapter = adapter_path = None

    def __init__(self):
        self.requests = []

    def load(self):
        return None, None, {"model": "scripted", "path": "-", "quant": "none", "device": "cpu", "dtype": "float32"}

    def count_tokens(self, messages):
        return sum(len(m["content"]) // 4 for m in messages)

    def settings(self):
        return {"temperature": 0.0}

    def invoke(self, messages, json_schema=None, seed=None, max_new_tokens=None):
        self.requests.append(messages[-1].content)
        text = "Here is the file:\n```python\n" + LAST_VALUE_MODEL + "```\n"
        return AIMessage(content=text, additional_kwargs={"parsed": None},
                         response_metadata={"prompt_tokens": 10, "completion_tokens": 100, "constrained": False})


def test_extract_code():
    assert extract_code("x\n```python\ndef build_model(c):\n    pass\n```\nbye") == "def build_model(c):\n    pass\n"
    assert extract_code("```python\nprint(1)\n```") is None
    assert extract_code("def build_model(c):\n    return c") == "def build_model(c):\n    return c\n"
    assert extract_code("sorry, no code") is None


@pytest.mark.slow  # an LLM code proposal and two runs: ~42 s here
def test_accepted_model_code_becomes_the_incumbent_model(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG.replace('"lr": 1e-3', '"lr": 1e-6'))  # a poor baseline
    model_path = tmp_path / "model.py"
    model_path.write_text((ROOT / "model.py").read_text())
    chat = ScriptedChat()
    proposer = LLMProposer(chat, SPACE, seed=0, allow_code=True, code_fraction=1.0, model_path=model_path)
    ctx = Context(state_path=tmp_path / "agent_state.json", runs_dir=tmp_path / "runs",
                  config_path=tmp_path / "config.py", max_runs=2, session=Session(proposer=proposer, display=PlainDisplay()),
                  overrides=["training.max_epochs=1", "training.max_steps_per_epoch=5"], model_path=model_path,
                  env=run_env())
    assert run_search(ctx) == 0
    state = load_agent_state(ctx.state_path)
    code_run = state.runs[1]
    assert code_run.proposer == "llm-code" and code_run.status == "ok", code_run.reason
    assert "build_model(config)" in chat.requests[0]  # the model-code prompt was used
    run_dir = tmp_path / "runs" / "run_0001"
    assert (run_dir / "model.py").read_text() == LAST_VALUE_MODEL.strip() + "\n"
    assert "--model" in json.loads((run_dir / "launch.json").read_text())["cmd"]
    assert code_run.extra["proposal"]["code_sha256"] and "model_code" not in code_run.extra["proposal"]
    assert state.runs[0].val_mse > code_run.val_mse, "the last-value model should beat a 5-step lr=1e-6 Informer"
    assert code_run.accepted
    assert model_path.read_text() == LAST_VALUE_MODEL.strip() + "\n"  # the incumbent model now
    kept = tmp_path / "runs" / "incumbents" / "model_before_run_0001.py"
    assert kept.read_text() == (ROOT / "model.py").read_text()  # the previous one is kept


def test_parameter_importances_appear_once_enough_runs_are_scored():
    from nas_agent_graph.llm.proposer import IMPORTANCE_MIN_RUNS, importances

    few = OptunaProposer("tpe", SPACE, 0).build_study(small_study(IMPORTANCE_MIN_RUNS - 1))
    assert importances(few) is None
    state = small_study(24)
    for i, run in enumerate(state.runs):  # val_mse driven by one parameter only (one every run has)
        run.val_mse = 1.0 + (0.5 if SPACE.from_config(run.config)["model.revin"] else 0.0) + 0.001 * i
    found = importances(OptunaProposer("tpe", SPACE, 0).build_study(state))
    assert set(found) <= set(SPACE.entries) and max(found, key=found.get) == "model.revin"


class RepeatingChat(ScriptedChat):
    """Proposer-logic fake: always answers with the same config, as a small model at low temperature does."""

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.temperature = 0.7

    def invoke(self, messages, json_schema=None, seed=None, max_new_tokens=None, temperature=None):
        self.requests.append((messages[-1].content, temperature))
        text = json.dumps(self.params)
        return AIMessage(content=text, additional_kwargs={"parsed": json.loads(text)},
                         response_metadata={"prompt_tokens": 10, "completion_tokens": 50, "constrained": True})


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_repeated_config_is_asked_again_then_replaced(hybrid):
    state = small_study(3)
    repeated = SPACE.from_config(state.runs[1].config)
    chat = RepeatingChat(repeated)
    sampler = OptunaProposer("tpe", SPACE, seed=0) if hybrid else None
    proposer = LLMProposer(chat, SPACE, seed=0, sampler=sampler, sampler_fraction=0.0)
    proposal = proposer.propose(state, BASE, attempt=0, feedback=None)
    dedup = proposal.meta["dedup"]
    assert dedup["repeated"] == "run_0001" and dedup["asked_again"] == 2
    assert [t for _, t in chat.requests[1:]] == [pytest.approx(1.1), pytest.approx(1.5)]  # hotter each time
    assert "already ran as run_0001" in chat.requests[1][0]
    assert ("sampler candidate" in dedup["fallback"]) == hybrid
    new = SPACE.from_config(proposal.config)
    assert all(new != SPACE.from_config(r.config) for r in state.runs)
    assert [c["purpose"] for c in proposal.meta["llm"]["calls"][1:]] == ["repeat", "repeat"]
