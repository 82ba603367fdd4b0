"""PostgreSQL: the partition replaced in one transaction by COPY straight into the table.

Python validates each record and formats the table's row (base columns, ``properties`` and
``context`` re-serialised, typed property columns); rows go in chunks by COPY FROM STDIN into
the table itself, while a background thread reads and formats the next chunk. Duplicates never
reach COPY: a chunk keeps the first copy of each messageId (file and line order), and one
indexed probe per chunk drops the messageIds the table already holds (another hour, or an
earlier chunk of this load). Per table, loads are serialised by a transaction-scoped advisory
lock, which makes that probe, concurrent loads of the same partition and column additions safe.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from clickstream_pipeline.names import Stream
from clickstream_pipeline.prefetch import prefetch
from clickstream_pipeline.records import (
    KIND_BOOLEAN,
    KIND_INTEGER,
    KIND_NUMBER,
    KIND_STRING,
    ReadStats,
    ValidRecord,
    dump_json,
)
from clickstream_pipeline.warehouse.base import (
    LARGEST_NUMBER,
    LOADED_COLUMNS,
    SMALLEST_NUMBER,
    LedgerEntry,
    LoadResult,
    PartitionLoad,
    PropertyColumns,
    holds_boolean,
    holds_integer,
    holds_number,
    holds_string,
    open_connection,
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

# The flattening rule in SQL, for a column added after its load's rows were sent: the same rule as
# the row formatting below (``_FORMATS``); a value of another JSON type, or out of the column
# type's range, gives NULL and stays in ``properties`` only.
_EXTRACT = {
    KIND_BOOLEAN: "CASE WHEN jsonb_typeof({v}) = 'boolean' THEN ({v})::boolean END",
    KIND_INTEGER: (
        "CASE WHEN jsonb_typeof({v}) = 'number' AND ({t}) ~ '^-?[0-9]+$' AND ({v})::numeric "
        "BETWEEN -9223372036854775808 AND 9223372036854775807 THEN ({t})::bigint END"
    ),
    KIND_NUMBER: (
        "CASE WHEN jsonb_typeof({v}) = 'number' AND (({v})::numeric = 0 OR "
        f"abs(({{v}})::numeric) BETWEEN {SMALLEST_NUMBER!r} AND {LARGEST_NUMBER}) "
        "THEN ({v})::numeric::double precision END"
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

# Records per COPY (and per probe for messageIds already loaded): a few chunks in flight bound the
# loader's memory; larger chunks gain little.
CHUNK_RECORDS = 10_000
# The first records of a load, held back until the columns of the properties they bring are
# decided; every later record is formatted as it is read.
FIRST_RECORDS = 1_000


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
                # Everything below runs with the table to ourselves: a concurrent load of the
                # same partition waits here and then finds the ledger already up to date.
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"table:{stream}",)
                )
                if self._loaded_fingerprint(cur, load) == load.fingerprint:
                    conn.rollback()
                    return LoadResult(skipped=True)
                # The probe for loaded messageIds must use the unique index: a table filled in
                # this transaction has no statistics, and the planner would scan it whole.
                cur.execute("SET LOCAL enable_seqscan = off")
                cur.execute(sql.SQL("DELETE FROM {} WHERE _hour = %s").format(table), (load.hour,))
                result.rows_replaced = cur.rowcount
                columns = PropertyColumns(self._column_types(cur, stream), _KIND_OF_SQL_TYPE)
                chunks = _chunks(records, stats, columns, load.hour)
                for chunk in prefetch(chunks, name=f"read {stream}"):
                    for column, kind in chunk.new_columns:
                        _add_column(cur, table, column, kind, result)
                    rows = self._not_loaded(cur, table, chunk)
                    cur.copy_expert(
                        sql.SQL("COPY {} ({}) FROM STDIN")
                        .format(table, sql.SQL(", ").join(map(sql.Identifier, chunk.columns)))
                        .as_string(cur),
                        io.BytesIO(b"".join(rows)),
                        1 << 20,
                    )
                    result.rows_loaded += len(rows)
                    result.staged += chunk.records
                late = columns.add(stats.property_kinds)
                if late:
                    self._add_late_columns(cur, table, load.hour, columns, late, result)
                result.duplicates = result.staged - result.rows_loaded
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

    @staticmethod
    def _add_late_columns(
        cur: Any,
        table: sql.Identifier,
        hour: datetime,
        columns: PropertyColumns,
        late: list[tuple[str, str]],
        result: LoadResult,
    ) -> None:
        """Columns for properties first seen after the load's first records: added, and filled
        from ``properties`` for the rows this load sent."""
        for column, kind in late:
            _add_column(cur, table, column, kind, result)
        props = {column: prop for prop, (column, _) in columns.chosen.items()}
        assignments, tests = [], []
        for column, kind in late:
            literal = sql.Literal(props[column])
            value = sql.SQL(_EXTRACT[kind]).format(
                v=sql.SQL("properties->{}").format(literal),
                t=sql.SQL("properties->>{}").format(literal),
            )
            assignments.append(sql.SQL("{} = {}").format(sql.Identifier(column), value))
            tests.append(sql.SQL("properties ? {}").format(literal))
        cur.execute(
            sql.SQL("UPDATE {} SET {} WHERE _hour = %s AND ({})").format(
                table, sql.SQL(", ").join(assignments), sql.SQL(" OR ").join(tests)
            ),
            (hour,),
        )

    @staticmethod
    def _not_loaded(cur: Any, table: sql.Identifier, chunk: _Chunk) -> list[bytes]:
        """The chunk's rows whose messageId the table does not hold yet."""
        cur.execute(
            sql.SQL("SELECT message_id FROM {} WHERE message_id = ANY(%s)").format(table),
            (chunk.message_ids,),
        )
        loaded = {row[0] for row in cur.fetchall()}
        if not loaded:
            return chunk.rows
        return [
            row
            for message_id, row in zip(chunk.message_ids, chunk.rows, strict=True)
            if message_id not in loaded
        ]

    def _column_types(self, cur: Any, stream: Stream) -> dict[str, str]:
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s",
            (stream.customer, stream.event),
        )
        return {name: data_type for name, data_type in cur.fetchall()}

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
                result.duplicates,
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


def _add_column(
    cur: Any, table: sql.Identifier, column: str, kind: str, result: LoadResult
) -> None:
    cur.execute(
        sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
            table, sql.Identifier(column), sql.SQL(_SQL_TYPES[kind])
        )
    )
    result.new_columns.append(column)


@dataclass(frozen=True)
class _Chunk:
    """Rows in COPY text format, each with its messageId, for the columns named."""

    columns: tuple[str, ...]
    new_columns: list[tuple[str, str]]
    message_ids: list[str]
    rows: list[bytes]
    records: int  # valid records read, duplicates within the chunk included


def _chunks(
    records: Iterable[tuple[str, ValidRecord]],
    stats: ReadStats,
    columns: PropertyColumns,
    hour: datetime,
) -> Iterator[_Chunk]:
    """The rows of ``records`` in chunks of CHUNK_RECORDS, first copies only within a chunk.

    Columns for the properties of the first FIRST_RECORDS records are decided (from their kinds)
    before any row is formatted; properties first seen later get theirs after the load's rows
    are sent (see ``_add_late_columns``).
    """
    source = iter(records)
    first = list(itertools.islice(source, FIRST_RECORDS))
    writer = _ChunkWriter(columns, hour, columns.add(stats.property_kinds))
    for source_key, record in itertools.chain(first, source):
        writer.write(source_key, record)
        if writer.records == CHUNK_RECORDS:
            yield writer.flush()
    if writer.records:
        yield writer.flush()


class _ChunkWriter:
    """Formats rows as records arrive, for the property columns decided when it was made."""

    def __init__(
        self, columns: PropertyColumns, hour: datetime, new_columns: list[tuple[str, str]]
    ) -> None:
        chosen = columns.by_column()
        self.columns = (*LOADED_COLUMNS, *(column for _, column, _ in chosen))
        self.new_columns = new_columns
        self._position = {prop: index for index, (prop, _, _) in enumerate(chosen)}
        self._formats = [_FORMATS[kind] for _, _, kind in chosen]
        self._empty = [_NULL] * len(chosen)
        self._hour = hour.isoformat().encode()
        self._key, self._escaped_key = "", b""
        self._reset()

    def _reset(self) -> None:
        self.message_ids: list[str] = []
        self.rows: list[bytes] = []
        self.records = 0
        self._seen: set[str] = set()

    def flush(self) -> _Chunk:
        chunk = _Chunk(self.columns, self.new_columns, self.message_ids, self.rows, self.records)
        self.new_columns = []
        self._reset()
        return chunk

    def write(self, source_key: str, record: ValidRecord) -> None:
        self.records += 1
        message_id = record.message_id
        if message_id in self._seen:
            return
        self._seen.add(message_id)
        if source_key != self._key:
            self._key, self._escaped_key = source_key, _escape(source_key.encode())
        doc = record.doc
        properties = doc.get("properties")
        values = self._empty
        if type(properties) is dict and self._position:
            values = values.copy()
            position, formats = self._position, self._formats
            for prop, value in properties.items():
                index = position.get(prop)
                if index is not None:
                    values[index] = formats[index](value)
        self.message_ids.append(message_id)
        self.rows.append(
            b"\t".join(
                (
                    _escape(message_id.encode()),
                    _text(doc.get("userId")),
                    _text(doc.get("anonymousId")),
                    _text(doc.get("event")),
                    record.event_timestamp.encode() if record.event_timestamp else _NULL,
                    record.sent_at.encode() if record.sent_at else _NULL,
                    record.received_at.encode(),
                    _json(properties),
                    _json(doc.get("context")),
                    self._hour,
                    self._escaped_key,
                    *values,
                )
            )
            + b"\n"
        )


# --- values in COPY text format -----------------------------------------------------------------

_NULL = b"\\N"
_SPECIAL = re.compile(rb"[\\\t\n\r]")
_ESCAPES = {b"\\": b"\\\\", b"\t": b"\\t", b"\n": b"\\n", b"\r": b"\\r"}


def _escape(value: bytes) -> bytes:
    """Escape a value for COPY's text format."""
    if _SPECIAL.search(value) is None:
        return value
    return _SPECIAL.sub(lambda match: _ESCAPES[match[0]], value)


def _text(value: object) -> bytes:
    """A text column: strings as they are, other JSON values as JSON text, null as NULL."""
    if value is None:
        return _NULL
    if type(value) is str:
        return _escape(value.encode())
    return _escape(dump_json(value))


def _json(value: object) -> bytes:
    """A jsonb column from a JSON object (anything else is NULL); only backslashes need escaping
    in serialised JSON, which has no raw control characters."""
    if type(value) is not dict:
        return _NULL
    dumped = dump_json(value)
    return dumped.replace(b"\\", b"\\\\") if b"\\" in dumped else dumped


# A flattened column's value, by the rule every dialect shares (``base.COLUMN_HOLDS``).


def _boolean(value: object) -> bytes:
    return (b"t" if value else b"f") if holds_boolean(value) else _NULL


def _integer(value: object) -> bytes:
    return str(value).encode() if holds_integer(value) else _NULL


def _number(value: object) -> bytes:
    if not holds_number(value):
        return _NULL
    return b"0" if value == 0 else repr(float(value)).encode()  # type: ignore[arg-type]


def _string(value: object) -> bytes:
    return _escape(value.encode()) if holds_string(value) else _NULL  # type: ignore[attr-defined]


_FORMATS = {
    KIND_BOOLEAN: _boolean,
    KIND_INTEGER: _integer,
    KIND_NUMBER: _number,
    KIND_STRING: _string,
}
