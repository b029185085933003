"""Informer for long sequence time-series forecasting.

After Zhou et al., "Informer: Beyond Efficient Transformer for Long Sequence
Time-Series Forecasting" (AAAI 2021), written from the paper's description.

Architecture
    x_enc --DataEmbedding--> Encoder --------------------------------+
            (token conv + position + time marks)                     |
            e_layers x [ProbSparse self-attention + FFN],             |
            with a distilling ConvLayer (length halves) between each  |
            pair of layers, then LayerNorm                            |
                                                                      v
    x_dec --DataEmbedding--> Decoder: d_layers x [masked self-attention,
                             cross-attention over the encoder output, FFN],
                             LayerNorm, Linear(d_model, c_out) -> last pred_len steps

The decoder is "generative": it is fed the last label_len known steps followed
by pred_len zero placeholders, and predicts all pred_len steps in one forward
pass (no autoregressive loop).

Optional RevIN (Kim et al., ICLR 2022) normalises every input series by its own
mean/std over time and maps the prediction back to the original scale.

Shape conventions (B = batch, L = time steps, C = channels, H = heads, E = head dim)
    x_enc      [B, seq_len, enc_in]
    x_mark_enc [B, seq_len, 4]
    x_dec      [B, label_len + pred_len, dec_in]   known steps, then zeros
    x_mark_dec [B, label_len + pred_len, 4]
    output     [B, pred_len, c_out]
    Inside attention, queries/keys/values are [B, H, L, E].

Time marks always have 4 columns. embed="timeF": continuous features in
[-0.5, 0.5] (hour, weekday, day-of-month, day-of-year). embed="fixed"/"learned":
integer-valued calendar fields [month 1-12, day 1-31, weekday 0-6, hour 0-23].

The model space (issue 12)
--------------------------
`build_model` builds one of a family of forecasters, chosen by keys of the config's
`model` section. `head="decoder"` is the Informer above; `head="linear"` is a
`Forecaster` (below), assembled from five independent choices:

    revin     True: RevIN around the whole model (Kim et al., ICLR 2022)
    decomp    "moving_avg": the input is split into a moving-average trend and the
              seasonal rest; the trend gets its own linear map to the horizon
              (DLinear, Zeng et al., AAAI 2023), the rest goes through the backbone
    channels  "independent": every variate is its own univariate series, one set of
              weights for all (PatchTST's channel independence)
    tokens    "time": one token per time step; "patch": one token per patch of
              patch_len steps every stride steps (PatchTST, Nie et al., ICLR 2023);
              "variate": one token per variate's whole window (iTransformer,
              Liu et al., ICLR 2024)
    mixer     "attention" (prob or full, e_layers encoder layers), "mlp" (token-mixing
              and feature-mixing MLPs with residuals, TSMixer, Chen et al., TMLR 2023),
              or "none" (no embedding either: the head sees the raw values)

and a linear head to the horizon. Tokens are projected to d_model before the mixer,
except with mixer "none" and with raw_tokens=True (mixer "mlp" only): then the mixer works
on the raw values, as TSMixer mixes the raw features, and its blocks normalise each
(token, feature) cell over the batch, TSMixer's 2D batch normalisation. Which combinations
are meaningful is the config schema's business (nas_agent/schema.py); the classes below
only check what they need.

    DLinear       decomp moving_avg, tokens time, mixer none
    PatchTST      revin, channels independent, tokens patch, mixer attention (full)
    iTransformer  revin, tokens variate, mixer attention (full)
    TSMixer       revin, tokens time, mixer mlp, raw_tokens

PatchTST's code adds three switches (off by default): encoder_norm="batch", res_attention,
revin_affine=False.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

N_MARKS = 4  # time-mark columns, fixed by the data pipeline


# -----------------------------------------------------------------------------
# Dropout

MASK_LEVELS = 2 ** 15  # a mask element is a uniform 15-bit integer (keep_mask)


def apply_dropout(x, p, training):
    """F.dropout, with the mask drawn from 15-bit integers on a CPU.

    Why: on a CPU torch draws the mask with bernoulli_ in a scalar loop; profiled (torch 2.13,
    1 thread, fp32 training steps) bernoulli_ was 27% of a PatchTST/42 step and 26% of a TSMixer
    step. Uniform 15-bit integers are cheaper to draw (`keep_mask`; bench/train_speed.py has the
    measured effect on each shipped config). An element is dropped when its integer is below
    round(p * 2^15), so the rate used is p to within 2^-16, and the survivors are scaled by the
    inverse of the keep rate used, so the output's expectation is the input (up to the rounding
    of that scale in x's dtype, as with F.dropout). F.dropout stays where it is as good: on CUDA
    (a fused kernel), and for rates that 2^15 levels cannot express (p < 2^-16, p > 1 - 2^-16)."""
    if not training or p == 0.0:
        check_rate(p)
        return x
    drop = mask_threshold(x, p)
    if drop is None:
        return F.dropout(x, p, training)
    keep = keep_mask(x, drop)
    # A float mask carries the scale: backward is then one multiplication by the saved mask.
    return x * keep.to(x.dtype).mul_(MASK_LEVELS / (MASK_LEVELS - drop))


def keep_mask(x, drop):
    """A boolean tensor shaped as x: True where a uniform 15-bit integer is >= drop.

    The integers are the bits of int64 random_() (uniform on [0, 2^63)), cut into 16-bit lanes
    with each lane's top bit cleared: one 64-bit draw makes four of them, about twice as fast on
    a CPU as drawing int16s one by one (measured: 33-37 ms against 63-74 ms for 8.4M elements,
    1 thread). The stream of masks differs from an int16 random_() draw; the rate does not."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    return words.view(torch.int16)[:n].view(x.shape).bitwise_and_(MASK_LEVELS - 1) >= drop


def make_act(activation):
    return nn.GELU() if activation == "gelu" else nn.ReLU()


def check_rate(p):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def mask_threshold(x, p):
    """round(p * 2^15) when model.py draws x's dropout mask itself, else None: F.dropout's
    place (CUDA, or a rate that 2^15 levels cannot express)."""
    check_rate(p)
    drop = round(p * MASK_LEVELS)
    return drop if x.is_cpu and 0 < drop < MASK_LEVELS else None


def mlp_forward(x, w1, b1, act, p, training, w2, b2):
    """`plain_mlp`: F.linear(apply_dropout(act(F.linear(x, w1, b1)), p, training), w2, b2). In CPU
    training with a rate model.py draws itself: the same masks from the same random stream, and
    the same result up to float rounding (tests/test_model_space.py; under bf16 autocast the
    dropout's scale is applied in w2's fp32, not rounded to bf16), in fewer passes over the
    hidden layer.

    Why: the hidden [..., d_ff] is the largest tensor of an MLP (TSMixer's feature MLP: 512
    against 7 features; a transformer's FFN: 4-8x d_model), and the plain sequence passes over it
    many times; profiled (1 thread, fp32) TSMixer's hidden took most of a training step.
    - The mask is applied as a selection, torch.where(keep, h, 0), and the dropout's scale goes
      into w2, a [d_out, d_ff] matrix, instead of a float mask over the hidden; backward is one
      selection from the saved boolean mask.
    - ReLU then dropout is one mask, keep & ~(h <= 0), so with ReLU there is no separate ReLU
      pass, nor its backward (NaN is kept, as ReLU passes it on: train.py's NaN check still sees it).
    - w1 goes in as a contiguous [d_in, d_ff] matrix, so autograd takes its gradient as
      x^T @ grad: 2-4x faster than (grad^T @ x)^T when d_in is small (7 features, d_model 16).
    """
    drop = mask_threshold(x, p) if training else None
    if drop is None:
        return plain_mlp(x, w1, b1, act, p, training, w2, b2)
    rows, w1t = x.reshape(-1, x.shape[-1]), w1.t().contiguous()
    h = (rows @ w1t if b1 is None else torch.addmm(b1, rows, w1t)).view(*x.shape[:-1], w1.shape[0])
    keep = keep_mask(h, drop)
    if isinstance(act, nn.ReLU):
        keep &= ~(h <= 0)
    else:
        h = act(h)
    return F.linear(torch.where(keep, h, 0.0), w2 * (MASK_LEVELS / (MASK_LEVELS - drop)), b2)


def plain_mlp(x, w1, b1, act, p, training, w2, b2):
    """What mlp_forward computes, written plainly: eval and CUDA run it, and benchmarks time
    mlp_forward against it (bench/train_speed.py)."""
    return F.linear(apply_dropout(act(F.linear(x, w1, b1)), p, training), w2, b2)


class Dropout(nn.Dropout):
    """nn.Dropout that draws its CPU mask as `apply_dropout` does (same p, same eval behaviour;
    never in place)."""

    def forward(self, x):
        return apply_dropout(x, self.p, self.training)


@dataclass
class InformerConfig:
    seq_len: int
    label_len: int
    pred_len: int
    enc_in: int
    dec_in: int
    c_out: int
    # The defaults below are the paper's.
    d_model: int = 512
    n_heads: int = 8
    e_layers: int = 2
    d_layers: int = 1
    d_ff: int = 2048
    dropout: float = 0.05
    attn_dropout: float | None = None  # on the attention weights; None: dropout
    factor: int = 5
    attn: str = "prob"  # "prob" | "full"
    distil: bool = True
    embed: str = "timeF"  # "timeF" | "fixed" | "learned"
    activation: str = "gelu"  # "gelu" | "relu"
    mix: bool = True
    revin: bool = False
    revin_affine: bool = True  # RevIN's learned scale and shift

    def __post_init__(self):
        for name in ("seq_len", "pred_len", "enc_in", "dec_in", "c_out", "d_model",
                     "n_heads", "e_layers", "d_layers", "d_ff", "factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.label_len < 0:
            raise ValueError(f"model config: label_len must be >= 0, got {self.label_len}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check_dropouts(self)
        for name, allowed in (("attn", ("prob", "full")), ("embed", ("timeF", "fixed", "learned")),
                              ("activation", ("gelu", "relu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.revin:
            # The decoder's known steps are normalised with the encoder's statistics,
            # so both inputs must carry the same channels.
            if self.dec_in != self.enc_in:
                raise ValueError(f"revin needs dec_in == enc_in (same channels), got dec_in={self.dec_in}, enc_in={self.enc_in}")
            if self.c_out not in (self.enc_in, 1):
                raise ValueError(f"revin needs c_out == enc_in ({self.enc_in}) or c_out == 1 (target = last input channel), got c_out={self.c_out}")


# -----------------------------------------------------------------------------
# Embeddings

def sinusoid_table(n_positions, d_model):
    """The Transformer's sin/cos table, [n_positions, d_model]."""
    pos = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: d_model // 2])  # odd d_model has one cos column fewer
    return table


class TokenEmbedding(nn.Module):
    """Projects the C input channels to d_model with a width-3 convolution over time,
    so each token already sees its neighbours."""

    def __init__(self, c_in, d_model):
        super().__init__()
        self.conv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x):  # [B, L, C] -> [B, L, d_model]
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class PositionalEmbedding(nn.Module):
    def __init__(self, d_model, max_len=5000):
        super().__init__()
        # A buffer, not a parameter: fixed, and rebuilt identically on load.
        self.register_buffer("table", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, x):  # [B, L, ...] -> [1, L, d_model]
        return self.table[: x.size(1)].unsqueeze(0)


class FixedEmbedding(nn.Module):
    """Lookup into a frozen sinusoidal table (embed="fixed")."""

    def __init__(self, n, d_model):
        super().__init__()
        self.register_buffer("table", sinusoid_table(n, d_model), persistent=False)

    def forward(self, idx):
        return F.embedding(idx, self.table)


class TemporalEmbedding(nn.Module):
    """Sum of one embedding per calendar field, marks [month, day, weekday, hour]."""

    # Table sizes let every valid value index directly (month 1-12 -> 13 rows, day 1-31 -> 32).
    SIZES = (13, 32, 7, 24)

    def __init__(self, d_model, kind):
        super().__init__()
        make = (lambda n: FixedEmbedding(n, d_model)) if kind == "fixed" else (lambda n: nn.Embedding(n, d_model))
        self.tables = nn.ModuleList(make(n) for n in self.SIZES)

    def forward(self, marks):  # [B, L, 4] integer-valued floats -> [B, L, d_model]
        marks = marks.long()
        return sum(table(marks[..., i]) for i, table in enumerate(self.tables))


class DataEmbedding(nn.Module):
    def __init__(self, c_in, d_model, embed, dropout):
        super().__init__()
        self.token = TokenEmbedding(c_in, d_model)
        self.position = PositionalEmbedding(d_model)
        if embed == "timeF":
            # Continuous time features: a bias-free linear map (the token conv has no bias either,
            # and LayerNorm downstream absorbs offsets).
            self.temporal = nn.Linear(N_MARKS, d_model, bias=False)
        else:
            self.temporal = TemporalEmbedding(d_model, embed)
        self.dropout = Dropout(dropout)

    def forward(self, x, marks):
        return self.dropout(self.token(x) + self.position(x) + self.temporal(marks))


# -----------------------------------------------------------------------------
# Attention. The inner attentions take q, k, v as [B, H, L, E] and return (output [B, H, L, E],
# scores for the next layer with residual attention, else None).

def fp32_under_cpu_autocast(attention):
    """An attention function that, under CPU bf16 autocast, runs in fp32 and hands its output back
    in q's dtype (a second output, residual attention's scores, stays fp32: summed over layers,
    bf16 would round it at each one).

    Why: under CPU bf16 autocast, torch's fused attention runs its backward about 4.7x slower in
    bf16 than in fp32 (profiled: torch 2.13, AMD EPYC with avx512_bf16), so patch-token models
    trained at 0.55x of fp32. In fp32 here, inside an otherwise bf16 model, they train at 1.0-1.2x
    of fp32 (bench/results/train_speed.md)."""
    def run(q, k, v, *args, **kwargs):
        if not (q.is_cpu and torch.is_autocast_enabled("cpu")):
            return attention(q, k, v, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = attention(q.float(), k.float(), v.float(), *args, **kwargs)
        return (out[0].to(q.dtype), *out[1:]) if isinstance(out, tuple) else out.to(q.dtype)
    return run


@fp32_under_cpu_autocast
def full_attention(q, k, v, causal, dropout_p=0.0):
    """Canonical softmax(q k^T / sqrt(E)) v."""
    if causal and q.size(2) != k.size(2):
        raise ValueError(f"causal attention needs L_Q == L_K, got {q.size(2)} and {k.size(2)}")
    if q.is_cpu and dropout_p > 0:
        # With dropout, torch's CPU attention leaves its fused kernel for the plain math below
        # anyway, and draws the mask with bernoulli_; apply_dropout's mask is cheaper.
        scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        if causal:
            future = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return apply_dropout(scores.softmax(-1), dropout_p, True) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


@fp32_under_cpu_autocast
def residual_attention(q, k, v, prev, dropout_p=0.0):
    """Full attention whose pre-softmax scores carry over to the next layer: layer l attends with
    softmax(q k^T / sqrt(E) + s_{l-1}), where s_{l-1} is the previous layer's sum (none for the
    first). PatchTST's encoder (its code's res_attention, after RealFormer, He et al. 2021).
    Returns (output [B, H, L, E], this layer's scores [B, H, L, S] for the next one).

    The scores must be materialised, so torch's fused attention cannot run it. The attention op
    alone (forward and backward, 2 threads, this 2-core AMD EPYC) took 1.6x full_attention's time
    at [896, 4, 42, 4] and 2.5x at [896, 4, 64, 4]; a whole PatchTST/42 epoch on ETTh2 took about the
    same either way (50-55 s on one thread, bench/reproduce.py runs of 2026-12-03).

    The scale goes into q (B*H*L*E values, not B*H*L*S scores) and prev into the matmul (baddbmm):
    two fewer passes over the scores each way. Against the plain (q k^T) * scale + prev, a training
    step took 0.83-0.87x the time with PatchTST/64 and 0.97x with PatchTST/42 (medians of 18 steps,
    one thread, beside two training jobs; 2026-12-03). The values are the same where the scale is
    a power of two (E = 4, 16, 64), else equal within float rounding (tests/test_model_space.py)."""
    B, H, L, E = q.shape
    S = k.size(2)
    q3, k3 = (q * E ** -0.5).reshape(B * H, L, E), k.reshape(B * H, S, E).transpose(1, 2)
    scores = torch.bmm(q3, k3) if prev is None else torch.baddbmm(prev.reshape(B * H, L, S), q3, k3)
    scores = scores.view(B, H, L, S)
    return apply_dropout(scores.softmax(-1), dropout_p, dropout_p > 0) @ v, scores


def sampled_scores(q, k, sample):
    """q_i . k_s for each query i and its sampled keys s = sample[i, :]: [B, H, L_Q, U]."""
    B, H, L_Q, E = q.shape
    if k.size(2) <= sample.size(1) * E:
        # One dense matmul and a column gather moves less memory than materialising
        # U keys per query ([B, H, L_Q, U, E]) until L_K exceeds U * E (thousands of steps),
        # and measured ~5x faster at L = 96-144.
        return torch.gather(q @ k.transpose(-2, -1), 3, sample.expand(B, H, L_Q, -1))
    return torch.einsum("bhqe,bhque->bhqu", q, k[:, :, sample, :])


def prob_attention(q, k, v, factor, causal, dropout_p=0.0):
    """ProbSparse self-attention (paper, Sec. "Efficient Self-attention Mechanism").

    Only the u = factor*ceil(ln L_Q) "active" queries, those with the largest
    sparsity measurement M(q, K) = max_j(q k_j / sqrt(E)) - mean_j(q k_j / sqrt(E)),
    get exact attention. M is estimated on U = factor*ceil(ln L_K) randomly
    sampled keys per query. The remaining "lazy" queries have a near-uniform
    attention distribution, so they get its output: mean(V), or for causal
    attention the mean over the keys they may see (a running mean of V).

    Returns (output [B, H, L_Q, E], indices of the active queries [B, H, u]).
    """
    B, H, L_Q, E = q.shape
    L_K = k.size(2)
    if causal and L_Q != L_K:
        raise ValueError(f"causal ProbSparse attention needs L_Q == L_K, got {L_Q} and {L_K}")
    n_sample = max(1, min(L_K, factor * math.ceil(math.log(L_K))))
    n_top = max(1, min(L_Q, factor * math.ceil(math.log(L_Q))))
    scale = 1.0 / math.sqrt(E)

    # Pick the active queries. The choice is a discrete top-k, so no gradient could flow
    # through it anyway; no_grad keeps the sampled scores out of the autograd graph.
    with torch.no_grad():
        # One set of sampled keys per query, shared over batch and heads (torch RNG, so seedable).
        sample = torch.randint(L_K, (L_Q, n_sample), device=q.device)
        s = sampled_scores(q, k, sample) * scale  # [B, H, L_Q, U]
        if causal:
            # Keys in a query's future are not part of its distribution; leave them out of M.
            # A query with no visible sampled key gets M = -inf (max of nothing - 0).
            visible = sample <= torch.arange(L_Q, device=q.device).unsqueeze(1)  # [L_Q, U]
            s_max = s.masked_fill(~visible, float("-inf")).amax(-1)
            s_mean = s.masked_fill(~visible, 0.0).sum(-1) / visible.sum(-1).clamp(min=1)
        else:
            s_max, s_mean = s.amax(-1), s.mean(-1)
        top = (s_max - s_mean).topk(n_top, dim=-1, sorted=False).indices  # [B, H, u]

    # Exact attention for the active queries only: [B, H, u, L_K] scores.
    top_e = top.unsqueeze(-1).expand(B, H, n_top, E)
    scores = torch.gather(q, 2, top_e) @ k.transpose(-2, -1) * scale
    if causal:
        future = torch.arange(L_K, device=q.device) > top.unsqueeze(-1)  # [B, H, u, L_K]
        scores = scores.masked_fill(future, float("-inf"))
    weights = apply_dropout(scores.softmax(-1), dropout_p, dropout_p > 0)
    out_top = weights @ v  # [B, H, u, E]

    # Everyone else: the output of uniform attention over the keys they may see.
    if causal:
        counts = torch.arange(1, L_K + 1, device=v.device, dtype=v.dtype).view(1, 1, L_K, 1)
        out = v.cumsum(2) / counts
    else:
        out = v.mean(2, keepdim=True).expand(B, H, L_Q, E).contiguous()
    # (Under CUDA autocast cumsum runs in float32 while out_top is half precision.)
    return out.scatter(2, top_e, out_top.to(out.dtype)), top


class FullAttention(nn.Module):
    """forward(q, k, v, prev) -> (output, scores): scores are the pre-softmax scores passed on
    to the next layer with residual=True (residual_attention), else None (and prev must be None)."""

    def __init__(self, causal, dropout, residual=False):
        super().__init__()
        if residual and causal:
            raise ValueError("residual attention is an encoder's (PatchTST): it has no causal form here")
        self.causal, self.dropout, self.residual = causal, dropout, residual

    def forward(self, q, k, v, prev=None):
        p = self.dropout if self.training else 0.0
        if self.residual:
            return residual_attention(q, k, v, prev, p)
        if prev is not None:
            raise ValueError("FullAttention got previous scores but is not residual (residual=False)")
        return full_attention(q, k, v, self.causal, p), None


class ProbAttention(nn.Module):
    def __init__(self, causal, dropout, factor):
        super().__init__()
        self.causal, self.dropout, self.factor = causal, dropout, factor
        self.residual = False

    def forward(self, q, k, v, prev=None):
        if prev is not None:
            raise ValueError("ProbAttention got previous scores: residual attention needs attn 'full'")
        out, _ = prob_attention(q, k, v, self.factor, self.causal, self.dropout if self.training else 0.0)
        return out, None


def make_attention(kind, causal, dropout, factor, residual=False):
    if kind == "prob":
        if residual:
            raise ValueError("residual attention needs attn 'full' (ProbSparse scores only its active queries)")
        return ProbAttention(causal, dropout, factor)
    return FullAttention(causal, dropout, residual)


class AttentionLayer(nn.Module):
    """Multi-head attention: Q/K/V projections, an inner attention, output projection.

    mix=True is Informer's decoder self-attention trick: the [B, H, L, E] head outputs
    are read as [B, L, H*E] without moving heads next to their time step, so each
    output row blends several heads and time steps before the output projection.
    """

    def __init__(self, attention, d_model, n_heads, mix=False):
        super().__init__()
        self.attention, self.n_heads, self.mix = attention, n_heads, mix
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, context, prev=None):
        """x [B, L, d_model] queries; context [B, S, d_model] keys/values; prev: the previous
        layer's scores for residual attention. -> (output [B, L, d_model], this layer's scores
        [B, H, L, S] with residual attention, else None)."""
        B, L, D = x.shape
        S, H = context.size(1), self.n_heads
        q = self.q_proj(x).view(B, L, H, -1).transpose(1, 2)
        k = self.k_proj(context).view(B, S, H, -1).transpose(1, 2)
        v = self.v_proj(context).view(B, S, H, -1).transpose(1, 2)
        out, scores = self.attention(q, k, v, prev)  # [B, H, L, E]
        out = out.reshape(B, L, D) if self.mix else out.transpose(1, 2).reshape(B, L, D)
        return self.out_proj(out), scores


# -----------------------------------------------------------------------------
# Encoder and decoder

class FeedForward(nn.Module):
    """Position-wise FFN: Linear(d_model, d_ff) -> activation -> dropout -> Linear(d_ff, d_model)
    -> dropout, its weights held as Informer's two kernel-1 convolutions over time."""

    def __init__(self, d_model, d_ff, dropout, activation):
        super().__init__()
        self.conv1 = nn.Conv1d(d_model, d_ff, kernel_size=1)
        self.conv2 = nn.Conv1d(d_ff, d_model, kernel_size=1)
        self.act = make_act(activation)
        self.dropout = Dropout(dropout)

    def forward(self, x):  # [B, L, d_model]
        # A kernel-1 convolution is a linear map of each time step: computed as one, with no
        # transposes (the convolutions stay as the parameters' holders, so checkpoints still load).
        return self.dropout(mlp_forward(x, self.conv1.weight.squeeze(-1), self.conv1.bias, self.act, self.dropout.p,
                                        self.training, self.conv2.weight.squeeze(-1), self.conv2.bias))


class TokenBatchNorm(nn.BatchNorm1d):
    """Batch normalisation of tokens [B, N, D] over their D features, with statistics over the
    batch and the tokens: PatchTST's normalisation in its encoder layers (its paper found batch
    norm better than layer norm for time-series transformers, after Zerveas et al., KDD 2021)."""

    def forward(self, x):
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


def make_norm(kind, d_model):
    return TokenBatchNorm(d_model) if kind == "batch" else nn.LayerNorm(d_model)


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each with a residual and a post-norm (layer norm, or batch norm
    with norm="batch"). forward(x, prev) -> (x, scores): see AttentionLayer."""

    def __init__(self, attention, d_model, d_ff, dropout, activation, norm="layer"):
        super().__init__()
        self.attention = attention
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = make_norm(norm, d_model)
        self.norm2 = make_norm(norm, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x, prev=None):
        out, scores = self.attention(x, x, prev)
        x = self.norm1(x + self.dropout(out))
        return self.norm2(x + self.ffn(x)), scores


class AttentionEncoder(nn.Sequential):
    """A stack of EncoderLayers (the Forecaster's attention mixer) that hands each layer's
    attention scores to the next (used by residual attention; None otherwise). An nn.Sequential,
    so its state-dict keys are the layers' indices."""

    def forward(self, x):
        scores = None
        for layer in self:
            x, scores = layer(x, scores)
        return x


class DistilLayer(nn.Module):
    """Self-attention distilling: keeps the dominant features and halves the length
    (L -> ceil(L / 2)), so deeper layers attend over fewer, more informative tokens."""

    def __init__(self, d_model):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(d_model)
        self.act = nn.ELU()
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):  # [B, L, d_model] -> [B, ceil(L/2), d_model]
        x = self.pool(self.act(self.norm(self.conv(x.transpose(1, 2)))))
        return x.transpose(1, 2)


class Encoder(nn.Module):
    def __init__(self, layers, distils, d_model):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.distils = nn.ModuleList(distils)  # empty, or one fewer than layers
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x, _ = layer(x)
            if i < len(self.distils):
                x = self.distils[i](x)
        return self.norm(x)


class DecoderLayer(nn.Module):
    def __init__(self, self_attention, cross_attention, d_model, d_ff, dropout, activation):
        super().__init__()
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x, memory):
        x = self.norm1(x + self.dropout(self.self_attention(x, x)[0]))
        x = self.norm2(x + self.dropout(self.cross_attention(x, memory)[0]))
        return self.norm3(x + self.ffn(x))


class Decoder(nn.Module):
    def __init__(self, layers, d_model, c_out):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, c_out)

    def forward(self, x, memory):
        for layer in self.layers:
            x = layer(x, memory)
        return self.proj(self.norm(x))


# -----------------------------------------------------------------------------
# RevIN

class RevIN(nn.Module):
    """Reversible instance normalisation: each series is normalised by its own mean/std
    over the input window, and the prediction is mapped back with the same statistics.
    This removes the level/scale shift between training and test windows. affine=True adds a
    learned per-channel scale and shift in the normalised space (RevIN's paper); PatchTST's
    code runs it without (affine=False: no parameters)."""

    def __init__(self, n_channels, eps=1e-5, affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n_channels)) if affine else None

    def stats(self, x):  # [B, L, C] -> mean, std, each [B, 1, C]
        mean = x.mean(1, keepdim=True)
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps)
        return mean, std

    def norm(self, x, mean, std):
        x = (x - mean) / std
        return x if self.weight is None else x * self.weight + self.bias

    def denorm(self, y, mean, std, channels):
        """channels: slice of the input channels that y's columns correspond to."""
        if self.weight is not None:
            y = (y - self.bias[channels]) / (self.weight[channels] + self.eps * self.eps)
        return y * std[..., channels] + mean[..., channels]


def check_dropouts(cfg) -> None:
    for name in ("dropout", "attn_dropout"):
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"model config: {name} must be in [0, 1), got {value}")


def attention_dropout(cfg) -> float:
    """The dropout on attention weights: attn_dropout, or the model's dropout when unset
    (Informer and iTransformer use one rate; PatchTST drops no attention weights)."""
    return cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout


# -----------------------------------------------------------------------------
# The model

class Informer(nn.Module):
    def __init__(self, cfg: InformerConfig):
        super().__init__()
        self.cfg = cfg
        d, h, drop, act = cfg.d_model, cfg.n_heads, cfg.dropout, cfg.activation
        a_drop = attention_dropout(cfg)
        self.revin = RevIN(cfg.enc_in, affine=cfg.revin_affine) if cfg.revin else None
        self.enc_embedding = DataEmbedding(cfg.enc_in, d, cfg.embed, drop)
        self.dec_embedding = DataEmbedding(cfg.dec_in, d, cfg.embed, drop)
        self.encoder = Encoder(
            [EncoderLayer(AttentionLayer(make_attention(cfg.attn, False, a_drop, cfg.factor), d, h), d, cfg.d_ff, drop, act)
             for _ in range(cfg.e_layers)],
            [DistilLayer(d) for _ in range(cfg.e_layers - 1)] if cfg.distil else [],
            d,
        )
        self.decoder = Decoder(
            [DecoderLayer(
                AttentionLayer(make_attention(cfg.attn, True, a_drop, cfg.factor), d, h, mix=cfg.mix),
                AttentionLayer(make_attention("full", False, a_drop, cfg.factor), d, h),
                d, cfg.d_ff, drop, act)
             for _ in range(cfg.d_layers)],
            d,
            cfg.c_out,
        )

    def check_inputs(self, x_enc, x_mark_enc, x_dec, x_mark_dec):
        cfg = self.cfg
        dec_len = cfg.label_len + cfg.pred_len
        B = x_enc.size(0) if x_enc.dim() > 0 else None
        expected = {
            "x_enc": (x_enc, (cfg.seq_len, cfg.enc_in)),
            "x_mark_enc": (x_mark_enc, (cfg.seq_len, N_MARKS)),
            "x_dec": (x_dec, (dec_len, cfg.dec_in)),
            "x_mark_dec": (x_mark_dec, (dec_len, N_MARKS)),
        }
        for name, (x, (length, width)) in expected.items():
            shape = list(x.shape)
            # The batch size is free, but all four inputs must agree on it (x_enc sets it).
            batch = "B" if name == "x_enc" else B
            want = f"[{batch}, {length}, {width}]"
            if x.dim() != 3:
                raise ValueError(f"{name}: expected shape {want}, got {shape} (expected 3 dims, got {x.dim()})")
            wrong = [i for i, (got, exp) in enumerate(zip(shape, (B, length, width))) if got != exp]
            if wrong:
                names = {0: "batch", 1: "time", 2: "channel"}
                what = ", ".join(f"dim {i} ({names[i]})" for i in wrong)
                raise ValueError(f"{name}: expected shape {want}, got {shape} ({what} wrong)")
            if not x.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")

    def forward(self, x_enc, x_mark_enc, x_dec, x_mark_dec):
        self.check_inputs(x_enc, x_mark_enc, x_dec, x_mark_dec)
        cfg = self.cfg
        if self.revin is not None:
            mean, std = self.revin.stats(x_enc)
            x_enc = self.revin.norm(x_enc, mean, std)
            # Only the known steps are data; the placeholders stay as given (zeros, which is
            # the series mean in normalised space).
            known = self.revin.norm(x_dec[:, : cfg.label_len], mean, std)
            x_dec = torch.cat([known, x_dec[:, cfg.label_len:]], dim=1)

        memory = self.encoder(self.enc_embedding(x_enc, x_mark_enc))
        y = self.decoder(self.dec_embedding(x_dec, x_mark_dec), memory)
        y = y[:, -cfg.pred_len:, :]  # [B, pred_len, c_out]

        if self.revin is not None:
            # c_out == enc_in: channel i is input channel i. Otherwise ("MS", c_out == 1)
            # the target is the last input channel.
            channels = slice(None) if cfg.c_out == cfg.enc_in else slice(-1, None)
            y = self.revin.denorm(y, mean, std, channels)
        return y


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (frozen sinusoidal tables are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# The model space beyond Informer: normalisation, decomposition, channels, tokens,
# mixer and a linear head (see the module docstring).

CHOICES = {"decomp": ("none", "moving_avg"), "channels": ("mixed", "independent"),
           "tokens": ("time", "patch", "variate"), "mixer": ("attention", "mlp", "none"),
           "attn": ("prob", "full"), "activation": ("gelu", "relu"), "encoder_norm": ("layer", "batch")}


@dataclass
class ForecasterConfig:
    seq_len: int
    pred_len: int
    enc_in: int
    c_out: int
    revin: bool = False
    revin_affine: bool = True  # RevIN's learned scale and shift (PatchTST's code: none)
    decomp: str = "none"  # "none" | "moving_avg"
    decomp_kernel: int = 25
    channels: str = "mixed"  # "mixed" | "independent"
    tokens: str = "time"  # "time" | "patch" | "variate"
    patch_len: int = 16
    stride: int = 8
    mixer: str = "attention"  # "attention" | "mlp" | "none"
    raw_tokens: bool = False  # mixer "mlp" on the raw values, no projection to d_model (TSMixer)
    attn: str = "full"  # "prob" | "full", with mixer="attention"
    encoder_norm: str = "layer"  # "layer" | "batch": the attention layers' norm (PatchTST: batch)
    res_attention: bool = False  # scores carried from layer to layer (PatchTST), with attn="full"
    d_model: int = 128
    n_heads: int = 8
    e_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    attn_dropout: float | None = None  # on the attention weights; None: dropout
    factor: int = 5
    activation: str = "gelu"

    def __post_init__(self):
        for name in ("decomp", "channels", "tokens", "mixer", "attn", "activation", "encoder_norm"):
            if getattr(self, name) not in CHOICES[name]:
                raise ValueError(f"model config: {name} must be one of {CHOICES[name]}, got {getattr(self, name)!r}")
        for name in ("seq_len", "pred_len", "enc_in", "c_out", "decomp_kernel", "patch_len", "stride",
                     "d_model", "n_heads", "e_layers", "d_ff", "factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        check_dropouts(self)
        if self.c_out not in (self.enc_in, 1):
            raise ValueError(f"model config: c_out must be enc_in ({self.enc_in}) or 1 (the target, the last "
                             f"input channel), got {self.c_out}")
        if self.tokens == "patch" and self.patch_len > self.seq_len:
            raise ValueError(f"model config: patch_len ({self.patch_len}) must be <= seq_len ({self.seq_len})")
        if self.decomp == "moving_avg" and self.decomp_kernel > self.seq_len:
            raise ValueError(f"model config: decomp_kernel ({self.decomp_kernel}) must be <= seq_len ({self.seq_len})")
        if self.tokens == "variate" and self.channels == "independent":
            raise ValueError("model config: variate tokens need channels='mixed' (one variate is one token)")
        if self.raw_tokens and self.mixer != "mlp":
            raise ValueError(f"model config: raw_tokens needs mixer 'mlp', got {self.mixer!r} (attention works on "
                             "tokens projected to d_model; mixer 'none' always has raw tokens)")
        if self.res_attention and (self.mixer, self.attn) != ("attention", "full"):
            raise ValueError(f"model config: res_attention needs mixer 'attention' with attn 'full', got mixer "
                             f"{self.mixer!r}, attn {self.attn!r}")
        if self.mixer == "attention" and self.d_model % self.n_heads:
            raise ValueError(f"model config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


def n_patches(seq_len, patch_len, stride):
    """Patches over a window padded at the end with `stride` copies of its last value
    (PatchTST): floor((L - P) / S) + 1 patches of the window, plus one over the padding."""
    return (seq_len - patch_len) // stride + 2


class MovingAverage(nn.Module):
    """Trend = moving average over time, the window padded by repeating its first and last
    values so the trend has the input's length; seasonal = input - trend."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x):  # [B, L, C] -> (seasonal, trend), each [B, L, C]
        front, back = (self.kernel - 1) // 2, self.kernel // 2
        padded = torch.cat([x[:, :1].expand(-1, front, -1), x, x[:, -1:].expand(-1, back, -1)], dim=1)
        trend = F.avg_pool1d(padded.transpose(1, 2), self.kernel, stride=1).transpose(1, 2)
        return x - trend, trend


class Tokenizer(nn.Module):
    """[B, L, c] -> tokens [B, N, D]. With embed=False the raw values are the tokens
    (mixer "none": nothing between the values and the linear head; raw_tokens: TSMixer)."""

    def __init__(self, cfg: ForecasterConfig, c, embed):
        super().__init__()
        self.kind, self.patch_len, self.stride = cfg.tokens, cfg.patch_len, cfg.stride
        L = cfg.seq_len
        self.n_tokens, raw_dim = {
            "time": (L, c),
            "patch": (n_patches(L, cfg.patch_len, cfg.stride), cfg.patch_len * c),
            "variate": (c, L),
        }[cfg.tokens]
        self.dim = cfg.d_model if embed else raw_dim
        self.proj = nn.Linear(raw_dim, cfg.d_model) if embed else None
        if embed and cfg.mixer == "attention" and cfg.tokens == "time":
            self.register_buffer("position", sinusoid_table(L, cfg.d_model), persistent=False)
        elif embed and cfg.mixer == "attention" and cfg.tokens == "patch":
            # PatchTST learns its positional encoding; attention alone cannot tell patches apart.
            self.position = nn.Parameter(torch.empty(self.n_tokens, cfg.d_model).uniform_(-0.02, 0.02))
        else:
            self.position = None
        # Variate tokens carry no position: which variate is which is in the token itself,
        # and the model stays equivariant to the order of the variates.
        # Dropout on the embedded tokens is the transformers' (PatchTST, iTransformer); TSMixer
        # drops out inside its mixing blocks only, and at its 0.9 here it would erase the input.
        self.dropout = Dropout(cfg.dropout) if embed and cfg.mixer == "attention" else nn.Identity()

    def forward(self, x):
        if self.kind == "variate":
            x = x.transpose(1, 2)  # [B, c, L]
        elif self.kind == "patch":
            x = torch.cat([x, x[:, -1:].expand(-1, self.stride, -1)], dim=1)
            x = x.unfold(1, self.patch_len, self.stride)  # [B, N, c, P]
            x = x.transpose(2, 3).flatten(2)  # [B, N, P * c], each patch's values time-major
        if self.proj is None:
            return x
        x = self.proj(x)
        if self.position is not None:
            x = x + self.position
        return self.dropout(x)


class CellBatchNorm(nn.Module):
    """Batch normalisation of each (token, feature) cell of [B, N, D] over the batch: TSMixer's
    normalisation over both time and feature dimensions (its code's default, batch norm)."""

    def __init__(self, n_tokens, dim):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_tokens * dim)

    def forward(self, x):
        return self.norm(x.flatten(1)).view_as(x)


class FeatureMLP(nn.Sequential):
    """Linear(dim, d_ff) -> activation -> dropout -> Linear(d_ff, dim) -> dropout, as an
    nn.Sequential of those five modules (the same parameters and state-dict keys), computed by
    `mlp_forward`."""

    def __init__(self, dim, d_ff, dropout, activation):
        super().__init__(nn.Linear(dim, d_ff), make_act(activation), Dropout(dropout), nn.Linear(d_ff, dim), Dropout(dropout))

    def forward(self, x):
        first, act, dropout, second, out_dropout = self
        return out_dropout(mlp_forward(x, first.weight, first.bias, act, dropout.p, self.training,
                                       second.weight, second.bias))


class MixerBlock(nn.Module):
    """TSMixer's block over tokens [B, N, D]: a token-mixing MLP (shared over features),
    then a feature-mixing MLP (shared over tokens), each pre-normalised, with residuals.

    Embedded tokens (D = d_model) are layer-normalised over their features; raw tokens
    (D = the values of a time step, patch or variate, whose features differ in meaning)
    get TSMixer's own CellBatchNorm."""

    def __init__(self, n_tokens, dim, d_ff, dropout, activation, raw=False):
        super().__init__()
        norm = (lambda: CellBatchNorm(n_tokens, dim)) if raw else (lambda: nn.LayerNorm(dim))
        self.token_norm = norm()
        self.token_mlp = nn.Sequential(nn.Linear(n_tokens, n_tokens), make_act(activation), Dropout(dropout))
        self.feature_norm = norm()
        self.feature_mlp = FeatureMLP(dim, d_ff, dropout, activation)

    def forward(self, x):
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.feature_mlp(self.feature_norm(x))


def make_mixer(cfg: ForecasterConfig, n_tokens, dim):
    if cfg.mixer == "attention":
        d, drop = cfg.d_model, cfg.dropout
        return AttentionEncoder(*[
            EncoderLayer(AttentionLayer(make_attention(cfg.attn, False, attention_dropout(cfg), cfg.factor,
                                                       cfg.res_attention), d, cfg.n_heads),
                         d, cfg.d_ff, drop, cfg.activation, cfg.encoder_norm)
            for _ in range(cfg.e_layers)])
    if cfg.mixer == "mlp":
        return nn.Sequential(*[MixerBlock(n_tokens, dim, cfg.d_ff, cfg.dropout, cfg.activation, cfg.raw_tokens)
                               for _ in range(cfg.e_layers)])
    return nn.Identity()


class LinearHead(nn.Module):
    """Tokens [B, N, D] -> forecast [B, pred_len, c].

    time tokens: a linear map over time (N -> pred_len), then over features (D -> c);
        with raw tokens (mixer "none", D == c) the feature map is left out, so the head is a
        linear model of each channel's own past (DLinear's linear part).
    patch tokens: flatten all patches (N * D -> pred_len * c), PatchTST's head.
    variate tokens: each variate's token to its own horizon (D -> pred_len).
    """

    def __init__(self, kind, n_tokens, dim, pred_len, c, raw=False):
        super().__init__()
        self.kind, self.pred_len, self.c = kind, pred_len, c
        if kind == "time":
            self.over_time = nn.Linear(n_tokens, pred_len)
            # Decided by raw, not by dim == c: embedded tokens with d_model == c are still
            # features, not channels, and need the map back to the channels.
            self.over_features = None if raw else nn.Linear(dim, c)
        elif kind == "patch":
            self.proj = nn.Linear(n_tokens * dim, pred_len * c)
        else:
            self.proj = nn.Linear(dim, pred_len)

    def forward(self, z):
        # No dropout before the head: none of the papers has one (PatchTST's head_dropout is 0).
        if self.kind == "time":
            y = self.over_time(z.transpose(1, 2)).transpose(1, 2)  # [B, pred_len, D]
            return y if self.over_features is None else self.over_features(y)
        if self.kind == "patch":
            return self.proj(z.flatten(1)).view(-1, self.pred_len, self.c)
        return self.proj(z).transpose(1, 2)  # [B, c, pred_len] -> [B, pred_len, c]


class Forecaster(nn.Module):
    """RevIN -> decomposition -> (channel independence) -> tokens -> mixer -> linear head."""

    def __init__(self, cfg: ForecasterConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.enc_in
        self.revin = RevIN(C, affine=cfg.revin_affine) if cfg.revin else None
        self.decomp = MovingAverage(cfg.decomp_kernel) if cfg.decomp == "moving_avg" else None
        # DLinear's trend map: one linear map over time, shared by every channel.
        self.trend = nn.Linear(cfg.seq_len, cfg.pred_len) if self.decomp is not None else None
        c = 1 if cfg.channels == "independent" else C
        self.tokenizer = Tokenizer(cfg, c, embed=cfg.mixer != "none" and not cfg.raw_tokens)
        self.mixer = make_mixer(cfg, self.tokenizer.n_tokens, self.tokenizer.dim)
        self.head = LinearHead(cfg.tokens, self.tokenizer.n_tokens, self.tokenizer.dim, cfg.pred_len, c,
                               raw=self.tokenizer.proj is None)
        # The forecast covers every input channel; "MS" (c_out == 1) keeps the target, the last one.
        self.out = slice(None) if cfg.c_out == C else slice(-1, None)

    def backbone(self, x):  # [B, L, C] -> [B, pred_len, C]
        B, L, C = x.shape
        if self.cfg.channels == "independent":
            x = x.transpose(1, 2).reshape(B * C, L, 1)
        y = self.head(self.mixer(self.tokenizer(x)))
        if self.cfg.channels == "independent":
            y = y.reshape(B, C, self.cfg.pred_len).transpose(1, 2)
        return y

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None):
        # Time marks and the decoder input are Informer's; these families read x_enc alone.
        cfg = self.cfg
        if x_enc.dim() != 3 or tuple(x_enc.shape[1:]) != (cfg.seq_len, cfg.enc_in):
            raise ValueError(f"x_enc: expected shape [B, {cfg.seq_len}, {cfg.enc_in}], got {list(x_enc.shape)}")
        x = x_enc
        if self.revin is not None:
            mean, std = self.revin.stats(x)
            x = self.revin.norm(x, mean, std)
        if self.decomp is not None:
            x, trend = self.decomp(x)
            y = self.backbone(x) + self.trend(trend.transpose(1, 2)).transpose(1, 2)
        else:
            y = self.backbone(x)
        y = y[..., self.out]
        if self.revin is not None:
            y = self.revin.denorm(y, mean, std, self.out)
        return y


def _kwargs_for(cls, model: dict, **fixed) -> dict:
    known = {f.name for f in fields(cls)}
    return {**{k: v for k, v in model.items() if k in known and v is not None}, **fixed}


def build_model(config) -> nn.Module:
    """The forecaster a project config describes: a nested dict with "data" and "model"
    sections (or an object with .model_dump() returning one). Unknown keys are ignored.

    model.head "decoder" (the default) is Informer; "linear" is a Forecaster of the
    family the other model keys choose."""
    if hasattr(config, "model_dump"):
        config = config.model_dump()
    data, model = config["data"], config["model"]
    for key in ("enc_in", "dec_in", "c_out"):
        if model.get(key) is None:
            raise ValueError(f"model.{key} is None: it must be set from the data (its number of channels) "
                             "before building the model")
    if model.get("head", "decoder") == "decoder":
        return Informer(InformerConfig(**_kwargs_for(
            InformerConfig, model, seq_len=data["seq_len"], label_len=data["label_len"], pred_len=data["pred_len"])))
    return Forecaster(ForecasterConfig(**_kwargs_for(
        ForecasterConfig, model, seq_len=data["seq_len"], pred_len=data["pred_len"])))
