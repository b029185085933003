"""The incumbent files: config.py (and, after an accepted model-code proposal, model.py) are
derived from the study's best run and rewritten when it changes; the previous ones are kept
under runs/incumbents/."""
from __future__ import annotations

import json
import logging
import shutil

from nas_agent.agent_state import AgentState, get_best_run
from nas_agent.atomic import atomic_write_text
from nas_agent.config import config_hash, parse_config_source, write_config
from nas_agent.legacy import style_of
from nas_agent.run_folder import MODEL_FILE
from nas_agent.run_manager import get_run_dir
from nas_agent_graph.context import Context

log = logging.getLogger(__name__)

def sync_incumbent(state: AgentState, ctx: Context) -> None:
    """Make config.py agree with the study's best run (it is derived from agent_state.json).

    config.py gets the best proposal without this study's --set overrides (a quick search's
    max_epochs=3 is a property of the search, not of the config it found). The previous
    incumbent is kept under runs/incumbents/ before it is replaced. The file keeps its key
    spelling: one in the original nas_system's format is rewritten in that format.
    """
    best = get_best_run(state)
    if best is None:
        return
    incumbent = best.extra.get("incumbent_config") or best.config
    want = config_hash(incumbent)
    style: frozenset[str] = frozenset()
    if ctx.config_path.exists():
        try:
            current = parse_config_source(ctx.config_path.read_text(), str(ctx.config_path))
            style = style_of(current)
            if config_hash(current) == want:
                return
        except ValueError:
            pass  # unreadable or invalid: replace it, but keep a copy
        keep = ctx.runs_dir / "incumbents" / f"config_before_{best.run_id}.py"
        keep.parent.mkdir(parents=True, exist_ok=True)
        if not keep.exists():
            shutil.copy2(ctx.config_path, keep)
    header = (f"Incumbent: {best.run_id}, val_mse {best.val_mse:.6f}, written by nas_agent_graph.\n"
              f"Earlier incumbents are kept in {ctx.runs_dir / 'incumbents'}/.")
    write_config(without_channels(incumbent), ctx.config_path, header=header, style=style)
    log.info("config.py now holds the incumbent %s", best.run_id)


def sync_model(state: AgentState, ctx: Context) -> None:
    """When the best run trained its own model code, make it the incumbent model file.

    The previous model file is kept under runs/incumbents/ before it is replaced.
    """
    best = get_best_run(state)
    if best is None or not best.extra.get("proposal", {}).get("code_sha256"):
        return
    source = get_run_dir(best.run_id, ctx.runs_dir, create=False) / MODEL_FILE
    if not source.is_file():
        log.warning("%s is the best run but its model.py is missing; %s is left as it is", best.run_id, ctx.model_path)
        return
    code = source.read_text(encoding="utf-8")
    if ctx.model_path.is_file():
        if ctx.model_path.read_text(encoding="utf-8") == code:
            return
        keep = ctx.runs_dir / "incumbents" / f"model_before_{best.run_id}.py"
        keep.parent.mkdir(parents=True, exist_ok=True)
        if not keep.exists():
            shutil.copy2(ctx.model_path, keep)
    atomic_write_text(ctx.model_path, code)
    log.info("%s now holds the model code of %s", ctx.model_path, best.run_id)


def without_channels(config: dict) -> dict:
    """A config without the data-derived channel counts, so it runs on any data set."""
    out = json.loads(json.dumps(config))
    for k in ("enc_in", "dec_in", "c_out"):
        out.get("model", {}).pop(k, None)
    return out
