"""``maas predict MODEL --input PATH --output PATH``: batch inference with Ray Data."""

from __future__ import annotations

from typing import Annotated

import typer

from maas_ray.cli.common import AddressOpt, StorageOpt, console, user_errors


@user_errors
def predict(
    model: Annotated[str, typer.Argument(help="name (latest version) or name:version.")],
    input: Annotated[str, typer.Option("--input", "-i", help="CSV, Parquet or JSONL file/folder or URI.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Parquet output folder or URI.")],
    storage: StorageOpt = None,
    address: AddressOpt = None,
    concurrency: Annotated[int, typer.Option(help="Most predictor actors in the pool.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Rows per batch sent to an actor.")] = 4096,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Predict every row of a table and write the rows plus a 'prediction' column.

    Classifiers also get one 'probability_<class>' column per class. Example:
    maas predict diabetes-linear -i examples/regression/diabetes.csv -o /tmp/preds
    """
    from maas_ray.cli.progress import rows_progress
    from maas_ray.predict import batch_predict
    from maas_ray.runtime import quiet_ray_data, ray_session

    with ray_session(address):
        quiet_ray_data()
        with rows_progress(f"predicting with {model}") as on_rows:
            result = batch_predict(model, input, output, storage, concurrency, batch_size, overwrite,
                                   on_rows=on_rows if console.is_terminal else None)
    console.print(f"wrote {result.rows} predictions from {result.model} to {result.output}")
