"""Amazon Redshift: staged gzip parts + manifest in S3, COPY ... MANIFEST, a short locked merge.

The way Redshift is meant to be loaded: Python validates and flattens the partition's records
into a few similar-size gzip JSON parts under ``staged/<stream>/<hour>/<load id>/`` with a
manifest listing exactly those parts (``"mandatory": true``) and a JSONPaths file mapping every
column explicitly (never ``JSON 'auto'``, which drops unknown keys silently).

Then three transactions, each as short as it can be, because Redshift takes a transaction's
snapshot at its first statement other than LOCK and aborts conflicting concurrent ones (ERROR
1023) under both of its isolation levels (``docs/redshift.md``):

1. ``COPY`` into the session's temporary staging table. No lock is held, so readers of the
   table are not stalled while the files are read from S3.
2. ``LOCK`` the table first, then re-check the ledger (it now sees every load that committed
   while this one waited), delete the hour's rows, insert the first copy of each message not
   already in the table (``properties``/``context`` via ``JSON_PARSE`` into SUPER), commit.
3. ``LOCK`` the ledger first, then replace the partition's ledger row, commit. Loads of
   different tables never touch one table in the same transaction, so they never conflict.

A crash between 2 and 3 leaves the rows without their ledger row: the next attempt replaces the
hour with the same rows. Because a started COPY survives a client disconnect, every attempt first
reads the ledger (outside any load transaction): a partition whose fingerprint is already there
is never loaded twice. Nothing holds a snapshot across the S3 work: each check ends its
transaction at once.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import psycopg2

from clickstream_pipeline.errors import ClickstreamError, WriteConflict, first_line
from clickstream_pipeline.names import Stream
from clickstream_pipeline.records import (
    KIND_BOOLEAN,
    KIND_INTEGER,
    KIND_NUMBER,
    KIND_STRING,
    ReadStats,
    ValidRecord,
    dump_json,
    parse_json,
    timestamp_value,
)
from clickstream_pipeline.warehouse.base import (
    COLUMN_HOLDS,
    LOADED_COLUMNS,
    LedgerEntry,
    LoadResult,
    PartitionLoad,
    PropertyColumns,
    open_connection,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
LEDGER = '"clickstream"."load_ledger"'
# Every file of every ledger row, one row each: a VARCHAR holds at most 65,535 bytes, about 240
# files' keys and ETags, and an hour of busy shards has thousands of files.
LEDGER_FILES = '"clickstream"."load_ledger_files"'
LEDGER_FILE_ROWS = 1000  # rows per INSERT (a statement may be up to 16 MB)
LOADED_SQL = f"SELECT fingerprint FROM {LEDGER} WHERE stream = %(stream)s AND hour = %(hour)s"
STAGING = '"_clickstream_staging"'
# Redshift's VARCHAR limit: properties or context larger than this cannot be staged as text.
MAX_VARCHAR_BYTES = 65535
# The id columns are VARCHAR(256), which Redshift counts in bytes of UTF-8.
MAX_ID_BYTES = 256
ID_FIELDS = (
    ("messageId", "message_id"),
    ("userId", "user_id"),
    ("anonymousId", "anonymous_id"),
    ("event", "event_name"),
)
# Redshift's advice for COPY: files of 1 MB to 1 GB (compressed), a multiple of the slices.
MIN_PART_BYTES = 1024 * 1024
MAX_PART_BYTES = 1024 * 1024 * 1024
SLICES_SQL = "SELECT COUNT(*) FROM stv_slices"
# Seconds a loader's statement may take (``statement_timeout=`` in the URL).
DEFAULT_STATEMENT_TIMEOUT = 1800
# How far back (by received_at, before the hour loaded) a load looks for a message id already in
# the table. The table is sorted by received_at, so the bound prunes its blocks: without it every
# load would read every id ever loaded (random ids defeat zone maps on message_id).
DEFAULT_DEDUP_LOOKBACK_DAYS = 7
# Serverless has no STV/STL tables and no fixed slices: parts per load unless ``parts=`` says.
SERVERLESS_PARTS = 8
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,126}")
# COPY's IAM_ROLE: ``default`` (the role set as the cluster's or namespace's default), one role
# ARN, or up to 10 chained ARNs separated by commas (each role assumes the next).
_ROLE_ARN = r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=.@/-]{1,512}"
_IAM_ROLE = re.compile(rf"default|{_ROLE_ARN}(?:,{_ROLE_ARN}){{0,9}}")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d")

SQL_TYPES = {
    KIND_BOOLEAN: "BOOLEAN",
    KIND_INTEGER: "BIGINT",
    KIND_NUMBER: "DOUBLE PRECISION",
    KIND_STRING: "VARCHAR(65535)",
}
_KIND_OF_TYPE = {
    "boolean": KIND_BOOLEAN,
    "bigint": KIND_INTEGER,
    "double precision": KIND_NUMBER,
    "character varying": KIND_STRING,
    "text": KIND_STRING,
}

# Staged columns, in the order of the staging table and the JSONPaths file.
STAGED_COLUMNS = (
    ("message_id", "VARCHAR(256) NOT NULL"),
    ("user_id", "VARCHAR(256)"),
    ("anonymous_id", "VARCHAR(256)"),
    ("event_name", "VARCHAR(256)"),
    ("event_timestamp", "TIMESTAMPTZ"),
    ("sent_at", "TIMESTAMPTZ"),
    ("received_at", "TIMESTAMPTZ NOT NULL"),
    ("properties", "VARCHAR(65535)"),
    ("context", "VARCHAR(65535)"),
    ("_source_key", "VARCHAR(1024) NOT NULL"),
    ("_line", "INTEGER NOT NULL"),
)

LEDGER_DDL = (
    'CREATE SCHEMA IF NOT EXISTS "clickstream"',
    f"CREATE TABLE IF NOT EXISTS {LEDGER} ("
    "stream VARCHAR(128) NOT NULL, hour TIMESTAMPTZ NOT NULL, load_id VARCHAR(64) NOT NULL, "
    "fingerprint VARCHAR(64) NOT NULL, files VARCHAR(65535) NOT NULL, "
    "records_read BIGINT NOT NULL, rows_loaded BIGINT NOT NULL, duplicates BIGINT NOT NULL, "
    "quarantined BIGINT NOT NULL, new_columns VARCHAR(65535) NOT NULL, run_id VARCHAR(64), "
    "loaded_at TIMESTAMPTZ NOT NULL DEFAULT GETDATE(), seconds DOUBLE PRECISION, "
    "files_read BIGINT, bytes_read BIGINT, PRIMARY KEY (stream, hour)) "
    "DISTSTYLE AUTO SORTKEY (stream, hour)",
    f"CREATE TABLE IF NOT EXISTS {LEDGER_FILES} ("
    "stream VARCHAR(128) NOT NULL, hour TIMESTAMPTZ NOT NULL, load_id VARCHAR(64) NOT NULL, "
    "key VARCHAR(1024) NOT NULL, etag VARCHAR(128) NOT NULL, size BIGINT NOT NULL) "
    "DISTSTYLE AUTO SORTKEY (stream, hour)",
)
# Columns added to the ledger after its first release; Redshift has no ADD COLUMN IF NOT EXISTS,
# so a ledger created before gets the missing ones after a look at the catalog.
LEDGER_ADDED_COLUMNS = (
    ("seconds", "DOUBLE PRECISION"),
    ("files_read", "BIGINT"),
    ("bytes_read", "BIGINT"),
)
LEDGER_COLUMNS_SQL = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = 'clickstream' AND table_name = 'load_ledger'"
)


def ident(name: str) -> str:
    """Quote an identifier that has already passed a naming rule (no quotes can occur)."""
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a safe identifier: {name!r}")
    return f'"{name}"'


def literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def table_name(stream: Stream) -> str:
    return f"{ident(stream.customer)}.{ident(stream.event)}"


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RedshiftConfig:
    """A ``redshift://`` URL: ``redshift://user[:password]@host[:5439]/db?iam_role=arn...``.

    Without a password, temporary credentials come from IAM: ``cluster_id=`` (provisioned,
    ``redshift:GetClusterCredentials``) or ``workgroup=`` (Serverless, ``GetCredentials``).
    ``parts=`` sets the number of staged parts (default: the cluster's slice count, so every
    slice loads one part); ``keep_staged=true`` keeps staged files after a committed load.
    """

    host: str
    port: int
    database: str
    user: str
    password: str | None
    iam_role: str
    cluster_id: str | None = None
    workgroup: str | None = None
    region: str | None = None
    # The bucket's region when it is not the cluster's (COPY ... REGION); None: the same.
    bucket_region: str | None = None
    parts: int | None = None  # None: one part per slice of the cluster
    keep_staged: bool = False
    sslmode: str = "require"
    # Redshift has no lock_timeout: a statement that waits or runs longer than this (a LOCK
    # behind a long query, a COPY that hangs) is cancelled, and the load retried.
    statement_timeout: int = DEFAULT_STATEMENT_TIMEOUT
    # 0: look through all history.
    dedup_lookback_days: int = DEFAULT_DEDUP_LOOKBACK_DAYS

    @property
    def serverless(self) -> bool:
        """A Serverless workgroup (``workgroup=``, or a ``*.redshift-serverless.*`` host)."""
        return self.workgroup is not None or ".redshift-serverless." in self.host

    @classmethod
    def from_url(cls, url: str, default_iam_role: str | None = None) -> RedshiftConfig:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.scheme != "redshift" or not parts.hostname or not parts.path.strip("/"):
            raise ClickstreamError(
                "invalid Redshift URL: expected redshift://user[:password]@host[:port]/database"
            )
        if not parts.username:
            raise ClickstreamError("invalid Redshift URL: a user name is required")
        role = query.get("iam_role") or default_iam_role
        if not role or not _IAM_ROLE.fullmatch(role):
            raise ClickstreamError(
                "Redshift needs an IAM role for COPY: add ?iam_role=arn:aws:iam::<account>:role/"
                "<name> (or default, or chained ARNs separated by commas) to the URL or set "
                "CLICKSTREAM_REDSHIFT_IAM_ROLE"
            )
        bucket_region = query.get("bucket_region")
        if bucket_region is not None and not _REGION.fullmatch(bucket_region):
            raise ClickstreamError(
                f"invalid Redshift URL: bucket_region {bucket_region!r} is not an AWS region "
                "(e.g. us-west-2)"
            )
        password = unquote(parts.password) if parts.password else None
        if password is None and not (query.get("cluster_id") or query.get("workgroup")):
            raise ClickstreamError(
                "invalid Redshift URL: give a password, or cluster_id= / workgroup= for IAM "
                "credentials"
            )
        try:
            part_count = int(query["parts"]) if "parts" in query else None
            port = parts.port or 5439
            timeout = int(query.get("statement_timeout", DEFAULT_STATEMENT_TIMEOUT))
            lookback = int(query.get("dedup_lookback_days", DEFAULT_DEDUP_LOOKBACK_DAYS))
        except ValueError:
            raise ClickstreamError(
                "invalid Redshift URL: port, parts, statement_timeout and dedup_lookback_days "
                "must be whole numbers"
            ) from None
        if timeout < 1:
            raise ClickstreamError("invalid Redshift URL: statement_timeout must be >= 1 second")
        if lookback < 0:
            raise ClickstreamError(
                "invalid Redshift URL: dedup_lookback_days must be >= 0 (0: all history)"
            )
        if part_count is not None and not 1 <= part_count <= 1024:
            raise ClickstreamError("invalid Redshift URL: parts must be between 1 and 1024")
        return cls(
            host=parts.hostname,
            port=port,
            database=parts.path.strip("/"),
            user=unquote(parts.username),
            password=password,
            iam_role=role,
            cluster_id=query.get("cluster_id"),
            workgroup=query.get("workgroup"),
            region=query.get("region"),
            bucket_region=bucket_region,
            parts=part_count,
            keep_staged=query.get("keep_staged", "false").lower() in ("1", "true", "yes"),
            sslmode=query.get("sslmode", "require"),
            statement_timeout=timeout,
            dedup_lookback_days=lookback,
        )


class IamCredentials:
    """Temporary database credentials from IAM (provisioned cluster or Serverless workgroup),
    kept until shortly before they expire: one boto3 client, made once (boto3's default session
    is not thread-safe; a client is), one credentials call per 15 minutes, not per connection."""

    # GetClusterCredentials' shortest lifetime: 900 s. A new pair is asked for with a minute left.
    DURATION_SECONDS = 900
    RENEW_BEFORE = timedelta(seconds=60)

    def __init__(self, config: RedshiftConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._client: Any = None
        self._issued: tuple[str, str, datetime] | None = None

    def get(self) -> tuple[str, str]:
        """(user, password), valid for at least another minute."""
        with self._lock:
            now = datetime.now(UTC)
            if self._issued is None or self._issued[2] - self.RENEW_BEFORE <= now:
                self._issued = self._fetch(now)
            user, password, _ = self._issued
            return user, password

    def _fetch(self, now: datetime) -> tuple[str, str, datetime]:
        import boto3

        config = self.config
        if config.workgroup:
            if self._client is None:
                self._client = boto3.client("redshift-serverless", region_name=config.region)
            answer = self._client.get_credentials(
                workgroupName=config.workgroup,
                dbName=config.database,
                durationSeconds=self.DURATION_SECONDS,
            )
            return answer["dbUser"], answer["dbPassword"], _expiry(answer.get("expiration"), now)
        if self._client is None:
            self._client = boto3.client("redshift", region_name=config.region)
        issued = self._client.get_cluster_credentials(
            DbUser=config.user,
            DbName=config.database,
            ClusterIdentifier=config.cluster_id or "",
            DurationSeconds=self.DURATION_SECONDS,
            AutoCreate=False,
        )
        return issued["DbUser"], issued["DbPassword"], _expiry(issued.get("Expiration"), now)


def _expiry(expiration: datetime | None, now: datetime) -> datetime:
    """When issued credentials expire (the duration asked for if the answer does not say)."""
    if expiration is None:
        return now + timedelta(seconds=IamCredentials.DURATION_SECONDS)
    return expiration if expiration.tzinfo else expiration.replace(tzinfo=UTC)


def connect_redshift(config: RedshiftConfig, credentials: IamCredentials | None = None) -> Any:
    """A psycopg2 connection to Redshift, with IAM credentials when no password is given."""
    user, password = config.user, config.password
    if password is None:
        user, password = (credentials or IamCredentials(config)).get()
    return psycopg2.connect(
        host=config.host,
        port=config.port,
        dbname=config.database,
        user=user,
        password=password,
        sslmode=config.sslmode,
        application_name="clickstream",
        connect_timeout=30,
    )


# --- SQL ------------------------------------------------------------------------------------


def create_table_sql(stream: Stream) -> list[str]:
    """Schema and table DDL: sort key ``received_at``; DISTKEY ``message_id`` keeps the
    dedup anti-join against the table collocated and spreads rows evenly (ids are random)."""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {ident(stream.customer)}",
        f"CREATE TABLE IF NOT EXISTS {table_name(stream)} ("
        "message_id VARCHAR(256) NOT NULL, user_id VARCHAR(256), anonymous_id VARCHAR(256), "
        "event_name VARCHAR(256), event_timestamp TIMESTAMPTZ, sent_at TIMESTAMPTZ, "
        "received_at TIMESTAMPTZ NOT NULL, properties SUPER, context SUPER, "
        "_hour TIMESTAMPTZ NOT NULL, _source_key VARCHAR(1024) NOT NULL, "
        "_loaded_at TIMESTAMPTZ NOT NULL DEFAULT GETDATE()) "
        "DISTKEY (message_id) SORTKEY (received_at)",
    ]


def add_column_sql(stream: Stream, column: str, kind: str) -> str:
    """One new property column per statement (Redshift adds one column per ALTER TABLE)."""
    return f"ALTER TABLE {table_name(stream)} ADD COLUMN {ident(column)} {SQL_TYPES[kind]}"


def staging_sql(columns: list[tuple[str, str]]) -> str:
    definitions = [f"{ident(name)} {sql_type}" for name, sql_type in STAGED_COLUMNS]
    definitions += [f"{ident(column)} {SQL_TYPES[kind]}" for column, kind in columns]
    return f"CREATE TEMP TABLE {STAGING} ({', '.join(definitions)}) DISTKEY (message_id)"


def copy_sql(
    columns: list[tuple[str, str]],
    manifest_url: str,
    jsonpaths_url: str,
    iam_role: str,
    bucket_region: str | None = None,
) -> str:
    names = [name for name, _ in STAGED_COLUMNS] + [column for column, _ in columns]
    role = "default" if iam_role == "default" else literal(iam_role)  # a keyword, not a string
    region = f" REGION {literal(bucket_region)}" if bucket_region else ""
    return (
        f"COPY {STAGING} ({', '.join(ident(n) for n in names)}) "
        f"FROM {literal(manifest_url)} IAM_ROLE {role}{region} MANIFEST GZIP "
        f"FORMAT AS JSON {literal(jsonpaths_url)} TIMEFORMAT 'auto' STATUPDATE OFF COMPUPDATE OFF"
    )


def insert_sql(stream: Stream, columns: list[tuple[str, str]], lookback: bool = True) -> str:
    """Insert the first copy (by source key, line) of each message not already in the table:
    among its rows received since ``%(since)s`` with ``lookback``, else among all of them."""
    flat = [ident(column) for column, _ in columns]
    targets = [ident(c) for c in LOADED_COLUMNS] + flat
    values = [
        "s.message_id",
        "s.user_id",
        "s.anonymous_id",
        "s.event_name",
        "s.event_timestamp",
        "s.sent_at",
        "s.received_at",
        "JSON_PARSE(s.properties)",
        "JSON_PARSE(s.context)",
        "%(hour)s",
        "s._source_key",
    ] + [f"s.{name}" for name in flat]
    return (
        f"INSERT INTO {table_name(stream)} ({', '.join(targets)}) "
        f"SELECT {', '.join(values)} FROM ("
        f"SELECT *, ROW_NUMBER() OVER (PARTITION BY message_id ORDER BY _source_key, _line) "
        f"AS _copy FROM {STAGING}) s "
        f"WHERE s._copy = 1 AND NOT EXISTS ("
        f"SELECT 1 FROM {table_name(stream)} t WHERE t.message_id = s.message_id"
        + (" AND t.received_at >= %(since)s)" if lookback else ")")
    )


def load_statements(
    stream: Stream,
    columns: list[tuple[str, str]],
    manifest_url: str,
    jsonpaths_url: str,
    iam_role: str,
    lookback: bool = True,
    bucket_region: str | None = None,
) -> dict[str, str]:
    """Every statement of the load transaction, by step (params: ``hour``, ``stream``, ...)."""
    return {
        "lock": f"LOCK {table_name(stream)}",
        "loaded": LOADED_SQL,
        "staging": staging_sql(columns),
        "copy": copy_sql(columns, manifest_url, jsonpaths_url, iam_role, bucket_region),
        "counts": f"SELECT COUNT(*) FROM {STAGING}",
        "delete": f"DELETE FROM {table_name(stream)} WHERE _hour = %(hour)s",
        "insert": insert_sql(stream, columns, lookback),
        "lock_ledger": f"LOCK {LEDGER}, {LEDGER_FILES}",
        "forget": f"DELETE FROM {LEDGER} WHERE stream = %(stream)s AND hour = %(hour)s",
        "forget_files": (
            f"DELETE FROM {LEDGER_FILES} WHERE stream = %(stream)s AND hour = %(hour)s"
        ),
        "record": (
            f"INSERT INTO {LEDGER} (stream, hour, load_id, fingerprint, files, records_read, "
            "rows_loaded, duplicates, quarantined, new_columns, run_id, seconds, files_read, "
            "bytes_read) VALUES (%(stream)s, %(hour)s, %(load_id)s, %(fingerprint)s, %(files)s, "
            "%(records_read)s, %(rows_loaded)s, %(duplicates)s, %(quarantined)s, "
            "%(new_columns)s, %(run_id)s, %(seconds)s, %(files_read)s, %(bytes_read)s)"
        ),
    }


# What a loader that lost a race to create the same schema, table or column sees (PostgreSQL
# may also report the race as a unique violation in its catalog).
_DDL_RACES = (
    psycopg2.errors.DuplicateSchema,
    psycopg2.errors.DuplicateTable,
    psycopg2.errors.DuplicateObject,
    psycopg2.errors.DuplicateColumn,
    psycopg2.errors.UniqueViolation,
)
DDL_ATTEMPTS = 3
CONFLICT = "1023"  # Redshift's primary message for a transaction aborted by a conflict


def _despite_ddl_races(
    conn: Any, action: Callable[[], T], races: tuple[type[psycopg2.Error], ...]
) -> T:
    """Run DDL that a loader in another process may run at the same moment: the one that loses
    the race rolls back and runs ``action`` again, which then finds the objects there."""
    for attempt in range(1, DDL_ATTEMPTS + 1):
        try:
            return action()
        except races:
            conn.rollback()
            if attempt == DDL_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def conflict_detail(error: psycopg2.Error) -> str | None:
    """The DETAIL of Redshift's ERROR 1023 (it names the table), or None for other errors."""
    diag = getattr(error, "diag", None)
    if error.pgcode != "XX000" or diag is None or diag.message_primary != CONFLICT:
        return None
    return (diag.message_detail or "").strip() or "no detail"


def ledger_files_sql(rows: int) -> str:
    """One INSERT of ``rows`` rows of a load's files (params: six a row, flat)."""
    values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * rows)
    return f"INSERT INTO {LEDGER_FILES} (stream, hour, load_id, key, etag, size) VALUES {values}"


LOAD_ERRORS_SQL = (
    "SELECT file_name, line_number, column_name, error_message FROM sys_load_error_detail "
    "WHERE query_id = pg_last_copy_id() ORDER BY line_number LIMIT 5"
)
# On Serverless, the SYS view's query_id is not pg_last_copy_id(): the errors of this session
# (each load has a session of its own), newest first.
SERVERLESS_LOAD_ERRORS_SQL = (
    "SELECT file_name, line_number, column_name, error_message FROM sys_load_error_detail "
    "WHERE session_id = pg_backend_pid() ORDER BY start_time DESC, line_number LIMIT 5"
)
LOAD_ERRORS_FALLBACK_SQL = (
    "SELECT filename, line_number, colname, err_reason FROM stl_load_errors "
    "WHERE query = pg_last_copy_id() ORDER BY line_number LIMIT 5"
)


# --- staging --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedLoad:
    """The staged files of one load attempt."""

    load_id: str
    prefix: str
    parts: tuple[tuple[str, int], ...]  # (key, bytes)
    manifest_key: str
    jsonpaths_key: str


def part_count(staged_bytes: int, slices: int) -> int:
    """How many parts to stage: one per slice when parts would be >= 1 MB; more when parts
    would exceed 1 GB (sizes are of uncompressed data, an upper bound of the gzip parts)."""
    wanted = min(slices, math.ceil(staged_bytes / MIN_PART_BYTES))
    over_limit = math.ceil(staged_bytes / MAX_PART_BYTES)
    if over_limit > wanted:
        # Keep a multiple of the slice count so every slice gets the same share.
        wanted = math.ceil(over_limit / slices) * slices
    return max(1, wanted)


def staged_prefix(stream: Stream, hour: datetime, load_id: str) -> str:
    return f"staged/{stream.key}/{hour:%Y-%m-%dT%H}/{load_id}/"


def staged_row(
    record: dict[str, Any],
    valid: ValidRecord,
    source_key: str,
    columns: list[tuple[str, str, str]],
) -> dict[str, Any]:
    """One staged JSON object: base columns, JSON text for SUPER, typed property columns."""
    properties = record.get("properties")
    context = record.get("context")
    row: dict[str, Any] = {
        "message_id": valid.message_id,
        "user_id": _text(record.get("userId")),
        "anonymous_id": _text(record.get("anonymousId")),
        "event_name": _text(record.get("event")),
        "event_timestamp": _timestamp(valid.event_timestamp),
        "sent_at": _timestamp(valid.sent_at),
        "received_at": _timestamp(valid.received_at),
        "properties": dump_json(properties).decode() if isinstance(properties, dict) else None,
        "context": dump_json(context).decode() if isinstance(context, dict) else None,
        "_source_key": source_key,
        "_line": valid.line,
    }
    props = properties if isinstance(properties, dict) else {}
    for prop, column, kind in columns:
        value = props.get(prop)
        row[column] = value if _fits(value, kind) else None
    return row


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return dump_json(value).decode()


def _timestamp(text: str | None) -> str | None:
    """Normalised ISO-8601 (``+00:00``, microseconds), the form TIMEFORMAT 'auto' reads."""
    return None if text is None else timestamp_value(text).isoformat()


def _fits(value: object, kind: str) -> bool:
    """The rule every dialect shares, and VARCHAR's bytes."""
    if kind == KIND_STRING:
        return type(value) is str and len(value.encode()) <= MAX_VARCHAR_BYTES
    return COLUMN_HOLDS[kind](value)


def jsonpaths(columns: list[tuple[str, str]]) -> bytes:
    names = [name for name, _ in STAGED_COLUMNS] + [column for column, _ in columns]
    return orjson.dumps({"jsonpaths": [f"$['{name}']" for name in names]})


def manifest(bucket: str, parts: Iterable[tuple[str, int]]) -> bytes:
    return orjson.dumps(
        {
            "entries": [
                {"url": f"s3://{bucket}/{key}", "mandatory": True, "meta": {"content_length": size}}
                for key, size in parts
            ]
        }
    )


# --- the warehouse -------------------------------------------------------------------------


class RedshiftWarehouse:
    """Loads partitions into Redshift tables ``<customer>.<event>`` through staged S3 files."""

    def __init__(
        self,
        config: RedshiftConfig,
        client: S3Client,
        bucket: str,
        connect: Callable[[RedshiftConfig], Any] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.bucket = bucket
        self.credentials = IamCredentials(config)
        self._connect = connect or (lambda cfg: connect_redshift(cfg, self.credentials))
        self._ready: set[str] = set()
        self._slices = 1
        self._stream_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._ledger_lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A session with the loader's statement timeout set."""
        with open_connection(lambda: self._connect(self.config)) as conn:
            with conn.cursor() as cur:
                cur.execute(f"SET statement_timeout TO {self.config.statement_timeout * 1000}")
            conn.commit()
            yield conn

    def _stream_lock(self, stream: Stream) -> threading.Lock:
        """One lock a stream within this process: its loads change its columns one at a time."""
        with self._locks_guard:
            return self._stream_locks.setdefault(stream.key, threading.Lock())

    def _ddl(self, conn: Any, key: str, statements: Iterable[str]) -> None:
        """Run idempotent DDL once per warehouse object, committed. A loader in another process
        that creates the same objects at once makes one of the two fail; that one rolls back
        and runs the DDL again, which then finds them there."""
        if key in self._ready:
            return

        def run() -> None:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
            conn.commit()

        _despite_ddl_races(conn, run, _DDL_RACES)
        self._ready.add(key)

    def _ensure_ledger(self, conn: Any) -> None:
        """Create the ledger, or add the columns an older ledger lacks (once per object: the
        other threads of a batch wait for the first)."""
        if "ledger" in self._ready:
            return
        with self._ledger_lock:
            self._ensure_ledger_once(conn)

    def _ensure_ledger_once(self, conn: Any) -> None:
        if "ledger" in self._ready:
            return
        self._ddl(conn, "ledger-table", LEDGER_DDL)
        with conn.cursor() as cur:
            cur.execute(LEDGER_COLUMNS_SQL)
            present = {str(row[0]) for row in cur.fetchall()}
        conn.rollback()
        for column, column_type in LEDGER_ADDED_COLUMNS:
            if column in present:
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute(f"LOCK {LEDGER}")
                    cur.execute(f"ALTER TABLE {LEDGER} ADD COLUMN {column} {column_type}")
                conn.commit()
            except psycopg2.errors.DuplicateColumn:
                conn.rollback()  # another loader added it first
        self._ready.add("ledger")

    def ledger(
        self, streams: Iterable[Stream] | None = None, since: datetime | None = None
    ) -> dict[tuple[str, datetime], LedgerEntry]:
        query = (
            "SELECT stream, hour, fingerprint, records_read, rows_loaded, duplicates, "
            f"quarantined, loaded_at FROM {LEDGER} WHERE 1 = 1"
        )
        params: list[Any] = []
        if streams is not None:
            # IN () is not SQL: an empty list matches a stream no name can have.
            keys = tuple(s.key for s in streams) or ("",)
            query += " AND stream IN %s"
            params.append(keys)
        if since is not None:
            query += " AND hour >= %s"
            params.append(since)
        with self.connection() as conn:
            self._ensure_ledger(conn)
            with conn.cursor() as cur:
                cur.execute(query, params)
                rows = cur.fetchall()
        return {(row[0], row[1]): LedgerEntry(*row) for row in rows}

    def rejection(self, record: ValidRecord) -> str | None:
        for field, column in ID_FIELDS:
            value = record.doc.get(field)
            # Four bytes a character at most: a short string cannot be too long.
            if value is None or (isinstance(value, str) and len(value) <= MAX_ID_BYTES // 4):
                continue
            size = len((_text(value) or "").encode())
            if size > MAX_ID_BYTES:
                # Cutting an id would merge distinct messages or users: the record waits in
                # quarantine instead, and the rest of its hour loads.
                return (
                    f"{field} is {size} bytes of UTF-8, more than the {MAX_ID_BYTES} of "
                    f"Redshift's {column} VARCHAR({MAX_ID_BYTES})"
                )
        if len(record.raw) <= MAX_VARCHAR_BYTES:
            return None  # no part of the record can be larger than the record
        for name in ("properties", "context"):
            value = record.doc.get(name)
            if isinstance(value, dict) and len(dump_json(value)) > MAX_VARCHAR_BYTES:
                return (
                    f"{name} larger than {MAX_VARCHAR_BYTES} bytes, the most Redshift can stage "
                    "as VARCHAR before JSON_PARSE"
                )
        return None

    def row_counts(self, streams: Iterable[Stream]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self.connection() as conn, conn.cursor() as cur:
            for stream in streams:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.tables "
                    "WHERE table_schema = %s AND table_name = %s",
                    (stream.customer, stream.event),
                )
                row = cur.fetchone()
                if not row or not row[0]:
                    counts[stream.key] = 0
                    continue
                cur.execute(f"SELECT COUNT(*) FROM {table_name(stream)}")
                counted = cur.fetchone()
                counts[stream.key] = int(counted[0]) if counted else 0
        return counts

    def load_partition(
        self,
        load: PartitionLoad,
        records: Iterable[tuple[str, ValidRecord]],
        stats: ReadStats,
    ) -> LoadResult:
        try:
            return self._load(load, records, stats)
        except psycopg2.Error as error:
            detail = conflict_detail(error)
            if detail is None:
                raise
            raise WriteConflict(
                f"Redshift aborted the load of {load.stream} {load.hour:%Y-%m-%d %H}:00 for a "
                f"concurrent transaction (ERROR 1023: {detail})"
            ) from None

    def _load(
        self,
        load: PartitionLoad,
        records: Iterable[tuple[str, ValidRecord]],
        stats: ReadStats,
    ) -> LoadResult:
        stream = load.stream
        with self.connection() as conn:
            self._ensure_ledger(conn)
            if self._loaded(conn, load):
                return LoadResult(skipped=True)
            with tempfile.TemporaryFile() as spool:
                _spool(records, spool)
                with self._stream_lock(stream):
                    self._ddl(conn, f"table:{stream}", create_table_sql(stream))
                    columns, new_columns = self._ensure_columns(conn, stream, stats)
                self._count_slices(conn)
                staged = self._stage(load, spool, columns)
            try:
                result = self._merge(conn, load, staged, columns, stats, new_columns)
            finally:
                if not self.config.keep_staged:
                    self._remove(staged)
        result.new_columns = new_columns
        return result

    def _loaded(self, conn: Any, load: PartitionLoad) -> bool:
        """Whether the ledger holds this load's fingerprint (a read that ends its transaction,
        so no snapshot outlives it)."""
        with conn.cursor() as cur:
            cur.execute(LOADED_SQL, {"stream": load.stream.key, "hour": load.hour})
            row = cur.fetchone()
        conn.rollback()
        return row is not None and row[0] == load.fingerprint

    def _count_slices(self, conn: Any) -> None:
        """The cluster's slice count, once per object (unless ``parts=`` sets the parts)."""
        if self.config.parts is not None or "slices" in self._ready:
            return
        if self.config.serverless:
            self._slices = SERVERLESS_PARTS
            self._ready.add("slices")
            return
        with conn.cursor() as cur:
            cur.execute(SLICES_SQL)
            row = cur.fetchone()
        conn.rollback()
        self._slices = max(1, int(row[0])) if row else 1
        self._ready.add("slices")

    def _ensure_columns(
        self, conn: Any, stream: Stream, stats: ReadStats
    ) -> tuple[list[tuple[str, str, str]], list[str]]:
        """The property columns to stage (prop, column, kind), adding new ones one by one, each
        in a transaction that locks the table first. A column another process adds at the same
        moment makes this one's ALTER fail: it rolls back and reads the catalog again."""
        added: list[str] = []

        def add() -> list[tuple[str, str, str]]:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = %s",
                    (stream.customer, stream.event),
                )
                columns = PropertyColumns(dict(cur.fetchall()), _KIND_OF_TYPE)
            conn.rollback()
            for column, kind in columns.add(stats.property_kinds):
                with conn.cursor() as cur:
                    cur.execute(f"LOCK {table_name(stream)}")
                    cur.execute(add_column_sql(stream, column, kind))
                conn.commit()
                added.append(column)
            return columns.by_column()

        return _despite_ddl_races(conn, add, (psycopg2.errors.DuplicateColumn,)), added

    def _stage(
        self, load: PartitionLoad, spool: IO[bytes], columns: list[tuple[str, str, str]]
    ) -> StagedLoad:
        """Write the spooled records as similar-size gzip parts, a manifest and JSONPaths."""
        load_id = f"{load.fingerprint[:16]}-{uuid.uuid4().hex[:8]}"
        prefix = staged_prefix(load.stream, load.hour, load_id)
        size = spool.seek(0, 2)
        count = part_count(size, self.config.parts or self._slices)
        spool.seek(0)
        files = [tempfile.TemporaryFile() for _ in range(count)]
        try:
            writers = [gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6) for f in files]
            for index, (source_key, valid, record) in enumerate(_unspool(spool)):
                row = staged_row(record, valid, source_key, columns)
                writers[index % count].write(orjson.dumps(row) + b"\n")
            parts = []
            for number, (writer, handle) in enumerate(zip(writers, files, strict=True)):
                writer.close()
                part_size = handle.tell()
                handle.seek(0)
                key = f"{prefix}part-{number:04d}.json.gz"
                self.client.upload_fileobj(handle, self.bucket, key)
                parts.append((key, part_size))
        finally:
            for handle in files:
                handle.close()
        column_kinds = [(column, kind) for _, column, kind in columns]
        manifest_key, jsonpaths_key = f"{prefix}manifest.json", f"{prefix}jsonpaths.json"
        self.client.put_object(
            Bucket=self.bucket, Key=manifest_key, Body=manifest(self.bucket, parts)
        )
        self.client.put_object(Bucket=self.bucket, Key=jsonpaths_key, Body=jsonpaths(column_kinds))
        return StagedLoad(load_id, prefix, tuple(parts), manifest_key, jsonpaths_key)

    def _merge(
        self,
        conn: Any,
        load: PartitionLoad,
        staged: StagedLoad,
        columns: list[tuple[str, str, str]],
        stats: ReadStats,
        new_columns: list[str],
    ) -> LoadResult:
        """The load transaction."""
        column_kinds = [(column, kind) for _, column, kind in columns]
        sql = load_statements(
            load.stream,
            column_kinds,
            f"s3://{self.bucket}/{staged.manifest_key}",
            f"s3://{self.bucket}/{staged.jsonpaths_key}",
            self.config.iam_role,
            lookback=self.config.dedup_lookback_days > 0,
            bucket_region=self.config.bucket_region,
        )
        params: dict[str, Any] = {
            "stream": load.stream.key,
            "hour": load.hour,
            # A literal in the statement (psycopg2 interpolates it), so the sort key prunes.
            "since": load.hour - timedelta(days=self.config.dedup_lookback_days),
        }
        result = LoadResult()
        # 1. The staged files into the session's temporary table: no lock held through COPY.
        with conn.cursor() as cur:
            cur.execute(sql["staging"])
            try:
                cur.execute(sql["copy"])
            except psycopg2.Error as error:
                if conflict_detail(error) is not None:
                    raise
                conn.rollback()
                raise ClickstreamError(
                    f"COPY of {load.stream} {load.hour:%Y-%m-%d %H}:00 failed: "
                    f"{first_line(error)}{self._load_errors(conn)}"
                ) from None
            cur.execute(sql["counts"])
            (staged_rows,) = cur.fetchone() or (0,)
        conn.commit()
        # 2. The hour's rows, in a transaction that takes its snapshot after the table's lock.
        with conn.cursor() as cur:
            cur.execute(sql["lock"])
            cur.execute(sql["loaded"], params)
            row = cur.fetchone()
            if row is not None and row[0] == load.fingerprint:
                conn.rollback()  # loaded by another run while this one waited for the lock
                return LoadResult(skipped=True)
            cur.execute(sql["delete"], params)
            result.rows_replaced = cur.rowcount
            cur.execute(sql["insert"], params)
            result.rows_loaded = cur.rowcount
            result.staged = staged_rows
            result.duplicates = staged_rows - result.rows_loaded
        conn.commit()
        # 3. The partition's ledger row, in a transaction of its own that locks the ledger first.
        with conn.cursor() as cur:
            cur.execute(sql["lock_ledger"])
            cur.execute(sql["forget"], params)
            cur.execute(sql["forget_files"], params)
            for start in range(0, len(load.files), LEDGER_FILE_ROWS):
                chunk = load.files[start : start + LEDGER_FILE_ROWS]
                cur.execute(
                    ledger_files_sql(len(chunk)),
                    [
                        value
                        for file in chunk
                        for value in (
                            load.stream.key, load.hour, staged.load_id, file.key, file.etag,
                            file.size,
                        )
                    ],
                )  # fmt: skip
            seconds, files_read, bytes_read = load.ledger_figures()
            cur.execute(
                sql["record"],
                {
                    **params,
                    "load_id": staged.load_id,
                    "fingerprint": load.fingerprint,
                    # The files themselves are rows of LEDGER_FILES.
                    "files": orjson.dumps(
                        {"count": len(load.files), "in": "clickstream.load_ledger_files"}
                    ).decode(),
                    "records_read": stats.records_read,
                    "rows_loaded": result.rows_loaded,
                    "duplicates": result.duplicates,
                    "quarantined": stats.quarantined,
                    "new_columns": orjson.dumps(new_columns).decode(),
                    "run_id": load.run_id,
                    "seconds": seconds,
                    "files_read": files_read,
                    "bytes_read": bytes_read,
                },
            )
        conn.commit()
        return result

    def _load_errors(self, conn: Any) -> str:
        """The first rows of Redshift's load errors for the last COPY, as one line."""
        queries = (
            (SERVERLESS_LOAD_ERRORS_SQL,)
            if self.config.serverless
            else (LOAD_ERRORS_SQL, LOAD_ERRORS_FALLBACK_SQL)
        )
        for query in queries:
            try:
                with conn.cursor() as cur:
                    cur.execute(query)
                    rows = cur.fetchall()
            except psycopg2.Error:
                conn.rollback()
                continue
            if rows:
                details = "; ".join(
                    f"{name.strip()} line {line} column {column.strip()}: {message.strip()}"
                    for name, line, column, message in rows
                )
                return f" ({details})"
        return ""

    def _remove(self, staged: StagedLoad) -> None:
        keys = [key for key, _ in staged.parts] + [staged.manifest_key, staged.jsonpaths_key]
        self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
        )


def _spool(records: Iterable[tuple[str, ValidRecord]], spool: IO[bytes]) -> None:
    """Write the partition's records to local disk (first pass: property kinds are counted)."""
    for source_key, valid in records:
        header = orjson.dumps(
            [
                source_key,
                valid.message_id,
                valid.line,
                valid.received_at,
                valid.event_timestamp,
                valid.sent_at,
            ]
        )
        spool.write(header + b"\t" + valid.raw + b"\n")


def _unspool(spool: IO[bytes]) -> Iterator[tuple[str, ValidRecord, dict[str, Any]]]:
    for line in spool:
        header, _, raw = line.rstrip(b"\n").partition(b"\t")
        source_key, message_id, number, received, timestamp, sent = orjson.loads(header)
        record = parse_json(raw) if raw else {}
        document = record if isinstance(record, dict) else {}
        yield (
            source_key,
            ValidRecord(
                message_id=message_id,
                received_at=received,
                event_timestamp=timestamp,
                sent_at=sent,
                line=number,
                raw=raw,
                doc=document,
            ),
            document,
        )
