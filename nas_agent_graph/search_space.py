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

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    # Input window: 2, 4, 8 or 14 days of hourly history.
    "data.seq_len": {"type": "categorical", "choices": [48, 96, 192, 336]},
    # Virtual: the decoder's start token as a fraction of the input window (sets data.label_len).
    "data.label_frac": {"type": "categorical", "choices": [0.25, 0.5, 1.0]},
    # Attention heads.
    "model.n_heads": {"type": "categorical", "choices": [2, 4, 8]},
    # Virtual: width per head (sets model.d_model = head_dim * n_heads: 32 to 512).
    "model.head_dim": {"type": "categorical", "choices": [16, 32, 64]},
    # Encoder depth; with distilling each layer halves the sequence.
    "model.e_layers": {"type": "int", "low": 1, "high": 3, "step": 1, "log": False},
    # Decoder depth; Informer uses 1 or 2.
    "model.d_layers": {"type": "int", "low": 1, "high": 2, "step": 1, "log": False},
    # Virtual: feed-forward width as a multiple of d_model (sets model.d_ff).
    "model.ff_mult": {"type": "categorical", "choices": [2, 4]},
    # Dropout everywhere in the model; ETTh1 is small, so some regularisation may pay.
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "log": False},
    # ProbSparse sampling factor c (ignored by full attention).
    "model.factor": {"type": "categorical", "choices": [3, 5, 8]},
    # ProbSparse (the Informer's) or canonical full attention.
    "model.attn": {"type": "categorical", "choices": ["prob", "full"]},
    # Halve the sequence between encoder layers.
    "model.distil": {"type": "categorical", "choices": [True, False]},
    # Continuous time features or calendar embeddings.
    "model.embed": {"type": "categorical", "choices": ["timeF", "fixed", "learned"]},
    # Reversible instance normalisation: often a large gain on drifting series.
    "model.revin": {"type": "categorical", "choices": [True, False]},
    # Optimizer; SGD gets momentum 0.9 (OPTIMIZER_KWARGS).
    "training.optimizer_class": {"type": "categorical", "choices": ["optim.Adam", "optim.AdamW", "optim.SGD"]},
    # Learning rate, log scale around the paper's 1e-4.
    "training.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    # L2 / decoupled weight decay, log scale.
    "training.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    # Batch size: smaller batches, more (noisier) steps per epoch.
    "training.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    # LR schedule; each one's arguments come from SCHEDULER_KWARGS. null = constant rate.
    "training.scheduler_class": {"type": "categorical", "choices": [
        "optim.lr_scheduler.CosineAnnealingLR", "optim.lr_scheduler.StepLR",
        "optim.lr_scheduler.ReduceLROnPlateau", None]},
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
    # Not in the default space; here so that a space file may name them.
    "optim.lr_scheduler.ExponentialLR": ("gamma=0.9", lambda max_epochs: {"gamma": 0.9}),
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
    unknown = sorted(entry.keys() - required - optional.keys() - {"type"})
    if missing or unknown:
        what = "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                       f"unknown field(s) {', '.join(unknown)}" if unknown else ""]))
        raise SpaceError(f"{where}: {key!r}: {what}; expected {_SHAPES[kind]}")
    out = {"type": kind, **optional, **{k: v for k, v in entry.items() if k != "type"}}
    (_check_categorical if kind == "categorical" else _check_range)(key, out, where)
    return out


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

    def _check_against_schema(self, key: str, entry: dict, base: dict) -> None:
        """Every choice (or range end) must make a valid config; class names become canonical."""
        canonical = []
        for value in _entry_values(entry):
            value = _canonical_class_name(key, value)
            problem = VIRTUAL_KEYS[key].check(value) if key in VIRTUAL_KEYS else None
            if problem:
                raise SpaceError(f"{self.where}: {key!r}: value {_short(value)} {problem}")
            try:
                validate_config(self._apply({key: value}, base), where=f"{key}={_short(value)}")
            except ConfigError as e:
                raise SpaceError(f"{self.where}: {key!r}: value {_short(value)} does not make a valid "
                                 f"config on the default base:\n{e}") from None
            canonical.append(value)
        if entry["type"] == "categorical":
            entry["choices"] = canonical
            _check_categorical(key, entry, self.where)  # "Adam" and "optim.Adam" are one choice

    # -- params <-> configs

    def _apply(self, params: dict[str, Any], base: dict) -> dict:
        """Deep copy of a full config with `params` applied, then the virtual derivations."""
        cfg = copy.deepcopy(base)
        base_criterion = base["training"]["criterion_class"]
        naturals = {k: v.natural(base) for k, v in VIRTUAL_KEYS.items() if k not in params}
        for key, value in params.items():
            if key not in VIRTUAL_KEYS:
                _set(cfg, key, value)
        for key, v in VIRTUAL_KEYS.items():
            if any(field in params for field in v.derives):
                continue  # the derived field is searched directly
            for path, derived in v.derive(cfg, params.get(key, naturals.get(key))).items():
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

    def to_config(self, params: dict[str, Any], base_config: dict) -> dict:
        """A new full config: the base with `params` applied (virtual keys derived); it validates.

        `params` must hold exactly the space's keys, each inside its entry (SpaceError otherwise).
        """
        missing = [k for k in self.entries if k not in params]
        unknown = [k for k in params if k not in self.entries]
        if missing or unknown:
            raise SpaceError(f"params do not match the search space: missing {missing or 'none'}, "
                             f"not in the space {unknown or 'none'}; give one value per key of "
                             f"the space ({', '.join(self.entries)})")
        clean = {}
        for key, value in params.items():
            value = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
            ok, clean[key] = _match(self.entries[key], value)
            if not ok:
                raise SpaceError(f"params[{key!r}] = {_short(value)} is outside the search space "
                                 f"({_describe_entry(self.entries[key])})")
        try:
            base = self._full(base_config, "base config")
        except ConfigError as e:
            raise SpaceError(f"the base config is invalid, fix it first:\n{e}") from None
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
        params = {}
        for key, entry in self.entries.items():
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

    def distributions(self) -> dict[str, od.BaseDistribution]:
        """Optuna distributions, one per key, in the space's order."""
        return {key: _distribution(entry) for key, entry in self.entries.items()}

    def describe(self) -> str:
        """One line per key, for prompts and --help."""
        lines = []
        for key, entry in self.entries.items():
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
            lines.append(f"{key}: {_describe_entry(entry)}{note}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The space in the file format; removed default keys appear as null, so it loads back."""
        out: dict[str, Any] = copy.deepcopy(self.entries)
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
