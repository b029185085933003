"""Load, override, validate, render and hash configs, never executing them.

A config file is Python syntax, but it is parsed with `ast` and walked against an
allowlist; nothing in it is ever run. That matters because configs are written by an
LLM. The allowlist:

- `import torch.optim as optim` and `import torch.nn as nn` (nothing else);
- top-level assignments `name = <value>`;
- values made of literals (numbers, strings, True/False/None), dicts with string keys,
  lists, tuples, unary minus, and whitelisted torch class names such as `optim.Adam`,
  `nn.MSELoss`, `optim.lr_scheduler.CosineAnnealingLR` (see `schema.ALLOWED_CLASSES`).

Anything else (calls, other imports, lambdas, comprehensions, f-strings, walrus,
dunder attributes, subscripts, ...) is rejected with its line number. Class names come
out of the loader as strings ("optim.Adam") and go back in as bare names when rendered.

Files, overrides and dicts may also use the original nas_system's spellings
(`training.optimizer_params`, `data.batch_size`, a top-level `seed`, ...; see
nas_agent/legacy.py): they are made canonical before validation, and `config_style` +
`render_config(..., style=...)` write a config back in the spelling a file used.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from nas_agent import legacy
from nas_agent.atomic import atomic_write_text
from nas_agent.schema import ALLOWED_CLASSES, Config

log = logging.getLogger(__name__)

ALLOWED_IMPORTS = {"torch.optim": "optim", "torch.nn": "nn"}
MAX_CONFIG_BYTES = 256 * 1024
_CLASS_FIELDS = ("optimizer_class", "criterion_class", "scheduler_class")


class ConfigError(ValueError):
    """A config that cannot be loaded or is invalid. The message says where and why."""


# --------------------------------------------------------------------------- parsing

_NODE_NAMES = {
    ast.Call: "a function call",
    ast.Lambda: "a lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string",
    ast.NamedExpr: "an assignment expression (walrus :=)",
    ast.Subscript: "a subscript",
    ast.BinOp: "an arithmetic expression",
    ast.BoolOp: "a boolean expression",
    ast.Compare: "a comparison",
    ast.IfExp: "a conditional expression",
    ast.Set: "a set",
    ast.Starred: "a starred expression",
    ast.Await: "await",
    ast.Yield: "yield",
}


def _reject(where: str, node: ast.AST, what: str) -> ConfigError:
    line = getattr(node, "lineno", "?")
    return ConfigError(
        f"{where}:{line}: {what} is not allowed in a config file. Configs may only hold literals, "
        f"dicts, lists, tuples and whitelisted torch classes such as optim.Adam."
    )


def _dotted(node: ast.AST) -> str | None:
    """'optim.lr_scheduler.StepLR' for an Attribute chain rooted at a Name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _value(node: ast.AST, where: str, imported: set[str]) -> Any:
    """Convert an allowed expression node into a Python value; reject everything else."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (bool, int, float, str)) or node.value is None:
            return node.value
        raise _reject(where, node, f"the constant {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = node.operand
        if isinstance(inner, ast.Constant) and type(inner.value) in (int, float):
            return -inner.value if isinstance(node.op, ast.USub) else inner.value
        raise _reject(where, node, "a unary operator on a non-number")
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise _reject(where, v, "dict unpacking (**)")
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise _reject(where, k, "a non-string dict key")
            out[k.value] = _value(v, where, imported)
        return out
    if isinstance(node, (ast.List, ast.Tuple)):
        # Tuples become lists: the schema is JSON-shaped, so proposals and files agree.
        return [_value(e, where, imported) for e in node.elts]
    if isinstance(node, ast.Attribute):
        name = _dotted(node)
        if name is None or any(p.startswith("__") for p in name.split(".")):
            raise _reject(where, node, f"the attribute access {ast.unparse(node)!r}")
        root = name.split(".")[0]
        if root not in imported:
            raise _reject(where, node, f"{name!r} (its module {root!r} is not imported)")
        if name not in ALLOWED_CLASSES:
            raise _reject(where, node, f"the name {name!r} (not a whitelisted torch class)")
        return name
    if isinstance(node, ast.Name):
        raise _reject(where, node, f"the bare name {node.id!r}")
    kind = _NODE_NAMES.get(type(node), f"a {type(node).__name__} expression")
    raise _reject(where, node, kind)


def parse_config_source(source: str, where: str = "<config>") -> dict[str, Any]:
    """Parse config source text into a dict of its top-level names, without executing it."""
    if len(source.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as e:
        raise ConfigError(f"{where}:{e.lineno}: syntax error: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise ConfigError(f"{where}: cannot parse config ({type(e).__name__}: {e})") from None

    imported: set[str] = set()
    out: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # docstring or bare string comment
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name not in ALLOWED_IMPORTS or ALLOWED_IMPORTS[alias.name] != alias.asname:
                    shown = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                    raise _reject(where, stmt, f"the import {shown!r} (only 'import torch.optim as optim' "
                                               f"and 'import torch.nn as nn')")
                imported.add(alias.asname)
            continue
        if isinstance(stmt, ast.Assign):
            if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
                raise _reject(where, stmt, "an assignment to anything but a single plain name")
            name = stmt.targets[0].id
            if name.startswith("__"):
                raise _reject(where, stmt, f"the dunder name {name!r}")
            out[name] = _value(stmt.value, where, imported)
            continue
        what = {ast.ImportFrom: "a 'from ... import'", ast.FunctionDef: "a function definition",
                ast.ClassDef: "a class definition", ast.AnnAssign: "an annotated assignment",
                ast.AugAssign: "an augmented assignment"}.get(type(stmt), f"a {type(stmt).__name__} statement")
        if isinstance(stmt, ast.Expr):
            what = _NODE_NAMES.get(type(stmt.value), "an expression statement")
        raise _reject(where, stmt, what)
    return out


# --------------------------------------------------------------------------- validation

def _problems(where: str, lines: list[str]) -> str:
    return "\n".join([f"{where}: invalid config ({len(lines)} problem{'s' if len(lines) > 1 else ''}):",
                      *(f"  {line}" for line in lines)])


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
        got = e.get("input")
        shown = "" if e["type"] in ("value_error", "missing") else f", got {got!r}"
        if isinstance(got, dict):
            shown = ""
        lines.append(f"{loc}: {msg}{shown}")
    return _problems(where, lines)


def canonicalise(raw: Any, where: str = "<config>") -> Any:
    """A raw dict with the original nas_system's spellings made canonical (see nas_agent/legacy.py)."""
    try:
        return legacy.canonicalise(raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def validate_config(raw: dict[str, Any], where: str = "<config>") -> Config:
    """Validate a plain dict (from a file, a proposal or an override) into a Config.

    Either spelling is accepted; unknown keys are checked here, before the old spellings are
    moved, so a typo gets a hint from both vocabularies.
    """
    unknown = legacy.unknown_keys(raw)
    if unknown:
        raise ConfigError(_problems(where, unknown))
    try:
        return Config.model_validate(canonicalise(raw, where))
    except ValidationError as e:
        # Errors name canonical keys; say how the file's old spellings were read.
        raise ConfigError(format_validation_error(e, where) + legacy.spellings_note(raw)) from None


def _is_json_value(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_is_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json_value(x) for k, x in v.items())
    return False


# JSON's spellings, as a shell user types them (--set model.revin=true): read as the literals
# True, False and None, not as the bare strings "true", "false", "null" that no key takes.
JSON_WORDS = {"true": True, "false": False, "null": None}


def _parse_override_value(text: str) -> Any:
    """A Python literal of JSON types (tuples become lists), or true/false/null as the whole
    value (inside a list or dict, write True/False/None), else the text as a bare string."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--set value is longer than {MAX_CONFIG_BYTES} characters")
    if text in JSON_WORDS:
        return JSON_WORDS[text]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text  # a bare string: a path, a class name such as optim.AdamW, a choice
    value = json.loads(json.dumps(value)) if isinstance(value, tuple) else value
    if not _is_json_value(value):
        raise ConfigError(f"--set value {text!r}: only numbers, strings, booleans, None, lists and dicts "
                          f"with string keys are allowed")
    return value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or `section.key.sub=value`) overrides to a raw config dict.

    Values are Python literals (`2`, `1e-3`, `True`, `[0.7, 0.1, 0.2]`), JSON's `true`, `false`
    and `null`, or bare strings.
    Keys and the dict may use either spelling (`training.optimizer_params.lr=3e-4`, `seed=42`);
    both are made canonical first, so an override replaces a setting whichever way the config
    spelled it. Returns a new dict; the input is not modified.
    """
    out = canonicalise(json.loads(json.dumps(raw)), "config")
    for item in overrides:
        key, sep, text = item.partition("=")
        path = tuple(key.strip().split("."))
        if not sep or not all(path):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.max_epochs=2")
        try:
            pairs = legacy.to_canonical(path, _parse_override_value(text.strip()))
        except ValueError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
        for target, value in pairs:
            _set_override(out, target, value, item)
    return out


def _set_override(out: dict, path: tuple[str, ...], value: Any, item: str) -> None:
    if len(path) < 2:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.max_epochs=2")
    if path[0] not in Config.model_fields:
        raise ConfigError(f"--set {item!r}: unknown section {path[0]!r}; expected one of "
                          f"{', '.join(Config.model_fields)}")
    node = out.setdefault(path[0], {})
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: section {path[0]!r} of the config is not a dict")
    for part in path[1:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a dict")
    node[path[-1]] = value


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw dict of a config file, as spelled in it (no exec, no validation)."""
    path = Path(path)
    if not path.is_file():  # also refuses FIFOs and devices, which could block or never end
        raise ConfigError(f"{path}: config file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
        source = blob.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    return parse_config_source(source, str(path))


def config_style(path: str | Path) -> frozenset[str]:
    """The original nas_system spellings to write this file's configs back in (render_config's style)."""
    return legacy.style_of(read_config(path))


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a config file (no exec), apply overrides, validate. Raises ConfigError."""
    path = Path(path)
    as_written = read_config(path)
    raw = canonicalise(as_written, str(path))  # before overrides, which replace a setting in either spelling
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    shown = " ".join(o if len(o) <= 80 else o[:77] + "..." for o in overrides)
    where = str(path) + (f" with --set {shown}" if overrides else "")
    try:
        return validate_config(raw, where)
    except ConfigError as e:
        raise ConfigError(f"{e}{legacy.spellings_note(as_written)}") from None


# --------------------------------------------------------------------------- rendering

def _render_value(value: Any, key: str | None, indent: int) -> str:
    pad = " " * indent
    if key in _CLASS_FIELDS and isinstance(value, str):
        return value  # a bare class name: optim.Adam
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f'{pad}    {json.dumps(k)}: {_render_value(v, k, indent + 4)},' for k, v in value.items()]
        return "{\n" + "\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        return "[" + ", ".join(_render_value(v, None, indent) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string syntax is valid Python
    return repr(value)  # numbers, booleans, None


def render_config(config: Config | dict[str, Any], header: str = "", style: Iterable[str] = ()) -> str:
    """Render a config as a loadable config file (the inverse of `load_config`).

    `style` (from `config_style`) names original nas_system spellings to write, e.g.
    {"training.optimizer_params"}; by default the canonical keys are written.
    """
    d = config.model_dump() if isinstance(config, Config) else config
    d = legacy.restyle(d, style) if style else d
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    lines += ["import torch.nn as nn", "import torch.optim as optim", ""]
    for section, values in d.items():
        lines.append(f"{section} = {_render_value(values, None, 0)}")
        lines.append("")
    return "\n".join(lines)


def write_config(config: Config | dict[str, Any], path: str | Path, header: str = "",
                 style: Iterable[str] = ()) -> Path:
    """Render a config (see `render_config`) into a loadable config file, atomically."""
    path = Path(path)
    atomic_write_text(path, render_config(config, header=header, style=style))
    return path


def config_hash(config: Config | dict[str, Any]) -> str:
    """A stable short hash of the effective settings, used to spot duplicate proposals.

    Data-derived channel counts (enc_in, dec_in, c_out) are left out, so a proposal and
    the config_used.py of its run hash the same.
    """
    d = config.model_dump() if isinstance(config, Config) else validate_config(config).model_dump()
    d = json.loads(json.dumps(d))
    for k in ("enc_in", "dec_in", "c_out"):
        d["model"].pop(k, None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
