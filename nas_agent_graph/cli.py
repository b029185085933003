"""Command line: the search, and the check / status / report / export-optuna / ensemble subcommands.

    python -m nas_agent_graph --max-runs 100 [--proposer hybrid|llm|tpe|cmaes|random] [--llm MODEL] [--config config.py]
                               [--runs-dir runs] [--state agent_state.json] [--seed N] [--set key=value ...]
    python -m nas_agent_graph check CONFIG [--model FILE]
    python -m nas_agent_graph status
    python -m nas_agent_graph report
    python -m nas_agent_graph ensemble [--pool N] [--steps K] [--top-only] [--bags B] [--seeds K]
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import math
import os
import signal
import sqlite3
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import replace
from pathlib import Path

from langgraph.checkpoint.sqlite import SqliteSaver
from rich.console import Console

from nas_agent.agent_state import AgentState, AgentStateError, load_agent_state
from nas_agent.config import ConfigError, apply_overrides, load_config, validate_config
from nas_agent.run_manager import ids_in_order
from nas_agent_graph import ensemble
from nas_agent_graph.archetypes import DEFAULT_ARCHETYPES, ArchetypeProposer, load_archetypes
from nas_agent_graph.context import Context
from nas_agent_graph.disk import disk_full_message, full_disk_error
from nas_agent_graph.display import PlainDisplay, RichDisplay
from nas_agent_graph.ensemble import DEFAULT_BAGS, DEFAULT_POOL, DEFAULT_STEPS
from nas_agent_graph.limits import CapError, default_lora_memory_gb, default_run_memory_gb, parse_memory_gb, smoke_caps
from nas_agent_graph.llm.backend import DEFAULT_GENERATION, LLMError
from nas_agent_graph.lock import LockHeld, StudyLock
from nas_agent_graph.lora.adapters import LoraSettings
from nas_agent_graph.optuna_mirror import db_path, rebuild
from nas_agent_graph.phases import phase_log, timed_saver
from nas_agent_graph.prompting import PromptError, PromptLimits
from nas_agent_graph.proposers import make_proposer, route_optuna_logging
from nas_agent_graph.report import render_status, write_report
from nas_agent_graph.retention import DEFAULT_KEEP
from nas_agent_graph.search_space import SpaceError, load_space
from nas_agent_graph.unrecorded import describe, unrecorded_runs
from nas_agent_graph.validation import check_proposal

log = logging.getLogger(__name__)

PROPOSERS = ("auto", "hybrid", "llm", "tpe", "cmaes", "random")
LLM_PROPOSERS = ("hybrid", "llm")
GEN_KEYS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int}
SUBCOMMANDS = ("check", "status", "report", "export-optuna", "ensemble")
USAGE_ERROR = 2
# Seconds of training per run by default: with start-up, evaluation and the proposal, a run takes
# about 5 minutes, so the README's 100-run search ends within 10 hours on a 2-core CPU.
DEFAULT_RUN_BUDGET_S = 240


# --------------------------------------------------------------------------- arguments

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, default=Context.state_path, help="study file (default: %(default)s)")
    p.add_argument("--runs-dir", type=Path, default=Context.runs_dir, help="run folders (default: %(default)s)")


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nas_agent_graph",
                                description="Search Informer configs by training them. Subcommands: "
                                            "check CONFIG, status, report, export-optuna (each has --help).")
    _common(p)
    p.add_argument("--max-runs", type=int, default=Context.max_runs, help="total runs in the study, earlier sessions included")
    p.add_argument("--proposer", choices=PROPOSERS, default="auto",
                   help="auto (default): hybrid with a GPU, tpe on the CPU (see docs/llm.md); hybrid: the LLM picks "
                        "or edits the sampler's candidates; llm: the LLM alone; tpe, cmaes, random: Optuna alone, "
                        "no model is loaded")
    p.add_argument("--config", type=Path, default=Context.config_path,
                   help="the incumbent config; a new study starts from it, accepted runs replace it")
    p.add_argument("--seed", type=int, default=Context.seed, help="proposer seed: the same seed reproduces the proposals")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every run, e.g. --set training.max_epochs=3 for a quick search")
    p.add_argument("--run-budget", default=str(DEFAULT_RUN_BUDGET_S), metavar="SECONDS|none",
                   help="seconds of every run for training and its final evaluation (training.time_budget_s), so runs "
                        "compare and 100 runs "
                        "fit a night on a CPU; --set training.time_budget_s wins; 'none': each run trains to its "
                        "max_epochs (default: %(default)s)")
    p.add_argument("--space", type=Path, default=None, help="JSON file that narrows or extends the search space")
    p.add_argument("--warm-start", nargs="+", default=None, metavar="off|FILE",
                   help="configs trained right after the baseline, one run each: 'off', or config files "
                        "(default: the shipped configs/ of DLinear, PatchTST, iTransformer and TSMixer, when "
                        "the search space searches the architecture)")
    llm = p.add_argument_group("LLM (proposers hybrid and llm)")
    llm.add_argument("--llm", default=None, metavar="MODEL",
                     help="Hugging Face id (e.g. deepseek-ai/deepseek-coder-6.7b-instruct) or local directory; "
                          "default: $NAS_LLM, else the embedded Gemma-3-270M")
    llm.add_argument("--llm-quant", choices=("4bit", "8bit", "none"), default=None,
                     help="bitsandbytes quantization (default: 4bit on CUDA, none on the CPU)")
    llm.add_argument("--gen", action="append", default=[], metavar="KEY=VALUE",
                     help=f"generation setting: {', '.join(GEN_KEYS)} (default "
                          f"{' '.join(f'{k}={v}' for k, v in DEFAULT_GENERATION.items())})")
    llm.add_argument("--sampler", choices=("tpe", "cmaes", "random"), default=Context.sampler, help="hybrid's Optuna sampler")
    llm.add_argument("--sampler-fraction", type=float, default=Context.sampler_fraction,
                     help="hybrid: fraction of runs from the sampler alone (default: %(default)s)")
    llm.add_argument("--candidates", type=int, default=Context.n_candidates, help="hybrid: sampler candidates shown to the LLM")
    llm.add_argument("--prompt-tokens", type=int, default=Context.prompt_tokens, help="upper bound on a prompt, in tokens")
    llm.add_argument("--allow-code", action="store_true",
                     help="let the LLM propose model code (a new model.py) for some runs")
    llm.add_argument("--lora", action="append", default=[], metavar="KEY=VALUE",
                     help="LoRA self-improvement settings, e.g. trigger=10 steps=40 reward_threshold=0.7; "
                          "'off' disables it (see nas_agent_graph/lora/adapters.py)")
    par = p.add_argument_group("parallel runs")
    par.add_argument("--parallel", type=int, default=Context.parallel, metavar="N",
                     help="runs at once: one GPU each round-robin, or a share of the CPU cores (default: 1)")
    par.add_argument("--launcher", choices=("local", "ray"), default=Context.launcher,
                     help="local: train.py subprocesses here; ray: one Ray task per run (pip install -r "
                          "requirements-ray.txt)")
    par.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="with --launcher ray: the cluster to join (default: start a local one)")
    par.add_argument("--ray-resources", default=None, metavar="CPUS,GPUS",
                     help="with --launcher ray: each run's resources (default: 1 CPU, 1 GPU if the cluster has any)")
    limits = p.add_argument_group("limits and stopping")
    limits.add_argument("--run-timeout", type=float, default=None, help="seconds per train.py; the process is killed")
    limits.add_argument("--max-params", type=int, default=None, help="reject proposals with more parameters")
    limits.add_argument("--min-delta", type=float, default=Context.min_delta, help="accept when val_mse < best - min_delta")
    limits.add_argument("--patience", type=int, default=None, help="stop after N runs without improvement")
    limits.add_argument("--time-budget", type=float, default=None, help="stop after N seconds of study time")
    limits.add_argument("--target-mse", type=float, default=None, help="stop once best val_mse <= this")
    limits.add_argument("--max-retries", type=int, default=Context.max_retries, help="invalid proposals per run before stopping")
    limits.add_argument("--max-failures", type=int, default=Context.max_failures, help="failed runs in a row before stopping (runs too slow for the run budget "
                        "do not count, but twice as many of them in a row stop it too)")
    limits.add_argument("--smoke-timeout", type=float, default=Context.smoke_timeout, help="seconds for a proposal's smoke test")
    limits.add_argument("--run-memory", default=None, metavar="GB|off", help=RUN_MEMORY_HELP)
    limits.add_argument("--keep-checkpoints", default=None, metavar="N|all",
                        help="keep best_model.pth of every incumbent, of the N best runs and of each model "
                             "family's best, delete the other finished runs' (their metrics, history and config stay); "
                             "'all' keeps every one (default: %d)" % DEFAULT_KEEP)
    limits.add_argument("--ensemble", default=str(DEFAULT_POOL), metavar="N|off",
                        help="when the study ends, average the forecasts of a selection of its N best runs "
                             "and each model family's best (chosen on validation MSE) into runs/ensemble.json "
                             "(default: %d)" % DEFAULT_POOL)
    limits.add_argument("--confirm-seeds", type=int, default=Context.confirm_seeds, metavar="K",
                        help="accept a better run only after K seeds of it and of the incumbent agree "
                             "(one-sided Welch's t-test); 1 = off (default)")
    limits.add_argument("--prune", choices=("none", "median", "asha"), default=Context.prune,
                        help="stop runs whose learning curve looks worse than earlier runs' (default: none)")
    limits.add_argument("--prune-warmup", default=f"{Context.prune_warmup_epochs},{Context.prune_min_runs}", metavar="EPOCHS,RUNS",
                        help="never prune at an epoch <= EPOCHS, nor before RUNS runs finished (default: 1,3)")
    return p


def parse_generation(items: list[str]) -> dict:
    """--gen KEY=VALUE items as {key: typed value}; a bad item is a ConfigError saying which."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in GEN_KEYS:
            raise ConfigError(f"--gen {item!r}: expected KEY=VALUE with KEY one of {', '.join(GEN_KEYS)}")
        try:
            out[key] = GEN_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"--gen {item!r}: {value!r} is not a valid {GEN_KEYS[key].__name__}") from None
    merged = {**DEFAULT_GENERATION, **out}
    if merged["temperature"] < 0 or not 0 < merged["top_p"] <= 1 or merged["max_new_tokens"] < 1:
        raise ConfigError(f"--gen: out of range in {out} (temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1)")
    return out


def parse_prune_warmup(text: str) -> tuple[int, int]:
    """--prune-warmup EPOCHS,RUNS as two integers; a bad value is a ConfigError saying why."""
    parts = text.split(",")
    try:
        epochs, runs = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--prune-warmup {text!r}: expected EPOCHS,RUNS as two integers, e.g. 1,3") from None
    if epochs < 0 or runs < 1:
        raise ConfigError(f"--prune-warmup {text!r}: expected EPOCHS >= 0 and RUNS >= 1")
    return epochs, runs


def resolve_proposer(name: str) -> str:
    """--proposer auto: the hybrid LLM proposer where it pays (a GPU: a proposal in seconds), TPE on
    the CPU, where the embedded LLM did not beat TPE in the measured arms (docs/llm.md)."""
    if name != "auto":
        return name
    import torch

    return "hybrid" if torch.cuda.is_available() else "tpe"


def with_run_budget(overrides: list[str], budget: str) -> list[str]:
    """--set items plus training.time_budget_s=BUDGET, unless they set it or BUDGET is 'none'."""
    if budget.strip().lower() == "none":
        return list(overrides)
    try:
        seconds = float(budget)
    except ValueError:
        raise ConfigError(f"--run-budget {budget!r}: expected seconds (e.g. 240) or 'none'") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--run-budget {budget!r}: expected a positive number of seconds, or 'none'")
    if any(item.partition("=")[0].strip() == "training.time_budget_s" for item in overrides):
        return list(overrides)
    return [*overrides, f"training.time_budget_s={seconds:g}"]


def parse_keep_checkpoints(text: str | None) -> int | None:
    """--keep-checkpoints N|all: N >= 0, or None for 'all'; a bad value is a ConfigError saying why."""
    if text is None:
        return DEFAULT_KEEP
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--keep-checkpoints {text!r}: expected a number of runs (e.g. {DEFAULT_KEEP}) "
                          "or 'all'") from None
    if n < 0:
        raise ConfigError(f"--keep-checkpoints {text!r}: expected 0 or more runs (0 keeps only the "
                          "checkpoints of incumbents, pending candidates and each family's best), or 'all'")
    return n


def parse_ensemble(text: str) -> int | None:
    """--ensemble N|off: a pool of N >= 1 runs, or None for off."""
    if text.strip().lower() == "off":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--ensemble {text!r}: expected a number of runs >= 1 (e.g. {DEFAULT_POOL}) or 'off'")
    return n


def parse_warm_start(items: list[str] | None) -> tuple[Path, ...]:
    """--warm-start: None = the shipped archetypes, ['off'] = none, else the files given."""

    if items is None:
        return DEFAULT_ARCHETYPES
    if items == ["off"]:
        return ()
    if "off" in items:
        raise ConfigError(f"--warm-start {' '.join(items)}: 'off' cannot be combined with files")
    missing = [i for i in items if not Path(i).is_file()]
    if missing:
        raise ConfigError(f"--warm-start: no such config file: {', '.join(missing)} (give config files, or 'off')")
    return tuple(Path(i) for i in items)


RUN_MEMORY_HELP = ("memory cap of each smoke test and train.py run, in GB (default: the available memory "
                   "less 3 GB for the orchestrator and LLM, divided by --parallel; see docs/search.md)")


def parse_run_memory(text: str | None, parallel: int) -> float | None:
    """--run-memory GB|off (None: the default for --parallel); a bad value is a ConfigError saying why."""

    try:
        return default_run_memory_gb(parallel) if text is None else parse_memory_gb(text, "--run-memory", None)
    except CapError as e:
        raise ConfigError(str(e)) from None


def parse_ray_resources(text: str | None) -> dict:
    """--ray-resources CPUS,GPUS as Ray task options ({} when not given); a bad value is a ConfigError."""
    if text is None:
        return {}
    try:
        cpus, gpus = (float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--ray-resources {text!r}: expected CPUS,GPUS as two numbers, e.g. 4,1") from None
    if not (math.isfinite(cpus) and math.isfinite(gpus)) or cpus <= 0 or gpus < 0:
        raise ConfigError(f"--ray-resources {text!r}: expected CPUS > 0 and GPUS >= 0")
    return {"num_cpus": cpus, "num_gpus": gpus}


def context_from_args(a: argparse.Namespace) -> Context:
    if a.max_runs < 1:
        raise ConfigError(f"--max-runs must be >= 1, got {a.max_runs}")
    if not 0.0 <= a.sampler_fraction <= 1.0:
        raise ConfigError(f"--sampler-fraction must be in [0, 1], got {a.sampler_fraction}")
    if not 1 <= a.candidates <= 16:
        raise ConfigError(f"--candidates must be in [1, 16], got {a.candidates}")
    if a.prompt_tokens < 256:
        raise ConfigError(f"--prompt-tokens must be >= 256, got {a.prompt_tokens}")
    proposer = resolve_proposer(a.proposer)
    if a.allow_code and proposer not in LLM_PROPOSERS:
        raise ConfigError(f"--allow-code needs an LLM proposer (--proposer hybrid or llm), got --proposer {a.proposer}"
                          + (f" (which is {proposer} here)" if a.proposer == "auto" else ""))
    warmup_epochs, min_runs = parse_prune_warmup(a.prune_warmup)
    if not 1 <= a.parallel <= 256:
        raise ConfigError(f"--parallel must be in [1, 256], got {a.parallel}")
    if a.launcher != "ray" and (a.ray_address or a.ray_resources):
        raise ConfigError("--ray-address and --ray-resources need --launcher ray")
    if not 1 <= a.confirm_seeds <= 20:
        raise ConfigError(f"--confirm-seeds must be in [1, 20], got {a.confirm_seeds}")
    try:
        lora = LoraSettings.from_items(a.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_memory = parse_run_memory(a.run_memory, a.parallel)
    if lora.memory_gb is None:  # the fine-tune's own default: it peaks at ~8.2 GB on the CPU
        lora = replace(lora, memory_gb=default_lora_memory_gb(run_memory))
    return Context(state_path=a.state, runs_dir=a.runs_dir, config_path=a.config, max_runs=a.max_runs,
                   proposer=proposer, seed=a.seed, overrides=with_run_budget(a.set, a.run_budget),
                   space_path=a.space,
                   warm_start=parse_warm_start(a.warm_start),
                   run_timeout=a.run_timeout, max_params=a.max_params, min_delta=a.min_delta, patience=a.patience,
                   time_budget=a.time_budget, target_mse=a.target_mse, max_retries=a.max_retries,
                   max_failures=a.max_failures, smoke_timeout=a.smoke_timeout, prune=a.prune,
                   run_memory_gb=run_memory, keep_checkpoints=parse_keep_checkpoints(a.keep_checkpoints),
                   optuna_mirror=True,
                   confirm_seeds=a.confirm_seeds, ensemble_pool=parse_ensemble(a.ensemble),
                   prune_warmup_epochs=warmup_epochs, prune_min_runs=min_runs,
                   llm=a.llm or os.environ.get("NAS_LLM") or None, llm_quant=a.llm_quant,
                   generation=parse_generation(a.gen), sampler=a.sampler, sampler_fraction=a.sampler_fraction,
                   n_candidates=a.candidates, prompt_tokens=a.prompt_tokens, allow_code=a.allow_code, lora=lora,
                   parallel=a.parallel, launcher=a.launcher, ray_address=a.ray_address,
                   ray_options=parse_ray_resources(a.ray_resources))


def build_proposer(ctx: Context):
    """The proposer the context asks for; an LLM is loaded here, so a bad --llm fails before any run."""

    if ctx.proposer not in LLM_PROPOSERS:
        return make_proposer(ctx.proposer, ctx.session.space, ctx.seed)
    # Lazy: transformers and the model load only for an LLM proposer.
    from nas_agent_graph.llm.chat_model import LocalChatModel
    from nas_agent_graph.llm.proposer import LLMProposer

    chat = LocalChatModel(model_spec=ctx.llm, quant=ctx.llm_quant, **ctx.generation)
    _, _, info = chat.load()
    log.info("LLM %s (%s, %s on %s) loaded in %.1fs", info["model"], info["dtype"], info["quant"], info["device"],
             info["load_s"])
    ctx.session.free_llm = str(info["device"]).startswith("cuda")  # the LLM and the runs share the GPU
    sampler = make_proposer(ctx.sampler, ctx.session.space, ctx.seed) if ctx.proposer == "hybrid" else None
    return LLMProposer(chat, ctx.session.space, ctx.seed, limits=PromptLimits(max_tokens=ctx.prompt_tokens),
                       sampler=sampler, sampler_fraction=ctx.sampler_fraction, n_candidates=ctx.n_candidates,
                       allow_code=ctx.allow_code, code_fraction=ctx.code_fraction, model_path=ctx.model_path,
                       overrides=ctx.overrides)


# --------------------------------------------------------------------------- the search

def thread_id(state_path: Path) -> str:
    """One checkpoint thread per study file."""
    return "study-" + hashlib.sha256(str(state_path.resolve()).encode()).hexdigest()[:12]


def checkpoint_agrees(values: dict, next_nodes: tuple, study: AgentState) -> bool:
    """Whether a pending checkpoint fits agent_state.json, which always wins.

    Run ids are handed out in order, so the recorded runs, the runs in flight and the pass's own
    run must be exactly run_0000 .. run_N without overlap; the pass's run may already be recorded
    only at decide/collect_lora/stop (a crash after the save, before the checkpoint).
    """

    run_id = values.get("run_id")
    if run_id is None:
        return False  # no run started in this pass: redo it from load_state, which re-checks the stop rules
    recorded = {r.run_id for r in study.runs}
    flying = [e["run_id"] for e in values.get("in_flight") or []]
    if set(flying) & recorded or run_id in flying or len(set(flying)) < len(flying):
        return False
    after_save = bool(set(next_nodes) & {"decide", "collect_lora", "stop"})
    if run_id in recorded and not after_save:
        return False
    return ids_in_order(recorded | set(flying) | {run_id})


def check_overrides(study: AgentState, ctx: Context) -> None:
    """The starting config (a new study's config file, or a resumed study's base config) with
    every --set applied must validate, before any model loads or proposal is made: a --set that
    breaks every config (model.dmodel=32) is a usage error, not a string of rejected proposals."""
    if "created_at" not in study.meta:
        load_config(ctx.config_path, ctx.overrides)  # names the file and the --set items
        return
    where = f"the base config in {ctx.state_path}" + (f" with --set {' '.join(ctx.overrides)}" if ctx.overrides else "")
    validate_config(apply_overrides(study.meta["base_config"], ctx.overrides), where=where)


def run_search(ctx: Context) -> int:

    route_optuna_logging()
    note_ignored_sigint()
    with StudyLock(ctx.state_path):
        study = load_agent_state(ctx.state_path)  # a corrupt file stops us here, untouched
        check_overrides(study, ctx)
        ctx.runs_dir.mkdir(parents=True, exist_ok=True)
        ctx.session.space = ctx.session.space or load_space(ctx.space_path)
        if ctx.warm_start == DEFAULT_ARCHETYPES and not ctx.session.space.searches_architecture():
            # A space that fixes the family (spaces/informer.json) asks for that family only.
            log.info("warm start off: the search space fixes the architecture; give --warm-start FILE... "
                     "to train configs first anyway")
        elif ctx.warm_start and ctx.session.archetypes is None:  # a bad file fails here, before any run
            ctx.session.archetypes = ArchetypeProposer(load_archetypes(ctx.warm_start))
        try:
            ctx = _start_launcher(ctx)  # a wrong Ray address or resources fail here, before the LLM loads
            ctx.session.proposer = ctx.session.proposer or build_proposer(ctx)
            rc = _search(ctx, study)
        finally:
            _stop_launcher(ctx)
        if ctx.ensemble_pool:
            _ensemble(ctx.state_path, ctx.runs_dir, ctx.ensemble_pool, DEFAULT_STEPS, bags=DEFAULT_BAGS)
        return rc


def note_ignored_sigint() -> bool:
    """Say how to stop a search that cannot get Ctrl-C. A process started in the background by a
    shell without job control (`cmd &` in a script, `nohup`) inherits SIGINT ignored, and Python
    keeps it so: SIGINT does nothing. SIGTERM (`kill PID`) still stops it safely: the kernel sends
    each train.py SIGTERM (see process.py), and a resume reruns the runs it stopped."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return False
    log.info("SIGINT is ignored in this process (started in the background); stop the search with "
             "`kill %d` (SIGTERM), and run the same command again to resume", os.getpid())
    return True


def _ensemble(state_path: Path, runs_dir: Path, pool: int, steps: int, *, bags: int, families: bool = True,
              seeds: int = 0) -> dict | None:
    """Build, write and print the study's ensemble; a study that has none is not an error."""
    try:
        record = ensemble.build(load_agent_state(state_path), runs_dir, pool=pool, steps=steps, families=families,
                                bags=bags, seeds=seeds)
    except ensemble.EnsembleError as e:
        log.warning("no ensemble: %s", e)
        return None
    path = ensemble.write(record, runs_dir)
    print(f"wrote {path}\n{ensemble.summary(record)}")
    return record


def open_checkpoints(path: Path, state_path: Path) -> sqlite3.Connection:
    """The checkpoint database, opened. It only mirrors progress (agent_state.json and the run
    folders are the truth), so one that SQLite cannot read is moved aside, with a warning naming
    the new file, and the search starts a fresh pass from agent_state.json instead of stopping."""
    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems[:3]))
        return _fewer_fsyncs(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        aside = path.with_name(f"{path.stem}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        for suffix in ("-wal", "-shm", "-journal"):  # SQLite's side files belong to the bad copy
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        os.replace(path, aside)
        log.warning("%s is not a readable checkpoint database (%s); moved it to %s and resuming from %s "
                    "and the run folders", path, e, aside.name, state_path)
        return _fewer_fsyncs(sqlite3.connect(path, check_same_thread=False))


def _fewer_fsyncs(conn: sqlite3.Connection) -> sqlite3.Connection:
    """WAL with synchronous=NORMAL: a commit is one write to the log, no fsync (only SQLite's own
    checkpoints of the log sync). A killed orchestrator loses nothing (the log is in the OS's
    cache); a power cut may lose the last few checkpoints, never the database's consistency. A
    checkpoint that lags agent_state.json is what a crash between a save and a checkpoint leaves
    anyway: every node is safe to re-run, and one that disagrees starts a fresh pass (see
    checkpoint_agrees). That saves ~14 fsyncs per run."""
    conn.execute("PRAGMA journal_mode=WAL")  # what SqliteSaver.setup sets, set before the first commit
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _search(ctx: Context, study: AgentState) -> int:
    """Run the graph (resuming its checkpoint when it agrees with the study) to its stop."""
    from nas_agent_graph.graph import build_graph  # lazy: langgraph's graph and torch, for a search only

    ctx.session.started_at = time.monotonic()
    display = ctx.session.display or (RichDisplay(runs_dir=ctx.runs_dir, parallel=ctx.parallel) if sys.stderr.isatty()
                              else PlainDisplay())
    ctx.session.display = display
    with closing(open_checkpoints(ctx.checkpoint_path, ctx.state_path)) as conn, \
            (display if isinstance(display, RichDisplay) else nullcontext()):
        graph = build_graph(timed_saver(SqliteSaver(conn), phase_log(ctx)))
        cfg = {"configurable": {"thread_id": thread_id(ctx.state_path)}}
        snap = graph.get_state(cfg)
        # Steps left: each run left to propose, and each run in flight to collect (a resume may
        # hold more than --max-runs leaves room for: they are drained, not dropped).
        remaining = max(ctx.max_runs - len(study.runs), 0) + len(snap.values.get("in_flight") or []) + 1
        # A run: up to 8 steps; a rejected proposal: 2 (validate) or 5 (an in-run smoke test, reject_run).
        cfg["recursion_limit"] = 50 + remaining * (8 + 5 * (ctx.max_retries + 1))
        resume = bool(snap.next) and checkpoint_agrees(snap.values, snap.next, study)
        if snap.next and snap.values.get("run_id") is None:
            log.info("the interrupted pass had not started a run yet; starting it again")
        elif snap.next and not resume:
            log.warning("the checkpoint (at %s, %s) disagrees with %s, which wins: starting a fresh pass",
                        snap.next, snap.values.get("run_id"), ctx.state_path)
        elif resume:
            log.info("resuming at %s for %s", snap.next[0], snap.values.get("run_id"))
        try:
            final = graph.invoke(None if resume else {}, cfg, context=ctx, durability="sync")
        except sqlite3.OperationalError as e:
            if "full" not in str(e):  # SQLITE_FULL: "database or disk is full"
                raise
            raise OSError(errno.ENOSPC, f"the checkpoint database refused a write ({e})",
                          str(ctx.checkpoint_path)) from e
    return 1 if final.get("stop_failed") else 0


def _start_launcher(ctx: Context) -> Context:
    """With --launcher ray: join (or start) the cluster now, so a wrong address fails before any run;
    the settings with each run's resources filled in from the cluster's."""
    if ctx.launcher != "ray":
        return ctx
    from nas_agent_graph.ray_launcher import check_resources, connect  # lazy: Ray is optional

    try:
        resources = connect(ctx.ray_address)
        options = {"num_cpus": 1, "num_gpus": 1 if resources.get("GPU", 0) >= 1 else 0, **ctx.ray_options}
        check_resources(options["num_cpus"], options["num_gpus"])
    except (ImportError, ValueError, RuntimeError, ConnectionError) as e:
        raise ConfigError(f"--launcher ray: {e}") from None
    log.info("Ray cluster %s: %s; each run asks for %s", ctx.ray_address or "(local)", resources, options)
    return replace(ctx, ray_options=options)


def _stop_launcher(ctx: Context) -> None:
    """Stop the runs still in flight (a crash or Ctrl-C; a resume reruns them) and leave Ray."""
    if ctx.session.pool is not None:
        ctx.session.pool.shutdown()
    if ctx.launcher == "ray":
        from nas_agent_graph.ray_launcher import shutdown  # lazy: Ray is optional

        shutdown()


# --------------------------------------------------------------------------- subcommands

def cmd_check(argv: list[str]) -> int:

    p = argparse.ArgumentParser(prog="python -m nas_agent_graph check",
                                description="Run the loop's validation on a config, without training. "
                                            "Exit 0 if it would be accepted for a run, 1 otherwise.")
    p.add_argument("config", type=Path)
    p.add_argument("--model", type=Path, default=None, help="a model file defining build_model(config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-params", type=int, default=None)
    p.add_argument("--smoke-timeout", type=float, default=Context.smoke_timeout)
    p.add_argument("--run-memory", default=None, metavar="GB|off", help=RUN_MEMORY_HELP)
    _common(p)
    a = p.parse_args(argv)
    caps = smoke_caps(parse_run_memory(a.run_memory, 1), a.smoke_timeout)
    try:
        cfg = load_config(a.config, a.set)
    except ConfigError as e:
        print(f"REJECTED: {e}")
        return 1
    study = load_agent_state(a.state) if a.state.exists() else None
    verdict = check_proposal(cfg.model_dump(), study, python=sys.executable, smoke_timeout=a.smoke_timeout,
                             max_params=a.max_params, model_file=a.model and a.model.resolve(), caps=caps)
    if verdict.ok:
        print(f"OK: {a.config} would be accepted for a run ({verdict.n_params:,} parameters, smoke test "
              f"{verdict.smoke_seconds:.1f}s{', no duplicate in ' + str(a.state) if study else ''})")
        return 0
    print(f"REJECTED: {a.config}")
    for err in verdict.errors:
        print(f"  - {err}")
    return 1


def cmd_status(argv: list[str]) -> int:

    p = argparse.ArgumentParser(prog="python -m nas_agent_graph status", description="Table of the study's runs.")
    _common(p)
    a = p.parse_args(argv)
    console = Console() if sys.stdout.isatty() else None  # colours on a terminal, plain text elsewhere
    study = load_agent_state(a.state)
    sys.stdout.write(render_status(study, console, state_path=a.state))
    record = ensemble.load(a.runs_dir)
    if record is not None:
        print(f"\nEnsemble ({a.runs_dir / ensemble.ENSEMBLE_FILE}, {record['created_at']}; "
              f"rebuild: {record['rebuild']}):\n{ensemble.summary(record)}")
    unrecorded = unrecorded_runs(study, a.runs_dir)
    if unrecorded:
        print(f"\nNot in {a.state} yet (a run is recorded when it ends):")
        for run in unrecorded:
            print(f"  {describe(run)}")
    return 0


def cmd_report(argv: list[str]) -> int:

    p = argparse.ArgumentParser(prog="python -m nas_agent_graph report",
                                description="Write an offline HTML report (default: runs/report.html).")
    _common(p)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    path = write_report(load_agent_state(a.state), a.runs_dir, out=a.out, state_path=a.state)
    print(f"wrote {path}")
    return 0


def cmd_export_optuna(argv: list[str]) -> int:

    p = argparse.ArgumentParser(prog="python -m nas_agent_graph export-optuna",
                                description="Rebuild runs/optuna.db from agent_state.json, for "
                                            "optuna-dashboard sqlite:///runs/optuna.db")
    _common(p)
    p.add_argument("--space", type=Path, default=None,
                   help="the study's search-space file (default: the one its last session used)")
    a = p.parse_args(argv)
    route_optuna_logging()
    study = load_agent_state(a.state)
    space_path = a.space or (Path(study.meta["space_path"]) if study.meta.get("space_path") else None)
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    n = rebuild(study, load_space(space_path), db_path(a.runs_dir), a.state)
    print(f"wrote {db_path(a.runs_dir)}: {n} trials; view it with optuna-dashboard sqlite:///{db_path(a.runs_dir)}")
    return 0


def cmd_ensemble(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m nas_agent_graph ensemble",
                                description="Select an ensemble of the study's best runs on validation MSE "
                                            "(forward selection, Caruana et al. 2004) and write runs/ensemble.json.")
    _common(p)
    p.add_argument("--pool", type=int, default=DEFAULT_POOL, help="the N best runs by val MSE to choose from, "
                   "beside each model family's best (those whose best_model.pth is kept; default %d)" % DEFAULT_POOL)
    p.add_argument("--top-only", action="store_true", help="choose from the N best runs only, not also from "
                   "each family's best (the library before family bests joined it)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="selection steps (default %d)" % DEFAULT_STEPS)
    p.add_argument("--bags", type=int, default=DEFAULT_BAGS, help="bagged selection: average the "
                   "selections over this many random halves of the library (Caruana et al. 2004; default %d); "
                   "0: one selection over all of it (the default before bagging won on held-out "
                   "validation, docs/search.md)" % DEFAULT_BAGS)
    p.add_argument("--seeds", type=int, default=0, help="seed averaging: after the selection, train each member "
                   f"again with this many more seeds (into RUNS/{ensemble.SEED_RUNS_DIR}/, capped like a run, reused "
                   "when done) and average its forecasts over its seeds; the weights stay (default 0: off)")
    a = p.parse_args(argv)
    if a.pool < 1 or a.steps < 1 or a.bags < 0 or a.seeds < 0:
        raise ConfigError(f"--pool and --steps must be >= 1, --bags and --seeds >= 0; got --pool {a.pool} "
                          f"--steps {a.steps} --bags {a.bags} --seeds {a.seeds}")
    with StudyLock(a.state):  # not while a search writes the study or deletes checkpoints
        return 0 if _ensemble(a.state, a.runs_dir, a.pool, a.steps, families=not a.top_only, bags=a.bags,
                              seeds=a.seeds) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return {"check": cmd_check, "status": cmd_status, "report": cmd_report,
                    "export-optuna": cmd_export_optuna, "ensemble": cmd_ensemble}[argv[0]](argv[1:])
        return run_search(context_from_args(search_parser().parse_args(argv)))
    except (AgentStateError, ConfigError, LockHeld, SpaceError, PromptError, LLMError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if (full := full_disk_error(e)) is None:
            raise
        print(disk_full_message(full), file=sys.stderr)  # a condition to fix, not a crash: no traceback
        return 1
