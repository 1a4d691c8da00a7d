"""What every verb shares: option types and turning known errors into one line."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from maas_ray.config import SpecError
from maas_ray.data import DataError
from maas_ray.registry import InvalidModelName, ModelNotFound, TamperedModel
from maas_ray.train.resources import InsufficientResources

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", envvar="MAAS_HOME", show_envvar=True,
                 help="Storage root: a folder or s3:// / gs:// URI [default: ~/.maas]."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", envvar="RAY_ADDRESS", show_envvar=True,
                 help="Ray cluster to join ('auto', host:port, ray://...); none starts a local Ray."),
]

# Errors that mean "the user must change something": one line, exit code 2.
USER_ERRORS = (SpecError, DataError, ModelNotFound, InvalidModelName, TamperedModel,
               InsufficientResources, FileNotFoundError, FileExistsError)


def user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
