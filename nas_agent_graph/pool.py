"""Runs in flight: up to --parallel train.py runs at once, each supervised by its own thread.

The graph stays single-threaded and remains the only writer of agent_state.json: a run is
submitted here by the `launch` node and its outcome is collected by the `wait` node. Between
the two, a worker thread blocks in `launch_run` (or `ray_launch_run`), which owns the child:
the timeout, the process group, the learning-curve callbacks (pruning) and the final
metrics.json. A thread writes only into its own run folder.

Slots. Each run takes the lowest free slot 0..parallel-1. With GPUs, slot s gets GPU
s mod n_gpus through CUDA_VISIBLE_DEVICES (round-robin, so --parallel 4 on 2 GPUs puts two
runs on each). On the CPU the cores are split: each run gets OMP_NUM_THREADS = cores //
parallel (at least 1), which torch reads at start-up as its intra-op thread count, so two
runs on 2 cores do not each start 2 threads and fight over them. A value the user set in the
environment is left alone.

Shutdown. `shutdown()` sets every run's stop event: each thread stops its child (SIGTERM,
grace, SIGKILL; train.py writes status "interrupted") and returns. A resumed search finds
those folders unfinished and runs them again. If the orchestrator is SIGKILLed instead, the
kernel sends each child SIGTERM (PR_SET_PDEATHSIG, tied to the thread that started it).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from nas_agent_graph.launcher import LaunchCancelled, LaunchResult, launch_run
from nas_agent_graph.ray_launcher import ray_launch_run

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "ray")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_WAIT_STEP_S = 1.0  # how often a blocked wait wakes up (so Ctrl-C is seen promptly)


@dataclass
class RunSpec:
    """Everything one launch needs besides the pool's own settings."""
    run_id: str
    run_dir: Path
    config_text: str
    extra_args: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    on_progress: Callable[[list[dict]], None] | None = None


@dataclass
class _Flight:
    spec: RunSpec
    slot: int
    stop: threading.Event
    future: cf.Future


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPU ids runs may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def slot_env(slot: int, parallel: int, env: Mapping[str, str], gpus: list[str], cores: int) -> dict[str, str]:
    """The environment variables a run in `slot` gets on top of `env` (see the module docstring)."""
    out: dict[str, str] = {}
    if gpus:
        out["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    if parallel > 1:
        threads = str(max(1, cores // parallel))
        for var in THREAD_VARS:
            if var not in env:
                out[var] = threads
    return out


class RunPool:
    """Up to `parallel` runs at once, through the local launcher or Ray (see the module docstring).

    `launch_kwargs` are passed to every launch (python, train_script, runs_dir, timeout_s, ...).
    """

    def __init__(self, parallel: int, launcher: str = "local", *, env: Mapping[str, str] | None = None,
                 launch_kwargs: dict[str, Any] | None = None, ray_options: dict[str, Any] | None = None,
                 ray_local: bool = True):
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {parallel}")
        if launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
        self.parallel = parallel
        self.launcher = launcher
        self.env = dict(os.environ if env is None else env)
        self.launch_kwargs = dict(launch_kwargs or {})
        self.ray_options = dict(ray_options or {})
        self.ray_local = ray_local  # a local Ray cluster shares this machine's paths
        self.gpus = visible_gpus(self.env) if launcher == "local" else []
        self.cores = cpu_count()
        self._flights: dict[str, _Flight] = {}
        # More threads than slots: a resumed search may hold more runs in flight than this session's --parallel.
        self._executor = cf.ThreadPoolExecutor(max_workers=max(parallel, 1) * 2, thread_name_prefix="run")
        if parallel > 1:
            where = f"GPUs {','.join(self.gpus)} round-robin" if self.gpus else \
                f"{max(1, self.cores // parallel)} CPU thread(s) each"
            log.info("up to %d runs at once (%s launcher; %s)", parallel, launcher, where)

    # ------------------------------------------------------------------ queries

    def running(self) -> list[str]:
        """Run ids submitted and not yet collected."""
        return sorted(self._flights)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._flights

    # ------------------------------------------------------------------ submit and collect

    def submit(self, spec: RunSpec) -> None:
        """Start `spec` in a free slot (a run already submitted is left as it is)."""
        if spec.run_id in self._flights:
            return
        used = {f.slot for f in self._flights.values()}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        stop = threading.Event()
        future = self._executor.submit(self._launch, spec, slot, stop)
        self._flights[spec.run_id] = _Flight(spec, slot, stop, future)

    def _launch(self, spec: RunSpec, slot: int, stop: threading.Event) -> LaunchResult:
        if stop.is_set():  # queued behind other runs while the search shut down: never start it
            raise LaunchCancelled(f"{spec.run_id}: the search shut down before it started")
        common = dict(run_id=spec.run_id, extra_args=spec.extra_args, files=spec.files,
                      on_progress=spec.on_progress, stop_event=stop)
        if self.launcher == "ray":
            # The worker's own python; the caps (--run-memory, the CPU backstop) go with the task and
            # are set on train.py by the node that runs it.
            kw = {k: v for k, v in self.launch_kwargs.items() if k != "python"}
            env = self.ray_env()
            # Ray picks the GPU (num_gpus); the task's CPUs are its share of its node's cores.
            threads = str(max(1, int(self.ray_options.get("num_cpus", 1))))
            env.update({var: threads for var in THREAD_VARS if var not in self.env})
            return ray_launch_run(spec.run_dir, spec.config_text, **common, **kw, env_overrides=env,
                                  **self.ray_options)
        extra_env = slot_env(slot, self.parallel, self.env, self.gpus, self.cores)
        return launch_run(spec.run_dir, spec.config_text, **common, **self.launch_kwargs,
                          env={**self.env, **extra_env})

    def ray_env(self) -> dict[str, str]:
        """What a Ray worker's environment gets from ours. A local cluster (--ray-address omitted)
        shares this machine, so it gets the project's NAS_* settings (the data dir) and whatever
        the caller's env sets differently from this process's; a joined cluster's nodes keep their
        own (NAS_DATA_DIR set on each node before `ray start`, see docs/ray.md)."""
        if not self.ray_local:
            return {}
        out = {k: v for k, v in self.env.items() if k.startswith("NAS_")}
        out.update({k: v for k, v in self.env.items() if os.environ.get(k) != v and k not in ("PWD", "OLDPWD")})
        return out

    def wait_any(self, timeout_s: float | None = None) -> tuple[str, LaunchResult] | None:
        """Block until a run ends; return (run_id, result) of the lowest finished run id and forget
        it, or None after `timeout_s`. A launch that raised re-raises here (after forgetting it)."""
        if not self._flights:
            raise RuntimeError("wait_any: no run is in flight")
        waited = 0.0
        while True:
            futures = [f.future for f in self._flights.values()]
            step = _WAIT_STEP_S if timeout_s is None else min(_WAIT_STEP_S, max(timeout_s - waited, 0.0))
            done, _ = cf.wait(futures, timeout=step, return_when=cf.FIRST_COMPLETED)
            if done:
                break
            waited += step
            if timeout_s is not None and waited >= timeout_s:
                return None
        run_id = min(r for r, f in self._flights.items() if f.future.done())
        flight = self._flights.pop(run_id)
        return run_id, flight.future.result()

    def shutdown(self, grace_s: float = 60.0) -> None:
        """Stop every run in flight and wait (up to grace_s per run) for its thread to finish."""
        for flight in self._flights.values():
            flight.stop.set()
            flight.future.cancel()  # a run still queued for a thread never starts
        for run_id, flight in list(self._flights.items()):
            try:
                flight.future.result(timeout=grace_s)
            except (LaunchCancelled, cf.CancelledError):
                log.info("%s: stopped; a resumed search runs it again", run_id)
            except cf.TimeoutError:
                log.error("%s: still running %gs after the stop request; check `ps` for its train.py", run_id,
                          grace_s)
            except Exception:  # noqa: BLE001 - shutting down: report, do not mask the original error
                log.exception("%s: its launch failed while the search shut down", run_id)
        self._flights.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
