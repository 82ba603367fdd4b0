"""Make moto's in-process Kinesis reshard like Amazon Kinesis (test-only monkeypatch).

``fix_moto_resharding()`` replaces five methods of moto's Kinesis classes (written against
moto 5.2.x) in the calling process, which is where ``moto.server.ThreadedMotoServer`` serves
requests. Each replacement restores one behaviour of real Kinesis that a consumer relies on:

- ``Stream.get_shard_for_key``: a write goes to the *open* shard whose hash key range holds the
  key (moto picked the first shard in creation order, open or closed, so every write after a
  SplitShard still landed in the closed parent). The range is inclusive of ``EndingHashKey``, as
  in Kinesis; moto excluded it, so ``ExplicitHashKey=2**128-1`` failed with HTTP 500.
- ``Stream.split_shard``: the parent is closed and keeps its records, readable up to its
  ``EndingSequenceNumber``; the two children start empty (moto re-put the parent's records,
  renumbered, through the stream and fired Lambda event source mappings again).
- ``Stream.merge_shards``: the parents are closed and keep their records; the child starts
  empty (moto copied every parent record into the child, so a consumer that reads the parents
  and then the child, as Kinesis requires, read them twice). Like Kinesis, it also refuses to
  merge a closed shard and accepts the two adjacent shards in either order.
- ``KinesisBackend.get_records``: once a reader has consumed the last record of a *closed*
  shard, ``NextShardIterator`` is null (the record batch that reaches the end already carries
  it), which is how Kinesis signals "shard end". moto never returned null. An open shard's
  iterator stays non-null, as before.
- ``KinesisResponse.get_records``: a GetRecords response that reaches a shard's end lists the
  shard's ``ChildShards`` (ShardId, ParentShards, HashKeyRange), as Kinesis does.

Split and merge also keep ``DescribeStreamSummary``'s ``OpenShardCount`` equal to the number of
open shards (moto only updated it in UpdateShardCount). UpdateShardCount is moto's own (split
every open shard, then merge adjacent pairs down to the target) and goes through the patched
split and merge. Everything else (per-shard sequence numbers "1", "2", ..., iterators that never
expire, ListShards returning every shard) is moto's behaviour, unchanged.

The patch is idempotent, and guarded like the local stack's speed-up (``patching.install``): on a
moto whose methods take other parameters, or where a split and a merge on a scratch stream do not
behave as above, moto's own methods stay and one warning line says so (the resharding tests then
fail on what they assert, every other test runs on moto as it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moto.core.responses import ActionResult
from moto.kinesis.exceptions import InvalidArgumentError
from moto.kinesis.models import KinesisBackend, Record, Shard, Stream
from moto.kinesis.responses import KinesisResponse
from moto.kinesis.utils import compose_shard_iterator, decompose_shard_iterator
from moto.utilities.utils import md5_hash

from clickstream_pipeline.local.patching import Replacement, install

_HASH_KEY_LIMIT = 2**128


def _get_shard_for_key(self: Stream, partition_key: str, explicit_hash_key: str) -> Shard | None:
    if not isinstance(partition_key, str) or len(partition_key) > 256:
        raise InvalidArgumentError("partition_key")
    if explicit_hash_key:
        if not isinstance(explicit_hash_key, str):
            raise InvalidArgumentError("explicit_hash_key")
        key = int(explicit_hash_key)
        if key >= _HASH_KEY_LIMIT:
            raise InvalidArgumentError("explicit_hash_key")
    else:
        key = int(md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
    return next(
        (s for s in _open_shards(self) if s.starting_hash <= key <= s.ending_hash),
        None,
    )


def _split_shard(self: Stream, shard_to_split: str, new_starting_hash_key: str) -> None:
    parent = self.shards[shard_to_split]
    new_start = int(new_starting_hash_key)
    if not parent.starting_hash < new_start < parent.ending_hash:
        raise InvalidArgumentError(
            message=f"NewStartingHashKey {new_start} used in SplitShard() on shard "
            f"{shard_to_split} in stream {self.stream_name} under account {self.account_id} "
            f"is not both greater than one plus the shard's StartingHashKey "
            f"{parent.starting_hash} and less than the shard's EndingHashKey "
            f"{parent.ending_hash - 1}."
        )
    _require_open(self, parent)
    last_id = _last_shard_number(self)
    for child in (
        Shard(last_id + 1, parent.starting_hash, new_start - 1, parent=parent.shard_id),
        Shard(last_id + 2, new_start, parent.ending_hash, parent=parent.shard_id),
    ):
        self.shards[child.shard_id] = child
    parent.is_open = False
    self.shard_count = len(_open_shards(self))


def _merge_shards(self: Stream, shard_to_merge: str, adjacent_shard_to_merge: str) -> None:
    shard = self.shards[shard_to_merge]
    adjacent = self.shards[adjacent_shard_to_merge]
    lower, upper = sorted((shard, adjacent), key=lambda s: s.starting_hash)
    if lower.ending_hash + 1 != upper.starting_hash:
        raise InvalidArgumentError(
            message=f"Shards {shard_to_merge} and {adjacent_shard_to_merge} in stream "
            f"{self.stream_name} under account {self.account_id} are not adjacent."
        )
    _require_open(self, shard)
    _require_open(self, adjacent)
    child = Shard(
        _last_shard_number(self) + 1,
        lower.starting_hash,
        upper.ending_hash,
        parent=shard.shard_id,
        adjacent_parent=adjacent.shard_id,
    )
    self.shards[child.shard_id] = child
    shard.is_open = adjacent.is_open = False
    self.shard_count = len(_open_shards(self))


def _backend_get_records(
    self: KinesisBackend, stream_arn: str | None, shard_iterator: str, limit: int | None
) -> tuple[str | None, list[Record], int]:
    stream_name, shard_id, last_sequence_id = decompose_shard_iterator(shard_iterator)
    stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    shard = stream.get_shard(shard_id)
    records, position, millis_behind_latest = shard.get_records(last_sequence_id, limit)
    if not shard.is_open and position >= shard.get_max_sequence_number():
        return None, records, millis_behind_latest  # shard end
    return compose_shard_iterator(stream_name, shard, position), records, millis_behind_latest


def _response_get_records(self: KinesisResponse) -> ActionResult:
    stream_arn = self._get_param("StreamARN")
    shard_iterator = self._get_param("ShardIterator")
    next_iterator, records, millis_behind_latest = self.kinesis_backend.get_records(
        stream_arn, shard_iterator, self._get_param("Limit")
    )
    result: dict[str, Any] = {
        "NextShardIterator": next_iterator,
        "Records": [record.to_json() for record in records],
        "MillisBehindLatest": millis_behind_latest,
    }
    if next_iterator is None:
        stream_name, shard_id, _ = decompose_shard_iterator(shard_iterator)
        stream = self.kinesis_backend.describe_stream(stream_arn, stream_name)
        result["ChildShards"] = [
            {
                "ShardId": child.shard_id,
                "ParentShards": [p for p in (child.parent, child.adjacent_parent) if p],
                "HashKeyRange": child.to_json()["HashKeyRange"],
            }
            for child in stream.shards.values()
            if shard_id in (child.parent, child.adjacent_parent)
        ]
    return ActionResult(result)


def _open_shards(stream: Stream) -> list[Shard]:
    return [shard for shard in stream.shards.values() if shard.is_open]


def _last_shard_number(stream: Stream) -> int:
    return max(int(shard_id.removeprefix("shardId-")) for shard_id in stream.shards)


def _require_open(stream: Stream, shard: Shard) -> None:
    if not shard.is_open:
        raise InvalidArgumentError(
            message=f"Shard {shard.shard_id} in stream {stream.stream_name} under account "
            f"{stream.account_id} has already been merged or split, and thus is not eligible "
            f"for merging or splitting."
        )


_REPLACEMENTS = (
    Replacement(Stream, "get_shard_for_key", _get_shard_for_key),
    Replacement(Stream, "split_shard", _split_shard),
    Replacement(Stream, "merge_shards", _merge_shards),
    Replacement(KinesisBackend, "get_records", _backend_get_records),
    Replacement(KinesisResponse, "get_records", _response_get_records),
)


def _reshards_like_kinesis(originals: Mapping[str, Any]) -> None:
    """On a scratch stream: a split closes the parent and sends new writes to a child, a merge
    closes both children and starts the merged shard empty (raises otherwise)."""
    stream = Stream(  # type: ignore[abstract]  # moto's models are not typed as concrete
        "patch-check", 1, None, None, "123456789012", "us-east-1"
    )
    (parent,) = stream.shards.values()
    stream.put_record("key", "", b"e30=")
    stream.split_shard(parent.shard_id, str(2**127))
    children = [shard for shard in stream.shards.values() if shard.parent == parent.shard_id]
    if parent.is_open or len(children) != 2 or any(child.records for child in children):
        raise AssertionError("a split did not close the parent and start two empty children")
    _, shard_id = stream.put_record("key", "", b"e30=")
    if shard_id == parent.shard_id or len(parent.records) != 1:
        raise AssertionError("a write after a split went to the closed parent")
    stream.merge_shards(children[1].shard_id, children[0].shard_id)
    merged = [shard for shard in stream.shards.values() if shard.is_open]
    if len(merged) != 1 or merged[0].records or stream.shard_count != 1:
        raise AssertionError("a merge did not start one empty shard")


def fix_moto_resharding() -> bool:
    """Patch moto's Kinesis classes in this process (see the module docstring); idempotent.
    False: this moto does not fit the patch, and its own methods were kept."""
    return install("the resharding fix", "moto", _REPLACEMENTS, _reshards_like_kinesis)
