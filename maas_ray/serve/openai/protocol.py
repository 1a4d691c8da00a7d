"""OpenAI wire types for chat, completions and embeddings.

Following OpenAI (and vLLM), requests accept unknown fields so newer SDKs keep
working; they are logged, not silently relied on. Values are validated here so
inner code can trust them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maas_ray.engines.engine import SamplingParams

logger = logging.getLogger(__name__)

# Every integer has bounds here, where clients can read them in the schema: unbounded, a seed
# of 2**70 reached torch's generator and came back as a 500.
INT64 = 2**63
MAX_NEW_TOKENS = 1_000_000  # far past any context we serve; the engine cuts at its own
# The longest stop string: each request builds a matching table as long as its stops
# (linear, but on the event loop), and no sensible stop string comes near this.
MAX_STOP_CHARS = 4096
MAX_DETOKENIZE_IDS = 1_000_000  # past any context; the body limit usually cuts sooner


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self) -> _Request:
        if self.model_extra:
            logger.info("ignoring unsupported request fields: %s", sorted(self.model_extra))
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule; names go into grammars verbatim


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(description="The arguments as a JSON object, in text.")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            ok = isinstance(json.loads(v), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("arguments must be a JSON object in a string")
        return v


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: str | None = Field(default=None, description="On a tool message: the call it answers.")

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def prompt(self) -> dict[str, Any]:
        """The message as the model server renders it (:mod:`maas_ray.engines.tool_format`)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description=(
        "A JSON schema of the arguments (an object); the call's arguments always fit it."))
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema", description=(
        "The JSON schema the output fits; features llguidance cannot enforce are refused (400)."))
    strict: bool | None = Field(default=None, description=(
        "Accepted for compatibility: the output always fits the schema (constrained decoding)."))


class ResponseFormat(BaseModel):
    """``text`` (free), ``json_object`` (any JSON object) or ``json_schema``; the output is
    decoded under a grammar, so it parses unless ``max_tokens`` cuts it (finish_reason "length")."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only then')
        return self


class SamplingFields(_Request):
    """Sampling parameters shared by chat and completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_NEW_TOKENS, description="Most new tokens.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    # A signed 64-bit seed, as OpenAI documents it; choice i samples with seed + i.
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        if stops is not None and any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings may have at most {MAX_STOP_CHARS} characters")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    def sampling_params(self, choice: int = 0, grammar: str | None = None) -> SamplingParams:
        """What the engine runs for choice ``choice`` of ``n`` (seeded ``seed + choice``);
        ``max_tokens`` None until the model server knows the prompt's length."""
        return SamplingParams(
            max_tokens=self.new_tokens(),  # type: ignore[attr-defined]
            temperature=self.temperature, top_p=self.top_p, stop=self.stop_list(),
            seed=None if self.seed is None else self.seed + choice,
            logprobs=self.logprob_count(),  # type: ignore[attr-defined]
            grammar=grammar)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=MAX_NEW_TOKENS)
    logprobs: bool = Field(default=False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description=(
        "With logprobs: also the most likely tokens at each position, this many (0 to 20)."))
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(default=None, description=(
        'Default "auto" with tools, "none" without; "required" and a named function force a call.'))
    parallel_tool_calls: bool = Field(default=True, description="Allow more than one call per answer.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _choice_needs_tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError('tool_choice "required" needs tools')
        return self

    def tool_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named``, with OpenAI's defaults."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if not self.tools:
            return "none"
        return self.tool_choice or "auto"

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """Alternatives per token the engine reports; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5, description=(
        "Return each output token's log-probability and this many most likely tokens (0 to 5)."))

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (len(v) != 1):
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: a raw ``prompt`` (as ``/v1/completions`` tokenizes it) or chat
    ``messages`` (through the model's chat template, as ``/v1/chat/completions`` does)."""

    model: str = Field(min_length=1)
    prompt: str | None = Field(default=None, description="A raw prompt; give this or messages.")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=4096,
                                               description="Chat messages; give this or prompt.")
    add_generation_prompt: bool = Field(default=True, description=(
        "With messages: end with the assistant turn's header, as chat completions do."))

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="Prompt plus completion tokens the model takes at most.")


class DetokenizeRequest(_Request):
    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(max_length=MAX_DETOKENIZE_IDS)


class DetokenizeResponse(BaseModel):
    prompt: str


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A string or a list of up to 2048 strings.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0, le=65_536)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > 2048:
            raise ValueError("input must hold 1 to 2048 strings")
        if any(not s for s in items):
            raise ValueError("input strings must not be empty")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict[str, Any]],
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": usage_}
