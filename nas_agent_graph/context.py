"""What one invocation of the orchestrator was asked to do (Context: frozen settings), and the
live objects it works with (Session).

Settings come from the command line and are not part of the checkpointed graph state: a resumed
study may be continued with a larger --max-runs or a new --run-timeout. The CLI reads its
defaults from here, so each default is written once. Nodes read settings and never assign to
them; what a session builds or measures as it goes (the proposer, the pool of runs in flight,
the display, the clock) lives in ctx.session.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nas_agent_graph.paths import PROJECT_MODEL, TRAIN_SCRIPT
from nas_agent_graph.prompting import DEFAULT_PROMPT_TOKENS


@dataclass
class Session:
    """The live objects of one invocation: built by the CLI (or a test) or on first use, never
    checkpointed, and the only part of the context that changes while the graph runs."""

    proposer: Any = None
    """The study's proposer (an Optuna sampler, the LLM or the hybrid)."""
    archetypes: Any = None
    """The warm start's ArchetypeProposer, or None without --warm-start configs."""
    space: Any = None
    """The SearchSpace loaded from space_path."""
    display: Any = None
    """The live panel or the plain log (nas_agent_graph.display)."""
    pool: Any = None
    """The runs in flight (nas_agent_graph.pool.RunPool), made on first use."""
    mirror: Any = None
    """The session's runs/optuna.db writer (nas_agent_graph.optuna_mirror.Mirror), made on first use."""
    phases: Any = None
    """The session's timing log, runs/phases.jsonl (nas_agent_graph.phases.PhaseLog), made on first use."""
    started_at: float = 0.0
    """time.monotonic() when study time was last counted, for the study's time budget."""
    free_llm: bool = False
    """Free the LLM's memory before each training run: set when the LLM loaded on the GPU the runs use."""

    def show(self, event: str, **kw) -> None:
        """Tell the display (if any) about an event: on_propose, on_launch, on_epoch, ..."""
        if self.display is not None:
            getattr(self.display, event)(**kw)


@dataclass(frozen=True)
class Context:
    state_path: Path = Path("agent_state.json")
    """agent_state.json: the study's single source of truth."""
    runs_dir: Path = Path("runs")
    """Parent of the run folders; also holds the checkpoint database and the report."""
    config_path: Path = Path("config.py")
    """The incumbent config: the study's starting point, overwritten by each accepted run."""
    max_runs: int = 100
    """Total runs in the study, earlier sessions included."""
    proposer: str = "tpe"
    """tpe | cmaes | random (Optuna alone), llm (the LLM alone) or hybrid (the LLM picks among the
    sampler's candidates). The CLI defaults to hybrid; this dataclass to tpe, so tests and library
    users get no model load unless they ask for one."""
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """--set KEY=VALUE applied to every proposal (e.g. training.max_epochs=3)."""
    space_path: Optional[Path] = None
    warm_start: tuple[Path, ...] = ()
    """Configs trained right after the baseline, one run each (proposer "archetype"); the CLI
    defaults to the shipped ones (nas_agent_graph/archetypes.py), this dataclass to none."""
    run_timeout: Optional[float] = None
    """Hard wall-clock limit per train.py process, seconds; the process group is killed."""
    max_params: Optional[int] = None
    min_delta: float = 0.0
    """Accept only when val_mse < best - min_delta."""
    patience: Optional[int] = None
    """Stop after this many runs in a row without an accepted improvement."""
    time_budget: Optional[float] = None
    """Stop once the study has used this many seconds of wall-clock time (all sessions)."""
    target_mse: Optional[float] = None
    max_retries: int = 3
    """Invalid proposals allowed for one run before the search stops."""
    max_failures: int = 3
    """Failed runs in a row before the search stops with a diagnosis."""
    smoke_timeout: float = 120.0
    smoke_in_run: bool = True
    """Smoke-test config proposals inside their own train.py, before training, where that is safe
    (validation.smoke_in_run: one run at a time, the project's model file); False: always in a subprocess
    of `validate`. Model code from the LLM is always checked in a subprocess first."""
    run_memory_gb: Optional[float] = None
    """Memory cap of each smoke test and train.py run, GB (--run-memory; nas_agent_graph/limits.py).
    None: no memory cap (the CLI's default is computed from the machine's memory and --parallel)."""
    optuna_mirror: bool = False
    """Mirror the study into runs/optuna.db for optuna-dashboard (nas_agent_graph/optuna_mirror.py);
    the CLI turns it on."""
    keep_checkpoints: Optional[int] = None
    """Keep best_model.pth of every incumbent, of this many best runs and of each model family's
    best, delete the others' (nas_agent_graph/retention.py); None keeps them all (the CLI defaults to retention.DEFAULT_KEEP)."""
    ensemble_pool: Optional[int] = None
    """At the end of the study, select an ensemble from the forecasts of this many best runs and of
    each model family's best (runs/ensemble.json, nas_agent_graph/ensemble.py); None: none (the CLI defaults to ensemble.DEFAULT_POOL)."""
    confirm_seeds: int = 1
    """> 1: a run that beats the incumbent is accepted only after it and the incumbent ran with
    this many seeds each and the difference is significant (nas_agent_graph/study/confirmation.py)."""
    prune: str = "none"
    """Learning-curve pruning of running runs: none | median | asha (nas_agent_graph/pruning.py)."""
    prune_warmup_epochs: int = 1
    """No run is pruned at an epoch <= this."""
    prune_min_runs: int = 3
    """No run is pruned before this many runs have finished (status ok or timeout)."""

    parallel: int = 1
    """Runs at once (--parallel N); each gets a GPU round-robin, or a share of the CPU cores."""
    launcher: str = "local"
    """local (train.py subprocesses on this machine) or ray (one Ray task per run; see ray_launcher.py)."""
    ray_address: Optional[str] = None
    """--ray-address: None starts a local Ray cluster; "auto" or HOST:PORT joins a running one."""
    ray_options: dict[str, Any] = field(default_factory=dict)
    """Resources of each run's Ray task: {num_cpus, num_gpus}."""

    # The LLM (proposer llm or hybrid).
    llm: Optional[str] = None
    """Model: a Hugging Face id, a local directory or .gguf file; None = $NAS_LLM, else the embedded model."""
    llm_quant: Optional[str] = None
    """4bit | 8bit | none; None = 4bit on CUDA, none on the CPU."""
    generation: dict[str, Any] = field(default_factory=dict)
    """Generation settings for the chat model: temperature, top_p, top_k, max_new_tokens."""
    sampler: str = "tpe"
    """The Optuna sampler of the hybrid proposer (tpe, cmaes or random)."""
    sampler_fraction: float = 0.25
    """Hybrid: this fraction of runs comes from the sampler alone (0.25 = every 4th run)."""
    n_candidates: int = 4
    """Hybrid: candidates the sampler suggests for the LLM to pick from or edit."""
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    """Upper bound on a prompt, in the model's tokens (fewer past runs are shown to fit)."""
    allow_code: bool = False
    """Let the LLM propose model code (a new model.py) for some runs; see code_fraction."""
    code_fraction: float = 0.2
    """With allow_code: this fraction of LLM runs asks for model code instead of a config."""
    model_path: Path = PROJECT_MODEL
    """The incumbent model file: runs train it, accepted model-code proposals replace it."""
    lora: Any = None
    """LoraSettings for the LLM's fine-tuning (None: nas_agent_graph.lora.adapters.LoraSettings())."""
    python: str = sys.executable
    train_script: Path = TRAIN_SCRIPT
    env: Optional[dict[str, str]] = None
    """Environment of train.py subprocesses (default: this process's)."""

    session: Session = field(default_factory=Session, compare=False)
    """The live objects (not settings); see Session."""

    @property
    def model_file(self) -> Optional[Path]:
        """The model file runs use: None for the project's own model.py (train.py's default)."""
        return None if self.model_path.resolve() == PROJECT_MODEL.resolve() else self.model_path

    @property
    def checkpoint_path(self) -> Path:
        return self.runs_dir / "checkpoints.sqlite"
