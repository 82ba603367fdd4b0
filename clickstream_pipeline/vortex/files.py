"""A batch of one shard's records and the S3 objects it becomes.

The objects are a pure function of the batch: their names come from the shard and the batch's
sequence range (``<shardId>-<firstSeq>-<lastSeq>.jsonl.gz``), records keep sequence order, and
gzip is written with ``mtime=0``. A batch replayed after a crash therefore rewrites the same keys
with the same bytes (the same ETags): nothing is added, and the loader sees nothing new.
"""

from __future__ import annotations

import base64
import gzip
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from clickstream_pipeline.layout import hour_floor, hour_path, raw_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.vortex.leases import BatchCounts
from clickstream_pipeline.vortex.routing import Routed, Unroutable, route

ERRORS_PREFIX = "errors"
# Sequence numbers are decimal strings of up to 128 digits; real Kinesis gives 56. Padded to
# that width, names of one shard sort in sequence order.
SEQUENCE_DIGITS = 56
# Level 6 (gzip's default) costs ~2x the CPU of level 1 for ~15 % smaller files on this data.
COMPRESS_LEVEL = 6


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One Kinesis record as read: its sequence number, data and arrival time."""

    sequence: str
    data: bytes
    arrival: datetime


def sequence_name(sequence: str) -> str:
    return f"{int(sequence):0{SEQUENCE_DIGITS}d}"


def object_name(shard_id: str, first: str, last: str, suffix: str = ".jsonl.gz") -> str:
    """``<shardId>-<firstSeq>-<lastSeq><suffix>``, the sequence numbers zero-padded."""
    return f"{shard_id}-{sequence_name(first)}-{sequence_name(last)}{suffix}"


@dataclass
class Batch:
    """Records of one shard waiting to be written, routed as they are added."""

    shard_id: str
    records: list[StreamRecord] = field(default_factory=list)
    routes: list[Routed | Unroutable] = field(default_factory=list)
    bytes: int = 0
    started: float = 0.0  # time.monotonic() of the first record

    def add(self, record: StreamRecord) -> None:
        if not self.records:
            self.started = time.monotonic()
        self.records.append(record)
        self.routes.append(route(record.data, record.arrival))
        self.bytes += len(record.data)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def first(self) -> str:
        return self.records[0].sequence

    @property
    def last(self) -> str:
        return self.records[-1].sequence

    @property
    def arrival_hour(self) -> datetime:
        return hour_floor(self.records[0].arrival)

    def age(self) -> float:
        return time.monotonic() - self.started if self.records else 0.0


@dataclass(frozen=True)
class RenderedObject:
    """One S3 object of a batch: raw records of a (stream, hour), or unroutable records of an
    arrival hour (``stream`` None)."""

    key: str
    body: bytes
    records: int
    stream: Stream | None
    hour: datetime


@dataclass(frozen=True)
class RenderedBatch:
    objects: list[RenderedObject]
    records_in: int
    bytes_in: int
    records_out: int
    duplicates: int
    errors: int

    @property
    def keys(self) -> list[str]:
        return [obj.key for obj in self.objects]

    @property
    def bytes_out(self) -> int:
        return sum(len(obj.body) for obj in self.objects)

    def counts(self) -> BatchCounts:
        """What committing this batch adds to its shard's counters."""
        return BatchCounts(
            records_in=self.records_in,
            bytes_in=self.bytes_in,
            records_out=self.records_out,
            bytes_out=self.bytes_out,
            files=len(self.objects),
            duplicates=self.duplicates,
            errors=self.errors,
        )


def _line(data: bytes) -> bytes:
    """The record as one JSONL line: its own bytes, unless it spans lines (pretty-printed)."""
    if b"\n" in data or b"\r" in data:
        return orjson.dumps(orjson.loads(data))
    return data


def _error_line(record: StreamRecord, shard_id: str, reason: str) -> bytes:
    """An unroutable record with why, where it came from, and its exact data."""
    line: dict[str, object] = {
        "reason": reason,
        "shard_id": shard_id,
        "sequence_number": record.sequence,
        "arrival": record.arrival.isoformat().replace("+00:00", "Z"),
    }
    try:
        line["data"] = record.data.decode("utf-8")
    except UnicodeDecodeError:
        line["data_base64"] = base64.b64encode(record.data).decode("ascii")
    return orjson.dumps(line)


def render(batch: Batch, raw_prefix: str, errors_prefix: str = ERRORS_PREFIX) -> RenderedBatch:
    """The objects ``batch`` becomes. Within the batch the first copy of each messageId of a
    stream wins; across batches the loader's dedup by messageId is the guarantee."""
    lines: dict[tuple[Stream, datetime], list[bytes]] = defaultdict(list)
    errors: dict[datetime, list[bytes]] = defaultdict(list)
    seen: set[tuple[Stream, str]] = set()
    duplicates = 0
    for record, routed in zip(batch.records, batch.routes, strict=True):
        if isinstance(routed, Unroutable):
            errors[hour_floor(record.arrival)].append(
                _error_line(record, batch.shard_id, routed.reason)
            )
            continue
        if (routed.stream, routed.message_id) in seen:
            duplicates += 1
            continue
        seen.add((routed.stream, routed.message_id))
        lines[(routed.stream, routed.hour)].append(_line(record.data))
    name = object_name(batch.shard_id, batch.first, batch.last)
    objects = [
        RenderedObject(
            key=raw_key(raw_prefix, stream, hour, name),
            body=gzip.compress(b"\n".join(body) + b"\n", COMPRESS_LEVEL, mtime=0),
            records=len(body),
            stream=stream,
            hour=hour,
        )
        for (stream, hour), body in sorted(lines.items())
    ]
    error_name = object_name(batch.shard_id, batch.first, batch.last, ".jsonl")
    objects.extend(
        RenderedObject(
            key=f"{errors_prefix}/{hour_path(hour)}/{error_name}",
            body=b"\n".join(body) + b"\n",
            records=len(body),
            stream=None,
            hour=hour,
        )
        for hour, body in sorted(errors.items())
    )
    return RenderedBatch(
        objects=objects,
        records_in=len(batch),
        bytes_in=batch.bytes,
        records_out=sum(obj.records for obj in objects if obj.stream is not None),
        duplicates=duplicates,
        errors=sum(len(body) for body in errors.values()),
    )
