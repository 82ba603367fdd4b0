"""Start and stop an embedded PostgreSQL (pgserver) and a local S3 and Kinesis server (moto) on
127.0.0.1, with a bucket and a stream.

The same class backs ``clickstream demo``/``dev``/``stack`` and the session-scoped pytest
fixture, so tests run against the servers users run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

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
        except BaseException:
            self.stop()
            raise
        dagster_home = self.root / "dagster_home"
        if self.fresh:
            shutil.rmtree(dagster_home, ignore_errors=True)
        dagster_home.mkdir(exist_ok=True)
        if not (dagster_home / "dagster.yaml").exists():
            (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
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
        try:
            self._pg = pgserver.get_server(self.root / "pg", cleanup_mode="stop")
        except Exception as error:
            raise ClickstreamError(
                f"cannot start the embedded PostgreSQL in {self.root / 'pg'}: {error}"
            ) from None
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

        self._s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        self._s3.start()
        host, port = self._s3.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with _patched_env({**_LOCAL_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}):
            ensure_bucket(s3_client(endpoint), self.bucket)
            ensure_stream(kinesis_client(), self.stream, DEFAULT_SHARDS)
        return endpoint

    def stop(self) -> None:
        """Stop the S3 server (its objects are in memory) and release PostgreSQL."""
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None

    def __enter__(self) -> dict[str, str]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
