"""Start and stop an embedded PostgreSQL (pgserver) and a local S3 and Kinesis server (moto) on
127.0.0.1, with a bucket and a stream.

The same class backs ``clickstream demo``/``dev``/``stack`` and the session-scoped pytest
fixture, so tests run against the servers users run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import psycopg2
from psycopg2 import sql

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.s3 import ensure_bucket, s3_client
from clickstream_pipeline.vortex.kinesis import ensure_stream, kinesis_client

DEFAULT_ROOT = Path(".clickstream")
DEFAULT_BUCKET = "clickstream-local"
DEFAULT_DATABASE = "clickstream"
DEFAULT_STREAM = "clickstream-events"
# The local stream's shards: enough that vortex's shard parallelism is exercised on a laptop.
DEFAULT_SHARDS = 2

# The local Dagster instance: runs retried once by the daemon, run monitoring on, no telemetry.
# A run worker is a child of the code server the daemon starts, so losing the daemon's process
# group kills it too and leaves its run STARTED: the default run launcher cannot check a worker's
# health, so only the runtime limit fails such a run (then run_retries re-runs it). The limit sits
# far above a batch load's runtime; docs/reliability.md explains the choice.
DAGSTER_YAML = """\
run_retries:
  enabled: true
  max_retries: 1
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_runtime_seconds: 3600
  max_resume_run_attempts: 0
  poll_interval_seconds: 60
telemetry:
  enabled: false
"""

# Settings of every Dagster process of this project (deploy/ sets them in production too).
DAGSTER_ENV = {
    # A run of many tables over a range of hours (a backfill) plans one event per table with its
    # range, not one per (table, hour): 48,000 events for a day of 2,000 tables, minutes of
    # writes before the run starts. The cost: a failed run leaves the hours it did not load
    # missing, not failed, in the partition status (alerts and metrics name them).
    "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
}

# Credentials the local S3 server accepts; they are not secrets.
_LOCAL_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# Every variable the stack sets, in the order `clickstream stack` prints them.
ENV_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "CLICKSTREAM_BUCKET",
    "CLICKSTREAM_WAREHOUSE_URL",
    "CLICKSTREAM_REGISTRY",
    "CLICKSTREAM_KINESIS_STREAM",
    "DAGSTER_HOME",
    *DAGSTER_ENV,
)


class LocalStack:
    """An embedded PostgreSQL with data under ``root/pg`` and a local S3 server with a bucket.

    Use as a context manager; ``env`` holds the variables that point the pipeline at it.
    ``fresh`` starts from an empty database and Dagster instance (the demo does).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_ROOT,
        *,
        bucket: str = DEFAULT_BUCKET,
        stream: str = DEFAULT_STREAM,
        database: str = DEFAULT_DATABASE,
        s3_port: int = 0,
        fresh: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        self.fresh = fresh
        self.bucket = bucket
        self.stream = stream
        self.database = database
        self.s3_port = s3_port
        self.env: dict[str, str] = {}
        self._pg: Any = None
        self._s3: Any = None

    def start(self) -> dict[str, str]:
        """Start both servers (reusing a PostgreSQL already running on ``root``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            warehouse_url = self._start_postgres()
            endpoint = self._start_s3()
            dagster_home = self.root / "dagster_home"
            if self.fresh:
                shutil.rmtree(dagster_home, ignore_errors=True)
            dagster_home.mkdir(exist_ok=True)
            if not (dagster_home / "dagster.yaml").exists():
                (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
        except BaseException:
            # Ctrl-C or SIGTERM too, at any step: whatever started is stopped.
            self.stop()
            raise
        self.env = {
            **_LOCAL_AWS_ENV,
            "AWS_ENDPOINT_URL": endpoint,
            "CLICKSTREAM_BUCKET": self.bucket,
            "CLICKSTREAM_WAREHOUSE_URL": warehouse_url,
            "CLICKSTREAM_REGISTRY": str(self.root / "registry.yaml"),
            "CLICKSTREAM_KINESIS_STREAM": self.stream,
            "DAGSTER_HOME": str(dagster_home),
            **DAGSTER_ENV,
        }
        return self.env

    def _start_postgres(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
            warnings.simplefilter("ignore")
            import pgserver

        # pgserver logs every step at INFO; its failures still surface as exceptions.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        pgdata = self.root / "pg"
        # A first start that did not finish (a signal, a kill) can leave initdb's output half
        # written, PG_VERSION included, and every later start would fail on it. It holds no
        # data yet: the next start removes it and begins again.
        unfinished = self.root / "pg.unfinished"
        if unfinished.exists() and stop_postgres(pgdata):
            if pgdata.exists():
                shutil.rmtree(pgdata)
            unfinished.unlink()
        if not (pgdata / "PG_VERSION").exists():
            unfinished.touch()
        try:
            self._pg = pgserver.get_server(pgdata, cleanup_mode="stop")
        except Exception as error:
            raise ClickstreamError(
                f"cannot start the embedded PostgreSQL in {pgdata}: {error}"
            ) from None
        unfinished.unlink(missing_ok=True)
        admin_url = self._pg.get_uri()
        conn = psycopg2.connect(admin_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                database = sql.Identifier(self.database)
                if self.fresh:
                    cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(database))
        finally:
            conn.close()
        return str(self._pg.get_uri(self.database))

    def _start_s3(self) -> str:
        from moto.server import ThreadedMotoServer

        from clickstream_pipeline.local.moto_kinesis import speed_up_moto_kinesis

        speed_up_moto_kinesis()

        # One access-log line per request drowns the CLI's own output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        # Kept once serving: an interrupt inside start() leaves a thread of this process, which
        # ends with it (moto's stop() would wait for a server not yet made).
        server.start()
        self._s3 = server
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with _patched_env({**_LOCAL_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}):
            ensure_bucket(s3_client(endpoint), self.bucket)
            ensure_stream(kinesis_client(), self.stream, DEFAULT_SHARDS)
        return endpoint

    def stop(self) -> None:
        """Stop the S3 server (its objects are in memory) and PostgreSQL, unless another live
        process uses the same data directory; within seconds, whatever a signal interrupted."""
        with deferred_interrupts():
            self._pg = None
            try:
                if self._s3 is not None:
                    self._s3.stop()
                    self._s3 = None
            finally:
                stop_postgres(self.root / "pg")

    def __enter__(self) -> dict[str, str]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# PostgreSQL's fast shutdown (SIGINT: clients disconnected, a checkpoint written) takes under a
# second here; if it does not end, its immediate shutdown (SIGQUIT), then SIGKILL. (SIGTERM is
# its smart shutdown, which waits for every client to disconnect.)
_PG_FAST_SECONDS = 4.0
_PG_IMMEDIATE_SECONDS = 2.0
# pgserver's lock (one for all its data directories on the machine) is held while any of them
# starts, for seconds; past this the handle list is rewritten without it.
_PG_LOCK_SECONDS = 2.0


def stop_postgres(pgdata: Path) -> bool:
    """Stop the embedded PostgreSQL on ``pgdata`` within seconds, unless another live process
    holds a pgserver handle on it; whether none runs there now.

    Not pgserver's ``cleanup()``: that stops the server only while the handle list in the data
    directory holds this process alone, and a process that died without cleaning up (SIGKILL, a
    crash) stays on the list for good, so the server would never be stopped again; it waits for
    its lock and for ``pg_ctl stop`` without a bound; and it knows no server whose start an
    interrupt cut short. This keeps pgserver's list, less this process and dead ones.
    """
    pgdata = pgdata.resolve()
    if _other_handles(pgdata):
        return False
    postmasters = _postmasters(pgdata)
    backends = [child for postmaster in postmasters for child in _children(postmaster)]
    for postmaster in postmasters:
        _signal(postmaster, signal.SIGINT)
    alive = wait_gone(postmasters, _PG_FAST_SECONDS)
    for postmaster in alive:
        _signal(postmaster, signal.SIGQUIT)
    alive = wait_gone(alive, _PG_IMMEDIATE_SECONDS)
    for process in [*alive, *backends]:
        _signal(process, signal.SIGKILL)
    return not wait_gone([*alive, *backends], _PG_IMMEDIATE_SECONDS)


def _other_handles(pgdata: Path) -> list[int]:
    """Drop this process's pgserver handle on ``pgdata``; the live processes that hold one.

    pgserver (pinned in pyproject.toml) keeps its servers in a class attribute and its handles
    as a JSON list of pids in the data directory, under a lock for the machine. Should a release
    keep them otherwise, this still reads the list (an unreadable one names no other process) and
    leaves pgserver's own exit handler in place, which then finds the server stopped.
    """
    from pgserver.postgres_server import PostgresServer

    instances = getattr(PostgresServer, "_instances", None)
    server = instances.pop(pgdata, None) if isinstance(instances, dict) else None
    # Its atexit cleanup would wait for the lock again, and this one is stopped.
    cleanup = getattr(server, "_cleanup", None)
    if cleanup is not None:
        atexit.unregister(cleanup)
    path = pgdata / ".handle_pids.json"
    if not path.exists():
        return []
    lock = getattr(PostgresServer, "_lock", None)
    locked = bool(lock is not None and lock.acquire(timeout=_PG_LOCK_SECONDS))
    try:
        try:
            pids = [pid for pid in json.loads(path.read_text()) if isinstance(pid, int)]
        except (OSError, ValueError, TypeError):
            return []
        others = [pid for pid in pids if pid != os.getpid() and _pid_running(pid)]
        path.write_text(json.dumps(others))
    finally:
        if locked and lock is not None:
            lock.release()
    return others


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    """PostgreSQL servers running on ``pgdata`` (initdb and pg_ctl name it too: not them)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            process.info["name"] == "postgres"
            and "-D" in cmdline[:-1]
            and Path(cmdline[cmdline.index("-D") + 1]) == pgdata
        ):
            found.append(process)
    return found


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, number: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(number)


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Until every process has exited or ``timeout`` passed; those still running."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [process for process in processes if _running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _pid_running(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _running(process: psutil.Process) -> bool:
    # A zombie has exited: it waits for its parent (init, for an orphan) to reap it.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then act as they would have: a stop they
    cut short would leave servers running, and every stop here is bounded."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled in the main thread only
        return
    received: list[int] = []
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {
        number: signal.signal(number, lambda n, _: received.append(n)) for number in numbers
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for deferred in dict.fromkeys(received):
            signal.raise_signal(deferred)


@contextlib.contextmanager
def _patched_env(values: dict[str, str]) -> Any:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
