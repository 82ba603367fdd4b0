"""The local Kinesis (moto's) without its quadratic costs, so a demo-sized stream is quick.

moto 5.2 keeps a shard's records in an ordered dict and, on every PutRecord(s) record, finds the
newest sequence number by listing every key; every GetRecords scans the shard from its first
record to the iterator's position. Both grow with the shard's length: 80,000 records went on
the local stream at 2,400 a second. ``speed_up_moto_kinesis()`` replaces the two methods with
constant-time ones over the same data (moto numbers a shard's records 1, 2, 3, ... with no
gaps); what they return is unchanged. It patches moto's classes in this process, where
``LocalStack`` runs moto's server.
"""

from __future__ import annotations

from typing import Any

from moto.kinesis.models import Record, Shard


def _newest(self: Shard) -> int:
    return next(reversed(self.records)) if self.records else 0


def _get_records(
    self: Shard, last_sequence_id: str, limit: int | None
) -> tuple[list[Record], int, int]:
    position = int(last_sequence_id)
    newest = _newest(self)
    results: list[Record] = []
    sequence = position + 1
    while sequence <= newest and (limit is None or len(results) < limit):
        record = self.records.get(sequence)
        if record is not None:
            results.append(record)
            position = sequence
        sequence += 1
    behind = self.records[newest].created_at - results[-1].created_at if results else 0.0
    return results, position, int(behind * 1000)


_PATCHES: tuple[tuple[Any, str, Any], ...] = (
    (Shard, "get_max_sequence_number", _newest),
    (Shard, "get_records", _get_records),
)


def speed_up_moto_kinesis() -> None:
    """Replace the two methods (idempotent)."""
    for owner, name, function in _PATCHES:
        setattr(owner, name, function)
