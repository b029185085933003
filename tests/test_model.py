"""Tests for model.py: shapes, gradients, the ProbSparse path, RevIN, dropout, determinism."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from tests.conftest import cpu_ops
from model import (
    MASK_LEVELS,
    Dropout,
    Informer,
    apply_dropout,
    build_model,
    count_parameters,
    full_attention,
    keep_mask,
    prob_attention,
    sampled_scores,
)

SEQ_LEN, LABEL_LEN, PRED_LEN, BATCH = 32, 16, 8, 4


def tiny_config(**model_overrides):
    model = dict(enc_in=3, dec_in=3, c_out=3, d_model=16, n_heads=2, e_layers=2, d_layers=1, d_ff=32,
                 dropout=0.1, factor=5, attn="prob", distil=True, embed="timeF", activation="gelu",
                 mix=True, revin=False, some_unknown_key="ignored")
    model.update(model_overrides)
    data = {"seq_len": SEQ_LEN, "label_len": LABEL_LEN, "pred_len": PRED_LEN, "root": "ignored"}
    return {"data": data, "model": model}


def make_marks(embed, length, gen):
    if embed == "timeF":
        return torch.rand(BATCH, length, 4, generator=gen) - 0.5
    # [month 1-12, day 1-31, weekday 0-6, hour 0-23] as integer-valued floats
    cols = [torch.randint(lo, hi + 1, (BATCH, length, 1), generator=gen) for lo, hi in ((1, 12), (1, 31), (0, 6), (0, 23))]
    return torch.cat(cols, dim=-1).float()


def make_batch(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = config["model"]
    x_enc = torch.randn(BATCH, SEQ_LEN, m["enc_in"], generator=gen) * 3 + 1
    x_dec = torch.cat([x_enc[:, -LABEL_LEN:, : m["dec_in"]], torch.zeros(BATCH, PRED_LEN, m["dec_in"])], dim=1)
    x_mark_enc = make_marks(m["embed"], SEQ_LEN, gen)
    x_mark_dec = torch.cat([x_mark_enc[:, -LABEL_LEN:], make_marks(m["embed"], PRED_LEN, gen)], dim=1)
    return x_enc, x_mark_enc, x_dec, x_mark_dec


def run_eval(model, batch, seed=123):
    # Reseed so ProbSparse samples the same keys on every call.
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(*batch)


def check_forward_backward(config):
    torch.manual_seed(0)
    model = build_model(config)
    model.train()
    y = model(*make_batch(config))
    assert y.shape == (BATCH, PRED_LEN, config["model"]["c_out"])
    assert torch.isfinite(y).all()
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# -----------------------------------------------------------------------------
# Forward and backward for every option

@pytest.mark.parametrize("attn,distil,embed,revin", list(itertools.product(
    ["prob", "full"], [True, False], ["timeF", "fixed", "learned"], [False, True])))
def test_forward_backward_all_options(attn, distil, embed, revin):
    check_forward_backward(tiny_config(attn=attn, distil=distil, embed=embed, revin=revin))


@pytest.mark.parametrize("attn", ["prob", "full"])
@pytest.mark.parametrize("revin", [False, True])
def test_forward_backward_ms(attn, revin):
    # "MS": several input channels, one target (the last one).
    check_forward_backward(tiny_config(enc_in=5, dec_in=5, c_out=1, attn=attn, revin=revin))


@pytest.mark.parametrize("mix", [False, True])
def test_forward_backward_relu_mix_deeper(mix):
    check_forward_backward(tiny_config(activation="relu", mix=mix, e_layers=3, d_layers=2))


@pytest.mark.parametrize("embed", ["fixed", "learned"])
def test_calendar_marks_extremes_index_safely(embed):
    config = tiny_config(embed=embed)
    model = build_model(config).eval()
    x_enc, _, x_dec, _ = make_batch(config)
    for value in ([1.0, 1.0, 0.0, 0.0], [12.0, 31.0, 6.0, 23.0]):
        marks_enc = torch.tensor(value).expand(BATCH, SEQ_LEN, 4).clone()
        marks_dec = torch.tensor(value).expand(BATCH, LABEL_LEN + PRED_LEN, 4).clone()
        assert torch.isfinite(run_eval(model, (x_enc, marks_enc, x_dec, marks_dec))).all()


def test_fixed_embedding_has_no_trainable_tables():
    fixed = build_model(tiny_config(embed="fixed"))
    learned = build_model(tiny_config(embed="learned"))
    n_tables = 2 * (13 + 32 + 7 + 24) * 16  # encoder and decoder embeddings
    assert count_parameters(learned) - count_parameters(fixed) == n_tables


# -----------------------------------------------------------------------------
# Input validation

def test_shape_errors_name_expected_and_actual():
    config = tiny_config()
    model = build_model(config)
    x_enc, x_mark_enc, x_dec, x_mark_dec = make_batch(config)

    with pytest.raises(ValueError) as err:
        model(x_enc[:, :20], x_mark_enc, x_dec, x_mark_dec)
    msg = str(err.value)
    assert "x_enc" in msg and f"[B, {SEQ_LEN}, 3]" in msg and f"[{BATCH}, 20, 3]" in msg and "dim 1" in msg

    with pytest.raises(ValueError) as err:
        model(x_enc[..., :2], x_mark_enc, x_dec, x_mark_dec)
    msg = str(err.value)
    assert "x_enc" in msg and f"[B, {SEQ_LEN}, 3]" in msg and f"[{BATCH}, {SEQ_LEN}, 2]" in msg and "dim 2" in msg

    with pytest.raises(ValueError, match=r"x_dec: expected shape \[4, 24, 3\], got \[4, 23, 3\]"):
        model(x_enc, x_mark_enc, x_dec[:, 1:], x_mark_dec)
    with pytest.raises(ValueError, match=r"x_mark_enc: .*\[4, 32, 4\].*\[4, 32, 5\]"):
        model(x_enc, torch.cat([x_mark_enc, x_mark_enc[..., :1]], -1), x_dec, x_mark_dec)
    with pytest.raises(ValueError, match=r"x_mark_dec: .*batch"):
        model(x_enc, x_mark_enc, x_dec, x_mark_dec[:2])
    with pytest.raises(ValueError, match=r"x_enc: .*3 dims"):
        model(x_enc[0], x_mark_enc, x_dec, x_mark_dec)


@pytest.mark.parametrize("key", ["enc_in", "dec_in", "c_out"])
def test_build_model_needs_channel_counts(key):
    with pytest.raises(ValueError, match=f"{key}.*set from the data"):
        build_model(tiny_config(**{key: None}))


@pytest.mark.parametrize("overrides,pattern", [
    (dict(revin=True, enc_in=5, dec_in=5, c_out=2), "c_out"),
    (dict(revin=True, enc_in=5, dec_in=4, c_out=5), "dec_in"),
    (dict(d_model=15), "divisible"),
    (dict(attn="sparse"), "attn"),
    (dict(embed="minute"), "embed"),
])
def test_build_model_rejects_bad_config(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_model(tiny_config(**overrides))


def test_build_model_accepts_model_dump_object():
    class Config:
        def model_dump(self):
            return tiny_config(c_out=1)

    model = build_model(Config())
    assert isinstance(model, Informer) and model.cfg.c_out == 1


# -----------------------------------------------------------------------------
# ProbSparse attention

def qkv(L_Q, L_K, seed=0, B=2, H=3, E=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L_Q, E, generator=gen), torch.randn(B, H, L_K, E, generator=gen),
            torch.randn(B, H, L_K, E, generator=gen))


@pytest.mark.parametrize("causal", [False, True])
def test_full_attention_runs_in_fp32_inside_cpu_bf16_autocast(causal, monkeypatch):
    """CPU bf16 autocast hands torch's fused attention fp32 inputs (its bf16 backward is several
    times slower there) and gives bf16 back, with values close to fp32 attention and bf16 gradients;
    outside autocast the inputs go through as they are."""
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw))
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(24, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = full_attention(q, k, v, causal)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    torch.testing.assert_close(out.float(), full_attention(q32, k32, v32, causal), atol=1e-2, rtol=1e-2)
    seen.clear()
    assert full_attention(q.detach(), k.detach(), v.detach(), causal).dtype == torch.bfloat16  # no autocast: as given
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("causal,L_Q,L_K", [(False, 40, 40), (False, 24, 40), (True, 40, 40)])
def test_prob_attention_equals_full_when_all_queries_active(causal, L_Q, L_K):
    q, k, v = qkv(L_Q, L_K)
    out, top = prob_attention(q, k, v, factor=100, causal=causal)
    assert top.shape[-1] == L_Q  # u clamps to L_Q: every query is active
    torch.testing.assert_close(out, full_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_prob_attention_lazy_queries_get_uniform_output(causal):
    L = 64
    q, k, v = qkv(L, L, seed=1)
    torch.manual_seed(0)
    out, top = prob_attention(q, k, v, factor=2, causal=causal)
    u = 2 * math.ceil(math.log(L))
    assert top.shape == (2, 3, u) and u < L
    full = full_attention(q, k, v, causal)
    if causal:
        uniform = v.cumsum(2) / torch.arange(1, L + 1).view(1, 1, L, 1)
    else:
        uniform = v.mean(2, keepdim=True).expand_as(v)
    active = torch.zeros(2, 3, L, dtype=torch.bool).scatter(2, top, True)
    torch.testing.assert_close(out[active], full[active], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~active], uniform[~active], atol=1e-5, rtol=1e-5)


def test_prob_attention_picks_peaked_queries():
    # Zero queries attend uniformly (M = 0); the few non-zero ones are peaked (M > 0).
    L, u = 50, 5 * math.ceil(math.log(50))
    q, k, v = qkv(L, L, seed=2)
    chosen = torch.randperm(L, generator=torch.Generator().manual_seed(3))[:u]
    mask = torch.zeros(L, dtype=torch.bool)
    mask[chosen] = True
    q = q * 5 * mask.view(1, 1, L, 1)
    torch.manual_seed(0)
    _, top = prob_attention(q, k, v, factor=5, causal=False)
    for b, h in itertools.product(range(2), range(3)):
        assert set(top[b, h].tolist()) == set(chosen.tolist())


def test_sampled_scores_dense_and_gather_paths_agree():
    q, k, _ = qkv(30, 400, E=4)
    sample = torch.randint(400, (30, 20), generator=torch.Generator().manual_seed(0))
    expected = torch.einsum("bhqe,bhqse->bhqs", q, k[:, :, sample, :])
    torch.testing.assert_close(sampled_scores(q, k, sample), expected)  # L_K > U * E: gather path
    torch.testing.assert_close(sampled_scores(q, k[:, :, :80], sample % 80),
                               torch.einsum("bhqe,bhqse->bhqs", q, k[:, :, sample % 80, :]))  # dense path


def test_prob_attention_gradients_flow_to_q_k_v():
    q, k, v = (t.requires_grad_() for t in qkv(40, 40))
    torch.manual_seed(0)
    out, _ = prob_attention(q, k, v, factor=2, causal=True)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["prob", "full"])
def test_runs_under_bf16_autocast(attn):
    config = tiny_config(attn=attn, revin=True)
    model = build_model(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(*make_batch(config))
    assert y.shape == (BATCH, PRED_LEN, 3) and torch.isfinite(y).all()
    y.float().pow(2).mean().backward()


def test_prob_model_equals_full_model_with_large_factor():
    # Prob/full attention modules hold no parameters, so the same seed gives the same weights.
    outputs = []
    for attn in ("prob", "full"):
        config = tiny_config(attn=attn, factor=1000)
        torch.manual_seed(0)
        model = build_model(config).eval()
        outputs.append(run_eval(model, make_batch(config)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# RevIN

@pytest.mark.parametrize("attn", ["prob", "full"])
def test_revin_is_scale_and_shift_equivariant(attn):
    config = tiny_config(revin=True, attn=attn)
    torch.manual_seed(0)
    model = build_model(config).eval()  # affine weight/bias at their identity init
    x_enc, x_mark_enc, x_dec, x_mark_dec = make_batch(config)
    y = run_eval(model, (x_enc, x_mark_enc, x_dec, x_mark_dec))
    x_dec2 = x_dec.clone()
    x_dec2[:, :LABEL_LEN] = 10 * x_dec[:, :LABEL_LEN] + 5  # placeholders stay zero
    y2 = run_eval(model, (10 * x_enc + 5, x_mark_enc, x_dec2, x_mark_dec))
    torch.testing.assert_close(y2, 10 * y + 5, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(y, y2)


def test_revin_ms_denormalises_with_last_channel():
    # Transforming only the target (last) channel leaves the normalised inputs unchanged,
    # so the prediction must follow that channel's transform exactly.
    config = tiny_config(revin=True, enc_in=4, dec_in=4, c_out=1)
    torch.manual_seed(0)
    model = build_model(config).eval()
    x_enc, x_mark_enc, x_dec, x_mark_dec = make_batch(config)
    y = run_eval(model, (x_enc, x_mark_enc, x_dec, x_mark_dec))
    x_enc2, x_dec2 = x_enc.clone(), x_dec.clone()
    x_enc2[..., -1] = 10 * x_enc[..., -1] + 5
    x_dec2[:, :LABEL_LEN, -1] = 10 * x_dec[:, :LABEL_LEN, -1] + 5
    y2 = run_eval(model, (x_enc2, x_mark_enc, x_dec2, x_mark_dec))
    torch.testing.assert_close(y2, 10 * y + 5, atol=1e-3, rtol=1e-4)


# -----------------------------------------------------------------------------
# Dropout: the CPU mask from 15-bit integers behaves as F.dropout's

@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_drops_at_rate_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    n = 1_000_000
    y = apply_dropout(torch.ones(n), p, True)
    kept = y != 0
    # Binomial(n, p): 6 standard deviations (the rate used differs from p by under 2^-16).
    assert abs((~kept).float().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / n) + 2 ** -16
    # Survivors are scaled by the inverse of the keep rate used, so the expectation is the input.
    scale = y[kept].unique()
    used_keep = 1 - round(p * MASK_LEVELS) / MASK_LEVELS
    assert scale.numel() == 1 and math.isclose(scale.item(), 1 / used_keep, rel_tol=1e-6)
    assert abs(y.mean().item() - 1) < 6 * math.sqrt(p / (1 - p) / n)


@pytest.mark.parametrize("drop", [1, MASK_LEVELS // 10, MASK_LEVELS // 2, MASK_LEVELS - 1])
def test_keep_mask_is_uniform_in_each_of_the_four_lanes_of_a_64_bit_draw(drop):
    # keep_mask cuts one int64 into four 15-bit integers: each lane (position mod 4, the top one
    # included, whose sign bit random_() leaves at 0) must keep at the rate, whatever the shape.
    torch.manual_seed(0)
    n = 4 * 250_000
    keep = keep_mask(torch.empty(n - 1), drop)  # not a multiple of 4: the last word is cut
    assert keep.shape == (n - 1,) and keep.dtype == torch.bool
    want = 1 - drop / MASK_LEVELS
    lanes = torch.cat([keep, torch.tensor([True])]).view(-1, 4).float().mean(0)
    assert (lanes - want).abs().max() < 6 * math.sqrt(want * (1 - want) / (n / 4)) + 1e-5
    assert keep_mask(torch.empty(0, 3), drop).shape == (0, 3)


def test_keep_mask_is_the_four_15_bit_lanes_of_each_int64_draw():
    # The layout pinned exactly: lane i of word w is element 4w + i, kept when its 15 bits >= drop
    # (drop is one lane's own value, so ">" for ">=" shows).
    torch.manual_seed(7)
    words = torch.empty(4, dtype=torch.int64).random_()
    lanes = torch.stack([(words >> (16 * i)) & (MASK_LEVELS - 1) for i in range(4)], dim=1).flatten()[:15]
    drop = int(lanes[5])
    torch.manual_seed(7)
    keep = keep_mask(torch.empty(3, 5), drop)
    assert torch.equal(keep.flatten(), lanes >= drop) and keep.flatten()[5]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_masks_are_independent_of_position_and_of_each_other(p):
    # At p = 0.5 a mask reads one bit of each 15-bit integer; at p = 0.1, most of them (two
    # lanes sharing bits would agree more often than independent draws).
    torch.manual_seed(0)
    a = apply_dropout(torch.ones(400, 1000), p, True) != 0
    b = apply_dropout(torch.ones(400, 1000), p, True) != 0
    agree = p * p + (1 - p) * (1 - p)  # how often two independent draws agree
    sd = lambda n, q: 6 * math.sqrt(q * (1 - q) / n)  # noqa: E731  (6 standard deviations of a mean of n Bernoulli(q))
    # No stripes: every row and every column is dropped at about the rate.
    assert (a.float().mean(1) - (1 - p)).abs().max() < sd(1000, p)
    assert (a.float().mean(0) - (1 - p)).abs().max() < sd(400, p)
    # Neighbours, along either axis and in every lane pair of a 64-bit draw, agree as often as
    # independent draws do: no shared bits.
    flat = a.flatten()
    for step in (1, 2, 3, 4, 1000):
        pairs = flat[step:] == flat[:-step]
        assert abs(pairs.float().mean().item() - agree) < sd(pairs.numel(), agree), step
    # So do two masks.
    assert not torch.equal(a, b)
    assert abs((a == b).float().mean().item() - agree) < sd(a.numel(), agree)


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(0)
    x = torch.randn(50, 40, requires_grad=True)
    y = apply_dropout(x, 0.3, True)
    g = torch.randn_like(y)
    y.backward(g)
    factor = (y / x).detach()  # 0 or 1/(1-p) per element
    torch.testing.assert_close(x.grad, g * factor)


def test_dropout_edges_identity_f_dropout_and_bad_rates():
    x = torch.randn(8, 16)
    assert apply_dropout(x, 0.5, False) is x and apply_dropout(x, 0.0, True) is x
    assert Dropout(0.5).eval()(x) is x
    assert torch.equal(apply_dropout(x, 1.0, True), torch.zeros_like(x))
    # A rate below 2^-16 rounds to no drop at all: F.dropout's exact rate instead.
    for p in (1e-6, 1.0 - 1e-6):
        torch.manual_seed(1)
        want = F.dropout(x, p, True)
        torch.manual_seed(1)
        assert torch.equal(apply_dropout(x, p, True), want)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got"):
            apply_dropout(x, p, True)


def test_dropout_keeps_bf16_and_is_seeded():
    x = torch.randn(64, 64).bfloat16()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(Dropout(0.2).train()(x))
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    assert (outs[0] == 0).any() and not torch.equal(outs[0], x)


@pytest.mark.parametrize("causal", [False, True])
def test_full_attention_with_dropout_on_cpu_is_softmax_attention(causal, monkeypatch):
    """With dropout on a CPU, full attention is computed by hand so that apply_dropout draws its
    mask; without the mask it is exactly torch's attention."""
    q, k, v = qkv(24, 24)
    monkeypatch.setattr(model_module, "apply_dropout", lambda w, p, training: w)
    torch.testing.assert_close(full_attention(q, k, v, causal, dropout_p=0.3),
                               F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("attn", ["full", "prob"])
def test_no_torch_dropout_masks_on_cpu(attn):
    """No bernoulli_ in a CPU training step: every dropout, attention's included, is apply_dropout's."""
    config = tiny_config(attn=attn, dropout=0.3)
    model = build_model(config).train()
    ops = cpu_ops(lambda: model(*make_batch(config)).sum().backward())
    assert "aten::random_" in ops and "aten::bernoulli_" not in ops


# -----------------------------------------------------------------------------
# Determinism

def test_same_seed_same_init_and_output():
    config = tiny_config(revin=True)
    states, outputs = [], []
    for _ in range(2):
        torch.manual_seed(42)
        model = build_model(config)
        states.append(model.state_dict())
        torch.manual_seed(7)
        outputs.append(model.train()(*make_batch(config)))  # dropout and sampling seeded too
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert torch.equal(outputs[0], outputs[1])

    torch.manual_seed(43)
    other = build_model(config)
    assert not torch.equal(other.state_dict()["decoder.proj.weight"], states[0]["decoder.proj.weight"])


def test_count_parameters():
    model = build_model(tiny_config())
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) > 0
