"""The original nas_system's config spellings: read them, and write them back.

The original system's README writes a few settings differently from this project's schema:

    original nas_system                          here
    training["optimizer_params"]["lr"]           training["lr"]
    training["optimizer_params"]["weight_decay"] training["weight_decay"]
    training["optimizer_params"][other]          training["optimizer_kwargs"][other]
    training["scheduler_params"]                 training["scheduler_kwargs"]
    data["batch_size"]                           training["batch_size"]
    seed = 42 (a top-level name)                 training["seed"]

`ALIASES` is the one table of these; everything below is derived from it. Config files, `--set`
paths and search-space keys may use either spelling. Raw dicts are made canonical before the
schema sees them (`canonicalise`), and a setting spelled both ways in one file is an error that
names both, because silently picking one would run a config the user did not write. When the
agent rewrites a user's config.py it keeps that file's spelling (`style_of`, `restyle`).

Functions here raise ValueError with a message that does not name the file; nas_agent.config
adds the file name and turns it into a ConfigError.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Iterable

from nas_agent.schema import Config

ANY = "*"  # in an alias: every key of the old dict that has no alias of its own

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class Alias:
    old: KeyPath
    new: KeyPath
    what: str  # the setting, for "X and Y both set <what>"

    @property
    def wild(self) -> bool:
        return self.old[-1] == ANY

    @property
    def spelling(self) -> str:
        """The key a config file writes: 'training.optimizer_params', 'data.batch_size', 'seed'."""
        return ".".join(self.old[:2])

    @property
    def target(self) -> KeyPath:
        """The canonical key this alias fills: training.lr, or the whole training.optimizer_kwargs."""
        return self.new[:-1] if self.wild else self.new


# Exact aliases come before the ANY alias of the same dict: the first match wins.
ALIASES: tuple[Alias, ...] = (
    Alias(("training", "optimizer_params", "lr"), ("training", "lr"), "the learning rate"),
    Alias(("training", "optimizer_params", "weight_decay"), ("training", "weight_decay"), "the weight decay"),
    Alias(("training", "optimizer_params", ANY), ("training", "optimizer_kwargs", ANY),
          "the optimizer's arguments"),
    Alias(("training", "scheduler_params", ANY), ("training", "scheduler_kwargs", ANY),
          "the lr scheduler's arguments"),
    Alias(("data", "batch_size"), ("training", "batch_size"), "the batch size"),
    Alias(("seed",), ("training", "seed"), "the random seed"),
)
SPELLINGS: tuple[str, ...] = tuple(dict.fromkeys(a.spelling for a in ALIASES))


def dotted(path: Iterable[str]) -> str:
    return ".".join(path)


def _split(spelling: str) -> KeyPath:
    return tuple(spelling.split("."))


# --------------------------------------------------------------------------- nested dict helpers

def _has(d: Any, path: KeyPath) -> bool:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return False
        d = d[key]
    return True


def _pop(d: dict, path: KeyPath) -> Any:
    for key in path[:-1]:
        d = d[key]
    return d.pop(path[-1])


def _set(d: dict, path: KeyPath, value: Any) -> None:
    for i, key in enumerate(path[:-1]):
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise ValueError(f"{dotted(path[:i + 1])} must be a dict of settings, got {d!r}")
    d[path[-1]] = value


def _insert_before(d: dict, key: str, value: Any, before: str | None) -> None:
    """d[key] = value, placed just before `before` when d has it (so a rewritten file keeps its order)."""
    if before not in d:
        d[key] = value
        return
    items = list(d.items())
    d.clear()
    for k, v in items:
        if k == before:
            d[key] = value
        d[k] = v


# --------------------------------------------------------------------------- old -> canonical

def _alias_for(path: KeyPath) -> tuple[Alias, KeyPath] | None:
    """The alias whose old spelling is `path` or a prefix of it, and the canonical path."""
    for alias in ALIASES:
        n = len(alias.old)
        if len(path) >= n and all(a in (ANY, p) for a, p in zip(alias.old, path)):
            head = alias.new[:-1] + (path[n - 1],) if alias.wild else alias.new
            return alias, head + tuple(path[n:])
    return None


def _is_old_dict(path: KeyPath) -> bool:
    """training.optimizer_params / training.scheduler_params: old dicts mapped key by key."""
    return any(a.wild and a.old[:-1] == path for a in ALIASES)


def _moves(path: KeyPath, value: Any) -> list[tuple[str, Alias, KeyPath, Any]]:
    """(old spelling, alias, canonical path, value) for a value set at an old path; [] if canonical.

    An old dict becomes an empty canonical dict (so `scheduler_params: {}` still means "no
    arguments") plus one move per key.
    """
    if _is_old_dict(path):
        if not isinstance(value, dict):
            raise ValueError(f"{dotted(path)} must be a dict of arguments, got {value!r}")
        wild = next(a for a in ALIASES if a.wild and a.old[:-1] == path)
        moves = [(dotted(path), wild, wild.target, {})]
        for key, item in value.items():
            moves += _moves(path + (key,), item)
        return moves
    found = _alias_for(path)
    return [(dotted(path), found[0], found[1], value)] if found else []


def to_canonical(path: KeyPath, value: Any) -> list[tuple[KeyPath, Any]]:
    """An override `path=value` in either spelling as canonical (path, value) pairs."""
    moves = _moves(tuple(path), value)
    return [(target, v) for _, _, target, v in moves] if moves else [(tuple(path), value)]


def canonical_key(key: str) -> str:
    """A dotted key ('training.optimizer_params.lr') in the canonical spelling ('training.lr')."""
    found = _alias_for(_split(key))
    return dotted(found[1]) if found else key


def canonicalise(raw: dict) -> dict:
    """A copy of a raw config dict with every old spelling moved to its canonical key.

    Raises ValueError when one setting is given in both spellings, naming both.
    """
    if not isinstance(raw, dict):
        return raw  # the schema says what is wrong with it
    out = copy.deepcopy(raw)
    moves = []
    for spelling in SPELLINGS:
        path = _split(spelling)
        if _has(out, path):
            moves += _moves(path, _pop(out, path))
    # Checked before any move: what is there now was written in the canonical spelling.
    clashes: dict[KeyPath, str] = {}
    for source, alias, target, _ in moves:
        if _has(out, target) and not any(target[:len(t)] == t for t in clashes):  # one line per dict
            clashes[target] = f"{source} and {dotted(target)} both set {alias.what}; keep one"
    if clashes:
        raise ValueError("; ".join(clashes.values()))
    for _, _, target, value in moves:
        _set(out, target, value)
    return out


def used_spellings(raw: Any) -> list[str]:
    """The old spellings present in a raw config, in table order."""
    return [s for s in SPELLINGS if _has(raw, _split(s))]


def spellings_note(raw: Any) -> str:
    """A line saying how a config's old spellings were read, for error messages; '' if none."""
    used = used_spellings(raw)
    if not used:
        return ""
    parts = [f"{s} as {', '.join(dict.fromkeys(dotted(a.target) for a in ALIASES if a.spelling == s))}"
             for s in used]
    return f"\n  (original nas_system spellings were read: {'; '.join(parts)})"


# --------------------------------------------------------------------------- unknown keys

def _vocabulary() -> dict[KeyPath, tuple[set[str], set[str]]]:
    """(canonical keys, old keys) per place: the top level and each section."""
    places: dict[KeyPath, tuple[set[str], set[str]]] = {(): (set(Config.model_fields), set())}
    for name, field in Config.model_fields.items():
        places[(name,)] = (set(field.annotation.model_fields), set())
    for spelling in SPELLINGS:
        path = _split(spelling)
        places[path[:-1]][1].add(path[-1])
    return places


def unknown_keys(raw: Any) -> list[str]:
    """One problem line per key that neither spelling knows, with a hint from both vocabularies."""
    problems = []
    for place, (canonical, old) in _vocabulary().items():
        node = raw
        for key in place:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # a missing or malformed section is the schema's to report
        for key in node:
            if key in canonical or key in old:
                continue
            hint = difflib.get_close_matches(str(key), sorted(canonical | old), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            also = f"; or, as in the original nas_system: {', '.join(sorted(old))}" if old else ""
            problems.append(f"{dotted(place) or '(top level)'}: unknown key {key!r}{extra}; "
                            f"allowed keys: {', '.join(sorted(canonical))}{also}")
    return problems


# --------------------------------------------------------------------------- canonical -> old

def style_of(raw: Any) -> frozenset[str]:
    """The old spellings to write a config file back in, judged from what the file holds.

    Each setting keeps the spelling the file used for it. A setting the file does not mention
    takes the old spelling when the file used any old spelling, so a file in the original
    format is rewritten wholly in it, and a file in this project's format stays in it.
    """
    old = set(used_spellings(raw))
    if not old:
        return frozenset()
    new = {a.spelling for a in ALIASES if _has(raw, a.target)}
    return frozenset(s for s in SPELLINGS if s in old or s not in new)


def restyle(config: dict, style: Iterable[str]) -> dict:
    """A copy of a canonical config dict written with the old spellings in `style`."""
    style = set(style)
    out = copy.deepcopy(config)
    for alias in ALIASES:
        if alias.spelling not in style or not _has(out, alias.target):
            continue
        parent = out
        for i, key in enumerate(alias.old[:-1]):
            # A new old-style dict goes where the canonical key it replaces is (popped below).
            before = alias.target[i] if alias.target[:i] == alias.old[:i] and len(alias.target) > i else None
            if key not in parent:
                _insert_before(parent, key, {}, before)
            parent = parent[key]
        value = _pop(out, alias.target)
        if alias.wild:
            parent.update(value)
        else:
            parent[alias.old[-1]] = value
    return out
