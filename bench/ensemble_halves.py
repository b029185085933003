"""Which ensemble selection generalises, judged on validation alone (issue 12): split-half
validation over finished search studies.

    NAS_DATA_DIR=../shared/data python bench/ensemble_halves.py --study /work/arms/tpe_seed3 \\
        /work/arms/tpe_seed4 [--rule tpe_seed7 tpe_seed8 tpe_seed9 tpe_seed10] [--write]

A study's ensemble is selected on its validation windows; whether a selection method fits those
windows' noise shows on windows it did not see. This script splits each study's validation windows
into a first and a second half in time (dropping pred_len windows between them, so that no target
row is in both), selects with each method on one half, scores the chosen weights on the other,
and averages the two directions. Test MSE plays no part: the comparison can choose the default
method without looking at the test split. For context only, each method's selection on the whole
validation split is also scored on test (reported, never used for the choice).

The methods (nas_agent_graph.ensemble's):
- single: the library's best run on the selection half;
- plain: forward selection with replacement (Caruana et al., 2004), `select` (the default);
- bagged: the same over BAGS random halves of the library, averaged (`select_bagged`; `ensemble --bags 20`).
Each on two libraries, as `python -m nas_agent_graph ensemble` builds them: the N best runs and
each model family's best ("family"), and the N best alone ("top-only"; `--top-only`).

One leak remains, and it is the same for every method: the library's members are the runs with
the best validation MSE over both halves (the runs whose checkpoints retention kept).

Study folders are large and need not outlive the machine that ran them, so each scored study's
rows are kept as a record, bench/results/ensemble_halves/STUDY.json (written with --write). The
table covers every recorded study and each folder in --study (scored afresh; its record is
replaced), so the comparison builds up across sessions the way the search arms' tables do.

--rule names the studies of the rule fixed before they ran (docs/search.md, the ensemble's
section) and adds one line: where the rule stands over those of them in the table, and its
decision once all are in. The rule is computed here so that nobody decides it by hand.

Prints one table; --write also writes the scored studies' records and
bench/results/ensemble_halves.md. A benchmark: it prints tables and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from nas_agent.agent_state import load_agent_state  # noqa: E402
from nas_agent.atomic import atomic_write_json  # noqa: E402
from nas_agent_graph import ensemble  # noqa: E402
from search_compare import BAGS, code_version, study_order  # noqa: E402 - bench/ is the script's folder: the bagged alternative's bag count

LIBRARIES = {"family": True, "top-only": False}
METHODS = ("single", "plain", "bagged")
RESULTS_MD = ROOT / "bench" / "results" / "ensemble_halves.md"
RECORDS = ROOT / "bench" / "results" / "ensemble_halves"  # one STUDY.json per scored study
ROW_KEYS = ("study", "library", "size", "method", "first_to_second", "second_to_first", "held_out", "val_mse", "test_mse")
NUMBERS = tuple(k for k in ROW_KEYS if k not in ("study", "library", "method"))  # the rest are names


def load_libraries(study: Path, pool: int) -> dict[str, dict[str, ensemble.Forecasts]]:
    """Each of LIBRARIES (ensemble.pool_runs) with its members' forecasts, each file read once
    (the N best are in both libraries)."""
    state = load_agent_state(study / "agent_state.json")
    members = {name: [r for r in ensemble.pool_runs(state, study / "runs", pool, families=families)[0]]
               for name, families in LIBRARIES.items()}
    loaded = {}
    for run in {r.run_id: r for runs in members.values() for r in runs}.values():
        try:
            loaded[run.run_id] = ensemble.forecasts(run, study / "runs")
        except ensemble.EnsembleError as e:
            print(f"{study.name}: {run.run_id} left out: {e}")
    if not loaded:
        raise SystemExit(f"{study}: no run with forecasts or a checkpoint; is it a finished study's folder?")
    return {name: {r.run_id: loaded[r.run_id] for r in runs if r.run_id in loaded} for name, runs in members.items()}


def weights(method: str, val: dict[str, np.ndarray], target: np.ndarray, steps: int) -> dict[str, float]:
    """The method's weights, selected on `val` (each run's forecasts of the selection windows)."""
    if method == "single":
        return {min(val, key=lambda r: ensemble.mse(val[r], target)): 1.0}
    if method in ("plain", "bagged"):
        return ensemble.select_weights(val, target, steps, bags=BAGS if method == "bagged" else 0)[0]
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def blend(w: dict[str, float], forecasts: dict[str, np.ndarray]) -> np.ndarray:
    return sum(forecasts[r].astype(np.float64) * x for r, x in w.items())


def halves(n: int, gap: int) -> tuple[slice, slice]:
    """The first and second halves of n windows, with `gap` windows dropped between them."""
    if n < 2 * gap + 2:
        raise SystemExit(f"{n} validation windows are too few to split with a gap of {gap}")
    mid = n // 2
    return slice(0, mid - gap // 2), slice(mid + gap - gap // 2, n)


def score_study(study: Path, pool: int, steps: int) -> list[dict]:
    rows = []
    for lib_name, library in load_libraries(study, pool).items():
        ref = next(iter(library.values()))
        val_t, test_t = ref.val_target, ref.test_target
        first, second = halves(val_t.shape[0], gap=val_t.shape[1])  # pred_len windows: disjoint targets
        for method in METHODS:
            held_out = []
            for sel, out in ((first, second), (second, first)):
                w = weights(method, {r: f.val[sel] for r, f in library.items()}, val_t[sel], steps)
                held_out.append(ensemble.mse(blend(w, {r: f.val[out] for r, f in library.items()}), val_t[out]))
            w = weights(method, {r: f.val for r, f in library.items()}, val_t, steps)
            rows.append({"study": study.name, "library": lib_name, "size": len(library), "method": method,
                         "first_to_second": held_out[0], "second_to_first": held_out[1],
                         "held_out": statistics.mean(held_out),
                         "val_mse": ensemble.mse(blend(w, {r: f.val for r, f in library.items()}), val_t),
                         "test_mse": ensemble.mse(blend(w, {r: f.test for r, f in library.items()}), test_t)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| study | library (runs) | method | held-out val MSE: first->second / second->first | mean | "
           "selected on all of val: val / test MSE (test reported, not used) |", "|---|---|---|---|---:|---|"]
    for r in rows:
        out.append(f"| {r['study']} | {r['library']} ({r['size']}) | {r['method']} | {r['first_to_second']:.4f} / "
                   f"{r['second_to_first']:.4f} | {r['held_out']:.4f} | {r['val_mse']:.4f} / {r['test_mse']:.4f} |")
    studies = list(dict.fromkeys(r["study"] for r in rows))
    out += ["", f"Mean over {len(studies)} studies (the held-out column decides; test for context):", "",
            "| library | method | mean held-out val MSE | studies where it is the lowest held-out | mean test MSE |",
            "|---|---|---:|---:|---:|"]
    for lib in LIBRARIES:
        for method in METHODS:
            mine = [r for r in rows if r["library"] == lib and r["method"] == method]
            wins = sum(r["held_out"] == min(o["held_out"] for o in rows if o["study"] == r["study"]
                                            and o["library"] == lib) for r in mine)
            out.append(f"| {lib} | {method} | {statistics.mean(r['held_out'] for r in mine):.4f} | "
                       f"{wins}/{len(mine)} | {statistics.mean(r['test_mse'] for r in mine):.4f} |")
    return "\n".join(out)


def rule(rows: list[dict], studies: list[str]) -> str:
    """The pre-registered rule (docs/search.md): bagging becomes the default if its mean held-out
    val MSE over the rule's studies, with the family library, is lower than the plain selection's.
    Decided only once every one of those studies is in; before that, says which leads."""
    missing = [s for s in studies if s not in {r["study"] for r in rows}]
    mine = [r for r in rows if r["study"] in studies and r["library"] == "family"]
    if len(missing) == len(studies):
        return f"The rule's studies ({', '.join(studies)}): none is scored or recorded yet."
    held = {m: statistics.mean(r["held_out"] for r in mine if r["method"] == m) for m in ("plain", "bagged")}
    ahead = "bagged" if held["bagged"] < held["plain"] else "plain"
    done = len(studies) - len(missing)
    verdict = (f"decided: {'bagged selection becomes' if ahead == 'bagged' else 'the plain selection stays'} the default"
               if not missing else f"not decided yet ({', '.join(missing)} still to run); {ahead} leads")
    return (f"The rule's studies, {done} of {len(studies)} in (family library, mean held-out val MSE): "
            f"plain {held['plain']:.4f}, bagged {held['bagged']:.4f}; {verdict}.")


def write_record(rows: list[dict], command: str, folder: Path | None = None) -> Path:
    """Keep one scored study's rows (full precision) with the command and code that scored them."""
    folder = folder or RECORDS
    study = rows[0]["study"]
    path = folder / f"{study}.json"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"study": study, "command": command, "code": code_version(), "rows": rows})
    return path


def read_records(folder: Path | None = None) -> list[dict]:
    """Every recorded study's rows; a record that is not one says which file and what is wrong."""
    folder = folder or RECORDS
    rows = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            mine = record["rows"]
            bad = next((r for r in mine if set(ROW_KEYS) - set(r) or r["study"] != path.stem
                        or not all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for k in NUMBERS)),
                       None)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not an ensemble_halves record ({type(e).__name__}: {e}); "
                             f"rewrite it with --study FOLDER --write, or delete it") from None
        if bad is not None or not mine:
            raise SystemExit(f"{path}: expected rows of study {path.stem!r} with keys {', '.join(ROW_KEYS)} "
                             f"({', '.join(NUMBERS)} numbers), "
                             f"got {bad if bad is not None else 'no rows'}; rewrite it with --study FOLDER --write, "
                             f"or delete it")
        rows += mine
    return rows


def shown(path: Path) -> Path:
    """A path as the results name it: from the checkout's root when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, nargs="+", default=[],
                   help="finished study folders (agent_state.json, runs/) to score; without it, the records alone")
    p.add_argument("--pool", type=int, default=ensemble.DEFAULT_POOL, help="N: the N best runs (the ensemble's --pool)")
    p.add_argument("--steps", type=int, default=ensemble.DEFAULT_STEPS, help="forward-selection steps")
    p.add_argument("--rule", nargs="+", metavar="STUDY", default=[],
                   help="the pre-registered rule's studies, by folder name (tpe_seed7 ...): prints where the rule stands")
    p.add_argument("--write", action="store_true",
                   help=f"also write the scored studies' records and {shown(RESULTS_MD)}")
    a = p.parse_args()
    names = [study.name for study in a.study]
    if len(set(names)) < len(names):
        raise SystemExit(f"--study: expected folders with different names (a record is kept by folder name), "
                         f"got {', '.join(map(str, a.study))}")
    scored = {study.name: score_study(study, a.pool, a.steps) for study in a.study}
    recorded = [r for r in read_records() if r["study"] not in scored]
    if not recorded and not scored:
        raise SystemExit(f"nothing to tabulate: no --study folder and no record in {RECORDS}; "
                         f"score a finished study with --study FOLDER")
    rows = sorted(recorded + [r for rs in scored.values() for r in rs], key=lambda r: study_order(r["study"]))
    text = table(rows)
    if a.rule:
        text += "\n\n" + rule(rows, a.rule)
    print(text)
    if a.write:
        command = ("NAS_DATA_DIR=../shared/data python bench/ensemble_halves.py"
                   + (" --study " + " ".join(str(s) for s in a.study) if a.study else "")
                   + (" --rule " + " ".join(a.rule) if a.rule else "") + " --write")
        for study_rows in scored.values():
            print(f"wrote {write_record(study_rows, command)}")
        RESULTS_MD.write_text(f"# Ensemble selection judged on held-out validation halves\n\n{__doc__.split(chr(10) * 2)[0]}"
                              f"\n\n`{command}` (with the records of "
                              f"{len({r['study'] for r in recorded})} studies scored earlier, in "
                              f"{shown(RECORDS)}/)\n\n{text}\n\nThe rule that decides the default selection from this "
                              f"table, and its outcome: docs/search.md, the ensemble's section.\n")
        print(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    main()
