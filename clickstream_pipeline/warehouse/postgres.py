"""PostgreSQL: COPY FROM STDIN into a staging table, then replace the partition in one transaction.

Python validates records and streams them, untouched, into a temporary staging table as
``jsonb``; PostgreSQL (another process, another core) extracts the columns. Per table, loads are
serialised by a transaction-scoped advisory lock, which makes concurrent loads of the same
partition, and cross-hour deduplication, safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import orjson
import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from clickstream_pipeline.names import Stream
from clickstream_pipeline.records import (
    KIND_BOOLEAN,
    KIND_INTEGER,
    KIND_NUMBER,
    KIND_STRING,
    ReadStats,
    ValidRecord,
)
from clickstream_pipeline.warehouse.base import (
    BASE_COLUMNS,
    LOADED_COLUMNS,
    MAX_PROPERTY_COLUMNS,
    LedgerEntry,
    LoadResult,
    PartitionLoad,
    open_connection,
    property_columns,
)

LEDGER_SCHEMA = "clickstream"
LEDGER_TABLE = "load_ledger"

_SQL_TYPES = {
    KIND_BOOLEAN: "boolean",
    KIND_INTEGER: "bigint",
    KIND_NUMBER: "double precision",
    KIND_STRING: "text",
}
_KIND_OF_SQL_TYPE = {sql_type: kind for kind, sql_type in _SQL_TYPES.items()}

# Extraction of a flattened column from ``properties``: a value of another JSON type, or out of
# the column type's range, gives NULL and stays in ``properties`` only.
_EXTRACT = {
    KIND_BOOLEAN: "CASE WHEN jsonb_typeof({v}) = 'boolean' THEN ({v})::boolean END",
    KIND_INTEGER: (
        "CASE WHEN jsonb_typeof({v}) = 'number' AND ({t}) ~ '^-?[0-9]{{1,18}}$' "
        "THEN ({t})::bigint END"
    ),
    KIND_NUMBER: (
        "CASE WHEN jsonb_typeof({v}) = 'number' AND (({v})::numeric = 0 OR "
        "abs(({v})::numeric) BETWEEN 1e-300 AND 1e300) THEN ({v})::numeric::double precision END"
    ),
    KIND_STRING: "CASE WHEN jsonb_typeof({v}) = 'string' THEN {t} END",
}

_LEDGER_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {LEDGER_SCHEMA};
CREATE TABLE IF NOT EXISTS {LEDGER_SCHEMA}.{LEDGER_TABLE} (
    stream        text        NOT NULL,
    hour          timestamptz NOT NULL,
    fingerprint   text        NOT NULL,
    files         jsonb       NOT NULL,
    records_read  bigint      NOT NULL,
    rows_loaded   bigint      NOT NULL,
    duplicates    bigint      NOT NULL,
    quarantined   bigint      NOT NULL,
    new_columns   jsonb       NOT NULL,
    run_id        text,
    loaded_at     timestamptz NOT NULL DEFAULT now(),
    seconds       double precision,
    files_read    bigint,
    bytes_read    bigint,
    PRIMARY KEY (stream, hour)
);
-- Ledgers created before these columns existed get them (NULL for the hours loaded then).
-- Only then: ALTER TABLE locks the ledger exclusively, even when it adds nothing, and would
-- queue behind every load in progress.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = '{LEDGER_SCHEMA}' AND table_name = '{LEDGER_TABLE}'
                   AND column_name = 'bytes_read') THEN
        ALTER TABLE {LEDGER_SCHEMA}.{LEDGER_TABLE}
            ADD COLUMN IF NOT EXISTS seconds double precision,
            ADD COLUMN IF NOT EXISTS files_read bigint,
            ADD COLUMN IF NOT EXISTS bytes_read bigint;
    END IF;
END $$
"""

_TABLE_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE {table} (
    message_id      text        NOT NULL UNIQUE,
    user_id         text,
    anonymous_id    text,
    event_name      text,
    event_timestamp timestamptz,
    sent_at         timestamptz,
    received_at     timestamptz NOT NULL,
    properties      jsonb,
    context         jsonb,
    _hour           timestamptz NOT NULL,
    _source_key     text        NOT NULL,
    _loaded_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON {table} (_hour);
"""

_STAGING_DDL = """
CREATE TEMPORARY TABLE _clickstream_staging (
    message_id      text        NOT NULL,
    received_at     timestamptz NOT NULL,
    event_timestamp timestamptz,
    sent_at         timestamptz,
    _source_key     text        NOT NULL,
    _line           integer     NOT NULL,
    doc             jsonb       NOT NULL
) ON COMMIT DROP
"""


class PostgresWarehouse:
    """Loads partitions into PostgreSQL tables ``<customer>.<event>``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._ledger_ready = False
        self._tables: set[Stream] = set()

    def connection(self) -> contextlib.AbstractContextManager[psycopg2.extensions.connection]:
        return open_connection(lambda: psycopg2.connect(self.url, application_name="clickstream"))

    def ensure_ledger(self, conn: psycopg2.extensions.connection) -> None:
        """Create the ledger on first use (once per warehouse object)."""
        if self._ledger_ready:
            return
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended('clickstream.ledger', 0))")
            cur.execute(_LEDGER_DDL)
        conn.commit()
        self._ledger_ready = True

    def ledger(
        self, streams: Iterable[Stream] | None = None, since: datetime | None = None
    ) -> dict[tuple[str, datetime], LedgerEntry]:
        query = sql.SQL(
            "SELECT stream, hour, fingerprint, records_read, rows_loaded, duplicates, quarantined, "
            "loaded_at FROM {}.{} WHERE true"
        ).format(sql.Identifier(LEDGER_SCHEMA), sql.Identifier(LEDGER_TABLE))
        params: list[Any] = []
        if streams is not None:
            query += sql.SQL(" AND stream = ANY(%s)")
            params.append([s.key for s in streams])
        if since is not None:
            query += sql.SQL(" AND hour >= %s")
            params.append(since)
        with self.connection() as conn:
            self.ensure_ledger(conn)
            with conn.cursor() as cur:
                cur.execute(query, params)
                rows = cur.fetchall()
        return {(row[0], row[1]): LedgerEntry(*row) for row in rows}

    def load_partition(
        self,
        load: PartitionLoad,
        records: Iterable[tuple[str, ValidRecord]],
        stats: ReadStats,
    ) -> LoadResult:
        stream = load.stream
        table = sql.Identifier(stream.customer, stream.event)
        result = LoadResult()
        self.ensure_table(stream)
        with self.connection() as conn:
            self.ensure_ledger(conn)
            with conn.cursor() as cur:
                if self._loaded_fingerprint(cur, load) == load.fingerprint:
                    conn.rollback()
                    return LoadResult(skipped=True)
                cur.execute(_STAGING_DDL)
                reader = _CopyReader(_copy_rows(records))
                try:
                    cur.copy_expert("COPY _clickstream_staging FROM STDIN", reader)
                except psycopg2.Error:
                    # A failure while reading the source (S3) surfaces from COPY wrapped in a
                    # database error: raise the original, so it is retried and reported as is.
                    if reader.error is not None:
                        raise reader.error from None
                    raise
                cur.execute("SELECT count(*), count(DISTINCT message_id) FROM _clickstream_staging")
                staged, distinct = cur.fetchone() or (0, 0)
                # Everything below runs with the table to ourselves: a concurrent load of the
                # same partition waits here and then finds the ledger already up to date.
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"table:{stream}",)
                )
                if self._loaded_fingerprint(cur, load) == load.fingerprint:
                    conn.rollback()
                    return LoadResult(skipped=True)
                columns = self._ensure_property_columns(cur, stream, stats, result)
                cur.execute(sql.SQL("DELETE FROM {} WHERE _hour = %s").format(table), (load.hour,))
                result.rows_replaced = cur.rowcount
                cur.execute(_insert_statement(table, columns), {"hour": load.hour})
                result.rows_loaded = cur.rowcount
                result.staged = staged
                result.duplicates_in_partition = staged - distinct
                result.already_loaded = distinct - result.rows_loaded
                self._record(cur, load, result, stats)
            conn.commit()
        return result

    def _loaded_fingerprint(self, cur: Any, load: PartitionLoad) -> str | None:
        cur.execute(
            sql.SQL("SELECT fingerprint FROM {}.{} WHERE stream = %s AND hour = %s").format(
                sql.Identifier(LEDGER_SCHEMA), sql.Identifier(LEDGER_TABLE)
            ),
            (load.stream.key, load.hour),
        )
        row = cur.fetchone()
        return None if row is None else str(row[0])

    def ensure_table(self, stream: Stream) -> None:
        """Create the stream's schema and table if missing, in a short transaction of its own.

        The customer's advisory lock is taken before any catalog lookup on a fresh connection:
        a lookup made earlier in the same session can leave a stale "schema does not exist"
        in PostgreSQL's catalog cache, and concurrent first loads then collide.
        """
        if stream in self._tables:
            return
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"schema:{stream.customer}",),
            )
            cur.execute("SELECT to_regclass(%s)", (_regclass(cur, stream),))
            row = cur.fetchone()
            if row is None or row[0] is None:
                cur.execute(
                    sql.SQL(_TABLE_DDL).format(
                        schema=sql.Identifier(stream.customer),
                        table=sql.Identifier(stream.customer, stream.event),
                    )
                )
            conn.commit()
        self._tables.add(stream)

    def _ensure_property_columns(
        self, cur: Any, stream: Stream, stats: ReadStats, result: LoadResult
    ) -> dict[str, tuple[str, str]]:
        """Add a typed column for each new property; return every property column's kind."""
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s",
            (stream.customer, stream.event),
        )
        existing = {name: data_type for name, data_type in cur.fetchall()}
        property_count = len(set(existing) - set(BASE_COLUMNS))
        wanted = property_columns(stats.property_kinds)
        columns: dict[str, tuple[str, str]] = {}
        for prop, (column, kind) in sorted(wanted.items(), key=lambda item: item[1][0]):
            if column in existing:
                existing_kind = _KIND_OF_SQL_TYPE.get(existing[column])
                if existing_kind is not None:
                    columns[prop] = (column, existing_kind)
                continue
            if property_count >= MAX_PROPERTY_COLUMNS:
                continue
            cur.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                    sql.Identifier(stream.customer, stream.event),
                    sql.Identifier(column),
                    sql.SQL(_SQL_TYPES[kind]),
                )
            )
            existing[column] = _SQL_TYPES[kind]
            property_count += 1
            result.new_columns.append(column)
            columns[prop] = (column, kind)
        return columns

    def _record(self, cur: Any, load: PartitionLoad, result: LoadResult, stats: ReadStats) -> None:
        files = [{"key": f.key, "etag": f.etag, "size": f.size} for f in load.files]
        cur.execute(
            sql.SQL(
                "INSERT INTO {}.{} (stream, hour, fingerprint, files, records_read, rows_loaded, "
                "duplicates, quarantined, new_columns, run_id, seconds, files_read, bytes_read) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (stream, hour) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                "files = EXCLUDED.files, records_read = EXCLUDED.records_read, "
                "rows_loaded = EXCLUDED.rows_loaded, duplicates = EXCLUDED.duplicates, "
                "quarantined = EXCLUDED.quarantined, new_columns = EXCLUDED.new_columns, "
                "run_id = EXCLUDED.run_id, loaded_at = now(), seconds = EXCLUDED.seconds, "
                "files_read = EXCLUDED.files_read, bytes_read = EXCLUDED.bytes_read"
            ).format(sql.Identifier(LEDGER_SCHEMA), sql.Identifier(LEDGER_TABLE)),
            (
                load.stream.key,
                load.hour,
                load.fingerprint,
                orjson.dumps(files).decode(),
                stats.records_read,
                result.rows_loaded,
                result.duplicates_in_partition + result.already_loaded,
                stats.quarantined,
                orjson.dumps(result.new_columns).decode(),
                load.run_id,
                *load.ledger_figures(),
            ),
        )

    def rejection(self, record: ValidRecord) -> str | None:
        return None  # validation already excludes what PostgreSQL cannot store (\u0000)

    def row_counts(self, streams: Iterable[Stream]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self.connection() as conn, conn.cursor() as cur:
            for stream in streams:
                cur.execute("SELECT to_regclass(%s)", (_regclass(cur, stream),))
                row = cur.fetchone()
                if row is None or row[0] is None:
                    counts[stream.key] = 0
                    continue
                cur.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(
                        sql.Identifier(stream.customer, stream.event)
                    )
                )
                counted = cur.fetchone()
                counts[stream.key] = int(counted[0]) if counted else 0
        return counts


def _regclass(cur: Any, stream: Stream) -> str:
    """The quoted ``"customer"."event"`` name ``to_regclass`` expects."""
    return sql.Identifier(stream.customer, stream.event).as_string(cur)


def _insert_statement(table: sql.Identifier, columns: dict[str, tuple[str, str]]) -> sql.Composed:
    """INSERT the first copy of each message not already in the table, columns extracted."""
    targets = list(LOADED_COLUMNS)
    values: list[sql.Composable] = [
        sql.SQL("s.message_id"),
        sql.SQL("s.doc->>'userId'"),
        sql.SQL("s.doc->>'anonymousId'"),
        sql.SQL("s.doc->>'event'"),
        sql.SQL("s.event_timestamp"),
        sql.SQL("s.sent_at"),
        sql.SQL("s.received_at"),
        sql.SQL(
            "CASE WHEN jsonb_typeof(s.doc->'properties') = 'object' THEN s.doc->'properties' END"
        ),
        sql.SQL("CASE WHEN jsonb_typeof(s.doc->'context') = 'object' THEN s.doc->'context' END"),
        sql.SQL("%(hour)s"),
        sql.SQL("s._source_key"),
    ]
    for prop, (column, kind) in sorted(columns.items(), key=lambda item: item[1][0]):
        literal = sql.Literal(prop)
        value = sql.SQL("s.doc->'properties'->{}").format(literal)
        text = sql.SQL("s.doc->'properties'->>{}").format(literal)
        targets.append(column)
        values.append(sql.SQL(_EXTRACT[kind]).format(v=value, t=text))
    return sql.SQL(
        "INSERT INTO {table} ({targets}) SELECT DISTINCT ON (s.message_id) {values} "
        "FROM _clickstream_staging s ORDER BY s.message_id, s._source_key, s._line "
        "ON CONFLICT (message_id) DO NOTHING"
    ).format(
        table=table,
        targets=sql.SQL(", ").join(sql.Identifier(t) for t in targets),
        values=sql.SQL(", ").join(values),
    )


def _escape(value: bytes) -> bytes:
    """Escape a value for COPY's text format."""
    if b"\\" in value:
        value = value.replace(b"\\", b"\\\\")
    if b"\t" in value:
        value = value.replace(b"\t", b"\\t")
    if b"\r" in value:
        value = value.replace(b"\r", b"\\r")
    return value


def _copy_rows(records: Iterable[tuple[str, ValidRecord]]) -> Iterator[bytes]:
    null = b"\\N"
    current_key = ""
    escaped_key = b""
    for source_key, record in records:
        if source_key != current_key:
            current_key, escaped_key = source_key, _escape(source_key.encode())
        yield (
            b"\t".join(
                (
                    _escape(record.message_id.encode()),
                    record.received_at.isoformat().encode(),
                    record.event_timestamp.isoformat().encode() if record.event_timestamp else null,
                    record.sent_at.isoformat().encode() if record.sent_at else null,
                    escaped_key,
                    str(record.line).encode(),
                    _escape(record.raw),
                )
            )
            + b"\n"
        )


class _CopyReader:
    """A file-like ``read(n)`` over an iterator of byte rows, for ``copy_expert``."""

    def __init__(self, rows: Iterator[bytes]) -> None:
        self._rows = rows
        self._buffer = bytearray()
        self.error: Exception | None = None

    def read(self, size: int = -1) -> bytes:
        target = size if size and size > 0 else 1 << 20
        while len(self._buffer) < target:
            try:
                row = next(self._rows, None)
            except Exception as error:
                self.error = error
                raise
            if row is None:
                break
            self._buffer += row
        chunk = bytes(self._buffer[:target])
        del self._buffer[:target]
        return chunk

    def readline(self, size: int = -1) -> bytes:  # pragma: no cover - COPY reads in blocks
        return self.read(size)
