"""Ensembles of the shipped configs trained at their papers' settings (issue 12): what a search's
final ensemble could reach if its family bests were trained to convergence, not to a 240 s budget.

    # 1. train the runs (on a GPU: about 4 minutes for 4 configs x 3 seeds, 8 at once)
    NAS_DATA_DIR=../shared/data python bench/reproduce.py --configs tsmixer patchtst42 itransformer \\
        patchtst64 --datasets ETTh1 --seeds 3 --device cuda --jobs 8 --out runs/reproduce
    # 2. select and score the ensembles
    NAS_DATA_DIR=../shared/data python bench/family_ensemble.py --out runs/reproduce [--study STUDY] [--write]

For each seed, the library is the configs' runs of that seed (reproduce.py's run folders,
<config>_<dataset>_s<seed>/forecasts.npz); the ensemble is the study's method,
nas_agent_graph.ensemble.select_weights: forward selection with replacement on the validation forecasts,
then the test forecasts averaged with the chosen weights and scored once, every window.

--study FOLDER adds a finished search study's own ensemble library (the runs its
runs/ensemble.json lists) to each seed's library: what fully trained families add to the ensemble
the search ended with. The study's runs are the same for every seed.

Prints one row per seed and the mean +- std; --write also writes bench/results/family_ensemble.md.
A benchmark: it prints tables and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from reproduce import SEED0, tag_for  # noqa: E402 - bench/ is the script's folder: its run folders' names
from nas_agent import forecasts as forecasts_file  # noqa: E402
from nas_agent.run_folder import FORECASTS_FILE  # noqa: E402
from nas_agent_graph import ensemble  # noqa: E402

CONFIGS = ["tsmixer", "patchtst42", "itransformer", "patchtst64"]
RESULTS_MD = ROOT / "bench" / "results" / "family_ensemble.md"


def load_library(paths: dict[str, Path]) -> tuple[dict[str, dict], np.ndarray, np.ndarray]:
    """Each member's val/test forecasts, and the targets, which every member must share."""
    library, targets = {}, None
    for name, path in paths.items():
        try:
            f = forecasts_file.load(path)
        except ValueError as e:
            raise SystemExit(f"{name}: {e}") from None
        t = (f["val_target"], f["test_target"])
        if targets is None:
            targets = t
        elif not (np.array_equal(t[0], targets[0]) and np.array_equal(t[1], targets[1])):
            raise SystemExit(f"{path}: its validation/test targets differ from the first member's "
                             f"(another data file, split or horizon); leave it out")
        library[name] = {"val": f["val"], "test": f["test"]}
    if targets is None:
        raise SystemExit("no forecasts to ensemble")
    return library, targets[0], targets[1]


def score(library: dict[str, dict], val_target: np.ndarray, test_target: np.ndarray, steps: int) -> dict:
    """Forward selection on validation, then the test score of the chosen weights."""
    weights, picks = ensemble.select_weights({k: v["val"] for k, v in library.items()}, val_target, steps, bags=0)

    def blend(split: str) -> np.ndarray:
        return sum(library[k][split].astype(np.float64) * w for k, w in weights.items())
    singles = {k: {s: ensemble.mse(v[s], t) for s, t in (("val", val_target), ("test", test_target))}
               for k, v in library.items()}
    return {"members": dict(picks.most_common()), "val_mse": ensemble.mse(blend("val"), val_target),
            "test_mse": ensemble.mse(blend("test"), test_target), "singles": singles}


def study_members(study: Path) -> dict[str, Path]:
    """The forecasts of a finished study's ensemble library (runs/ensemble.json's library)."""
    record = ensemble.load(study / "runs")
    if record is None:
        raise SystemExit(f"{study / 'runs' / ensemble.ENSEMBLE_FILE}: missing; the study has not ended "
                         f"(or run `python -m nas_agent_graph ensemble` in {study})")
    return {f"{study.name}/{rid}": study / "runs" / rid / FORECASTS_FILE for rid in record["library"]}


def table(rows: list[dict]) -> str:
    """One row per (seed, library), then the mean +- std of each library that has several."""
    out = ["| seed | library | chosen members (times picked) | ensemble val MSE | ensemble test MSE | "
           "best single by val: val / test |", "|---:|---|---|---:|---:|---|"]
    for r in rows:
        best = min(r["singles"], key=lambda k: r["singles"][k]["val"])
        members = ", ".join(f"{k} x{n}" for k, n in r["members"].items())
        out.append(f"| {r['seed']} | {r['library']} | {members} | {r['val_mse']:.4f} | {r['test_mse']:.4f} | "
                   f"{best}: {r['singles'][best]['val']:.4f} / {r['singles'][best]['test']:.4f} |")
    for lib in dict.fromkeys(r["library"] for r in rows):
        vals = [r["val_mse"] for r in rows if r["library"] == lib]
        tests = [r["test_mse"] for r in rows if r["library"] == lib]
        if len(tests) < 2:
            continue
        sd = lambda v: f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""  # noqa: E731
        out.append(f"| mean ({len(tests)} seeds) | {lib} | | {statistics.mean(vals):.4f}{sd(vals)} | "
                   f"{statistics.mean(tests):.4f}{sd(tests)} | |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce", help="reproduce.py's --out (run folders)")
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds {SEED0}, {SEED0 + 1}, ... (default 3)")
    p.add_argument("--steps", type=int, default=ensemble.DEFAULT_STEPS)
    p.add_argument("--study", type=Path, default=None, help="a finished search study's folder: its ensemble "
                   "library joins each seed's")
    p.add_argument("--write", action="store_true", help=f"also write {RESULTS_MD.relative_to(ROOT)}")
    p.add_argument("--note", default="", help="--write: a paragraph under the table (where the runs trained)")
    a = p.parse_args()
    if a.seeds < 1 or a.steps < 1:
        raise SystemExit(f"--seeds and --steps must be >= 1 (got --seeds {a.seeds}, --steps {a.steps})")
    rows = []
    study = study_members(a.study) if a.study else None
    if study:  # the same runs for every seed: one row
        library, val_target, test_target = load_library(study)
        rows.append({"seed": "-", "library": "study", **score(library, val_target, test_target, a.steps)})
    for seed in range(SEED0, SEED0 + a.seeds):
        paths = {c: a.out / tag_for(c, a.dataset, seed, []) / FORECASTS_FILE for c in a.configs}
        missing = [str(x) for x in paths.values() if not x.is_file()]
        if missing:
            raise SystemExit(f"missing forecasts (train them with bench/reproduce.py, step 1 above): {', '.join(missing)}")
        libraries = [("shipped configs", paths)] + ([("study + shipped configs", {**study, **paths})] if study else [])
        for name, lib in libraries:
            library, val_target, test_target = load_library(lib)
            rows.append({"seed": seed, "library": name, **score(library, val_target, test_target, a.steps)})
    text = table(rows)
    print(text)
    if a.write:
        command = (f"NAS_DATA_DIR=../shared/data python bench/family_ensemble.py --out OUT --configs {' '.join(a.configs)} "
                   f"--dataset {a.dataset} --seeds {a.seeds} --steps {a.steps}" + (" --study STUDY" if a.study else "")
                   + " --write")
        RESULTS_MD.write_text(f"# Ensembles of the shipped configs at their papers' settings ({a.dataset}, M, 96->96)\n\n"
                              f"Command: `{command}` (OUT: reproduce.py's run folders; the module docstring says how "
                              f"to train them). Selection on validation MSE only; test scored once, every window. The ensemble's "
                              f"val MSE is what the selection minimised, so it flatters the ensemble next to a single "
                              f"run's; its test MSE does not.\n\n"
                              f"{text}\n" + (f"\n{a.note}\n" if a.note else ""))
        (RESULTS_MD.with_suffix(".json")).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
