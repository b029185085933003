"""The lineage of a study: which run each run came from, as a tree for runs/report.html.

A run's parent is `parent_run_id`: the incumbent its proposer started from (or the run a
confirmation repeats). The tree is nested HTML lists, so the report stays one offline file with
no script: each node shows run id, proposer, status and val MSE; runs that became the incumbent
are marked; a click on a node opens the config keys it changed from its parent.
"""
from __future__ import annotations

import html
import math
from typing import Any

from nas_agent.agent_state import AgentState, RunInfo
from nas_agent.run_folder import SCORED

CSS = """
.lineage ul { list-style: none; margin: 0; padding-left: 1.4em; border-left: 1px dotted #afb8c1; }
.lineage > ul { border-left: none; padding-left: 0; }
.lineage li { margin: 2px 0; }
.lineage summary { cursor: pointer; }
.lineage .inc { font-weight: 600; color: #1a7f37; }
.lineage .best { background: #dafbe1; }
.lineage .fail { color: #b42318; }
.lineage table { font-size: 0.85em; margin: 4px 0 6px 1.2em; }
"""
_MAX_DIFF = 40  # keys shown per node


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("optimizer_kwargs", "scheduler_kwargs", "criterion_kwargs"):
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def config_diff(child: dict, parent: dict) -> list[tuple[str, Any, Any]]:
    """(key, parent's value, child's value) for every setting that differs, in key order."""
    a, b = _flat(parent), _flat(child)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def children(state: AgentState) -> dict[str | None, list[RunInfo]]:
    """Runs by parent id, in run order; a run whose parent is unknown hangs from the root (None)."""
    ids = {r.run_id for r in state.runs}
    out: dict[str | None, list[RunInfo]] = {}
    for run in state.runs:
        parent = run.parent_run_id if run.parent_run_id in ids and run.parent_run_id != run.run_id else None
        out.setdefault(parent, []).append(run)
    return out


def _val(run: RunInfo) -> str:
    v = run.val_mse
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def _node(run: RunInfo, parent: RunInfo | None, best_id: str | None) -> str:
    esc = html.escape
    cls = " ".join(c for c in ("inc" if run.accepted else "", "best" if run.run_id == best_id else "",
                               "fail" if run.status not in SCORED + ("pruned",) else "") if c)
    mark = " ★" if run.run_id == best_id else (" ✓" if run.accepted else "")
    label = (f'<span class="{cls}">{esc(run.run_id)}{mark}</span> · {esc(run.proposer or "?")} · '
             f"{esc(run.status)} · val {_val(run)}")
    if parent is None:
        return f"<summary>{label}</summary>"
    diff = config_diff(run.config, parent.config)
    rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td>{esc(repr(a))}</td><td>→ {esc(repr(b))}</td></tr>"
                   for k, a, b in diff[:_MAX_DIFF])
    more = f"<tr><td colspan=3>… {len(diff) - _MAX_DIFF} more</td></tr>" if len(diff) > _MAX_DIFF else ""
    what = (f"<table>{rows}{more}</table>" if diff else '<p class="muted">same config as its parent '
            "(another seed, or a repeat)</p>")
    return f'<summary title="{len(diff)} setting(s) changed from {esc(parent.run_id)}">{label}</summary>{what}'


def lineage_html(state: AgentState) -> str:
    """The report's lineage section: a tree of runs by parent, incumbents marked."""
    if not state.runs:
        return ""
    kids = children(state)
    by_id = {r.run_id: r for r in state.runs}

    def subtree(parent_id: str | None) -> str:
        items = []
        for run in kids.get(parent_id, []):
            inner = subtree(run.run_id)
            items.append(f"<li><details>{_node(run, by_id.get(parent_id), state.best_run_id)}</details>{inner}</li>")
        return f"<ul>{''.join(items)}</ul>" if items else ""

    changes = sum(1 for r in state.runs if r.accepted)
    return (f'<h2 id="lineage">Lineage</h2>\n<div class="card lineage"><p class="muted">Each run under the '
            f"run it started from (parent_run_id). ✓ became the incumbent ({changes} change(s)), ★ is the best. "
            f"Click a run for the settings it changed.</p>\n{subtree(None)}</div>")
