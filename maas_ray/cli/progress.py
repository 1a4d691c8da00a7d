"""Progress bars for long CLI work, quiet when stdout is not a terminal.

One look everywhere (rich): a spinner, what is happening now, a bar, counts and
elapsed time. Piped or redirected output (CI logs, ``> file``) gets none of it,
only the command's final lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)

from maas_ray.cli.common import console


def bar(*columns: object) -> Progress:
    """A rich Progress on our console, disabled when it is not a terminal."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    *columns, TimeElapsedColumn(), console=console, disable=not console.is_terminal)


@contextlib.contextmanager
def import_progress(n_models: int) -> Iterator[Callable[[str], None]]:
    """Yield the importer's ``progress(message)`` callback: the message is shown,
    and each ``imported ...`` message completes one of ``n_models``."""
    if n_models == 0:  # nothing to import: no bar flashing 0/0
        yield lambda _message: None
        return
    with bar(MofNCompleteColumn(), TextColumn("models")) as progress:
        task = progress.add_task("importing", total=n_models)

        def update(message: str) -> None:
            progress.update(task, description=message)
            if message.startswith("imported "):
                progress.advance(task)

        yield update


@contextlib.contextmanager
def rows_progress(description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``on_rows(done)`` for work whose total is unknown up front."""
    with bar(TextColumn("{task.completed:,.0f} rows")) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done: progress.update(task, completed=done)
