"""The microbatcher: read a Kinesis stream's shards, write raw files to S3, exactly once.

One ``Vortex`` per process. Its main loop keeps the worker's heartbeat, records the stream's
shards, takes its fair share of the free ones (a child only after its parents were read to
their end) and renews their leases; one ``ShardReader`` thread per held shard reads, batches
and writes (``files.render`` -> plan -> upload -> commit, see ``leases``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError

from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError, first_line
from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.vortex.files import (
    ERRORS_PREFIX,
    Batch,
    RenderedBatch,
    StreamRecord,
    render,
)
from clickstream_pipeline.vortex.kinesis import kinesis_client, list_shards
from clickstream_pipeline.vortex.leases import BatchCounts, Lease, LeaseLost, LeaseStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("clickstream.vortex")

# Kinesis allows five GetRecords calls a second per shard: an empty shard is asked once a second.
IDLE_POLL_SECONDS = 1.0
# Errors worth waiting out (Kinesis and S3 throttling, a server's bad moment); after this many
# in a row the reader gives its shard up and the main loop takes it again later.
MAX_CONSECUTIVE_ERRORS = 8
# Ticks (a third of a lease each: 10 s by default) in a row that may fail before the worker
# gives up: a minute of Kinesis or database trouble is waited out. The same rule holds for one
# shard whose reads keep failing (a server error on every GetRecords): with --until-idle the
# worker then stops with the error; as a service it keeps backing off, and the shard's error
# shows in /metrics and `clickstream health` until its reads work again.
MAX_TICK_FAILURES = 6
# Attempts botocore makes per Kinesis call before the error reaches vortex's own backoff (the
# reader's, and the tick's), so a failing shard is seen within a tick, not minutes later.
KINESIS_ATTEMPTS = 3
_THROTTLED = {"ProvisionedThroughputExceededException", "LimitExceededException", "SlowDown"}


def default_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class VortexConfig:
    """What to read, where to write, and when a batch is cut."""

    stream: str
    bucket: str
    raw_prefix: str = "raw"
    errors_prefix: str = ERRORS_PREFIX
    # A batch is written when it holds this many bytes of record data or records, when its first
    # record waited this long (below the loader's 5-minute grace, so an hour's files are in S3
    # before the hour loads), or when records of a new arrival hour come.
    max_bytes: int = 16 * 1024 * 1024
    max_records: int = 50_000
    max_delay_seconds: float = 60.0
    lease_seconds: float = 30.0
    # At most this many shards per worker (memory is the flush limits times the shards held):
    # with most workers gone, the rest do not take every shard. None: a fair share, uncapped.
    max_shards: int | None = None
    get_records_limit: int = 10_000
    upload_threads: int = 8

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_records < 1 or self.max_delay_seconds <= 0:
            raise ClickstreamError("flush limits must be positive")
        if self.lease_seconds < 3:
            raise ClickstreamError("the lease must last at least 3 seconds")
        if self.max_shards is not None and self.max_shards < 1:
            raise ClickstreamError("--max-shards must be at least 1")


@dataclass
class Totals:
    """What this worker wrote (committed batches only)."""

    records_in: int = 0
    records_out: int = 0
    files: int = 0
    bytes_out: int = 0
    duplicates: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, counts: BatchCounts) -> None:
        with self._lock:
            self.records_in += counts.records_in
            self.records_out += counts.records_out
            self.files += counts.files
            self.bytes_out += counts.bytes_out
            self.duplicates += counts.duplicates
            self.errors += counts.errors


class ShardFailing(ClickstreamError):
    """A shard's reads kept failing for MAX_TICK_FAILURES ticks (with --until-idle)."""


class ShardReader(threading.Thread):
    """Reads one held shard from its checkpoint and writes its batches."""

    def __init__(self, vortex: Vortex, lease: Lease) -> None:
        super().__init__(name=f"vortex-{lease.shard_id}", daemon=True)
        self.vortex = vortex
        self.lease = lease
        self.config = vortex.config
        self.batch = Batch(lease.shard_id)
        self.millis_behind: int | None = None
        self.last_records_at = time.monotonic()
        # The last GetRecords returned nothing: the reader is at the shard's tip. Until then a
        # slow call (10,000 records can take seconds) must not look like an idle stream.
        self.caught_up = False
        self.error: BaseException | None = None
        # Why the last GetRecords failed; None once one succeeds.
        self.read_error: str | None = None
        self.finished = False
        self._stop_requested = threading.Event()
        self._release_requested = threading.Event()
        # The batch a previous holder planned: replayed exactly, to the same objects.
        self._replay_last = int(lease.planned_last) if lease.planned_last is not None else None
        self._last_read = lease.checkpoint

    def stop(self) -> None:
        """Write what is batched, then end."""
        self._stop_requested.set()

    def release(self) -> None:
        """Write what is batched, give the shard up, then end (another worker's fair share)."""
        self._release_requested.set()

    def run(self) -> None:
        try:
            self._read()
        except LeaseLost as error:
            log.warning("%s", error)
            self.error = error
        except Exception as error:
            self.error = error

    def _iterator(self) -> str:
        kinesis = self.vortex.kinesis
        request: dict[str, Any] = {"StreamName": self.config.stream, "ShardId": self.lease.shard_id}
        if self._last_read is None:
            request["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            request["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            request["StartingSequenceNumber"] = self._last_read
        return str(kinesis.get_shard_iterator(**request)["ShardIterator"])

    def _read(self) -> None:
        iterator: str | None = self._iterator()
        errors = 0
        while iterator is not None:
            if self._stop_requested.is_set() or self._release_requested.is_set():
                # A planned batch not yet replayed stays planned: the next holder replays it.
                if self._replay_last is None:
                    self._flush()
                if self._release_requested.is_set():
                    self.vortex.store.release(self.lease)
                return
            try:
                response = self.vortex.kinesis.get_records(
                    ShardIterator=iterator, Limit=self.config.get_records_limit
                )
                errors = 0
                self.read_error = None
            except ClientError as error:
                code = error.response["Error"]["Code"]
                errors += 1
                self.read_error = first_line(error)
                if errors > MAX_CONSECUTIVE_ERRORS:
                    raise
                if code == "ExpiredIteratorException":
                    iterator = self._iterator()  # resume after the last record read
                    continue
                if (
                    code in _THROTTLED
                    or error.response["ResponseMetadata"].get("HTTPStatusCode", 0) >= 500
                ):
                    time.sleep(min(2**errors * 0.1, 5.0))
                    continue
                raise
            records = response.get("Records", [])
            for raw in records:
                self._add(
                    StreamRecord(
                        raw["SequenceNumber"],
                        raw["Data"],
                        raw["ApproximateArrivalTimestamp"].astimezone(UTC),
                    )
                )
            if records:
                self._last_read = records[-1]["SequenceNumber"]
            self.millis_behind = response.get("MillisBehindLatest")
            iterator = response.get("NextShardIterator")
            if iterator is None:
                break  # a closed shard, read to its end
            now = time.monotonic()
            if records:
                self.last_records_at = now
            self.caught_up = not records
            quiet = now - self.last_records_at
            if (
                self._replay_last is None
                and self.batch
                and (
                    self.batch.age() >= self.config.max_delay_seconds
                    or (self.vortex.until_idle is not None and quiet >= self.vortex.until_idle)
                )
            ):
                self._flush()
            if not records:
                self._stop_requested.wait(IDLE_POLL_SECONDS)
        # The shard's end: write the rest, then mark it read so its children may start.
        self._flush()
        self.vortex.store.finish(self.lease)
        self.finished = True

    def _add(self, record: StreamRecord) -> None:
        if self._replay_last is not None:
            self.batch.add(record)
            if int(record.sequence) >= self._replay_last:
                self._flush()  # the planned batch is complete: write exactly it
            return
        if self.batch and hour_floor(record.arrival) != self.batch.arrival_hour:
            self._flush()
        self.batch.add(record)
        if self.batch.bytes >= self.config.max_bytes or len(self.batch) >= self.config.max_records:
            self._flush()

    def _flush(self) -> None:
        batch = self.batch
        if not batch:
            return
        rendered = render(batch, self.config.raw_prefix, self.config.errors_prefix)
        store = self.vortex.store
        if self._replay_last is not None:
            if self.lease.planned_keys is not None and tuple(rendered.keys) != tuple(
                self.lease.planned_keys
            ):
                log.warning(
                    "shard %s: the replayed batch %s-%s gives other keys than planned",
                    batch.shard_id,
                    batch.first,
                    batch.last,
                )
            self._replay_last = None
        else:
            store.plan(self.lease, batch.last, rendered.keys)
        self.vortex.upload(rendered)
        counts = rendered.counts()
        store.commit(self.lease, batch.last, counts, self.millis_behind)
        self.vortex.totals.add(counts)
        for obj in rendered.objects:
            log.info(
                "%s",
                orjson.dumps(
                    {
                        "event": "vortex_file",
                        "stream": obj.stream.key if obj.stream else None,
                        "hour": obj.hour.isoformat(),
                        "key": obj.key,
                        "records": obj.records,
                        "bytes": len(obj.body),
                        "shard_id": batch.shard_id,
                        "first_sequence": batch.first,
                        "last_sequence": batch.last,
                    }
                ).decode(),
            )
        self.batch = Batch(batch.shard_id)


class Vortex:
    """One worker of the microbatcher."""

    def __init__(
        self,
        config: VortexConfig,
        store: LeaseStore,
        s3: S3Client,
        kinesis: Any = None,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.s3 = s3
        self.kinesis = kinesis if kinesis is not None else kinesis_client(KINESIS_ATTEMPTS)
        self.owner = owner or default_owner()
        self.totals = Totals()
        self.until_idle: float | None = None
        self.readers: dict[str, ShardReader] = {}
        # Per shard, ticks in a row that found its reads failing (across its readers).
        self._failing_ticks: dict[str, int] = {}
        self._uploads = ThreadPoolExecutor(config.upload_threads, thread_name_prefix="vortex-put")
        self._stop = threading.Event()

    def upload(self, rendered: RenderedBatch) -> None:
        """Put every object of a batch (in parallel); raises the first failure."""
        bucket = self.config.bucket

        def put(index: int) -> None:
            obj = rendered.objects[index]
            self.s3.put_object(Bucket=bucket, Key=obj.key, Body=obj.body)

        list(self._uploads.map(put, range(len(rendered.objects))))

    def stop(self) -> None:
        """Stop soon: readers write what they batched, then the worker leaves."""
        self._stop.set()

    def run(self, until_idle: float | None = None) -> Totals:
        """Consume until ``stop()`` (or, with ``until_idle``, until every shard this worker can
        read has been idle that long with everything written and checkpointed). Kinesis or the
        database being unreachable is waited out for ``MAX_TICK_FAILURES`` ticks in a row
        (the readers keep their batches), then it is the error."""
        config = self.config
        self.until_idle = until_idle
        self.store.ensure_schema()
        tick = config.lease_seconds / 3
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._tick()
                    failures = 0
                except ShardFailing:
                    raise
                except ClickstreamError as error:
                    failures += 1
                    if failures >= MAX_TICK_FAILURES:
                        raise
                    log.warning(
                        "%s (tick %d of %d failing; retrying)", error, failures, MAX_TICK_FAILURES
                    )
                # Idle only as seen by a tick that worked (the shards listed and recorded).
                if until_idle is not None and failures == 0 and self._idle_for(until_idle):
                    break
                self._stop.wait(min(tick, until_idle or tick))
        finally:
            for reader in self.readers.values():
                reader.stop()
            for reader in self.readers.values():
                reader.join()
            self._uploads.shutdown()
            try:
                self.store.leave(config.stream, self.owner)
            except ClickstreamError as error:
                log.warning("could not release the shards on exit: %s", error)
        errors = [r.error for r in self.readers.values() if r.error is not None]
        if errors and not isinstance(errors[0], LeaseLost):
            raise ClickstreamError(f"a shard reader failed: {errors[0]}")
        return self.totals

    def _tick(self) -> None:
        config = self.config
        workers = self.store.heartbeat(config.stream, self.owner, config.lease_seconds)
        self.store.sync_shards(config.stream, list_shards(self.kinesis, config.stream))
        for shard_id, reader in list(self.readers.items()):
            self._check_reads(shard_id, reader)
            if reader.is_alive():
                try:
                    self.store.renew(reader.lease, config.lease_seconds, reader.millis_behind)
                except LeaseLost as error:
                    log.warning("%s", error)
                    reader.stop()
                continue
            del self.readers[shard_id]
            if reader.error is not None and not isinstance(reader.error, LeaseLost):
                log.error("shard %s: %s (it will be taken again)", shard_id, reader.error)
                self.store.release(reader.lease)
        share = self.store.fair_share(config.stream, workers)
        if config.max_shards is not None:
            share = min(share, config.max_shards)
        live = [r for r in self.readers.values() if r.is_alive()]
        for reader in live[share:]:
            reader.release()  # more than a fair share: another worker joined
        for lease in self.store.acquire(
            config.stream, self.owner, config.lease_seconds, share - len(live)
        ):
            reader = ShardReader(self, lease)
            self.readers[lease.shard_id] = reader
            reader.start()

    def _check_reads(self, shard_id: str, reader: ShardReader) -> None:
        """Count the ticks in a row that find ``shard_id``'s reads failing; record the error
        where metrics and health read it; with --until-idle, give up at MAX_TICK_FAILURES."""
        died = reader.error if not isinstance(reader.error, LeaseLost) else None
        error = first_line(died) if died is not None else reader.read_error
        if error is None:
            if self._failing_ticks.pop(shard_id, 0):
                log.info("shard %s: reads work again", shard_id)
                self.store.report_reads(self.config.stream, shard_id, None)
            return
        ticks = self._failing_ticks[shard_id] = self._failing_ticks.get(shard_id, 0) + 1
        self.store.report_reads(self.config.stream, shard_id, error)
        if self.until_idle is not None and ticks >= MAX_TICK_FAILURES:
            raise ShardFailing(
                f"shard {shard_id} of {self.config.stream!r}: reads failed for "
                f"{ticks} ticks in a row: {error}"
            )
        log.warning(
            "shard %s: reads failing (tick %d%s): %s",
            shard_id,
            ticks,
            f" of {MAX_TICK_FAILURES}" if self.until_idle is not None else "",
            error,
        )

    def _idle_for(self, seconds: float) -> bool:
        """Every shard idle ``seconds`` with nothing batched, held by this worker: a stream
        drained by one worker (shards another worker holds may still have batches in flight,
        and a dead worker's shards are taken over when their leases expire)."""
        now = time.monotonic()
        for reader in self.readers.values():
            if reader.finished or not reader.is_alive():
                continue
            if reader.batch or not reader.caught_up or now - reader.last_records_at < seconds:
                return False
        return self.store.unread_elsewhere(self.config.stream, self.owner) == 0


@contextlib.contextmanager
def vortex_worker(stream: str, settings: Settings | None = None, **limits: Any) -> Iterator[Vortex]:
    """A worker for ``stream`` as configured by the environment (bucket, raw prefix, vortex
    database); ``limits`` are ``VortexConfig``'s flush and lease settings. Its database
    connection closes when the block ends."""
    from clickstream_pipeline.s3 import s3_client

    settings = settings or Settings.from_env()
    config = VortexConfig(
        stream=stream, bucket=settings.require_bucket(), raw_prefix=settings.raw_prefix, **limits
    )
    store = LeaseStore(settings.require_vortex_url())
    try:
        yield Vortex(config, store, s3_client())
    finally:
        store.close()
