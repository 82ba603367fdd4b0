"""Builders for the pipeline tests: hand-made records and files with exactly known content."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import orjson
import psycopg2
import pytest

from clickstream_pipeline.definitions import build_defs
from clickstream_pipeline.layout import hour_floor, load_key, raw_key
from clickstream_pipeline.local.dagster import DagsterServices
from clickstream_pipeline.local.dagster import free_port as free_port
from clickstream_pipeline.local.dagster import graphql as local_graphql
from clickstream_pipeline.local.registry import registry_api
from clickstream_pipeline.local.stack import DAGSTER_YAML
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry
from clickstream_pipeline.s3 import s3_client


def recent_hour(hours_ago: int) -> datetime:
    """A completed UTC hour, ``hours_ago`` hours before the current one."""
    return hour_floor(datetime.now(UTC)) - timedelta(hours=hours_ago)


def record(message_id: str, hour: datetime, /, **properties: Any) -> dict[str, Any]:
    """A valid track call received 5 minutes into ``hour``."""
    received = hour + timedelta(minutes=5)
    return {
        "messageId": message_id,
        "type": "track",
        "event": "Test Event",
        "userId": "u1",
        "anonymousId": "a1",
        "timestamp": (received - timedelta(seconds=2)).isoformat(),
        "sentAt": (received - timedelta(seconds=1)).isoformat(),
        "receivedAt": received.isoformat().replace("+00:00", "Z"),
        "properties": properties,
        "context": {"ip": "198.51.100.7"},
    }


def put_file(
    bucket: str,
    stream: Stream,
    hour: datetime,
    name: str,
    lines: Sequence[dict[str, Any] | bytes | str],
    compress: bool = True,
) -> str:
    """Write a raw file of ``lines`` (records, or raw bytes/str for bad input); return its key."""
    body = b"".join(
        (
            orjson.dumps(line)
            if isinstance(line, dict)
            else line
            if isinstance(line, bytes)
            else line.encode()
        )
        + b"\n"
        for line in lines
    )
    suffix = ".jsonl.gz" if compress else ".jsonl"
    key = raw_key("raw", stream, hour, name + suffix)
    s3_client().put_object(Bucket=bucket, Key=key, Body=gzip.compress(body) if compress else body)
    return key


def put_raw(bucket: str, stream: Stream, hour: datetime, name: str, body: bytes) -> str:
    key = raw_key("raw", stream, hour, name)
    s3_client().put_object(Bucket=bucket, Key=key, Body=body)
    return key


def query(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall()
    conn.close()
    return rows


def new_database(url: str, name: str) -> str:
    """An empty database ``name`` on the server of ``url`` (dropped first if it exists); its URL."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return url.replace("/clickstream?", f"/{name}?")


def message_ids(url: str, stream: Stream) -> dict[str, datetime]:
    """message_id -> _hour of every row in the stream's table."""
    rows = query(url, f'SELECT message_id, _hour FROM "{stream.customer}"."{stream.event}"')
    return dict(rows)


def outside_env() -> dict[str, str]:
    """This process's environment without the pipeline's variables: a user's fresh shell."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLICKSTREAM_", "AWS_", "DAGSTER_"))
    }


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``clickstream`` in a new process, as a user would (``env``: ours plus these)."""
    return subprocess.run(
        [sys.executable, "-m", "clickstream_pipeline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env is not None else None,
        cwd=cwd,
        timeout=timeout,
    )


def materialize_tables(
    select: str, *partitions: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``dagster asset materialize`` of the code location, as a user runs it: ``select`` (e.g.
    ``group:acme``), then ``--partition KEY`` or ``--partition-range A...B``."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "clickstream_pipeline.definitions",
            "--select",
            select,
            *partitions,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def defs_for(*streams: Stream) -> dg.Definitions:
    """The code location's definitions for a registry of ``streams``."""
    return build_defs(Registry().with_streams(streams))


def load_keys(*pairs: tuple[Stream, datetime]) -> list[str]:
    return [load_key(stream, hour) for stream, hour in pairs]


T = TypeVar("T")


def graphql(port: int, query: str) -> Any:
    """A GraphQL query to the webserver on 127.0.0.1:``port``: the whole response."""
    return {"data": local_graphql(f"http://127.0.0.1:{port}", query)}


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 180) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@contextmanager
def deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path | None = None
) -> Iterator[DagsterServices]:
    """A code server, webserver and daemon over the test's bucket and registry (read now), with
    the Dagster instance in ``home`` (default: a new one under ``tmp_path``)."""
    home = home or tmp_path / "home"
    home.mkdir(exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(DAGSTER_YAML)
    services = DagsterServices(tmp_path / "dagster")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CLICKSTREAM_DAGSTER_URL", services.url)
    with services:
        wait_for(lambda: attempt(services.asset_keys), "the webserver", timeout=120)
        yield services


def attempt(action: Callable[[], T]) -> T | None:
    """The action's value, or None while its server or table is not there yet."""
    try:
        return action()
    except (OSError, psycopg2.Error):  # requests' errors are OSErrors
        return None


READ_TOKEN, WRITE_TOKEN = "read-token-0123456789", "write-token-0123456789"


@contextmanager
def registry_server(
    backend: str, port: int | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``clickstream registry serve`` over ``backend`` with READ_TOKEN and WRITE_TOKEN (``env``
    adds to or overrides them), answering; its URL."""
    with registry_api(backend, READ_TOKEN, WRITE_TOKEN, port=port, env=env) as server:
        yield server.url
