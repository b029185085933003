"""Ensemble selection over a study's best runs (Caruana et al., ICML 2004).

A search leaves many good models whose errors differ, and on ETTh1 the validation MSE of the
best ones differs by less than its noise. Averaging their forecasts is cheaper than another run
and is the standard last step of AutoML systems; this module builds that average at the end of
a study (and on demand: `python -m nas_agent_graph ensemble`).

The method is forward selection with replacement, as in the paper:
1. the library is the `pool` best scored runs by validation MSE, and the best run of each model
   family, whose best_model.pth is still on disk (checkpoint retention keeps these runs'
   weights). The family bests are there for diversity: on a CPU, with a short run budget, a
   study's best runs are often all one family (linear models converge first), whose errors are
   alike, so averaging them gains little; a model of another family that validates a little
   worse may still lower the average's validation MSE, and the selection decides that;
2. each member's forecasts for every validation and test window are the run's forecasts.npz,
   written by train.py with its checkpoint; a run without one (older, or too wide a data set)
   gets it from `train.py --predict` in a subprocess (a run's model file may be LLM-written
   code: it never runs in this process);
3. starting from nothing, each step adds (again, possibly) the run whose addition gives the
   lowest validation MSE of the averaged forecast; after `steps` steps the ensemble is the prefix
   with the lowest validation MSE. A run's weight is how often it was chosen.
4. bagged (the default, `bags` > 0): step 3 is done `bags` times, each over a random half of
   the library, and the ensemble is the average of the bags' ensembles (the paper's bagging). A
   run that wins only by fitting the validation windows' noise wins only in the bags that hold
   it. It became the default by a rule fixed before its last study: on TPE seeds 7-10 its MSE on
   validation windows it was not selected on was lower than one selection's (bench/ensemble_halves.py,
   docs/search.md). `bags=0` (`ensemble --bags 0`) is the single selection of step 3.

Only validation forecasts take part in the selection. The test forecasts are averaged with the
chosen weights afterwards and scored once, for the report; they never reach the search, whose
runs are all finished by then. Every test window is scored, as for a single run.

Seed averaging (`seeds` > 0, `ensemble --seeds K`): after the selection, each member is trained
again by train.py from its config_used.py (and model file) with K more seeds, into
runs/seed_runs/<run_id>_s<seed>/, and its forecasts are averaged over its seeds; the ensemble keeps
the weights chosen above. It chooses nothing: it lowers the members' seed variance, which the
selection rewards (a member picked for its val MSE was often a lucky seed). A finished seed run is
reused, so a killed build resumes; a seed run that fails is a note, and its member averages the
seeds that scored. The extra training is outside the study's budget: its train_time_sec is recorded.

The result is runs/ensemble.json (written atomically): members and weights, validation and test
MSE/MAE of the ensemble and of the best single run, and how to rebuild it.
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas_agent import forecasts as forecasts_file
from nas_agent.atomic import atomic_write_json
from nas_agent.agent_state import AgentState, RunInfo, utc_now_iso
from nas_agent.logging_utils import MetricsError, load_metrics
from nas_agent.run_folder import (CHECKPOINT_FILE, CONFIG_FILE, CONFIG_USED_FILE, FORECASTS_FILE, METRICS_FILE,
                                  MODEL_FILE, SCORED)
from nas_agent_graph.limits import default_run_memory_gb, run_caps
from nas_agent_graph.paths import TRAIN_SCRIPT
from nas_agent_graph.retention import DEFAULT_KEEP, run_family, scored_runs
from nas_agent_graph.process import run_child

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.json"
DEFAULT_POOL = DEFAULT_KEEP  # the runs retention keeps by default: their weights exist
BAG_FRACTION = 0.5  # each bag draws each run with this chance (Caruana et al. 2004 used half the library)
DEFAULT_STEPS = 20  # Caruana's library had thousands of models; for a handful, 20 picks resolve weights to 5%
DEFAULT_BAGS = 20  # Caruana et al. 2004 averaged 20 bags; 0 is one selection over the whole library
PREDICT_TIMEOUT_S = 900.0  # one evaluation of both splits; the default Informer takes about 2 minutes on 2 CPU cores
SEED_RUNS_DIR = "seed_runs"  # under runs/: not run_NNNN, so no study's scan takes these folders for its runs
# A seed run trains under its member's own budget (training.time_budget_s); this only stops a hung one.
RETRAIN_TIMEOUT_S = 1800.0


class EnsembleError(Exception):
    """No ensemble can be built (no scored run with a checkpoint, forecasts that disagree)."""


@dataclass(frozen=True)
class Forecasts:
    run_id: str
    val: np.ndarray
    test: np.ndarray
    val_target: np.ndarray
    test_target: np.ndarray


def pool_runs(study: AgentState, runs_dir: Path, pool: int, *, families: bool = True) -> tuple[list[RunInfo], list[str]]:
    """The `pool` best scored runs by validation MSE (one per config) that still have a checkpoint
    and, with `families`, the best run with a checkpoint of each model family not among them (so
    that the library is not all one family), best first; and a note for each run passed over for
    lack of a checkpoint: among the `pool` best, and each family's best."""
    has_weights: dict[str, bool] = {}

    def usable(run: RunInfo, note: bool = True) -> bool:
        if run.run_id not in has_weights:
            run_dir = runs_dir / run.run_id
            has_weights[run.run_id] = (run_dir / CHECKPOINT_FILE).is_file() or (run_dir / FORECASTS_FILE).is_file()
            if not has_weights[run.run_id] and note:
                skipped.append(f"{run.run_id} (val {run.val_mse:.4f}): no {CHECKPOINT_FILE} (deleted by retention)")
        return has_weights[run.run_id]

    ranked, chosen, skipped = scored_runs(study), [], []
    for run in ranked:
        if len(chosen) == pool:
            break
        if usable(run):
            chosen.append(run)
    if families:  # a study from before retention kept family bests may have only a worse run's weights
        covered, noted = {run_family(r) for r in chosen}, set()
        for run in ranked:
            family = run_family(run)
            if family not in covered and usable(run, note=family not in noted):
                chosen.append(run)
                covered.add(family)
            noted.add(family)
    return sorted(chosen, key=lambda r: r.val_mse), skipped


def forecasts(run: RunInfo, runs_dir: Path, *, python: str = sys.executable,
              timeout_s: float = PREDICT_TIMEOUT_S) -> Forecasts:
    """A run's validation and test forecasts and targets: its forecasts.npz, written first by
    `train.py --predict` if the run has none."""
    run_dir = runs_dir / run.run_id
    path = run_dir / FORECASTS_FILE
    if not path.is_file():
        _predict(run, run_dir, runs_dir, path, python, timeout_s)
    return load_forecasts(run_dir)


def load_forecasts(run_dir: Path) -> Forecasts:
    """The forecasts.npz in run_dir (a run or a seed run), named after the folder. Raises
    EnsembleError when it is missing or unreadable."""
    try:
        f = forecasts_file.load(run_dir / FORECASTS_FILE)
    except (OSError, ValueError) as e:
        raise EnsembleError(f"{run_dir.name}: {e}; delete it to have it made again") from None
    return Forecasts(run_dir.name, f["val"], f["test"], f["val_target"], f["test_target"])


def _predict(run: RunInfo, run_dir: Path, runs_dir: Path, out: Path, python: str, timeout_s: float) -> None:
    run_dir, runs_dir, out = run_dir.resolve(), runs_dir.resolve(), out.resolve()  # the child runs elsewhere
    config = run_dir / CONFIG_USED_FILE
    if not config.is_file():
        config = run_dir / CONFIG_FILE
    cmd = [python, str(TRAIN_SCRIPT), "--config", str(config), "--tag", run.run_id,
           "--runs-dir", str(runs_dir), "--predict", str(out)]
    if (run_dir / MODEL_FILE).is_file():  # the run trained a proposed model file
        cmd += ["--model", str(run_dir / MODEL_FILE)]
    log.info("%s: no %s; predicting from its checkpoint", run.run_id, FORECASTS_FILE)
    try:
        # A run's caps: the default --run-memory of one run at a time, and CPU time for the timeout.
        proc = run_child(cmd, timeout_s=timeout_s, caps=run_caps(default_run_memory_gb(1), timeout_s))
    except subprocess.TimeoutExpired:
        raise EnsembleError(f"{run.run_id}: train.py --predict took more than {timeout_s:g}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise EnsembleError(f"{run.run_id}: train.py --predict exited {proc.returncode}: {tail[0]}")


def _scored_metrics(folder: Path) -> dict | None:
    """The metrics of a seed run that ended scored (status in SCORED) with its forecasts; else None
    (not run, killed, failed, or a metrics.json that cannot be read)."""
    try:
        metrics = load_metrics(folder)
    except MetricsError:
        return None
    return metrics if metrics and metrics["status"] in SCORED and (folder / FORECASTS_FILE).is_file() else None


def retrain(run_dir: Path, seed: int, *, python: str = sys.executable,
            timeout_s: float = RETRAIN_TIMEOUT_S) -> tuple[Path, dict]:
    """Train run_dir's config (its config_used.py, and its model file if it had one) again with
    `seed` into runs/seed_runs/<run id>_s<seed>/ (runs: run_dir's parent); that folder and its
    metrics. A folder already scored is reused, so a killed caller resumes. A run's model file may
    be LLM-written code: it trains as the search's runs do, in a capped child process with a
    wall-clock limit. Raises EnsembleError when the run does not end scored."""
    run_dir = run_dir.resolve()  # the child runs elsewhere
    into = run_dir.parent / SEED_RUNS_DIR
    folder = into / f"{run_dir.name}_s{seed}"
    if (metrics := _scored_metrics(folder)) is not None:  # "timeout": the run's budget ended it, scored
        return folder, metrics
    config = run_dir / CONFIG_USED_FILE
    if not config.is_file():
        raise EnsembleError(f"{run_dir.name}: no {CONFIG_USED_FILE} to train it again from")
    cmd = [python, str(TRAIN_SCRIPT), "--config", str(config), "--tag", folder.name, "--runs-dir", str(into),
           "--seed", str(seed), "--overwrite"]
    if (run_dir / MODEL_FILE).is_file():
        cmd += ["--model", str(run_dir / MODEL_FILE)]
    log.info("%s: training it again with seed %d into %s", run_dir.name, seed, folder)
    try:
        proc = run_child(cmd, timeout_s=timeout_s, caps=run_caps(default_run_memory_gb(1), timeout_s))
    except subprocess.TimeoutExpired:
        raise EnsembleError(f"{folder.name}: train.py took more than {timeout_s:g}s") from None
    except (RuntimeError, OSError) as e:  # could not start it (fork, prctl, the caps)
        raise EnsembleError(f"{folder.name}: {e}") from None
    if (metrics := _scored_metrics(folder)) is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise EnsembleError(f"{folder.name}: train.py exited {proc.returncode} without a scored {METRICS_FILE} "
                            f"and {FORECASTS_FILE}: {tail[0]}")
    return folder, metrics


@dataclass(frozen=True)
class SeedRuns:
    """A run's forecasts over its own seed and the seed runs that scored (own first), those seeds,
    their training time (train_time_sec, reused runs included) and a note per seed run left out."""
    forecasts: list[Forecasts]
    seeds: list[int]
    train_s: float
    notes: list[str]


def seed_runs(run_dir: Path, own: Forecasts, seeds: int, *, python: str = sys.executable,
              timeout_s: float = RETRAIN_TIMEOUT_S) -> SeedRuns:
    """`own` (the run's forecasts) and those of `seeds` more seeds (its seed + 1 .. + seeds), each
    trained or reused by retrain; a seed run that fails or forecasts other windows is a note.
    Raises EnsembleError when the run's metrics.json names no seed."""
    try:
        first = int((load_metrics(run_dir) or {})["seed"])
    except (MetricsError, KeyError, TypeError, ValueError):
        raise EnsembleError(f"{run_dir.name}: no seed in its {METRICS_FILE}") from None
    forecasts, used, notes, train_s = [own], [first], [], 0.0
    for seed in range(first + 1, first + seeds + 1):
        try:
            folder, metrics = retrain(run_dir, seed, python=python, timeout_s=timeout_s)
            f = load_forecasts(folder)
        except EnsembleError as e:
            notes.append(f"seed run left out: {e}")
            continue
        if not (np.array_equal(f.val_target, own.val_target) and np.array_equal(f.test_target, own.test_target)):
            notes.append(f"seed run left out: {folder.name}: its windows differ from {run_dir.name}'s")
            continue
        forecasts.append(Forecasts(own.run_id, f.val, f.test, own.val_target, own.test_target))
        used.append(seed)
        train_s += float(metrics.get("train_time_sec") or 0.0)
    return SeedRuns(forecasts, used, train_s, notes)


def seed_averaged(members: list[str], library: dict[str, Forecasts], runs_dir: Path, seeds: int, *,
                  python: str = sys.executable, timeout_s: float = RETRAIN_TIMEOUT_S
                  ) -> tuple[dict[str, Forecasts], dict[str, dict], list[str]]:
    """Each member's forecasts averaged over its seed runs (seed_runs); per member, the seeds that
    took part, their val MSEs and training time; and the notes."""
    averaged, info, notes = {}, {}, []
    for rid in members:
        own = library[rid]
        try:
            runs = seed_runs(runs_dir / rid, own, seeds, python=python, timeout_s=timeout_s)
        except EnsembleError as e:
            notes.append(f"{e}; it keeps its one seed")
            averaged[rid], info[rid] = own, {"seeds": [], "val_mse": [mse(own.val, own.val_target)], "train_s": 0.0}
            continue
        notes += runs.notes

        def mean(split: str) -> np.ndarray:
            return np.mean([getattr(f, split).astype(np.float64) for f in runs.forecasts], axis=0)
        averaged[rid] = Forecasts(rid, mean("val"), mean("test"), own.val_target, own.test_target)
        info[rid] = {"seeds": runs.seeds, "val_mse": [mse(f.val, own.val_target) for f in runs.forecasts],
                     "train_s": runs.train_s}
    return averaged, info, notes


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    return forecasts_file.errors(pred, target)[0]


def select(val: dict[str, np.ndarray], target: np.ndarray, steps: int) -> list[str]:
    """Forward selection with replacement on the validation forecasts: the chosen run ids, in
    order, one per pick (a run picked k times has weight k / len). Ties go to the earlier run
    in `val`'s order (the better single run, as pool_runs orders them)."""
    if not val:
        raise EnsembleError("no forecasts to select from")
    total = np.zeros_like(target, dtype=np.float64)
    picks: list[str] = []
    best_len, best_mse = 0, math.inf
    for step in range(1, steps + 1):
        scores = {rid: mse((total + f) / step, target) for rid, f in val.items()}
        rid = min(scores, key=scores.get)
        total += val[rid]
        picks.append(rid)
        if scores[rid] < best_mse * (1 - 1e-12):  # a real improvement, not float rounding of the same mean
            best_len, best_mse = step, scores[rid]
    return picks[:best_len]


def select_bagged(val: dict[str, np.ndarray], target: np.ndarray, steps: int, bags: int,
                  seed: int = 0) -> tuple[dict[str, float], Counter]:
    """Bagged ensemble selection (Caruana et al., 2004): `bags` times, forward selection over a
    random half of the library (BAG_FRACTION); the ensemble is the average of the bags' ensembles.
    A run that wins only by fitting the validation windows' noise wins in the bags that hold it,
    not in the others, so its weight shrinks; the selection stays on validation only. Returns the
    weights (summing to 1) and each run's picks over all bags. Seeded: the same library gives
    the same ensemble."""
    rng = np.random.default_rng(seed)
    ids = list(val)
    weights: Counter = Counter()
    picks: Counter = Counter()
    for _ in range(bags):
        bag = [rid for rid in ids if rng.random() < BAG_FRACTION] or ids[:1]  # an empty bag: the best run
        chosen = Counter(select({rid: val[rid] for rid in bag}, target, steps))
        for rid, k in chosen.items():
            weights[rid] += k / sum(chosen.values()) / bags
        picks.update(chosen)
    return dict(weights), picks


def select_weights(val: dict[str, np.ndarray], target: np.ndarray, steps: int,
                   bags: int) -> tuple[dict[str, float], Counter]:
    """The ensemble's weights (summing to 1) and each run's picks: one forward selection (bags=0),
    whose weights are its picks' shares, or the bagged selection."""
    if bags:
        return select_bagged(val, target, steps, bags)
    picks = Counter(select(val, target, steps))
    return {rid: k / sum(picks.values()) for rid, k in picks.items()}, picks


def build(study: AgentState, runs_dir: Path, *, pool: int = DEFAULT_POOL, steps: int = DEFAULT_STEPS,
          families: bool = True, bags: int = DEFAULT_BAGS, seeds: int = 0, python: str = sys.executable,
          retrain_timeout_s: float = RETRAIN_TIMEOUT_S) -> dict:
    """Select an ensemble from the study's runs (the `pool` best and, with `families`, each
    family's best) and score it; the record ensemble.json holds. bags=0: one selection, not bagged.
    seeds > 0: the members, trained again with that many more seeds each, averaged over them."""
    if pool < 1 or steps < 1 or bags < 0 or seeds < 0:
        raise EnsembleError(f"pool and steps must be >= 1, bags and seeds >= 0 (got pool {pool}, steps {steps}, "
                            f"bags {bags}, seeds {seeds})")
    runs, skipped = pool_runs(study, runs_dir, pool, families=families)
    if not runs:
        raise EnsembleError(f"no scored run (status {' or '.join(SCORED)}) with a {CHECKPOINT_FILE} under "
                            f"{runs_dir}; train some runs first, or keep their checkpoints (--keep-checkpoints)")
    library: dict[str, Forecasts] = {}
    reference = None
    for run in runs:
        try:
            f = forecasts(run, runs_dir, python=python)
        except EnsembleError as e:
            skipped.append(str(e))
            continue
        # Same windows, same targets, and the recorded val MSE: else it is not the study's task.
        if reference is not None and (f.val_target.shape != reference.val_target.shape
                                      or not np.array_equal(f.val_target, reference.val_target)
                                      or not np.array_equal(f.test_target, reference.test_target)):
            skipped.append(f"{run.run_id}: its validation/test targets differ from {reference.run_id}'s "
                           f"(another data file, split or horizon)")
            continue
        if not math.isclose(val_mse := mse(f.val, f.val_target), run.val_mse, rel_tol=1e-4):
            skipped.append(f"{run.run_id}: its checkpoint gives val MSE {val_mse:.6f}, not the recorded {run.val_mse:.6f}")
            continue
        reference = reference or f
        library[run.run_id] = f
    if not library:
        raise EnsembleError("no run's forecasts could be used: " + "; ".join(skipped))
    weights, picks = select_weights({rid: f.val for rid, f in library.items()}, reference.val_target, steps, bags)

    def scores(members: dict[str, Forecasts]) -> dict[str, float]:
        """Val and test MSE/MAE of the weighted average; test is scored once, after the selection."""
        out = {}
        for split in ("val", "test"):
            blend = sum(getattr(members[rid], split).astype(np.float64) * w for rid, w in weights.items())
            out[f"{split}_mse"], out[f"{split}_mae"] = forecasts_file.errors(blend, getattr(reference, f"{split}_target"))
        return out
    seeded: dict = {}
    if seeds:
        averaged, info, notes = seed_averaged(list(weights), library, runs_dir, seeds, python=python,
                                              timeout_s=retrain_timeout_s)
        seeded = {"single_seed": scores(library), "seed_runs": info, "seed_notes": notes,
                  "seed_runs_train_s": round(sum(i["train_s"] for i in info.values()), 1)}
        library = {**library, **averaged}
    result = scores(library)
    by_id = {r.run_id: r for r in runs}
    best = runs[0] if runs[0].run_id in library else by_id[next(iter(library))]
    record = {
        "created_at": utc_now_iso(),
        "method": "forward selection with replacement on validation MSE (Caruana et al., 2004)"
                  + (f", bagged: {bags} bags of about {BAG_FRACTION:.0%} of the library, averaged" if bags else ""),
        "pool": pool, "steps": steps, "families": families, "bags": bags,
        "library_rule": f"the {pool} best runs by val MSE" + (" and each model family's best" if families else ""),
        "members": [{"run_id": rid, "weight": round(w, 6), "picks": picks[rid],
                     "val_mse": by_id[rid].val_mse, "test_mse": by_id[rid].test_mse,
                     "family": run_family(by_id[rid])}
                    for rid, w in sorted(weights.items(), key=lambda kv: -kv[1])],
        **result, "seeds": seeds, **seeded,
        "best_single": {"run_id": best.run_id, "val_mse": best.val_mse, "val_mae": best.val_mae,
                        "test_mse": best.test_mse, "test_mae": best.test_mae},
        "windows": {"val": int(reference.val_target.shape[0]), "test": int(reference.test_target.shape[0])},
        "library": list(library), "skipped": skipped,
        "rebuild": f"python -m nas_agent_graph ensemble --pool {pool} --steps {steps}" + ("" if families else " --top-only")
                   + f" --bags {bags}" + (f" --seeds {seeds}" if seeds else ""),  # explicit: defaults change
    }
    return record


def write(record: dict, runs_dir: Path) -> Path:
    path = runs_dir / ENSEMBLE_FILE
    atomic_write_json(path, record)
    return path


def summary(record: dict) -> str:
    """One line per fact, `key: value`, for the end of a study and the subcommand."""
    # A plain selection's weights are its picks; a bagged one's picks are summed over its bags: its weights.
    share = (lambda m: f" {m['weight']:.1%}") if record.get("bags") else (lambda m: f"x{m['picks']}")
    members = ", ".join(m["run_id"] + share(m) + (f" ({m['family']})" if m.get("family") else "")
                        for m in record["members"])
    best = record["best_single"]
    lines = [f"ensemble_members: {members}",
             f"ensemble_val_mse: {record['val_mse']:.6f}",
             f"ensemble_test_mse: {record['test_mse']:.6f}",
             f"best_single_run: {best['run_id']} (val {best['val_mse']:.6f}, test {best['test_mse']:.6f})"]
    if record.get("seeds"):
        runs = sum(len(i["seeds"]) - 1 for i in record["seed_runs"].values() if i["seeds"])
        single = record["single_seed"]
        lines += [f"ensemble_seeds: each member averaged over its own seed and up to {record['seeds']} more "
                  f"({runs} seed runs, train_time_sec {record['seed_runs_train_s']:.0f})",
                  f"ensemble_single_seed: val {single['val_mse']:.6f}, test {single['test_mse']:.6f}"]
        lines += [f"ensemble_seed_note: {n}" for n in record["seed_notes"]]
    lines += [f"ensemble_skipped: {s}" for s in record["skipped"]]
    return "\n".join(lines)


def load(runs_dir: Path) -> dict | None:
    path = runs_dir / ENSEMBLE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
