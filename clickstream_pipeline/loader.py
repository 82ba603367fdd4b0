"""Load one (stream, hour): list its files, stream and validate them, quarantine bad records,
and hand the good ones to the warehouse, which replaces the partition in one transaction."""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import psycopg2
from botocore.exceptions import BotoCoreError, ClientError

from clickstream_pipeline.errors import ServiceUnavailable, WriteConflict, first_line
from clickstream_pipeline.layout import hour_prefix, parse_raw_key, quarantine_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.records import (
    BadRecord,
    ReadStats,
    ValidRecord,
    quarantine_line,
    read_records,
)
from clickstream_pipeline.warehouse.base import PartitionLoad, SourceFile, Warehouse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")

# Quarantine lines are kept in memory up to this size per file, then spill to disk.
_QUARANTINE_SPOOL_BYTES = 8 * 1024 * 1024


@dataclass
class LoadOutcome:
    """Everything one partition load did, for metadata, summaries and the ledger."""

    stream: Stream
    hour: datetime
    files: tuple[SourceFile, ...]
    fingerprint: str
    records_read: int = 0
    quarantined: int = 0
    rows_loaded: int = 0
    rows_replaced: int = 0
    duplicates: int = 0  # records not loaded: messageId already seen in the partition or loaded
    new_columns: list[str] = field(default_factory=list)
    quarantine_keys: list[str] = field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class RawStore:
    """Where raw files live: a client, a bucket and the raw prefix."""

    client: S3Client
    bucket: str
    raw_prefix: str

    def list_partition(self, stream: Stream, hour: datetime) -> tuple[SourceFile, ...]:
        """The partition's raw files (keys outside the layout are ignored), sorted by key."""
        prefix = hour_prefix(self.raw_prefix, stream, hour)
        paginator = self.client.get_paginator("list_objects_v2")
        files = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if parse_raw_key(self.raw_prefix, obj["Key"]) is not None:
                    files.append(SourceFile(obj["Key"], obj["ETag"].strip('"'), obj["Size"]))
        return tuple(sorted(files))


def fingerprint(files: tuple[SourceFile, ...] | list[SourceFile]) -> str:
    """Identifies a partition's file set: any added, removed or rewritten file changes it."""
    digest = hashlib.sha256()
    for source in sorted(files):
        digest.update(f"{source.key}\t{source.etag}\n".encode())
    return digest.hexdigest()[:32]


def load_partition(
    store: RawStore,
    warehouse: Warehouse,
    stream: Stream,
    hour: datetime,
    files: tuple[SourceFile, ...] | None = None,
    run_id: str | None = None,
) -> LoadOutcome:
    """Load one partition exactly once: re-running it with the same files changes nothing."""
    began = time.perf_counter()
    if files is None:
        files = store.list_partition(stream, hour)
    load = PartitionLoad(stream, hour, files, fingerprint(files), run_id)
    outcome = LoadOutcome(stream, hour, files, load.fingerprint)
    stats = ReadStats()
    records = _valid_records(store, warehouse, load, stats, outcome)
    result = warehouse.load_partition(load, records, stats)
    outcome.skipped = result.skipped
    if not result.skipped:
        outcome.records_read = stats.records_read
        outcome.quarantined = stats.quarantined
        outcome.rows_loaded = result.rows_loaded
        outcome.rows_replaced = result.rows_replaced
        outcome.duplicates = result.duplicates
        outcome.new_columns = result.new_columns
    outcome.seconds = time.perf_counter() - began
    return outcome


def _valid_records(
    store: RawStore,
    warehouse: Warehouse,
    load: PartitionLoad,
    stats: ReadStats,
    outcome: LoadOutcome,
) -> Iterator[tuple[str, ValidRecord]]:
    """Stream every file of the partition, yielding good records and quarantining bad ones
    (invalid, or valid but beyond what the warehouse can store)."""
    for source in load.files:
        # IfMatch: a file rewritten since it was listed fails the load (and its retry re-lists)
        # instead of loading content the ledger would not describe.
        body = store.client.get_object(Bucket=store.bucket, Key=source.key, IfMatch=source.etag)
        with tempfile.SpooledTemporaryFile(_QUARANTINE_SPOOL_BYTES) as spool:
            bad = 0
            for record in read_records(body["Body"], source.compressed, stats):
                if not isinstance(record, BadRecord):
                    reason = warehouse.rejection(record)
                    if reason is not None:
                        record = BadRecord(record.line, reason, record.raw)
                if isinstance(record, BadRecord):
                    spool.write(quarantine_line(source.key, record) + b"\n")
                    bad += 1
                    continue
                stats.records_read += 1
                yield source.key, record
            stats.records_read += bad
            stats.quarantined += bad
            if bad:
                key = quarantine_key(load.stream, load.hour, source.name)
                spool.seek(0)
                store.client.upload_fileobj(spool, store.bucket, key)
                outcome.quarantine_keys.append(key)


# Errors worth retrying: the network, S3 throttling or 5xx, a warehouse connection drop, a file
# rewritten between listing and reading, a transaction aborted for a concurrent one's sake.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ServiceUnavailable,
    WriteConflict,
    BotoCoreError,
    ClientError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.errors.SerializationFailure,
    psycopg2.errors.DeadlockDetected,
)


def with_retries(
    action: Callable[[], T],
    attempts: int = 4,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    describe: str = "",
) -> T:
    """Run ``action``, retrying transient errors with exponential backoff and full jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except TRANSIENT_ERRORS as error:
            if attempt == attempts:
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            log.warning(
                "%s failed (attempt %d of %d), retrying in %.1f s: %s",
                describe or "step", attempt, attempts, delay, first_line(error),
            )  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")
