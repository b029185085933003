"""The static check of LLM-written model files (nas_agent_graph.code_check) against a hostile corpus.

Every hostile file would write into its own marker folder if it ever ran (at import, or when
build_model is called). The tests check that the checker rejects each one naming the right line,
that the `check` command rejects a few end to end without running them, that nothing was ever
written, and (test_corpus_is_live) that the payloads marked live really do write their marker
when run on purpose, so the corpus is hostile for real and the marker checks can fail.
"""
from __future__ import annotations

import json
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pytest

from nas_agent.config import load_config
from nas_agent_graph import code_check, validation
from nas_agent_graph.code_check import (MAX_CODE_BYTES, CodeCheckError, check_model_code, check_model_file,
                                        require_model_file)
from nas_agent_graph.validation import check_proposal, run_smoke
from tests.conftest import PYTHON, ROOT, run_env


@dataclass(frozen=True)
class Hostile:
    name: str
    code: Union[str, bytes]  # MARKER is replaced by the repr of the marker path
    line: int  # the line the checker must name
    expect: str  # a fragment of the problem reported on that line
    live: bool = True  # importing it and calling build_model writes into the marker folder


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


PAD = "# " + "padding " * 12 + "\n"

CORPUS = [
    Hostile("os_system", src('''
        import os
        def build_model(config):
            os.system("touch " + MARKER)
        '''), 1, "import of 'os'"),
    Hostile("subprocess", src('''
        import torch
        import subprocess
        def build_model(config):
            subprocess.run(["touch", MARKER])
            return torch.nn.Linear(1, 1)
        '''), 2, "import of 'subprocess'"),
    Hostile("socket_bind", src('''
        import torch
        def build_model(config):
            import socket
            s = socket.socket(socket.AF_UNIX)
            s.bind(MARKER)
            return torch.nn.Linear(1, 1)
        '''), 3, "import of 'socket'"),
    Hostile("open_write", src('''
        import torch
        def build_model(config):
            with open(MARKER, "w") as f:
                f.write("pwned")
            return torch.nn.Linear(1, 1)
        '''), 3, "builtin 'open'"),
    Hostile("exec_string", src('''
        def build_model(config):
            exec(f"open({MARKER!r}, 'w').close()")
        '''), 2, "builtin 'exec'"),
    Hostile("eval_string", src('''
        def build_model(config):
            return eval("open(%r, 'w')" % MARKER)
        '''), 2, "builtin 'eval'"),
    Hostile("compile_string", src('''
        def build_model(config):
            code = compile("open(%r, 'w').close()" % MARKER, "x", "exec")
            return [f(code) for f in (exec,)]
        '''), 2, "builtin 'compile'"),
    Hostile("dunder_import", src('''
        def build_model(config):
            __import__("os").system("touch " + MARKER)
        '''), 2, "dunder name '__import__'"),
    Hostile("importlib", src('''
        import importlib
        def build_model(config):
            importlib.import_module("os").system("touch " + MARKER)
        '''), 1, "import of 'importlib'"),
    Hostile("builtins_module", src('''
        import builtins
        def build_model(config):
            builtins.open(MARKER, "w").close()
        '''), 1, "import of 'builtins'"),
    Hostile("getattr_computed", src('''
        import torch
        def build_model(config):
            b = getattr(torch.nn.functional, "__built" + "ins__")
            b["open"](MARKER, "w").close()
        '''), 3, "computed attribute name"),
    Hostile("getattr_dunder_literal", src('''
        import torch
        def build_model(config):
            getattr(torch.nn.functional, "__builtins__")["open"](MARKER, "w").close()
        '''), 3, "'__builtins__'"),
    Hostile("subclasses_walk", src('''
        def build_model(config):
            for cls in ().__class__.__bases__[0].__subclasses__():
                if cls.__name__ == "_wrap_close":
                    cls.__init__.__globals__["system"]("touch " + MARKER)
        '''), 2, "'__class__'"),
    Hostile("lambda_globals", src('''
        f = lambda: 0
        b = f.__globals__["__builtins__"]
        (b["open"] if isinstance(b, dict) else b.open)(MARKER, "w").close()
        def build_model(config):
            return None
        '''), 2, "'__globals__'"),
    Hostile("torch_save", src('''
        import torch
        def build_model(config):
            torch.save(torch.zeros(1), MARKER)
            return torch.nn.Linear(1, 1)
        '''), 3, "'save'"),
    Hostile("torch_load_pickle", src('''
        import torch
        class Touch:
            def __reduce__(self):
                return (open, (MARKER, "w"))
        def build_model(config):
            torch.save(Touch(), MARKER + ".pt")
            return torch.load(MARKER + ".pt", weights_only=False)
        '''), 7, "'load'"),
    Hostile("torch_hub", src('''
        import torch
        def build_model(config):
            return torch.hub.load("evil/repo", "model", trust_repo=True)
        '''), 3, "'hub'", live=False),
    Hostile("cpp_extension", src('''
        from torch.utils.cpp_extension import load_inline
        def build_model(config):
            return load_inline("evil", "int touch() { return system(\\"touch MARKER\\"); }", functions=["touch"])
        '''), 1, "'torch.utils.cpp_extension'", live=False),
    Hostile("ops_load_library", src('''
        import torch
        def build_model(config):
            torch.ops.load_library(MARKER + ".so")
        '''), 3, "'ops'", live=False),
    Hostile("ctypes_libc", src('''
        import ctypes
        def build_model(config):
            ctypes.CDLL(None).system(("touch " + MARKER).encode())
        '''), 1, "import of 'ctypes'"),
    Hostile("star_import", src('''
        import torch
        from torch import *
        def build_model(config):
            save(zeros(1), MARKER)
        '''), 2, "import *"),
    Hostile("relative_import", src('''
        from .evil import payload
        def build_model(config):
            return payload(MARKER)
        '''), 1, "relative imports", live=False),
    Hostile("import_in_function", src('''
        import torch
        def build_model(config):
            import os
            os.system("touch " + MARKER)
            return torch.nn.Linear(1, 1)
        '''), 3, "import of 'os'"),
    Hostile("global_statement", src('''
        import torch
        hook = None
        def build_model(config):
            global hook
            hook = torch.save
            hook(torch.zeros(1), MARKER)
        '''), 4, "`global`"),
    Hostile("decorator", src('''
        import torch
        @print if open(MARKER, "w") else print
        def build_model(config):
            return torch.nn.Linear(1, 1)
        '''), 2, "builtin 'open'"),
    Hostile("class_body", src('''
        import torch
        class Model(torch.nn.Module):
            import os
            os.system("touch " + MARKER)
        def build_model(config):
            return Model()
        '''), 3, "import of 'os'"),
    Hostile("metaclass", src('''
        class Meta(type):
            def __init__(cls, *args):
                open(MARKER, "w").close()
        class Model(metaclass=Meta):
            pass
        def build_model(config):
            return Model()
        '''), 1, "builtin 'type'"),
    Hostile("over_size_limit", "import torch\ntorch.save(torch.zeros(1), MARKER)\n"
            + PAD * (MAX_CODE_BYTES // len(PAD) + 1) + "def build_model(config):\n    return None\n",
            1, "-byte limit"),
    Hostile("syntax_error", src('''
        import torch
        def build_model(config):
            return torch.nn.Linear(1, 1
        open(MARKER, "w")
        '''), 3, "syntax error", live=False),
    Hostile("missing_build_model", src('''
        import torch
        torch.save(torch.zeros(1), MARKER)
        def make_model(config):
            return torch.nn.Linear(1, 1)
        '''), 1, "no top-level `def build_model"),
    Hostile("huge_string", "import torch\nBLOB = " + repr("A" * 5000) + "\ntorch.save(BLOB, MARKER)\n"
            "def build_model(config):\n    return None\n", 2, "literal of 5,000 characters"),
    Hostile("non_utf8_latin1", b"# -*- coding: latin-1 -*-\nimport torch\nS = '\xe9t\xe9'\n"
            b"torch.save(S, MARKER)\ndef build_model(config):\n    return None\n", 3, "not valid UTF-8"),
    Hostile("utf7_cookie", src('''
        # -*- coding: utf-7 -*-
        import torch
        def build_model(config):
            # +AAo-    torch.save(torch.zeros(1), MARKER)
            return torch.nn.Linear(1, 1)
        '''), 1, "source encoding 'utf-7'"),
    Hostile("fullwidth_eval", src('''
        def build_model(config):
            return ｅｖａｌ("open(%r, 'w')" % MARKER)
        '''), 2, "builtin 'eval'"),
    Hostile("builtins_via_dataclasses_re", src('''
        import dataclasses
        def build_model(config):
            dataclasses.re.enum.bltns.print("x", file=dataclasses.re.enum.bltns.open(MARKER, "w"))
        '''), 3, "'bltns'"),
    Hostile("generator_frame", src('''
        def build_model(config):
            g = (x for x in [1])
            g.gi_frame.f_builtins["open"](MARKER, "w").close()
        '''), 3, "'gi_frame'"),
    Hostile("string_annotation", src('''
        import typing
        def f(x: "open(MARKER, 'w')"):
            return x
        def build_model(config):
            return typing.get_type_hints(f)
        '''), 2, "string annotation"),
    Hostile("torch_reexports_os", src('''
        import torch
        def build_model(config):
            torch.os.system("touch " + MARKER)
        '''), 3, "'os'"),
    Hostile("tensor_type_imports", src('''
        import torch
        def build_model(config):
            return torch.zeros(1).type("os.system")
        '''), 3, "'type'", live=False),
    Hostile("file_writer_binding", src('''
        import torch
        def build_model(config):
            w = torch.PyTorchFileWriter(MARKER)
            w.write_end_of_file()
        '''), 3, "'PyTorchFileWriter'"),
    Hostile("storage_from_file", src('''
        import torch
        def build_model(config):
            torch.UntypedStorage.from_file(MARKER, True, 16)
        '''), 3, "'from_file'"),
    Hostile("numpy_tofile", src('''
        import torch
        def build_model(config):
            torch.zeros(2).numpy().tofile(MARKER)
        '''), 3, "'numpy'"),
    Hostile("vars_builtins", src('''
        import torch
        def build_model(config):
            vars(torch.nn.functional)["__builtins__"]["open"](MARKER, "w").close()
        '''), 3, "builtin 'vars'"),
    Hostile("match_class_pattern", src('''
        def build_model(config):
            match (lambda: 0):
                case object(__globals__=g):
                    b = g["__builtins__"]
                    (b["open"] if isinstance(b, dict) else b.open)(MARKER, "w").close()
        '''), 3, "class pattern"),
    Hostile("loop_var_rebound", src('''
        def build_model(config):
            for name in ("real",):
                name = "__globals__"
                g = getattr(build_model, name)
                b = g["__builtins__"]
                (b["open"] if isinstance(b, dict) else b.open)(MARKER, "w").close()
        '''), 4, "computed attribute name"),
    Hostile("torch_compile", src('''
        import torch
        def build_model(config):
            return torch.compile(torch.nn.Linear(1, 1))
        '''), 3, "'compile'", live=False),
    Hostile("null_byte", "import torch\nX = 1\0\ndef build_model(config):\n    open(MARKER, 'w')\n", 2,
            "null byte", live=False),
]
BY_NAME = {h.name: h for h in CORPUS}


def materialise(h: Hostile, base: Path) -> tuple[Path, Path]:
    """The hostile file under base/<name>/model.py and its (empty) marker folder."""
    folder = base / h.name
    marker_dir = folder / "marker"
    marker_dir.mkdir(parents=True)
    marker = repr(str(marker_dir / "pwned"))
    if isinstance(h.code, bytes):
        data = h.code.replace(b"MARKER", marker.encode())
    else:
        data = h.code.replace("MARKER", marker).encode("utf-8")
    path = folder / "model.py"
    path.write_bytes(data)
    return path, marker_dir


def assert_untouched(marker_dir: Path) -> None:
    assert list(marker_dir.iterdir()) == [], f"a payload ran: {list(marker_dir.iterdir())}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("hostile")
    return {h.name: materialise(h, base) for h in CORPUS}


# --------------------------------------------------------------------------- the hostile corpus


def test_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 25
    assert len(BY_NAME) == len(CORPUS)
    assert sum(h.live for h in CORPUS) >= 25


@pytest.mark.parametrize("h", CORPUS, ids=lambda h: h.name)
def test_hostile_file_is_rejected_naming_the_line(h, corpus):
    path, marker_dir = corpus[h.name]
    problems = check_model_file(path)
    assert problems, f"{h.name} passed the check"
    on_line = [p for p in problems if p.startswith(f"{path}:{h.line}:")]
    assert any(h.expect in p for p in on_line), f"expected {h.expect!r} on line {h.line}, got {problems}"
    with pytest.raises(CodeCheckError) as err:
        require_model_file(path)
    assert err.value.problems == problems
    assert_untouched(marker_dir)


def test_checker_watchdog_on_the_whole_corpus(corpus):
    """The checker runs on every file in a subprocess with a timeout and an audit hook: it must
    finish, reject all, and neither import, exec nor open anything in the marker folders."""
    script = textwrap.dedent('''
        import json, sys
        from nas_agent_graph.code_check import check_model_file
        paths = sys.argv[1:]
        events = []
        def hook(event, args):
            if event in ("exec", "import", "os.system", "subprocess.Popen", "socket.__new__", "ctypes.dlopen",
                         "os.posix_spawn", "os.exec", "os.fork"):
                events.append(event)
            elif event == "open" and args and "marker" in str(args[0]):
                events.append(f"open {args[0]}")
        sys.addaudithook(hook)
        results = {p: check_model_file(p) for p in paths}
        print(json.dumps({"results": results, "events": events, "torch": "torch" in sys.modules}))
    ''')
    paths = [str(corpus[h.name][0]) for h in CORPUS]
    proc = subprocess.run([PYTHON, "-c", script, *paths], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["events"] == []
    assert out["torch"] is False  # checking never imports what the files import
    for h in CORPUS:
        problems = out["results"][str(corpus[h.name][0])]
        assert any(f":{h.line}:" in p and h.expect in p for p in problems), (h.name, problems)
        assert_untouched(corpus[h.name][1])


@pytest.mark.parametrize("name", ["os_system", "subclasses_walk", "torch_save", "utf7_cookie"])
def test_check_command_rejects_without_running(name, corpus, tmp_path):
    h = BY_NAME[name]
    path, marker_dir = corpus[name]
    proc = subprocess.run([PYTHON, "-m", "nas_agent_graph", "check", "config.py", "--model", str(path),
                           "--state", str(tmp_path / "no_study.json")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REJECTED" in proc.stdout
    assert f"{path}:{h.line}: " in proc.stdout and h.expect in proc.stdout
    assert "smoke test" not in proc.stdout
    assert_untouched(marker_dir)


def test_corpus_is_live(tmp_path):
    """Run the live payloads on purpose (a fresh copy of each, in a subprocess): every one writes into
    its marker folder, so the corpus is really hostile and the untouched-marker assertions mean something."""
    live = [h for h in CORPUS if h.live]
    files = {h.name: materialise(h, tmp_path) for h in live}
    script = textwrap.dedent('''
        import importlib.util, sys
        for i, path in enumerate(sys.argv[1:]):
            try:
                spec = importlib.util.spec_from_file_location(f"hostile_{i}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                module.build_model({"data": {"seq_len": 8, "pred_len": 4}, "model": {"enc_in": 1, "c_out": 1}})
            except BaseException as e:  # the payload has done its work by then, or not
                print(path, type(e).__name__, e, file=sys.stderr)
    ''')
    proc = subprocess.run([PYTHON, "-c", script, *(str(p) for p, _ in files.values())], cwd=tmp_path,
                          env=run_env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    dead = [name for name, (_, marker_dir) in files.items() if not any(marker_dir.iterdir())]
    assert dead == [], f"payloads that did not write their marker: {dead}\n{proc.stderr[-3000:]}"


# --------------------------------------------------------------------------- rules, one by one


def problems_of(code: str) -> list[str]:
    return check_model_code(src(code))


OK_HEADER = "import torch\ndef build_model(config):\n    return torch.nn.Linear(1, 1)\n"


@pytest.mark.parametrize("code, line, expect", [
    ("from math import *\n", 1, "from math import a, b"),
    ("from __future__ import barry_as_FLUFL\n", 1, "only `from __future__ import annotations`"),
    ("import torch.utils.data\n", 1, "import of 'torch.utils.data'"),
    ("import torch.jit\n", 1, "import of 'torch.jit'"),
    ("from torch import load as fetch\n", 1, "'load'"),
    ("import torch as os\n", 1, "the name 'os'"),
    ("def f():\n    x = 1\n    def g():\n        nonlocal x\n", 4, "`nonlocal`"),
    ("async def f():\n    pass\n", 1, "async code"),
    ("def f(x):\n    return x.__dict__\n", 2, "'__dict__'"),
    ("class A(torch.nn.Module):\n    def __init__(self):\n        torch.nn.Module.__init__(self)\n", 3,
     "super().__init__(...)"),
    ("class A:\n    def __getattr__(self, name):\n        return 1\n", 2, "defining '__getattr__'"),
    ("def __init__():\n    pass\n", 1, "defining '__init__'"),
    ("x = input()\n", 1, "input() is not allowed"),
    ("breakpoint()\n", 1, "builtin 'breakpoint'"),
    ("f = getattr\n", 1, "may only be called directly"),
    ("def f(o, n):\n    return getattr(o, n)\n", 2, "computed attribute name"),
    ("def f(o):\n    return setattr(o, '_private', 1)\n", 2, "'_private'"),
    ("def f(o):\n    return getattr(o, name='x')\n", 2, "plain positional arguments"),
    ("NAMES = ('a', 'b')\ndef f(o):\n    for n in NAMES:\n        getattr(o, n)\n", 4, "computed attribute name"),
    ("def f(o):\n    for n in ('a', 'b'):\n        pass\n    return getattr(o, n)\n", 4, "computed attribute name"),
    ("def f(o):\n    for n in ('a', '__class__'):\n        getattr(o, n)\n", 3, "'__class__'"),
    ("def f(o):\n    for n in ('a',):\n        n += '_'\n        getattr(o, n)\n", 4, "computed attribute name"),
    ("def f(x):\n    return x.cuda()\n", 2, "'cuda'"),
    ("def f(m):\n    return m.eval()\n", 2, "'eval'"),
    ("import functools\n@functools.wraps(print)\ndef f():\n    pass\n", 2, "'wraps'"),
    ("import dataclasses\nC = dataclasses.make_dataclass('C', ['x'])\n", 2, "'make_dataclass'"),
    ("def f(x) -> 'x.__class__':\n    return x\n", 1, "string annotation"),
    ("x = torch._C\n", 1, "'_C'"),
    ("x = (1).real.__class__\n", 1, "'__class__'"),
    ("y = __name__\n", 1, "dunder name '__name__'"),
    ("def f(**kw):\n    return f(__class__=1)\n", 2, "dunder name '__class__'"),
    ("def super():\n    return torch\n", 1, "rebinding 'super'"),
    ("def f(x):\n    super = x\n    return super().__init__\n", 2, "rebinding 'super'"),
])
def test_rule(code, line, expect):
    problems = check_model_code(OK_HEADER + code)
    line += OK_HEADER.count("\n")
    assert any(p.startswith(f"model.py:{line}:") and expect in p for p in problems), problems


@pytest.mark.parametrize("signature, ok", [
    ("def build_model(config):", True),
    ("def build_model(config, scale=2):", True),
    ("def build_model(config, /):", True),
    ("def build_model():", False),
    ("def build_model(config, data):", False),
    ("def build_model(config, *, strict):", False),
    ("async def build_model(config):", False),
])
def test_build_model_signature(signature, ok):
    problems = check_model_code(f"import torch\n{signature}\n    return torch.nn.Linear(1, 1)\n")
    assert (problems == []) is ok, problems


def test_build_model_must_be_top_level():
    problems = check_model_code("class A:\n    def build_model(config):\n        return 1\n")
    assert problems == ["model.py:1: no top-level `def build_model(config)`; define one that returns an "
                        "nn.Module built from config['data'] and config['model']"]


def test_limits_and_unreadable_files(tmp_path):
    lines = "import torch\n" + "x = 1\n" * 2100 + "def build_model(config):\n    return None\n"
    assert "over the 2,000-line limit" in check_model_code(lines)[0]
    assert "byte limit" in check_model_code(OK_HEADER, max_bytes=10)[0]
    assert check_model_file(tmp_path / "missing.py")[0].startswith(f"{tmp_path / 'missing.py'}:1: cannot read")
    assert "cannot read" in check_model_file(tmp_path)[0]  # a folder
    deep = "x = " + "(" * 300 + "1" + ")" * 300 + "\n"
    problems = check_model_code(OK_HEADER + deep)
    assert len(problems) == 1 and problems[0].startswith("model.py:")  # reported, not a crash
    assert check_model_code("\ud800") and "not valid Unicode" in check_model_code("\ud800")[0]


def test_many_problems_are_capped():
    code = OK_HEADER + "open(1)\n" * 200
    problems = check_model_code(code)
    assert len(problems) == code_check.MAX_PROBLEMS + 1 and "more problems" in problems[-1]


# --------------------------------------------------------------------------- what must pass

CUSTOM_MODEL = src('''
    """A linear forecaster written with many of the constructs the checker allows."""
    import math
    from dataclasses import dataclass, field
    from functools import partial
    from typing import Optional

    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    @dataclass
    class Settings:
        seq_len: int
        pred_len: int
        enc_in: int
        c_out: int
        hidden: int = 32
        tags: list = field(default_factory=list)

        def __post_init__(self):
            for name in ("seq_len", "pred_len", "enc_in", "c_out", "hidden"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if not hasattr(self, "hidden"):
                raise ValueError("no hidden size")


    class ScaleGrad(torch.autograd.Function):
        """Identity forward, scaled gradient backward."""

        @staticmethod
        def forward(ctx, x, scale: float):
            ctx.save_for_backward(x)
            ctx.scale = scale
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * ctx.scale, None


    class Forecaster(nn.Module):
        def __init__(self, s: Settings, act=partial(F.gelu, approximate="tanh")) -> None:
            super(Forecaster, self).__init__()
            self.s, self.act = s, act
            self.time = nn.Linear(s.seq_len, s.hidden)
            self.head = nn.Linear(s.hidden, s.pred_len)
            self.mix = nn.Linear(s.enc_in, s.c_out)
            nn.init.xavier_uniform_(self.mix.weight, gain=1.0 / math.sqrt(2.0))
            self.layers = nn.ModuleList([nn.Identity() for _ in range(2)])

        def __repr__(self) -> str:
            return "Forecaster({})".format(self.s.hidden)

        def forward(self, x_enc, x_mark_enc, x_dec, x_mark_dec, input: Optional[torch.Tensor] = None) -> "torch.Tensor":
            mean = x_enc.mean(1, keepdim=True)
            h = self.act(self.time((x_enc - mean).transpose(1, 2)))
            for layer in self.layers:
                h = layer(h)
            y = self.head(ScaleGrad.apply(h, 0.5)).transpose(1, 2) + mean
            return self.mix(y)


    def build_model(config):
        data, model = config["data"], config["model"]
        return Forecaster(Settings(data["seq_len"], data["pred_len"], model["enc_in"], model["c_out"]))
''')


@pytest.mark.parametrize("code", [
    "from __future__ import annotations\n",
    "import torch.nn.functional as F\nfrom torch import nn\nfrom typing import Optional, List\n",
    "def f(self):\n    for name, allowed in (('attn', ('prob', 'full')), ('embed', ('timeF',))):\n"
    "        if getattr(self, name) not in allowed:\n            raise ValueError(name)\n",
    "def f(m):\n    return getattr(m, 'weight', None), hasattr(m, 'bias')\n",
    "class A(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n",
    "def f(x, input=None):\n    return x.select(0, 1), x.to(torch.float32), x.detach().cpu().tolist()\n",
    "class B(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.input = torch.nn.Linear(2, 2)\n",
    "def f(m, hook):\n    h = m.register_forward_hook(hook)\n    h.remove()\n",
    "def f(xs):\n    print('{} items'.format(len(xs)))\n    return sum(x * 2 for x in xs)\n",
    "def f(x):\n    with torch.no_grad():\n        return (lambda y: y + 1)(x)\n",
    "def f(p):\n    match p:\n        case complex(real=r):\n            return r\n",
    "def f(x) -> 'torch.Tensor':\n    return x\n",
])
def test_allowed_constructs(code):
    assert check_model_code(OK_HEADER + code) == []


def test_project_model_passes():
    assert check_model_file(ROOT / "model.py") == []


def test_custom_model_passes_the_checker():
    assert check_model_code(CUSTOM_MODEL) == []


def test_custom_model_passes_the_smoke_test(tmp_path, tiny_config):
    path = tmp_path / "linear_model.py"
    path.write_text(CUSTOM_MODEL, encoding="utf-8")
    cfg = load_config(tiny_config).model_dump()
    verdict = check_proposal(cfg, None, python=PYTHON, smoke_timeout=120, env=run_env(), model_file=path)
    assert verdict.ok, verdict.errors
    # Forecaster: time (48*32+32) + head (32*24+24) + mix (7*7+7) parameters on ETTh1's 7 channels
    assert verdict.n_params == (48 * 32 + 32) + (32 * 24 + 24) + (7 * 7 + 7)


def test_postponed_annotations_with_a_dataclass_run_in_the_smoke_test(tmp_path, tiny_config):
    """train.load_build_model registers the module before running it, as dataclasses need."""
    path = tmp_path / "dc_model.py"
    path.write_text(src('''
        from __future__ import annotations

        from dataclasses import dataclass

        import torch


        @dataclass
        class Sizes:
            seq_len: int
            pred_len: int


        class Head(torch.nn.Module):
            def __init__(self, sizes: Sizes):
                super().__init__()
                self.pred_len = sizes.pred_len
                self.proj = torch.nn.Linear(sizes.seq_len, sizes.pred_len)

            def forward(self, x_enc, x_mark_enc, x_dec, x_mark_dec):
                return self.proj(x_enc.transpose(1, 2)).transpose(1, 2)


        def build_model(config):
            return Head(Sizes(config["data"]["seq_len"], config["data"]["pred_len"]))
        '''), encoding="utf-8")
    assert check_model_file(path) == []
    cfg = load_config(tiny_config).model_dump()
    verdict = check_proposal(cfg, None, python=PYTHON, smoke_timeout=120, env=run_env(), model_file=path)
    assert verdict.ok, verdict.errors


def test_model_code_cannot_forge_the_smoke_verdict(tmp_path, tiny_config):
    """A verdict line printed by model code (here at interpreter exit) lacks the parent's nonce."""
    path = tmp_path / "forger.py"
    path.write_text(src('''
        def _forge():
            try:
                yield 1
            finally:
                print('{"ok": true, "n_params": 1, "seconds": 0.1, "output_shape": [1]}')


        FORGER = _forge()
        next(FORGER)


        def build_model(config):
            raise ValueError("no model here")
        '''), encoding="utf-8")
    assert check_model_file(path) == []  # safe code as far as the allowlist goes: only the nonce stops the lie
    result = run_smoke(load_config(tiny_config).model_dump(), python=PYTHON, timeout_s=120, env=run_env(),
                       model_file=path)
    assert result["ok"] is False and "no model here" in result["error"]


# --------------------------------------------------------------------------- validation wiring


def test_validation_never_starts_a_subprocess_for_rejected_code(corpus, tiny_config, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(validation.subprocess, "run", no_subprocess)
    cfg = load_config(tiny_config).model_dump()
    path, marker_dir = corpus["os_system"]
    verdict = check_proposal(cfg, None, python=PYTHON, smoke_timeout=60, model_file=path)
    assert not verdict.ok and verdict.config is not None
    assert verdict.errors == check_model_file(path)
    assert verdict.errors[0].startswith(f"{path}:1: import of 'os' is not allowed")
    result = run_smoke(verdict.config, python=PYTHON, timeout_s=60, model_file=path)  # the lower-level gate too
    assert result["ok"] is False and result["error"].startswith("model code rejected: ")
    assert_untouched(marker_dir)


def test_reachability_audit():
    """Walk the attributes reachable from the allowed modules (names the attribute rules allow, plus
    dict/list items, 8 steps deep) and fail on any dangerous module or builtin: a new torch release
    that re-exports one under an innocent name shows up here."""
    script = textwrap.dedent('''
        import builtins, collections, importlib, json, os, sys, types, warnings
        warnings.simplefilter("ignore")
        from nas_agent_graph.code_check import ALLOWED_MODULES, attribute_problem
        danger_mods = {"os", "posix", "sys", "subprocess", "socket", "_socket", "builtins", "importlib", "io",
                       "_io", "pathlib", "shutil", "pickle", "_pickle", "marshal", "ctypes", "_ctypes", "types",
                       "inspect", "operator", "_operator", "string", "_string", "runpy", "tempfile", "logging",
                       "threading", "_thread", "multiprocessing", "gc", "codecs", "_codecs", "pdb", "pydoc",
                       "numpy", "sympy", "jinja2", "posixpath", "json", "zipfile", "tarfile", "glob", "signal",
                       "weakref", "traceback", "linecache", "ast", "dis", "copyreg", "platform", "site"}
        danger = {id(getattr(builtins, n)): n for n in ("eval", "exec", "compile", "open", "__import__", "getattr",
                  "setattr", "delattr", "vars", "globals", "locals", "breakpoint", "help", "input", "memoryview",
                  "dir", "type")}
        danger.update({id(types.CodeType): "CodeType", id(types.FunctionType): "FunctionType",
                       id(os.system): "os.system", id(os.open): "os.open", id(os.environ): "os.environ"})
        seen, hits = set(), {}
        queue = collections.deque((importlib.import_module(m), m, 0) for m in sorted(ALLOWED_MODULES))
        while queue:
            obj, path, depth = queue.popleft()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, types.ModuleType) and obj.__name__.split(".")[0] in danger_mods:
                hits.setdefault("module " + obj.__name__, path)
                continue
            if id(obj) in danger:
                hits.setdefault(danger[id(obj)], path)
                continue
            if depth >= 8 or isinstance(obj, (int, float, complex, str, bytes, bool, type(None))):
                continue
            if isinstance(obj, (tuple, list, set, frozenset)):
                queue.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(list(obj)[:200]))
                continue
            if isinstance(obj, dict):
                queue.extend((v, f"{path}[{k!r}]", depth + 1) for k, v in list(obj.items())[:500])
                continue
            try:
                names = dir(obj)
            except Exception:
                continue
            for n in names:
                if isinstance(n, str) and attribute_problem(n) is None:
                    try:
                        queue.append((getattr(obj, n), f"{path}.{n}", depth + 1))
                    except Exception:
                        pass
        print(json.dumps({"visited": len(seen), "hits": hits}))
    ''')
    proc = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["visited"] > 5000  # the walk really went through torch
    assert out["hits"] == {}
