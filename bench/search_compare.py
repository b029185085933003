"""Compare proposers on ETTh1 at a fixed small per-run budget, and measure the graph's overhead.

    NAS_DATA_DIR=../shared/data python bench/search_compare.py --proposers tpe random --runs 20 --seeds 0
    NAS_DATA_DIR=../shared/data python bench/search_compare.py --proposers llm hybrid tpe random \
        --runs 20 --seeds 0 1 --budget training.max_epochs=2 training.max_steps_per_epoch=40 training.patience=2

Each (proposer, seed) is one full `python -m nas_agent_graph` study in its own folder under
--out, started from the top-level config.py with every run capped by --set (the budget
below) and the search space narrowed by bench/cpu_space.json. Studies run --jobs at a time,
each with OMP_NUM_THREADS = cores / jobs so that they share the machine evenly.

Overhead per run = (study wall-clock - time inside train.py - smoke tests) / runs: what
the graph itself costs (proposing, checkpoints, state saves, process start-up). A smoke test that
ran inside its run's train.py is inside train.py's time; bench/overhead.py breaks the overhead
down by phase.

Architecture-search arms (issue 12), each a study of at most --minutes of study time with the
product's defaults (full default space, --run-budget 240 s per run), one study at a time:

    NAS_DATA_DIR=../shared/data python bench/search_compare.py --arms default tpe tpe-informer random \
        --seeds 0 1 --minutes 90 --out /tmp/nas_arms

    default        warm start from configs/, then the hybrid proposer (TPE + LLM): the README's command with a GPU
    tpe            warm start, then TPE, on the model space: the README's command on a CPU (--proposer auto)
    tpe-informer   TPE on the old Informer-only space (spaces/informer.json), no warm start
    random         random search on the model space, no warm start

An arm's folder is kept: running the command again resumes a study that was killed (its
--time-budget counts study time over all sessions, and so does its curve, from the folder's
sessions.jsonl) and only reads one that has finished, so the comparison builds up over several
sessions: a 90-minute study may run as 40 minutes in one session and 50 in the next. Selection is by validation MSE only; the test MSE
of the run chosen by validation is printed, never used.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from nas_agent.agent_state import get_best_run, load_agent_state  # noqa: E402
from nas_agent.run_folder import SCORED  # noqa: E402
from nas_agent_graph import ensemble  # noqa: E402
from nas_agent_graph.retention import run_family  # noqa: E402
from nas_agent_graph.proposers import llm_records, llm_validity  # noqa: E402
import train  # noqa: E402 - its CPU bf16 check, for the machine a study ran on

BUDGET = ["training.max_epochs=3", "training.max_steps_per_epoch=60", "training.patience=3"]


def llm_seconds(state) -> tuple[float, int]:
    """Seconds spent generating and the number of LLM proposals (runs and rejections)."""
    records = llm_records(state)
    return sum(r.get("latency_s") or 0.0 for r in records), len(records)


def run_orchestrator(cmd: list[str], folder: Path, env: dict) -> tuple[int, float]:
    """Run one study's orchestrator in `folder` (its output appended to orchestrator.log, so a
    resumed study keeps the log of its earlier sessions): (exit code, seconds)."""
    t0 = time.monotonic()
    with open(folder / "orchestrator.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.monotonic() - t0


def run_study(proposer: str, seed: int, runs: int, out: Path, threads: int, budget: list[str]) -> dict:
    folder = out / f"{proposer}_seed{seed}"  # the proposer comparison of issue 4: budgets as given, no warm start
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "config.py", folder / "config.py")
    cmd = [sys.executable, "-m", "nas_agent_graph", "--max-runs", str(runs), "--proposer", proposer,
           "--seed", str(seed), "--space", str(ROOT / "bench" / "cpu_space.json"), "--warm-start", "off",
           "--run-budget", "none"]
    for s in budget:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    rc, wall = run_orchestrator(cmd, folder, env)
    state = load_agent_state(folder / "agent_state.json")
    best = get_best_run(state)
    train_s = sum(r.duration_s or 0.0 for r in state.runs)
    # A smoke test inside the run (extra.smoke.in_run) is part of its train.py time already.
    smoke_s = sum(((r.extra.get("smoke") or {}).get("seconds") or 0.0) for r in state.runs
                  if not (r.extra.get("smoke") or {}).get("in_run"))
    n = len(state.runs)
    llm_s, llm_n = llm_seconds(state)
    validity = llm_validity(state)
    best_idx = next((i for i, r in enumerate(state.runs) if best and r.run_id == best.run_id), None)
    return {"proposer": proposer, "seed": seed, "rc": rc, "runs": n, "wall_s": wall,
            "best_val": best.val_mse if best else None, "best_test": best.test_mse if best else None,
            "best_run": best.run_id if best else None, "best_idx": best_idx,
            "time_to_best_s": sum(r.duration_s or 0.0 for r in state.runs[: (best_idx or 0) + 1]),
            "failed": sum(r.status not in SCORED for r in state.runs),
            "rejected": len(state.rejected), "train_s": train_s, "smoke_s": smoke_s,
            "overhead_per_run_s": (wall - train_s - smoke_s - llm_s) / max(n, 1), "smoke_per_run_s": smoke_s / max(n, 1),
            "llm_s_per_proposal": llm_s / llm_n if llm_n else None, "llm_proposals": llm_n,
            "llm_valid": f"{validity['valid']}/{validity['proposals']}" if validity else "-",
            "baseline_val": state.runs[0].val_mse if state.runs else None}


ARMS = {
    "default": ["--proposer", "hybrid"],  # the LLM arm: the GPU default; --proposer auto is tpe on a CPU
    "tpe": ["--proposer", "tpe"],
    "tpe-informer": ["--proposer", "tpe", "--space", str(ROOT / "spaces" / "informer.json"), "--warm-start", "off"],
    "random": ["--proposer", "random", "--warm-start", "off"],
}


CODE_FILE = "code_versions.txt"  # in a study's folder: the commit of each session that ran it
MACHINE_FILE = "machines.txt"  # in a study's folder: the CPU of each session that ran it (one per line)
SESSION_FILE = "sessions.jsonl"  # in a study's folder: when each session started, and the study time used before it


def code_version() -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"
    return head + ("+changes" if dirty else "")


def machine() -> str:
    """This machine as the arms' wall-clock budgets see it: the CPU, its cores, and whether it has
    native bf16 (without it, training.amp is off and bf16-friendly models train slower)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        info = ""
    name = next((line.partition(":")[2].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    bf16, _ = train.cpu_has_native_bf16(info) if info else (False, "")
    return f"{name}, {os.cpu_count()} cores, {'native bf16' if bf16 else 'no native bf16'}"


def record_session(folder: Path, file: str, now: str) -> list[str]:
    """Add this session's value (its commit, its machine) to the study's list in `file`, once per
    change; the list, or ["unrecorded"] for a study that ran before the list was kept."""
    path = folder / file
    started = path.exists() or (folder / "agent_state.json").exists()
    versions = session_values(folder, file) if started else []
    if not versions or versions[-1] != now:
        versions.append(now)
        path.write_text("\n".join(versions) + "\n")
    return versions


def record_start(folder: Path) -> None:
    """Note when this session starts and how much study time the study had used before it, so
    that its curve can put each run on the study's clock (best_so_far) and not on the wall's,
    which counts the hours between sessions too."""
    state_file = folder / "agent_state.json"
    used = load_agent_state(state_file).meta.get("time_used_s", 0.0) if state_file.exists() else 0.0
    with open(folder / SESSION_FILE, "a") as f:
        f.write(json.dumps({"at": time.time(), "time_used_s": used}) + "\n")


def study_sessions(folder: Path) -> list[dict]:
    """record_start's lines, oldest first; [] for a study from before they were kept."""
    path = folder / SESSION_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def session_values(folder: Path, file: str) -> list[str]:
    path = folder / file
    return path.read_text().splitlines() if path.exists() else ["unrecorded"]


def study_ended(folder: Path, budget_s: float) -> bool:
    """Whether the study is over: its time budget used, or it stopped on its own by a rule about
    the search (its log's "Search stopped:" line, and runs/ensemble.json written). A killed study,
    or one stopped because every recent run failed (a fault to fix, then resume), is not."""
    state_file = folder / "agent_state.json"
    if not state_file.exists():
        return False
    if load_agent_state(state_file).meta.get("time_used_s", 0.0) >= budget_s:
        return True
    stop = stop_line(folder)
    return (folder / "runs" / "ensemble.json").exists() and stop is not None and "runs all failed" not in stop


def stop_line(folder: Path) -> str | None:
    """The last "Search stopped: ..." line of the study's orchestrator.log (why it ended)."""
    try:
        lines = (folder / "orchestrator.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line for line in reversed(lines) if line.startswith("Search stopped:")), None)


def known_machines(machines: list[str], results_file: Path) -> list[str]:
    """The study folder's machines, or, where it has none recorded (a study from before the
    record), those its results file was given by hand: a re-read does not lose them."""
    if machines != ["unrecorded"]:
        return machines
    try:
        return json.loads(results_file.read_text()).get("machines") or machines
    except (OSError, ValueError, AttributeError):
        return machines


def run_arm(arm: str, seed: int, minutes: float, out: Path, threads: int) -> dict:
    """One arm's study, resumed if its folder holds an unfinished one; its best-so-far curve."""
    folder = out / f"{arm}_seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.py").exists():
        shutil.copy(ROOT / "config.py", folder / "config.py")
    state_file = folder / "agent_state.json"
    budget = minutes * 60
    done = study_ended(folder, budget)
    if not done:
        record_session(folder, CODE_FILE, code_version())
        record_session(folder, MACHINE_FILE, machine())
        record_start(folder)
        cmd = [sys.executable, "-m", "nas_agent_graph", "--max-runs", "1000", "--seed", str(seed),
               "--time-budget", f"{budget:g}", *ARMS[arm]]
        rc, _ = run_orchestrator(cmd, folder, dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if rc != 0:
            print(f"{arm} seed {seed}: the orchestrator exited {rc}; see {folder / 'orchestrator.log'}")
    state = load_agent_state(state_file)
    ended = study_ended(folder, budget)
    study_ensemble = arm_ensemble(folder) if ended else None
    return {"arm": arm, "seed": seed, "curve": best_so_far(state, study_sessions(folder)), "runs": len(state.runs),
            "minutes": state.meta.get("time_used_s", 0.0) / 60, "ensemble": study_ensemble,
            "alternatives": alternative_ensembles(folder, study_ensemble),
            "finished": ended, "stop": stop_line(folder),
            "families": sorted({run_family(r) for r in state.runs if r.config}),
            "top": top_runs(state.runs),
            "code": session_values(folder, CODE_FILE), "machines": session_values(folder, MACHINE_FILE)}


def top_line(row: dict) -> str | None:
    """A study's best runs in a line: their families, test MSE range and Spearman(val, test)."""
    top = row.get("top")
    if not top or not top["runs"]:
        return None
    fams = ", ".join(f"{f} x{n}" for f, n in Counter(x["family"] for x in top["runs"]).most_common())
    tests = [x["test_mse"] for x in top["runs"]]
    rho = "-" if top["spearman"] is None else f"{top['spearman']:.2f}"
    return (f"its {len(tests)} best runs by val MSE: {fams}; their test MSE {min(tests):.4f} to {max(tests):.4f}; "
            f"Spearman(val, test) over them {rho}")


TOP_K = 15  # how many of a study's best runs (by val MSE) top_runs keeps


def top_runs(runs, k: int = TOP_K) -> dict:
    """The study's k best scored runs by val MSE (family, look-back, val and test MSE), and the
    Spearman rank correlation of their val and test MSE: whether validation still orders test among
    the candidates selection chooses between (near 0: the choice among them is a draw on test).
    Test MSE is reported, never used."""
    scored = sorted((r for r in runs if r.status in SCORED and r.val_mse is not None
                     and r.test_mse is not None), key=lambda r: r.val_mse)[:k]
    rows = [{"run": r.run_id, "family": run_family(r),
             "seq_len": (r.config or {}).get("data", {}).get("seq_len"), "val_mse": r.val_mse, "test_mse": r.test_mse}
            for r in scored]
    return {"runs": rows, "spearman": spearman([r["val_mse"] for r in rows], [r["test_mse"] for r in rows])}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties ranked by position; the MSEs are floats); None under 3 pairs."""
    if len(a) < 3:
        return None
    ra, rb = (_ranks(x) for x in (a, b))
    return statistics.correlation(ra, rb)


def _ranks(x: list[float]) -> list[int]:
    order = sorted(range(len(x)), key=x.__getitem__)
    ranks = [0] * len(x)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def arm_ensemble(folder: Path) -> dict | None:
    """The finished study's ensemble (runs/ensemble.json, which the study writes when it ends), built
    and written here, as `python -m nas_agent_graph ensemble` would, when missing (a study from
    before ensembles). Its test MSE is reported, never used. One rebuilt later with seed averaging
    (`ensemble --seeds K`) holds training outside the study's budget: the arm's row is the same
    selection without it, rebuilt and not written."""
    record = ensemble.load(folder / "runs")
    if record is None or record.get("seeds"):
        # Keys absent from an older record were then off: the defaults have changed since.
        same = {} if record is None else {"pool": record["pool"], "steps": record["steps"],
                                          "families": record.get("families", False), "bags": record.get("bags", 0)}
        try:
            rebuilt = ensemble.build(load_agent_state(folder / "agent_state.json"), folder / "runs", **same)
        except ensemble.EnsembleError as e:
            print(f"{folder.name}: no ensemble: {e}")
            return None
        if record is None:
            ensemble.write(rebuilt, folder / "runs")
        record = rebuilt
    return _ensemble_row(record)


BAGS = ensemble.DEFAULT_BAGS  # the bagged selection each new study is scored with (Caruana et al. 2004: 20 bags)
# Each study's ensemble is built by the three selections below, from the same runs: its own (whichever
# the study's code made by default: "plain" before bagging became the default, "bagged" since) and
# the other two, in memory and not written.
METHODS = {"top_only": {"families": False, "bags": 0},  # its N best alone, one selection: `ensemble --top-only --bags 0`
           "plain": {"families": True, "bags": 0},  # N best + family bests, one selection: `ensemble --bags 0`
           "bagged": {"families": True, "bags": BAGS}}  # the same library, bagged: `ensemble --bags 20`


def method_of(record: dict) -> str | None:
    """Which of METHODS made an ensemble record; keys an older record lacks were off then."""
    return next((name for name, kw in METHODS.items()
                 if record.get("families", False) == kw["families"] and record.get("bags", 0) == kw["bags"]), None)


def by_method(row: dict, name: str) -> dict | None:
    """A study's ensemble by one of METHODS: its own, if that method made it, else the alternative."""
    own = row.get("ensemble")
    if own and method_of(own) == name:
        return own
    alt = (row.get("alternatives") or {}).get(name)
    return alt and {**METHODS[name], **alt}  # rows from before "bags" was recorded: the method's


def alternative_ensembles(folder: Path, study_ensemble: dict | None) -> dict:
    """For a study whose ensemble chose from its family bests too, the METHODS other than its own,
    built from the same runs with its N and steps (in memory, not written); {} for an older study,
    whose ensemble was top-only already. Each is selected on validation; the tables report their
    test MSE."""
    if not study_ensemble or not study_ensemble.get("families"):
        return {}
    state = load_agent_state(folder / "agent_state.json")  # read once for all
    own = method_of(study_ensemble)
    out = {}
    for name, kw in METHODS.items():
        if name == own:
            continue
        try:
            record = ensemble.build(state, folder / "runs", pool=study_ensemble["pool"],
                                    steps=study_ensemble["steps"], **kw)
        except ensemble.EnsembleError as e:
            print(f"{folder.name}: no {name} ensemble: {e}")
            continue
        out[name] = _ensemble_row(record)
    return out


def _ensemble_row(record: dict) -> dict:
    return {k: record[k] for k in ("val_mse", "test_mse", "pool", "steps", "created_at")} | {
        "families": record.get("families", False),  # records before family bests chose from the top runs only
        "bags": record.get("bags", 0),  # and before bagged selection, by one selection
        "members": {m["run_id"]: m["picks"] for m in record["members"]},
        "member_families": {m["run_id"]: m.get("family") for m in record["members"]}}


def best_so_far(state, sessions: list[dict] = ()) -> list[dict]:
    """After each run: the study's minutes when it ended, and the run with the lowest val MSE so
    far (its test MSE is reported, never used). A run ended in the latest of `sessions`
    (record_start's) that began before it: study time used before that session plus the time
    since it began. Runs before the first recorded session (a study from before the record) count
    from the first run's start, which is right for a study's first session."""
    curve, best = [], None
    # A run's record is made when it ends (RunInfo.started_at is the record's time), so the study
    # started one duration before the first record.
    t0 = _when(state.runs[0].started_at) - (state.runs[0].duration_s or 0.0) if state.runs else 0.0
    for i, r in enumerate(state.runs):
        if r.status in SCORED and r.val_mse is not None and (best is None or r.val_mse < best.val_mse):
            best = r
        end = _when(r.started_at)
        began = [s for s in sessions if s["at"] <= end]
        seconds = began[-1]["time_used_s"] + end - began[-1]["at"] if began else end - t0
        curve.append({"run": i, "minutes": seconds / 60, "proposer": r.proposer,
                      "best_val": best.val_mse if best else None, "best_test": best.test_mse if best else None,
                      "best_run": best.run_id if best else None})
    return curve


def _when(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso).timestamp()


def arm_tables(rows: list[dict]) -> str:
    """Markdown: per study its best-so-far at milestones, then per arm the mean ± std of the final best."""
    out = ["| arm | seed | runs | study min | best val after 5 / 10 / 20 / all runs | test MSE of final best | "
           "final best run (proposer) | the study's ensemble val / test MSE (members) | code | machine |",
           "|---|---:|---:|---:|---|---:|---|---|---|---|"]
    for r in rows:
        c = r["curve"]
        at = lambda n: "-" if not 0 < n <= len(c) or c[n - 1]["best_val"] is None else f"{c[n - 1]['best_val']:.4f}"  # noqa: E731
        last = c[-1] if c else {}
        proposer = next((x["proposer"] for x in c if x["best_run"] and f"run_{x['run']:04d}" == last.get("best_run")), "-")
        out.append(f"| {r['arm']} | {r['seed']} | {r['runs']} | {r['minutes']:.0f} | {at(5)} / {at(10)} / {at(20)} / "
                   f"{at(len(c))} | {_f(last.get('best_test'))} | {last.get('best_run', '-')} ({proposer}) | "
                   f"{_ens(r.get('ensemble'))} | {', '.join(r.get('code') or ['unrecorded'])} | "
                   f"{'; '.join(r.get('machines') or ['unrecorded'])} |")
    out += ["", "| arm | finished studies | mean best val MSE | std | mean test MSE of best | std | "
                "mean ensemble val MSE | mean ensemble test MSE | std | bagged: studies | mean val | mean test | std |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        # Finished studies only: a study part-way through its budget (resumed in a later session) would
        # pull its arm's means towards a shorter search; its own row above shows where it stands.
        done = [r for r in rows if r["arm"] == arm and r.get("finished")]
        finals = [r["curve"][-1] for r in done if r["curve"] and r["curve"][-1]["best_val"] is not None]
        vals, tests = [f["best_val"] for f in finals], [f["best_test"] for f in finals if f["best_test"] is not None]
        sd = lambda v: f"{statistics.stdev(v):.4f}" if len(v) > 1 else "-"  # noqa: E731
        ens = [r["ensemble"] for r in done if r.get("ensemble")]
        ens_val, ens_test = [e["val_mse"] for e in ens], [e["test_mse"] for e in ens]
        # The bagged selection (the default since the rule of docs/search.md) of every study that has
        # one, its own or built beside it: the same method across studies whatever their code's default.
        bag = [b for b in (by_method(r, "bagged") for r in done) if b]
        bag_val, bag_test = [b["val_mse"] for b in bag], [b["test_mse"] for b in bag]
        mean = lambda v: _f(statistics.mean(v) if v else None)  # noqa: E731
        out.append(f"| {arm} | {len(vals)} | {mean(vals)} | {sd(vals)} | {mean(tests)} | {sd(tests)} | "
                   f"{mean(ens_val)} | {mean(ens_test)} | {sd(ens_test)} | "
                   f"{len(bag)} | {mean(bag_val)} | {mean(bag_test)} | {sd(bag_test)} |")
    return "\n".join(out)


def library_table(rows: list[dict]) -> str | None:
    """Markdown: for each study whose ensemble chose from its family bests too, the three METHODS
    built from the same runs (its own and alternative_ensembles); its own is marked."""
    paired = [r for r in rows if r.get("ensemble") and by_method(r, "top_only") and by_method(r, "plain")]
    if not paired:
        return None
    out = ["| arm | seed | N | N best only: val / test MSE (members) | N best + family bests: val / test MSE "
           "(members; their families) | the same, bagged: val / test MSE |", "|---|---:|---:|---|---|---|"]
    for r in paired:
        own = method_of(r["ensemble"])
        cell = {name: _ens(by_method(r, name)) + (" (the study's)" if name == own else "") for name in METHODS}
        plain = by_method(r, "plain")
        fams = ", ".join(sorted({f for f in plain.get("member_families", {}).values() if f}))
        out.append(f"| {r['arm']} | {r['seed']} | {plain['pool']} | {cell['top_only']} | {cell['plain']}; {fams} | "
                   f"{cell['bagged']} |")
    return "\n".join(out)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ens(e: dict | None) -> str:
    if not e:
        return "-"
    if e.get("bags"):  # many members, each picked in some of the bags: their count says enough
        return f"{e['val_mse']:.4f} / {e['test_mse']:.4f} (bagged, {len(e['members'])} members)"
    return f"{e['val_mse']:.4f} / {e['test_mse']:.4f} ({', '.join(f'{k}x{n}' for k, n in e['members'].items())})"


def study_notes(rows: list[dict], minutes: float) -> str:
    """The README's lines under the tables: unfinished studies, studies a stop rule ended early,
    and each study's best candidates (rows carry top_line, as arms_main sets it)."""
    unfinished = [f"{r['arm']} seed {r['seed']}" for r in rows if not r.get("finished")]
    note = f"\nNot finished yet (fewer than {minutes:g} minutes): {', '.join(unfinished)}.\n" if unfinished else ""
    early = [f"- {r['arm']} seed {r['seed']} ({r['minutes']:.0f} min): {r['stop']}" for r in rows
             if r.get("finished") and r.get("stop") and r["minutes"] < minutes]
    if early:
        note += "\nEnded by a stop rule before its time budget:\n" + "\n".join(early) + "\n"
    walled = [f"{r['arm']} seed {r['seed']} ({r['curve'][-1]['minutes']:.0f} on its curve, {r['minutes']:.0f} of study time)"
              for r in rows if r.get("curve") and r["curve"][-1]["minutes"] > r["minutes"] + 5]
    if walled:
        note += ("\nResumed before sessions.jsonl was kept, so their curves' minutes are wall-clock since the first run, "
                 "the time between sessions included: " + ", ".join(walled) + ".\n")
    tops = [f"- {r['arm']} seed {r['seed']}: {r['top_line']}" for r in rows if r.get("top_line")]
    if tops:
        note += ("\nThe candidates selection chooses between (test MSE reported, never used):\n"
                 + "\n".join(tops) + "\n")
    return note


def study_order(name: str) -> tuple:
    """tpe_seed9 before tpe_seed10: a study's name (its file or folder), by arm, then seed as a number."""
    m = re.fullmatch(r"(.*?)(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)


def load_rows(results: Path) -> list[dict]:
    """Every study kept in `results`, in study_order."""
    return [json.loads(f.read_text()) for f in sorted(results.glob("*_seed*.json"), key=lambda f: study_order(f.stem))]


def arms_main(a: argparse.Namespace) -> None:
    """Run (or resume, or read) each arm's study; keep each finished study's curve as a small JSON
    file in --results, and print and write the tables over every study kept there, so arms run in
    different sessions add up to one comparison."""
    threads = os.cpu_count() or 2  # one study at a time: the wall-clock comparison needs an idle machine
    a.results.mkdir(parents=True, exist_ok=True)
    command = "NAS_DATA_DIR=../shared/data python bench/search_compare.py " + " ".join(sys.argv[1:])
    for seed in a.seeds:
        for arm in a.arms:
            row = run_arm(arm, seed, a.minutes, a.out, threads)
            row.update(command=command, date=time.strftime("%Y-%m-%d"))
            path = a.results / f"{arm}_seed{seed}.json"
            row["machines"] = known_machines(row["machines"], path)
            path.write_text(json.dumps(row, indent=1))
    rows = load_rows(a.results)
    for r in rows:
        r["top_line"] = top_line(r)  # for the print and the README; not stored
    text = arm_tables(rows)
    libraries = library_table(rows)
    if libraries:
        text += ("\n\nThe ensemble's library and selection. Since family bests joined it, a study's ensemble "
                 "chooses from its N best runs and the best run of each model family. Each study is scored with "
                 "three selections from the same runs: one selection over its N best alone (`python -m "
                 "nas_agent_graph ensemble --top-only --bags 0`), one over the whole library (`ensemble --bags 0`, "
                 f"the default before bagging won the rule of docs/search.md) and the bagged one (`ensemble --bags "
                 f"{BAGS}`, the default since). The study's own is marked; the others were built beside it and not "
                 "written:\n\n" + libraries)
    print(text)
    for r in rows:
        print(f"\n{r['arm']} seed {r['seed']} ({r['date']}): families tried {', '.join(r['families'])}")
        if r.get("top_line"):
            print(r["top_line"])
        print("| run | minutes | proposer | best val so far | its test MSE | best run |\n|---:|---:|---|---:|---:|---|")
        for x in r["curve"]:
            print(f"| {x['run']} | {x['minutes']:.1f} | {x['proposer']} | {_f(x['best_val'])} | {_f(x['best_test'])} | "
                  f"{x['best_run']} |")
    note = study_notes(rows, a.minutes)
    (a.results / "README.md").write_text(
        f"# Architecture-search arms (issue 12)\n\nStudies of at most {a.minutes:g} minutes of study time on a "
        f"2-core CPU, ETTh1 M 96->96, selection by validation MSE. Each study's curve is in its JSON file, with the "
        f"command that made it: run again, it reads a finished study from --out, resumes a killed one, and trains "
        f"one anew where --out lacks it (up to {a.minutes:g} minutes). The latest: `{command}`\n\nThe ensemble is each study's runs/ensemble.json: a "
        f"forward selection on validation forecasts over its 5 best runs, and, in studies on code since family bests "
        f"joined the library, over each model family's best run too (built with `python -m nas_agent_graph "
        f"ensemble` for a study that predates ensembles, and then with the family bests whose checkpoints it kept), "
        f"by one selection in studies on code from before bagged selection became the default and bagged since; its "
        f"test MSE, like a run's, is reported, never used. The summary's bagged columns are the bagged selection of "
        f"every study that has one, its own or built beside it from the same runs. "
        f"The code column lists the commits a study ran at, one per session that resumed it on other code "
        f"(\"unrecorded\": it ran before the column existed); compare arms that ran on the same code. The machine "
        f"column is the CPU of each session that ran the study: the budgets are wall-clock, so a study on a slower "
        f"CPU, or one without native bf16 (training.amp off), trains less in its {a.minutes:g} minutes.\n\n"
        f"{text}\n{note}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None,
                   help="architecture-search arms (see the module docstring) instead of --proposers")
    p.add_argument("--minutes", type=float, default=90.0, help="--arms: study time per study")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "search_arms",
                   help="--arms: one JSON file per study and README.md with the tables (commit them)")
    p.add_argument("--proposers", nargs="+", default=["tpe", "random"])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/nas_search_compare"))
    p.add_argument("--budget", nargs="+", default=BUDGET, metavar="KEY=VALUE", help="--set items for every run")
    a = p.parse_args()
    if a.arms:
        return arms_main(a)
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    tasks = [(pr, s) for s in a.seeds for pr in a.proposers]
    print(f"{len(tasks)} studies of {a.runs} runs, {a.jobs} at a time, {threads} thread(s) each; "
          f"budget per run: {' '.join(a.budget)}; space: bench/cpu_space.json")
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda t: run_study(t[0], t[1], a.runs, a.out, threads, a.budget), tasks))
    (a.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| proposer | seed | runs | failed | rejected | baseline val | best val MSE | test MSE of best | "
          "best run | train time to best | study wall | overhead/run | smoke/run | LLM s/proposal | LLM valid |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"| {r['proposer']} | {r['seed']} | {r['runs']} | {r['failed']} | {r['rejected']} | {f(r['baseline_val'])} | "
              f"{f(r['best_val'])} | {f(r['best_test'])} | {r['best_run']} | {r['time_to_best_s']:.0f}s | "
              f"{r['wall_s']:.0f}s | {r['overhead_per_run_s']:.2f}s | {r['smoke_per_run_s']:.2f}s | "
              f"{'-' if r['llm_s_per_proposal'] is None else format(r['llm_s_per_proposal'], '.1f') + 's'} | "
              f"{r['llm_valid']} |")
    print("\n| proposer | seeds | mean best val MSE | std | mean test MSE of best | best val vs tpe |")
    print("|---|---:|---:|---:|---:|---:|")
    means = {}
    for pr in a.proposers:
        vals = [r["best_val"] for r in rows if r["proposer"] == pr and r["best_val"] is not None]
        if vals:
            means[pr] = statistics.mean(vals)
    for pr in a.proposers:
        vals = [r["best_val"] for r in rows if r["proposer"] == pr and r["best_val"] is not None]
        tests = [r["best_test"] for r in rows if r["proposer"] == pr and r["best_test"] is not None]
        if not vals:
            continue
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        ratio = f"{means[pr] / means['tpe']:.3f}x" if "tpe" in means else "-"
        print(f"| {pr} | {len(vals)} | {means[pr]:.4f} | {std:.4f} | "
              f"{statistics.mean(tests) if tests else float('nan'):.4f} | {ratio} |")


if __name__ == "__main__":
    main()
