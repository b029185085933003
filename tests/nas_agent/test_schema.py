"""The model-space rules of the schema (nas_agent/schema.py): every invalid family combination
is refused with a message naming the key, its value and what is allowed, both by
validate_config and by `python train.py`, which then exits 2 without writing a run."""
import subprocess

import pytest

from nas_agent.config import ConfigError, render_config, validate_config
from nas_agent.schema import FAMILY_RULES
from tests.conftest import PYTHON, ROOT, run_env

# name -> (data section, model section, fragments the message must hold: key, value, what is allowed)
INVALID = {
    "patch_len_over_seq_len": (
        {"seq_len": 96}, {"head": "linear", "tokens": "patch", "patch_len": 128},
        ["model.patch_len", "got 128", "patch_len <= data.seq_len (96)"]),
    "stride_zero": (
        {}, {"head": "linear", "tokens": "patch", "stride": 0},
        ["model.stride", "got 0", "greater than or equal to 1"]),
    "variate_tokens_with_features_S": (
        {"features": "S"}, {"head": "linear", "tokens": "variate"},
        ["model.tokens", "'variate'", "data.features 'S'", "features 'M' or 'MS', or tokens 'time' or 'patch'"]),
    "decomp_kernel_over_seq_len": (
        {"seq_len": 24, "label_len": 12}, {"head": "linear", "decomp": "moving_avg", "decomp_kernel": 25},
        ["model.decomp_kernel", "got 25", "decomp_kernel <= data.seq_len (24)"]),
    "decoder_with_patch_tokens": (
        {}, {"head": "decoder", "tokens": "patch"},
        ["model.tokens", "with model.head 'decoder'", "got 'patch'", "expected 'time'"]),
    "decoder_with_independent_channels": (
        {}, {"head": "decoder", "channels": "independent"},
        ["model.channels", "with model.head 'decoder'", "got 'independent'", "expected 'mixed'"]),
    "decoder_with_mlp_mixer": (
        {}, {"head": "decoder", "mixer": "mlp"},
        ["model.mixer", "with model.head 'decoder'", "got 'mlp'", "expected 'attention'"]),
    "decoder_with_moving_avg": (
        {}, {"head": "decoder", "decomp": "moving_avg"},
        ["model.decomp", "with model.head 'decoder'", "got 'moving_avg'", "expected 'none'"]),
    "raw_tokens_with_attention": (
        {}, {"head": "linear", "mixer": "attention", "raw_tokens": True},
        ["model.mixer", "with model.raw_tokens True", "got 'attention'", "expected 'mlp'"]),
    "raw_tokens_with_no_mixer": (
        {}, {"head": "linear", "mixer": "none", "raw_tokens": True},
        ["model.mixer", "with model.raw_tokens True", "got 'none'", "expected 'mlp'"]),
    "raw_tokens_with_the_decoder": (
        {}, {"head": "decoder", "raw_tokens": True},
        ["model.head", "with model.raw_tokens True", "got 'decoder'", "expected 'linear'"]),
    "batch_norm_with_the_decoder": (
        {}, {"head": "decoder", "encoder_norm": "batch"},
        ["model.head", "with model.encoder_norm 'batch'", "got 'decoder'", "expected 'linear'"]),
    "batch_norm_with_the_mlp_mixer": (
        {}, {"head": "linear", "mixer": "mlp", "encoder_norm": "batch"},
        ["model.mixer", "with model.encoder_norm 'batch'", "got 'mlp'", "expected 'attention'"]),
    "res_attention_with_the_decoder": (
        {}, {"head": "decoder", "attn": "full", "res_attention": True},
        ["model.head", "with model.res_attention True", "got 'decoder'", "expected 'linear'"]),
    "res_attention_with_no_mixer": (
        {}, {"head": "linear", "mixer": "none", "attn": "full", "res_attention": True},
        ["model.mixer", "with model.res_attention True", "got 'none'", "expected 'attention'"]),
    "res_attention_with_probsparse": (
        {}, {"head": "linear", "mixer": "attention", "attn": "prob", "res_attention": True},
        ["model.attn", "with model.res_attention True", "got 'prob'", "expected 'full'",
         "set model.attn to 'full'"]),
    "variate_tokens_with_independent_channels": (
        {}, {"head": "linear", "tokens": "variate", "channels": "independent"},
        ["model.channels", "with model.tokens 'variate'", "got 'independent'", "expected 'mixed'"]),
}


def assert_names_key_value_and_allowed(message: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_family_is_refused_by_validate_config(name):
    data, model, fragments = INVALID[name]
    with pytest.raises(ConfigError) as e:
        validate_config({"data": data, "model": model}, "bad.py")
    assert_names_key_value_and_allowed(str(e.value), fragments)


def test_every_family_rule_is_covered():
    # A rule added to FAMILY_RULES without a refusal case above would go untested: each
    # (key, value) -> other needs a case that sets key to value and other to a value it refuses.
    rules = {(key, value, other): allowed for (key, value), needs in FAMILY_RULES.items()
             for other, allowed in needs.items()}
    covered = {(key, value, other) for _, m, _ in INVALID.values() for (key, value, other), allowed in rules.items()
               if m.get(key) == value and other in m and m[other] not in allowed}
    assert covered == set(rules)


# One refusal from each level of the schema (the model section, the cross-section checks) in
# the default suite; the rest cost ~3 s of subprocess each and run with the slow tests.
IN_DEFAULT_SUITE = ("decoder_with_patch_tokens", "patch_len_over_seq_len")


@pytest.mark.parametrize("name", [n if n in IN_DEFAULT_SUITE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(INVALID)])
def test_invalid_family_is_refused_by_train_py_without_a_run(name, tmp_path):
    data, model, fragments = INVALID[name]
    config = tmp_path / "BAD.py"
    # render_config writes any dict as a config file, valid or not.
    config.write_text(render_config({"data": data, "model": model}))
    runs = tmp_path / "runs"
    proc = subprocess.run([PYTHON, "train.py", "--config", str(config), "--tag", "x", "--runs-dir", str(runs)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_names_key_value_and_allowed(proc.stderr, fragments)
    assert "Traceback" not in proc.stderr
    assert not (runs / "x" / "metrics.json").exists() and not (runs / "x" / "config_used.py").exists()


@pytest.mark.parametrize("model", [
    {"head": "linear", "tokens": "patch", "patch_len": 96, "stride": 200},  # one patch of the window, one of padding
    {"head": "linear", "decomp": "moving_avg", "decomp_kernel": 96},
    {"head": "linear", "tokens": "variate", "channels": "mixed"},
])
def test_limits_themselves_are_allowed(model):
    assert validate_config({"data": {"seq_len": 96}, "model": model}).model.head == "linear"


def test_raw_tokens_need_batches_of_two_or_more():
    # Raw tokens are batch-normalised over the batch (TSMixer); a batch of one cannot train.
    model = {"head": "linear", "mixer": "mlp", "raw_tokens": True}
    with pytest.raises(ConfigError) as e:
        validate_config({"model": model, "training": {"batch_size": 1}}, "bad.py")
    assert_names_key_value_and_allowed(str(e.value), ["training.batch_size", "expected >= 2", "got 1"])
    validate_config({"model": model, "training": {"batch_size": 2}}, "ok.py")


@pytest.mark.parametrize("value", [-0.1, 0.95])
def test_attn_dropout_out_of_range_is_refused(value):
    with pytest.raises(ConfigError) as e:
        validate_config({"model": {"attn_dropout": value}}, "bad.py")
    assert_names_key_value_and_allowed(str(e.value), ["model.attn_dropout", str(value)])


def test_the_new_model_keys_default_alike_in_the_schema_and_the_model():
    # A config always passes the schema's value; a model built directly must behave the same.
    from model import ForecasterConfig, InformerConfig
    from nas_agent.schema import ModelConfig
    schema = ModelConfig()
    assert ForecasterConfig(seq_len=8, pred_len=4, enc_in=1, c_out=1).raw_tokens is schema.raw_tokens is False
    for cls, extra in ((ForecasterConfig, {}), (InformerConfig, {"label_len": 4, "dec_in": 1})):
        assert cls(seq_len=8, pred_len=4, enc_in=1, c_out=1, **extra).attn_dropout is schema.attn_dropout is None
