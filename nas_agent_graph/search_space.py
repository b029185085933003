"""The hyperparameter search space: what the Optuna proposers (and the LLM) may change.

The space is declared in one place, `DEFAULT_SPACE` below, and can be changed without
touching code through a JSON file (`load_space(path)`), which maps config paths to entries:

    {
      "model.dropout": null,                                        # remove: keep the base value
      "training.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": true},   # replace
      "model.activation": {"type": "categorical", "choices": ["gelu", "relu"]}    # add
    }

(JSON has no comments; keys starting with "#" are ignored so a file can carry notes.)
Keys may use the original nas_system's spellings ("training.optimizer_params.lr",
"data.batch_size", ...; see nas_agent/legacy.py); they name the canonical key.

Entry shapes:

    {"type": "float", "low": <number>, "high": <number>, "log": <bool, default false>}
    {"type": "int", "low": <int>, "high": <int>, "step": <int, default 1>, "log": <bool, default false>}
    {"type": "categorical", "choices": [<null | bool | number | string>, ...]}

Conditional keys. Any entry may carry `"when"`, which says in which part of the space the key
exists (the architecture families of model.py need it: `patch_len` means nothing without patch
tokens):

    "when": {"model.tokens": ["patch"]}                               # tokens is "patch"
    "when": {"model.head": ["linear"], "model.mixer": ["attention"]}  # both hold
    "when": [{"model.head": ["decoder"]}, {"model.mixer": ["attention"]}]   # either holds

A condition names a categorical key that comes earlier in the space (it holds when that key is
active and takes one of the listed values), or a config field outside the space (it holds when
the base config's value is listed). An inactive key is not sampled, not shown to the LLM and
not part of a run's params; its config field takes the schema's default (a virtual key derives
from the default config's ratio), so configs that differ only in unused settings are one config.
Samplers sample define-by-run, key by key in the space's order.

Keys are "section.field" config paths, plus three VIRTUAL keys that exist so the schema's
cross-field rules hold by construction, never by rejection:

    model.head_dim    d_model   = head_dim * n_heads           (so d_model % n_heads == 0)
    model.ff_mult     d_ff      = round(ff_mult * d_model)
    data.label_frac   label_len = max(1, round(seq_len * label_frac))   (<= seq_len for frac <= 1)

A virtual key and the field it derives cannot both be searched (pick one). When a virtual key
is removed from the space (null), its value comes from the base config like any other key:
the base config's own ratio (head_dim = base d_model / base n_heads, ...), so the rule still
holds when n_heads or seq_len is searched. To keep d_model itself fixed, remove both
model.head_dim and model.n_heads.

Two real keys also carry companion settings, set from the tables `SCHEDULER_KWARGS` and
`OPTIMIZER_KWARGS` whenever the search picks the class: a scheduler needs its required
arguments (T_max, step_size, ...), and SGD without momentum is not worth a training run.

`SearchSpace.to_config(params, base)` turns sampled params into a full config that passes
`validate_config`; `from_config(config)` is its inverse, used to show past runs to a sampler.
"""
from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna.distributions as od

from nas_agent.config import ConfigError, validate_config
from nas_agent.legacy import canonical_key
from nas_agent.schema import ALLOWED_CLASSES, Config, DataConfig, ModelConfig, TrainingConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the default space

_ATTENTION = [{"model.head": ["decoder"]}, {"model.mixer": ["attention"]}]
_WIDTH = [{"model.head": ["decoder"]}, {"model.mixer": ["attention", "mlp"]}]
# d_model is the width of projected tokens; TSMixer's raw tokens keep their own.
_PROJECTED = [{"model.head": ["decoder"]}, {"model.mixer": ["attention"]},
              {"model.mixer": ["mlp"], "model.raw_tokens": [False]}]

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    # Look-back: 4 days to 30 days of hourly history (the ETTh1 splits allow up to 720).
    "data.seq_len": {"type": "categorical", "choices": [96, 192, 336, 512, 720]},
    # The family's skeleton: Informer's encoder-decoder, or a backbone with a linear head.
    "model.head": {"type": "categorical", "choices": ["decoder", "linear"]},
    # Linear-head families: what a token is, how channels are treated, what mixes the tokens.
    "model.tokens": {"type": "categorical", "choices": ["time", "patch", "variate"],
                     "when": {"model.head": ["linear"]}},
    "model.channels": {"type": "categorical", "choices": ["mixed", "independent"],
                       "when": {"model.head": ["linear"], "model.tokens": ["time", "patch"]}},
    "model.patch_len": {"type": "categorical", "choices": [8, 16, 24, 32], "when": {"model.tokens": ["patch"]}},
    "model.stride": {"type": "categorical", "choices": [4, 8, 16], "when": {"model.tokens": ["patch"]}},
    "model.mixer": {"type": "categorical", "choices": ["attention", "mlp", "none"],
                    "when": {"model.head": ["linear"]}},
    # The MLP mixer on projected tokens, or on the raw values (TSMixer proper).
    "model.raw_tokens": {"type": "categorical", "choices": [False, True], "when": {"model.mixer": ["mlp"]}},
    # Trend + seasonal decomposition (DLinear), and its moving-average window.
    "model.decomp": {"type": "categorical", "choices": ["none", "moving_avg"], "when": {"model.head": ["linear"]}},
    "model.decomp_kernel": {"type": "categorical", "choices": [13, 25, 49],
                            "when": {"model.decomp": ["moving_avg"]}},
    # Reversible instance normalisation: often a large gain on drifting series.
    "model.revin": {"type": "categorical", "choices": [True, False]},
    # ProbSparse (Informer's) or canonical full attention, wherever there is attention.
    "model.attn": {"type": "categorical", "choices": ["prob", "full"], "when": _ATTENTION},
    # The linear-head families' attention layers: layer norm, or batch norm over tokens
    # (PatchTST's code; on ETTh2 it took PatchTST/42 from test 0.292 to 0.275), and residual
    # attention scores carried from layer to layer (PatchTST's code, full attention only).
    "model.encoder_norm": {"type": "categorical", "choices": ["layer", "batch"],
                           "when": {"model.head": ["linear"], "model.mixer": ["attention"]}},
    "model.res_attention": {"type": "categorical", "choices": [False, True],
                            "when": {"model.head": ["linear"], "model.mixer": ["attention"], "model.attn": ["full"]}},
    # ProbSparse sampling factor c.
    "model.factor": {"type": "categorical", "choices": [3, 5, 8], "when": {"model.attn": ["prob"]}},
    # Width; every choice is divisible by every head count.
    "model.d_model": {"type": "categorical", "choices": [16, 32, 64, 128, 256, 512], "when": _PROJECTED},
    "model.n_heads": {"type": "categorical", "choices": [1, 2, 4, 8], "when": _ATTENTION},
    # Encoder layers (attention) or mixer blocks (MLP).
    "model.e_layers": {"type": "int", "low": 1, "high": 6, "step": 1, "log": False, "when": _WIDTH},
    # Feed-forward width (attention) or feature-mixing hidden width (MLP).
    "model.d_ff": {"type": "categorical", "choices": [64, 128, 256, 512, 1024, 2048], "when": _WIDTH},
    # Informer only: decoder depth, distilling, time-mark embedding, the decoder's start token.
    "model.d_layers": {"type": "int", "low": 1, "high": 2, "step": 1, "log": False,
                       "when": {"model.head": ["decoder"]}},
    "model.distil": {"type": "categorical", "choices": [True, False], "when": {"model.head": ["decoder"]}},
    "model.embed": {"type": "categorical", "choices": ["timeF", "fixed", "learned"],
                    "when": {"model.head": ["decoder"]}},
    # Virtual: the decoder's start token as a fraction of the input window (sets data.label_len).
    "data.label_frac": {"type": "categorical", "choices": [0.25, 0.5, 1.0], "when": {"model.head": ["decoder"]}},
    # Dropout everywhere in the model (the papers use 0 to 0.9).
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.9, "log": False},
    # Optimizer; SGD gets momentum 0.9 (OPTIMIZER_KWARGS).
    "training.optimizer_class": {"type": "categorical", "choices": ["optim.Adam", "optim.AdamW", "optim.SGD"]},
    # Learning rate, log scale: 1e-4 (Informer, PatchTST) to 5e-3 (DLinear) and beyond.
    "training.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    # L2 / decoupled weight decay; the papers mostly use none.
    "training.weight_decay": {"type": "categorical", "choices": [0.0, 1e-5, 1e-4, 1e-3]},
    # Batch size: smaller batches, more (noisier) steps per epoch.
    "training.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
    # LR schedule; each one's arguments come from SCHEDULER_KWARGS. null = constant rate.
    "training.scheduler_class": {"type": "categorical", "choices": [
        "optim.lr_scheduler.CosineAnnealingLR", "optim.lr_scheduler.StepLR",
        "optim.lr_scheduler.ExponentialLR", "optim.lr_scheduler.ReduceLROnPlateau", None]},
    # Training loss; validation is always scored with MSE.
    "training.criterion_class": {"type": "categorical", "choices": ["nn.MSELoss", "nn.L1Loss", "nn.HuberLoss"]},
}

# scheduler_kwargs given to each scheduler the search picks: (how, for describe(); the rule,
# called with the config's training.max_epochs).
SCHEDULER_KWARGS: dict[str | None, tuple[str, Callable[[int], dict[str, Any]]]] = {
    # One cosine half-period over the whole run.
    "optim.lr_scheduler.CosineAnnealingLR": ("T_max=max_epochs", lambda max_epochs: {"T_max": max_epochs}),
    # Halve the rate every 3 epochs.
    "optim.lr_scheduler.StepLR": ("step_size=3, gamma=0.5", lambda max_epochs: {"step_size": 3, "gamma": 0.5}),
    # Halve the rate after 1 epoch without validation improvement (train.py steps it on val_mse).
    "optim.lr_scheduler.ReduceLROnPlateau": ("factor=0.5, patience=1",
                                             lambda max_epochs: {"factor": 0.5, "patience": 1}),
    # Halve the rate every epoch (Informer's, DLinear's and iTransformer's schedule).
    "optim.lr_scheduler.ExponentialLR": ("gamma=0.5", lambda max_epochs: {"gamma": 0.5}),
    # Not in the default space; here so that a space file may name it.
    "optim.lr_scheduler.MultiStepLR": ("milestones at 1/2 and 3/4 of max_epochs, gamma=0.5", lambda max_epochs: {
        "milestones": sorted({max(1, max_epochs // 2), max(1, (3 * max_epochs) // 4)}), "gamma": 0.5}),
    # No scheduler: a constant learning rate.
    None: ("no arguments", lambda max_epochs: {}),
}

# optimizer_kwargs given to each optimizer the search picks; any other optimizer gets {}.
OPTIMIZER_KWARGS: dict[str, dict[str, Any]] = {
    "optim.SGD": {"momentum": 0.9},
}

_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig}
# Class-valued keys and the prefix of their canonical names ("Adam" -> "optim.Adam").
_CLASS_PREFIX = {"training.optimizer_class": "optim.", "training.criterion_class": "nn.",
                 "training.scheduler_class": "optim.lr_scheduler."}

# Real fields a space may not search, and why (the error message says it).
_NOT_SEARCHABLE = {
    "model.enc_in": "it is filled in by train.py from the data",
    "model.dec_in": "it is filled in by train.py from the data",
    "model.c_out": "it is filled in by train.py from the data",
    "training.optimizer_kwargs": "it is set from OPTIMIZER_KWARGS when training.optimizer_class is searched",
    "training.scheduler_kwargs": "it is set from SCHEDULER_KWARGS when training.scheduler_class is searched",
    "training.criterion_kwargs": "a dict cannot be a choice; set it in the base config",
    "data.split_ratios": "a list cannot be a choice; set it in the base config",
    "data.path": "it changes the data set, so validation scores would not be comparable",
    "data.features": "it changes the forecasting task, so validation scores would not be comparable",
    "data.target": "it changes the forecasting task, so validation scores would not be comparable",
    "data.pred_len": "it changes the forecasting task, so validation scores would not be comparable",
    "data.split": "it changes the validation rows, so validation scores would not be comparable",
    "data.scale": "it changes the units of val_mse, so validation scores would not be comparable",
}

_SHAPES = {
    "float": '{"type": "float", "low": <number>, "high": <number>, "log": <bool, optional>}',
    "int": '{"type": "int", "low": <int>, "high": <int>, "step": <int >= 1, optional>, "log": <bool, optional>}',
    "categorical": '{"type": "categorical", "choices": [<null, bool, number or string>, ...]}',
}
# Per type: required fields, and optional fields with their defaults.
_ENTRY_FIELDS: dict[str, tuple[set[str], dict[str, Any]]] = {
    "float": ({"low", "high"}, {"log": False}),
    "int": ({"low", "high"}, {"step": 1, "log": False}),
    "categorical": ({"choices"}, {}),
}


# The model keys that choose the family (tokens, mixer, head...), as opposed to its sizes.
ARCHITECTURE_KEYS = ("model.head", "model.tokens", "model.channels", "model.mixer", "model.decomp")


class SpaceError(ValueError):
    """A search space (file or entry) or a params dict is invalid. The message says where and why."""


# ----------------------------------------------------------------------------- config path helpers

def _get(cfg: dict, path: str) -> Any:
    section, key = path.split(".", 1)
    return cfg[section][key]


def _set(cfg: dict, path: str, value: Any) -> None:
    section, key = path.split(".", 1)
    cfg.setdefault(section, {})[key] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (a bool choice never matches a number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _canonical_class_name(key: str, value: Any) -> Any:
    """"Adam" or "torch.optim.Adam" -> "optim.Adam", as the schema stores it; anything else unchanged."""
    prefix = _CLASS_PREFIX.get(key)
    if prefix is None or not isinstance(value, str):
        return value
    name = prefix + value.removeprefix("torch.").removeprefix(prefix)
    return name if name in ALLOWED_CLASSES else value


def _short(value: Any) -> str:
    text = json.dumps(value) if _json_ok(value) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- virtual keys

@dataclass(frozen=True)
class _Virtual:
    """A key that is not a config field but derives fields from other fields.

    `derive(cfg, value)` returns the derived fields for a (final) config; `natural(cfg)` is the
    value a config implies (its inverse, used for bases and for `from_config`); `check(value)`
    returns what is wrong with a value, or None.
    """
    key: str
    derives: tuple[str, ...]
    formula: str
    derive: Callable[[dict, Any], dict[str, Any]]
    natural: Callable[[dict], Any]
    check: Callable[[Any], str | None]


def _label_len(seq_len: int, frac: float) -> int:
    """label_len for a fraction; a zero fraction (only ever from a base config) stays zero."""
    return max(1, round(seq_len * frac)) if frac > 0 else 0


def _positive_int(value: Any) -> str | None:
    ok = _is_number(value) and value > 0 and float(value).is_integer()
    return None if ok else "must be a positive whole number"


def _positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a positive number"


def _fraction(value: Any) -> str | None:
    ok = _is_number(value) and 0 < value <= 1
    return None if ok else "must be a number in (0, 1], so that label_len <= seq_len"


# In derivation order: d_ff needs the final d_model.
VIRTUAL_KEYS: dict[str, _Virtual] = {v.key: v for v in (
    _Virtual("model.head_dim", ("model.d_model",), "model.d_model = head_dim * n_heads",
             lambda c, v: {"model.d_model": int(round(v * c["model"]["n_heads"]))},
             lambda c: c["model"]["d_model"] / c["model"]["n_heads"], _positive_int),
    _Virtual("model.ff_mult", ("model.d_ff",), "model.d_ff = round(ff_mult * d_model)",
             lambda c, v: {"model.d_ff": int(round(v * c["model"]["d_model"]))},
             lambda c: c["model"]["d_ff"] / c["model"]["d_model"], _positive_number),
    _Virtual("data.label_frac", ("data.label_len",), "data.label_len = max(1, round(seq_len * label_frac))",
             lambda c, v: {"data.label_len": _label_len(c["data"]["seq_len"], v)},
             lambda c: c["data"]["label_len"] / c["data"]["seq_len"], _fraction),
)}


@functools.lru_cache(maxsize=1)
def _default_config() -> dict:
    """The schema's defaults as a full config dict (the value of an inactive key). Shared: read only."""
    return Config().model_dump()


def _config_fields() -> list[str]:
    return [f"{s}.{f}" for s, model in _SECTIONS.items() for f in model.model_fields]


def _did_you_mean(key: str) -> str:
    """A hint for an unknown key: close spellings, or the same field name in its real section."""
    known = [k for k in _config_fields() if k not in _NOT_SEARCHABLE] + list(VIRTUAL_KEYS)
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in known if k.rsplit(".", 1)[-1] == last]
    hint = same_name or difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


# ----------------------------------------------------------------------------- entries

def _normalise_entry(key: str, entry: Any, where: str) -> dict[str, Any]:
    """Check an entry's shape and fill in optional fields; the error shows the expected shape."""
    if not isinstance(entry, dict) or entry.get("type") not in _ENTRY_FIELDS:
        shapes = "\n  ".join(_SHAPES.values())
        raise SpaceError(f"{where}: {key!r}: expected an entry of one of these shapes (or null to remove "
                         f"the key from the search):\n  {shapes}\ngot {_short(entry)}")
    kind = entry["type"]
    required, optional = _ENTRY_FIELDS[kind]
    missing = sorted(required - entry.keys())
    unknown = sorted(entry.keys() - required - optional.keys() - {"type", "when"})
    if missing or unknown:
        what = "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                       f"unknown field(s) {', '.join(unknown)}" if unknown else ""]))
        raise SpaceError(f"{where}: {key!r}: {what}; expected {_SHAPES[kind]}")
    out = {"type": kind, **optional, **{k: v for k, v in entry.items() if k not in ("type", "when")}}
    (_check_categorical if kind == "categorical" else _check_range)(key, out, where)
    when = _normalise_when(key, entry.get("when"), where)
    if when:
        out["when"] = when
    return out


def _normalise_when(key: str, when: Any, where: str) -> list[dict[str, list]]:
    """A `when` as a list of conjunctions {key: [allowed values]}; [] means always active."""
    shape = ('{"model.tokens": ["patch"]} or a list of such objects (any one of them holding), '
             'each mapping a key to the list of its values for which this key exists')
    if when is None:
        return []
    conjunctions = when if isinstance(when, list) else [when]
    for conj in conjunctions:
        if not isinstance(conj, dict) or not conj or not all(
                isinstance(k, str) and isinstance(v, list) and v for k, v in conj.items()):
            raise SpaceError(f"{where}: {key!r}: 'when' must be {shape}; got {_short(when)}")
    return [dict(conj) for conj in conjunctions]


def _describe_when(when: list[dict[str, list]]) -> str:
    return " or ".join(" and ".join(f"{k} is {' or '.join(json.dumps(v) for v in allowed)}"
                                    for k, allowed in conj.items()) for conj in when)


def _check_range(key: str, e: dict, where: str) -> None:
    """low/high/step/log types and consistency, in the terms Optuna's distributions need."""
    kind = e["type"]
    number_ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else _is_number
    noun = "an integer" if kind == "int" else "a number"
    for name in ("low", "high") + (("step",) if kind == "int" else ()):
        if not number_ok(e[name]) or (kind == "float" and not math.isfinite(e[name])):
            raise SpaceError(f"{where}: {key!r}: {name} must be {noun}, got {_short(e[name])}; "
                             f"expected {_SHAPES[kind]}")
    if not isinstance(e["log"], bool):
        raise SpaceError(f"{where}: {key!r}: log must be true or false, got {_short(e['log'])}")
    if e["low"] > e["high"]:
        raise SpaceError(f"{where}: {key!r}: low {e['low']} is above high {e['high']}; swap them")
    if e["log"] and e["low"] <= 0:
        raise SpaceError(f"{where}: {key!r}: a log-scale range needs low > 0, got low {e['low']}")
    if kind == "int":
        if e["step"] < 1:
            raise SpaceError(f"{where}: {key!r}: step must be >= 1, got {e['step']}")
        if e["log"] and e["step"] != 1:
            raise SpaceError(f"{where}: {key!r}: a log-scale int range needs step 1, got step {e['step']}")
        if (e["high"] - e["low"]) % e["step"]:
            raise SpaceError(f"{where}: {key!r}: high - low ({e['high']} - {e['low']}) must be a multiple "
                             f"of step {e['step']}; e.g. set high to {e['high'] - (e['high'] - e['low']) % e['step']}")


def _check_categorical(key: str, e: dict, where: str) -> None:
    choices = e["choices"]
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{where}: {key!r}: choices must be a non-empty list, got {_short(choices)}; "
                         f"expected {_SHAPES['categorical']}")
    for i, c in enumerate(choices):
        if not (c is None or isinstance(c, (bool, int, str)) or (isinstance(c, float) and math.isfinite(c))):
            raise SpaceError(f"{where}: {key!r}: choices[{i}] is {_short(c)}; a choice must be null, a bool, "
                             f"a finite number or a string (set lists and dicts in the base config)")
        if any(_same(c, d) for d in choices[:i]):
            raise SpaceError(f"{where}: {key!r}: choice {_short(c)} is listed twice")


def _entry_values(entry: dict) -> list[Any]:
    """The values to check against the schema: every choice, or both ends of a range."""
    return list(entry["choices"]) if entry["type"] == "categorical" else [entry["low"], entry["high"]]


def _match(entry: dict, value: Any) -> tuple[bool, Any]:
    """(True, canonical param) when `value` lies in the entry, else (False, None)."""
    kind = entry["type"]
    if kind == "categorical":
        for c in entry["choices"]:
            if _same(c, value):
                return True, c
        return False, None
    if not _is_number(value) or not (entry["low"] <= value <= entry["high"]):
        return False, None
    if kind == "float":
        return True, float(value)
    if not float(value).is_integer() or (int(value) - entry["low"]) % entry["step"]:
        return False, None
    return True, int(value)


def _distribution(entry: dict) -> od.BaseDistribution:
    kind = entry["type"]
    if kind == "float":
        return od.FloatDistribution(entry["low"], entry["high"], log=entry["log"])
    if kind == "int":
        return od.IntDistribution(entry["low"], entry["high"], log=entry["log"], step=entry["step"])
    return od.CategoricalDistribution(entry["choices"])


def _describe_entry(entry: dict) -> str:
    kind = entry["type"]
    if kind == "categorical":
        return "one of " + json.dumps(entry["choices"])
    text = f"{kind} in [{entry['low']:g}, {entry['high']:g}]" if kind == "float" else \
        f"int in [{entry['low']}, {entry['high']}]" + (f" step {entry['step']}" if entry["step"] != 1 else "")
    return text + (", log scale" if entry["log"] else "")


# ----------------------------------------------------------------------------- the space

class SearchSpace:
    """A validated search space: `entries` maps config paths (and virtual keys) to entries."""

    def __init__(self, entries: dict[str, Any], where: str = "search space"):
        self.where = where
        self.entries: dict[str, dict[str, Any]] = {}
        for key, entry in entries.items():
            self._check_key(key, entries)
            self.entries[key] = _normalise_entry(key, entry, where)
        for key in self.entries:
            self._check_when(key)
        default_base = Config().model_dump()
        for key, entry in self.entries.items():
            self._check_against_schema(key, entry, default_base)

    # -- validation

    def _check_key(self, key: str, entries: dict) -> None:
        """Known, searchable, and not in conflict with a virtual key."""
        if not isinstance(key, str) or key.count(".") != 1:
            raise SpaceError(f"{self.where}: key {key!r}: expected a config path 'section.field'"
                             f"{_did_you_mean(str(key))}")
        if key in _NOT_SEARCHABLE:
            raise SpaceError(f"{self.where}: {key!r} cannot be searched: {_NOT_SEARCHABLE[key]}; "
                             "remove it from the space file")
        if key not in VIRTUAL_KEYS and key not in _config_fields():
            raise SpaceError(f"{self.where}: unknown key {key!r}{_did_you_mean(key)}; keys are config "
                             f"fields 'section.field' or the virtual keys {', '.join(VIRTUAL_KEYS)}")
        for v in VIRTUAL_KEYS.values():
            if key in v.derives and v.key in entries:
                raise SpaceError(f"{self.where}: {key!r} and the virtual key {v.key!r} ({v.formula}) "
                                 f"both set {key}; search one of them: set the other to null")

    def _check_when(self, key: str) -> None:
        """A condition names an earlier categorical key (with some of its choices) or a config
        field outside the space."""
        order = list(self.entries)
        for conj in self.entries[key].get("when", []):
            for other, allowed in conj.items():
                if other in self.entries:
                    entry = self.entries[other]
                    if order.index(other) >= order.index(key) or entry["type"] != "categorical":
                        raise SpaceError(f"{self.where}: {key!r}: 'when' names {other!r}, which must be a "
                                         f"categorical key listed before {key!r}")
                    # A value the default space offers may have been narrowed away: it never holds then.
                    known = entry["choices"] + DEFAULT_SPACE.get(other, {}).get("choices", [])
                    bad = [a for a in allowed if not any(_same(a, c) for c in known)]
                    if bad:
                        raise SpaceError(f"{self.where}: {key!r}: 'when' lists {_short(bad[0])} for {other!r}, "
                                         f"which is not one of its choices {_short(entry['choices'])}")
                elif other in VIRTUAL_KEYS or other not in _config_fields():
                    raise SpaceError(f"{self.where}: {key!r}: 'when' names {other!r}, which is neither a key of "
                                     f"the space nor a config field{_did_you_mean(other)}")

    def _witness(self, key: str, value: Any, base: dict) -> dict[str, Any]:
        """Params in which `key` is active with `value`: the conditions it needs are met, every
        other active key at its first choice (or low end). Used to check values against the schema."""
        needed: dict[str, Any] = {}

        def need(k: str) -> None:
            for conj in self.entries[k].get("when", [])[:1]:
                for other, allowed in conj.items():
                    if other in self.entries and other not in needed:
                        needed[other] = allowed[0]
                        need(other)
        need(key)
        params: dict[str, Any] = {}
        for k, entry in self.entries.items():
            if self.is_active(k, params, base):
                first = entry["choices"][0] if entry["type"] == "categorical" else entry["low"]
                params[k] = value if k == key else needed.get(k, first)
        if key not in params:
            raise SpaceError(f"{self.where}: {key!r} can never be active: its 'when' conditions "
                             f"({_describe_when(self.entries[key]['when'])}) cannot all hold")
        return params

    def _check_against_schema(self, key: str, entry: dict, base: dict) -> None:
        """Every choice (or range end) must make a valid config; class names become canonical."""
        canonical = []
        for value in _entry_values(entry):
            value = _canonical_class_name(key, value)
            problem = VIRTUAL_KEYS[key].check(value) if key in VIRTUAL_KEYS else None
            if problem:
                raise SpaceError(f"{self.where}: {key!r}: value {_short(value)} {problem}")
            try:
                validate_config(self._apply(self._witness(key, value, base), base), where=f"{key}={_short(value)}")
            except ConfigError as e:
                raise SpaceError(f"{self.where}: {key!r}: value {_short(value)} does not make a valid "
                                 f"config on the default base:\n{e}") from None
            canonical.append(value)
        if entry["type"] == "categorical":
            entry["choices"] = canonical
            _check_categorical(key, entry, self.where)  # "Adam" and "optim.Adam" are one choice

    # -- conditions

    def is_active(self, key: str, params: dict[str, Any], base: dict) -> bool:
        """Whether `key` exists given the params chosen so far (earlier keys) and the base config."""
        when = self.entries[key].get("when")
        if not when:
            return True

        def holds(other: str, allowed: list) -> bool:
            if other in self.entries:
                return other in params and any(_same(params[other], a) for a in allowed)
            return any(_same(_get(base, other), a) for a in allowed)
        return any(all(holds(o, a) for o, a in conj.items()) for conj in when)

    def active_keys(self, params: dict[str, Any], base: dict) -> list[str]:
        """The keys active for `params` (which may hold more), in the space's order."""
        chosen: dict[str, Any] = {}
        keys = []
        for key in self.entries:
            if self.is_active(key, chosen, base):
                keys.append(key)
                if key in params:  # a missing key stays active, but no condition on it holds
                    chosen[key] = params[key]
        return keys

    def complete(self, params: dict[str, Any], base: dict, fill: Callable[[str, dict], Any]) -> dict[str, Any]:
        """`params` made whole for its own choices: keys they leave inactive dropped, keys they make
        active and `params` lacks taken from `fill(key, entry)` (a changed tokens choice brings or
        takes patch_len)."""
        out: dict[str, Any] = {}
        for key, entry in self.entries.items():
            if self.is_active(key, out, base):
                out[key] = params[key] if key in params else fill(key, entry)
        return out

    def conditional(self) -> bool:
        return any(entry.get("when") for entry in self.entries.values())

    def searches_architecture(self) -> bool:
        """Whether the structural keys (ARCHITECTURE_KEYS) can take more than one combination of
        values: a key never active (head fixed to "decoder" leaves tokens out) does not count."""
        seen = set()
        for chosen, active in self.branches():
            keys = [k for k in ARCHITECTURE_KEYS if k in active]
            if any(k not in chosen and len(self.entries[k]["choices"]) > 1 for k in keys):
                return True  # a choice that no condition names still varies within this branch
            seen.add(tuple((k, chosen.get(k)) for k in keys))
        return len(seen) > 1

    def sample(self, trial, base_config: dict) -> dict[str, Any]:
        """Define-by-run: suggest each active key from an Optuna trial, in the space's order."""
        base = self._full(base_config, "base config")
        params: dict[str, Any] = {}
        for key, e in self.entries.items():
            if not self.is_active(key, params, base):
                continue
            if e["type"] == "float":
                params[key] = trial.suggest_float(key, e["low"], e["high"], log=e["log"])
            elif e["type"] == "int":
                params[key] = trial.suggest_int(key, e["low"], e["high"], step=e["step"], log=e["log"])
            else:
                params[key] = trial.suggest_categorical(key, e["choices"])
        return params

    def branches(self, base_config: dict | None = None) -> list[tuple[dict[str, Any], list[str]]]:
        """Every way the conditions can play out: (values of the keys that conditions name,
        the keys active then), in the space's order. An unconditional space has one branch."""
        base = self.full_config(base_config)
        drivers = {k for e in self.entries.values() for conj in e.get("when", []) for k in conj}
        order = list(self.entries)
        out: list[tuple[dict[str, Any], list[str]]] = []

        def walk(i: int, chosen: dict[str, Any]) -> None:
            if i == len(order):
                out.append(({k: v for k, v in chosen.items() if k in drivers}, list(chosen)))
                return
            key = order[i]
            if not self.is_active(key, chosen, base):
                walk(i + 1, chosen)
            elif key in drivers:
                for choice in self.entries[key]["choices"]:
                    walk(i + 1, {**chosen, key: choice})
            else:
                walk(i + 1, {**chosen, key: None})
        walk(0, {})
        return out

    # -- params <-> configs

    def _apply(self, params: dict[str, Any], base: dict) -> dict:
        """Deep copy of a full config with `params` applied, then the virtual derivations."""
        cfg = copy.deepcopy(base)
        default = _default_config()
        base_criterion = base["training"]["criterion_class"]
        # A virtual key outside the space keeps the base's ratio; an inactive one the default's.
        naturals = {k: v.natural(default if k in self.entries else base) for k, v in VIRTUAL_KEYS.items()}
        for key in self.entries:
            if key in VIRTUAL_KEYS:
                continue
            # An inactive key takes the schema default: settings a model does not use have one value.
            _set(cfg, key, params[key] if key in params else _get(default, key))
        for key, v in VIRTUAL_KEYS.items():
            if any(field in params or field in self.entries for field in v.derives):
                continue  # the derived field is in the space itself
            for path, derived in v.derive(cfg, params.get(key, naturals[key])).items():
                _set(cfg, path, derived)
        training = cfg["training"]
        if "training.optimizer_class" in params:
            training["optimizer_kwargs"] = copy.deepcopy(OPTIMIZER_KWARGS.get(training["optimizer_class"], {}))
        if "training.criterion_class" in params and training["criterion_class"] != base_criterion:
            training["criterion_kwargs"] = {}  # the base's kwargs (a Huber delta) belong to the base's loss
        if "training.scheduler_class" in params:
            rule = SCHEDULER_KWARGS.get(training["scheduler_class"])
            if rule is not None:  # an unknown name is left for validate_config to explain
                training["scheduler_kwargs"] = rule[1](training["max_epochs"])
        return cfg

    def _full(self, config: dict, where: str) -> dict:
        return validate_config(config, where=where).model_dump()

    def full_config(self, config: dict | None = None) -> dict:
        """A config with every field filled in (the schema's defaults when None), for `is_active`."""
        return _default_config() if config is None else self._full(config, "base config")

    def to_config(self, params: dict[str, Any], base_config: dict) -> dict:
        """A new full config: the base with `params` applied (virtual keys derived); it validates.

        `params` must hold exactly the space's keys, each inside its entry (SpaceError otherwise).
        """
        try:
            base = self._full(base_config, "base config")
        except ConfigError as e:
            raise SpaceError(f"the base config is invalid, fix it first:\n{e}") from None
        clean: dict[str, Any] = {}
        missing = []
        for key, entry in self.entries.items():
            if not self.is_active(key, clean, base):
                continue
            if key not in params:
                missing.append(key)
                continue
            value = params[key]
            value = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
            ok, clean[key] = _match(entry, value)
            if not ok:
                raise SpaceError(f"params[{key!r}] = {_short(value)} is outside the search space "
                                 f"({_describe_entry(entry)})")
        extra = [k for k in params if k not in clean and k not in missing]
        if missing or extra:
            raise SpaceError(f"params do not match the search space: missing {missing or 'none'}, "
                             f"not in the space or not used with these values {extra or 'none'}; give one "
                             f"value per active key ({', '.join(self.active_keys(params, base))})")
        cfg = self._apply(clean, base)
        try:
            validate_config(cfg, where="config built from params")
        except ConfigError as e:
            raise SpaceError(f"{e}\nparams: {json.dumps(clean)}\nThe search space ({self.where}) allows this "
                             "combination but the schema does not; narrow the space so that every "
                             "combination is valid") from None
        return cfg

    def from_config(self, config: dict) -> dict[str, Any] | None:
        """The params that produce `config`, or None when the space cannot express it.

        Only the space's own keys are compared (a virtual key through the field it derives);
        the kwargs tables are not, so a hand-written scheduler_kwargs still counts as its class.
        """
        try:
            full = self._full(config, "config")
        except ConfigError as e:
            log.debug("config is not representable: it does not validate: %s", e)
            return None
        params: dict[str, Any] = {}
        for key, entry in self.entries.items():
            if not self.is_active(key, params, full):
                continue
            ok, params[key] = self._param_for(key, entry, full)
            if not ok:
                log.debug("config is not representable: %s is outside %s", key, _describe_entry(entry))
                return None
        return params

    def _param_for(self, key: str, entry: dict, full: dict) -> tuple[bool, Any]:
        """The param value of one key for a full config, checking virtual keys by re-deriving."""
        if key not in VIRTUAL_KEYS:
            return _match(entry, _get(full, key))
        v = VIRTUAL_KEYS[key]
        wanted = {path: _get(full, path) for path in v.derives}
        candidates = entry["choices"] if entry["type"] == "categorical" else [v.natural(full)]
        for candidate in candidates:
            ok, value = _match(entry, candidate)
            if ok and v.derive(full, value) == wanted:
                return True, value
        return False, None

    # -- views

    def distributions(self, params: dict[str, Any] | None = None) -> dict[str, od.BaseDistribution]:
        """Optuna distributions, one per key (or per key of `params`), in the space's order."""
        return {key: _distribution(entry) for key, entry in self.entries.items()
                if params is None or key in params}

    def describe(self) -> str:
        """One line per key, for prompts and --help."""
        lines = []
        reachable = {k for _, keys in self.branches() for k in keys}
        for key, entry in self.entries.items():
            if key not in reachable:
                continue  # its conditions name values the space no longer offers
            note = ""
            if key in VIRTUAL_KEYS:
                note = f"  (virtual: {VIRTUAL_KEYS[key].formula})"
            elif key == "training.scheduler_class":
                note = "  (scheduler_kwargs set by the search: " + "; ".join(
                    f"{'None' if c is None else c.rsplit('.', 1)[-1]}: {SCHEDULER_KWARGS[c][0]}"
                    for c in entry["choices"] if c in SCHEDULER_KWARGS) + ")"
            elif key == "training.optimizer_class":
                sgd = [c for c in entry["choices"] if c in OPTIMIZER_KWARGS]
                note = "".join(f"  ({c} gets optimizer_kwargs {json.dumps(OPTIMIZER_KWARGS[c])})" for c in sgd)
            if entry.get("when"):
                note += f"  (only when {_describe_when(entry['when'])})"
            lines.append(f"{key}: {_describe_entry(entry)}{note}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The space in the file format; removed default keys appear as null, so it loads back."""
        out: dict[str, Any] = copy.deepcopy(self.entries)
        for key, entry in out.items():
            if "when" in DEFAULT_SPACE.get(key, {}) and "when" not in entry:
                entry["when"] = None  # made unconditional on purpose; a missing "when" would inherit
        out.update({key: None for key in DEFAULT_SPACE if key not in self.entries})
        return out


# ----------------------------------------------------------------------------- loading

def space_from_overrides(overrides: dict[str, Any], where: str = "search space") -> SearchSpace:
    """DEFAULT_SPACE with a user's entries applied: an entry replaces or adds, null removes."""
    if not isinstance(overrides, dict):
        raise SpaceError(f"{where}: expected a JSON object mapping config paths to entries, "
                         f"e.g. {{\"training.lr\": {_SHAPES['float']}}}; got {_short(overrides)}")
    entries = copy.deepcopy(DEFAULT_SPACE)
    spelled: dict[str, str] = {}
    for key, entry in overrides.items():
        if isinstance(key, str) and key.startswith("#"):
            continue  # a comment
        key = _one_spelling(key, spelled, where)
        if entry is None:
            if key not in entries:
                raise SpaceError(f"{where}: {key!r} is null (remove) but is not in the default space"
                                 f"{_did_you_mean(key)}; default keys: {', '.join(DEFAULT_SPACE)}")
            del entries[key]
        elif isinstance(entry, dict) and "when" not in entry and key in DEFAULT_SPACE and "when" in DEFAULT_SPACE[key]:
            # A new range for a conditional key keeps the condition ("when": null makes it unconditional).
            entries[key] = {**entry, "when": DEFAULT_SPACE[key]["when"]}
        else:
            entries[key] = entry
    return SearchSpace(entries, where=where)


def _one_spelling(key: str, spelled: dict[str, str], where: str) -> str:
    """The canonical key; two keys of a file naming one setting is an error naming both."""
    canonical = canonical_key(key)
    if canonical in spelled:
        raise SpaceError(f"{where}: {spelled[canonical]!r} and {key!r} both name {canonical}; keep one")
    spelled[canonical] = key
    return canonical


def load_space(path: str | Path | None) -> SearchSpace:
    """The default space, or the default space changed by a JSON file (see the module docstring)."""
    if path is None:
        return SearchSpace(DEFAULT_SPACE, where="default search space")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"{path}: search space file not found; pass an existing JSON file "
                         "or leave it out to use the default space") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"{path}: cannot read the search space file: {e}") from None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpaceError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    space = space_from_overrides(overrides, where=str(path))
    log.info("search space from %s: %d keys", path, len(space.entries))
    return space
