"""A short real study with a low LoRA trigger: the loop fine-tunes, gates, promotes and then
proposes with the adapter (real embedded model, real training runs, the CLI in a subprocess)."""
from __future__ import annotations

import json
import subprocess

import pytest

from nas_agent.agent_state import load_agent_state
from nas_agent_graph.lora.adapters import read_samples
from nas_agent_graph.search_space import DEFAULT_SPACE
from tests.conftest import PYTHON, TINY_CONFIG, run_env

MICRO_FILE = {**{k: None for k in DEFAULT_SPACE if k not in ("model.e_layers", "model.attn", "model.revin",
                                                             "training.batch_size")},
              "model.e_layers": {"type": "categorical", "choices": [1, 2]}}
# gate_tolerance=1: the gate compares validity only; closeness on one held-out prompt would be a
# coin flip between two valid replies. trigger=4: the adapter trains on 3 samples (1 is held out).
# Trained on a single sample it memorised it (loss 1e-5) and replied nothing to the next prompt.
LORA = ["trigger=4", "reward_threshold=0", "held_out=1", "steps=12", "lr=1e-3", "max_len=512", "batch_size=2",
        "gate_max_new_tokens=80", "gate_tolerance=1"]
RUNS = 6


@pytest.mark.heavy
@pytest.mark.timeout(1800)  # 6 LLM proposals, 7 runs, one fine-tune and the gate: ~5 min on 2 idle cores
def test_short_loop_finetunes_promotes_and_uses_the_adapter_and_a_new_session_keeps_it(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "space.json").write_text(json.dumps(MICRO_FILE))
    args = [PYTHON, "-m", "nas_agent_graph", "--max-runs", str(RUNS), "--proposer", "llm", "--space", "space.json",
            "--set", "training.max_epochs=1", "--set", "training.max_steps_per_epoch=5"]
    for item in LORA:
        args += ["--lora", item]
    proc = subprocess.run(args, cwd=tmp_path, env=run_env(OMP_NUM_THREADS="2"),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_agent_state(tmp_path / "agent_state.json")
    lora = state.meta["lora"]
    first = lora["adapters"][0]
    assert first["version"] == 1 and first["train"]["ok"], first
    assert first["status"] == "promoted", first["reason"]
    assert lora["active"] == 1 and [e["kind"] for e in lora["events"]] == ["promoted"]
    adapter = tmp_path / "runs" / "lora" / "adapter_v1"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "loss_curve.png").exists()
    meta = json.loads((adapter / "meta.json").read_text())
    assert meta["final_loss"] < meta["first_loss"]
    # runs before the fine-tune used the base model, the runs after it the adapter
    after = first["promoted_at_run"]
    assert 5 <= after < RUNS, after
    adapters = [json.loads((tmp_path / "runs" / f"run_{i:04d}" / "llm.json").read_text())["adapter"]
                for i in range(1, RUNS)]
    assert adapters == [None] * (after - 1) + ["v1"] * (RUNS - after)
    samples = read_samples(tmp_path / "runs" / "lora" / "samples.jsonl")
    assert [s["run_id"] for s in samples] == [f"run_{i:04d}" for i in range(RUNS)]
    assert samples[-1]["adapter_version"] == "v1" and samples[1]["messages"][0]["role"] == "system"
    listing = subprocess.run([PYTHON, "-m", "nas_agent_graph.lora", "list"], cwd=tmp_path,
                             env=run_env(), capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "| v1 | promoted |" in listing.stdout and "adapter in use: v1" in listing.stdout

    # A new session (as after a crash: nothing but the files) proposes with the promoted adapter
    # from agent_state.json at once, and does not train it again.
    args[args.index("--max-runs") + 1] = str(RUNS + 1)
    proc = subprocess.run(args, cwd=tmp_path, env=run_env(OMP_NUM_THREADS="2"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "runs" / f"run_{RUNS:04d}" / "llm.json").read_text())
    assert resumed["adapter"] == "v1"
    lora = load_agent_state(tmp_path / "agent_state.json").meta["lora"]
    assert lora["active"] == 1 and len(lora["adapters"]) == 1
