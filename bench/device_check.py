"""A prepared GPU check (issue 15, item 6): what a lent GPU is spent on, rehearsed here first.

    NAS_DATA_DIR=../shared/data python bench/device_check.py --prepare   # here: wheels + data into the carry
    python bench/device_check.py --dry-run      # here, on the CPU: check everything, print the run call
    bash bench/device_check.sh                  # there, through the device tool (the call --dry-run prints)

bench/device_check.sh is the entry point; it installs the carried wheels on the GPU machine
before it runs this. docs/device_check.md says how to use it.

On the GPU (CUDA, bf16 autocast, training.amp=True), one train.py subprocess per run:
- config.py and configs/dlinear.py with bench/results/amp_parity.md's settings (3 epochs), and
  configs/itransformer.py at its paper settings (10 epochs) as bench/results/reproduce.md ran it;
  seed 2021, the first seed of both benchmarks;
- two config.py runs at once on the one GPU (seeds 2021 and 2022): both reported, and their
  samples/s against the solo run's;
- the LLM path: a tiny randomly initialised LLaMA (built there, nothing travels) loaded in NF4
  by the project's backend, two constrained proposals under the default search space's schema
  (xgrammar), and 3 QLoRA steps through nas_agent_graph.lora.finetune.
The table puts each run's samples/s and val MSE next to the CPU numbers of
bench/results/train_speed.md, amp_parity.md and reproduce.md, read from those files.

--dry-run runs the same plan on the CPU, in the same subprocesses, with 2 training steps per run
on the first rows of ETTh1 (so evaluation takes seconds, not minutes) and the same NF4 LLM path,
under `python -X importtime`: every distribution those runs import is then checked against the
GPU image's package list (bench/device_image_packages.txt) and the carried wheels. It also
checks the carried folders (the wheels' tags for Python 3.12 on x86-64, the data's sha256, the
64 MiB limit on what travels) and prints the device tool's run call. Exit status 0: ready.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ is a folder of scripts: the repository root holds train.py and the packages.

RESULTS = ROOT / "bench" / "results"
WHL_DIR, DATA_DIR = ".whl", ".devdata"  # the carried folders, ignored by .gitignore
CARRY = (WHL_DIR, DATA_DIR)
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit on the working tree plus carried paths
COMMAND_LIMIT, CARRY_PATHS_LIMIT = 2000, 8
TIMEOUT_S = 480  # the run call's timeout_s: the issue asks for under 8 minutes there
BUDGET_S = 400   # this script's own deadline there; the wheels' install before it takes seconds
RUN_COMMAND = 'set -o pipefail; bash bench/device_check.sh 2>&1 | tee "$OUT/device_check.log"'

# Not on the GPU image (bench/device_image_packages.txt), so carried as wheels, of the versions
# installed here: the ones the tests and this dry run use. --dry-run proves the list complete.
WHEELS = (
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # nas_agent.config: every train.py
    "typing-extensions",  # on the image, in a version nobody has read; pydantic's needs want >= 4.15 (46 kB)
    "optuna", "colorlog",           # optuna.distributions, behind the search space of the proposal schema
    "xgrammar", "apache-tvm-ffi",   # grammar-constrained decoding
    "bitsandbytes",                 # NF4 (43 MB: one wheel holds every CUDA version's library)
)
# The GPU machine's Python and processor (README of the device tool); pip matches each glibc level exactly.
PY_TAGS = ["--python-version", "3.12", "--implementation", "cp"]
PLATFORMS = [a for n in ("2_28", "2_27", "2_24", "2_17") for a in ("--platform", f"manylinux_{n}_x86_64")] + \
            ["--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]
IMAGE_LIST = ROOT / "bench" / "device_image_packages.txt"
KINDS_MD = Path(os.environ.get("DEVICE_KINDS_MD", "/work/.library/device/KINDS.md"))

SEED0 = 2021
# --dry-run: two steps per run, on the first rows of ETTh1 under a name that is not an ETT name,
# so the 70/10/20 ratio split applies (the ETT borders need all 14400 rows). Evaluating the
# default config on the full val and test splits takes ~2 minutes on one CPU thread.
DRY_SETS = ["training.max_epochs=1", "training.max_steps_per_epoch=2"]
DRY_ROWS = 2000
# Per-phase caps (seconds) there; a phase gets less when the deadline is nearer, keeping room for
# the phases after it. Expected on an H200: well under a minute each.
CAPS = {"solo": 150, "pair": 200, "llm": 180}
MIN_S = {"solo": 45, "pair": 60, "llm": 60}


@dataclass(frozen=True)
class Run:
    config: str
    ref: str             # "amp_parity" or "reproduce": the CPU results file its settings and val MSE come from
    seed: int = SEED0
    mode: str = "solo"   # or "parallel 1/2", "parallel 2/2"

    @property
    def tag(self) -> str:
        return f"{Path(self.config).stem}_s{self.seed}_{self.mode.replace(' ', '').replace('/', 'of')}"


SOLO = (Run("config.py", "amp_parity"), Run("configs/dlinear.py", "amp_parity"),
        Run("configs/itransformer.py", "reproduce"))
PAIR = (Run("config.py", "amp_parity", SEED0, "parallel 1/2"),
        Run("config.py", "amp_parity", SEED0 + 1, "parallel 2/2"))


# ----------------------------------------------------------------------------- CPU reference numbers

def md_rows(path: Path, first_col: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in `path` whose header starts with `| first_col |`."""
    rows: list[dict[str, str]] = []
    header = None
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            if line.startswith(f"| {first_col} |"):
                header = cells
            continue
        if not line.startswith("|"):
            break
        if not set("".join(cells)) <= set("-: "):  # skip the |---| line
            rows.append(dict(zip(header, cells)))
    if header is None:
        raise SystemExit(f"{path}: no table with a '{first_col}' column; the CPU reference cannot be read")
    return rows


def amp_parity_sets() -> list[str]:
    """The --set overrides amp_parity.md's runs used, from its 'settings:' line."""
    text = (RESULTS / "amp_parity.md").read_text(encoding="utf-8")
    line = next((s for s in text.splitlines() if s.startswith("settings:")), "")
    return re.findall(r"--set (\S+?)(?=[;\s]|$)", line)


def run_sets(run: Run) -> list[str]:
    # reproduce.md ran the configs as shipped (ETTh1 needs no paper overrides).
    return ["training.amp=True"] + (amp_parity_sets() if run.ref == "amp_parity" else [])


def cpu_reference(run: Run) -> dict[str, str]:
    """The CPU's samples/s (train_speed.md, bf16) and val/test MSE (amp_parity.md or reproduce.md)."""
    speed = {r["config"]: r for r in md_rows(RESULTS / "train_speed.md", "config")}
    ref = {"samples_s": speed.get(run.config, {}).get("samples/s bf16", "–")}
    if run.ref == "amp_parity":
        row = next((r for r in md_rows(RESULTS / "amp_parity.md", "config")
                    if r["config"] == run.config and r["precision"].startswith("bf16 (")), {})
        ref.update(val=row.get("val MSE", "–"), test=row.get("test MSE", "–"), source="amp_parity.md bf16, 3 seeds")
    else:
        row = next((r for r in md_rows(RESULTS / "reproduce.md", "config")
                    if r["config"] == Path(run.config).stem and r["data"] == "ETTh1"), {})
        ref.update(val=row.get("val MSE (mean)", "–"), test=row.get("test MSE", "–"),
                   source="reproduce.md, 3 seeds")
    return ref


# ----------------------------------------------------------------------------- running train.py

def train_cmd(run: Run, device: str, runs_dir: Path, extra_sets: list[str], trace: bool) -> list[str]:
    cmd = [sys.executable, *(["-X", "importtime"] if trace else []), str(ROOT / "train.py"),
           "--config", str(ROOT / run.config), "--tag", run.tag, "--runs-dir", str(runs_dir),
           "--device", device, "--seed", str(run.seed), "--overwrite"]
    for s in run_sets(run) + extra_sets:
        cmd += ["--set", s]
    return cmd


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ, NAS_DATA_DIR=str(ROOT / DATA_DIR), PYTHONUNBUFFERED="1")
    if device == "cpu":  # a dry run shares a small machine: one thread per child unless told otherwise
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: train.py then writes metrics.json (status interrupted); SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_runs(runs: tuple[Run, ...], device: str, work: Path, extra_sets: list[str], trace: bool,
               timeout_s: float) -> list[dict]:
    """Start every run at once (one, or the parallel pair), wait for all, read their metrics.json."""
    procs = []
    t0 = time.monotonic()
    for run in runs:
        log = work / f"{run.tag}.log"
        cmd = train_cmd(run, device, work / "runs", extra_sets, trace)
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(device), cwd=ROOT)
        procs.append((run, log, proc))
    results = []
    for run, log, proc in procs:
        try:
            proc.wait(max(1.0, timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            stop(proc)
        results.append(run_result(run, work, log, proc.returncode, time.monotonic() - t0))
    return results


def run_result(run: Run, work: Path, log: Path, rc: int, wall_s: float) -> dict:
    out = {"config": run.config, "seed": run.seed, "mode": run.mode, "tag": run.tag, "rc": rc,
           "wall_s": round(wall_s, 1), "log": str(log)}
    path = work / "runs" / run.tag / "metrics.json"
    if not path.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        return {**out, "status": "no metrics.json", "error": " / ".join(tail)[-300:]}
    m = json.loads(path.read_text())
    keys = ("status", "samples_per_s", "val_mse", "test_mse", "epochs_run", "amp", "eval_s", "startup_s",
            "train_time_sec", "device", "error")
    return {**out, **{k: m.get(k) for k in keys}}


# ----------------------------------------------------------------------------- the LLM path

def build_tiny_llama(out: Path) -> Path:
    """A randomly initialised 2-layer LLaMA and a 1024-token byte-level BPE trained on the repo's
    prompts, spaces and configs, saved as a Hugging Face folder: the backend loads it like any local
    model, and no weights or tokenizer need to travel (transformers and tokenizers are on the image)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8") for pattern in ("prompts/*.j2", "spaces/*.json", "configs/*.py")
             for p in sorted(ROOT.glob(pattern))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # every byte encodable: no unknown tokens
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    # Widths are multiples of 64, NF4's block size.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def llm_part(device: str, work: Path, res: dict) -> None:
    """NF4 load, two constrained proposals, 3 QLoRA steps: the project's own backend and finetune
    code. Fills `res` as it goes, its "stage" naming the step under way, so a failure says where."""
    import torch

    # Lazy, as every heavy import here: --prepare and --dry-run's planning never load them.
    from nas_agent_graph.llm import backend
    from nas_agent_graph.llm.proposal_schema import params_from_json, proposal_json_schema
    from nas_agent_graph.lora import finetune
    from nas_agent_graph.search_space import load_space

    res.update(device=device, quant="4bit", stage="tiny LLaMA build")
    t = time.perf_counter()
    path = build_tiny_llama(work / "tiny-llama")
    res["build_s"] = round(time.perf_counter() - t, 2)
    res["stage"] = "NF4 load"
    model, tokenizer, info = backend.load_model(str(path), "4bit", device)
    res.update(load_s=info["load_s"], n_params=info["n_params"], vocab=len(tokenizer),
               nf4_layers=sum(type(m).__name__ == "Linear4bit" for m in model.modules()))
    space = load_space(None)
    schema = proposal_json_schema(space)
    messages = [{"role": "system", "content": "Propose one configuration of this search space as JSON."},
                {"role": "user", "content": space.describe()}]
    res["proposals"], responses = [], []
    for seed in (0, 1):  # the first also compiles the grammar and any kernels; the second is warm
        res["stage"] = f"constrained proposal {seed + 1}"
        t = time.perf_counter()
        r = backend.generate_json(model, tokenizer, messages, schema, max_new_tokens=512, seed=seed)
        wall = time.perf_counter() - t
        try:
            params_from_json(r.parsed, space)
            valid = "yes"
        except ValueError as e:
            valid = f"no: {e}"
        res["proposals"].append({"constrained": r.constrained, "fallback": r.fallback_reason, "valid": valid,
                                 "tokens": r.completion_tokens, "generate_s": round(r.latency_s, 3),
                                 "wall_s": round(wall, 3), "text": r.text[:300]})
        responses.append(r.text)
    res["stage"] = "3 QLoRA steps"
    sample = {"key": "device_check", "messages": messages, "response": responses[0]}
    res["qlora"] = finetune.run({"base": str(path), "quant": "4bit", "device": device, "out": str(work / "adapter"),
                                 "version": 0, "steps": 3, "samples": [sample]})
    if device == "cuda":
        res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    res["stage"] = "done"


def llm_child(device: str, work: Path) -> int:
    """The child process of llm_subprocess: llm_part's results, or how far it got, as the last stdout line."""
    res: dict = {}
    try:
        llm_part(device, work, res)
    except Exception as e:  # noqa: BLE001 - the verdict is data for the parent
        res["error"] = f"{res.get('stage')}: {type(e).__name__}: {e}"
    print(json.dumps(res), flush=True)
    return 1 if "error" in res else 0


def llm_subprocess(device: str, work: Path, trace: bool, timeout_s: float) -> dict:
    """llm_part in a child process, so a crash or a hang there still leaves the training table."""
    log = work / "llm.log"
    cmd = [sys.executable, *(["-X", "importtime"] if trace else []), str(Path(__file__)),
           "--llm-part", device, "--work", str(work)]
    t0 = time.monotonic()
    with open(log, "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(device),
                                  cwd=ROOT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s", "log": str(log)}
    lines = proc.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail)[-400:], "log": str(log)}
    return {**res, "wall_s": round(time.monotonic() - t0, 1), "log": str(log)}


def llm_verdict(res: dict) -> tuple[bool, str]:
    if "error" in res:
        return False, res["error"]
    props, q = res["proposals"], res["qlora"]
    if not res["nf4_layers"]:
        return False, "no Linear4bit layer: the model was not quantised"
    if not all(p["constrained"] for p in props):
        return False, f"unconstrained decoding: {props[0]['fallback']}"
    if props[0]["valid"] != "yes":
        return False, f"proposal invalid: {props[0]['valid']}"
    if not q.get("ok"):
        return False, f"QLoRA failed: {q.get('error')}"
    return True, "NF4, constrained, valid proposal, 3 QLoRA steps"


# ----------------------------------------------------------------------------- the plan

def has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def execute(device: str, work: Path, extra_sets: list[str], trace: bool, budget_s: float,
            caps: dict[str, float] = CAPS) -> dict:
    """Solo runs, the parallel pair, the LLM path, each capped so the whole stays inside budget_s."""
    deadline = time.monotonic() + budget_s
    phases = [("solo", (run,)) for run in SOLO] + [("pair", PAIR), ("llm", None)]
    results: dict = {"runs": [], "llm": None, "skipped": []}
    for i, (kind, runs) in enumerate(phases):
        later = sum(MIN_S[k] for k, _ in phases[i + 1:])
        timeout = min(caps[kind], deadline - time.monotonic() - later)
        name = "LLM path" if runs is None else " + ".join(r.tag for r in runs)
        if timeout < MIN_S[kind]:
            results["skipped"].append(f"{name}: {timeout:.0f} s left before the deadline")
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} on {device} (at most {timeout:.0f} s)", flush=True)
        if runs is None:
            results["llm"] = llm_subprocess(device, work, trace, timeout)
        else:
            results["runs"] += train_runs(runs, device, work, extra_sets, trace, timeout)
    return results


# ----------------------------------------------------------------------------- tables

def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def runs_table(runs: list[dict]) -> list[str]:
    solo_speed = next((r["samples_per_s"] for r in runs if r["config"] == "config.py" and r["mode"] == "solo"), None)
    lines = ["| run | seed | mode | status | amp | epochs | samples/s | CPU samples/s (bf16) | vs CPU | "
             "val MSE | CPU val MSE | test MSE | CPU test MSE | startup s | eval s | wall s |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in runs:
        ref = cpu_reference(next(x for x in SOLO + PAIR if x.tag == r["tag"]))
        try:
            ratio = f"{r['samples_per_s'] / float(ref['samples_s']):.1f}x"
        except (TypeError, ValueError):
            ratio = "–"
        lines.append(f"| {r['config']} | {r['seed']} | {r['mode']} | {r['status']} | {r.get('amp') or '–'} | "
                     f"{r.get('epochs_run') or '–'} | {_f(r.get('samples_per_s'), '.0f')} | {ref['samples_s']} | "
                     f"{ratio} | {_f(r.get('val_mse'), '.4f')} | {ref['val']} | {_f(r.get('test_mse'), '.4f')} | "
                     f"{ref['test']} | {_f(r.get('startup_s'), '.1f')} | {_f(r.get('eval_s'), '.1f')} | "
                     f"{r['wall_s']} |")
    pair = [r["samples_per_s"] for r in runs if r["mode"].startswith("parallel") and r.get("samples_per_s")]
    if len(pair) == 2 and solo_speed:
        lines.append(f"\nParallel pair: {pair[0]:.0f} + {pair[1]:.0f} = {sum(pair):.0f} samples/s, "
                     f"{sum(pair) / solo_speed:.2f}x the solo config.py run's {solo_speed:.0f}.")
    lines.append("CPU columns: samples/s from bench/results/train_speed.md (2 threads, median step); "
                 "val/test MSE from amp_parity.md (config.py, DLinear: 3 epochs, mean ± std of seeds 2021-2023) "
                 "and reproduce.md (iTransformer: full run, ETTh1).")
    for r in runs:
        if r["status"] != "ok":
            last = ((r.get("error") or "").strip().splitlines() or [""])[-1]
            lines.append(f"{r['tag']}: {r['status']}: {last} (log {r['log']})")
    return lines


def llm_lines(res: dict | None) -> list[str]:
    """The LLM path's report: its verdict, then every step it got through (all of them when ok)."""
    if res is None:
        return ["LLM path: not run"]
    ok, why = llm_verdict(res)
    where = "" if ok else f" (log {res.get('log')})"
    lines = [f"LLM path on {res.get('device', '?')}: {'ok' if ok else 'FAILED'}: {why}{where}"]
    if "n_params" in res:
        lines.append(f"- tiny LLaMA: {res['n_params']:,} parameters, vocab {res['vocab']}, {res['nf4_layers']} NF4 "
                     f"layers; built in {res['build_s']} s, loaded in {res['load_s']} s")
    for i, p in enumerate(res.get("proposals", []), 1):
        rate = p["tokens"] / p["generate_s"] if p["generate_s"] else 0
        lines.append(f"- proposal {i}: constrained {p['constrained']}, valid {p['valid']}, {p['tokens']} tokens in "
                     f"{p['generate_s']} s ({rate:.0f} tokens/s; {p['wall_s']} s with the grammar compile)")
    q = res.get("qlora") or {}
    if q.get("ok"):
        lines.append(f"- QLoRA: {q['steps']} steps in {q['seconds']} s (with the load), loss {q['first_loss']} -> "
                     f"{q['final_loss']}, adapter {q['adapter_bytes']:,} bytes")
    if "peak_gpu_mib" in res:
        lines.append(f"- peak GPU memory of the LLM process: {res['peak_gpu_mib']} MiB")
    return lines


# ----------------------------------------------------------------------------- the carried folders

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted_wheels() -> dict[str, str]:
    """{distribution: version} of WHEELS, as installed here."""
    try:
        return {norm(n): md.version(n) for n in WHEELS}
    except md.PackageNotFoundError as e:
        raise SystemExit(f"{e.name} is not installed here: install requirements.txt first") from None


def wheel_files() -> dict[str, tuple[str, Path]]:
    """{distribution: (version, file)} of the wheels in the carried folder."""
    found = {}
    for path in sorted((ROOT / WHL_DIR).glob("*.whl")):
        dist, version = path.name.split("-")[:2]
        found[norm(dist)] = (version, path)
    return found


def data_files() -> list[str]:
    """The data files the planned configs read (only those travel)."""
    from nas_agent.config import load_config  # lazy: pydantic, for --prepare and --dry-run only
    return sorted({Path(load_config(ROOT / run.config).data.path).name for run in SOLO + PAIR})


def source_data_dir() -> Path:
    return Path(os.environ.get("NAS_DATA_DIR", ROOT.parent / "shared" / "data"))


def prepare() -> None:
    """Download the missing wheels (PyPI, through pip) and copy the data into the carried folders."""
    whl = ROOT / WHL_DIR
    whl.mkdir(exist_ok=True)
    have = wheel_files()
    for dist, (version, path) in have.items():  # two versions of one package stop the install there
        if dist in wanted_wheels() and version != wanted_wheels()[dist]:
            path.unlink()
    missing = [f"{d}=={v}" for d, v in wanted_wheels().items() if have.get(d, ("",))[0] != v]
    if missing:
        print(f"downloading {len(missing)} wheels into {WHL_DIR}/: {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        *PY_TAGS, *PLATFORMS, "-d", str(whl), *missing], check=True)
    (ROOT / DATA_DIR).mkdir(exist_ok=True)
    for name in data_files():
        src, dst = source_data_dir() / name, ROOT / DATA_DIR / name
        if not src.is_file():
            raise SystemExit(f"{src} not found: set NAS_DATA_DIR to the folder that holds {name}")
        if not dst.is_file() or sha256(dst) != sha256(src):
            shutil.copyfile(src, dst)
            print(f"copied {src} -> {DATA_DIR}/{name}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_bytes(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_symlink() or p.is_file())


def travel_bytes() -> dict[str, int]:
    """What a run call sends: tracked and untracked-not-ignored files, plus each carried folder."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    tree = sum((ROOT / n).lstat().st_size for n in names if n and os.path.lexists(ROOT / n))
    return {"working tree": tree, **{c: tree_bytes(ROOT / c) for c in CARRY if (ROOT / c).exists()}}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_wheels() -> tuple[bool, str]:
    have, want = wheel_files(), wanted_wheels()
    wrong = [f"{d} {v} (have {have[d][0] if d in have else 'none'})" for d, v in want.items()
             if have.get(d, ("",))[0] != v]
    if wrong:
        return False, f"missing or other versions: {', '.join(wrong)}; run bench/device_check.sh --prepare"
    extra = sorted(set(have) - set(want))
    also = f"; also carried: {', '.join(extra)}" if extra else ""
    return True, ", ".join(f"{d} {v}" for d, v in want.items()) + also


def check_wheel_tags() -> tuple[bool, str]:
    """pip, resolving for CPython 3.12 on manylinux x86-64, accepts every carried wheel as one set."""
    files = [str(p) for p in sorted((ROOT / WHL_DIR).glob("*.whl"))]
    if not files:
        return False, "no wheels"
    with tempfile.TemporaryDirectory() as target:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index",
                               "--no-deps", "--only-binary=:all:", *PY_TAGS, *PLATFORMS, "--target", target,
                               "--report", "-", *files], capture_output=True, text=True)
    if proc.returncode:
        return False, (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    names = [i["metadata"]["name"] for i in json.loads(proc.stdout)["install"]]
    return True, f"pip would install all {len(names)} for CPython 3.12, manylinux x86-64"


def resolve_with(data_dir: Path, path: str, resolve) -> Path:
    """What train.py would read for `path` with NAS_DATA_DIR=data_dir, as the runs there set it."""
    old = os.environ.get("NAS_DATA_DIR")
    os.environ["NAS_DATA_DIR"] = str(data_dir)
    try:
        return resolve(path, download=False)
    finally:
        if old is None:
            del os.environ["NAS_DATA_DIR"]
        else:
            os.environ["NAS_DATA_DIR"] = old


def check_data() -> tuple[bool, str]:
    from nas_agent.data import ETT_SHA256, resolve_data_path  # lazy: pandas and torch, for this check only
    notes = []
    for name in data_files():
        path = ROOT / DATA_DIR / name
        if not path.is_file():
            return False, f"{DATA_DIR}/{name} is missing; run bench/device_check.sh --prepare"
        if name in ETT_SHA256 and sha256(path) != ETT_SHA256[name]:
            return False, f"{DATA_DIR}/{name}: sha256 differs from the published file"
        found = resolve_with(ROOT / DATA_DIR, f"data/{name}", resolve_data_path)
        if found != path:
            return False, f"train.py would read {found}, not {path}"
        notes.append(f"{name} ({mib(path.stat().st_size)}, sha256 ok)")
    return True, ", ".join(notes) + f"; NAS_DATA_DIR={DATA_DIR} there"


def check_travel() -> tuple[bool, str]:
    ignored = [c for c in CARRY if subprocess.run(["git", "check-ignore", "-q", c], cwd=ROOT).returncode != 0]
    if ignored:
        return False, f"{', '.join(ignored)} not ignored by git: add to .gitignore (never commit wheels or data)"
    sizes = travel_bytes()
    total = sum(sizes.values())
    detail = f"{mib(total)} of {mib(TRAVEL_LIMIT)} ({', '.join(f'{k} {mib(v)}' for k, v in sizes.items())})"
    return total <= TRAVEL_LIMIT, detail


def image_packages() -> tuple[set[str], str]:
    """The GPU image's packages: the snapshot in the repo, compared with KINDS.md where that is at hand."""
    snapshot = {norm(line.strip()) for line in IMAGE_LIST.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    if not KINDS_MD.is_file():
        return snapshot, f"{IMAGE_LIST.name} ({KINDS_MD} not at hand to compare)"
    line = next((s for s in KINDS_MD.read_text().splitlines() if "Packages:" in s), "")
    kinds = {norm(n.strip().rstrip(".")) for n in line.partition("Packages:")[2].split(",") if n.strip()}
    if kinds and kinds != snapshot:
        return kinds, (f"KINDS.md differs from {IMAGE_LIST.name} (+{sorted(kinds - snapshot)} "
                       f"-{sorted(snapshot - kinds)}): used KINDS.md; update the snapshot")
    return snapshot, f"{IMAGE_LIST.name} = KINDS.md"


# ----------------------------------------------------------------------------- the import check

def import_edges(log: Path) -> set[tuple[str, str | None]]:
    """(module, the top-level module that imported it) for every import a `python -X importtime`
    child wrote to its log; None where it was imported at run time, not while another module
    loaded. importtime prints each module after those it imported, one indent deeper: read
    backwards, the lines above on the stack are the importers."""
    edges = set()
    stack: list[tuple[int, str]] = []
    lines = [s for s in log.read_text(errors="replace").splitlines() if s.startswith("import time:") and "|" in s]
    for line in reversed(lines):
        name = line.rsplit("|", 1)[1]
        depth, top = len(name) - len(name.lstrip()), name.strip().split(".")[0]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        importer = next((t for _, t in reversed(stack) if t != top), None)
        edges.add((top, importer))
        stack.append((depth, top))
    return edges


def classify_imports(logs: list[Path], image: set[str], carried: set[str]) -> tuple[bool, str]:
    """Every distribution the traced runs imported must be on the image or carried. One that is
    neither may stay behind only when just image packages (or others left behind) imported it:
    those are other versions here, whose optional or newer needs the image's own do not share
    (transformers here imports httpx2 through huggingface_hub 2; torch tries zstandard). What the
    project imports, at load or at run time, or a carried wheel imports, must travel."""
    # The project itself travels as the working tree: its editable install here is not a wheel to carry.
    project = norm(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    owners = {m: d for m, d in md.packages_distributions().items() if norm(d[0]) != project}

    def dist(module: str | None) -> str:
        if module is None or module not in owners:
            return "(project or run time)"  # stdlib modules import no third-party code that the image lacks
        return norm(owners[module][0])

    importers: dict[str, set[str]] = {}
    for log in logs:
        for module, importer in import_edges(log):
            if module in owners:
                d = dist(module)
                if dist(importer) != d:
                    importers.setdefault(d, set()).add(dist(importer))
                else:
                    importers.setdefault(d, set())
    here_only: dict[str, str] = {}
    changed = True
    while changed:  # a chain (httpx2 -> httpcore2 -> sniffio) resolves over several passes
        changed = False
        for d in sorted(set(importers) - image - carried - set(here_only)):
            users = importers[d]
            if users and users <= image | set(here_only):
                here_only[d] = ", ".join(sorted(users))
                changed = True
    dists = set(importers)
    missing = sorted(dists - image - carried - set(here_only))
    counts = (f"{len(dists)} distributions imported: {len(dists & carried)} carried, "
              f"{len((dists & image) - carried)} on the image, {len(here_only)} only here")
    if missing:
        return False, (f"{counts}; NOT on the image and not carried: "
                       f"{', '.join(f'{d} (by {sorted(importers[d])})' for d in missing)}; add them to WHEELS")
    return True, counts + (f" ({'; '.join(f'{d} by {u}' for d, u in here_only.items())})" if here_only else "")


# ----------------------------------------------------------------------------- modes

def print_checks(checks: list[tuple[str, bool, str]]) -> None:
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail} |")


def run_call() -> dict:
    return {"command": RUN_COMMAND, "carry": list(CARRY), "timeout_s": TIMEOUT_S}


def write_head(dst: Path) -> Path:
    """The header and first DRY_ROWS rows of ETTh1, named so that the ratio split applies to them."""
    src = ROOT / DATA_DIR / "ETTh1.csv"
    src = src if src.is_file() else source_data_dir() / "ETTh1.csv"
    with open(src, encoding="utf-8") as fh:
        dst.write_text("".join(line for _, line in zip(range(DRY_ROWS + 1), fh)), encoding="utf-8")
    return dst


def dry_run(work: Path) -> int:
    t0 = time.monotonic()
    checks = [("wheels (.whl)", *check_wheels()), ("wheel tags", *check_wheel_tags()),
              ("data (.devdata)", *check_data()), ("what travels", *check_travel())]
    call = run_call()
    checks.append(("run call", len(call["command"]) <= COMMAND_LIMIT and len(call["carry"]) <= CARRY_PATHS_LIMIT,
                   f"command {len(call['command'])} chars, carry {len(call['carry'])} paths, "
                   f"timeout_s {call['timeout_s']}"))
    head = write_head(work / "dryrun_head_ETTh1.csv")
    # The CPU's pace is not the GPU's: the caps of the GPU run would cut a contended dry run short.
    results = execute("cpu", work, DRY_SETS + [f"data.path={head}"], trace=True, budget_s=3600,
                      caps=dict.fromkeys(CAPS, 900))
    print("\nThe report the GPU run prints (here: 2 CPU steps per run on 2000 rows, so the numbers mean nothing):")
    report(results, work, work)
    for r in results["runs"]:
        checks.append((f"train {r['tag']} (2 steps, CPU)", r["status"] == "ok",
                       f"{r['status']}, amp {r.get('amp')}, {r['wall_s']} s" +
                       (f": {r.get('error')}" if r["status"] != "ok" else "")))
    checks.append(("LLM path (NF4 on CPU)", *llm_verdict(results["llm"] or {"error": "not run"})))
    image, source = image_packages()
    checks.append(("image package list", True, source))
    logs = [Path(r["log"]) for r in results["runs"]] + ([Path(results["llm"]["log"])] if results["llm"] else [])
    checks.append(("imports there", *classify_imports(logs, image, set(wanted_wheels()))))
    print_checks(checks)
    ready = all(ok for _, ok, _ in checks)
    print(f"\ndry run: {time.monotonic() - t0:.0f} s; carry {mib(sum(travel_bytes().values()))} in all; "
          f"{'READY' if ready else 'NOT READY'} for the GPU")
    print("\nThe device tool's run call, from the repository root of the checkout your session started in "
          "(the tool sends that one; prepare .whl and .devdata there):")
    print(json.dumps(call))
    return 0 if ready else 1


def machine_info() -> str:
    import torch
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads"
    smi = shutil.which("nvidia-smi")
    line = subprocess.run([smi, "--query-gpu=name,driver_version,memory.used,memory.total,clocks.sm",
                           "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if smi else ""
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}; "
            f"nvidia-smi: {line or 'not found'}")


def versions() -> str:
    out = []
    for n in ("torch", "transformers", "tokenizers", "peft", "accelerate", *WHEELS):
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            out.append(f"{n} MISSING")
    return ", ".join(out)


def report(results: dict, work: Path, out: Path) -> bool:
    """Print the tables; save device_check.json and runs.tar.gz (logs and metrics) into `out`."""
    info, pkgs = machine_info(), versions()
    (out / "device_check.json").write_text(json.dumps({"machine": info, "versions": pkgs, **results},
                                                      indent=1, default=str))
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:  # the device tool returns at most 8 files
        for p in sorted(work.rglob("*")):
            if p.suffix in (".log", ".json") and p.stat().st_size < 4 * 2**20:
                tar.add(p, arcname=str(p.relative_to(work)))
    print(f"\n{info}\n{pkgs}\n")
    print("\n".join(runs_table(results["runs"])))
    print("\n".join(llm_lines(results["llm"])))
    for s in results["skipped"]:
        print(f"skipped: {s}")
    return all(r["status"] == "ok" for r in results["runs"]) and not results["skipped"] and \
        llm_verdict(results["llm"] or {"error": "not run"})[0]


def gpu_run(work: Path, budget_s: float) -> int:
    if not has_cuda():
        raise SystemExit("torch sees no CUDA device: this mode is for the lent GPU machine; here run --dry-run")
    t0 = time.monotonic()
    print(f"{machine_info()}\n{versions()}", flush=True)
    results = execute("cuda", work, [], trace=False, budget_s=budget_s)
    ok = report(results, work, Path(os.environ.get("OUT") or work))  # $OUT: what the device tool brings back
    print(f"\ndevice check: {time.monotonic() - t0:.0f} s, {'all ok' if ok else 'NOT all ok'}; "
          f"in $OUT: device_check.json, runs.tar.gz (logs, metrics), device_check.log")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="download the wheels and copy the data into the carry")
    p.add_argument("--dry-run", action="store_true", help="check everything here on the CPU; print the run call")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="the GPU run's own deadline")
    p.add_argument("--work", type=Path, default=None, help="folder for runs and logs (default: a new temp folder)")
    p.add_argument("--llm-part", choices=["cpu", "cuda"], help=argparse.SUPPRESS)  # the child of llm_subprocess
    args = p.parse_args(argv)
    if args.llm_part:
        return llm_child(args.llm_part, args.work)
    if args.prepare:
        prepare()
        if not args.dry_run:
            return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="device_check_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    if not args.dry_run:
        return gpu_run(work, args.budget_s)
    rc = dry_run(work)
    if rc == 0 and args.work is None:  # its checkpoints take ~50 MB; a failed one is kept to read its logs
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
