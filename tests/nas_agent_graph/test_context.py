"""Settings are frozen and hold each default once; the live objects are the session's."""
import dataclasses

import pytest

from nas_agent_graph.cli import context_from_args, search_parser
from nas_agent_graph.context import Context, Session
from nas_agent_graph.llm.backend import DEFAULT_GENERATION
from nas_agent_graph.llm.chat_model import LocalChatModel
from nas_agent_graph.prompting import PromptLimits


def test_settings_cannot_be_assigned_and_the_session_can():
    ctx = Context()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.max_runs = 5
    ctx.session.started_at = 1.0  # live state
    assert isinstance(ctx.session, Session) and Context().session is not ctx.session


def test_the_cli_takes_its_defaults_from_the_settings():
    ctx = context_from_args(search_parser().parse_args(["--proposer", "tpe"]))
    for name in ("state_path", "runs_dir", "config_path", "max_runs", "seed", "sampler", "sampler_fraction",
                 "n_candidates", "prompt_tokens", "parallel", "launcher", "min_delta", "max_retries",
                 "max_failures", "smoke_timeout", "confirm_seeds", "prune", "prune_warmup_epochs", "prune_min_runs"):
        assert getattr(ctx, name) == getattr(Context, name), name


def test_prompt_and_generation_defaults_are_written_once():
    assert Context.prompt_tokens == PromptLimits().max_tokens
    chat = LocalChatModel()
    assert {k: getattr(chat, k) for k in DEFAULT_GENERATION} == DEFAULT_GENERATION
