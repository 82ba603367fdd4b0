"""What every benchmark needs: a stack in its own process, and measured child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from clickstream_pipeline.local.stack import ENV_NAMES


@dataclass(frozen=True)
class StackProcess:
    """The embedded stack's child process: its environment and the CPU it has used."""

    env: dict[str, str]
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU of the stack process (the local S3 server and its threads)."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


@contextmanager
def stack_process(root: Path) -> Iterator[StackProcess]:
    """``clickstream stack`` in a child process: the S3 server's work is not billed to loaders.

    PostgreSQL runs as the stack's children; ``cpu_seconds`` counts the S3 server's work alone."""
    process = subprocess.Popen(
        [sys.executable, "-m", "clickstream_pipeline.cli", "stack", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        env: dict[str, str] = {}
        while set(env) != set(ENV_NAMES):
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("the embedded stack did not start")
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip().strip("'")
        yield StackProcess(env, process.pid)
    finally:
        process.terminate()
        process.wait(60)


T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, every: float = 0.5) -> T:
    """``check()``'s first true value, asked every ``every`` seconds; an OSError (a server not
    up yet) counts as not yet. TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout:.0f} s")
        time.sleep(every)


def fresh_database(warehouse_url: str, name: str) -> str:
    """Database ``name`` (dropped if it was there, then created) on the warehouse's server: its
    URL."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg2
    from psycopg2 import sql

    admin = psycopg2.connect(warehouse_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin.close()
    return urlunsplit(urlsplit(warehouse_url)._replace(path=f"/{name}"))


def dagster_home_on_postgres(root: Path, warehouse_url: str, name: str) -> Path:
    """A Dagster instance directory whose storage is database ``name`` on the warehouse's
    PostgreSQL server (created), as production keeps it (deploy/dagster.yaml): event writes and
    partition queries are measured on the storage a deployment has (its connections held open,
    clickstream_pipeline/dagster_storage.py), not on sqlite."""
    import re

    fresh_database(warehouse_url, name)
    socket = re.search(r"[?&]host=([^&]+)", warehouse_url)
    host = f"?host={socket.group(1)}" if socket else ""
    home = Path(tempfile.mkdtemp(dir=root))
    (home / "dagster.yaml").write_text(
        "storage:\n  custom:\n    module: clickstream_pipeline.dagster_storage\n"
        "    class: PooledPostgresStorage\n    config:\n      postgres_url: "
        f"postgresql+psycopg2://postgres:@/{name}{host}\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n  config:\n    max_concurrent_runs: 2\n"
        "telemetry:\n  enabled: false\n"
    )
    return home


@dataclass(frozen=True)
class Measured:
    """A child process's result (its last stdout line, JSON) and its resource use."""

    result: dict[str, Any]
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak RSS since exec (VmHWM); ``ru_maxrss`` would include the parent's
    memory at fork time."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(
    args: list[str], env: dict[str, str], timeout: float = 3600, max_rss_mb: float | None = None
) -> Measured:
    """Run ``python -m <args>``: wall time, CPU (wait4) and peak RSS (VmHWM, polled until it
    exits); killed when it runs past ``timeout`` or grows past ``max_rss_mb``."""
    began = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: a chatty child can never block on a full pipe while we wait.
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, **env},
        )
        deadline = time.monotonic() + timeout
        while True:
            peak = max(peak, _peak_rss_mb(process.pid) or 0.0)
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise TimeoutError(f"did not finish within {timeout:.0f} s")
            if max_rss_mb is not None and peak > max_rss_mb:
                process.kill()
                os.wait4(process.pid, 0)
                raise MemoryError(f"grew past {max_rss_mb:,.0f} MB of memory")
            time.sleep(0.05)
        wall = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        tail = stderr.strip().splitlines()[-3:]
        raise RuntimeError(
            f"{' '.join(args)} failed ({how}){': ' + ' | '.join(tail) if tail else ''}"
        )
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return Measured(
        result=json.loads(lines[-1]) if lines else {},
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=peak,
    )
