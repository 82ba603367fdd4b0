"""The ``clickstream`` command group, its consoles, and what every command shares: progress bars,
quiet Dagster warnings, signal handling and one-line errors."""

from __future__ import annotations

import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import click
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.generator import (
    GeneratorSpec,
)
from clickstream_pipeline.registry import registry_backend

if TYPE_CHECKING:
    pass


# Tables keep their columns readable when output goes to a file or a CI log, not a terminal.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="clickstream_pipeline")
def cli() -> None:
    """Load clickstream events from S3 into one warehouse table per customer event.

    Configuration comes from the environment: CLICKSTREAM_BUCKET, CLICKSTREAM_RAW_PREFIX,
    CLICKSTREAM_REGISTRY, CLICKSTREAM_WAREHOUSE_URL, AWS_* and DAGSTER_HOME.
    """


def register(spec: GeneratorSpec) -> None:
    """Add the spec's streams to the registry (others are kept)."""
    with registry_backend().edit() as edit:
        edit.registry = edit.registry.with_streams(spec.streams)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def wait_for_interrupt() -> None:
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def quiet_dagster_warnings() -> None:
    """Dagster flags its own beta and preview parameters as it builds definitions; a user of
    these commands can do nothing about them. (Dagster is imported here, not at the top: the
    registry commands start faster without it.)"""
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 1."""
    try:
        status = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="clickstream",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ClickstreamError as error:
        _fail(str(error))
    except ClientError as error:
        _fail(f"S3 request failed: {error}")
    except BotoCoreError as error:
        _fail(f"cannot reach S3: {error}")
    except OSError as error:
        _fail(str(error))
    sys.exit(status if isinstance(status, int) else 0)


def _fail(message: str) -> NoReturn:
    err.print(f"clickstream: error: {message}", markup=False, soft_wrap=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
