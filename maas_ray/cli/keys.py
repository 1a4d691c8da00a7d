"""``maas keys``: API keys of tenants.

Two ways to reach them: the project database under the storage root (whoever can
write it is the operator: this is how the first admin key is made), or a running
service's admin routes with ``--url`` and an admin key. A key is printed once, at
creation; only its salted hash is stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from maas_ray.auth.keys import DEFAULT_MAX_CONCURRENT
from maas_ray.cli.common import StorageOpt, console, err_console, user_errors

app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)

RemoteUrlOpt = Annotated[str | None, typer.Option(
    "--url", help="Use this running service's admin routes (needs --admin-key) "
    "instead of the local project database.")]
AdminKeyOpt = Annotated[str | None, typer.Option(
    "--admin-key", envvar="MAAS_ADMIN_KEY", show_envvar=True, help="An admin key, for --url.")]


def _when(ts: int | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def admin_call(url: str, admin_key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    """One admin route of a running service; its error message becomes a CLI error."""
    import httpx

    if not admin_key:
        raise _fail("--url needs an admin key: --admin-key KEY or $MAAS_ADMIN_KEY "
                    "(make one with `maas keys create --admin` where the database lives)")
    try:
        r = httpx.request(method, f"{url.rstrip('/')}{path}", timeout=60,
                          headers={"Authorization": f"Bearer {admin_key}"}, **kwargs)
    except httpx.HTTPError as err:
        raise _fail(f"cannot reach {url}: {err}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise _fail(f"{url} answered {r.status_code}: {message}")
    return r.json()


@app.command("create")
@user_errors
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for (owns its files, jobs, models).")],
    rate: Annotated[str, typer.Option(help="Request rate limit, N/s|min|hour|day.")] = "60/min",
    tokens_per_day: Annotated[int | None, typer.Option(
        help="Prompt+completion tokens per UTC day [default: unlimited].")] = None,
    max_concurrent: Annotated[int, typer.Option(
        help="Requests in flight at once, per ingress replica; more get 429.")] = DEFAULT_MAX_CONCURRENT,
    admin: Annotated[bool, typer.Option(help="May manage keys (the /v1/admin routes).")] = False,
    storage: StorageOpt = None,
    url: RemoteUrlOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Create a key and print it once: store it now, it cannot be shown again.

    Example: maas keys create --tenant acme --rate 120/min --tokens-per-day 200000
    """
    if url:
        made = admin_call(url, admin_key, "POST", "/v1/admin/keys", json={
            "tenant": tenant, "rate": rate, "tokens_per_day": tokens_per_day,
            "max_concurrent": max_concurrent, "admin": admin})
        info, secret = made, made["key"]
    else:
        from maas_ray.auth import KeyStore

        try:
            key, secret = KeyStore(storage).create(tenant, rate, tokens_per_day, admin, max_concurrent)
        except ValueError as err:
            raise _fail(str(err)) from None
        info = key.to_dict()
    console.print(f"key id {info['id']}  tenant {info['tenant']}  rate {info['rate']}  tokens/day "
                  f"{info['tokens_per_day'] or 'unlimited'}  concurrent {info['max_concurrent']}"
                  f"{'  admin' if info['admin'] else ''}",
                  highlight=False)
    console.print("API key (shown once; send as 'Authorization: Bearer <key>'):")
    print(secret)


@app.command("ls")
@user_errors
def ls(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    storage: StorageOpt = None,
    url: RemoteUrlOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """List keys (ids and prefixes only; keys themselves are never stored)."""
    if url:
        params = {"tenant": tenant} if tenant else {}
        rows = admin_call(url, admin_key, "GET", "/v1/admin/keys", params=params)["data"]
    else:
        from maas_ray.auth import KeyStore

        rows = [k.to_dict() for k in KeyStore(storage).list(tenant)]
    # The id is what `revoke` takes: never cut it, whatever the terminal's width.
    table = Table(Column("id", no_wrap=True, min_width=16), "tenant", "key", "rate", "tokens/day",
                  "concurrent", "admin", "created", "revoked")
    for k in rows:
        table.add_row(k["id"], k["tenant"], k["display"], k["rate"], str(k["tokens_per_day"] or "-"),
                      str(k.get("max_concurrent", "-")),
                      "yes" if k["admin"] else "", _when(k["created_at"]), _when(k["revoked_at"]))
    console.print(table)


@app.command("revoke")
@user_errors
def revoke(
    key_id: Annotated[str, typer.Argument(help="Key id, as `maas keys ls` shows it.")],
    storage: StorageOpt = None,
    url: RemoteUrlOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    if url:
        info = admin_call(url, admin_key, "DELETE", f"/v1/admin/keys/{key_id}")
    else:
        from maas_ray.auth import KeyStore

        try:
            info = KeyStore(storage).revoke(key_id).to_dict()
        except KeyError as err:
            raise _fail(str(err.args[0])) from None
    console.print(f"revoked {info['id']} (tenant {info['tenant']})", highlight=False)
