"""Shard leases, planned batches and checkpoints in PostgreSQL: one row per shard.

A worker owns a shard while its lease is unexpired. Every takeover increments the shard's lease
counter, and every write a worker makes (plan, commit, renew) names the counter it holds: a
worker that lost its lease (paused past expiry, partitioned away) has its writes refused
(``LeaseLost``) and stops, so two workers never commit the same shard. Time is the database's
(``now()``), not the workers' clocks.

The exactly-once protocol per batch: ``plan`` (its last sequence number and object keys) ->
upload -> ``commit`` (checkpoint = last, plan cleared). A worker that takes over a shard with a
plan replays exactly that batch: the same records, so the same objects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extras

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.warehouse.base import first_line

SCHEMA = "clickstream"

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.vortex_shards (
    stream          text        NOT NULL,
    shard_id        text        NOT NULL,
    parents         text[]      NOT NULL DEFAULT '{{}}',
    ending_sequence text,
    owner           text,
    lease_counter   bigint      NOT NULL DEFAULT 0,
    lease_expires   timestamptz,
    checkpoint      text,
    planned_last    text,
    planned_keys    jsonb,
    finished        boolean     NOT NULL DEFAULT false,
    records_in      bigint      NOT NULL DEFAULT 0,
    bytes_in        bigint      NOT NULL DEFAULT 0,
    records_out     bigint      NOT NULL DEFAULT 0,
    bytes_out       bigint      NOT NULL DEFAULT 0,
    files           bigint      NOT NULL DEFAULT 0,
    duplicates      bigint      NOT NULL DEFAULT 0,
    errors          bigint      NOT NULL DEFAULT 0,
    millis_behind   bigint,
    committed_at    timestamptz,
    read_error      text,
    failing_since   timestamptz,
    PRIMARY KEY (stream, shard_id)
);
-- Tables made before a shard's read errors were recorded.
ALTER TABLE {SCHEMA}.vortex_shards ADD COLUMN IF NOT EXISTS read_error text,
    ADD COLUMN IF NOT EXISTS failing_since timestamptz;
CREATE TABLE IF NOT EXISTS {SCHEMA}.vortex_workers (
    stream   text        NOT NULL,
    owner    text        NOT NULL,
    expires  timestamptz NOT NULL,
    PRIMARY KEY (stream, owner)
);
"""

# A shard a worker may read: not read to its end, and every parent read to its end (a parent
# no longer listed, past the stream's retention, counts as read).
_READABLE = f"""
    NOT s.finished AND NOT EXISTS (
        SELECT 1 FROM {SCHEMA}.vortex_shards p
        WHERE p.stream = s.stream AND p.shard_id = ANY(s.parents) AND NOT p.finished)
"""


class LeaseLost(ClickstreamError):
    """This worker no longer holds the shard's lease: another worker took it over."""


@dataclass(frozen=True)
class ShardInfo:
    """A shard as ListShards describes it."""

    shard_id: str
    parents: tuple[str, ...] = ()
    ending_sequence: str | None = None


@dataclass(frozen=True)
class Lease:
    """A shard this worker holds, under ``counter``, and where reading resumes."""

    stream: str
    shard_id: str
    owner: str
    counter: int
    checkpoint: str | None
    planned_last: str | None
    planned_keys: tuple[str, ...] | None
    ending_sequence: str | None


@dataclass(frozen=True)
class BatchCounts:
    """What one committed batch read and wrote."""

    records_in: int = 0
    bytes_in: int = 0
    records_out: int = 0
    bytes_out: int = 0
    files: int = 0
    duplicates: int = 0
    errors: int = 0


class LeaseStore:
    """The lease table of one PostgreSQL database (``CLICKSTREAM_VORTEX_URL``).

    One connection, autocommit, shared by a worker's threads one statement group at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg2.connect(self.url, application_name="clickstream-vortex")
            except psycopg2.OperationalError as error:
                raise ClickstreamError(
                    f"cannot connect to the vortex database: {first_line(error)}"
                ) from None
            self._conn.autocommit = True
        return self._conn

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                    yield cur
            except psycopg2.OperationalError as error:
                conn.close()  # a broken connection is replaced on the next call
                raise ClickstreamError(
                    f"lost the vortex database connection: {first_line(error)}"
                ) from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def ensure_schema(self) -> None:
        """Create the tables on first use. Once they exist nothing is created, so a worker's
        database user needs the CREATE privilege only for the first start."""
        with self._cursor() as cur:
            cur.execute(
                """SELECT to_regclass(%s) IS NOT NULL AND EXISTS (
                    SELECT 1 FROM information_schema.columns
                    WHERE table_schema = %s AND table_name = 'vortex_shards'
                      AND column_name = 'failing_since') AS ready""",
                (f"{SCHEMA}.vortex_workers", SCHEMA),
            )
            if cur.fetchone()["ready"]:
                return
            cur.execute("SELECT pg_advisory_lock(hashtextextended('clickstream.vortex', 0))")
            try:
                cur.execute(_DDL)
            finally:
                cur.execute("SELECT pg_advisory_unlock(hashtextextended('clickstream.vortex', 0))")

    def sync_shards(self, stream: str, shards: Sequence[ShardInfo]) -> None:
        """Record the stream's shards: new ones, and closed ones' ending sequence numbers. A
        recorded shard no longer listed has aged out of the stream's retention: nothing is
        left to read, so it counts as finished (its children may start)."""
        if not shards:
            return
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards SET finished = true, owner = NULL,
                    lease_expires = NULL
                WHERE stream = %s AND NOT finished AND NOT (shard_id = ANY(%s))""",
                (stream, [s.shard_id for s in shards]),
            )
            psycopg2.extras.execute_values(
                cur,
                f"""INSERT INTO {SCHEMA}.vortex_shards (stream, shard_id, parents, ending_sequence)
                VALUES %s ON CONFLICT (stream, shard_id) DO UPDATE
                SET ending_sequence = EXCLUDED.ending_sequence
                WHERE {SCHEMA}.vortex_shards.ending_sequence IS DISTINCT FROM
                      EXCLUDED.ending_sequence""",
                [(stream, s.shard_id, list(s.parents), s.ending_sequence) for s in shards],
            )

    def heartbeat(self, stream: str, owner: str, lease_seconds: float) -> int:
        """Say this worker is alive; the number of live workers of the stream."""
        with self._cursor() as cur:
            cur.execute(
                f"""INSERT INTO {SCHEMA}.vortex_workers (stream, owner, expires)
                VALUES (%s, %s, now() + make_interval(secs => %s))
                ON CONFLICT (stream, owner) DO UPDATE SET expires = EXCLUDED.expires""",
                (stream, owner, lease_seconds),
            )
            cur.execute(
                f"""DELETE FROM {SCHEMA}.vortex_workers
                WHERE stream = %s AND expires < now() - interval '1 hour'""",
                (stream,),
            )
            cur.execute(
                f"""SELECT count(*) AS n FROM {SCHEMA}.vortex_workers
                WHERE stream = %s AND expires > now()""",
                (stream,),
            )
            return int(cur.fetchone()["n"])

    def leave(self, stream: str, owner: str) -> None:
        """This worker stops: its shards are free at once, not after their leases expire."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards SET owner = NULL, lease_expires = NULL
                WHERE stream = %s AND owner = %s""",
                (stream, owner),
            )
            cur.execute(
                f"DELETE FROM {SCHEMA}.vortex_workers WHERE stream = %s AND owner = %s",
                (stream, owner),
            )

    def fair_share(self, stream: str, workers: int) -> int:
        """How many readable shards each of ``workers`` live workers should hold."""
        with self._cursor() as cur:
            cur.execute(
                f"SELECT count(*) AS n FROM {SCHEMA}.vortex_shards s WHERE s.stream = %s AND "
                + _READABLE,
                (stream,),
            )
            readable = int(cur.fetchone()["n"])
        return -(-readable // max(workers, 1))

    def unread_elsewhere(self, stream: str, owner: str) -> int:
        """Readable shards this worker does not hold (free, or held by another worker)."""
        with self._cursor() as cur:
            cur.execute(
                f"SELECT count(*) AS n FROM {SCHEMA}.vortex_shards s WHERE s.stream = %s"
                " AND s.owner IS DISTINCT FROM %s AND " + _READABLE,
                (stream, owner),
            )
            return int(cur.fetchone()["n"])

    def acquire(self, stream: str, owner: str, lease_seconds: float, limit: int) -> list[Lease]:
        """Take up to ``limit`` readable shards that no live worker holds (free, or their lease
        expired): each takeover increments the shard's lease counter."""
        if limit <= 0:
            return []
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards t
                SET owner = %(owner)s, lease_counter = t.lease_counter + 1,
                    lease_expires = now() + make_interval(secs => %(seconds)s)
                WHERE (t.stream, t.shard_id) IN (
                    SELECT s.stream, s.shard_id FROM {SCHEMA}.vortex_shards s
                    WHERE s.stream = %(stream)s
                      AND (s.owner IS NULL OR s.lease_expires < now())
                      AND {_READABLE}
                    ORDER BY s.shard_id
                    LIMIT %(limit)s
                    FOR UPDATE SKIP LOCKED)
                RETURNING t.*""",
                {"owner": owner, "seconds": lease_seconds, "stream": stream, "limit": limit},
            )
            return [_lease(row) for row in cur.fetchall()]

    def renew(self, lease: Lease, lease_seconds: float, millis_behind: int | None) -> None:
        """Extend the lease; LeaseLost if another worker took the shard."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards
                SET lease_expires = now() + make_interval(secs => %s),
                    millis_behind = coalesce(%s, millis_behind)
                WHERE stream = %s AND shard_id = %s AND owner = %s AND lease_counter = %s""",
                (
                    lease_seconds,
                    millis_behind,
                    lease.stream,
                    lease.shard_id,
                    lease.owner,
                    lease.counter,
                ),
            )
            _require_lease(cur, lease)

    def plan(self, lease: Lease, last: str, keys: Sequence[str]) -> None:
        """Record the batch about to be uploaded (it ends at ``last``), before any upload."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards SET planned_last = %s, planned_keys = %s
                WHERE stream = %s AND shard_id = %s AND owner = %s AND lease_counter = %s""",
                (
                    last,
                    psycopg2.extras.Json(list(keys)),
                    lease.stream,
                    lease.shard_id,
                    lease.owner,
                    lease.counter,
                ),
            )
            _require_lease(cur, lease)

    def commit(
        self,
        lease: Lease,
        checkpoint: str,
        counts: BatchCounts,
        millis_behind: int | None = None,
        finished: bool = False,
    ) -> None:
        """The planned batch is uploaded: move the checkpoint to ``checkpoint``, clear the plan,
        add the batch's counts. With ``finished`` the shard has been read to its end."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards
                SET checkpoint = %(checkpoint)s, planned_last = NULL, planned_keys = NULL,
                    finished = %(finished)s, committed_at = now(),
                    millis_behind = coalesce(%(behind)s, millis_behind),
                    records_in = records_in + %(records_in)s, bytes_in = bytes_in + %(bytes_in)s,
                    records_out = records_out + %(records_out)s,
                    bytes_out = bytes_out + %(bytes_out)s, files = files + %(files)s,
                    duplicates = duplicates + %(duplicates)s, errors = errors + %(errors)s
                WHERE stream = %(stream)s AND shard_id = %(shard)s AND owner = %(owner)s
                  AND lease_counter = %(counter)s""",
                {
                    "checkpoint": checkpoint,
                    "finished": finished,
                    "behind": millis_behind,
                    **counts.__dict__,
                    "stream": lease.stream,
                    "shard": lease.shard_id,
                    "owner": lease.owner,
                    "counter": lease.counter,
                },
            )
            _require_lease(cur, lease)

    def finish(self, lease: Lease) -> None:
        """The shard was read to its end with nothing left to write."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards SET finished = true, owner = NULL,
                    lease_expires = NULL, millis_behind = 0
                WHERE stream = %s AND shard_id = %s AND owner = %s AND lease_counter = %s""",
                (lease.stream, lease.shard_id, lease.owner, lease.counter),
            )
            _require_lease(cur, lease)

    def release(self, lease: Lease) -> None:
        """Give the shard up (for another worker's fair share); nothing is refused."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards SET owner = NULL, lease_expires = NULL
                WHERE stream = %s AND shard_id = %s AND owner = %s AND lease_counter = %s""",
                (lease.stream, lease.shard_id, lease.owner, lease.counter),
            )

    def report_reads(self, stream: str, shard_id: str, error: str | None) -> None:
        """Record that the shard's reads are failing with ``error`` (since when, the first time),
        or, with None, that they work again."""
        with self._cursor() as cur:
            cur.execute(
                f"""UPDATE {SCHEMA}.vortex_shards SET read_error = %(error)s,
                    failing_since = CASE WHEN %(error)s::text IS NULL THEN NULL
                                         ELSE coalesce(failing_since, now()) END
                WHERE stream = %(stream)s AND shard_id = %(shard)s""",
                {"error": error, "stream": stream, "shard": shard_id},
            )

    def shards(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Every shard row (of ``stream``), with ``lease_live``, ``committed_age`` and
        ``failing_seconds`` (how long its reads have failed; None while they work)."""
        with self._cursor() as cur:
            cur.execute("SELECT to_regclass(%s) AS t", (f"{SCHEMA}.vortex_shards",))
            if cur.fetchone()["t"] is None:
                return []
            cur.execute(
                f"""SELECT *, coalesce(lease_expires > now(), false) AS lease_live,
                    extract(epoch FROM now() - committed_at)::float AS committed_age,
                    extract(epoch FROM now() - failing_since)::float AS failing_seconds
                FROM {SCHEMA}.vortex_shards WHERE %(stream)s::text IS NULL OR stream = %(stream)s
                ORDER BY stream, shard_id""",
                {"stream": stream},
            )
            return [dict(row) for row in cur.fetchall()]


def _lease(row: dict[str, Any]) -> Lease:
    keys = row["planned_keys"]
    return Lease(
        stream=row["stream"],
        shard_id=row["shard_id"],
        owner=row["owner"],
        counter=int(row["lease_counter"]),
        checkpoint=row["checkpoint"],
        planned_last=row["planned_last"],
        planned_keys=tuple(keys) if keys is not None else None,
        ending_sequence=row["ending_sequence"],
    )


def _require_lease(cur: Any, lease: Lease) -> None:
    if cur.rowcount != 1:
        raise LeaseLost(
            f"shard {lease.shard_id} of stream {lease.stream!r}: lease {lease.counter} of "
            f"{lease.owner} was taken over by another worker"
        )
