"""`python -m nas_agent_graph.lora list|train|eval` as a user runs it, with the real embedded model."""
from __future__ import annotations

import json
import subprocess

import pytest

from nas_agent_graph.search_space import DEFAULT_SPACE
from tests.conftest import PYTHON, run_env
from tests.nas_agent_graph.lora.test_adapters import make_samples

MICRO_OVERRIDES = {**{k: None for k in DEFAULT_SPACE if k not in (
    "model.e_layers", "model.attn", "model.revin", "training.batch_size")},
    "model.e_layers": {"type": "categorical", "choices": [1, 2]}}


def lora_cli(cwd, *args, timeout=1200):
    return subprocess.run([PYTHON, "-m", "nas_agent_graph.lora", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=run_env(OMP_NUM_THREADS="2"))


def test_list_and_bad_input(tmp_path):
    empty = lora_cli(tmp_path, "list")
    assert empty.returncode == 0, empty.stderr
    assert "samples: 0" in empty.stdout and "adapter in use: none (base model)" in empty.stdout
    missing = lora_cli(tmp_path, "train", "--samples", "nope.jsonl", "--out", "a")
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr
    (tmp_path / "bad.jsonl").write_text(json.dumps({"key": "x", "response": "{}", "reward": 0.1}) + "\n")
    none = lora_cli(tmp_path, "train", "--samples", "bad.jsonl", "--out", "a")
    assert none.returncode == 2 and "no positive samples" in none.stderr


@pytest.mark.heavy  # a fine-tune and an evaluation of the embedded LLM
@pytest.mark.timeout(1800)
def test_train_then_eval_an_adapter_from_a_samples_file(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in make_samples(5, seed=4)))
    (tmp_path / "space.json").write_text(json.dumps(MICRO_OVERRIDES))
    trained = lora_cli(tmp_path, "train", "--samples", "samples.jsonl", "--out", "adapter",
                       "--lora", "steps=3", "--lora", "max_len=256", "--lora", "batch_size=2", "--lora", "lr=2e-3")
    assert trained.returncode == 0, trained.stderr[-3000:]
    verdict = json.loads(trained.stdout)
    assert verdict["ok"] and (tmp_path / "adapter" / "meta.json").is_file()
    meta = json.loads((tmp_path / "adapter" / "meta.json").read_text())
    assert meta["steps"] == 3 and meta["n_samples"] == 5 and len(meta["sample_keys"]) == 5
    evaluated = lora_cli(tmp_path, "eval", "--samples", "samples.jsonl", "--adapter", "adapter",
                         "--space", "space.json", "--held-out", "1")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = [line for line in evaluated.stdout.splitlines() if line.startswith("| base model") or
            line.startswith("| adapter")]
    assert len(rows) == 2 and all("/1 |" in row for row in rows), evaluated.stdout
