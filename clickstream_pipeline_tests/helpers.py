"""Builders for the pipeline tests: hand-made records and files with exactly known content."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import orjson
import psycopg2

from clickstream_pipeline.definitions import build_defs
from clickstream_pipeline.layout import hour_floor, load_key, raw_key
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


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def outside_env() -> dict[str, str]:
    """This process's environment without the pipeline's variables: a user's fresh shell."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLICKSTREAM_", "AWS_", "DAGSTER_"))
    }


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``clickstream`` in a new process, as a user would (``env``: ours plus these)."""
    return subprocess.run(
        [sys.executable, "-m", "clickstream_pipeline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env is not None else None,
        cwd=cwd,
        timeout=300,
    )


def defs_for(*streams: Stream) -> dg.Definitions:
    """The code location's definitions for a registry of ``streams``."""
    return build_defs(Registry().with_streams(streams))


def load_keys(*pairs: tuple[Stream, datetime]) -> list[str]:
    return [load_key(stream, hour) for stream, hour in pairs]
