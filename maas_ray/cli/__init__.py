"""The ``maas`` command line: a small table of verbs over the library's functions."""

from __future__ import annotations

import typer

from maas_ray.cli import batch, chat, jobs, keys, models, predict, train, up, usage

app = typer.Typer(
    name="maas",
    help="Model-as-a-Service on Ray: train, version and serve models.\n\n"
    "Storage root: --storage, else $MAAS_HOME, else ~/.maas. Ray: --address or $RAY_ADDRESS "
    "joins a cluster; otherwise an embedded local Ray starts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("up")(up.up)
app.command("train")(train.train)
app.command("predict")(predict.predict)
app.command("chat")(chat.chat)
app.command("embed")(chat.embed)
app.command("usage")(usage.usage)
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(jobs.app, name="jobs")
app.add_typer(batch.app, name="batch")


def main() -> None:
    app()
