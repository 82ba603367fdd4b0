"""The warehouse seam: what every dialect (PostgreSQL, Redshift) provides to the loader."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg2

from clickstream_pipeline.errors import ServiceUnavailable, first_line
from clickstream_pipeline.names import Stream
from clickstream_pipeline.records import (
    KIND_BOOLEAN,
    KIND_INTEGER,
    KIND_NUMBER,
    KIND_STRING,
    ReadStats,
    ValidRecord,
)

# The columns every event table has (the design card's contract), in table order.
BASE_COLUMNS = (
    "message_id",
    "user_id",
    "anonymous_id",
    "event_name",
    "event_timestamp",
    "sent_at",
    "received_at",
    "properties",
    "context",
    "_hour",
    "_source_key",
    "_loaded_at",
)
# Every PostgreSQL table has these system columns (Redshift keeps the same names): a property
# of one of these names stays in ``properties``, since ADD COLUMN would fail every load.
SYSTEM_COLUMNS = frozenset({"oid", "tableoid", "xmin", "xmax", "cmin", "cmax", "ctid"})
# The columns a load writes (``_loaded_at`` is the table's default).
LOADED_COLUMNS = tuple(column for column in BASE_COLUMNS if column != "_loaded_at")
# A table keeps at most this many flattened property columns; the rest stay in ``properties``.
MAX_PROPERTY_COLUMNS = 400
_COLUMN_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
# Tie-break order when a property held several kinds: the most general kind wins.
_KIND_ORDER = (KIND_STRING, KIND_NUMBER, KIND_INTEGER, KIND_BOOLEAN)

# Which values a flattened column holds, the same in every dialect: a value of the column's
# kind that its type stores exactly. Any other value is NULL there and stays in ``properties``.
# - BIGINT: integers of 64 bits.
# - DOUBLE PRECISION: numbers of magnitude 0 or 1e-300 to 2**53. A double holds every integer up
#   to 2**53 and rounds those beyond, so two distinct ids there would read the same; and past
#   2**53 a double is itself an integer, so no rule on values (all a column added later has: a
#   jsonb number keeps no spelling) could keep ``1e20`` and drop ``100000000000000000001``.
# - text: strings (a dialect may bound their length: Redshift's VARCHAR counts bytes).
SMALLEST_NUMBER, LARGEST_NUMBER = 1e-300, 2**53


def holds_boolean(value: object) -> bool:
    return type(value) is bool


def holds_integer(value: object) -> bool:
    return type(value) is int and -(2**63) <= value < 2**63


def holds_number(value: object) -> bool:
    # A Decimal is a number beyond double's range (records.parse_json): it never fits.
    if type(value) is not int and type(value) is not float:
        return False
    return value == 0 or SMALLEST_NUMBER <= abs(value) <= LARGEST_NUMBER


def holds_string(value: object) -> bool:
    return type(value) is str


COLUMN_HOLDS: dict[str, Callable[[object], bool]] = {
    KIND_BOOLEAN: holds_boolean,
    KIND_INTEGER: holds_integer,
    KIND_NUMBER: holds_number,
    KIND_STRING: holds_string,
}


@dataclass(frozen=True, order=True)
class SourceFile:
    """A raw file as listed in S3: the ETag identifies its content."""

    key: str
    etag: str
    size: int

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def compressed(self) -> bool:
        return self.key.endswith(".gz")


@dataclass(frozen=True)
class PartitionLoad:
    """What one load of a (stream, hour) is about: its files and their fingerprint."""

    stream: Stream
    hour: datetime
    files: tuple[SourceFile, ...]
    fingerprint: str
    run_id: str | None = None
    # When the load began (perf_counter): the ledger records the seconds up to its commit.
    began: float = field(default_factory=time.perf_counter, compare=False)

    def ledger_figures(self) -> tuple[float, int, int]:
        """The ledger's ``seconds``, ``files_read`` and ``bytes_read`` for this load."""
        return time.perf_counter() - self.began, len(self.files), sum(f.size for f in self.files)


@dataclass
class LoadResult:
    """What the warehouse did with one partition."""

    staged: int = 0
    rows_loaded: int = 0
    rows_replaced: int = 0
    duplicates: int = 0  # staged records not loaded: messageId seen in this load, or loaded before
    new_columns: list[str] = field(default_factory=list)
    skipped: bool = False


@dataclass(frozen=True)
class LedgerEntry:
    """The ledger's record of the last committed load of a (stream, hour)."""

    stream: str
    hour: datetime
    fingerprint: str
    records_read: int
    rows_loaded: int
    duplicates: int
    quarantined: int
    loaded_at: datetime


# Upper bounds (seconds) of the load duration histogram's buckets; +Inf is implied.
LOAD_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class StreamTotals:
    """What the ledger says about one stream, over every loaded hour (hours loaded before the
    ledger had ``seconds``, ``files_read`` and ``bytes_read`` count as 0 files and bytes and are
    left out of the duration figures)."""

    stream: str
    partitions: int
    records_read: int
    rows_loaded: int
    duplicates: int
    quarantined: int
    newest_hour: datetime
    files_read: int = 0
    bytes_read: int = 0
    timed: int = 0  # hours whose load duration is known
    seconds: float = 0.0  # their load seconds, summed
    seconds_buckets: tuple[int, ...] = ()  # cumulative counts per LOAD_SECONDS_BUCKETS bound


# The ledger, summed per stream; the same text on PostgreSQL and Redshift.
STREAM_TOTALS_SQL = (
    "SELECT stream, COUNT(*), SUM(records_read), SUM(rows_loaded), SUM(duplicates), "
    "SUM(quarantined), MAX(hour), COALESCE(SUM(files_read), 0), COALESCE(SUM(bytes_read), 0), "
    "COUNT(seconds), COALESCE(SUM(seconds), 0), "
    + ", ".join(
        f"SUM(CASE WHEN seconds <= {bound:g} THEN 1 ELSE 0 END)" for bound in LOAD_SECONDS_BUCKETS
    )
    + " FROM clickstream.load_ledger GROUP BY stream ORDER BY stream"
)
# The load seconds of each stream's most recent hours (newest first); the same text on both.
RECENT_SECONDS_SQL = (
    "SELECT stream, seconds FROM (SELECT stream, seconds, ROW_NUMBER() OVER "
    "(PARTITION BY stream ORDER BY hour DESC) AS recent FROM clickstream.load_ledger "
    "WHERE stream IN %s AND seconds IS NOT NULL) r WHERE recent <= %s"
)


def stream_totals(warehouse: Warehouse) -> list[StreamTotals]:
    """Per-stream totals from the ledger (computed in the warehouse, one row per stream)."""
    warehouse.ledger([])  # creates the ledger if this warehouse has none yet
    with warehouse.connection() as conn, conn.cursor() as cur:
        cur.execute(STREAM_TOTALS_SQL)
        rows = cur.fetchall()
    return [
        StreamTotals(
            stream=row[0],
            partitions=int(row[1]),
            records_read=int(row[2]),
            rows_loaded=int(row[3]),
            duplicates=int(row[4]),
            quarantined=int(row[5]),
            newest_hour=row[6],
            files_read=int(row[7]),
            bytes_read=int(row[8]),
            timed=int(row[9]),
            seconds=float(row[10]),
            seconds_buckets=tuple(int(count or 0) for count in row[11:]),
        )
        for row in rows
    ]


def recent_load_seconds(
    warehouse: Warehouse, streams: Iterable[str], hours: int = 24
) -> dict[str, list[float]]:
    """The load seconds of each stream's ``hours`` most recently loaded hours (if known)."""
    keys = tuple(sorted(set(streams)))
    if not keys:
        return {}
    warehouse.ledger([])
    with warehouse.connection() as conn, conn.cursor() as cur:
        cur.execute(RECENT_SECONDS_SQL, (keys, hours))
        rows = cur.fetchall()
    seconds: dict[str, list[float]] = {}
    for stream, value in rows:
        seconds.setdefault(stream, []).append(float(value))
    return seconds


# A table's rows are the sum of its hours' rows in the ledger (a load replaces its hour's rows
# and records how many it wrote): no scan of the table. The same text on both warehouses.
TABLE_ROWS_SQL = (
    "SELECT COALESCE(SUM(rows_loaded), 0) FROM clickstream.load_ledger WHERE stream = %s"
)
TABLE_COLUMNS_SQL = (
    "SELECT column_name, data_type FROM information_schema.columns "
    "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position"
)


def table_facts(
    warehouse: Warehouse, stream: Stream, schema: bool = False
) -> tuple[int, list[tuple[str, str]]]:
    """The table's row count (from the ledger) and, if ``schema``, its columns and types."""
    with warehouse.connection() as conn, conn.cursor() as cur:
        cur.execute(TABLE_ROWS_SQL, (stream.key,))
        row = cur.fetchone()
        columns: list[tuple[str, str]] = []
        if schema:
            cur.execute(TABLE_COLUMNS_SQL, (stream.customer, stream.event))
            columns = [(str(name), str(kind)) for name, kind in cur.fetchall()]
    return int(row[0]) if row else 0, columns


class Warehouse(Protocol):
    """A warehouse dialect. Every load replaces one (stream, hour) in one transaction."""

    def ledger(
        self, streams: Iterable[Stream] | None = None, since: datetime | None = None
    ) -> dict[tuple[str, datetime], LedgerEntry]:
        """The ledger entries of ``streams`` (all if None) for hours at or after ``since``."""
        ...

    def load_partition(
        self,
        load: PartitionLoad,
        records: Iterable[tuple[str, ValidRecord]],
        stats: ReadStats,
    ) -> LoadResult:
        """Load ``records`` (source key, record) as the whole content of ``load``'s partition.

        ``stats`` is filled while ``records`` is consumed (property kinds, quarantine count) and
        is read afterwards. A load whose fingerprint the ledger already holds changes nothing and
        returns ``skipped``.
        """
        ...

    def row_counts(self, streams: Iterable[Stream]) -> dict[str, int]:
        """Rows per stream table (0 for tables that do not exist)."""
        ...

    def rejection(self, record: ValidRecord) -> str | None:
        """Why this warehouse cannot store a valid record (it is quarantined), or None."""
        ...

    def connection(self) -> contextlib.AbstractContextManager[Any]:
        """A DB-API connection (ServiceUnavailable when refused), closed afterwards."""
        ...


@contextlib.contextmanager
def open_connection(connect: Callable[[], Any]) -> Iterator[Any]:
    """A DB-API connection, closed afterwards; a refused connection is ServiceUnavailable
    (retried with backoff by the loader) with the driver's first line, never the URL."""
    try:
        conn = connect()
    except psycopg2.OperationalError as error:
        raise ServiceUnavailable(f"cannot connect to the warehouse: {first_line(error)}") from None
    try:
        yield conn
    finally:
        conn.close()


def snake_case(name: str) -> str:
    """``productId`` -> ``product_id``; ``HTTPStatus`` -> ``http_status``; ``a b`` -> ``a_b``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", spaced)
    return re.sub(r"[^a-z0-9]+", "_", spaced.lower()).strip("_")


def property_columns(property_kinds: Mapping[str, Mapping[str, int]]) -> dict[str, tuple[str, str]]:
    """Map flattenable property names to ``(column, kind)``.

    A property becomes a column when its snake_case name is a valid identifier that is not a
    base or system column; when several properties share a column name, the first in sorted
    order wins and the others stay in ``properties`` only.
    """
    columns: dict[str, tuple[str, str]] = {}
    taken: set[str] = set(BASE_COLUMNS) | SYSTEM_COLUMNS
    for name in sorted(property_kinds):
        column = snake_case(name)
        if not _COLUMN_RE.fullmatch(column) or column in taken:
            continue
        taken.add(column)
        columns[name] = (column, column_kind(property_kinds[name]))
    return columns


class PropertyColumns:
    """A table's flattened property columns, each property decided once.

    A property gets its column, and the column its kind, the first time ``add`` sees it: an
    existing column keeps its type (when ``kind_of_type`` reads it back as a kind; otherwise the
    property stays in ``properties`` only), and a new one is added while the table has fewer than
    ``MAX_PROPERTY_COLUMNS``. Both dialects decide through it; they differ only in their types.
    """

    def __init__(self, existing: Mapping[str, str], kind_of_type: Mapping[str, str]) -> None:
        self.existing = dict(existing)  # column -> the dialect's data type
        self.chosen: dict[str, tuple[str, str]] = {}  # property -> (column, kind)
        self._kind_of_type = kind_of_type
        self._decided: set[str] = set()
        self._taken: set[str] = set()
        self._count = len(set(existing) - set(BASE_COLUMNS))

    def add(self, property_kinds: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str]]:
        """Decide the properties not seen before; return the columns to add, by name."""
        new = {name: kinds for name, kinds in property_kinds.items() if name not in self._decided}
        self._decided.update(new)
        added: list[tuple[str, str]] = []
        for prop, (column, kind) in sorted(
            property_columns(new).items(), key=lambda item: item[1][0]
        ):
            if column in self._taken:
                continue
            if column in self.existing:
                existing_kind = self._kind_of_type.get(self.existing[column])
                if existing_kind is not None:
                    self.chosen[prop] = (column, existing_kind)
                    self._taken.add(column)
                continue
            if self._count >= MAX_PROPERTY_COLUMNS:
                continue
            self._count += 1
            self.chosen[prop] = (column, kind)
            self._taken.add(column)
            added.append((column, kind))
        return added

    def by_column(self) -> list[tuple[str, str, str]]:
        """The chosen ``(property, column, kind)``s in column order."""
        return sorted(
            ((prop, column, kind) for prop, (column, kind) in self.chosen.items()),
            key=lambda item: item[1],
        )


def column_kind(counts: Mapping[str, int]) -> str:
    """The kind of a new column: integers and numbers together are numbers; otherwise the most
    frequent kind (ties go to the more general kind). Other values stay in ``properties``."""
    if set(counts) == {KIND_INTEGER, KIND_NUMBER}:
        return KIND_NUMBER
    return max(_KIND_ORDER, key=lambda kind: (counts.get(kind, 0), -_KIND_ORDER.index(kind)))
