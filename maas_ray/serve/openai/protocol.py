"""OpenAI wire types for chat, completions and embeddings.

Following OpenAI (and vLLM), requests accept unknown fields so newer SDKs keep
working; they are logged, not silently relied on. Values are validated here so
inner code can trust them.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

# Every integer has bounds here, where clients can read them in the schema: unbounded, a seed
# of 2**70 reached torch's generator and came back as a 500.
INT64 = 2**63
MAX_NEW_TOKENS = 1_000_000  # far past any context we serve; the engine cuts at its own
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


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

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=MAX_NEW_TOKENS)
    logprobs: bool = Field(default=False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description=(
        "With logprobs: also the most likely tokens at each position, this many (0 to 20)."))

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

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
