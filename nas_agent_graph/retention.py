"""Checkpoint retention (--keep-checkpoints N): a long study keeps the weights worth keeping.

Every finished run leaves runs/<id>/best_model.pth (15 MB for the default Informer, far more for
a wide model at look-back 720), so 100 runs can fill gigabytes. After each run is recorded, the
checkpoints of every run that was ever an incumbent (accepted), of a candidate waiting for its
confirmations, of the N runs with the lowest validation MSE, and of the best run of each model
family (nas_agent.schema.model_family) are kept; "best" counts scored runs (ok or timeout), one
per config. The family bests are the end-of-study ensemble's diverse members: on a CPU the N
best are often all one family (linear ones converge within a short run budget), and averaging
models whose errors differ is what an ensemble gains from. A study keeps at most as many family
bests as the space has families (about 20).

The other finished runs lose best_model.pth and forecasts.npz (its forecasts, as large), and only those: metrics,
history, logs and config stay, so every run can still be reported on and re-trained
(`python train.py --config runs/<id>/config.py`).

The deletion is recorded first (extra.checkpoint.deleted_at in agent_state.json, saved with the
run that caused it) and done after, so a crash between the two leaves a file that the next pass
deletes again; it never leaves a deleted file that the record calls kept. Runs in flight are
not in agent_state.json yet and are never touched.
"""
from __future__ import annotations

import math
from pathlib import Path

from nas_agent.agent_state import AgentState, RunInfo, utc_now_iso
from nas_agent.run_folder import CHECKPOINT_FILE, FORECASTS_FILE, SCORED
from nas_agent.schema import model_family

DEFAULT_KEEP = 5  # the top 5 by val MSE, beside every incumbent and family best: on the CPU a few MB for a
# linear model, 15 MB for the default Informer, rarely more than 100 MB for the widest (look-back 720)


def checkpoint_record(run_dir: Path) -> dict | None:
    """extra.checkpoint of a run just finished: the file's size, or None when it wrote none."""
    path = run_dir / CHECKPOINT_FILE
    return {"file": CHECKPOINT_FILE, "bytes": path.stat().st_size} if path.is_file() else None


def scored_runs(study: AgentState) -> list[RunInfo]:
    """The runs that ended scored (status ok or timeout) with a finite val MSE, best first, one
    per config hash (the same config and seed train the same weights): the candidates for the
    N best and for a family's best, here and in the ensemble's library."""
    scored = [r for r in study.runs if r.status in SCORED and isinstance(r.val_mse, (int, float))
              and math.isfinite(r.val_mse)]
    out, hashes = [], set()
    for run in sorted(scored, key=lambda r: r.val_mse):
        config_hash = run.extra.get("config_hash") if isinstance(run.extra, dict) else None
        if config_hash and config_hash in hashes:
            continue
        hashes.add(config_hash)
        out.append(run)
    return out


def run_family(run: RunInfo) -> str:
    """The model family of a run's config (nas_agent.schema.model_family)."""
    return model_family((run.config or {}).get("model") or {})


def family_bests(study: AgentState) -> dict[str, RunInfo]:
    """The best scored run of each model family, by val MSE."""
    best: dict[str, RunInfo] = {}
    for run in scored_runs(study):
        best.setdefault(run_family(run), run)
    return best


def keepers(study: AgentState, keep: int) -> set[str]:
    """Run ids whose checkpoints stay: every incumbent, pending candidates, the `keep` best, and
    the best of each model family."""
    kept = {r.run_id for r in study.runs if r.accepted}
    kept |= {r.run_id for r in study.runs
             if isinstance(r.extra, dict) and (r.extra.get("confirm") or {}).get("status") == "pending"}
    kept |= {r.run_id for r in scored_runs(study)[:keep]}
    kept |= {r.run_id for r in family_bests(study).values()}
    return kept


def mark_for_deletion(study: AgentState, runs_dir: Path, keep: int | None) -> list[Path]:
    """Record the deletions retention calls for in `study` (the caller saves it) and return the
    files to delete once it is saved. keep=None keeps everything."""
    if keep is None:
        return []
    kept = keepers(study, keep)
    doomed = []
    for run in study.runs:
        path = runs_dir / run.run_id / CHECKPOINT_FILE
        if run.run_id in kept or not path.is_file():
            continue
        record = run.extra.get("checkpoint") if isinstance(run.extra, dict) else None
        if not isinstance(record, dict):  # a run recorded before retention existed
            record = {"file": CHECKPOINT_FILE, "bytes": path.stat().st_size}
        if "deleted_at" not in record:
            record["deleted_at"] = utc_now_iso()
            record["why"] = (f"not an incumbent, nor among the {keep} best by val MSE (--keep-checkpoints {keep}), "
                             f"nor its family's best")
        run.extra["checkpoint"] = record
        doomed.append(path)
    return doomed


def delete(paths: list[Path]) -> int:
    """Delete the checkpoints marked, and their forecasts; the bytes freed."""
    freed = 0
    for path in [p for checkpoint in paths for p in (checkpoint, checkpoint.with_name(FORECASTS_FILE))]:
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def checkpoint_cell(run: RunInfo) -> str:
    """The status table's checkpoint column: its size, "deleted", or "" (none written)."""
    record = run.extra.get("checkpoint") if isinstance(run.extra, dict) else None
    if not isinstance(record, dict):
        return ""
    if "deleted_at" in record:
        return "deleted"
    size = record.get("bytes") or 0
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def checkpoint_counts(study: AgentState) -> tuple[int, int]:
    """(runs whose checkpoint is kept, runs whose checkpoint retention deleted)."""
    cells = [checkpoint_cell(r) for r in study.runs]
    return sum(1 for c in cells if c and c != "deleted"), cells.count("deleted")
