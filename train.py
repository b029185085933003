"""Train one Informer forecaster and leave a self-contained run folder.

    python train.py --config config.py --tag run_0000 [--set training.max_epochs=2] ...

writes runs/<tag>/: config_used.py (the effective config, re-runnable as is, in the key
spelling of --config: a config in the original nas_system's format gets one in that format),
history.json ({"best_epoch": N, "epochs": [one record per epoch]}, rewritten after every
epoch), learning_curve.png, best_model.pth (state_dict, config, scaler), forecasts.npz
(the best checkpoint's validation and test forecasts), train.log, and metrics.json, written
atomically and last, so its presence means the run finished. A greppable `key: value`
summary ends the output.

    python train.py --config configs/patchtst42.py --tag p42 --resume

keeps resume_state.pt in the run folder after every epoch and, when runs/<tag>/ holds an
unfinished run of the same config and model file (killed, interrupted, or failed for a passing
reason such as missing data), continues after its last completed epoch: weights, optimizer,
scheduler, early-stopping counter and RNG streams are restored, so on a CPU at the same thread
count, with no time budget cutting it, the result is the one an uninterrupted run gives. A
folder without a resume state is trained from the start.

    python train.py --config runs/<tag>/config_used.py --tag <tag> --predict FILE.npz

trains nothing: it writes the forecasts of runs/<tag>/best_model.pth for every validation and
test window to FILE.npz, as a run writes its forecasts.npz (for the study's ensemble).

Status vocabulary and exit codes:
    ok           0   trained to early stopping or max_epochs; best checkpoint tested
    failed       1   an exception; metrics.json holds the error text. Also a model whose final
                     evaluation alone would outlast training.time_budget_s (over_budget: true)
    (usage)      2   bad flags, invalid config, the run folder already holds a run, or another
                     train.py is running in it (its .lock); no run file is written
    diverged     3   loss or validation metric became NaN/inf; stopped at once
    timeout      4   training.time_budget_s reached (it covers the final evaluation too: training
                     stops early enough to leave the time it needs); best checkpoint tested, all
                     files written
    pruned       5   a PRUNE request file appeared in the run folder (the search's pruner);
                     stops within a batch, best checkpoint tested, all files written
    invalid      6   with --smoke-test: the data, the model or the smoke test failed before
                     training (or the model has more than --max-params parameters); nothing
                     trained, and the search records a rejected proposal, not a run
    interrupted  130 SIGINT/SIGTERM; what exists is written, no test evaluation
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from nas_agent.config import ConfigError, config_hash, config_style, load_config, write_config
from nas_agent import forecasts
from nas_agent.data import DataError, load_dataset
from nas_agent.lock import LockHeld, RunFolderLock
from nas_agent.logging_utils import save_history, save_metrics
from nas_agent.run_folder import (
    CHECKPOINT_FILE,
    CONFIG_USED_FILE,
    CURVE_FILE,
    EXIT_CODES,
    FORECASTS_FILE,
    LOG_FILE,
    METRICS_FILE,
    OUTPUT_FILES,
    PROGRESS_FILE,
    PRUNE_FILE,
    RESUMABLE_STATUSES,
    RESUME_FILE,
    TESTED_EARLY_STOPS,
    USAGE_ERROR,
)
from nas_agent.run_manager import run_size_estimate
from nas_agent.schema import resolve_class
from nas_agent.atomic import atomic_write_json

log = logging.getLogger("train")

# The orchestrator asks a running train.py to stop by writing PRUNE_FILE into the run folder
# (its text says why). It is checked between batches, like the signals.
# forecasts.npz (FORECASTS_FILE): the best checkpoint's forecast of every validation and test
# window, fp32, and the rows their targets come from; the study's ensemble reads it. Skipped for a
# split whose forecasts would exceed this size (a wide data set), evaluated streaming instead.
FORECASTS_MAX_BYTES = 256 * 2**20
EVAL_BATCH = 256  # fixed: ProbSparse draws its key sample per forward call, so the batch size is part of the metric
# The budget's first look at a model's evaluation cost: batches of 8 and 16 windows, extrapolated
# to a full one (eval_cost_per_window). An extrapolation over PROBE_MARGIN x the budget fails the run
# at once; the margin covers what the extrapolation misses (bench/eval_probe.py measures it against
# full batches: bench/results/eval_probe.md); anything closer is timed on a full evaluation batch.
PROBE_WINDOWS = 16
PROBE_MARGIN = 4.0
EVAL_SEED = 0  # fixed sampling for ProbSparse attention at evaluation
# Where a run is inside its epoch (PROGRESS_FILE), for the search's live panel: rewritten
# (atomically) at most this often, since an epoch of the default config takes minutes and
# history.json says nothing until it ends.
PROGRESS_EVERY_S = 2.0


class StopTraining(Exception):
    """Ends training early with a status from the vocabulary above."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class InvalidRun(Exception):
    """With --smoke-test (or --max-params): the proposal cannot train; the run ends "invalid" (exit 6).
    The message is the rejection the search records, worded as its subprocess smoke test words it."""


class _SmokeTimeout(BaseException):
    """SIGALRM during the in-run smoke test. A BaseException, so that model code catching Exception
    cannot swallow it."""


_stop_signal: list[str] = []  # set by the signal handler, checked between batches
_stop_at: list[float] = []  # when the first stop signal came (time.monotonic)
_PARENT_PID = os.getppid()  # a different parent later means ours died (the kernel reparented us)
# When a multi-threaded orchestrator dies, the kernel's parent-death SIGTERM (PR_SET_PDEATHSIG)
# reaches its child once per thread the child is reparented to, within a millisecond; with a
# second SIGTERM acting as usual, train.py died before writing what it had. So a SIGTERM that
# comes within TERM_REPEAT_S of the first, or after our parent died, is the same request. A later
# second SIGTERM from a living parent (a user's second `kill`) ends the run once the interpreter
# runs its handler; a run stuck in one long C call needs SIGKILL (the orchestrator sends it after
# its grace period).
TERM_REPEAT_S = 1.0


def _on_signal(signum, frame):
    """First SIGINT/SIGTERM: finish cleanly at the next check. A second SIGINT acts as usual, and so
    does a second SIGTERM unless it repeats the same request (see TERM_REPEAT_S)."""
    _stop_signal.append(signal.Signals(signum).name)
    _stop_at.append(time.monotonic())
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_repeated_term)


def _on_repeated_term(signum, frame):
    if time.monotonic() - _stop_at[0] < TERM_REPEAT_S or os.getppid() != _PARENT_PID:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def check_stop(where: str) -> None:
    if _stop_signal:
        raise StopTraining("interrupted", f"received {_stop_signal[0]} {where}")


def check_prune(run_dir: Path, epoch: int) -> None:
    """Stop as pruned when the search has written a PRUNE request into the run folder."""
    path = run_dir / PRUNE_FILE
    if path.exists():
        try:
            why = path.read_text(encoding="utf-8").strip().splitlines()[0][:500]
        except (OSError, IndexError, UnicodeDecodeError):
            why = "(no reason given)"
        raise StopTraining("pruned", f"pruned by the search during epoch {epoch}: {why}")


# --------------------------------------------------------------------------- setup

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one Informer forecaster into runs/<tag>/.")
    p.add_argument("--config", default="config.py", help="config file (parsed, never executed)")
    p.add_argument("--tag", required=True, help="run name: the folder runs/<tag>/")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.max_epochs=2 (repeatable)")
    p.add_argument("--model", default=None, help="a model.py defining build_model(config) (default: ./model.py)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an existing run folder")
    p.add_argument("--resume", action="store_true",
                   help=f"keep {RESUME_FILE} after every epoch; continue an unfinished run of the same config in "
                        "runs/<tag>/ from its last completed epoch (or start it when there is none)")
    p.add_argument("--smoke-test", action="store_true",
                   help="smoke-test the model on one real batch before training; a failure of the data, the model "
                        "or the test ends the run as 'invalid' (exit 6), as the search's smoke test would reject it")
    p.add_argument("--smoke-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --smoke-test: data, model and smoke test must be done in this time, else 'invalid'")
    p.add_argument("--max-params", type=int, default=None, help="a model with more parameters ends 'invalid'")
    p.add_argument("--predict", default=None, metavar="FILE.npz",
                   help="train nothing: write the forecasts of runs/<tag>/best_model.pth for every validation and "
                        "test window (and their targets) to FILE.npz, for the study's ensemble")
    return p.parse_args(argv)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def cap_gpu_memory(device: torch.device) -> None:
    """Hold torch's CUDA allocator to the orchestrator's memory cap ($NAS_MEMORY_CAP_GB, set by
    nas_agent_graph/limits.py): its RLIMIT_DATA sees host memory only. A run over it fails with
    CUDA out of memory, which the orchestrator records as "memory cap (N GB)"."""
    gb = os.environ.get("NAS_MEMORY_CAP_GB")
    if not gb or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(gb) * 1024 ** 3 / total))


def unfinished(run_dir: Path) -> bool:
    """--resume may take the folder over: no metrics.json, or one that says interrupted, or a
    passing failure (RESUMABLE_STATUSES) that left a resume state."""
    try:
        status = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8")).get("status")
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: not ours to take over
    return status == "interrupted" or (status in RESUMABLE_STATUSES and (run_dir / RESUME_FILE).is_file())


def model_file_hash(model_file: str | None) -> str:
    """sha256 of the model file's text: config_hash does not cover the code that builds the model."""
    path = Path(model_file) if model_file else Path(__file__).with_name("model.py")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_resume_state(run_dir: Path, cfg, model_hash: str) -> dict | None:
    """--resume: the folder's resume state, when it is of this very config and model code (else a
    ConfigError: continuing another config's training would be a run of neither)."""
    path = run_dir / RESUME_FILE
    if not path.is_file() or not unfinished(run_dir):
        return None
    try:  # weights_only: the file is data, never code
        resume = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise ConfigError(f"--resume: {path} does not load ({type(e).__name__}: {e}); "
                          "pass --overwrite to train the run from the start") from None
    missing = [key for key in RESUME_KEYS if key not in resume] if isinstance(resume, dict) else list(RESUME_KEYS)
    if missing:
        raise ConfigError(f"--resume: {path} is not a resume state this train.py can continue (missing "
                          f"{', '.join(missing)}); pass --overwrite to train the run from the start")
    if resume.get("config_hash") != config_hash(cfg):
        raise ConfigError(f"--resume: {path} is the state of another config (config hash expected "
                          f"{config_hash(cfg)}, found {resume.get('config_hash')}); resume with the run's own "
                          f"{run_dir / CONFIG_USED_FILE}, or pass --overwrite to train this config from the start")
    if resume.get("model_hash") != model_hash:
        raise ConfigError(f"--resume: {path} was trained with another model file (sha256 prefix expected "
                          f"{model_hash}, found {resume.get('model_hash')}); resume with the same "
                          "--model, or pass --overwrite to train from the start")
    return resume


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool = False, resuming: bool = False) -> None:
    """Refuse to clobber an earlier run unless --overwrite (or, with --resume, unless that run is
    unfinished); then make the folder. `resuming` (a resume state was loaded): only metrics.json
    goes, so the folder reads as unfinished and a failure of this attempt loses nothing."""
    existing = [name for name in OUTPUT_FILES if (run_dir / name).exists()]
    if existing and not overwrite and not (resume and unfinished(run_dir)):
        hint = "choose another --tag, or pass --overwrite to replace it"
        if resume:
            hint = f"it has ended (see its {METRICS_FILE}), so there is nothing to resume; " + hint
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); {hint}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # A prune request left by an earlier attempt is not meant for this one.
    (run_dir / PRUNE_FILE).unlink(missing_ok=True)
    if resuming:
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        return
    if existing and not overwrite:
        print(f"--resume: {run_dir} holds an unfinished run without a resume state; training from the start",
              file=sys.stderr)
    for name in existing:
        (run_dir / name).unlink()
    (run_dir / (RESUME_FILE + ".tmp")).unlink(missing_ok=True)


def _is_same_file(stream, path: Path) -> bool:
    try:
        return path.exists() and os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):
        return False


def setup_logging(log_path: Path, append: bool = False) -> None:
    """Log to stderr, and to train.log unless our output is already being streamed there."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if not (_is_same_file(sys.stdout, log_path) or _is_same_file(sys.stderr, log_path)):
        handlers.append(logging.FileHandler(log_path, mode="a" if append else "w", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
    log.handlers[:] = handlers
    log.setLevel(logging.INFO)
    log.propagate = False


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat's start time against the
    uptime, 10 ms resolution), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_build_model(model_file: str | None):
    """build_model from ./model.py, or from another model file (already vetted by the caller)."""
    path = Path(model_file) if model_file else Path(__file__).with_name("model.py")
    spec = importlib.util.spec_from_file_location("run_model", path)
    if spec is None or not path.is_file():
        raise ConfigError(f"--model {path}: file not found")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as a real import would be: dataclasses (with postponed
    # annotations) look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "build_model", None)):
        raise ConfigError(f"--model {path}: it must define build_model(config)")
    return module.build_model


# --------------------------------------------------------------------------- in-run smoke test

@contextlib.contextmanager
def smoke_phase(enabled: bool, timeout_s: float | None):
    """With --smoke-test, what fails inside the block (loading the data, building the model,
    smoke_check) ends the run as "invalid" (InvalidRun), and so does a block still running after
    timeout_s (SIGALRM, seen between Python bytecodes, so after a long torch call returns). A full
    disk stays a failure (the search stops on it and resumes the run later)."""
    if not enabled:
        yield
        return

    def on_alarm(signum, frame):
        raise _SmokeTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm) if timeout_s else None
    if timeout_s:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    except InvalidRun:
        raise
    except _SmokeTimeout:
        raise InvalidRun(f"smoke test failed: smoke test timed out after {timeout_s:g}s") from None
    except Exception as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InvalidRun(f"smoke test failed: {type(e).__name__}: {e}") from e
    finally:
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def smoke_check(model, ds, tc, device: torch.device, amp: str) -> float:
    """nas_agent_graph/smoke.py's checks inside the run, before training (--smoke-test): one real
    batch forward and backward, the output's shape and a finite loss, then the optimizer, scheduler
    and loss classes built and stepped once on a throwaway parameter. Returns its seconds.

    Training afterwards is exactly what it would be without the check: the RNG streams are
    restored (fork_rng), the model runs in eval mode (no dropout draw, no batch-norm statistics
    update), its gradients are cleared, and the optimizer that trains it is not built yet.
    """
    import torch._dynamo  # noqa: F401 - building any torch optimizer imports it (1-2 s): training
    # pays for it anyway, so it is imported before the clock starts and not counted as the smoke test's.
    start = time.monotonic()
    x_enc, m_enc, x_dec, m_dec, y = next(iter(ds.train.batches(tc.batch_size)))
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # The training classes, on a parameter of their own: a bad argument (a negative momentum,
        # T_max 0, fused Adam on a CPU) fails here, not after an epoch.
        probe = torch.nn.Linear(1, 1).to(device)
        optimizer, scheduler, criterion = make_optim(probe, tc)
        probe_loss = criterion(probe(torch.ones(2, 1, device=device)), torch.zeros(2, 1, device=device))
        probe_loss.backward()
        optimizer.step()
        if scheduler is not None:
            step_scheduler(scheduler, probe_loss.item())
        model.eval()
        try:
            with autocast(device, amp):
                out = model(x_enc, m_enc, x_dec, m_dec)
            if tuple(out.shape) != tuple(y.shape):
                raise ValueError(f"model output: expected shape {list(y.shape)} [batch, pred_len, c_out], "
                                 f"got {list(out.shape)}")
            loss = criterion(out.float(), y)
            if not torch.isfinite(loss):
                raise ValueError(f"loss on one real batch is {loss.item()}")
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    return time.monotonic() - start


def check_disk_room(run_dir: Path, n_params: int) -> None:
    """An ENOSPC OSError when the run's checkpoint and logs would not fit (the orchestrator's own
    check before the launch did not know the parameter count when the smoke test runs here)."""
    need, free = run_size_estimate(n_params), shutil.disk_usage(run_dir).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device for the run: it needs about {need / 1e6:.0f} MB "
                                    f"({n_params:,} parameters, checkpoint and logs), {free / 1e6:.0f} MB are free",
                      str(run_dir))


# --------------------------------------------------------------------------- training

def cpu_has_native_bf16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """(whether this CPU computes bf16 in hardware, why), read from the kernel's CPU flags
    (/proc/cpuinfo on Linux, or the text given). Without it, bf16 is emulated and slower than
    fp32, so AMP would only cost time."""
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False, "no /proc/cpuinfo to read the CPU's bf16 support from, so bf16 stays off"
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            flags.update(value.split())
    found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag), so bf16 would be emulated"


def amp_mode(device: torch.device, wanted: bool) -> tuple[str, str]:
    """("bf16" or "off", why): training.amp, then what this device can do, checked by a probe.

    The probe runs one small matmul under autocast and compares it with fp32, so a torch build
    whose CPU autocast does not produce bf16 (or produces garbage) falls back to fp32 with the
    reason, instead of training slowly or wrongly."""
    if not wanted:
        return "off", "training.amp is false"
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            return "off", "this GPU does not support bf16"
        native, why = True, "CUDA with bf16"
    else:
        native, why = cpu_has_native_bf16()
        if not native:
            return "off", why
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 64, generator=gen).to(device) for _ in range(2))
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = a @ b
    except (RuntimeError, TypeError) as e:
        return "off", f"bf16 autocast failed on {device.type}: {e}"
    error = ((out.float() - a @ b).norm() / (a @ b).norm()).item()
    if out.dtype != torch.bfloat16 or not error < 0.02:
        return "off", f"bf16 autocast probe on {device.type} gave dtype {out.dtype}, relative error {error:.3g}"
    return "bf16", f"{why}; probe ok (relative error {error:.1e})"


def autocast(device: torch.device, mode: str):
    # bf16 keeps fp32's range, so it needs no loss scaling: AMP is a context manager and nothing
    # else. Weights, optimizer state and the loss stay fp32.
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eval_batches(model, windows, device, batch: int = EVAL_BATCH):
    """(forecast, target) per batch over every window of a split, in order (no drop-last), in fp32.

    Always fp32, whatever training.amp says, so a reported metric never depends on the
    precision training happened to use. ProbSparse attention samples keys even in eval mode,
    so evaluation runs on a forked RNG with a fixed seed: the metrics are a function of the
    weights alone, and the training RNG stream is left untouched.
    """
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        for x_enc, m_enc, x_dec, m_dec, y in windows.batches(batch):
            check_stop("during evaluation")
            yield model(x_enc, m_enc, x_dec, m_dec).float(), y


@torch.no_grad()
def evaluate(model, windows, device) -> tuple[float, float]:
    """MSE and MAE over every window of a split (see _eval_batches)."""
    se = ae = 0.0
    count = 0
    for pred, y in _eval_batches(model, windows, device):
        err = pred - y
        se += err.double().pow(2).sum().item()
        ae += err.double().abs().sum().item()
        count += err.numel()
    return se / count, ae / count


@torch.no_grad()
def forecast(model, windows, device) -> np.ndarray:
    """The forecast of every window of a split, (windows, pred_len, channels), as evaluate computes
    it; its targets are forecasts.windows(windows.target_rows(), pred_len)."""
    return np.concatenate([pred.cpu().numpy() for pred, _ in _eval_batches(model, windows, device)])


def load_data(cfg, device: torch.device | str):
    """The data set a config describes, with the model's channel counts set from it."""
    ds = load_dataset(cfg.data, cfg.model.embed, device)
    cfg.model.enc_in = cfg.model.dec_in = ds.enc_in
    cfg.model.c_out = ds.c_out
    return ds


def predict(cfg, args, device: torch.device) -> int:
    """--predict FILE: the forecasts of a finished run's best checkpoint, in forecasts.npz's format,
    for a run that did not write them (it predates them, or its data set is too wide)."""
    run_dir = Path(args.runs_dir) / args.tag
    ckpt_path = run_dir / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        print(f"error: --predict: {ckpt_path} not found (the run wrote no checkpoint, or it was deleted)",
              file=sys.stderr)
        return USAGE_ERROR
    ds = load_data(cfg, device)
    model = load_build_model(args.model)(cfg.model_dump()).to(device)
    # weights_only: a checkpoint is data, never code. Checkpoints written before torch_version was
    # stored as a plain string hold a TorchVersion, which is allowed by name.
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    arrays = {}
    for split in forecasts.SPLITS:
        windows = getattr(ds, split)
        arrays[split], arrays[f"{split}_target_rows"] = forecast(model, windows, device), windows.target_rows()
    forecasts.save(Path(args.predict), arrays)
    print(f"predict: {args.predict} (val {arrays['val'].shape}, test {arrays['test'].shape})")
    return 0


@torch.no_grad()
def naive_mse(windows) -> float:
    """MSE of repeating the last seen value: the floor any forecaster must beat."""
    se, count = 0.0, 0
    for x_enc, _, _, _, y in windows.batches(EVAL_BATCH):
        last = x_enc[:, -1:, windows.out_channels]
        se += (y - last).double().pow(2).sum().item()
        count += y.numel()
    return se / count


def _eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _etas(epoch: int, max_epochs: int, step: int, steps: int, epoch_s: float,
          budget_left: float | None) -> tuple[float | None, float | None, float | None]:
    """(steps per second, seconds left in the epoch, seconds left in the run): the epochs left at
    this epoch's rate, capped by the time budget; None before a rate exists."""
    rate = step / epoch_s if epoch_s > 0 else None
    if not rate:
        return None, None, None
    epoch_left = (steps - step) / rate
    run_left = epoch_left + (max_epochs - epoch) * steps / rate
    return rate, epoch_left, (min(run_left, budget_left) if budget_left is not None else run_left)


def _progress(epoch: int, max_epochs: int, step: int, total: int, loss: float, epoch_s: float,
              budget_left: float | None) -> None:
    """The batch bar of a run by hand, on a terminal only (logs and pipes get the epoch lines)."""
    if not sys.stderr.isatty():
        return
    width = 30
    done = width * step // max(total, 1)
    rate, epoch_left, run_left = _etas(epoch, max_epochs, step, total, epoch_s, budget_left)
    speed = (f"{rate:.1f} it/s epoch ETA {_eta(epoch_left)} run ETA {_eta(run_left)} " if rate else "")
    sys.stderr.write(f"\repoch {epoch}/{max_epochs} [{'#' * done}{'.' * (width - done)}] {step}/{total} "
                     f"loss {loss:.4f} {speed}")
    if step == total:
        sys.stderr.write("\r" + " " * 110 + "\r")
    sys.stderr.flush()


def write_progress(run_dir: Path, epoch: int, max_epochs: int, step: int, steps: int, epoch_s: float,
                   budget_left: float | None) -> None:
    """progress.json: the step within the epoch, the rate and the ETAs. Only a display reads
    it, so a failed write (a full disk) is logged once and never stops training."""
    rate, epoch_left, run_left = _etas(epoch, max_epochs, step, steps, epoch_s, budget_left)
    try:
        atomic_write_json(run_dir / PROGRESS_FILE, {
            "epoch": epoch, "max_epochs": max_epochs, "step": step, "steps": steps,
            "steps_per_s": rate, "epoch_eta_s": epoch_left, "run_eta_s": run_left})
    except OSError as e:
        if not getattr(write_progress, "failed", False):
            log.warning("cannot write %s (%s); training goes on", run_dir / PROGRESS_FILE, e)
            write_progress.failed = True


def make_optim(model, tc):
    optimizer = resolve_class(tc.optimizer_class)(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                                  **tc.optimizer_kwargs)
    scheduler = resolve_class(tc.scheduler_class)(optimizer, **tc.scheduler_kwargs) if tc.scheduler_class else None
    criterion = resolve_class(tc.criterion_class)(**tc.criterion_kwargs)
    return optimizer, scheduler, criterion


def step_scheduler(scheduler, metric: float) -> None:
    """ReduceLROnPlateau steps with a metric (the validation MSE); the others per epoch."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(metric)
    else:
        scheduler.step()


def fit(model, ds, cfg, device, run_dir: Path, state: dict) -> None:
    """Train with early stopping. Fills `state` as it goes, so callers see progress on any exit.

    state keys: history, best_epoch, best_val, best_state, train_time_sec, amp (the precision,
    from amp_mode), and the throughput counters step_s, samples, eval_s. With state["resume"]
    (--resume), training continues after that state's last epoch; with state["resumable"], the
    resume state is saved after every epoch.
    """
    tc = cfg.training
    optimizer, scheduler, criterion = make_optim(model, tc)
    state["startup_marks"]["optimizer"] = process_age_s()
    gen = torch.Generator().manual_seed(tc.seed)
    steps = len(ds.train) // tc.batch_size
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    if steps == 0:
        raise StopTraining("failed", f"batch_size {tc.batch_size} is larger than the {len(ds.train)} training windows")
    loop = Loop(optimizer, scheduler, criterion, gen, steps, device)
    resume = state.pop("resume", None)
    if resume:
        restore_resume_state(resume, model, loop, state)
    # The budget's clock (start-up is not in it); a resumed run's earlier training counts.
    start = state["started"] = time.monotonic() - state["train_time_sec"]
    loop.deadline = start + tc.time_budget_s if tc.time_budget_s else math.inf
    if resume:  # its evaluation cost is known; the probe's verdict was taken when it started
        if loop.bad_epochs >= tc.patience or loop.next_epoch > tc.max_epochs:
            return  # stopped during its final evaluation: training had ended
        return train_epochs(model, ds, cfg, device, run_dir, state, loop)
    # The budget bounds the whole run, so the final evaluation of every val and test window must
    # fit in it too: training stops that much earlier. The cost per window is estimated now
    # (eval_cost_per_window: small batches, then full ones unless far over), then timed on each
    # epoch's validation. A model whose evaluation alone takes longer than the budget fails at
    # once: scoring its untrained weights would cost more than the budget and say nothing.
    eval_windows = len(ds.val) + len(ds.test)
    budget = tc.time_budget_s or math.inf
    per_window = eval_cost_per_window(model, ds.val, device, eval_windows, budget) if tc.time_budget_s else 0.0
    state["eval_probe_s"] = time.monotonic() - start
    state["eval_s"] += state["eval_probe_s"]
    state["startup_marks"]["eval_probe"] = process_age_s()
    if per_window * eval_windows >= budget:
        state["over_budget"] = True
        raise StopTraining("failed", over_budget_message(tc.time_budget_s, per_window, eval_windows))
    loop.per_window = per_window
    train_epochs(model, ds, cfg, device, run_dir, state, loop)


@dataclasses.dataclass
class Loop:
    """The epoch loop's objects and counters: what a resume state saves and restores."""
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    criterion: torch.nn.Module
    gen: torch.Generator  # the training batches' order
    steps: int  # per epoch
    device: torch.device
    next_epoch: int = 1
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    per_window: float = 0.0  # seconds to evaluate one window: the budget's reserve
    deadline: float = math.inf  # time.monotonic() at which training.time_budget_s runs out


def train_epochs(model, ds, cfg, device, run_dir: Path, state: dict, loop: Loop) -> None:
    """fit's epochs, from loop.next_epoch on, with early stopping after `patience` bad epochs."""
    tc = cfg.training
    optimizer, scheduler, criterion = loop.optimizer, loop.scheduler, loop.criterion
    steps, deadline, per_window, bad_epochs = loop.steps, loop.deadline, loop.per_window, loop.bad_epochs
    start = state["started"]
    eval_windows = len(ds.val) + len(ds.test)
    for epoch in range(loop.next_epoch, tc.max_epochs + 1):
        model.train()
        t_epoch = time.monotonic()
        loss_sum = mse_sum = 0.0
        batches = ds.train.batches(tc.batch_size, shuffle=True, generator=loop.gen, drop_last=True)
        for step, (x_enc, m_enc, x_dec, m_dec, y) in enumerate(batches, 1):
            if "startup_s" not in state:  # interpreter, imports, data, model: up to the first step
                state["startup_marks"]["first_step"] = process_age_s()
                state["startup_s"] = state["startup_marks"]["first_step"] - state.get("eval_probe_s", 0.0)
            check_stop(f"during epoch {epoch}")
            check_prune(run_dir, epoch)
            # The epoch's last step is followed by its validation, which must fit too.
            reserve = per_window * (eval_windows + (len(ds.val) if step == steps else 0))
            if time.monotonic() + reserve > deadline:
                raise StopTraining("timeout", f"time budget of {tc.time_budget_s:g}s reached in epoch {epoch} (its "
                                              f"last {reserve:.0f}s kept for the evaluation)")
            t_step = time.monotonic()
            with autocast(device, state["amp"]):
                pred = model(x_enc, m_enc, x_dec, m_dec)
                loss = criterion(pred.float(), y)
            if not torch.isfinite(loss):
                raise StopTraining("diverged", f"training loss became {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            loss_sum += loss.item()
            mse_sum += (pred.detach().float() - y).pow(2).mean().item()
            state["step_s"] += time.monotonic() - t_step  # after .item(): the step has really run
            state["samples"] += len(y)
            now = time.monotonic()
            budget_left = deadline - per_window * eval_windows - now if math.isfinite(deadline) else None
            _progress(epoch, tc.max_epochs, step, steps, loss_sum / step, now - t_epoch, budget_left)
            if now - state.get("progress_at", 0.0) >= PROGRESS_EVERY_S or step == steps:
                state["progress_at"] = now
                write_progress(run_dir, epoch, tc.max_epochs, step, steps, now - t_epoch, budget_left)
            if step == steps:
                break
        state["train_time_sec"] = time.monotonic() - start
        eval_before = state["eval_s"]
        val_mse, val_mae = timed_evaluate(model, ds.val, device, state)
        per_window = (state["eval_s"] - eval_before) / len(ds.val)  # the budget's reserve, measured again
        if not math.isfinite(val_mse):
            raise StopTraining("diverged", f"validation MSE became {val_mse} at epoch {epoch}")
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            step_scheduler(scheduler, val_mse)
        record = {"epoch": epoch, "train_loss": loss_sum / step, "train_mse": mse_sum / step,
                  "val_mse": val_mse, "val_mae": val_mae, "lr": lr, "epoch_time_s": time.monotonic() - t_epoch}
        state["history"].append(record)
        improved = val_mse < state["best_val"]
        if improved:
            state.update(best_val=val_mse, best_epoch=epoch, best_state=copy.deepcopy(model.state_dict()))
            bad_epochs = 0
        else:
            bad_epochs += 1
        save_history(run_dir, history_file(state))  # per-epoch progress for the orchestrator
        if state["resumable"]:
            loop.next_epoch, loop.bad_epochs, loop.per_window = epoch + 1, bad_epochs, per_window
            save_resume_state(run_dir, cfg, model, loop, state)
        log.info("epoch %d/%d train_mse %.4f val_mse %.4f val_mae %.4f lr %.2e time %.1fs%s", epoch,
                 tc.max_epochs, record["train_mse"], val_mse, val_mae, lr, record["epoch_time_s"],
                 " *" if improved else "")
        if bad_epochs >= tc.patience:
            log.info("early stop: no improvement for %d epochs", bad_epochs)
            break


# --------------------------------------------------------------------------- resume (--resume)

RESUME_KEYS = ("config_hash", "model_hash", "next_epoch", "bad_epochs", "per_window", "model", "optimizer",
               "scheduler", "history", "best_epoch", "best_val", "best_state", "counters", "train_time_sec",
               "device", "rng")  # what save_resume_state writes


def save_resume_state(run_dir: Path, cfg, model, loop: Loop, state: dict) -> None:
    """Everything train_epochs needs to go on from loop.next_epoch as if never stopped, written
    atomically (a kill mid-write leaves the previous epoch's state)."""
    resume = {
        "config_hash": config_hash(cfg), "model_hash": state["model_hash"], "next_epoch": loop.next_epoch, "bad_epochs": loop.bad_epochs,
        "per_window": loop.per_window, "model": model.state_dict(), "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict() if loop.scheduler is not None else None,
        "history": state["history"], "best_epoch": state["best_epoch"], "best_val": state["best_val"],
        "best_state": state["best_state"],
        "counters": {k: state[k] for k in ("step_s", "samples", "eval_s")},
        "train_time_sec": time.monotonic() - state["started"],
        # The RNG streams: batch order (gen), dropout and ProbSparse sampling (torch's global
        # generators), and numpy's and Python's for model code that draws from them. Plain lists
        # and tensors, so torch.load(weights_only=True) reads them back.
        "device": loop.device.type,
        "rng": {"batches": loop.gen.get_state(), "torch": torch.get_rng_state(),
                # this device's only: asking for every GPU's would start CUDA on each of them
                "cuda": torch.cuda.get_rng_state(loop.device) if loop.device.type == "cuda" else None,
                "numpy": _numpy_rng_state(), "python": [list(random.getstate()[1]), random.getstate()[2]]},
    }
    tmp = run_dir / (RESUME_FILE + ".tmp")
    torch.save(resume, tmp)
    os.replace(tmp, run_dir / RESUME_FILE)


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def resumed_progress(resume: dict) -> dict:
    """The run's curve, best epoch and checkpoint, and training time, as the resume state holds them."""
    return {"history": list(resume["history"]), "best_epoch": resume["best_epoch"], "best_val": resume["best_val"],
            "best_state": resume["best_state"], "train_time_sec": resume["train_time_sec"]}


def restore_resume_state(resume: dict, model, loop: Loop, state: dict) -> None:
    """Load a resume state into the model, the loop and the run's state."""
    try:
        model.load_state_dict(resume["model"])
        loop.optimizer.load_state_dict(resume["optimizer"])
        if loop.scheduler is not None and resume["scheduler"] is not None:
            loop.scheduler.load_state_dict(resume["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        # Same config and model file, yet it does not fit: the data's columns changed, say. It
        # never will, so it goes (write_outputs), and the next --resume trains afresh.
        state["resume_unusable"] = True
        raise ConfigError(f"--resume: {RESUME_FILE} does not fit this run's model or optimizer ({e}); it is "
                          "removed, and the next --resume trains the run from the start") from None
    loop.next_epoch, loop.bad_epochs, loop.per_window = resume["next_epoch"], resume["bad_epochs"], resume["per_window"]
    state.update(resumed_progress(resume), **resume["counters"])
    rng = resume["rng"]
    loop.gen.set_state(rng["batches"])
    torch.set_rng_state(rng["torch"])
    if resume["device"] != loop.device.type:
        log.warning("resuming on %s a run saved on %s: it goes on, but not exactly as it would have there",
                    loop.device.type, resume["device"])
    elif rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], loop.device)
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(rng["python"][0]), rng["python"][1]))
    log.info("resumed after epoch %d (best epoch %s, val_mse %.4f, %d bad epochs)", loop.next_epoch - 1,
             resume["best_epoch"], resume["best_val"], loop.bad_epochs)


# --------------------------------------------------------------------------- outputs

def history_file(state: dict) -> dict:
    """history.json's content: the best epoch so far and every completed epoch."""
    return {"best_epoch": state["best_epoch"], "epochs": state["history"]}


def plot_learning_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_mse"] for h in history], "o-", label="train MSE")
        ax.plot(epochs, [h["val_mse"] for h in history], "s-", label="val MSE")
        best = min(history, key=lambda h: h["val_mse"] if math.isfinite(h["val_mse"]) else math.inf)
        ax.axvline(best["epoch"], color="grey", ls=":", label=f"best epoch {best['epoch']}")
        lr_ax = ax.twinx()
        lr_ax.plot(epochs, [h["lr"] for h in history], color="tab:green", alpha=0.4, label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_yscale("log")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no epoch completed", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (scaled)")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def print_summary(metrics: dict, run_dir: Path) -> None:
    keys = ("status", "val_mse", "val_mae", "test_mse", "test_mae", "train_mse", "naive_val_mse", "best_epoch",
            "epochs_run", "train_time_sec", "samples_per_s", "eval_s", "startup_s", "n_params", "device", "amp",
            "seed")
    print("---")
    for k in keys:
        v = metrics.get(k)
        print(f"{k + ':':<16}{v:.6f}" if isinstance(v, float) else f"{k + ':':<16}{v}")
    print(f"{'run_dir:':<16}{run_dir}")
    if metrics.get("error"):
        print(f"{'error:':<16}{metrics['error'].strip().splitlines()[-1]}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    # Process ages (s) at the steps of start-up, for metrics.json's startup_marks (bench/overhead.py).
    marks = {"imports": process_age_s()}
    args = parse_args(argv)
    overrides = list(args.set) + ([f"training.seed={args.seed}"] if args.seed is not None else [])
    run_dir = Path(args.runs_dir) / args.tag
    try:
        cfg = load_config(args.config, overrides)
        style = config_style(args.config)  # config_used.py is written in the same key spelling
        if args.model is not None and not Path(args.model).is_file():
            raise ConfigError(f"--model {args.model}: file not found")
        device = pick_device(args.device)
        if args.predict:
            return predict(cfg, args, device)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    # One train.py per folder: taken before anything in it is read, so a live run's resume
    # state is never read half-written, nor its files replaced under it.
    lock = RunFolderLock(run_dir)
    try:
        lock.acquire()
    except LockHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as e:  # not a folder, no permission, a file system without locks
        print(f"error: cannot lock the run folder {run_dir} ({e}); check --runs-dir and --tag", file=sys.stderr)
        return USAGE_ERROR
    try:
        return train_run(args, cfg, style, device, run_dir, overrides, marks)
    finally:
        lock.release()


def train_run(args, cfg, style, device, run_dir: Path, overrides: list[str], marks: dict) -> int:
    """main's run, under the folder's lock: check the folder, train, test, write every output."""
    try:
        # Read (and checked against the config) before the folder is touched: a refusal loses nothing.
        model_hash = model_file_hash(args.model)  # read once: checked against a resume state, saved, reported
        resume = load_resume_state(run_dir, cfg, model_hash) if args.resume and not args.overwrite else None
        prepare_run_dir(run_dir, args.overwrite, args.resume, resuming=resume is not None)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR

    setup_logging(run_dir / LOG_FILE, append=resume is not None)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    tc = cfg.training
    seed_everything(tc.seed)
    state = {"history": [], "best_epoch": None, "best_val": math.inf, "best_state": None, "train_time_sec": 0.0,
             "amp": "off", "step_s": 0.0, "samples": 0, "eval_s": 0.0, "startup_marks": marks,
             "resumable": args.resume, "resume": resume,
             "model_hash": model_hash}
    if resume:  # the folder's curve and best so far, so an attempt failing before fit rewrites them as they are
        state.update(resumed_progress(resume))
    metrics = {"status": "failed", "best_epoch": None, "val_mse": None, "val_mae": None, "test_mse": None,
               "test_mae": None, "train_mse": None, "naive_val_mse": None, "train_time_sec": 0.0, "n_params": None,
               "epochs_run": 0, "device": str(device), "seed": tc.seed, "error": None,
               "config_hash": config_hash(cfg), "model_hash": model_hash, "tag": args.tag, "amp": "off", "amp_reason": None,
               "samples_per_s": None, "eval_s": None, "startup_s": None}
    model = ds = None
    try:
        cap_gpu_memory(device)
        state["amp"], metrics["amp_reason"] = amp_mode(device, tc.amp)
        metrics["amp"] = state["amp"]
        marks["setup"] = process_age_s()
        with smoke_phase(args.smoke_test, args.smoke_timeout):
            ds = load_data(cfg, device)
            marks["data"] = process_age_s()
            model = load_build_model(args.model)(cfg.model_dump()).to(device)
            metrics["n_params"] = sum(p.numel() for p in model.parameters())
            marks["model"] = process_age_s()
            if args.max_params is not None and metrics["n_params"] > args.max_params:
                raise InvalidRun(f"too many parameters: {metrics['n_params']:,} > --max-params {args.max_params:,}")
            if args.smoke_test:
                metrics["smoke_s"] = round(smoke_check(model, ds, tc, device, state["amp"]), 4)
        if args.smoke_test:
            check_disk_room(run_dir, metrics["n_params"])
        write_config(cfg, run_dir / CONFIG_USED_FILE, style=style,
                     header=f"Effective config of {args.tag}: {args.config}" +
                            (f" with --set {' '.join(overrides)}" if overrides else "") +
                            f"\nRe-run: python train.py --config {run_dir / CONFIG_USED_FILE} --tag NEW_TAG")
        log.info("data %s: %d/%d/%d windows, %d channels; model %d parameters; device %s; amp %s (%s)", ds.path,
                 len(ds.train), len(ds.val), len(ds.test), ds.enc_in, metrics["n_params"], device, state["amp"],
                 metrics["amp_reason"])
        metrics["naive_val_mse"] = naive_mse(ds.val)
        status = "ok"
        try:
            check_stop("before training")
            fit(model, ds, cfg, device, run_dir, state)
            if state["best_state"] is not None:
                model.load_state_dict(state["best_state"])
            final_evaluation(model, ds, device, state, metrics)
        except StopTraining as stop:
            status = stop.status
            metrics["error"] = str(stop)
            log.warning("%s: %s", status, stop)
            if status in TESTED_EARLY_STOPS:  # the best checkpoint so far is still tested
                if state["best_state"] is not None:
                    model.load_state_dict(state["best_state"])
                try:
                    final_evaluation(model, ds, device, state, metrics)
                except StopTraining as again:
                    status, metrics["error"] = again.status, f"{stop}; then {again}"
            if status not in TESTED_EARLY_STOPS and state["best_state"] is not None:
                best = state["history"][state["best_epoch"] - 1]
                metrics.update(val_mse=best["val_mse"], val_mae=best["val_mae"], test_mse=None, test_mae=None)
        metrics["status"] = status
        if "started" in state:  # what training.time_budget_s bounds: training and the final evaluation
            metrics["train_eval_s"] = round(time.monotonic() - state["started"], 3)
    except InvalidRun as e:
        metrics["status"], metrics["error"] = "invalid", str(e)
        log.error("invalid: %s", e)
    except _SmokeTimeout:  # the alarm went off just as the smoke test ended
        metrics["status"] = "invalid"
        metrics["error"] = f"smoke test failed: smoke test timed out after {args.smoke_timeout:g}s"
    except (ConfigError, DataError) as e:
        metrics["error"] = str(e)
        log.error("%s", e)
    except Exception:
        metrics["error"] = traceback.format_exc()[-4000:]
        log.exception("training failed")

    history = state["history"]
    metrics["epochs_run"] = len(history)
    metrics["best_epoch"] = state["best_epoch"]
    metrics["train_time_sec"] = round(state["train_time_sec"], 3)
    if state["samples"]:
        metrics["samples_per_s"] = round(state["samples"] / max(state["step_s"], 1e-9), 2)
    metrics["eval_s"] = round(state["eval_s"], 3)
    if state.get("startup_s") is not None:
        metrics["startup_s"] = round(state["startup_s"], 2)
    metrics["startup_marks"] = {k: round(v, 3) for k, v in marks.items() if v is not None}
    if state["best_epoch"]:
        metrics["train_mse"] = history[state["best_epoch"] - 1]["train_mse"]
    if state.get("over_budget"):
        metrics["over_budget"] = True  # a property of the config, not a broken run (the search's stop rules)
    write_outputs(run_dir, args.tag, cfg, model, ds, state, metrics, style)
    print_summary(metrics, run_dir)
    return EXIT_CODES[metrics["status"]]


def over_budget_message(budget_s: float, per_window: float, eval_windows: int) -> str:
    return (f"too slow for the time budget: evaluating the {eval_windows} validation and test windows alone takes about "
            f"{per_window * eval_windows:.0f}s ({per_window * 1e3:.1f} ms each), more than training.time_budget_s "
            f"{budget_s:g}s, so nothing was trained; a smaller model (model.d_model, model.e_layers), a shorter "
            "look-back (data.seq_len) or a larger budget fits")


def eval_cost_per_window(model, windows, device, eval_windows: int, budget: float) -> float:
    """Seconds per window of the final evaluation (of `eval_windows` windows), for the budget's
    reserve and its over-budget verdict.

    A quick look comes first: batches of PROBE_WINDOWS / 2 and PROBE_WINDOWS windows (after an
    untimed one that pays the one-time set-up: kernel choice, allocations) give the cost per call
    and the cost per window, extrapolated to a full evaluation batch. A model whose evaluation is
    then over PROBE_MARGIN x the budget fails after seconds, not after the minutes that two full
    batches of it take (up to 134 s each here). Anything closer is timed on full batches, and a
    verdict that ends the run is taken on a second, warm one."""
    half = PROBE_WINDOWS // 2
    eval_seconds_per_window(model, windows, device, half)  # warm-up, not timed
    small = eval_seconds_per_window(model, windows, device, half) * half
    large = eval_seconds_per_window(model, windows, device, PROBE_WINDOWS) * PROBE_WINDOWS
    quick = full_batch_cost(small, large, half, PROBE_WINDOWS)
    if quick * eval_windows >= PROBE_MARGIN * budget:
        return quick
    per_window = eval_seconds_per_window(model, windows, device)
    if per_window * eval_windows >= budget:
        per_window = min(per_window, eval_seconds_per_window(model, windows, device))
    return per_window


def full_batch_cost(small_s: float, large_s: float, small: int, large: int) -> float:
    """Seconds per window of a full evaluation batch, extrapolated from the seconds of two small
    ones: a cost per call (Python, launches) plus a cost per window, each at least 0, so a model
    with a large fixed cost per call is not taken for a slow one, nor timing noise for a cost."""
    per_window = max((large_s - small_s) / (large - small), 0.0)
    per_call = max(large_s - large * per_window, 0.0)
    return (per_call + EVAL_BATCH * per_window) / EVAL_BATCH


@torch.no_grad()
def eval_seconds_per_window(model, windows, device, batch: int = EVAL_BATCH) -> float:
    """Wall seconds per window of evaluating `windows`, timed on its first batch of `batch`
    windows (no gradients, a forked RNG: training afterwards is exactly what it would be without it)."""
    start = time.monotonic()
    batches = _eval_batches(model, windows, device, batch)
    try:
        pred, _ = next(batches)
        pred.sum().item()  # waits for the device
    finally:
        batches.close()  # leaves the forked RNG, so training's stream is untouched
    return (time.monotonic() - start) / len(pred)


def timed_evaluate(model, windows, device, state: dict) -> tuple[float, float]:
    """evaluate, with its time added to state["eval_s"] (metrics.json's eval_s)."""
    start = time.monotonic()
    try:
        return evaluate(model, windows, device)
    finally:
        state["eval_s"] += time.monotonic() - start


def final_evaluation(model, ds, device, state: dict, metrics: dict) -> None:
    """Validation and test metrics of the restored best checkpoint."""
    if state["best_state"] is None:
        log.warning("no epoch completed; evaluating the current weights")
    for split in forecasts.SPLITS:
        windows = getattr(ds, split)
        if len(windows) * windows.pred_len * ds.c_out * 4 > FORECASTS_MAX_BYTES:
            metrics[f"{split}_mse"], metrics[f"{split}_mae"] = timed_evaluate(model, windows, device, state)
            continue
        start = time.monotonic()
        try:
            pred = forecast(model, windows, device)
        finally:
            state["eval_s"] += time.monotonic() - start
        rows = windows.target_rows()
        metrics[f"{split}_mse"], metrics[f"{split}_mae"] = forecasts.errors(pred, forecasts.windows(rows, windows.pred_len))
        state.setdefault("forecasts", {}).update({split: pred, f"{split}_target_rows": rows})


def write_outputs(run_dir: Path, tag: str, cfg, model, ds, state: dict, metrics: dict,
                  style: frozenset[str] = frozenset()) -> None:
    """Write every file that exists to be written; metrics.json strictly last."""
    try:
        if not (run_dir / CONFIG_USED_FILE).exists():  # failed before the data was read
            write_config(cfg, run_dir / CONFIG_USED_FILE, header=f"Effective config of {tag}", style=style)
        save_history(run_dir, history_file(state))
        if metrics["status"] != "invalid":  # nothing trained; matplotlib's import alone takes 0.3 s
            plot_learning_curve(state["history"], run_dir / CURVE_FILE, f"{tag} ({metrics['status']})")
        if model is not None and state["best_state"] is not None:
            ckpt = {"state_dict": state["best_state"], "config": cfg.model_dump(), "epoch": state["best_epoch"],
                    "val_mse": state["best_val"], "columns": ds.columns, "scaler_mean": ds.mean.tolist(),
                    "scaler_std": ds.std.tolist(), "torch_version": str(torch.__version__)}
            tmp = run_dir / (CHECKPOINT_FILE + ".tmp")
            torch.save(ckpt, tmp)
            os.replace(tmp, run_dir / CHECKPOINT_FILE)
            if len(state.get("forecasts") or {}) == len(forecasts.KEYS):  # both splits of this checkpoint
                forecasts.save(run_dir / FORECASTS_FILE, state["forecasts"])
    except Exception:
        log.exception("writing run outputs failed")
        if metrics["status"] == "ok":
            metrics["status"], metrics["error"] = "failed", traceback.format_exc()[-4000:]
    save_metrics(run_dir, metrics)
    if metrics["status"] not in RESUMABLE_STATUSES or state.get("resume_unusable"):  # nothing left to resume
        (run_dir / RESUME_FILE).unlink(missing_ok=True)
        (run_dir / (RESUME_FILE + ".tmp")).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
