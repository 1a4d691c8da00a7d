"""``maas chat`` and ``maas embed``: small clients of a running service."""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import typer

from maas_ray.cli.common import console, err_console

UrlOpt = Annotated[str, typer.Option("--url", envvar="MAAS_URL", help="The service's base URL.")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="MAAS_API_KEY",
                                            help="Bearer key when auth is on.")]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _fail(response: httpx.Response) -> None:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    err_console.print(f"[bold red]error {response.status_code}:[/] {message}")
    raise typer.Exit(2)


def chat(
    model: Annotated[str, typer.Argument(help="A chat model id, e.g. smollm2-135m-instruct.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 256,
    message: Annotated[str | None, typer.Option("--message", "-m",
                                                help="Send one message, print the reply, exit.")] = None,
) -> None:
    """Chat with a model of a running service; replies stream token by token.

    Interactive unless --message is given; empty line or Ctrl-D quits.
    """
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    with httpx.Client(base_url=url, headers=_headers(api_key), timeout=300) as client:
        while True:
            text = message if message is not None else _ask()
            if not text:
                return
            history.append({"role": "user", "content": text})
            body = {"model": model, "messages": history, "stream": True,
                    "temperature": temperature, "max_tokens": max_tokens}
            reply = []
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    _fail(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        reply.append(piece)
                        console.print(piece, end="", highlight=False, markup=False)
            console.print()
            history.append({"role": "assistant", "content": "".join(reply)})
            if message is not None:
                return


def _ask() -> str:
    try:
        return console.input("[bold cyan]you>[/] ").strip()
    except EOFError:
        return ""


def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
    model: Annotated[str, typer.Option(help="An embedding model id.")] = "all-minilm-l6-v2",
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Embed texts with a running service; prints one JSON vector per line."""
    response = httpx.post(f"{url}/v1/embeddings", headers=_headers(api_key), timeout=120,
                          json={"model": model, "input": texts})
    if response.status_code != 200:
        _fail(response)
    for item in response.json()["data"]:
        typer.echo(json.dumps(item["embedding"]))
