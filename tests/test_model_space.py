"""Tests for the model space beyond Informer (model.py, issue 12): every family forward and
backward in M, S and MS modes, channel independence, iTransformer's variate equivariance,
the moving-average decomposition, patching and RevIN's affine equivariance.

Models are built the way train.py builds them: a config validated by the schema, the
channel counts filled in from the data mode, then build_model.
"""
import itertools

import pytest
import torch

from model import (FeatureMLP, FeedForward, Forecaster, ForecasterConfig, FullAttention, Informer,
                   MovingAverage, ProbAttention, TokenBatchNorm, Tokenizer, apply_dropout, build_model,
                   full_attention, n_patches, residual_attention)
from nas_agent.config import validate_config
from tests.conftest import cpu_ops

SEQ_LEN, LABEL_LEN, PRED_LEN, BATCH = 24, 8, 6, 3
N_VARS = 7  # ETTh1's channel count
# Data mode -> (enc_in, c_out), as nas_agent.data sets them.
MODES = {"M": (N_VARS, N_VARS), "S": (1, 1), "MS": (N_VARS, 1)}
TINY = dict(d_model=8, n_heads=2, e_layers=2, d_ff=8, dropout=0.1, patch_len=8, stride=4, decomp_kernel=5)
MIXERS = {"prob": dict(mixer="attention", attn="prob"), "full": dict(mixer="attention", attn="full"),
          "mlp": dict(mixer="mlp"), "mlp-raw": dict(mixer="mlp", raw_tokens=True), "none": dict(mixer="none")}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a second intra-op thread only adds hand-offs, and on a shared 2-core machine
    # it waits for a core (measured: 8 s with one thread, 50-80 s with two under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def is_valid(tokens, channels, features):
    # Variate tokens need several variates, each its own token (schema: FAMILY rules, _cross_section).
    return tokens != "variate" or (channels == "mixed" and features != "S")


def build(features, **model):
    """Validate a config through the schema, fill in the data-derived channels, build the model."""
    cfg = validate_config({"data": {"features": features, "seq_len": SEQ_LEN, "label_len": LABEL_LEN,
                                    "pred_len": PRED_LEN},
                           "model": model}, "test")
    enc_in, c_out = MODES[features]
    cfg.model.enc_in = cfg.model.dec_in = enc_in
    cfg.model.c_out = c_out
    return build_model(cfg.model_dump())


def forecaster(features, tokens, mixer, channels, decomp, revin, **extra):
    return build(features, **{**TINY, "head": "linear", "tokens": tokens, "channels": channels,
                              "decomp": decomp, "revin": revin, **MIXERS[mixer], **extra})


def make_inputs(enc_in, seed=0, dtype=torch.float32):
    """The four tensors train.py passes (x_enc, marks, x_dec, marks); the linear families read x_enc only."""
    gen = torch.Generator().manual_seed(seed)
    x_enc = (torch.randn(BATCH, SEQ_LEN, enc_in, generator=gen) * 3 + 1).to(dtype)
    x_dec = torch.cat([x_enc[:, -LABEL_LEN:], torch.zeros(BATCH, PRED_LEN, enc_in, dtype=dtype)], dim=1)
    marks = (torch.rand(BATCH, LABEL_LEN + SEQ_LEN + PRED_LEN, 4, generator=gen) - 0.5).to(dtype)
    return x_enc, marks[:, :SEQ_LEN], x_dec, marks[:, SEQ_LEN - LABEL_LEN:SEQ_LEN + PRED_LEN]


def predict(model, x_enc, seed=123):
    # Reseeded so ProbSparse attention samples the same keys on every call.
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x_enc)


def check_forward_backward(model, features):
    enc_in, c_out = MODES[features]
    model.train()
    y = model(*make_inputs(enc_in))
    assert y.shape == (BATCH, PRED_LEN, c_out)
    assert torch.isfinite(y).all()
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# -----------------------------------------------------------------------------
# Every family, forward and backward, in every data mode

FAMILIES = [combo for combo in itertools.product(MODES, ["time", "patch", "variate"], MIXERS,
                                                 ["mixed", "independent"], ["none", "moving_avg"], [False, True])
            if is_valid(combo[1], combo[3], combo[0])]


@pytest.mark.parametrize("features,tokens,mixer,channels,decomp,revin", FAMILIES)
def test_forecaster_forward_backward(features, tokens, mixer, channels, decomp, revin):
    torch.manual_seed(0)
    model = forecaster(features, tokens, mixer, channels, decomp, revin)
    assert isinstance(model, Forecaster)
    check_forward_backward(model, features)


@pytest.mark.parametrize("features", MODES)
@pytest.mark.parametrize("attn", ["prob", "full"])
@pytest.mark.parametrize("revin", [False, True])
def test_informer_forward_backward(features, attn, revin):
    torch.manual_seed(0)
    model = build(features, d_model=8, n_heads=2, e_layers=2, d_ff=8, attn=attn, revin=revin)
    assert isinstance(model, Informer)
    check_forward_backward(model, features)


def test_the_linear_head_maps_embedded_features_back_to_channels_even_when_d_model_equals_them():
    # d_model == 7 == the channel count: the tokens are still learned features, so the head
    # must map them back to the channels; only raw tokens skip that map.
    embedded = forecaster("M", "time", "mlp", "mixed", "none", False, d_model=N_VARS)
    assert isinstance(embedded.head.over_features, torch.nn.Linear)
    raw = forecaster("M", "time", "none", "mixed", "none", False)
    assert raw.head.over_features is None


def test_raw_tokens_mix_the_raw_values_and_batch_normalise_each_time_feature_cell():
    # TSMixer (configs/tsmixer.py): no projection, the MLPs over the 7 raw features, and its
    # normalisation over both time and features: each (time, feature) cell over the batch.
    model = forecaster("M", "time", "mlp-raw", "mixed", "none", False)
    assert model.tokenizer.proj is None and model.tokenizer.dim == N_VARS
    assert model.head.over_features is None
    block = model.mixer[0]
    assert block.feature_mlp[0].in_features == N_VARS and block.token_mlp[0].in_features == SEQ_LEN
    x = torch.randn(16, SEQ_LEN, N_VARS) * torch.arange(1.0, SEQ_LEN + 1).unsqueeze(1) + 5
    y = block.token_norm.train()(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(SEQ_LEN, N_VARS), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(SEQ_LEN, N_VARS), atol=1e-3, rtol=0)
    # Not a layer norm over each token's features: those means are not zero.
    assert y.mean(2).abs().max() > 0.1


def attention_rates(model):
    return sorted({m.dropout for m in model.modules() if isinstance(m, (FullAttention, ProbAttention))})


def dropout_rates(model):
    return sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)})


@pytest.mark.parametrize("mixer", ["full", "prob"])
def test_attn_dropout_sets_the_attention_weights_rate_alone(mixer):
    # PatchTST drops no attention weights (configs/patchtst*.py); unset, the model's dropout applies.
    unset = forecaster("M", "patch", mixer, "independent", "none", True)
    assert attention_rates(unset) == [0.1] and dropout_rates(unset) == [0.1]
    zero = forecaster("M", "patch", mixer, "independent", "none", True, attn_dropout=0.0)
    assert attention_rates(zero) == [0.0] and dropout_rates(zero) == [0.1]
    informer = build("M", **{**TINY, "attn": mixer, "attn_dropout": 0.25})
    assert attention_rates(informer) == [0.25] and dropout_rates(informer) == [0.1]



@pytest.mark.parametrize("tokens,mixer", [("patch", "full"), ("variate", "prob"), ("time", "mlp-raw"), ("patch", "mlp")])
def test_forecasters_draw_no_torch_dropout_masks_on_cpu(tokens, mixer):
    """Every dropout of the linear-head families, attention's included, is model.apply_dropout's."""
    model = forecaster("M", tokens, mixer, "mixed", "none", True).train()
    ops = cpu_ops(lambda: model(*make_inputs(N_VARS)).sum().backward())
    assert "aten::random_" in ops and "aten::bernoulli_" not in ops


# -----------------------------------------------------------------------------
# MLPs (TSMixer's feature MLP, the transformers' FFN): the CPU training path is the plain
# sequence, in fewer passes (model.mlp_forward)

def plain_and_fused(module, x, plain_forward, dtype=torch.float32):
    """(output, gradients) of plain_forward(x) and of module(x), from the same random stream, so
    both draw the same masks."""
    def run(forward):
        torch.manual_seed(3)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = forward(x)
        return (y, *torch.autograd.grad(y.float(), [x, *module.parameters()], torch.ones_like(y, dtype=torch.float)))
    return run(plain_forward), run(module)


def plain_ffn(ffn):
    """FeedForward as Informer's kernel-1 convolutions, each dropout drawn as apply_dropout draws
    it, on the hidden laid out [B, L, d_ff] as mlp_forward lays it out."""
    def forward(x):
        h = ffn.act(ffn.conv1(x.transpose(1, 2))).transpose(1, 2)
        h = apply_dropout(h, ffn.dropout.p, ffn.training).transpose(1, 2)
        return ffn.dropout(ffn.conv2(h).transpose(1, 2))
    return forward


@pytest.mark.parametrize("dim,p,activation", [(7, 0.9, "relu"), (7, 0.1, "relu"), (1, 0.5, "relu"), (7, 0.3, "gelu")])
def test_feature_mlp_fused_dropout_matches_the_plain_sequence(dim, p, activation):
    mlp = FeatureMLP(dim, 64, p, activation).train()
    x = torch.randn(4, SEQ_LEN, dim, requires_grad=True)
    plain, fused = plain_and_fused(mlp, x, lambda t: torch.nn.Sequential.forward(mlp, t))
    torch.testing.assert_close(fused, plain)
    # The fused path ran (with ReLU, no ReLU pass of its own), and the output dropout dropped something.
    ops = cpu_ops(lambda: mlp(x))
    assert "aten::where" in ops and (activation == "gelu" or not ops & {"aten::relu", "aten::clamp_min"})
    assert (fused[0] == 0).any() and (fused[0] != 0).any()


@pytest.mark.parametrize("p", [1e-6, 1.0, 0.0])
def test_feature_mlp_rates_left_to_f_dropout_still_drop(p):
    # Rates 2^15 levels cannot express, and p = 0, take plain_mlp: p = 1 zeroes everything.
    mlp = FeatureMLP(N_VARS, 64, p, "relu").train()
    x = torch.randn(4, SEQ_LEN, N_VARS, requires_grad=True)
    plain, fused = plain_and_fused(mlp, x, lambda t: torch.nn.Sequential.forward(mlp, t))
    torch.testing.assert_close(fused, plain)
    assert (fused[0] == 0).all() if p == 1.0 else (fused[0] != 0).all()


@pytest.mark.parametrize("shape", [(0, SEQ_LEN, N_VARS), (4, 0, N_VARS), (N_VARS,), (2, 3, 5, N_VARS)])
def test_feature_mlp_fused_path_takes_any_leading_shape(shape):
    mlp = FeatureMLP(N_VARS, 64, 0.2, "relu").train()
    x = torch.randn(*shape, requires_grad=True)
    plain, fused = plain_and_fused(mlp, x, lambda t: torch.nn.Sequential.forward(mlp, t))
    assert fused[0].shape == shape
    torch.testing.assert_close(fused, plain)


def test_fused_relu_mask_keeps_a_nan_hidden_unit_as_relu_does():
    # ReLU passes NaN on: a model whose weights went NaN must not look finite (train.py fails fast on NaN).
    mlp = FeatureMLP(N_VARS, 64, 0.1, "relu").train()
    with torch.no_grad():
        mlp[0].weight[:] = float("nan")
    assert mlp(torch.randn(4, SEQ_LEN, N_VARS)).isnan().any()


@pytest.mark.parametrize("p,activation", [(0.1, "gelu"), (0.2, "relu"), (0.0, "gelu")])
def test_ffn_as_linear_maps_matches_the_kernel_1_convolutions(p, activation):
    ffn = FeedForward(16, 64, p, activation)
    x = torch.randn(4, SEQ_LEN, 16, requires_grad=True)
    for training in (True, False):
        ffn.train(training)
        plain, fused = plain_and_fused(ffn, x, plain_ffn(ffn))
        torch.testing.assert_close(fused, plain)
        if training and p > 0:
            assert (fused[0] == 0).any()  # the output dropout ran


def test_fused_mlp_under_bf16_autocast():
    mlp = FeatureMLP(N_VARS, 64, 0.3, "relu").train()
    plain, fused = plain_and_fused(mlp, torch.randn(4, SEQ_LEN, N_VARS, requires_grad=True),
                                   lambda t: torch.nn.Sequential.forward(mlp, t), torch.bfloat16)
    assert fused[0].dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, atol=0.05, rtol=0.02)


def test_feature_mlp_in_eval_is_the_mlp_without_dropout():
    x = torch.randn(4, SEQ_LEN, N_VARS)
    relu = FeatureMLP(N_VARS, 64, 0.3, "relu").eval()
    torch.testing.assert_close(relu(x), relu[3](relu[1](relu[0](x))))


def test_feature_mlp_keeps_the_state_dict_of_the_sequence_it_replaced():
    # Checkpoints written before FeatureMLP (an nn.Sequential of the same five modules) still load.
    old = torch.nn.Sequential(torch.nn.Linear(N_VARS, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, N_VARS), torch.nn.Dropout(0.1))
    FeatureMLP(N_VARS, 64, 0.1, "relu").load_state_dict(old.state_dict())


# -----------------------------------------------------------------------------
# Channel independence and variate tokens: permuting the channels permutes the forecast

PERM = torch.tensor([3, 0, 6, 1, 5, 2, 4])


def permuted_outputs(model):
    x = make_inputs(N_VARS)[0]
    return predict(model.eval(), x)[..., PERM], predict(model, x[..., PERM])


@pytest.mark.parametrize("tokens,mixer,decomp,revin", list(itertools.product(
    ["time", "patch"], MIXERS, ["none", "moving_avg"], [False, True])))
def test_channel_independence_is_permutation_equivariant(tokens, mixer, decomp, revin):
    torch.manual_seed(0)
    expected, got = permuted_outputs(forecaster("M", tokens, mixer, "independent", decomp, revin))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("decomp,revin", list(itertools.product(["none", "moving_avg"], [False, True])))
def test_itransformer_is_permutation_equivariant_over_variates(decomp, revin):
    torch.manual_seed(0)
    expected, got = permuted_outputs(forecaster("M", "variate", "full", "mixed", decomp, revin))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("tokens,mixer", [("time", "full"), ("patch", "full"), ("variate", "mlp"),
                                          ("time", "mlp-raw"), ("variate", "mlp-raw")])
def test_mixed_channels_are_not_permutation_equivariant(tokens, mixer):
    # The control: the check above can fail. Mixed channels (or an MLP over variate tokens)
    # tell the variates apart.
    torch.manual_seed(0)
    expected, got = permuted_outputs(forecaster("M", tokens, mixer, "mixed", "none", False))
    assert not torch.allclose(got, expected, atol=1e-3)


# -----------------------------------------------------------------------------
# Moving-average decomposition

KERNELS = [2, 3, 4, 5, 24, 25]


def reference_trend(x, kernel):
    """Step t's trend: the mean of x over steps t - (k-1)//2 .. t + k//2, clamped to the window
    (the window's first and last values repeated), written as a plain loop."""
    L = x.size(1)
    front = (kernel - 1) // 2
    rows = [x[:, [min(max(t - front + j, 0), L - 1) for j in range(kernel)]].mean(1) for t in range(L)]
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_moving_average_trend_plus_seasonal_is_the_input(kernel):
    x = torch.randn(2, 25, 3, generator=torch.Generator().manual_seed(kernel), dtype=torch.float64)
    seasonal, trend = MovingAverage(kernel)(x)
    assert seasonal.shape == trend.shape == x.shape
    torch.testing.assert_close(trend + seasonal, x)
    torch.testing.assert_close(trend, reference_trend(x, kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_moving_average_of_a_constant_is_that_constant(kernel):
    x = torch.tensor([2.5, -1.0, 7.0]).expand(2, 25, 3)
    seasonal, trend = MovingAverage(kernel)(x)
    torch.testing.assert_close(trend, x)
    torch.testing.assert_close(seasonal, torch.zeros_like(x))


# -----------------------------------------------------------------------------
# Patching

def test_n_patches_of_the_patchtst_configs():
    assert n_patches(336, 16, 8) == 42
    assert n_patches(512, 16, 8) == 64


@pytest.mark.parametrize("L,P,S", [(336, 16, 8), (512, 16, 8), (24, 8, 4), (24, 5, 7), (24, 3, 10), (24, 24, 4),
                                   (24, 24, 24), (10, 3, 20), (7, 1, 1)])
def test_tokenizer_makes_n_patches_patches_over_the_padded_window(L, P, S):
    cfg = ForecasterConfig(seq_len=L, pred_len=1, enc_in=2, c_out=2, tokens="patch", patch_len=P, stride=S)
    tokenizer = Tokenizer(cfg, c=2, embed=False)
    x = torch.arange(L * 2, dtype=torch.float32).view(1, L, 2)
    tokens = tokenizer(x)
    assert tokens.shape == (1, n_patches(L, P, S), P * 2) and tokenizer.n_tokens == n_patches(L, P, S)
    # Patch k holds steps kS .. kS+P-1 of the window padded with S copies of its last step,
    # time-major (step t's channels side by side).
    padded = torch.cat([x, x[:, -1:].expand(1, S, 2)], dim=1)
    for k in range(tokens.size(1)):
        torch.testing.assert_close(tokens[0, k], padded[0, k * S:k * S + P].flatten())


# -----------------------------------------------------------------------------
# RevIN: y(a x + b) = a y(x) + b, per channel

REVIN_FAMILIES = [combo for combo in itertools.product(["M", "MS"], ["time", "patch", "variate"], MIXERS,
                                                       ["mixed", "independent"], ["none", "moving_avg"])
                  if is_valid(combo[1], combo[3], combo[0])]


@pytest.mark.parametrize("features,tokens,mixer,channels,decomp", REVIN_FAMILIES)
def test_revin_forecaster_is_affine_equivariant(features, tokens, mixer, channels, decomp):
    torch.manual_seed(0)
    model = forecaster(features, tokens, mixer, channels, decomp, True).double().eval()
    with torch.no_grad():  # a trained RevIN affine, not the identity it starts as
        model.revin.weight.uniform_(0.5, 2.0)
        model.revin.bias.normal_()
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(N_VARS, generator=gen, dtype=torch.float64) * 4 + 0.5
    b = torch.randn(N_VARS, generator=gen, dtype=torch.float64) * 5
    x = make_inputs(N_VARS, dtype=torch.float64)[0]
    y, y2 = predict(model, x), predict(model, a * x + b)
    out = slice(None) if features == "M" else slice(-1, None)  # MS forecasts the last channel
    # Not exact: RevIN's eps (1e-5) inside the std is not scaled by a.
    torch.testing.assert_close(y2, a[out] * y + b[out], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, y2)


# -----------------------------------------------------------------------------
# PatchTST's switches: batch norm in the encoder, residual attention, RevIN without its affine

PATCHTST = dict(tokens="patch", mixer="full", channels="independent", decomp="none", revin=True)
SWITCHES = list(itertools.product(["layer", "batch"], [False, True], [True, False]))


@pytest.mark.parametrize("features", MODES)
@pytest.mark.parametrize("encoder_norm,res_attention,revin_affine", SWITCHES)
def test_patchtst_switches_forward_backward(features, encoder_norm, res_attention, revin_affine):
    torch.manual_seed(0)
    model = forecaster(features, **PATCHTST, encoder_norm=encoder_norm, res_attention=res_attention,
                       revin_affine=revin_affine)
    norms = {type(m) for m in model.mixer.modules() if isinstance(m, (torch.nn.LayerNorm, TokenBatchNorm))}
    assert norms == {TokenBatchNorm if encoder_norm == "batch" else torch.nn.LayerNorm}
    assert {m.residual for m in model.modules() if isinstance(m, FullAttention)} == {res_attention}
    assert (model.revin.weight is not None) is revin_affine
    check_forward_backward(model, features)


def test_defaults_keep_the_state_dict_of_the_sequential_encoder():
    # Checkpoints and resume states of PatchTST/iTransformer runs from before the switches load.
    model = forecaster("M", **PATCHTST)
    keys = set(model.state_dict())
    assert {"mixer.0.attention.q_proj.weight", "mixer.1.norm2.weight", "revin.weight", "revin.bias"} <= keys
    assert not any("running_mean" in k for k in keys)


def qkv(B=2, H=3, L=5, S=5, E=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, E, generator=gen, dtype=torch.float64) for n in (L, S, S)]


def test_residual_attention_adds_the_previous_scores_before_the_softmax():
    q, k, v = qkv()
    out, scores = residual_attention(q, k, v, None)
    # Without previous scores it is full attention, and passes on its own scores.
    torch.testing.assert_close(out, full_attention(q, k, v, False))
    torch.testing.assert_close(scores, q @ k.transpose(-2, -1) / 2.0)  # E = 4
    prev = torch.randn_like(scores)
    out2, scores2 = residual_attention(q, k, v, prev)
    torch.testing.assert_close(scores2, scores + prev)
    torch.testing.assert_close(out2, torch.softmax(scores + prev, -1) @ v)


@pytest.mark.parametrize("E", [3, 4])
def test_residual_attention_is_the_plain_formula_in_value_and_gradient(E):
    # model.py folds the scale into q and adds prev inside the matmul (baddbmm); E = 3 has a scale
    # that is not a power of two, so only the rounding may differ from the plain formula.
    q, k, v = (t.requires_grad_() for t in qkv(E=E, L=4, S=6))
    prev = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    plain = (q @ k.transpose(-2, -1)) / E ** 0.5 + prev
    plain_out = torch.softmax(plain, -1) @ v
    out, scores = residual_attention(q, k, v, prev)
    torch.testing.assert_close(scores, plain)
    torch.testing.assert_close(out, plain_out)
    grads = torch.autograd.grad((out.sin().sum() + scores.cos().sum()), (q, k, v, prev))
    expected = torch.autograd.grad((plain_out.sin().sum() + plain.cos().sum()), (q, k, v, prev))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_residual_attention_drops_out_weights_as_the_rate_says():
    q, k, v = qkv(B=64, L=16, S=16)
    torch.manual_seed(0)
    kept = residual_attention(q, k, torch.eye(16, dtype=q.dtype).expand(64, 3, 16, 16), None, 0.5)[0]
    weights = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)
    zero = kept == 0
    assert 0.45 < zero.double().mean() < 0.55
    torch.testing.assert_close(kept[~zero], weights[~zero] * 2)


@pytest.mark.parametrize("res_attention", [False, True])
def test_each_encoder_layer_gets_the_scores_of_the_one_before(res_attention):
    model = forecaster("M", **{**PATCHTST, "e_layers": 3}, res_attention=res_attention)
    seen = []  # (prev given, scores returned) per attention call, in layer order
    for m in model.modules():
        if isinstance(m, FullAttention):
            m.register_forward_hook(lambda mod, args, out: seen.append((args[3], out[1])))
    model(make_inputs(N_VARS)[0])
    assert len(seen) == 3
    if not res_attention:
        assert all(prev is None and scores is None for prev, scores in seen)
        return
    assert seen[0][0] is None
    for (_, before), (prev, _) in zip(seen, seen[1:]):
        assert prev is before
    n = model.tokenizer.n_tokens
    assert seen[-1][1].shape == (BATCH * N_VARS, TINY["n_heads"], n, n)


def test_residual_attention_needs_full_non_causal_attention():
    with pytest.raises(ValueError, match="attn 'full'"):
        ForecasterConfig(seq_len=24, pred_len=6, enc_in=7, c_out=7, attn="prob", res_attention=True)
    with pytest.raises(ValueError, match="no causal form"):
        FullAttention(True, 0.0, residual=True)


def test_token_batch_norm_normalises_each_feature_over_batch_and_tokens():
    norm = TokenBatchNorm(8)
    gen = torch.Generator().manual_seed(0)
    # Each sample its own offset: a norm over each sample's tokens alone would remove it.
    x = (torch.randn(16, 10, 8, generator=gen) * torch.arange(1.0, 9.0) + torch.arange(8.0) * 3
         + torch.randn(16, 1, 1, generator=gen) * 4)
    y = norm.train()(x)
    flat = x.reshape(-1, 8)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + norm.eps), atol=1e-5, rtol=1e-5)
    # One step's running statistics move by the momentum towards the batch's (unbiased variance).
    torch.testing.assert_close(norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * flat.var(0, unbiased=True))
    assert y.mean(2).abs().max() > 0.1  # not a layer norm: a token's features do not average to 0
    # Eval uses the running statistics, so one token alone is normalised as in the batch's company.
    single = norm.eval()(x[:1, :1])
    expected = (x[:1, :1] - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(single, expected)


@pytest.mark.parametrize("features", ["M", "MS"])
def test_revin_without_affine_has_no_parameters_and_stays_equivariant(features):
    torch.manual_seed(0)
    model = forecaster(features, **{**PATCHTST, "revin_affine": False}).double().eval()
    assert not list(model.revin.parameters())
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(N_VARS, generator=gen, dtype=torch.float64) * 4 + 0.5
    b = torch.randn(N_VARS, generator=gen, dtype=torch.float64) * 5
    x = make_inputs(N_VARS, dtype=torch.float64)[0]
    out = slice(None) if features == "M" else slice(-1, None)
    torch.testing.assert_close(predict(model, a * x + b), a[out] * predict(model, x) + b[out], atol=1e-4, rtol=1e-4)


def test_informer_keeps_layer_norm_and_its_state_dict_keys():
    # The switches are the linear-head families'; Informer's layers are as before them.
    model = build("M", **TINY)
    assert not any(isinstance(m, TokenBatchNorm) for m in model.modules())
    assert all(isinstance(layer.norm1, torch.nn.LayerNorm) for layer in model.encoder.layers)
    assert {"encoder.layers.0.norm1.weight", "encoder.layers.0.attention.q_proj.weight", "decoder.layers.0.norm3.bias"} \
        <= set(model.state_dict())
    assert {m.residual for m in model.modules() if isinstance(m, (FullAttention, ProbAttention))} == {False}


def test_attention_without_residual_refuses_previous_scores():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="not residual"):
        FullAttention(False, 0.0)(q, k, v, torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="attn 'full'"):
        ProbAttention(False, 0.0, 5)(q, k, v, torch.zeros(2, 3, 5, 5))


def test_residual_attention_under_bf16_autocast_carries_fp32_scores():
    q, k, v = (t.float() for t in qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, scores = residual_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out.dtype == torch.bfloat16 and scores.dtype == torch.float32
    exact, _ = residual_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), None)
    torch.testing.assert_close(out.float(), exact, atol=1e-2, rtol=1e-2)


def test_informer_takes_revin_without_affine():
    model = build("M", **{**TINY, "revin": True, "revin_affine": False})
    assert isinstance(model, Informer) and not list(model.revin.parameters())
    check_forward_backward(model, "M")
