"""How a training sample is tokenised: the embedded model's real tokenizer and chat template."""
from __future__ import annotations

import pytest

from nas_agent_graph.llm import backend
from nas_agent_graph.lora.finetune import CUT_MARK, DEVICE_DEFAULTS, encode, with_device_defaults


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    directory, _ = backend.ensure_converted(backend.resolve_llm(None))
    return AutoTokenizer.from_pretrained(directory)


RESPONSE = '{"model.e_layers": 2, "training.lr": 0.001}'


def messages(middle_runs: int) -> list[dict]:
    runs = "\n".join(f"- run_{i:04d} MIDDLE val_mse {1 + i / 1000:.4f}" for i in range(middle_runs))
    return [{"role": "system", "content": "HEADMARK: you tune an Informer."},
            {"role": "user", "content": f"## Search space\nmodel.e_layers: int in [1, 2]\n## Runs\n{runs}\n"
                                        "## Answer\nTAILMARK: reply with one JSON object."}]


def test_a_short_prompt_is_kept_whole_and_the_loss_covers_reply_and_eos(tokenizer):
    ids, n_resp = encode(tokenizer, messages(3), RESPONSE, max_len=4096)
    reply = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert n_resp == len(reply) + 1 and ids[-1] == tokenizer.eos_token_id
    assert ids[-n_resp:-1] == reply
    text = tokenizer.decode(ids)
    assert "HEADMARK" in text and "TAILMARK" in text and "run_0002" in text and CUT_MARK.strip() not in text


def test_a_long_prompt_loses_its_middle_and_keeps_head_tail_and_reply(tokenizer):
    long = messages(400)
    full, _ = encode(tokenizer, long, RESPONSE, max_len=100_000)
    ids, n_resp = encode(tokenizer, long, RESPONSE, max_len=300)
    assert len(full) > 3000 and len(ids) <= 300
    text = tokenizer.decode(ids)
    # The instructions and the request survive; the run listing in between is what goes.
    assert "HEADMARK" in text and "TAILMARK" in text and CUT_MARK.strip() in text
    assert "run_0200" not in text
    assert ids[-n_resp:] == full[-n_resp:]  # the reply is never cut
    assert ids[:100] == full[:100] and ids[-n_resp - 100:] == full[-n_resp - 100:]


def test_device_defaults_fill_only_what_the_job_left_open():
    job = {"steps": 5, "max_len": None, "batch_size": None}
    assert with_device_defaults(job, "cpu") == {"steps": 5, "max_len": 1664, "batch_size": 1}
    assert with_device_defaults(job, "cuda:0") == {"steps": 5, **DEVICE_DEFAULTS["cuda"]}
    assert with_device_defaults({"max_len": 256, "batch_size": 3}, "cpu") == {"max_len": 256, "batch_size": 3}
    assert job["batch_size"] is None  # the job itself is left as it was
