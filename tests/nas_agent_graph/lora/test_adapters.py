"""LoRA self-improvement with the REAL embedded model on the CPU: training, reloading, the gate,
rollback, and the settings parser. Samples use the real config prompt of a small study."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from nas_agent.agent_state import AgentState, RunInfo, add_run
from nas_agent_graph.llm.chat_model import LocalChatModel, from_dicts
from nas_agent_graph.lora.adapters import LoraSettings, active_adapter, check_rollback, evaluate, gate_decision, registry, split, train_adapter
from nas_agent_graph.prompting import PromptLimits, config_messages
from nas_agent_graph.proposers import OptunaProposer
from nas_agent_graph.search_space import DEFAULT_SPACE, space_from_overrides
from tests.conftest import PYTHON, run_env
from tests.nas_agent_graph.llm.test_proposer import BASE, small_study

# A space of 4 categorical keys: replies of ~35 tokens, so a few CPU steps teach the format (a full
# space's ~200-token replies with floats need ~50 steps, see bench/lora_speed.py).
MICRO = space_from_overrides({**{k: None for k in DEFAULT_SPACE if k not in (
    "model.e_layers", "model.attn", "model.revin", "training.batch_size")},
    "model.e_layers": {"type": "categorical", "choices": [1, 2]}})
# max_len 512 keeps these ~450-550-token prompts (nearly) whole: with 256 only the system message and
# the request were left after the middle cut, and 12 steps no longer taught the format.
QUICK = LoraSettings(steps=12, lr=2e-3, batch_size=2, max_len=512, r=8, alpha=16, held_out=2, gate_max_new_tokens=80)
# The adapter that must answer in format. 12 steps taught it on a CPU with native bf16, but in fp32
# (a CPU without it) its greedy replies still dropped a `":` after one key ('{"model.revinfalse,...'),
# so none parsed; 20 steps is the margin.
GOOD = replace(QUICK, steps=20)


def make_samples(n: int, seed: int, response: str | None = None) -> list[dict]:
    """n samples: a real propose_config prompt of a growing study, and a config reply as JSON
    (or the given wrong-format `response`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        state = small_study(2 + i % 3)
        messages, _ = config_messages(state, MICRO, BASE, limits=PromptLimits())
        params = OptunaProposer("random", MICRO, seed=rng.randrange(10**6)).propose(state, BASE).meta["optuna"]["params"]
        text = response or json.dumps(params, separators=(",", ":"))
        out.append({"key": f"s{seed}-{i}", "messages": messages, "response": text, "reward": 0.9, "val_mse": 1.0 - i / 100})
    return out


@pytest.fixture(scope="module")
def chat():
    torch.set_num_threads(1)
    model = LocalChatModel(temperature=0.0, max_new_tokens=80)
    model.load()
    return model


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter_v1"
    verdict = train_adapter(make_samples(6, seed=1), out, 1, GOOD, python=PYTHON, env=run_env(OMP_NUM_THREADS="2"))
    assert verdict["ok"], verdict
    return out, verdict


@pytest.mark.heavy  # trains the module's adapter (20 steps): ~250 s here
def test_a_few_lora_steps_reduce_training_loss(good_adapter):
    out, verdict = good_adapter
    meta = json.loads((out / "meta.json").read_text())
    losses = meta["losses"]
    assert len(losses) == GOOD.steps and meta["n_samples"] == 6 and meta["base_model"].startswith("gemma-3-270m")
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    assert (out / "adapter_model.safetensors").stat().st_size > 100_000 and (out / "loss_curve.png").exists()
    assert (out / "adapter_config.json").exists() and verdict["final_loss"] == losses[-1]
    # fp32 weights of the 270M model alone are ~1 GB; the record is the training process's own peak
    assert meta["settings"]["batch_size"] == 2 and 1e9 < meta["peak_rss_bytes"] < 24e9, meta["peak_rss_bytes"]


@pytest.mark.heavy  # needs the module's adapter (~250 s) and greedy generations here
def test_adapter_reloads_and_changes_greedy_output(chat, good_adapter):
    out, _ = good_adapter
    messages = from_dicts(make_samples(1, seed=9)[0]["messages"])
    base = chat.invoke(messages, max_new_tokens=40).content
    tuned = chat.model_copy(update={"adapter": "t1", "adapter_path": str(out)}).invoke(messages, max_new_tokens=40)
    assert tuned.content != base
    assert tuned.response_metadata["adapter"] == "t1"
    assert chat.invoke(messages, max_new_tokens=40).content == base  # the base model is still there, unchanged


@pytest.mark.heavy  # trains a second adapter and runs 6 greedy evaluations
def test_gate_rejects_an_adapter_trained_on_wrong_format_replies(chat, good_adapter, tmp_path):
    bad_samples = make_samples(6, seed=2, response="I would try a bigger model with more dropout and a lower lr.")
    bad = tmp_path / "adapter_bad"
    assert train_adapter(bad_samples, bad, 2, QUICK, python=PYTHON, env=run_env(OMP_NUM_THREADS="2"))["ok"]
    held = [s["messages"] for s in make_samples(2, seed=5)]
    targets = [OptunaProposer("random", MICRO, seed=3).propose(AgentState(), BASE).meta["optuna"]["params"]]
    good_out, _ = good_adapter
    base_score = evaluate(chat, None, held, MICRO, targets, QUICK.gate_max_new_tokens)
    bad_score = evaluate(chat, ("bad", str(bad)), held, MICRO, targets, QUICK.gate_max_new_tokens)
    good_score = evaluate(chat, ("good", str(good_out)), held, MICRO, targets, QUICK.gate_max_new_tokens)
    print(f"\nbase {base_score['validity']} bad {bad_score['validity']} good {good_score['validity']}")
    assert bad_score["validity"] == 0 and bad_score["json_objects"] == 0 and "bigger model" in bad_score["replies"][0]
    promote, why = gate_decision(bad_score, base_score)
    assert not promote and "no valid reply" in why
    assert good_score["validity"] > 0 and good_score["closeness"] > 0  # the JSON-trained adapter answers in format
    assert good_score["json_objects"] >= good_score["valid"]
    assert gate_decision(good_score, bad_score)[0]


def _llm_run(i: int, adapter: str | None, reward: float) -> RunInfo:
    return RunInfo(run_id=f"run_{i:04d}", status="ok", val_mse=1.0, proposer="llm", reason="-",
                   extra={"reward": reward, "proposal": {"llm": {"adapter": adapter, "valid": True}}})


def test_rollback_triggers_on_a_scripted_sequence_of_bad_runs():
    settings = LoraSettings(rollback_window=3, rollback_margin=0.15)
    state = AgentState(max_runs=50)
    for i in range(4):
        add_run(state, _llm_run(i, None, 0.6))  # the base model's runs
    reg = registry(state)
    reg["adapters"].append({"version": 1, "path": "x", "status": "promoted", "previous": None, "rollback_checked": False})
    reg["active"] = 1
    for i in range(4, 6):
        add_run(state, _llm_run(i, "v1", -1.0))
    assert check_rollback(state, settings) is None  # 2 runs: too early to judge
    add_run(state, _llm_run(6, "v1", -1.0))
    event = check_rollback(state, settings)
    assert event["kind"] == "rolled_back" and event["version"] == 1
    assert reg["active"] is None and reg["adapters"][0]["status"] == "rolled_back"
    assert reg["adapters"][0]["rollback_check"]["mean_reward"] == -1.0


def test_a_good_adapter_is_not_rolled_back():
    state = AgentState(max_runs=50)
    for i in range(3):
        add_run(state, _llm_run(i, None, 0.5))
    reg = registry(state)
    reg["adapters"].append({"version": 1, "path": "x", "status": "promoted", "previous": None, "rollback_checked": False})
    reg["active"] = 1
    for i in range(3, 8):
        add_run(state, _llm_run(i, "v1", 0.45))  # within the margin
    assert check_rollback(state, LoraSettings(rollback_window=5)) is None
    assert reg["active"] == 1 and reg["adapters"][0]["rollback_checked"]


def test_split_holds_out_the_latest_prompts():
    samples = make_samples(5, seed=0)
    samples[1]["reward"] = 0.1  # not positive
    train, held = split(samples, LoraSettings(held_out=2))
    assert [s["key"] for s in held] == ["s0-3", "s0-4"]
    assert [s["key"] for s in train] == ["s0-0", "s0-2"]


def test_settings_parser_names_the_bad_item():
    s = LoraSettings.from_items(["trigger=3", "steps=5", "target_modules=q_proj,v_proj", "max_len=none"])
    assert (s.trigger, s.steps, s.target_modules, s.max_len) == (3, 5, ("q_proj", "v_proj"), None)
    assert LoraSettings.from_items(["off"]).enabled is False
    assert (LoraSettings().batch_size, LoraSettings.from_items(["batch_size=2"]).batch_size) == (None, 2)
    with pytest.raises(ValueError, match="'batch_size=x'.*not a valid int"):
        LoraSettings.from_items(["batch_size=x"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        LoraSettings.from_items(["batch_size=0"])
    with pytest.raises(ValueError, match="'trigger=x'.*not a valid int"):
        LoraSettings.from_items(["trigger=x"])
    with pytest.raises(ValueError, match="KEY one of"):
        LoraSettings.from_items(["rank=8"])


class NoModelChat:
    """Stands in for the chat model where no generation happens (training fails before the gate)."""
    model_spec, quant, adapter, adapter_path = "/nonexistent/base-model", None, None, None

    def load(self):
        raise AssertionError("the gate must not run after a failed training")


@pytest.mark.slow  # a real fine-tune job: ~13 s here
def test_trigger_counts_unseen_positives_and_a_failed_training_is_recorded(tmp_path):
    from nas_agent.atomic import append_jsonl
    from nas_agent_graph.lora.adapters import finetune_and_gate, finetune_due, samples_path

    settings = LoraSettings(trigger=3, held_out=1)
    path = samples_path(tmp_path)
    path.parent.mkdir(parents=True)
    samples = make_samples(4, seed=3)
    samples[0]["reward"] = 0.2  # not positive
    for s in samples[:3]:
        append_jsonl(path, s)
    state = AgentState(max_runs=10)
    assert not finetune_due(state, tmp_path, settings)  # 2 positives
    append_jsonl(path, samples[3])
    assert finetune_due(state, tmp_path, settings)
    assert not finetune_due(state, tmp_path, LoraSettings(trigger=3, enabled=False))
    record = finetune_and_gate(state, tmp_path, settings, NoModelChat(), MICRO, python=PYTHON, env=run_env())
    assert record["status"] == "failed" and "does not exist" in record["reason"], record
    assert state.meta["lora"]["active"] is None and state.meta["lora"]["events"][-1]["kind"] == "failed"
    assert not finetune_due(state, tmp_path, settings)  # the same samples do not trigger again
    assert (tmp_path / "lora" / "train_v1.log").exists() and (tmp_path / "lora" / "job_v1.json").exists()


def test_a_missing_adapter_falls_back_to_the_base_model(tmp_path, caplog):
    from nas_agent_graph.llm.proposer import LLMProposer
    from tests.nas_agent_graph.llm.test_proposer import ScriptedChat

    state = AgentState(max_runs=10)
    reg = registry(state)
    reg["adapters"].append({"version": 1, "path": str(tmp_path / "gone"), "status": "promoted", "previous": None})
    reg["active"] = 1
    proposer = LLMProposer(ScriptedChat(), MICRO, seed=0)
    proposer.use_adapter(active_adapter(state))
    assert proposer.chat.adapter is None and "is missing; proposing with the base model" in caplog.text


@pytest.mark.slow  # a real fine-tune job up to its cap: ~20 s here
def test_a_fine_tune_over_its_memory_cap_is_a_recorded_failure(tmp_path):
    from nas_agent.atomic import append_jsonl
    from nas_agent_graph.lora.adapters import finetune_and_gate, samples_path

    settings = LoraSettings(trigger=2, held_out=1, steps=2, memory_gb=1.0)  # the model alone needs more
    path = samples_path(tmp_path)
    path.parent.mkdir(parents=True)
    for sample in make_samples(3, seed=4):
        append_jsonl(path, sample)
    state = AgentState(max_runs=10)
    record = finetune_and_gate(state, tmp_path, settings, LocalChatModel(temperature=0.0), MICRO, python=PYTHON,
                               env=run_env())
    assert record["status"] == "failed", record
    assert record["reason"].startswith("training failed: exceeded its memory cap of 1 GB (--lora memory_gb)"), \
        record["reason"]
    assert state.meta["lora"]["active"] is None and state.meta["lora"]["events"][-1]["kind"] == "failed"
