"""The local Kinesis (moto's) without its quadratic costs, so a demo-sized stream is quick.

moto 5.2 keeps a shard's records in an ordered dict and, on every PutRecord(s) record, finds the
newest sequence number by listing every key; every GetRecords scans the shard from its first
record to the iterator's position. Both grow with the shard's length: 80,000 records went on
the local stream at 2,400 a second. ``speed_up_moto_kinesis()`` replaces the two methods with
constant-time ones over the same data (moto numbers a shard's records 1, 2, 3, ... with no
gaps); what they return is unchanged. It patches moto's classes in this process, where
``LocalStack`` runs moto's server, and only after checking on a scratch shard that both answer
exactly as moto's own do (``patching.install``): on a moto release they do not fit, the local
stream is slower, never broken.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from moto.kinesis.models import Record, Shard

from clickstream_pipeline.local.patching import Replacement, install


def _newest(self: Shard) -> int:
    return next(reversed(self.records)) if self.records else 0


def _seconds(difference: Any) -> float:
    # moto 5.2.5 keeps a record's created_at as an epoch number, 5.2.6 as a datetime.
    return difference.total_seconds() if isinstance(difference, timedelta) else float(difference)


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
    behind = _seconds(self.records[newest].created_at - results[-1].created_at) if results else 0.0
    return results, position, int(behind * 1000)


_REPLACEMENTS = (
    Replacement(Shard, "get_max_sequence_number", _newest),
    Replacement(Shard, "get_records", _get_records),
)


def _answers_as_moto_does(originals: Mapping[str, Any]) -> None:
    """Both replacements give moto's own answers on a scratch shard (raises otherwise)."""
    shard = Shard(0, 0, 2**128 - 1)
    if originals["Shard.get_max_sequence_number"](shard) != _newest(shard):
        raise AssertionError("an empty shard's newest sequence number differs")
    for index in range(5):
        shard.put_record(f"key-{index}", b"e30=", "")
    if originals["Shard.get_max_sequence_number"](shard) != _newest(shard):
        raise AssertionError("the newest sequence number differs")
    for position, limit in (("0", None), ("0", 2), ("2", 2), ("4", 10), ("5", None)):
        theirs = originals["Shard.get_records"](shard, position, limit)
        ours = _get_records(shard, position, limit)
        if theirs != ours:
            raise AssertionError(f"GetRecords after {position} (limit {limit}) differs")


def speed_up_moto_kinesis() -> bool:
    """Replace the two methods if this moto's fit them (idempotent); False: moto's own kept."""
    return install("the local Kinesis speed-up", "moto", _REPLACEMENTS, _answers_as_moto_does)
