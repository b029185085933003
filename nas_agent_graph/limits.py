"""Resource caps on every child that runs proposed code or trains: smoke tests, train.py runs, LoRA fine-tunes.

The static code check cannot see resource use: a model file may allocate 12 GB in build_model,
and an honest but huge config (a d_model 2048 Informer at look-back 720) does the same. Without
a cap the kernel's out-of-memory killer picks the victim, and that may be the orchestrator, the
LLM or another user's job. So each child gets, in its preexec (after fork, before exec):

- RLIMIT_DATA = the memory cap. Since Linux 4.7 it counts the heap and private writable mappings
  (torch's allocations), not the shared libraries or PROT_NONE reservations that make RLIMIT_AS
  fail torch's and CUDA's start-up. An allocation over it fails in the child (MemoryError,
  "Cannot allocate memory"), which is read back as "memory cap (N GB)".
- RLIMIT_CPU, a generous backstop beside the wall-clock timeouts (SIGXCPU, then SIGKILL).
- oom_score_adj 1000, so that if memory still runs out the kernel kills a child, not the orchestrator.

On CUDA, train.py also caps its GPU memory at the same number of GB ($NAS_MEMORY_CAP_GB).
"""
from __future__ import annotations

import math
import os
import re
import resource
from dataclasses import dataclass

MEMORY_CAP_ENV = "NAS_MEMORY_CAP_GB"
GB = 1024 ** 3
# Left to the orchestrator (torch, Optuna, LangGraph: ~1 GB) and the embedded LLM (~1.5 GB on the CPU)
# when the default cap is computed from the machine's available memory.
ORCHESTRATOR_RESERVE_GB = 3.0
MIN_DEFAULT_GB = 1.0
# The LoRA fine-tune of the embedded LLM peaks at ~8.2 GB (batch 1, CPU); its default leaves it 20 % room.
LORA_MIN_DEFAULT_GB = 10.0
CHILD_OOM_SCORE_ADJ = 1000  # the most: any child is killed before the orchestrator (adj 0)
# RLIMIT_CPU = this many times the wall-clock limit times the cores: a backstop, never the binding limit.
CPU_CAP_FACTOR = 2
NO_TIMEOUT_WALL_S = 6 * 3600.0  # the wall time assumed for the CPU cap of a run without --run-timeout
CPU_HARD_GRACE_S = 60  # SIGXCPU at the soft limit (train.py may still write), SIGKILL at the hard one

# How running out of memory under RLIMIT_DATA shows in a child's output: Python's MemoryError,
# torch's CPU allocator (errno 12), C++'s bad_alloc, numpy's "Unable to allocate", CUDA OOM.
_OOM_RE = re.compile(r"MemoryError|Cannot allocate memory|can't allocate memory|std::bad_alloc|"
                     r"Unable to allocate|CUDA out of memory|OutOfMemoryError", re.IGNORECASE)


class CapError(ValueError):
    """A bad --run-memory (or LoRA memory_gb) value; the message says what is wrong and what is allowed."""


@dataclass(frozen=True)
class Caps:
    """The limits one child gets; None leaves that limit alone."""
    memory_gb: float | None = None
    cpu_s: float | None = None
    oom_score_adj: int | None = CHILD_OOM_SCORE_ADJ

    def env(self) -> dict[str, str]:
        """Variables the child reads (train.py's GPU memory fraction)."""
        return {MEMORY_CAP_ENV: f"{self.memory_gb:g}"} if self.memory_gb else {}

    def rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        """(resource, (soft, hard)) pairs, computed before fork, never above the current hard limits."""
        out = []
        if self.memory_gb:
            out.append((resource.RLIMIT_DATA, _within_hard(resource.RLIMIT_DATA, int(self.memory_gb * GB), 0)))
        if self.cpu_s:
            out.append((resource.RLIMIT_CPU, _within_hard(resource.RLIMIT_CPU, math.ceil(self.cpu_s),
                                                          CPU_HARD_GRACE_S)))
        return out


def _within_hard(res: int, soft: int, extra: int) -> tuple[int, int]:
    """(soft, hard) for setrlimit: an unprivileged child may lower its hard limit but not raise it."""
    _, hard = resource.getrlimit(res)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
        return soft, min(soft + extra, hard)
    return soft, soft + extra


def apply_in_child(limits: list[tuple[int, tuple[int, int]]], oom_score_adj: int | None) -> None:
    """Set the limits in the forked child (preexec_fn): only syscalls, nothing that may take a lock."""
    for res, values in limits:
        resource.setrlimit(res, values)
    if oom_score_adj is not None:
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        except OSError:
            return  # no /proc (not Linux): nothing to raise, the caps above still hold
        try:
            os.write(fd, str(oom_score_adj).encode())
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- defaults and flags

def meminfo_gb() -> tuple[float, float]:
    """(total, available) memory of the machine in GB, from /proc/meminfo."""
    values = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024 / GB  # kB
    return values["MemTotal"], values.get("MemAvailable", values["MemFree"])


def default_run_memory_gb(parallel: int, available_gb: float | None = None) -> float:
    """(available memory - ORCHESTRATOR_RESERVE_GB) / parallel, at least MIN_DEFAULT_GB, to 0.1 GB."""
    if available_gb is None:
        available_gb = meminfo_gb()[1]
    share = (available_gb - ORCHESTRATOR_RESERVE_GB) / max(parallel, 1)
    return max(MIN_DEFAULT_GB, math.floor(share * 10) / 10)


def default_lora_memory_gb(run_memory_gb: float | None, available_gb: float | None = None) -> float:
    """The fine-tune's default: the runs' cap, but at least LORA_MIN_DEFAULT_GB (its peak plus room)."""
    base = run_memory_gb if run_memory_gb else default_run_memory_gb(1, available_gb)
    return max(LORA_MIN_DEFAULT_GB, base)


def parse_memory_gb(text: str | float | None, flag: str, default: float, total_gb: float | None = None) -> float | None:
    """A memory cap in GB from a flag: None -> `default`, 'off' -> None (no cap), else a number
    in (0, the machine's total memory]; anything else raises CapError saying why."""
    if text is None:
        return default
    raw = str(text).strip()
    if raw.lower() == "off":
        return None
    try:
        gb = float(raw)
    except ValueError:
        raise CapError(f"{flag} {raw!r}: expected a number of GB (e.g. 8) or 'off'") from None
    if not math.isfinite(gb) or gb <= 0:
        raise CapError(f"{flag} {raw!r}: the memory cap must be a positive number of GB")
    if total_gb is None:
        total_gb = meminfo_gb()[0]
    if gb > total_gb:
        raise CapError(f"{flag} {raw!r}: more than this machine's {total_gb:.1f} GB of memory; "
                       f"give at most {math.floor(total_gb)}")
    return gb


def cpu_cap_s(wall_s: float | None, threads: int) -> float:
    """RLIMIT_CPU for a child with this wall-clock limit (None: NO_TIMEOUT_WALL_S) using `threads` cores."""
    return CPU_CAP_FACTOR * (wall_s or NO_TIMEOUT_WALL_S) * max(threads, 1)


def run_caps(memory_gb: float | None, run_timeout: float | None) -> Caps:
    """A train.py run's caps: --run-memory, and CPU time CPU_CAP_FACTOR x the run's wall limit x the cores."""
    return Caps(memory_gb=memory_gb, cpu_s=cpu_cap_s(run_timeout, cpu_count()))


def smoke_caps(memory_gb: float | None, smoke_timeout: float) -> Caps:
    """A smoke test's caps: the run's memory cap (a model that cannot build under it cannot train)."""
    return Caps(memory_gb=memory_gb, cpu_s=cpu_cap_s(smoke_timeout, cpu_count()))


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- reading outcomes back

def ran_out_of_memory(text: str | None) -> bool:
    """True when a child's error text or log shows an allocation that failed."""
    return bool(text) and _OOM_RE.search(text) is not None


def memory_cap_reason(gb: float) -> str:
    return f"memory cap ({gb:g} GB)"
