"""``maas usage``: requests and prompt/completion tokens per key per UTC day."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from maas_ray.cli.common import StorageOpt, console, user_errors
from maas_ray.cli.keys import AdminKeyOpt, RemoteUrlOpt, admin_call


@user_errors
def usage(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    day: Annotated[str | None, typer.Option(help="Only this UTC day, YYYY-MM-DD.")] = None,
    storage: StorageOpt = None,
    url: RemoteUrlOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Metered usage of API keys (recorded by the ingress when auth is on)."""
    if url:
        params = {k: v for k, v in (("tenant", tenant), ("day", day)) if v}
        rows = admin_call(url, admin_key, "GET", "/v1/admin/usage", params=params)["data"]
    else:
        from maas_ray.auth import KeyStore

        rows = KeyStore(storage).usage(tenant, day)
    table = Table("day", "tenant", "key id", "requests", "prompt tokens", "completion tokens")
    for row in rows:
        table.add_row(row["day"], row["tenant"], row["key_id"], str(row["requests"]),
                      str(row["prompt_tokens"]), str(row["completion_tokens"]))
    console.print(table)
