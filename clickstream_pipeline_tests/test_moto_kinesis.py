"""The patches of moto's Kinesis, proved through boto3 against a ThreadedMotoServer: the
resharding fix, and both it and the local speed-up stepping aside on a moto they do not fit."""

from __future__ import annotations

import importlib.metadata
import itertools
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from clickstream_pipeline.local import patching
from clickstream_pipeline.local.moto_kinesis import speed_up_moto_kinesis
from clickstream_pipeline_tests.moto_kinesis import fix_moto_resharding

HASH_KEY_LIMIT = 2**128


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    assert fix_moto_resharding(), "this moto does not fit the resharding fix (see the warning)"
    assert fix_moto_resharding()  # idempotent
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def kinesis(endpoint: str) -> Any:
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        # moto answers its own failures with HTTP 500: fail at once instead of retrying.
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


@pytest.fixture
def stream(kinesis: Any) -> str:
    name = f"s-{uuid.uuid4().hex[:12]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    return name


def put(kinesis: Any, stream: str, payloads: list[str]) -> dict[str, str]:
    """Write each payload with its own partition key; returns payload -> shard id."""
    response = kinesis.put_records(
        StreamName=stream,
        Records=[{"Data": p.encode(), "PartitionKey": p} for p in payloads],
    )
    assert response["FailedRecordCount"] == 0
    return {p: r["ShardId"] for p, r in zip(payloads, response["Records"], strict=True)}


def shards(kinesis: Any, stream: str) -> dict[str, dict[str, Any]]:
    return {s["ShardId"]: s for s in kinesis.list_shards(StreamName=stream)["Shards"]}


def read(kinesis: Any, stream: str, shard_id: str, limit: int = 4) -> tuple[list[str], list[Any]]:
    """Read a shard from TRIM_HORIZON: its payloads, and ChildShards if it reached shard end.

    Stops at a null NextShardIterator, or at an empty batch (an open shard's tip).
    """
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    payloads: list[str] = []
    for _ in range(100):
        response = kinesis.get_records(ShardIterator=iterator, Limit=limit)
        payloads += [r["Data"].decode() for r in response["Records"]]
        iterator = response.get("NextShardIterator")
        if iterator is None:
            return payloads, response.get("ChildShards", [])
        if not response["Records"]:
            return payloads, []
    raise AssertionError("shard never ended")


def batch(prefix: str) -> list[str]:
    return [f"{prefix}-{i}" for i in range(10)]


def test_split_closes_parent_and_routes_new_writes_to_children(kinesis: Any, stream: str) -> None:
    before, after = batch("before"), batch("after")
    assert set(put(kinesis, stream, before).values()) == {"shardId-000000000000"}
    kinesis.split_shard(
        StreamName=stream, ShardToSplit="shardId-000000000000", NewStartingHashKey=str(2**127)
    )
    routed = put(kinesis, stream, after)

    listed = shards(kinesis, stream)
    assert sorted(listed) == [
        "shardId-000000000000",
        "shardId-000000000001",
        "shardId-000000000002",
    ]
    parent, low, high = (listed[f"shardId-00000000000{i}"] for i in range(3))
    assert parent["SequenceNumberRange"]["EndingSequenceNumber"] == "10"
    assert "EndingSequenceNumber" not in low["SequenceNumberRange"]
    assert "EndingSequenceNumber" not in high["SequenceNumberRange"]
    assert low["ParentShardId"] == high["ParentShardId"] == "shardId-000000000000"
    assert low["HashKeyRange"] == {"StartingHashKey": "0", "EndingHashKey": str(2**127 - 1)}
    assert high["HashKeyRange"] == {
        "StartingHashKey": str(2**127),
        "EndingHashKey": str(HASH_KEY_LIMIT - 1),
    }
    summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    assert summary["OpenShardCount"] == 2

    assert set(routed.values()) <= {low["ShardId"], high["ShardId"]}
    parent_records, _ = read(kinesis, stream, parent["ShardId"])
    low_records, _ = read(kinesis, stream, low["ShardId"])
    high_records, _ = read(kinesis, stream, high["ShardId"])
    assert parent_records == before
    assert sorted(low_records + high_records) == sorted(after)
    assert low_records == [p for p in after if routed[p] == low["ShardId"]]
    assert low_records and high_records  # 10 md5 keys land on both halves


def test_merge_child_holds_only_records_written_after_the_merge(kinesis: Any) -> None:
    stream = f"s-{uuid.uuid4().hex[:12]}"
    kinesis.create_stream(StreamName=stream, ShardCount=2)
    before, after = batch("before"), batch("after")
    routed = put(kinesis, stream, before)
    assert set(routed.values()) == {"shardId-000000000000", "shardId-000000000001"}
    # Kinesis accepts the two adjacent shards in either order.
    kinesis.merge_shards(
        StreamName=stream,
        ShardToMerge="shardId-000000000001",
        AdjacentShardToMerge="shardId-000000000000",
    )
    assert set(put(kinesis, stream, after).values()) == {"shardId-000000000002"}

    listed = shards(kinesis, stream)
    child = listed["shardId-000000000002"]
    assert child["ParentShardId"] == "shardId-000000000001"
    assert child["AdjacentParentShardId"] == "shardId-000000000000"
    assert child["HashKeyRange"] == {
        "StartingHashKey": "0",
        "EndingHashKey": str(HASH_KEY_LIMIT - 1),
    }
    assert "EndingSequenceNumber" not in child["SequenceNumberRange"]
    for parent_id in ("shardId-000000000000", "shardId-000000000001"):
        parent = listed[parent_id]
        written = [p for p in before if routed[p] == parent_id]
        assert parent["SequenceNumberRange"]["EndingSequenceNumber"] == str(len(written))
        payloads, children = read(kinesis, stream, parent_id)
        assert payloads == written
        assert children == [
            {
                "ShardId": "shardId-000000000002",
                "ParentShards": ["shardId-000000000001", "shardId-000000000000"],
                "HashKeyRange": child["HashKeyRange"],
            }
        ]
    assert read(kinesis, stream, "shardId-000000000002")[0] == after

    with pytest.raises(kinesis.exceptions.InvalidArgumentException):
        kinesis.merge_shards(
            StreamName=stream,
            ShardToMerge="shardId-000000000000",
            AdjacentShardToMerge="shardId-000000000001",
        )


def test_update_shard_count_reshards_without_moving_records(kinesis: Any) -> None:
    stream = f"s-{uuid.uuid4().hex[:12]}"
    kinesis.create_stream(StreamName=stream, ShardCount=2)
    before, after = batch("before"), batch("after")
    routed_before = put(kinesis, stream, before)
    kinesis.update_shard_count(StreamName=stream, TargetShardCount=3, ScalingType="UNIFORM_SCALING")
    routed_after = put(kinesis, stream, after)

    listed = shards(kinesis, stream)
    originals = ["shardId-000000000000", "shardId-000000000001"]
    open_ids = [
        i for i, s in listed.items() if "EndingSequenceNumber" not in s["SequenceNumberRange"]
    ]
    assert len(open_ids) == 3
    assert set(originals).isdisjoint(open_ids)
    assert set(routed_after.values()) <= set(open_ids)
    # The open shards tile the whole hash key space.
    ranges = sorted(
        (int(r["StartingHashKey"]), int(r["EndingHashKey"]))
        for r in (listed[i]["HashKeyRange"] for i in open_ids)
    )
    assert ranges[0][0] == 0 and ranges[-1][1] == HASH_KEY_LIMIT - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))

    # Each shard, closed or open, holds exactly the records routed to it, nothing moved or copied.
    for shard_id in listed:
        payloads, _ = read(kinesis, stream, shard_id)
        routed = routed_before if shard_id in originals else routed_after
        assert payloads == [p for p, target in routed.items() if target == shard_id]


def test_closed_shard_end_has_null_iterator_open_shard_does_not(kinesis: Any, stream: str) -> None:
    put(kinesis, stream, batch("before"))
    kinesis.split_shard(
        StreamName=stream, ShardToSplit="shardId-000000000000", NewStartingHashKey=str(2**127)
    )
    put(kinesis, stream, batch("after"))

    def records_then_iterator(shard_id: str, **start: str) -> tuple[list[str], Any]:
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard_id, **start)
        response = kinesis.get_records(ShardIterator=iterator["ShardIterator"])
        return [r["SequenceNumber"] for r in response["Records"]], response

    # Reading the closed parent to its last record ends it in the same response.
    sequence_numbers, response = records_then_iterator(
        "shardId-000000000000", ShardIteratorType="TRIM_HORIZON"
    )
    assert sequence_numbers == [str(n) for n in range(1, 11)]
    assert response.get("NextShardIterator") is None
    assert [c["ShardId"] for c in response["ChildShards"]] == [
        "shardId-000000000001",
        "shardId-000000000002",
    ]
    # A batch that stops short of the end keeps the iterator; resuming after the last one ends.
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId="shardId-000000000000", ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    partial = kinesis.get_records(ShardIterator=iterator, Limit=9)
    assert len(partial["Records"]) == 9 and partial["NextShardIterator"]
    last = kinesis.get_records(ShardIterator=partial["NextShardIterator"])
    assert [r["SequenceNumber"] for r in last["Records"]] == ["10"]
    assert last.get("NextShardIterator") is None
    sequence_numbers, response = records_then_iterator(
        "shardId-000000000000",
        ShardIteratorType="AFTER_SEQUENCE_NUMBER",
        StartingSequenceNumber="10",
    )
    assert sequence_numbers == []
    assert response.get("NextShardIterator") is None

    # Open children: the iterator stays non-null at their tip, and keeps reading new records.
    for child in ("shardId-000000000001", "shardId-000000000002"):
        _, response = records_then_iterator(child, ShardIteratorType="TRIM_HORIZON")
        assert response["NextShardIterator"]
        assert "ChildShards" not in response
        tip = kinesis.get_records(ShardIterator=response["NextShardIterator"])
        assert tip["Records"] == [] and tip["NextShardIterator"]


def test_writes_route_by_inclusive_hash_key_range(kinesis: Any, stream: str) -> None:
    kinesis.split_shard(
        StreamName=stream, ShardToSplit="shardId-000000000000", NewStartingHashKey=str(2**127)
    )
    expected = {
        0: "shardId-000000000001",
        2**127 - 1: "shardId-000000000001",
        2**127: "shardId-000000000002",
        HASH_KEY_LIMIT - 1: "shardId-000000000002",
    }
    for hash_key, shard_id in expected.items():
        response = kinesis.put_record(
            StreamName=stream, Data=b"x", PartitionKey="x", ExplicitHashKey=str(hash_key)
        )
        assert response["ShardId"] == shard_id


# -- on a moto the patches were not written for ---------------------------------------------


def put_and_read(kinesis: Any, count: int) -> list[bytes]:
    """Put ``count`` records on a new one-shard stream and read them back with GetRecords."""
    name = f"p{uuid.uuid4().hex[:10]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    for index in range(count):
        kinesis.put_record(StreamName=name, Data=f"r{index}".encode(), PartitionKey="k")
    iterator = kinesis.get_shard_iterator(
        StreamName=name, ShardId="shardId-000000000000", ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    return [record["Data"] for record in kinesis.get_records(ShardIterator=iterator)["Records"]]


def test_the_speed_up_steps_aside_for_a_moto_whose_methods_take_other_parameters(
    kinesis: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from moto.kinesis.models import Shard

    assert speed_up_moto_kinesis()
    moto_get_records = patching.original(Shard, "get_records")
    moto_newest = patching.original(Shard, "get_max_sequence_number")
    assert Shard.get_records is not moto_get_records  # the speed-up is in place

    # A later moto, say, whose GetRecords grew a parameter: ours must not stand in for it.
    def newer_get_records(
        self: Shard, last_sequence_id: str, limit: int | None, stream_arn: str | None = None
    ) -> Any:
        return moto_get_records(self, last_sequence_id, limit)

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, "clickstream"):
        patched.setattr(Shard, "get_records", newer_get_records)
        assert not speed_up_moto_kinesis()
        assert Shard.get_records is newer_get_records
        assert Shard.get_max_sequence_number is moto_newest  # put back, not left half-patched
        assert put_and_read(kinesis, 3) == [b"r0", b"r1", b"r2"]  # moto's own, no 500
    assert [record.getMessage() for record in caplog.records] == [
        f"the local Kinesis speed-up: moto {importlib.metadata.version('moto')} is not the release "
        "it was written for (Shard.get_records takes (self, last_sequence_id, limit, "
        "stream_arn)); using moto's own methods"
    ]
    assert speed_up_moto_kinesis()  # moto as installed again: the speed-up is back
    assert patching.original(Shard, "get_records") is moto_get_records


def test_the_speed_up_steps_aside_for_a_moto_that_answers_otherwise(
    kinesis: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Same parameters, other answers (the kind of change 5.2.6 made): the self-check on a
    scratch shard finds it before a request does."""
    from moto.kinesis.models import Shard

    assert speed_up_moto_kinesis()
    moto_get_records = patching.original(Shard, "get_records")

    def get_records_in_seconds(self: Shard, last_sequence_id: str, limit: int | None) -> Any:
        records, position, millis = moto_get_records(self, last_sequence_id, limit)
        return records, position, millis / 1000 + 1

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, "clickstream"):
        patched.setattr(Shard, "get_records", get_records_in_seconds)
        assert not speed_up_moto_kinesis()
        assert Shard.get_records is get_records_in_seconds
        assert put_and_read(kinesis, 2) == [b"r0", b"r1"]
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.endswith(
        "(GetRecords after 0 (limit None) differs); using moto's own methods"
    ), message
    assert speed_up_moto_kinesis()


def test_the_resharding_fix_steps_aside_for_a_moto_it_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from moto.kinesis.models import Stream

    assert fix_moto_resharding()
    moto_split = patching.original(Stream, "split_shard")
    moto_merge = patching.original(Stream, "merge_shards")

    def split_shard(self: Stream, shard_to_split: str, new_starting_hash_key: str, *_: Any) -> None:
        moto_split(self, shard_to_split, new_starting_hash_key)

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, "clickstream"):
        patched.setattr(Stream, "split_shard", split_shard)
        assert not fix_moto_resharding()
        assert Stream.split_shard is split_shard
        assert Stream.merge_shards is moto_merge
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith("the resharding fix: moto ")
    assert "(Stream.split_shard takes (self, shard_to_split, new_starting_hash_key, _))" in message
    assert fix_moto_resharding()
