"""The JSON schema an LLM proposal must follow, derived from the search space, and its parser.

`proposal_json_schema(space)` gives one property per search-space key with the key's exact
type and range, all required, nothing else allowed:

    categorical  -> {"enum": [<choices>]}            (null, bools, numbers, strings: as JSON)
    float        -> {"type": "number", "minimum": low, "maximum": high}
    int          -> {"type": "integer", "minimum": low, "maximum": high}
                    (a step > 1 becomes an enum of the allowed values when there are few of them)

The schema is what the constrained decoder (xgrammar) compiles, so a constrained sample is in
range by construction. `params_from_json(obj, space)` is the other half: it checks any JSON
object (constrained or not) against the space and returns Optuna-style params, ready for
`space.to_config(params, base)`. It raises ValueError naming the offending key.
"""
from __future__ import annotations

import json
import math
from typing import Any

from nas_agent_graph.search_space import SearchSpace

# An int range with a step > 1 is written as an enum when it has at most this many values.
_MAX_STEP_ENUM = 256


def _json_value(value: Any) -> Any:
    """A choice as a JSON value (numpy scalars to Python; anything else unchanged)."""
    value = value.item() if hasattr(value, "item") else value
    json.dumps(value)  # raises TypeError for what JSON cannot hold; the space forbids that anyway
    return value


def _property(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    kind = entry["type"]
    if kind == "categorical":
        return {"enum": [_json_value(c) for c in entry["choices"]]}
    if kind == "float":
        return {"type": "number", "minimum": float(entry["low"]), "maximum": float(entry["high"])}
    if kind == "int":
        low, high, step = int(entry["low"]), int(entry["high"]), int(entry.get("step", 1))
        if step > 1 and (high - low) // step + 1 <= _MAX_STEP_ENUM:
            return {"enum": list(range(low, high + 1, step))}
        return {"type": "integer", "minimum": low, "maximum": high}
    raise ValueError(f"{key!r}: unknown search-space entry type {kind!r}")


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def proposal_json_schema(space: SearchSpace) -> dict[str, Any]:
    """A JSON schema for one proposal: the space's keys, exact types and ranges, all required.

    A conditional space (keys with "when") gives one object per branch under "anyOf": the keys
    that conditions name are pinned to the branch's values, and only the keys active in that
    branch appear, so a constrained reply is a valid combination by construction.
    """
    if not space.conditional():
        return _object({key: _property(key, entry) for key, entry in space.entries.items()})
    branches = []
    for fixed, keys in space.branches():
        branches.append(_object({key: {"enum": [_json_value(fixed[key])]} if key in fixed
                                 else _property(key, space.entries[key]) for key in keys}))
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(entry: dict[str, Any]) -> str:
    if entry["type"] == "categorical":
        return "one of " + json.dumps(entry["choices"])
    step = entry.get("step", 1)
    extra = f" step {step}" if entry["type"] == "int" and step != 1 else ""
    return f"{entry['type']} in [{entry['low']}, {entry['high']}]{extra}"


def _param(key: str, entry: dict[str, Any], value: Any) -> Any:
    kind = entry["type"]
    if kind == "categorical":
        for choice in entry["choices"]:
            if isinstance(choice, bool) or isinstance(value, bool):
                same = isinstance(choice, bool) and isinstance(value, bool) and choice == value
            elif _is_number(choice) and _is_number(value):
                same = choice == value
            else:
                same = type(choice) is type(value) and choice == value
            if same:
                return choice  # the space's own value (1 -> 1.0 where the choice is 1.0)
        raise ValueError(f"{key}: {json.dumps(value)} is not {_describe(entry)}")
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a number ({_describe(entry)}), got {json.dumps(value)}")
    if not entry["low"] <= value <= entry["high"]:
        raise ValueError(f"{key}: {value} is out of range ({_describe(entry)})")
    if kind == "float":
        return float(value)
    if not float(value).is_integer():
        raise ValueError(f"{key}: expected an integer ({_describe(entry)}), got {value}")
    if (int(value) - entry["low"]) % entry.get("step", 1):
        raise ValueError(f"{key}: {int(value)} is not on the grid ({_describe(entry)})")
    return int(value)


def params_from_json(obj: Any, space: SearchSpace, base_config: dict | None = None) -> dict[str, Any]:
    """Optuna-style params (one value per active space key, in the space's order) from a JSON object.

    Raises ValueError naming the key when a key is missing, unknown, or its value is outside
    the space. Keys of the space that the reply's own choices leave inactive (patch_len with
    time tokens) are ignored. A JSON string is parsed first. `base_config` decides conditions
    on config fields outside the space (default: the schema's defaults).
    """
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise ValueError(f"proposal is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"proposal must be a JSON object with the keys {', '.join(space.entries)}; "
                         f"got {type(obj).__name__}")
    unknown = [k for k in obj if k not in space.entries]
    if unknown:
        raise ValueError(f"{unknown[0]}: not a search-space key (keys: {', '.join(space.entries)})")
    base = space.full_config(base_config)
    params: dict[str, Any] = {}
    missing = []
    for key, entry in space.entries.items():
        if not space.is_active(key, params, base):
            continue
        if key in obj:
            params[key] = _param(key, entry, obj[key])
        else:
            missing.append(key)
    if missing:
        raise ValueError(f"{missing[0]}: missing from the proposal"
                         + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    return params
