"""The ``clickstream`` command group, its consoles, and what every command shares: progress bars,
quiet Dagster warnings, signal handling and one-line errors."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class _Stopping:
    """What stops this command (see stopped_by_signals)."""

    signal: int | None = None
    # Its KeyboardInterrupt stopped nothing: it came in a __del__ or a weakref callback, where
    # Python ignores it, or someone else's handler took the signal.
    lost: bool = False


_stopping = _Stopping()


@contextlib.contextmanager
def stopped_by_signals(*, unfinished: bool = False) -> Iterator[None]:
    """Ctrl-C and SIGTERM (a supervisor, `kill`) stop the block alike, from its first line on.

    The first of them raises KeyboardInterrupt in the main thread, so every ``with`` inside stops
    what it started (servers, processes) as the exception passes; then "stopped" is the
    command's last line, not a traceback. Signals after it are ignored: each stop is bounded,
    and cutting one short would leave a server running. The command exits 0, or with
    ``unfinished`` (its work did not get done) 128 + the signal's number, 130 after Ctrl-C and
    143 after SIGTERM, as a shell reports a command a signal ended.
    """
    _stopping.signal, _stopping.lost = None, False
    previous = {number: signal.signal(number, _stop) for number in _STOP_SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unraisable, previous_hook)
    # Where a library's log lines go, unless it has handlers of its own.
    outputs = [h for h in (logging.lastResort, *logging.getLogger().handlers) if h is not None]
    for output in outputs:
        output.addFilter(_not_a_stop)
    try:
        yield
    except KeyboardInterrupt:
        err.print("stopped")
        # Everything is stopped: the garbage collector's pass over all that Dagster loaded, as
        # the interpreter exits, would only delay the exit (seconds on a busy machine).
        gc.freeze()
        if unfinished:
            number = _stopping.signal or signal.SIGINT
            raise click.exceptions.Exit(128 + number) from None
    finally:
        for output in outputs:
            output.removeFilter(_not_a_stop)
        sys.unraisablehook = previous_hook
        for number, handler in previous.items():
            signal.signal(number, handler)


def _not_a_stop(record: logging.LogRecord) -> bool:
    """Libraries log what interrupts them (SQLAlchemy: "Exception closing connection", with its
    traceback); an exception that is not an Exception (KeyboardInterrupt, Dagster's
    DagsterExecutionInterruptedError) is the stop that "stopped" reports, not an error."""
    error = record.exc_info[1] if record.exc_info else None
    return error is None or isinstance(error, Exception)


def _stop(number: int, _: object = None) -> None:
    if _stopping.signal is None or _stopping.lost:
        _stopping.signal = _stopping.signal or number
        _stopping.lost = False
        raise KeyboardInterrupt


def _unraisable(
    previous: Callable[[sys.UnraisableHookArgs], object], unraisable: sys.UnraisableHookArgs
) -> None:
    """A signal's KeyboardInterrupt that came in a garbage collector's callback, where Python
    only reports it, is raised again where the command runs."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _stopping.signal is not None:
        _stopping.lost = True
        # The signal again, once the callback has returned (not from here: its handler would run
        # inside it); to the main thread, so that a sleep or a wait there ends too.
        later = threading.Timer(
            0.05, signal.pthread_kill, (threading.main_thread().ident, _stopping.signal)
        )
        later.daemon = True
        later.start()
        return
    previous(unraisable)


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Around code that handles Ctrl-C and SIGTERM itself, as Dagster's in-process runs do (the
    run fails; one that comes between its steps can be dropped): a signal it took still stops
    the command once it returns. The C handler notes every signal in the wakeup fd, whichever
    Python handler then runs."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        yield
        with contextlib.suppress(BlockingIOError):
            taken = [n for n in os.read(read, 1024) if n in _STOP_SIGNALS]
            if taken:
                # Whoever took it, it stopped nothing: the block returned.
                _stopping.lost = True
                _stop(taken[0])
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def wait_forever() -> NoReturn:
    """Until a signal stops the command (see ``stopped_by_signals``)."""
    while True:
        time.sleep(3600)


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
