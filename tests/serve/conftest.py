"""Fixtures for the OpenAI-API feature tests that run on both engines."""

from __future__ import annotations

import openai
import pytest

CHAT = "smollm2-135m-instruct"  # pinned to transformers by tests/conftest.py


@pytest.fixture(scope="module")
def client(serve_url: str) -> openai.OpenAI:
    """The official SDK against the session app."""
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def model(request: pytest.FixtureRequest, llm_home: str) -> str:
    """The base chat model on each engine: its safetensors version (transformers) and its
    GGUF-only copy (llama.cpp)."""
    if request.param == "transformers":
        return f"{CHAT}:1"
    return request.getfixturevalue("gguf_model")
