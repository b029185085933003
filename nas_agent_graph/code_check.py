"""Static allowlist check of a model file written by the LLM (--allow-code), before anything runs it.

The LLM's code is untrusted. It is never imported, exec'd or eval'd in the agent process: this
module only reads it with `ast.parse`. A file that passes is then smoke-tested in a subprocess
(nas_agent_graph.smoke, with a timeout) and trained by train.py in another one. The check is
a filter, not a sandbox: it blocks the ways Python code reaches the operating system that we
know of (files, processes, sockets, native code, pickle, dynamic code), and it is strict: when
in doubt, a construct is rejected, and the message says what to write instead.

    check_model_code(source, filename="model.py") -> list of problems ([] = passes)
    check_model_file(path) -> the same for a file (size, encoding and reading included)
    require_model_file(path) -> raises CodeCheckError(problems) if there is any problem

Every problem reads "FILE:LINE: what is wrong; how to fix it".

Rules
-----
Size and shape
  * at most MAX_CODE_BYTES (64 KiB) of UTF-8 and MAX_LINES lines; no string or bytes literal
    longer than MAX_LITERAL_CHARS; the file must be UTF-8 and parse as Python 3.
  * a `# coding:` declaration, if any, must say utf-8 (Python would otherwise decode the file
    differently from this check, e.g. utf-7 hides code in a comment).
  * a top-level `def build_model(config)`: one required positional parameter (more only with
    defaults), no required keyword-only parameters.

Imports (absolute only; no `from X import *`, which would hide the imported names)
  * torch, torch.nn, torch.nn.functional, torch.nn.init, torch.fft, torch.linalg,
    torch.special, torch.distributions, torch.autograd; math, typing, dataclasses, functools;
    `from __future__ import annotations`. Nothing else: not os, sys, subprocess, importlib...,
    not torch.utils (cpp_extension, data loaders), torch.hub, torch.jit, torch.package,
    torch.multiprocessing, torch.distributed, torch.fx, torch.onnx, torch.export, ...
  * every imported name obeys the attribute rules below (`from torch import load` is rejected).

Names (any use: load, store, parameter, def/class name, import alias, keyword argument)
  * the builtins open, exec, eval, compile, globals, locals, vars, dir, type, breakpoint,
    memoryview, help, exit, quit, ... and the names of modules such as os, sys, subprocess,
    socket, builtins, importlib, pickle, shutil, ctypes, ... (FORBIDDEN_NAMES, DANGEROUS_MODULES).
    `input` may name a parameter or attribute (torch code does), but input() may not be called.
    `super` may not be rebound (the super().__init__ exception below relies on it).
  * no dunder names (`__builtins__`, `__import__`, `__class__`, `__file__`...). A class may
    *define* the dunder methods in DEFINABLE_DUNDERS (`__init__`, `__post_init__`, `__repr__`...).
  * getattr, hasattr, setattr, delattr only as a direct call whose name argument is known
    statically: a string literal, or the variable of an enclosing `for` loop over a literal
    tuple/list of string literals, every binding of which in the function is such a loop
    (model.py's `for name in ("seq_len", ...): getattr(self, name)`). Every possible name must
    itself pass the attribute rules, so a string reaches nothing that `obj.attr` could not.

Attributes (`obj.attr`, whatever obj is: the check does not know types, so the rules are by name)
  * no attribute that starts with `_` (torch._C, torch._dynamo, obj.__class__, f.__globals__,
    __subclasses__, __dict__, ...), except exactly `super().__init__` (or `super(C, self).__init__`),
    which nn.Module subclasses need. `nn.Module.__init__(self)` is rejected: use super().__init__().
  * no attribute in DENIED_ATTRIBUTES: torch APIs that reach files, pickle, downloads, native
    code, code generation or processes (hub, ops, classes, library, utils, jit, package, fx,
    onnx, export, backends, type (Tensor.type("a.b") imports by name), tofile...), the
    typing/functools/dataclasses helpers that evaluate strings or copy attributes by name
    (get_type_hints, ForwardRef, singledispatch, wraps, update_wrapper, asdict,
    make_dataclass...), FunctionType/CodeType, frame and code objects (gi_frame, f_globals,
    f_builtins, tb_frame, ...), every forbidden name above (a module can re-export builtins:
    dataclasses.re.enum.bltns is the builtins module) and the dangerous module names (torch.os).
  * no attribute with a word (split at "_" and CamelCase) in DENIED_WORDS: file, import, load,
    save, pickle, serialize, script, jit, compile, cuda, cpp, reader, writer, eval, ... torch
    re-exports dozens of C++ bindings at its top level (PyTorchFileWriter, import_ir_module,
    ScriptModule, torch.load, torch.save, torch.compile, Module.compile, torch.cuda...), and the
    words catch those families. Exception: ctx.save_for_backward (torch.autograd.Function).
    Consequences for model code: no x.cuda(), x.is_cuda, x.type(...), model.eval(),
    load_state_dict or x.numpy() inside model.py; train.py handles devices and modes.

Statements and syntax
  * no `global` or `nonlocal`, no `async`/`await`, no class keywords (metaclass=...).
  * string annotations (forward references such as `-> "Informer"`) are parsed and checked like
    code, since typing can evaluate them.

What is deliberately allowed: print, lambda, generators, comprehensions, decorators and class
bodies (their code is checked like any other), str.format (it can only read attributes into a
string, never call), `match` (its class patterns obey the attribute rules).

Limits: this cannot prove the absence of every route through torch's large API or of bugs in
native kernels; it is one layer. The smoke test's subprocess, its timeout and the run's own
process are the others. tests/nas_agent_graph/test_code_check.py walks the attributes reachable
from the allowed modules under these rules and fails if any leads to a dangerous module or
builtin, so a torch upgrade that opens a new path is caught.
"""
from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path
from typing import Iterator, Optional, Union

MAX_CODE_BYTES = 64 * 1024
MAX_LINES = 2000
MAX_LITERAL_CHARS = 4096
MAX_PROBLEMS = 50

ALLOWED_MODULES = frozenset({
    "torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.fft", "torch.linalg",
    "torch.special", "torch.distributions", "torch.autograd",
    "math", "typing", "dataclasses", "functools",
})
ALLOWED_FUTURE = frozenset({"annotations"})

# Modules that reach the OS, run code or introspect frames; forbidden as names and as attributes.
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "socket", "socketserver", "ssl", "selectors",
    "builtins", "importlib", "imp", "pkgutil", "zipimport", "runpy", "site", "sysconfig",
    "pickle", "cPickle", "_pickle", "pickletools", "copyreg", "marshal", "shelve", "dbm",
    "shutil", "tempfile", "pathlib", "io", "glob", "fnmatch", "fileinput", "filecmp", "linecache",
    "zipfile", "tarfile", "gzip", "bz2", "lzma", "zlib", "mmap", "fcntl", "pty", "tty", "termios",
    "resource", "signal", "ctypes", "cffi", "threading", "_thread", "multiprocessing",
    "concurrent", "asyncio", "sched", "atexit", "gc", "weakref", "inspect", "traceback",
    "code", "codeop", "dis", "ast", "symtable", "types", "operator", "string", "platform",
    "pdb", "bdb", "trace", "tracemalloc", "faulthandler", "logging", "webbrowser", "antigravity",
    "urllib", "http", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc", "email",
    "sqlite3", "json", "csv", "configparser", "getpass", "pwd", "grp", "uuid", "secrets", "base64",
    "codecs", "numpy", "np", "pandas", "scipy", "sympy", "jinja2", "filelock", "fsspec", "triton",
    "networkx", "typing_extensions", "yaml", "setuptools", "pkg_resources", "distutils", "requests",
    "urllib3", "mpmath", "markupsafe", "psutil", "torchvision", "nvidia", "dill", "cloudpickle",
    "joblib",
})

FORBIDDEN_NAMES = frozenset({
    "open", "exec", "eval", "compile", "execfile", "globals", "locals", "vars", "dir", "type",
    "breakpoint", "memoryview", "help", "exit", "quit", "copyright", "credits", "license",
}) | DANGEROUS_MODULES

# Called directly with a statically known, allowed attribute name: see _Checker.check_attr_builtin.
ATTR_BUILTINS = frozenset({"getattr", "hasattr", "setattr", "delattr"})

DENIED_ATTRIBUTES = frozenset({
    # torch: files, pickle, downloads, native code, code generation, processes, import by name
    "hub", "ops", "classes", "library", "utils", "jit", "trace", "trace_module", "package", "fx",
    "onnx", "export", "backends", "mps", "xpu", "mtia", "numa", "nativert", "contrib", "testing",
    "monitor", "ao", "quantization", "tunable", "gds", "type", "tofile", "fromfile", "dump", "dumps",
    "CUDAPluggableAllocator", "change_current_allocator", "activate_flash_attention_impl",
    "register_flash_attention_impl", "flex_attention", "create_block_mask", "cond", "while_loop",
    "functional_call", "get_file_path", "prepare_multiprocessing_environment",
    # strings evaluated as code, attributes copied by name, functions made from code objects
    "get_type_hints", "ForwardRef", "evaluate_forward_ref", "get_annotations", "singledispatch",
    "singledispatchmethod", "wraps", "update_wrapper", "WRAPPER_ASSIGNMENTS", "WRAPPER_UPDATES",
    "asdict", "astuple", "make_dataclass", "attrgetter", "methodcaller", "get_field", "mro",
    "FunctionType", "LambdaType", "CodeType", "MethodType", "ModuleType", "bltns",
    # frames and code objects
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "cr_origin",
    "ag_frame", "ag_code", "ag_await", "f_globals", "f_locals", "f_builtins", "f_back", "f_code",
    "f_trace", "tb_frame", "tb_next", "co_code", "co_consts", "co_names", "func_globals",
    "func_code",
    # the OS, should anything still lead to it
    "popen", "spawnv", "spawnl", "execv", "execve", "execl", "fork", "kill", "unlink", "rmdir",
    "rmtree", "mkdir", "makedirs", "chmod", "chown", "symlink", "Path", "PurePath", "write_text",
    "write_bytes", "read_text", "read_bytes", "touch", "getenv", "putenv", "CDLL", "PyDLL", "cdll",
    "pydll", "LoadLibrary",
}) | FORBIDDEN_NAMES | ATTR_BUILTINS

# An attribute is also denied if any word of its name (split at "_" and at CamelCase) is one of
# these: torch re-exports many C++ bindings at the top level (PyTorchFileWriter,
# import_ir_module, ScriptModule, ...), and a rule by word catches the families of them.
DENIED_WORDS = frozenset({
    "file", "files", "filename", "import", "imports", "load", "loads", "loader", "save", "saver",
    "serialization", "serializer", "serialize", "deserialize", "deserialization", "pickle",
    "unpickle", "pickler", "unpickler", "script", "scripted", "jit", "library", "dlopen", "environ",
    "spawn", "popen", "subprocess", "system", "exec", "compile", "compiled", "compiler", "reader",
    "writer", "ir", "cpp", "cuda", "multiprocessing", "distributed", "download", "url", "socket",
    "shell", "hub", "numpy", "profiler", "profile", "onnx", "mmap", "eval", "compilation",
})
ALLOWED_WORD_EXCEPTIONS = frozenset({"save_for_backward"})  # torch.autograd.Function's ctx API

_WORD_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def _words(name: str) -> list[str]:
    return [w.lower() for part in name.split("_") for w in _WORD_RE.findall(part)]


# Dunder methods a class may define (not access on other objects).
DEFINABLE_DUNDERS = frozenset({
    "__init__", "__post_init__", "__repr__", "__str__", "__len__", "__getitem__", "__iter__",
    "__contains__",
})

_CODING_RE = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_UTF8_NAMES = frozenset({"utf-8", "utf8", "utf_8", "utf-8-sig", "utf8-sig", "utf_8_sig"})


class CodeCheckError(ValueError):
    """A model file failed the check; .problems holds the messages."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "model code rejected")


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _norm(name: str) -> str:
    """Identifiers as Python sees them (the parser NFKC-normalises them; strings are not)."""
    return unicodedata.normalize("NFKC", name)


def attribute_problem(name: str) -> Optional[str]:
    """Why `obj.<name>` is not allowed, or None."""
    n = _norm(name)
    if n.startswith("_"):
        return (f"access to the private or dunder attribute {name!r} is not allowed; use public "
                "torch / nn.Module APIs (the only exception is super().__init__(...))")
    if n in DENIED_ATTRIBUTES or (n not in ALLOWED_WORD_EXCEPTIONS and DENIED_WORDS.intersection(_words(n))):
        return (f"the attribute {name!r} is not allowed (it can reach files, processes, native code, "
                "pickle or dynamic code); build the model from torch.nn layers and tensor ops only")
    return None


def name_problem(name: str, *, binding: bool = False) -> Optional[str]:
    """Why the identifier <name> is not allowed as a variable/function/parameter, or None.
    binding: the name is being assigned (not read)."""
    n = _norm(name)
    if binding and n == "super":
        return "rebinding 'super' is not allowed (the super().__init__ exception relies on it); use another name"
    if _is_dunder(n):
        return f"the dunder name {name!r} is not allowed; use an ordinary name"
    if n in ATTR_BUILTINS:
        return (f"{name!r} may only be called directly with a literal attribute name, e.g. "
                f"{name}(obj, \"weight\"); better: use obj.weight")
    if n in DANGEROUS_MODULES:
        return (f"the name {name!r} is not allowed (it names a module that reaches the OS or runs "
                "code); model code may import only torch, math, typing, dataclasses, functools")
    if n in FORBIDDEN_NAMES:
        return (f"the builtin {name!r} is not allowed in model code (no files, dynamic code or "
                "introspection); remove it")
    return None


class _Checker:
    def __init__(self, tree: ast.Module, filename: str):
        self.tree = tree
        self.filename = filename
        self.problems: list[tuple[int, str]] = []
        self.parent: dict[ast.AST, ast.AST] = {}

    def add(self, node: Union[ast.AST, int], msg: str) -> None:
        line = node if isinstance(node, int) else getattr(node, "lineno", 1)
        self.problems.append((line, msg))

    # ------------------------------------------------------------------ walking

    def nodes(self) -> Iterator[ast.AST]:
        """Every node, parents recorded; iterative, so deep nesting cannot overflow the stack."""
        stack: list[ast.AST] = [self.tree]
        while stack:
            node = stack.pop()
            yield node
            children = list(ast.iter_child_nodes(node))
            for child in children:
                self.parent[child] = node
            stack.extend(reversed(children))

    def run(self) -> None:
        for node in self.nodes():
            self.visit(node)
        self.check_build_model()

    # ------------------------------------------------------------------ rules per node

    def visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                self.check_module(node, alias.name)
                if alias.asname:
                    self.check_binding(node, alias.asname)
                elif (p := name_problem(alias.name.split(".")[0])) is not None:
                    self.add(node, p)
        elif isinstance(node, ast.ImportFrom):
            self.check_import_from(node)
        elif isinstance(node, ast.Name):
            if node.id in ATTR_BUILTINS and self.is_direct_call_func(node):
                self.check_attr_builtin(self.parent[node])
            elif node.id == "input" and self.is_direct_call_func(node):
                self.add(node, "input() is not allowed (model code reads no stdin); remove the call")
            elif (p := name_problem(node.id, binding=not isinstance(node.ctx, ast.Load))) is not None:
                self.add(node, p)
        elif isinstance(node, ast.Attribute):
            self.check_attribute(node)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            self.check_def(node)
        elif isinstance(node, ast.arg):
            self.check_binding(node, node.arg)
        elif isinstance(node, ast.keyword):
            if node.arg is not None:
                self.check_binding(node, node.arg)
        elif isinstance(node, ast.ExceptHandler):
            if node.name:
                self.check_binding(node, node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)):
            if node.name:
                self.check_binding(node, node.name)
        elif isinstance(node, ast.MatchMapping):
            if node.rest:
                self.check_binding(node, node.rest)
        elif isinstance(node, ast.MatchClass):
            for attr in node.kwd_attrs:
                if (p := attribute_problem(attr)) is not None:
                    self.add(node, f"class pattern: {p}")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            kw = "global" if isinstance(node, ast.Global) else "nonlocal"
            self.add(node, f"`{kw}` statements are not allowed; keep state on the module (self.x) "
                           "or pass values as arguments")
        elif isinstance(node, (ast.AsyncFunctionDef, ast.AsyncFor, ast.AsyncWith, ast.Await)):
            self.add(node, "async code is not allowed in a model file; use plain functions")
        elif isinstance(node, ast.Constant):
            self.check_constant(node)
        elif type(node).__name__ in ("TypeAlias", "TypeVar", "ParamSpec", "TypeVarTuple"):
            self.add(node, "type parameter / `type` alias syntax is not allowed; use typing's names")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self.check_annotations(node)
        elif isinstance(node, ast.AnnAssign):
            self.check_annotation(node.annotation)

    def check_module(self, node: ast.AST, module: str) -> None:
        if module not in ALLOWED_MODULES:
            self.add(node, f"import of {module!r} is not allowed; model code may import only "
                           f"{', '.join(sorted(ALLOWED_MODULES))} (and `from __future__ import annotations`)")

    def check_import_from(self, node: ast.ImportFrom) -> None:
        if node.level:
            self.add(node, "relative imports are not allowed; the model file must be self-contained "
                           "(import only torch, math, typing, dataclasses, functools)")
            return
        module = node.module or ""
        if module == "__future__":
            for alias in node.names:
                if alias.name not in ALLOWED_FUTURE:
                    self.add(node, f"`from __future__ import {alias.name}` is not allowed; only "
                                   "`from __future__ import annotations`")
            return
        self.check_module(node, module)
        for alias in node.names:
            if alias.name == "*":
                self.add(node, f"`from {module} import *` is not allowed (it hides which names are "
                               f"used); import the names you need: `from {module} import a, b`")
                continue
            if (p := attribute_problem(alias.name)) is not None:
                self.add(node, f"from {module} import {alias.name}: {p}")
            self.check_binding(node, alias.asname or alias.name)

    def check_binding(self, node: ast.AST, name: str) -> None:
        if (p := name_problem(name, binding=True)) is not None:
            self.add(node, p)

    def check_attribute(self, node: ast.Attribute) -> None:
        attr = _norm(node.attr)
        if attr == "__init__" and self.is_super_call(node.value):
            return
        if (p := attribute_problem(node.attr)) is not None:
            if attr == "__init__":
                p += "; call the parent constructor as super().__init__(...)"
            self.add(node, p)

    @staticmethod
    def is_super_call(node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "super" and not node.keywords)

    def check_def(self, node: Union[ast.FunctionDef, ast.ClassDef]) -> None:
        name = _norm(node.name)
        if _is_dunder(name):
            in_class = isinstance(self.parent.get(node), ast.ClassDef)
            if not (isinstance(node, ast.FunctionDef) and in_class and name in DEFINABLE_DUNDERS):
                self.add(node, f"defining {node.name!r} is not allowed; a class may define only "
                               f"{', '.join(sorted(DEFINABLE_DUNDERS))} (plus ordinary methods such as forward)")
        else:
            self.check_binding(node, node.name)
        if isinstance(node, ast.ClassDef) and node.keywords:
            self.add(node, f"class {node.name}: class keywords (metaclass=...) are not allowed; "
                           "subclass nn.Module without them")

    def check_constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, (str, bytes)) and len(node.value) > MAX_LITERAL_CHARS:
            self.add(node, f"a {type(node.value).__name__} literal of {len(node.value):,} characters "
                           f"(limit {MAX_LITERAL_CHARS:,}); model code needs no large embedded data")

    # ------------------------------------------------------------------ getattr and friends

    def is_direct_call_func(self, node: ast.Name) -> bool:
        parent = self.parent.get(node)
        return isinstance(parent, ast.Call) and parent.func is node

    def check_attr_builtin(self, call: ast.Call) -> None:
        fn = _norm(call.func.id)  # type: ignore[attr-defined]
        nargs = {"getattr": (2, 3), "hasattr": (2,), "setattr": (3,), "delattr": (2,)}[fn]
        if call.keywords or len(call.args) not in nargs or any(isinstance(a, ast.Starred) for a in call.args):
            self.add(call, f"{fn}() must be called with plain positional arguments (object, \"name\"...)")
            return
        name = call.args[1]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            values = [name.value]
        elif isinstance(name, ast.Name) and (values := self.loop_strings(name)) is not None:
            pass
        else:
            self.add(call, f"{fn}() with a computed attribute name is not allowed (a string can reach "
                           f"anything); use obj.attr, or {fn}(obj, \"attr\") with a literal name, or loop "
                           "over a literal tuple of names: for name in (\"a\", \"b\"): ...")
            return
        for value in values:
            if not value.isidentifier():
                self.add(call, f"{fn}(): {value!r} is not an attribute name")
            elif (p := attribute_problem(value)) is not None:
                self.add(call, f"{fn}(): {p}")

    def scope_of(self, node: ast.AST) -> ast.AST:
        cur = self.parent.get(node)
        while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                                       ast.ClassDef, ast.Module)):
            cur = self.parent.get(cur)
        return cur if cur is not None else self.tree

    def loop_strings(self, name: ast.Name) -> Optional[list[str]]:
        """The string literals `name` can hold, if it is used inside the body of an enclosing
        `for ... in <literal tuple/list>` and every binding of it in its scope is such a loop
        (model.py reuses `name` in two loops); otherwise None."""
        scope = self.scope_of(name)
        child: ast.AST = name
        cur = self.parent.get(name)
        loop = None
        while cur is not None and cur is not scope:
            if (isinstance(cur, ast.For) and any(child is s for s in cur.body)
                    and self.target_position(cur.target, name.id) is not None):
                loop = cur
                break
            child, cur = cur, self.parent.get(cur)
        if loop is None:
            return None
        values = self.literal_loop_values(loop, name.id)
        if values is None:
            return None
        # Every other binding of the name in the scope (nested scopes included, to keep it simple)
        # must be a loop over literal strings too.
        loop_targets: set[int] = set()
        for n in ast.walk(scope):
            if isinstance(n, ast.For) and self.target_position(n.target, name.id) is not None:
                if self.literal_loop_values(n, name.id) is None:
                    return None
                loop_targets.update(id(t) for t in ast.walk(n.target))
        for n in ast.walk(scope):
            bound = None
            if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
                bound = n.id if id(n) not in loop_targets else None
            elif isinstance(n, ast.arg):
                bound = n.arg
            elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar, ast.FunctionDef, ast.ClassDef)):
                bound = getattr(n, "name", None)
            elif isinstance(n, ast.MatchMapping):
                bound = n.rest
            elif isinstance(n, ast.alias):
                bound = n.asname or n.name.split(".")[0]
            if bound == name.id:
                return None
        return values

    def literal_loop_values(self, loop: ast.For, name_id: str) -> Optional[list[str]]:
        """The strings the loop binds to name_id, if its iterable is a literal of string literals."""
        pos = self.target_position(loop.target, name_id)
        if pos is None or not isinstance(loop.iter, (ast.Tuple, ast.List, ast.Set)):
            return None
        width = len(loop.target.elts) if isinstance(loop.target, (ast.Tuple, ast.List)) else None
        values = []
        for elt in loop.iter.elts:
            if pos != ():
                if not isinstance(elt, (ast.Tuple, ast.List)) or len(elt.elts) != width:
                    return None
                elt = elt.elts[pos[0]]
            if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)):
                return None
            values.append(elt.value)
        return values

    @staticmethod
    def target_position(target: ast.AST, name: str) -> Optional[tuple]:
        """() if the loop target is exactly `name`; (i,) if it is a flat tuple with `name` at i."""
        if isinstance(target, ast.Name):
            return () if target.id == name else None
        if isinstance(target, (ast.Tuple, ast.List)):
            hits = [i for i, e in enumerate(target.elts) if isinstance(e, ast.Name) and e.id == name]
            if len(hits) == 1 and all(isinstance(e, ast.Name) for e in target.elts):
                return (hits[0],)
        return None

    # ------------------------------------------------------------------ annotations

    def check_annotations(self, node: Union[ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda]) -> None:
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None and arg.annotation is not None:
                self.check_annotation(arg.annotation)
        if not isinstance(node, ast.Lambda) and node.returns is not None:
            self.check_annotation(node.returns)

    def check_annotation(self, ann: ast.AST) -> None:
        """String annotations are code to typing (forward references): check them as code too."""
        for n in ast.walk(ann):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) <= MAX_LITERAL_CHARS:
                try:
                    sub = ast.parse(n.value.strip(), mode="eval")
                except (SyntaxError, ValueError, RecursionError, MemoryError):
                    continue  # not an expression, so typing cannot evaluate it either
                inner = _Checker(ast.Module(body=[ast.Expr(sub.body)], type_ignores=[]), self.filename)
                for x in inner.nodes():
                    inner.visit(x)
                for _, msg in inner.problems:
                    shown = n.value if len(n.value) <= 60 else n.value[:57] + "..."
                    self.add(n, f"in the string annotation {shown!r}: {msg}")

    # ------------------------------------------------------------------ build_model

    def check_build_model(self) -> None:
        defs = [s for s in self.tree.body if isinstance(s, ast.FunctionDef) and s.name == "build_model"]
        if not defs:
            self.add(1, "no top-level `def build_model(config)`; define one that returns an nn.Module "
                        "built from config['data'] and config['model']")
            return
        fn = defs[-1]
        a = fn.args
        positional = [*a.posonlyargs, *a.args]
        required = len(positional) - len(a.defaults)
        kw_required = [k.arg for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
        if not (required == 1 or (required == 0 and (positional or a.vararg))) or kw_required:
            self.add(fn, "build_model must take exactly one positional parameter: def build_model(config)")


def _coding_problem(source: str, filename: str) -> Optional[str]:
    for i, line in enumerate(source.splitlines()[:2], start=1):
        m = _CODING_RE.match(line)
        if m:
            if m.group(1).lower() not in _UTF8_NAMES:
                return (f"{filename}:{i}: the file declares the source encoding {m.group(1)!r}; model files "
                        "must be UTF-8: remove the coding line")
            return None
        if line.strip() and not line.lstrip().startswith("#"):
            return None  # the cookie counts only on line 1, or on line 2 after a comment/blank line 1
    return None


def check_model_code(source: str, *, filename: str = "model.py", max_bytes: int = MAX_CODE_BYTES) -> list[str]:
    """Problems with an LLM-written model file's source, [] if it passes (the code is only parsed)."""
    try:
        size = len(source.encode("utf-8"))
    except UnicodeEncodeError:
        return [f"{filename}:1: the source is not valid Unicode text (lone surrogates); write plain UTF-8 text"]
    if size > max_bytes:
        return [f"{filename}:1: the file is {size:,} bytes, over the {max_bytes:,}-byte limit; a model file "
                "should be a few hundred lines: remove unused code and embedded data"]
    n_lines = source.count("\n") + 1
    if n_lines > MAX_LINES:
        return [f"{filename}:{MAX_LINES + 1}: the file has {n_lines:,} lines, over the {MAX_LINES:,}-line limit; "
                "shorten it"]
    if (p := _coding_problem(source, filename)) is not None:
        return [p]
    if "\0" in source:
        line = source.count("\n", 0, source.index("\0")) + 1
        return [f"{filename}:{line}: the file contains a null byte; model files are plain text"]
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        return [f"{filename}:{e.lineno or 1}: syntax error: {e.msg}; the file must be valid Python 3"]
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return [f"{filename}:1: the file cannot be parsed ({type(e).__name__}: {e}); write plain Python 3"]
    checker = _Checker(tree, filename)
    try:
        checker.run()
    except RecursionError:
        return [f"{filename}:1: the code is nested too deeply to check; simplify it"]
    seen, problems = set(), []
    for line, msg in sorted(checker.problems, key=lambda p: p[0]):
        text = f"{filename}:{line}: {msg}"
        if text not in seen:
            seen.add(text)
            problems.append(text)
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"{filename}: ... and {len(problems) - MAX_PROBLEMS} more problems"]
    return problems


def check_model_file(path: Union[str, Path], *, max_bytes: int = MAX_CODE_BYTES) -> list[str]:
    """check_model_code on a file; an unreadable, oversized or non-UTF-8 file is a problem, not a crash."""
    path = Path(path)
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return [f"{name}:1: cannot read the model file ({e.strerror or e}); write it as a regular file"]
    if len(data) > max_bytes:
        return [f"{name}:1: the file is over the {max_bytes:,}-byte limit; a model file should be a few hundred "
                "lines: remove unused code and embedded data"]
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return [f"{name}:{line}: the file is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                "save it as UTF-8"]
    if source.startswith("\ufeff"):
        source = source[1:]  # a UTF-8 byte-order mark is fine for Python
    return check_model_code(source, filename=name, max_bytes=max_bytes)


def require_model_file(path: Union[str, Path]) -> None:
    """Raise CodeCheckError if the model file has any problem."""
    problems = check_model_file(path)
    if problems:
        raise CodeCheckError(problems)
