"""Test-only: run the Redshift dialect against the embedded PostgreSQL.

No open-source engine runs Redshift's ``COPY ... FROM 's3://...' MANIFEST``. This wrapper does
that one thing — it reads the manifest, fetches its parts from the local S3 server, maps each
JSON line through the JSONPaths file and feeds PostgreSQL's ``COPY FROM STDIN`` — and lets
PostgreSQL accept the Redshift-only words of the DDL (``DISTKEY``, ``SORTKEY``, ``DISTSTYLE``,
``SUPER``, ``GETDATE()``, ``JSON_PARSE``). Everything else runs as sent. Every statement is
recorded exactly as the warehouse sent it (and every COMMIT and ROLLBACK), for exact-SQL
assertions, and failures of the network edge (a disconnect at COMMIT, a failing COPY) can be
injected.

It also behaves as Redshift does under concurrent transactions, which PostgreSQL's default READ
COMMITTED hides (../shared/FACTS.md, "Redshift concurrency and limits"):

- Each transaction's snapshot is taken at its first statement other than LOCK (PostgreSQL's
  REPEATABLE READ does exactly that), so a transaction that reads before it locks cannot see
  what committed while it waited for the lock.
- PRIMARY KEY and UNIQUE are informational: the DDL is run without them.
- ``SNAPSHOT`` (the default of Serverless and of new clusters): concurrent changes to the same
  rows conflict; ``SERIALIZABLE`` (older clusters): conflicts are tracked per table, and a
  transaction that read a table a concurrent, committed one wrote, while that one read or
  wrote a table it writes, is aborted at COMMIT. Either abort is the server's own
  ``ERROR: 1023`` (SQLSTATE XX000, the table in DETAIL), as Redshift sends it.
- ``barrier``: the first LOCKs of that many connections wait for each other, so concurrent
  loads overlap at the same step every time.
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
    query_id bigint, file_name text, line_number bigint, column_name text, error_message text,
    session_id integer, start_time timestamptz);
CREATE SEQUENCE IF NOT EXISTS redshift_copy_ids;
CREATE OR REPLACE VIEW stv_slices AS SELECT generate_series(0, 3) AS slice;  -- a 4-slice cluster
CREATE OR REPLACE FUNCTION pg_last_copy_id() RETURNS bigint LANGUAGE sql
    AS $$ SELECT coalesce(nullif(current_setting('redshift.last_copy_id', true), ''),
                          '0')::bigint $$;
"""
_shims_lock = threading.Lock()
_COPY = re.compile(
    r"COPY (?P<table>\S+) \((?P<columns>[^)]*)\) FROM '(?P<manifest>s3://[^']+)' "
    r"IAM_ROLE (?:default|'(?P<role>[^']+)')(?: REGION '(?P<region>[a-z0-9-]+)')? "
    r"MANIFEST GZIP FORMAT AS JSON '(?P<jsonpaths>s3://[^']+)' "
    r"TIMEFORMAT 'auto' STATUPDATE OFF COMPUPDATE OFF"
)
_REDSHIFT_ONLY = re.compile(
    r" (DISTKEY \([^)]*\)|SORTKEY \([^)]*\)|DISTSTYLE \w+)|, PRIMARY KEY \([^)]*\)"
)
_TABLE = re.compile(r'"(\w+)"\."(\w+)"')
_WRITE = re.compile(
    r"(?:INSERT INTO|DELETE FROM|UPDATE|COPY|ALTER TABLE|TRUNCATE|"
    r'CREATE TABLE IF NOT EXISTS|CREATE TABLE) ("\w+"\."\w+")'
)
SNAPSHOT, SERIALIZABLE = "snapshot", "serializable"
STAGING = "_clickstream_staging"
_PROVISIONED_ONLY = re.compile(r"\b(?:stl|stv|svl|svcs)_\w+")
_VARCHAR = re.compile(r'"(\w+)" VARCHAR\((\d+)\)')
_ABORT = """DO $$ BEGIN RAISE EXCEPTION '1023' USING ERRCODE = 'XX000', DETAIL = %s; END $$"""


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
    # Commit a transaction that wrote a table's rows but not the ledger, then lose the
    # connection: a crash between a load's data commit and its ledger commit.
    disconnect_after_data_commit: int = 0
    # The next commits of transactions that wrote a table's rows abort with ERROR 1023, as a
    # conflicting concurrent transaction makes them.
    conflicts_at_commit: int = 0
    copy_error: str | None = None  # the COPY fails with this load error


@dataclass
class Transaction:
    """What SERIALIZABLE isolation tracks of a transaction: its tables, read and written."""

    began: int | None = None  # the clock at its snapshot
    committed: int | None = None
    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)

    def cycle_with(self, other: Transaction) -> str | None:
        """A table that puts this transaction and a concurrent one in a cycle, if any."""
        for first, second in ((self, other), (other, self)):
            read = first.reads & second.writes
            if read and (second.reads | second.writes) & first.writes:
                return sorted(read)[0]
        return None


@dataclass
class RedshiftOnPostgres:
    """A connection factory for ``RedshiftWarehouse`` that runs against PostgreSQL."""

    url: str
    faults: Faults = field(default_factory=Faults)
    statements: list[tuple[str, Any]] = field(default_factory=list)
    isolation: str = SNAPSHOT
    serverless: bool = False  # no STL/STV/SVL/SVCS tables, as on Redshift Serverless
    barrier: threading.Barrier | None = None
    barrier_before: str = "LOCK "
    barrier_waits: int = 0  # how many connections' first such statements still wait
    aborts: list[str] = field(default_factory=list)  # the DETAIL of every 1023 sent
    _clock: int = 0
    _committed: list[Transaction] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def overlap(self, parties: int, before: str = "LOCK ", timeout: float = 30.0) -> None:
        """Make the next ``parties`` connections meet before their first statement that starts
        with ``before``: loads that run at once then overlap at that step every time. A party
        that cannot arrive (the loader serialises that step itself) lets the others go on
        after ``timeout``."""
        self.barrier = threading.Barrier(parties, timeout=timeout)
        self.barrier_before, self.barrier_waits = before, parties

    def __call__(self, config: RedshiftConfig) -> Connection:
        conn = psycopg2.connect(self.url)
        conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        return Connection(self, conn)

    def tick(self) -> int:
        with self._lock:
            self._clock += 1
            return self._clock

    def meet(self, statement: str, connection: Connection) -> None:
        """Wait at the barrier before this connection's first statement it names."""
        barrier = self.barrier
        if barrier is None or connection.met or not statement.startswith(self.barrier_before):
            return
        connection.met = True
        with self._lock:
            if self.barrier_waits <= 0:
                return
            self.barrier_waits -= 1
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # a party that never came: go on alone

    def commit(self, transaction: Transaction) -> str | None:
        """Record a committing transaction; under SERIALIZABLE, the table of a cycle it would
        close with a concurrent committed one (then it must abort instead)."""
        with self._lock:
            if self.isolation == SERIALIZABLE and transaction.began is not None:
                for other in self._committed:
                    if other.committed is not None and other.committed > transaction.began:
                        table = transaction.cycle_with(other)
                        if table is not None:
                            return table
            self._clock += 1
            transaction.committed = self._clock
            if transaction.writes:
                self._committed.append(transaction)
        return None


class Connection:
    def __init__(self, owner: RedshiftOnPostgres, conn: Any) -> None:
        self.owner = owner
        self.conn = conn
        self.wrote_ledger = False
        self.wrote_rows = False  # a table's rows (not the ledger's) in this transaction
        self.last_copy_id: int | None = None
        self.transaction = Transaction()
        self.met = False  # this connection has passed the barrier
        self.varchar_bytes: dict[str, int] = {}  # the staging table's VARCHAR(n) columns

    def cursor(self) -> Cursor:
        return Cursor(self, self.conn.cursor())

    def abort(self, detail: str) -> None:
        """End the transaction as Redshift does on a conflict: the server's ERROR 1023."""
        self.conn.rollback()
        self.transaction = Transaction()
        self.wrote_ledger = self.wrote_rows = False
        self.owner.aborts.append(detail)
        with self.conn.cursor() as cur:
            cur.execute(_ABORT, (detail,))

    def commit(self) -> None:
        self.owner.statements.append(("COMMIT", None))
        transaction, self.transaction = self.transaction, Transaction()
        table = self.owner.commit(transaction)
        if table is None and self.wrote_rows and self.owner.faults.conflicts_at_commit:
            self.owner.faults.conflicts_at_commit -= 1
            table = sorted(transaction.writes)[0]
        if table is not None:
            self.wrote_ledger = False
            self.abort(
                f"Serializable isolation violation on table - {table}, transactions forming "
                "the cycle are: this one and one that committed while it ran"
            )
        self.conn.commit()
        wrote_ledger, self.wrote_ledger = self.wrote_ledger, False
        wrote_rows, self.wrote_rows = self.wrote_rows, False
        faults = self.owner.faults
        if wrote_ledger and faults.disconnect_after_load_commit:
            faults.disconnect_after_load_commit -= 1
            self._lose()
        if wrote_rows and not wrote_ledger and faults.disconnect_after_data_commit:
            faults.disconnect_after_data_commit -= 1
            self._lose()

    def _lose(self) -> None:
        self.conn.close()
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    def rollback(self) -> None:
        self.owner.statements.append(("ROLLBACK", None))
        self.transaction = Transaction()
        self.wrote_ledger = self.wrote_rows = False
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
        connection, owner = self.connection, self.connection.owner
        owner.statements.append((statement, params))
        if statement.startswith('INSERT INTO "clickstream"."load_ledger"'):
            connection.wrote_ledger = True
        elif statement.startswith(("INSERT INTO", "DELETE FROM")) and not statement.split()[
            2
        ].startswith('"clickstream".'):
            connection.wrote_rows = True
        self._track(statement)
        system = _PROVISIONED_ONLY.search(statement)
        if owner.serverless and system is not None:
            # The server's own answer to a table Serverless does not have.
            self.cursor.execute(f"SELECT * FROM {system[0]}_absent_on_serverless")
        if statement.startswith(f'CREATE TEMP TABLE "{STAGING}"'):
            connection.varchar_bytes = {
                name: int(size) for name, size in _VARCHAR.findall(statement)
            }
        try:
            copy = _COPY.fullmatch(statement)
            if copy is not None:
                self._copy_from_s3(copy)
                return
            self.cursor.execute(_REDSHIFT_ONLY.sub("", statement), params)
        except psycopg2.errors.SerializationFailure as error:
            # PostgreSQL's "could not serialize access due to concurrent update": the same
            # rows changed by a concurrent transaction, which Redshift reports as 1023.
            connection.abort(
                f"Serializable isolation violation on table - {self._target(statement)}, "
                f"a concurrent transaction changed the same rows ({error.diag.message_primary})"
            )

    def _track(self, statement: str) -> None:
        """The transaction's snapshot (at its first statement but LOCK) and its tables."""
        connection, transaction = self.connection, self.connection.transaction
        connection.owner.meet(statement, connection)
        if statement.startswith("LOCK "):
            return  # LOCK takes no snapshot
        if transaction.began is None:
            transaction.began = connection.owner.tick()
        tables = {f"{schema}.{table}" for schema, table in _TABLE.findall(statement)}
        tables.discard("information_schema.columns")
        tables.discard("information_schema.tables")
        target = _WRITE.match(statement)
        if target is not None and statement.startswith("CREATE TABLE IF NOT EXISTS"):
            with connection.conn.cursor() as cur:
                cur.execute("SELECT to_regclass(%s)", (target[1],))
                if cur.fetchone()[0] is not None:
                    target = None  # a table that exists: nothing is written
        if target is not None:
            written = target[1].replace('"', "")
            transaction.writes.add(written)
            if statement.startswith("INSERT INTO") and " SELECT " not in statement:
                tables.discard(written)
        transaction.reads |= tables

    @staticmethod
    def _target(statement: str) -> str:
        target = _WRITE.match(statement)
        return target[1].replace('"', "") if target else "?"

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
        limits = self.connection.varchar_bytes
        for entry in orjson.loads(_get(client, copy["manifest"]))["entries"]:
            assert entry["mandatory"] is True
            for number, line in enumerate(gzip.decompress(_get(client, entry["url"])).splitlines()):
                row = orjson.loads(line)
                for key, limit in limits.items():
                    value = row.get(key)
                    if isinstance(value, str) and len(value.encode()) > limit:
                        # Redshift's VARCHAR(n) counts bytes; MAXERROR 0 fails the whole COPY.
                        self._record_load_error(
                            "String length exceeds DDL length", entry["url"], number + 1, key
                        )
                        raise psycopg2.errors.InternalError_(
                            f"Load into table '{STAGING}' failed. Check "
                            "'sys_load_error_detail' system table for details."
                        )
                buffer.write(b"\t".join(_text(row.get(key)) for key in keys) + b"\n")
        buffer.seek(0)
        self.cursor.copy_expert(f"COPY {copy['table']} ({copy['columns']}) FROM STDIN", buffer)

    def _record_load_error(
        self,
        message: str,
        file: str = "s3://bucket/staged/part-0000.json.gz",
        line: int = 3,
        column: str = "quantity",
    ) -> None:
        # Redshift keeps load errors whatever happens to the transaction: use another session.
        # Its names are CHAR columns, padded with blanks.
        with psycopg2.connect(self.connection.owner.url) as side, side.cursor() as cur:
            cur.execute(
                "INSERT INTO sys_load_error_detail VALUES (%s, %s, %s, %s, %s, %s, now())",
                (
                    # Serverless's SYS views do not know pg_last_copy_id()'s number.
                    None if self.connection.owner.serverless else self.connection.last_copy_id,
                    file,
                    line,
                    column.ljust(26),
                    message,
                    self.connection.conn.get_backend_pid(),
                ),
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
