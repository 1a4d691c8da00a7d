"""How a chat model sees tools, calls them and reads their results.

Calls are written as Hermes/Qwen-style tags, one per call, calls separated by a newline::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

— the format of the chat templates of Qwen2.5/3, Hermes and SmolLM3. A model whose
template takes ``tools`` (it mentions them) gets the tools, the assistant's past
``tool_calls`` and the ``tool`` messages through its own template. Others (SmolLM2's
template has no tool format) get the *generic format*: the tools and the call format
in the system message, past calls as the tags above in the assistant's turn, and
each result as a user turn ``<tool_response>\\n{"tool_call_id", "name", "content"}\\n
</tool_response>``.

:func:`calls_grammar` writes the Lark grammar (:mod:`.constraints`) that makes a
call fit this format and its function's parameter schema exactly, arguments last
and compact (no raw newline can occur inside them), so a reader can split a
stream of it without parsing JSON.
"""

from __future__ import annotations

import json
from typing import Any

from maas_ray.engines.constraints import json_schema

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "}\n</tool_call>"
CALL_SEPARATOR = "\n"
NAME_PREFIX = CALL_OPEN + '{"name": "'
ARGUMENTS_PREFIX = '", "arguments": '
# Free text that does not begin a call: a call, once begun, must follow the grammar.
FREE_TEXT = r"/(?s:.*)/ & ~/(?s:\s*<tool_call>.*)/"
ANY_PARAMETERS = {"type": "object"}


def render_call(name: str, arguments: str) -> str:
    """One call as the model writes it (``arguments``: a JSON object as text)."""
    return f"{NAME_PREFIX}{name}{ARGUMENTS_PREFIX}{arguments}{CALL_CLOSE}"


def calls_grammar(functions: list[dict[str, Any]], free: str | None, parallel: bool) -> str:
    """A Lark grammar for calls of ``functions`` (``{"name", "parameters"}`` each): one, or
    any number when ``parallel``; or, when ``free`` is a Lark expression (:data:`FREE_TEXT`,
    a ``%json``), either that or the calls."""
    rules = []
    for i, fn in enumerate(functions):
        head = json.dumps(NAME_PREFIX + fn["name"] + ARGUMENTS_PREFIX)
        rules.append(f"call_{i}: {head} {json_schema(fn.get('parameters') or ANY_PARAMETERS)} "
                     f"{json.dumps(CALL_CLOSE)}")
    calls = f"call ({json.dumps(CALL_SEPARATOR)} call)*" if parallel else "call"
    lines = [f"start: {'free | calls' if free else 'calls'}", f"calls: {calls}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(functions))), *rules]
    if free:
        lines.append(f"free: {free}" if free.startswith("%json") else f"free: FREE\nFREE: {free}")
    return "\n".join(lines)


def has_tool_format(tokenizer: Any) -> bool:
    """Whether the model's chat template renders ``tools`` itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else json.dumps(template))


def for_template(tokenizer: Any, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``messages`` (OpenAI's shape) and the template's extra arguments, ready for
    ``apply_chat_template``: the model's own tool format where it has one, else the generic one."""
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, {}
    if has_tool_format(tokenizer):
        return [_native(m) for m in messages], ({"tools": tools} if tools else {})
    return _generic(messages, tools or []), {}


def _native(message: dict[str, Any]) -> dict[str, Any]:
    """Templates take a call's arguments as a mapping (most render them with ``tojson``)."""
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _generic(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    for m in messages:
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            result = {"tool_call_id": call_id, "name": m.get("name") or names.get(call_id),
                      "content": m.get("content")}
            out.append({"role": "user", "content": f"<tool_response>\n{json.dumps(result)}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = CALL_SEPARATOR.join(render_call(c["function"]["name"], c["function"]["arguments"])
                                        for c in m["tool_calls"])
            out.append({"role": m["role"], "content": "\n".join(filter(None, [m.get("content"), calls]))})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t)) for t in tools)
        prompt = ("You can call these functions (each with a JSON schema of its parameters):\n"
                  f"{listing}\nTo call one, answer with\n"
                  f"{render_call('<function name>', '<arguments as a JSON object>')}\n"
                  "and nothing else; a function's result comes back in <tool_response> tags.")
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
