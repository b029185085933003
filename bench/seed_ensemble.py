"""Seed-averaged ensembles (issue 12): does training each member of a study's ensemble with more
seeds, and averaging its forecasts over them, lower the ensemble's error?

    NAS_DATA_DIR=../shared/data python bench/seed_ensemble.py --study DIR/tpe_seed4 [--seeds 2] [--write]

A finished study's ensemble (runs/ensemble.json, from `python -m nas_agent_graph ensemble` or the
search's end) names its members and their weights, chosen on validation. Each member is trained
again by train.py from its config_used.py (its model file too, if it had one) with `--seeds` more
seeds, into STUDY/runs/seed_runs/<run_id>_s<seed>/ (where `ensemble --seeds K` trains them too); a
scored folder with its forecasts.npz is reused, so a killed benchmark resumes. The study's own folders are only read.

Per study, three ensembles are scored on validation and on test (every window):
- study: the members' forecasts as the search left them, the recorded weights;
- seed-averaged: each member's forecast averaged over its seeds, the same weights;
- reselected: forward selection again over the seed-averaged members (validation only).
Seed averaging is variance reduction: it chooses nothing, and test MSE steers nothing here.
The extra runs' training time (train_time_sec, from their metrics.json) is printed; it is compute
the study's budget did not include.

A benchmark: it prints tables and asserts nothing; --write also writes bench/results/seed_ensemble.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from nas_agent_graph import ensemble  # noqa: E402

RESULTS_MD = ROOT / "bench" / "results" / "seed_ensemble.md"


def members(study: Path) -> dict[str, float]:
    """{run_id: weight} of the study's ensemble, from runs/ensemble.json."""
    record = ensemble.load(study / "runs")
    if record is None:
        raise SystemExit(f"{study}: no runs/ensemble.json; build it first with "
                         f"`python -m nas_agent_graph ensemble --state {study}/agent_state.json --runs-dir {study}/runs`")
    return {m["run_id"]: m["weight"] for m in record["members"]}


def member_runs(study: Path, run_id: str, seeds: int) -> ensemble.SeedRuns:
    """run_id's forecasts over its own seed and `seeds` more, trained (or reused) into
    STUDY/runs/seed_runs/ by the same code as `python -m nas_agent_graph ensemble --seeds K`:
    capped, with a wall-clock limit (a member's model file may be LLM-written code). A benchmark
    compares like with like, so a seed run that did not score stops it."""
    try:
        runs = ensemble.seed_runs(study / "runs" / run_id, ensemble.load_forecasts(study / "runs" / run_id), seeds)
    except ensemble.EnsembleError as e:
        raise SystemExit(str(e)) from None
    if runs.notes:
        raise SystemExit(f"{run_id}: " + "; ".join(runs.notes))
    return runs


def blend(forecasts: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    return sum(forecasts[rid].astype(np.float64) * w for rid, w in weights.items())


def score_study(study: Path, seeds: int, steps: int = ensemble.DEFAULT_STEPS) -> dict:
    weights = members(study)
    seeded = {rid: member_runs(study, rid, seeds) for rid in weights}
    runs = {rid: r.forecasts for rid, r in seeded.items()}
    first = runs[next(iter(runs))][0]
    targets = {s: getattr(first, f"{s}_target") for s in ("val", "test")}
    for rid, fs in runs.items():  # every member must forecast the same windows (each run's seeds already do)
        for s, t in targets.items():
            if getattr(fs[0], s).shape != t.shape or not np.array_equal(getattr(fs[0], f"{s}_target"), t):
                raise SystemExit(f"{rid}: its forecasts are not of the same {s} windows as the other members'")
    own = {s: {rid: getattr(fs[0], s) for rid, fs in runs.items()} for s in targets}
    mean = {s: {rid: np.mean([getattr(f, s).astype(np.float64) for f in fs], axis=0) for rid, fs in runs.items()}
            for s in targets}
    reselected, _ = ensemble.select_weights(mean["val"], targets["val"], steps, bags=0)  # the plain selection

    def scores(pred: dict, w: dict) -> dict:
        return {s: ensemble.mse(blend(pred[s], w), targets[s]) for s in targets}
    single = {rid: {s: [ensemble.mse(getattr(f, s), targets[s]) for f in fs] for s in targets} for rid, fs in runs.items()}
    return {"study": study.name, "seeds": seeds + 1, "extra_train_s": sum(r.train_s for r in seeded.values()),
            "weights": weights, "study_ensemble": scores(own, weights), "seed_averaged": scores(mean, weights),
            "reselected": scores(mean, reselected), "reselected_weights": reselected, "single": single,
            "single_averaged": {rid: {s: ensemble.mse(mean[s][rid], targets[s]) for s in targets} for rid in runs}}


def stdev(x: list[float]) -> float:
    return statistics.stdev(x) if len(x) > 1 else 0.0


def table(results: list[dict]) -> str:
    out = ["| study | seeds per member | members | study's ensemble: val / test MSE | seed-averaged, same weights: "
           "val / test | reselected: val / test | the extra runs' train_time_sec |", "|---|---:|---:|---|---|---|---:|"]
    for r in results:
        cells = [f"{r[k]['val']:.4f} / {r[k]['test']:.4f}" for k in ("study_ensemble", "seed_averaged", "reselected")]
        out.append(f"| {r['study']} | {r['seeds']} | {len(r['weights'])} | {' | '.join(cells)} | {r['extra_train_s']:.0f} |")
    out += ["", "Members: val / test MSE of the search's run, mean ± std over its seeds, and of its seed-averaged forecast.",
            "", "| study | member | weight | search's run | seeds: val | seeds: test | averaged: val / test |",
            "|---|---|---:|---|---|---|---|"]
    for r in results:
        for rid, w in r["weights"].items():
            v, t = r["single"][rid]["val"], r["single"][rid]["test"]
            avg = r["single_averaged"][rid]
            out.append(f"| {r['study']} | {rid} | {w:.3f} | {v[0]:.4f} / {t[0]:.4f} | {statistics.mean(v):.4f} ± "
                       f"{stdev(v):.4f} | {statistics.mean(t):.4f} ± {stdev(t):.4f} | {avg['val']:.4f} / {avg['test']:.4f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, nargs="+", required=True, help="finished study folders (search_compare's)")
    p.add_argument("--seeds", type=int, default=2, help="seeds added to each member's own (default 2)")
    p.add_argument("--write", action="store_true", help=f"also write {RESULTS_MD.relative_to(ROOT)}")
    a = p.parse_args()
    if a.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {a.seeds}")
    if "NAS_DATA_DIR" not in os.environ:
        print("note: NAS_DATA_DIR is not set; train.py looks for the data where each config says", file=sys.stderr)
    text = table([score_study(s, a.seeds) for s in a.study])
    print(text)
    if a.write:
        RESULTS_MD.write_text(
            "# Seed-averaged ensembles (ETTh1, M, 96->96)\n\nCommand: `NAS_DATA_DIR=../shared/data python "
            f"bench/seed_ensemble.py --study {' '.join('DIR/' + s.name for s in a.study)} --seeds {a.seeds} --write` "
            "(DIR: bench/search_compare.py's --out). Weights chosen on validation only; test scored once, every "
            "window. The extra training is outside the study's 90-minute budget.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
