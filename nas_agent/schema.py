"""The validated config schema: three sections, `data`, `model` and `training`.

Every field has a type, a range and a default. Unknown keys are rejected with a
"did you mean" hint, and cross-field rules (d_model % n_heads, label_len <= seq_len,
scheduler arguments) are checked here, so train.py and the agent never see a config
that cannot run. Torch classes are referred to by qualified name ("optim.Adam");
`resolve_class` turns a name into the class.

Errors are raised as pydantic ValidationError; `nas_agent.config.format_validation_error`
turns them into "expected versus actual" lines for people.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Torch classes a config may name. A config file refers to them as attributes of the two
# allowed imports (`optim.Adam`, `nn.MSELoss`, `optim.lr_scheduler.StepLR`).
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
SCHEDULERS = ("CosineAnnealingLR", "StepLR", "MultiStepLR", "ExponentialLR", "ReduceLROnPlateau")
CRITERIA = ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss")

ALLOWED_CLASSES = (
    {f"optim.{n}" for n in OPTIMIZERS}
    | {f"optim.lr_scheduler.{n}" for n in SCHEDULERS}
    | {f"nn.{n}" for n in CRITERIA}
)


def resolve_class(qualified: str):
    """Map an allowed qualified name ("optim.Adam") to the torch class."""
    import torch.nn as nn
    import torch.optim as optim

    if qualified not in ALLOWED_CLASSES:
        raise ValueError(f"class {qualified!r} is not allowed; choose one of {sorted(ALLOWED_CLASSES)}")
    root, *rest = qualified.split(".")
    obj = {"optim": optim, "nn": nn}[root]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _canonical_class(value: Any, prefix: str, names: tuple[str, ...], what: str) -> str:
    """Accept "Adam", "optim.Adam" or "torch.optim.Adam"; return "optim.Adam"."""
    if not isinstance(value, str):
        raise ValueError(f"expected the name of a {what} such as {prefix}{names[0]}, got {value!r}")
    short = value.removeprefix("torch.").removeprefix(prefix)
    if short not in names:
        hint = difflib.get_close_matches(short, names, n=1)
        extra = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
        raise ValueError(f"unknown {what} {value!r}{extra}; expected one of {', '.join(prefix + n for n in names)}")
    return prefix + short


class _Section(BaseModel):
    """Base for config sections: forbid unknown keys, with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a dict of settings, got {type(data).__name__}")
        known = set(cls.model_fields)
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(str(key), sorted(known), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(f"unknown key {key!r}{extra}; allowed keys: {', '.join(sorted(known))}")
        return data


class DataConfig(_Section):
    path: str = "data/ETTh1.csv"
    features: Literal["M", "S", "MS"] = "M"
    target: str = "OT"
    # <= 2048 each keeps label_len + pred_len inside the model's positional table (5000 steps).
    seq_len: int = Field(96, ge=1, le=2048)
    label_len: int = Field(48, ge=0, le=2048)
    pred_len: int = Field(96, ge=1, le=2048)
    # auto: ETTh*/ETTm* files use the fixed ETT borders, everything else `split_ratios`.
    split: Literal["auto", "ett_hour", "ett_minute", "ratio"] = "auto"
    split_ratios: list[float] = Field(default_factory=lambda: [0.7, 0.1, 0.2])
    scale: bool = True

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or any(r <= 0 for r in v) or sum(v) > 1.0 + 1e-9:
            raise ValueError(f"expected three positive fractions (train, val, test) summing to <= 1, got {v}")
        return v


class ModelConfig(_Section):
    # Filled in by train.py from the data (number of input/output channels); leave None.
    enc_in: Optional[int] = Field(None, ge=1)
    dec_in: Optional[int] = Field(None, ge=1)
    c_out: Optional[int] = Field(None, ge=1)
    d_model: int = Field(256, ge=4, le=4096)
    n_heads: int = Field(4, ge=1, le=64)
    e_layers: int = Field(3, ge=1, le=12)
    d_layers: int = Field(1, ge=1, le=12)
    d_ff: int = Field(1024, ge=4, le=16384)
    dropout: float = Field(0.1, ge=0.0, le=0.9)
    attn_dropout: Optional[float] = Field(None, ge=0.0, le=0.9)  # on attention weights; None: dropout
    factor: int = Field(5, ge=1, le=50)
    attn: Literal["prob", "full"] = "prob"
    distil: bool = True
    embed: Literal["timeF", "fixed", "learned"] = "timeF"
    activation: Literal["gelu", "relu"] = "gelu"
    mix: bool = True
    # The model space (model.py's docstring). The defaults are Informer; FAMILY_RULES says
    # which combinations make a model.
    revin: bool = False  # normalisation: RevIN, or none
    # With revin: RevIN's learned per-channel scale and shift (PatchTST's code: false). Without
    # RevIN it has no effect, like patch_len without patch tokens: a search whose base config sets
    # it false may still sample revin false.
    revin_affine: bool = True
    head: Literal["decoder", "linear"] = "decoder"  # Informer's generative decoder, or flatten + linear
    tokens: Literal["time", "patch", "variate"] = "time"
    channels: Literal["mixed", "independent"] = "mixed"
    mixer: Literal["attention", "mlp", "none"] = "attention"  # attention: model.attn says which
    raw_tokens: bool = False  # the MLP mixer on the raw values, not projected to d_model (TSMixer)
    encoder_norm: Literal["layer", "batch"] = "layer"  # the attention mixer's norm (PatchTST: batch)
    res_attention: bool = False  # attention scores carried from layer to layer (PatchTST), attn "full"
    decomp: Literal["none", "moving_avg"] = "none"  # trend + seasonal (DLinear)
    decomp_kernel: int = Field(25, ge=2, le=2048)  # moving-average window, <= data.seq_len
    patch_len: int = Field(16, ge=1, le=2048)  # with tokens "patch"; <= data.seq_len
    stride: int = Field(8, ge=1, le=2048)  # with tokens "patch"

    @model_validator(mode="after")
    def _family(self) -> "ModelConfig":
        for (key, value), needs in FAMILY_RULES.items():
            if getattr(self, key) == value:
                for other, allowed in needs.items():
                    _require(self, key, other, allowed)
        if self.uses_attention() and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model must be divisible by model.n_heads: expected d_model % n_heads == 0, "
                f"got {self.d_model} % {self.n_heads} == {self.d_model % self.n_heads}"
            )
        return self

    def uses_attention(self) -> bool:
        return self.head == "decoder" or self.mixer == "attention"


def model_family(model: dict) -> str:
    """A short name for a model section's family: "informer" (the decoder head), else
    "<tokens>-<mixer>" with "-ci" for channel independence (e.g. "patch-attention-ci" is
    PatchTST-like, "time-none-ci" with decomposition DLinear-like, "variate-attention" iTransformer-like,
    "time-mlp-raw" TSMixer)."""
    if model.get("head", "decoder") == "decoder":
        return "informer"
    name = f"{model.get('tokens', 'time')}-{model.get('mixer', 'attention')}"
    name += "-raw" if model.get("raw_tokens") and model.get("mixer") == "mlp" else ""
    return name + ("-ci" if model.get("channels") == "independent" and model.get("tokens") != "variate" else "")


# What a choice needs of other keys: head "decoder" is Informer's encoder-decoder over time
# steps, so it needs the other keys at Informer's values.
FAMILY_RULES: dict[tuple[str, object], dict[str, tuple[str, ...]]] = {
    ("head", "decoder"): {"tokens": ("time",), "channels": ("mixed",), "mixer": ("attention",),
                          "decomp": ("none",)},
    ("tokens", "variate"): {"channels": ("mixed",)},
    ("raw_tokens", True): {"head": ("linear",), "mixer": ("mlp",)},
    ("encoder_norm", "batch"): {"head": ("linear",), "mixer": ("attention",)},
    ("res_attention", True): {"head": ("linear",), "mixer": ("attention",), "attn": ("full",)},
}
_WHY = {
    ("head", "decoder"): "Informer's generative decoder reads every time step of every variate; "
                         "set model.head to 'linear' for the other families",
    ("tokens", "variate"): "with variate tokens each variate is one token, so channels are mixed by the mixer",
    ("raw_tokens", True): "raw tokens are for the MLP mixer (TSMixer); attention works on tokens projected "
                          "to d_model and mixer 'none' has raw tokens anyway, so set model.raw_tokens to false",
    ("encoder_norm", "batch"): "encoder_norm is the norm of the linear-head families' attention layers; set "
                               "model.encoder_norm to 'layer' for the others",
    ("res_attention", True): "residual attention adds each layer's full attention scores to the next's, in the "
                             "linear-head families' attention mixer (ProbSparse scores only its active queries); "
                             "set model.attn to 'full' and model.mixer to 'attention', or model.res_attention "
                             "to false",
}


def _require(m: "ModelConfig", key: str, other: str, allowed: tuple[str, ...]) -> None:
    value, got = getattr(m, key), getattr(m, other)
    if got not in allowed:
        expected = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"model.{other}: expected {expected} with model.{key} {value!r}, got {got!r} "
                         f"({_WHY[(key, value)]})")


class TrainingConfig(_Section):
    optimizer_class: str = "optim.Adam"
    lr: float = Field(1e-4, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    optimizer_kwargs: dict[str, Any] = Field(default_factory=dict)
    criterion_class: str = "nn.MSELoss"
    criterion_kwargs: dict[str, Any] = Field(default_factory=dict)
    scheduler_class: Optional[str] = "optim.lr_scheduler.CosineAnnealingLR"
    scheduler_kwargs: dict[str, Any] = Field(default_factory=lambda: {"T_max": 10})
    max_epochs: int = Field(20, ge=1, le=10000)
    patience: int = Field(5, ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=65536)
    seed: int = Field(2021, ge=0, le=2**32 - 1)
    grad_clip: Optional[float] = Field(None, gt=0.0)
    time_budget_s: Optional[float] = Field(None, gt=0.0)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    amp: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_scheduler_kwargs(cls, data: Any) -> Any:
        """{"T_max": 10} is the default cosine schedule's argument, not every scheduler's:
        a config that names another scheduler (or None) without kwargs gets {}."""
        if isinstance(data, dict) and "scheduler_kwargs" not in data and "scheduler_class" in data:
            name = data["scheduler_class"]
            is_cosine = isinstance(name, str) and name.endswith("CosineAnnealingLR")
            data = {**data, "scheduler_kwargs": {"T_max": 10} if is_cosine else {}}
        return data

    @field_validator("optimizer_class", mode="before")
    @classmethod
    def _optimizer(cls, v: Any) -> str:
        return _canonical_class(v, "optim.", OPTIMIZERS, "optimizer")

    @field_validator("criterion_class", mode="before")
    @classmethod
    def _criterion(cls, v: Any) -> str:
        return _canonical_class(v, "nn.", CRITERIA, "loss")

    @field_validator("scheduler_class", mode="before")
    @classmethod
    def _scheduler(cls, v: Any) -> Optional[str]:
        if v is None:
            return None
        return _canonical_class(v, "optim.lr_scheduler.", SCHEDULERS, "lr scheduler")

    @model_validator(mode="after")
    def _kwargs_match_signatures(self) -> "TrainingConfig":
        _check_kwargs("optimizer_kwargs", self.optimizer_class, self.optimizer_kwargs,
                      supplied=("params", "lr", "weight_decay"))
        _check_kwargs("criterion_kwargs", self.criterion_class, self.criterion_kwargs,
                      supplied=("size_average", "reduce", "reduction"))
        if self.scheduler_class is None:
            if self.scheduler_kwargs:
                raise ValueError(f"scheduler_kwargs is {self.scheduler_kwargs} but scheduler_class is None; "
                                 f"also set scheduler_kwargs to {{}} (e.g. --set training.scheduler_kwargs={{}})")
        else:
            _check_kwargs("scheduler_kwargs", self.scheduler_class, self.scheduler_kwargs,
                          supplied=("optimizer",))
        return self


@functools.lru_cache(maxsize=None)
def _parameters(qualified: str):
    """The constructor parameters of an allowed class (cached: configs are validated often)."""
    return inspect.signature(resolve_class(qualified).__init__).parameters


def _check_kwargs(field: str, qualified: str, kwargs: dict, supplied: tuple[str, ...]) -> None:
    """Check keyword arguments against the class signature: unknown, reserved and missing ones."""
    params = _parameters(qualified)
    accepted = [p for p in params if p not in ("self", "args", "kwargs") and p not in supplied]
    for key in kwargs:
        if key in supplied:
            raise ValueError(f"{field}: {key!r} is set by train.py (use the top-level training field instead)")
        if key not in accepted:
            hint = difflib.get_close_matches(key, accepted, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"{field}: {qualified} has no argument {key!r}{extra}; it accepts {', '.join(accepted)}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"{field}: {qualified} needs {', '.join(missing)}; add e.g. {{{missing[0]!r}: ...}}")


class Config(_Section):
    """The whole config. Sections default, so `Config()` is the baseline."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> "Config":
        d, m = self.data, self.model
        if d.label_len > d.seq_len:
            raise ValueError(
                f"data.label_len must be <= data.seq_len (the decoder's known part is taken from the "
                f"encoder window): got label_len {d.label_len} > seq_len {d.seq_len}"
            )
        if m.head == "linear" and m.tokens == "patch" and m.patch_len > d.seq_len:
            raise ValueError(f"model.patch_len: expected 1 <= patch_len <= data.seq_len ({d.seq_len}), "
                             f"got {m.patch_len}; use a shorter patch or a longer look-back")
        if m.head == "linear" and m.decomp == "moving_avg" and m.decomp_kernel > d.seq_len:
            raise ValueError(f"model.decomp_kernel: expected 2 <= decomp_kernel <= data.seq_len ({d.seq_len}), "
                             f"got {m.decomp_kernel}; a moving average cannot be longer than the look-back")
        if m.raw_tokens and self.training.batch_size < 2:
            raise ValueError(f"training.batch_size: expected >= 2 with model.raw_tokens true, got "
                             f"{self.training.batch_size}; raw tokens are batch-normalised over the batch")
        if m.head == "linear" and m.tokens == "variate" and d.features == "S":
            raise ValueError("model.tokens: 'variate' needs several variates, got data.features 'S' (one variate); "
                             "use features 'M' or 'MS', or tokens 'time' or 'patch'")
        return self
