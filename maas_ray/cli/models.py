"""``maas models``: list, show and remove registry versions."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from rich.table import Table

from maas_ray import storage as storage_mod
from maas_ray.cli.common import StorageOpt, console, user_errors
from maas_ray.registry import ModelRef, Registry

app = typer.Typer(help="List, show and remove registry models.", no_args_is_help=False)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts or 0).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _headline(metrics: dict) -> str:
    keys = ("test_mse", "test_accuracy", "val_loss")
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float))


@app.callback(invoke_without_command=True)
@user_errors
def models(ctx: typer.Context, storage: StorageOpt = None) -> None:
    """List every model version (same as `maas models ls`)."""
    if ctx.invoked_subcommand is None:
        ls(storage)


@app.command()
@user_errors
def ls(storage: StorageOpt = None) -> None:
    """List every model version as a table."""
    registry = Registry(storage)
    table = Table("model", "version", "task", "format", "created", "metrics",
                  title=f"models in {registry.models_uri}")
    for mv in registry.all_versions():
        table.add_row(mv.name, str(mv.version), mv.task, str(mv.card.get("format", "")),
                      _when(mv.card.get("created_at")), _headline(mv.card.get("metrics", {})))
    console.print(table if table.row_count else f"no models yet in {registry.models_uri}")


@app.command()
@user_errors
def show(
    model: Annotated[str, typer.Argument(help="name (latest) or name:version")],
    storage: StorageOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the raw card.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the card page (Markdown).")] = False,
) -> None:
    """Print a version's model card and where its training-curve plot is."""
    from maas_ray.registry.card_page import render_card_markdown

    registry = Registry(storage)
    mv = registry.get(model)
    if json_out:
        console.print_json(json.dumps(mv.card, default=str))
        return
    if markdown:
        console.print(render_card_markdown(mv.card, mv.id), markup=False, highlight=False)
        return
    table = Table(show_header=False, title=f"{mv.id}")
    table.add_row("task", mv.task)
    table.add_row("format", str(mv.card.get("format", "")))
    table.add_row("created", _when(mv.card.get("created_at")))
    table.add_row("location", mv.uri)
    for key in ("description", "base_model", "training_time_s"):
        if mv.card.get(key) not in (None, ""):
            table.add_row(key, str(mv.card[key]))
    if "data" in mv.card:
        table.add_row("data", json.dumps(mv.card["data"]))
    for key, value in mv.card.get("metrics", {}).items():
        table.add_row(f"metric {key}", f"{value:.6g}" if isinstance(value, float) else str(value))
    # Fine-tuning curves mix per-step train points with per-epoch validation points.
    curve = [e for e in mv.card.get("loss_curve") or [] if isinstance(e.get("train_loss"), (int, float))]
    if curve:
        points = ", ".join(f"{e['train_loss']:.3g}" for e in curve[:: max(1, len(curve) // 10)])
        table.add_row("train loss curve", points)
    console.print(table)
    for key, what in (("loss_plot", "plot"), ("card_page", "card page")):
        if mv.card.get(key):
            uri = storage_mod.join(mv.uri, mv.card[key])
            where = storage_mod.local_path(uri) if storage_mod.is_local(uri) else uri
            console.print(f"{what}: {where}", highlight=False, soft_wrap=True)
    if not mv.card.get("loss_plot"):
        console.print("plot: none (no training curve)" if not curve else
                      "plot: none stored; GET /v1/models/{id}/card/plot.png draws it", highlight=False)


@app.command()
@user_errors
def rm(
    model: Annotated[str, typer.Argument(help="name:version removes one version; name removes all")],
    storage: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove one version or every version of a model."""
    registry = Registry(storage)
    ref = ModelRef.parse(model)
    targets = [registry.get(ref)] if ref.version is not None else [
        registry.get(ModelRef(ref.name, v)) for v in registry.versions(ref.name)
    ]
    if not targets:
        registry.get(ref)  # raises ModelNotFound with a clear message
    ids = ", ".join(mv.id for mv in targets)
    if not yes and not typer.confirm(f"remove {ids}?"):
        raise typer.Exit(1)
    registry.remove(ref)
    console.print(f"removed {ids}")


@app.command("import")
@user_errors
def import_(
    source: Annotated[str | None, typer.Argument(
        help="A local Hugging Face model folder or .gguf file; omit to import the built-in base models.")] = None,
    name: Annotated[str | None, typer.Option(help="Registry name for SOURCE.")] = None,
    task: Annotated[str, typer.Option(help="chat | embedding | text-classification")] = "chat",
    weights: Annotated[str, typer.Option(
        help="auto | both | safetensors | gguf: keep a GGUF as it is (for llama.cpp), convert to "
             "safetensors (for transformers), or both; auto = both for a .gguf, safetensors for a folder "
             "(both on a folder also exports an f16 GGUF).")] = "auto",
    storage: StorageOpt = None,
) -> None:
    """Import the offline base models (SmolLM2, MiniLM) or a local HF folder / GGUF file."""
    from pathlib import Path

    from maas_ray.cli.progress import import_progress
    from maas_ray.registry.importer import BASE_MODELS, ensure_base_models, import_hf_model

    registry = Registry(storage)
    missing = sum(1 for n in BASE_MODELS if not registry.versions(n)) if source is None else 1
    with import_progress(missing) as progress:
        if source is None:
            versions = ensure_base_models(registry, progress=progress)
        else:
            if not name:
                raise typer.BadParameter("--name is required with a SOURCE folder")
            folder, gguf_file = Path(source), None
            if folder.suffix == ".gguf":
                folder, gguf_file = folder.parent, folder.name
            try:
                versions = [import_hf_model(registry, name, folder, task, gguf_file, progress=progress,
                                            weights=weights)]  # type: ignore[arg-type]
            except ValueError as err:
                raise typer.BadParameter(str(err)) from None
    for mv in versions:
        console.print(f"{mv.id}  ({mv.task})")


@app.command("export-gguf")
@user_errors
def export_gguf(
    model: Annotated[str, typer.Argument(help="name (latest) or name:version of a chat model")],
    outtype: Annotated[str, typer.Option(
        help="q8_0 (default: smallest, fastest on CPU, batched) | f16 | f32 (closest to the "
             "transformers engine; served one request at a time on the default llama.cpp build)")] = "q8_0",
    storage: StorageOpt = None,
) -> None:
    """Publish a new version of MODEL with GGUF weights added, so llama.cpp serves it."""
    from maas_ray.registry.gguf_export import GGUFExportError, export_version

    with console.status(f"exporting {model} to GGUF ({outtype})...", spinner="dots"):
        try:
            mv = export_version(Registry(storage), model, outtype)  # type: ignore[arg-type]
        except GGUFExportError as err:
            raise typer.BadParameter(str(err)) from None
    console.print(f"{mv.id}  ({', '.join(mv.card.get('formats', []))})")
