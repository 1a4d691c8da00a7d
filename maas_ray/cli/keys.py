"""``maas keys``: API keys of tenants, in the project database under the storage root.

A key is printed once, at creation; only its salted hash is stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.table import Table

from maas_ray.cli.common import StorageOpt, console, err_console, user_errors

app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


def _when(ts: int | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@app.command("create")
@user_errors
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for (owns its files, jobs, models).")],
    rate: Annotated[str, typer.Option(help="Request rate limit, N/s|min|hour|day.")] = "60/min",
    tokens_per_day: Annotated[int | None, typer.Option(
        help="Prompt+completion tokens per UTC day [default: unlimited].")] = None,
    admin: Annotated[bool, typer.Option(help="May manage keys.")] = False,
    storage: StorageOpt = None,
) -> None:
    """Create a key and print it once: store it now, it cannot be shown again.

    Example: maas keys create --tenant acme --rate 120/min --tokens-per-day 200000
    """
    from maas_ray.auth import KeyStore

    try:
        key, secret = KeyStore(storage).create(tenant, rate, tokens_per_day, admin)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(f"key id {key.id}  tenant {key.tenant}  rate {key.rate}  tokens/day "
                  f"{key.tokens_per_day or 'unlimited'}{'  admin' if key.admin else ''}", highlight=False)
    console.print("API key (shown once; send as 'Authorization: Bearer <key>'):")
    print(secret)


@app.command("ls")
@user_errors
def ls(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    storage: StorageOpt = None,
) -> None:
    """List keys (ids and prefixes only; keys themselves are never stored)."""
    from maas_ray.auth import KeyStore

    table = Table("id", "tenant", "key", "rate", "tokens/day", "admin", "created", "revoked")
    for k in KeyStore(storage).list(tenant):
        table.add_row(k.id, k.tenant, k.display, str(k.rate), str(k.tokens_per_day or "-"),
                      "yes" if k.admin else "", _when(k.created_at), _when(k.revoked_at))
    console.print(table)


@app.command("revoke")
@user_errors
def revoke(
    key_id: Annotated[str, typer.Argument(help="Key id, as `maas keys ls` shows it.")],
    storage: StorageOpt = None,
) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    from maas_ray.auth import KeyStore

    try:
        key = KeyStore(storage).revoke(key_id)
    except KeyError as err:
        raise _fail(str(err.args[0])) from None
    console.print(f"revoked {key.id} (tenant {key.tenant})", highlight=False)
