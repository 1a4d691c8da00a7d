"""``maas train SPEC.yaml``: validate, train on Ray, publish to the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from maas_ray.cli.common import AddressOpt, StorageOpt, console, user_errors
from maas_ray.config import FineTuneSpec, TrainSpec, load_any_spec


@user_errors
def train(
    spec: Annotated[Path | None, typer.Argument(help="Training spec YAML (see examples/).")] = None,
    storage: StorageOpt = None,
    address: AddressOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Print every spec field and exit.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Fine-tuning only: submit as a Ray job on "
                                         "the cluster (--address) and return at once.")] = False,
) -> None:
    """Train a model from a YAML spec and publish it as the next registry version.

    A spec that names a base_model fine-tunes it (chat or classifier) into
    ft:{base}:{suffix}:{job_id}, recorded as a job (see `maas jobs`).
    The spec is validated before Ray starts; a bad one exits with code 2 and names
    the field. Examples: maas train examples/regression/spec.yaml;
    maas train examples/finetune/spec.yaml
    """
    if explain:
        console.print(_explain_table(TrainSpec))
        console.print(_explain_table(FineTuneSpec, table=Table("field", "type", "default", "description",
                                                                title="fine-tuning spec")))
        return
    if spec is None:
        raise typer.BadParameter("give a spec file, or --explain", param_hint="SPEC")
    any_spec = load_any_spec(spec)
    if isinstance(any_spec, FineTuneSpec):
        from maas_ray.cli.jobs import run_finetune_spec

        run_finetune_spec(any_spec, storage, address, detach)
        return
    parsed = any_spec

    from maas_ray.runtime import ray_session
    from maas_ray.train import run_training

    with ray_session(address):
        epochs = parsed.training.epochs
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} epochs"),
                      TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                      console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"training {parsed.name}", total=epochs, loss="")

            def on_epoch(event: dict[str, Any]) -> None:
                loss = f"train {event['train_loss']:.4f}  val {event['val_loss']:.4f}"
                bar.update(task, completed=event["epoch"] + 1, loss=loss)

            result = run_training(parsed, storage, on_epoch=on_epoch)
    table = Table(title=f"published {result.version.id}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"run: {result.run_name}")


def _explain_table(model: type[BaseModel], prefix: str = "", table: Table | None = None) -> Table:
    table = table or Table("field", "type", "default", "description", title="training spec")
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            table.add_row(path, "section", "", field.description or "")
            _explain_table(ann, f"{path}.", table)
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        table.add_row(path, type_name, default, field.description or "")
    return table
