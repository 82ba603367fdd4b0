"""Test-only: run the Redshift dialect against the embedded PostgreSQL.

No open-source engine runs Redshift's ``COPY ... FROM 's3://...' MANIFEST``. This wrapper does
that one thing — it reads the manifest, fetches its parts from the local S3 server, maps each
JSON line through the JSONPaths file and feeds PostgreSQL's ``COPY FROM STDIN`` — and lets
PostgreSQL accept the Redshift-only words of the DDL (``DISTKEY``, ``SORTKEY``, ``DISTSTYLE``,
``SUPER``, ``GETDATE()``, ``JSON_PARSE``). Everything else runs as sent. Every statement is
recorded exactly as the warehouse sent it, for exact-SQL assertions, and failures of the
network edge (a disconnect at COMMIT, a failing COPY) can be injected.
"""

from __future__ import annotations

import gzip
import io
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg2

from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.redshift import RedshiftConfig

SHIMS = """
DO $$ BEGIN CREATE DOMAIN super AS jsonb; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE OR REPLACE FUNCTION getdate() RETURNS timestamptz LANGUAGE sql AS 'SELECT now()';
CREATE OR REPLACE FUNCTION json_parse(text) RETURNS jsonb LANGUAGE sql IMMUTABLE
    AS 'SELECT $1::jsonb';
CREATE TABLE IF NOT EXISTS sys_load_error_detail (
    query_id bigint, file_name text, line_number bigint, column_name text, error_message text);
CREATE SEQUENCE IF NOT EXISTS redshift_copy_ids;
CREATE OR REPLACE VIEW stv_slices AS SELECT generate_series(0, 3) AS slice;  -- a 4-slice cluster
CREATE OR REPLACE FUNCTION pg_last_copy_id() RETURNS bigint LANGUAGE sql
    AS $$ SELECT coalesce(nullif(current_setting('redshift.last_copy_id', true), ''),
                          '0')::bigint $$;
"""
_shims_lock = threading.Lock()
_COPY = re.compile(
    r"COPY (?P<table>\S+) \((?P<columns>[^)]*)\) FROM '(?P<manifest>s3://[^']+)' "
    r"IAM_ROLE '(?P<role>[^']+)' MANIFEST GZIP FORMAT AS JSON '(?P<jsonpaths>s3://[^']+)' "
    r"TIMEFORMAT 'auto' STATUPDATE OFF COMPUPDATE OFF"
)
_REDSHIFT_ONLY = re.compile(r" (DISTKEY \([^)]*\)|SORTKEY \([^)]*\)|DISTSTYLE \w+)")


def install_shims(url: str) -> None:
    with _shims_lock, psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(SHIMS)
    conn.close()


@dataclass
class Faults:
    """Failures to inject at the network edge, each used once."""

    # Commit a load transaction (one that wrote the ledger), then lose the connection before
    # the answer reaches the client.
    disconnect_after_load_commit: int = 0
    copy_error: str | None = None  # the COPY fails with this load error


@dataclass
class RedshiftOnPostgres:
    """A connection factory for ``RedshiftWarehouse`` that runs against PostgreSQL."""

    url: str
    faults: Faults = field(default_factory=Faults)
    statements: list[tuple[str, Any]] = field(default_factory=list)

    def __call__(self, config: RedshiftConfig) -> Connection:
        return Connection(self, psycopg2.connect(self.url))


class Connection:
    def __init__(self, owner: RedshiftOnPostgres, conn: Any) -> None:
        self.owner = owner
        self.conn = conn
        self.wrote_ledger = False
        self.last_copy_id: int | None = None

    def cursor(self) -> Cursor:
        return Cursor(self, self.conn.cursor())

    def commit(self) -> None:
        self.conn.commit()
        wrote_ledger, self.wrote_ledger = self.wrote_ledger, False
        if wrote_ledger and self.owner.faults.disconnect_after_load_commit:
            self.owner.faults.disconnect_after_load_commit -= 1
            self.conn.close()
            raise psycopg2.OperationalError("server closed the connection unexpectedly")

    def rollback(self) -> None:
        self.conn.rollback()
        if self.last_copy_id is not None:
            # Redshift's pg_last_copy_id() survives a rollback; a PostgreSQL setting does not.
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT set_config('redshift.last_copy_id', %s, false)",
                    (str(self.last_copy_id),),
                )

    def close(self) -> None:
        if not self.conn.closed:
            self.conn.close()


class Cursor:
    def __init__(self, connection: Connection, cursor: Any) -> None:
        self.connection = connection
        self.cursor = cursor

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cursor.close()

    @property
    def rowcount(self) -> int:
        return int(self.cursor.rowcount)

    def fetchone(self) -> Any:
        return self.cursor.fetchone()

    def fetchall(self) -> Any:
        return self.cursor.fetchall()

    def execute(self, statement: str, params: Any = None) -> None:
        self.connection.owner.statements.append((statement, params))
        if statement.startswith('INSERT INTO "clickstream"."load_ledger"'):
            self.connection.wrote_ledger = True
        copy = _COPY.fullmatch(statement)
        if copy is not None:
            self._copy_from_s3(copy)
            return
        self.cursor.execute(_REDSHIFT_ONLY.sub("", statement), params)

    def _copy_from_s3(self, copy: re.Match[str]) -> None:
        """What Redshift does with COPY ... MANIFEST FORMAT AS JSON 'jsonpaths' GZIP."""
        client = s3_client()
        self.cursor.execute(
            "SELECT set_config('redshift.last_copy_id', nextval('redshift_copy_ids')::text, false)"
        )
        self.connection.last_copy_id = int(self.cursor.fetchone()[0])
        faults = self.connection.owner.faults
        if faults.copy_error is not None:
            error, faults.copy_error = faults.copy_error, None
            self._record_load_error(error)
            raise psycopg2.errors.InternalError_(
                "Load into table '_clickstream_staging' failed. Check 'sys_load_error_detail' "
                "system table for details."
            )
        paths = orjson.loads(_get(client, copy["jsonpaths"]))["jsonpaths"]
        keys = [re.fullmatch(r"\$\['(\w+)'\]", path)[1] for path in paths]  # type: ignore[index]
        buffer = io.BytesIO()
        for entry in orjson.loads(_get(client, copy["manifest"]))["entries"]:
            assert entry["mandatory"] is True
            for line in gzip.decompress(_get(client, entry["url"])).splitlines():
                row = orjson.loads(line)
                buffer.write(b"\t".join(_text(row.get(key)) for key in keys) + b"\n")
        buffer.seek(0)
        self.cursor.copy_expert(f"COPY {copy['table']} ({copy['columns']}) FROM STDIN", buffer)

    def _record_load_error(self, message: str) -> None:
        # Redshift keeps load errors whatever happens to the transaction: use another session.
        with psycopg2.connect(self.connection.owner.url) as side, side.cursor() as cur:
            cur.execute(
                "INSERT INTO sys_load_error_detail VALUES "
                "(%s, 's3://bucket/staged/part-0000.json.gz', 3, 'quantity                  ', %s)",
                (self.connection.last_copy_id, message),
            )
        side.close()


def _get(client: Any, url: str) -> bytes:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _text(value: object) -> bytes:
    if value is None:
        return b"\\N"
    if isinstance(value, bool):
        return b"t" if value else b"f"
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return (
        text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    ).encode()
