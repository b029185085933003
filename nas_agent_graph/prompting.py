"""Prompts: what the LLM is told about the study, rendered from the Jinja2 templates in prompts/.

The templates are plain files so a person can read and edit what the model sees:

    prompts/system.j2             the system message of every request
    prompts/propose_config.j2     ask for one configuration (llm and hybrid proposers)
    prompts/repair.j2             one repair round after an unusable reply
    prompts/propose_model_code.j2 ask for a new model file (--allow-code)

They are rendered with (all values are preformatted strings, so templates need no logic):

    task        dataset, features_text, seq_len_text, pred_len, budget, naive_hint, n_runs, n_ok, n_failed,
                n_running
    space       SearchSpace.describe(): one line per key with its type and range
    families    (system.j2) whether the space chooses among model families: the guide to them is shown
    incumbent   {run_id, val, params (all keys, JSON), summary} or None
    top, last   runs as {run_id, status, val, params, summary}; `params` of a run other than the
                incumbent lists only the keys where it differs from the incumbent
    failures    recent failed runs as {run_id, status, params, error}
    feedback    why the previous proposal was rejected, or None
    candidates  (hybrid) [{label, params}] from the Optuna sampler, and sampler {name, n_complete,
                importances}

Validation metrics only: test metrics never reach a prompt, so the search cannot fit the test set.

The prompt size is bounded (`PromptLimits.max_tokens`, counted with the model's own tokenizer
on the fully rendered prompt): when a rendering is too long, fewer runs are shown (latest, then
best, then failures) and the learning-curve summaries are cut, until it fits. A study of any
size therefore gives a prompt of bounded size; `prompt_info` records what was dropped.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import jinja2

from nas_agent.agent_state import AgentState, RunInfo, get_best_run
from nas_agent.run_folder import SCORED
from nas_agent_graph.paths import PROMPTS_DIR
from nas_agent_graph.search_space import SearchSpace

log = logging.getLogger(__name__)

TEMPLATES = ("system.j2", "propose_config.j2", "propose_model_code.j2", "repair.j2")
Messages = list[dict[str, str]]
TokenCounter = Callable[[Messages], int]


class PromptError(ValueError):
    """A template is missing or broken, or no prompt fits the token budget."""


DEFAULT_PROMPT_TOKENS = 3072  # upper bound on a prompt in the model's tokens (--prompt-tokens)


@dataclass(frozen=True)
class PromptLimits:
    """How much of the study a prompt shows, and the hard token budget it must fit."""
    max_tokens: int = DEFAULT_PROMPT_TOKENS
    """Upper bound on the rendered prompt (system + user), in the model's tokens."""
    top_k: int = 5
    """Best scored runs shown (the incumbent is shown on its own as well)."""
    last_k: int = 6
    """Latest runs shown, any status."""
    failures_k: int = 3
    """Latest failed runs shown with their error."""
    summary_chars: int = 300
    """Learning-curve summary per run, cut to this many characters."""
    error_chars: int = 300
    """Error text per failed run, cut to this many characters (the end is kept: it names the error)."""


def estimate_tokens(messages: Messages) -> int:
    """A tokenizer-free upper estimate (about 3 characters per token for this JSON-heavy text)."""
    return sum(math.ceil(len(m["content"]) / 3) + 4 for m in messages)


# ----------------------------------------------------------------------------- templates

@functools.lru_cache(maxsize=4)
def _environment(directory: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                             autoescape=False)
    return env


def render(name: str, prompts_dir: Path | None = None, **variables: Any) -> str:
    """Render one template; a missing file or variable is a PromptError naming both."""
    directory = Path(prompts_dir or PROMPTS_DIR)
    try:
        return _environment(str(directory)).get_template(name).render(**variables).strip()
    except jinja2.TemplateNotFound:
        raise PromptError(f"prompt template {directory / name} does not exist; the templates are "
                          f"{', '.join(TEMPLATES)} (restore it from git)") from None
    except jinja2.UndefinedError as e:
        raise PromptError(f"prompt template {directory / name}: {e} (the variables it may use are listed in "
                          "nas_agent_graph/prompting.py)") from None
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"prompt template {e.filename or directory / name}:{e.lineno}: {e.message}") from None


# ----------------------------------------------------------------------------- what a prompt says

def _round(value: Any) -> Any:
    """Floats to 4 significant digits: enough to tell runs apart, and fewer tokens."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def _compact(obj: Any) -> str:
    return json.dumps(_round(obj), separators=(", ", ": "))


def _cut(text: str | None, limit: int, keep_end: bool = False) -> str:
    text = " ".join((text or "").split())
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3):] if keep_end else text[:limit - 3] + "..."


def _fmt_val(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def task_info(study: AgentState, base_config: dict) -> dict[str, str]:
    """The task paragraph's facts, from the study's starting config."""
    data, training = base_config.get("data", {}), base_config.get("training", {})
    dataset = Path(str(data.get("path") or "data/ETTh1.csv")).stem
    features = data.get("features", "M")
    features_text = {"M": "all channels in, all channels out (multivariate)",
                     "S": f"the target {data.get('target')} only (univariate)",
                     "MS": f"all channels in, the target {data.get('target')} out"}.get(features, features)
    seq_len = data.get("seq_len")
    budget = [f"at most {training.get('max_epochs')} epochs"]
    if training.get("max_steps_per_epoch"):
        budget.append(f"{training['max_steps_per_epoch']} batches per epoch")
    if training.get("time_budget_s"):
        budget.append(f"{training['time_budget_s']} s")
    budget.append(f"early stopping after {training.get('patience')} epochs without improvement")
    n_ok = sum(1 for r in study.runs if r.status in SCORED and r.val_mse is not None)
    n_running = sum(1 for r in study.runs if r.status == "running")  # --parallel: runs in flight
    return {"dataset": dataset, "features_text": features_text,
            "seq_len_text": f"the last {seq_len} steps" if seq_len else "a window",
            "pred_len": str(data.get("pred_len")), "budget": ", ".join(budget),
            "naive_hint": "1.5 on ETTh1 at horizon 96" if dataset == "ETTh1" else "1 or more",
            "n_runs": str(len(study.runs)), "n_ok": str(n_ok), "n_failed": str(len(study.runs) - n_ok - n_running),
            "n_running": str(n_running)}


def run_params(run: RunInfo, space: SearchSpace) -> dict[str, Any] | None:
    """The run's config as search-space params, or None when the space cannot express it."""
    if not run.config:
        return None
    try:
        return space.from_config(run.config)
    except ValueError:
        return None


def _diff_text(params: dict | None, reference: dict | None) -> str:
    if params is None:
        return "(a config outside the search space)"
    if reference is None:
        return _compact(params)
    diff = {k: v for k, v in params.items() if reference.get(k, object()) != v}
    return "same settings as the incumbent" if not diff else "differs from the incumbent in " + _compact(diff)


def params_text(params: dict) -> str:
    """Params as a prompt shows them (compact JSON, floats to 4 significant digits)."""
    return _compact(params)


def run_view(run: RunInfo, space: SearchSpace, reference: dict | None, limits: PromptLimits) -> dict[str, str]:
    """One run as the templates show it (validation metrics only)."""
    return {"run_id": run.run_id, "status": run.status, "val": _fmt_val(run.val_mse),
            "params": _diff_text(run_params(run, space), reference),
            "summary": _cut(run.history_summary, limits.summary_chars),
            "error": _cut(run.error_tail or run.reason, limits.error_chars, keep_end=True)}


def study_views(study: AgentState, space: SearchSpace, limits: PromptLimits) -> dict[str, Any]:
    """incumbent, top, last and failures for the templates."""
    best = get_best_run(study)
    reference = run_params(best, space) if best else None
    incumbent = None
    if best is not None:
        incumbent = {"run_id": best.run_id, "val": _fmt_val(best.val_mse),
                     "params": _compact(reference) if reference else "(a config outside the search space)",
                     "summary": _cut(best.history_summary, limits.summary_chars)}
    scored = sorted((r for r in study.runs if r.status in SCORED and r.val_mse is not None and r is not best),
                    key=lambda r: r.val_mse)
    # A run in flight (--parallel; status "running") is among the latest runs, not a failure.
    failed = [r for r in study.runs if (r.status not in SCORED or r.val_mse is None) and r.status != "running"]
    top = scored[:limits.top_k]
    shown = {id(r) for r in top} | {id(best)}
    last = [r for r in study.runs[-limits.last_k:] if id(r) not in shown] if limits.last_k else []
    fails = [r for r in failed[-limits.failures_k:] if all(r is not x for x in last)] if limits.failures_k else []
    return {"incumbent": incumbent,
            "top": [run_view(r, space, reference, limits) for r in top],
            "last": [run_view(r, space, reference, limits) for r in last],
            "failures": [run_view(r, space, reference, limits) for r in fails]}


# ----------------------------------------------------------------------------- fitting the budget

def _shrink(limits: PromptLimits) -> PromptLimits | None:
    """The next, smaller limits to try, or None when nothing is left to drop."""
    if limits.last_k > 2:
        return replace(limits, last_k=limits.last_k - 2)
    if limits.top_k > 2:
        return replace(limits, top_k=limits.top_k - 1)
    if limits.summary_chars > 80:
        return replace(limits, summary_chars=limits.summary_chars // 2)
    if limits.failures_k > 1:
        return replace(limits, failures_k=limits.failures_k - 1)
    if limits.error_chars > 80:
        return replace(limits, error_chars=limits.error_chars // 2)
    for field_name in ("last_k", "top_k", "failures_k", "summary_chars"):
        if getattr(limits, field_name) > 0:
            return replace(limits, **{field_name: 0})
    return None


def fit_messages(make: Callable[[PromptLimits], Messages], limits: PromptLimits,
                 count_tokens: TokenCounter | None) -> tuple[Messages, dict[str, Any]]:
    """Render with `make(limits)`, shrinking the limits until the prompt fits max_tokens.

    Returns (messages, prompt_info): tokens, the budget, the limits used and whether anything was
    dropped. Raises PromptError when even the smallest prompt is too long (a huge search space or
    a tiny budget): the message says how long it is and what to change.
    """
    count = count_tokens or estimate_tokens
    current: PromptLimits | None = limits
    renders = 0
    while current is not None:
        messages = make(current)
        renders += 1
        tokens = count(messages)
        if tokens <= limits.max_tokens:
            return messages, {"tokens": tokens, "max_tokens": limits.max_tokens, "renders": renders,
                              "counted_with": "tokenizer" if count_tokens else "estimate",
                              "limits": asdict(current), "trimmed": current != limits}
        current = _shrink(current)
    raise PromptError(f"the prompt needs {tokens} tokens even with no past runs shown, more than the "
                      f"budget of {limits.max_tokens}; raise --prompt-tokens or narrow the search space "
                      "(--space) so its description is shorter")


def config_messages(study: AgentState, space: SearchSpace, base_config: dict, *, limits: PromptLimits,
                    count_tokens: TokenCounter | None = None, feedback: str | None = None,
                    candidates: list[dict] | None = None, sampler: dict | None = None,
                    prompts_dir: Path | None = None) -> tuple[Messages, dict[str, Any]]:
    """The system and user messages asking for one configuration, within the token budget."""
    task = task_info(study, base_config)
    # The family guide only where the space can choose a family: it is ~200 tokens of a small prompt.
    system = render("system.j2", prompts_dir, task=task, families=space.searches_architecture())
    space_text = space.describe()

    def make(lim: PromptLimits) -> Messages:
        user = render("propose_config.j2", prompts_dir, task=task, space=space_text, **study_views(study, space, lim),
                      feedback=_cut(feedback, lim.error_chars * 2, keep_end=True) or None,
                      candidates=candidates or [], sampler=sampler or {})
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    return fit_messages(make, limits, count_tokens)


def repair_messages(messages: Messages, response: str, error: str, space: SearchSpace,
                    prompts_dir: Path | None = None) -> Messages:
    """The conversation so far plus the reply and a request to fix it."""
    user = render("repair.j2", prompts_dir, response=_cut(response, 1500), error=_cut(error, 600),
                  keys=", ".join(space.entries))
    return [*messages, {"role": "assistant", "content": _cut(response, 1500)}, {"role": "user", "content": user}]


def messages_text(messages: Messages) -> str:
    """The conversation as plain text, for prompt.txt."""
    return "\n\n".join(f"### {m['role']}\n{m['content']}" for m in messages) + "\n"


# ----------------------------------------------------------------------------- model code

MODEL_INTERFACE = """\
The file defines build_model(config) -> torch.nn.Module. config is a dict with the sections "data"
(seq_len, label_len, pred_len, ...) and "model" (d_model, n_heads, e_layers, d_layers, d_ff, dropout,
enc_in, dec_in, c_out, ...); enc_in/dec_in/c_out are the data's channel counts.
The module's forward(x_enc, x_mark_enc, x_dec, x_mark_dec) gets float tensors
x_enc [batch, seq_len, enc_in], x_mark_enc [batch, seq_len, n_time_features],
x_dec [batch, label_len + pred_len, dec_in] (the last pred_len steps are zeros),
x_mark_dec [batch, label_len + pred_len, n_time_features],
and returns the forecast [batch, pred_len, c_out].
Rules: import only torch (torch.nn, torch.nn.functional, ...), math, typing, dataclasses and
functools; no file, network or process access; no exec/eval/getattr tricks; no attribute that
starts with "_" except super().__init__(); no .cuda(), .eval(), .type(), load/save (the trainer
moves the model and sets its mode). The file is checked statically, then run once on one batch
(forward, backward, output shape, parameter budget) in a subprocess with a timeout."""


def code_messages(study: AgentState, space: SearchSpace, base_config: dict, current_model: str, *,
                  limits: PromptLimits, count_tokens: TokenCounter | None = None, feedback: str | None = None,
                  prompts_dir: Path | None = None) -> tuple[Messages, dict[str, Any]]:
    """The messages asking for a new model file, within the token budget (the current model file
    is cut first, then the runs are trimmed)."""
    task = task_info(study, base_config)
    system = render("system.j2", prompts_dir, task=task, families=False).replace(
        "Reply with exactly one JSON object and nothing else.", "Reply with one complete Python file.")
    count = count_tokens or estimate_tokens
    code_chars = 6000
    while True:
        shown = current_model if len(current_model) <= code_chars else current_model[:code_chars] + "\n# ... (cut)"

        def make(lim: PromptLimits) -> Messages:
            user = render("propose_model_code.j2", prompts_dir, task=task, interface=MODEL_INTERFACE,
                          current_model=shown if code_chars else "", **study_views(study, space, lim),
                          feedback=_cut(feedback, lim.error_chars * 2, keep_end=True) or None)
            return [{"role": "system", "content": system}, {"role": "user", "content": user}]

        if code_chars == 0 or count(make(limits)) <= limits.max_tokens:
            messages, info = fit_messages(make, limits, count_tokens)
            info["model_chars_shown"] = min(code_chars, len(current_model))
            return messages, info
        code_chars = code_chars // 2 if code_chars > 500 else 0
