"""Warm start from the literature: the first runs after the baseline train known good models.

A search that starts from Informer alone spends its first dozen runs rediscovering what the
field already knows (instance normalisation, channel independence, patches, linear heads). So
after the baseline, a new study trains the archetypes: the shipped configs in configs/ (or the
files given with --warm-start), one run each, with proposer "archetype". Their runs are ordinary
runs: the samplers see them as trials (every shipped config is a point of the default space) and
the LLM sees them in its prompt, and both refine from there.

An archetype brings its model and its optimisation; the study's base config brings the task and
the budget (`TASK_AND_BUDGET` below), so an archetype trains on the study's data set, horizon and
per-run budget, and its score compares with every other run of the study.

Which archetypes have run is read from agent_state.json (the runs, and the rejected proposals: an
archetype the validation refused, say a duplicate or one over --max-params, is skipped, not retried),
so a resumed study goes on where it stopped. The warm start only ever comes first: once another
proposer has run, no archetype is proposed (a study from before the warm start resumes unchanged).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from nas_agent.agent_state import AgentState
from nas_agent.config import ConfigError, load_config
from nas_agent_graph.study.confirmation import CONFIRM_PROPOSER
from nas_agent_graph.paths import CONFIGS_DIR
from nas_agent_graph.proposers import Proposal

PROPOSER = "archetype"
# Proposers of the runs a warm start may follow: the baseline, earlier archetypes and their
# confirmation runs (--confirm-seeds).
WARM_START_PHASE = ("baseline", PROPOSER, CONFIRM_PROPOSER)
# Shipped in configs/. The Informer paper's config is left out: the baseline already is an Informer.
DEFAULT_ARCHETYPES = tuple(CONFIGS_DIR / f"{name}.py"
                           for name in ("dlinear", "patchtst42", "itransformer", "tsmixer", "patchtst64"))
# Settings that define the task and the per-run budget: always the study's, never the archetype's.
TASK_AND_BUDGET = {
    "data": ("path", "features", "target", "pred_len", "split", "split_ratios", "scale"),
    "training": ("max_epochs", "patience", "time_budget_s", "max_steps_per_epoch", "seed", "amp", "grad_clip"),
}


def load_archetypes(paths: tuple[Path, ...] | list[Path]) -> list[tuple[str, dict]]:
    """(name, full config) of each file, validated now so a bad file fails before any run.

    The name is the file's stem; two files with one stem are an error (the name is how a study
    remembers which archetypes have run)."""
    out: list[tuple[str, dict]] = []
    for path in paths:
        name = Path(path).stem
        if any(name == seen for seen, _ in out):
            raise ConfigError(f"--warm-start: two files are named {name!r}; rename one (the file name is "
                              "how the study remembers which warm-start configs have run)")
        out.append((name, load_config(path).model_dump()))
    return out


def archetype_config(archetype: dict, base: dict) -> dict:
    """The archetype's config with the study's task and budget (TASK_AND_BUDGET) from `base`."""
    config = copy.deepcopy(archetype)
    for section, keys in TASK_AND_BUDGET.items():
        for key in keys:
            if key in base.get(section, {}):
                config[section][key] = copy.deepcopy(base[section][key])
    if config["data"]["label_len"] > config["data"]["seq_len"]:
        config["data"]["label_len"] = config["data"]["seq_len"]
    return config


def tried(study: AgentState) -> set[str]:
    """Names of the archetypes a study has run or refused."""
    names = {(r.extra.get("proposal") or {}).get("archetype") for r in study.runs
             if r.proposer == PROPOSER and isinstance(r.extra, dict)}
    names |= {e.get("archetype") for e in study.rejected if e.get("proposer") == PROPOSER}
    return names - {None}


class ArchetypeProposer:
    """Proposes each archetype once, in order; `pending` says whether any is left."""
    name = PROPOSER

    def __init__(self, archetypes: list[tuple[str, dict]]):
        self.archetypes = archetypes

    def pending(self, study: AgentState) -> list[str]:
        """The archetypes still to run; none once another proposer has run, so a study started
        before the warm start existed (or with it off) is never interrupted by it on a resume."""
        if any(r.proposer not in WARM_START_PHASE for r in study.runs):
            return []
        done = tried(study)
        return [name for name, _ in self.archetypes if name not in done]

    def propose(self, study: AgentState, base_config: dict, attempt: int = 0,
                feedback: str | None = None) -> Proposal:
        left = self.pending(study)
        if not left:
            raise ValueError("every warm-start config has run; ask the search's proposer instead")
        name = left[0]
        archetype = dict(self.archetypes)[name]
        return Proposal(config=json.loads(json.dumps(archetype_config(archetype, base_config))),
                        proposer=self.name, meta={"archetype": name, "attempt": attempt})
