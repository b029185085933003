"""The local backend as a langchain-core chat model, so graph nodes speak langchain messages.

    llm = LocalChatModel(temperature=0.8, max_new_tokens=300)         # the embedded model
    msg = llm.invoke([SystemMessage("..."), HumanMessage("...")], json_schema=schema)
    msg.content                      # the generated text (JSON when a schema was given)
    msg.additional_kwargs["parsed"]  # the parsed JSON object, or None
    msg.response_metadata            # prompt_tokens, completion_tokens, latency_s, model, quant,
                                     # device, dtype, constrained, fallback_reason, seed
    msg.usage_metadata               # input_tokens, output_tokens, total_tokens

The schema can also be bound once: `llm.bind(json_schema=schema).invoke(messages)`, or set
as the `json_schema` field. Per-call kwargs override the fields temperature, top_p, top_k,
max_new_tokens and seed. The model is loaded on first use and shared by every LocalChatModel
of the same (model, quant, device) in the process (backend.load_model caches it).
"""
from __future__ import annotations

from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field

from nas_agent_graph.llm import backend

_GEN_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
# Where a reply's time went (see nas_agent_graph.llm.decoding); also copied into llm.json.
DECODING_STATS = ("prefill_s", "reused_tokens", "decode_passes", "forced_tokens")


def from_dicts(messages: list[dict[str, str]]) -> list[BaseMessage]:
    """[{"role", "content"}] -> langchain messages (the inverse of to_backend_messages)."""
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    try:
        return [kinds[m["role"]](content=m["content"]) for m in messages]
    except KeyError as e:
        raise ValueError(f"unknown message role {e}; expected system, user or assistant") from None


def to_backend_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """langchain messages -> [{"role": "system" | "user" | "assistant", "content": str}]."""
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(m.role, m.role)
        else:
            raise ValueError(f"LocalChatModel cannot send a {type(m).__name__} (tool calls are not supported); "
                             "use SystemMessage, HumanMessage or AIMessage")
        content = m.content if isinstance(m.content, str) else "".join(
            part if isinstance(part, str) else str(part.get("text", "")) for part in m.content)
        out.append({"role": role, "content": content})
    return out


class LocalChatModel(BaseChatModel):
    """A chat model running a local Hugging Face model (see nas_agent_graph.llm.backend)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model_spec: Optional[str] = Field(default=None, description="None = the embedded model; a local "
                                      "directory or .gguf file; or a Hugging Face model id")
    quant: Optional[str] = Field(default=None, description='"4bit", "8bit", "none"; None = 4bit on CUDA, none on CPU')
    device: Optional[str] = Field(default=None, description='"cpu", "cuda", "cuda:N"; None = CUDA when present')
    temperature: float = backend.DEFAULT_GENERATION["temperature"]
    top_p: float = backend.DEFAULT_GENERATION["top_p"]
    top_k: Optional[int] = backend.DEFAULT_GENERATION["top_k"]
    max_new_tokens: int = backend.DEFAULT_GENERATION["max_new_tokens"]
    seed: Optional[int] = None
    json_schema: Optional[dict] = Field(default=None, description="constrain every reply to this JSON schema")
    adapter: Optional[str] = Field(default=None, description="name of a LoRA adapter to generate with (None = base)")
    adapter_path: Optional[str] = Field(default=None, description="folder of that adapter (peft save_pretrained)")

    @property
    def _llm_type(self) -> str:
        return "nas-agent-local-hf"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_spec": self.model_spec, "quant": self.quant, "device": self.device,
                **{k: getattr(self, k) for k in _GEN_KEYS}}

    def load(self) -> tuple[Any, Any, dict]:
        """(model, tokenizer, info), loading on first use (cached per process)."""
        return backend.load_model(self.model_spec, self.quant, self.device)

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the prompt these messages render to (chat template included), as generation sees it."""
        _, tokenizer, _ = self.load()
        text = backend.render_prompt(tokenizer, messages)
        add_special = not getattr(tokenizer, "chat_template", None)
        return len(tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def settings(self) -> dict[str, Any]:
        """The generation settings, as recorded in each run's llm.json."""
        return {k: getattr(self, k) for k in _GEN_KEYS}

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        base, tokenizer, info = self.load()
        model, adapter_context = backend.with_adapter(base, self.adapter, self.adapter_path)
        schema = kwargs.pop("json_schema", self.json_schema)
        settings = {k: kwargs.pop(k, getattr(self, k)) for k in _GEN_KEYS}
        if kwargs:
            raise TypeError(f"LocalChatModel: unknown invoke arguments {sorted(kwargs)}; "
                            f"known: json_schema, {', '.join(_GEN_KEYS)}")
        with adapter_context:
            result = backend.generate_json(model, tokenizer, to_backend_messages(messages), schema,
                                           constrain=schema is not None,
                                           cache_tag=(self.adapter, self.adapter_path), **settings)
        text = result.text
        if stop and not result.constrained:
            cuts = [text.find(s) for s in stop if s and s in text]
            if cuts:
                text = text[:min(cuts)]
        metadata = {
            "model": info["model"], "model_name": info["model"], "quant": info["quant"],
            "device": info["device"], "dtype": info["dtype"],
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "latency_s": round(result.latency_s, 4), "constrained": result.constrained,
            "fallback_reason": result.fallback_reason, "adapter": self.adapter, **settings,
            # where the time went (see nas_agent_graph.llm.decoding)
            **{k: result.meta[k] for k in DECODING_STATS if k in result.meta},
        }
        message = AIMessage(
            content=text,
            additional_kwargs={"parsed": result.parsed},
            response_metadata=metadata,
            usage_metadata={"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                            "total_tokens": result.prompt_tokens + result.completion_tokens},
        )
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model": info["model"], "token_usage": {
                              "prompt_tokens": result.prompt_tokens,
                              "completion_tokens": result.completion_tokens}})
