"""Vortex, the microbatcher, on the embedded stack: the local Kinesis and S3 server and the
embedded PostgreSQL (leases, checkpoints, and the warehouse the files load into)."""

from __future__ import annotations

import gzip
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest

from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.vortex import LeaseLost, LeaseStore, Vortex, VortexConfig
from clickstream_pipeline.vortex.files import Batch, StreamRecord, object_name, render
from clickstream_pipeline.vortex.kinesis import ensure_stream, kinesis_client, put_records
from clickstream_pipeline.vortex.leases import BatchCounts, ShardInfo
from clickstream_pipeline.vortex.routing import Routed, Unroutable, route
from clickstream_pipeline_tests.conftest import list_keys
from clickstream_pipeline_tests.helpers import message_ids, recent_hour, run_cli

NOW = datetime(2026, 11, 26, 13, 30, tzinfo=UTC)


def track(customer: str, event: str, message_id: str, received: datetime) -> dict[str, Any]:
    return {
        "customer": customer,
        "messageId": message_id,
        "type": "track",
        "event": event,
        "userId": "u1",
        "receivedAt": received.isoformat().replace("+00:00", "Z"),
        "properties": {"sku": message_id},
    }


def encoded(*records: dict[str, Any] | bytes) -> list[tuple[bytes, str]]:
    """(data, partition key) pairs. The key is the messageId, as a client retrying a record
    sends it again (so a retry lands on the same shard); bad records get random keys."""
    return [
        (orjson.dumps(r), r["messageId"]) if isinstance(r, dict) else (r, uuid.uuid4().hex)
        for r in records
    ]


@pytest.fixture
def stream(local_stack: dict[str, str]) -> str:
    name = f"s{uuid.uuid4().hex[:10]}"
    ensure_stream(kinesis_client(), name, 2)
    return name


def config(stream: str, bucket: str, **overrides: Any) -> VortexConfig:
    return VortexConfig(stream=stream, bucket=bucket, **{"lease_seconds": 6.0, **overrides})


def run_vortex(stream: str, bucket: str, until_idle: float = 1.5, **overrides: Any) -> Vortex:
    worker = Vortex(
        config(stream, bucket, **overrides),
        LeaseStore(os.environ["CLICKSTREAM_WAREHOUSE_URL"]),
        s3_client(),
    )
    worker.run(until_idle=until_idle)
    return worker


def objects(bucket: str, prefix: str) -> dict[str, str]:
    """key -> ETag of every object under ``prefix``."""
    client = s3_client()
    return {
        key: client.head_object(Bucket=bucket, Key=key)["ETag"] for key in list_keys(bucket, prefix)
    }


def lines(bucket: str, key: str) -> list[dict[str, Any]]:
    body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    if key.endswith(".gz"):
        body = gzip.decompress(body)
    return [orjson.loads(line) for line in body.splitlines()]


def shard_rows(stream: str) -> list[dict[str, Any]]:
    return LeaseStore(os.environ["CLICKSTREAM_WAREHOUSE_URL"]).shards(stream)


# -- routing and rendering -------------------------------------------------------------------


def test_route_by_customer_event_and_received_hour() -> None:
    data = orjson.dumps(track("acme", "Add To Cart", "m1", NOW - timedelta(minutes=40)))
    assert route(data, NOW) == Routed(
        Stream("acme", "add_to_cart"), datetime(2026, 11, 26, 12, tzinfo=UTC), "m1"
    )
    camel = orjson.dumps(track("acme", "productViewed", "m2", NOW))
    assert route(camel, NOW) == Routed(
        Stream("acme", "product_viewed"), NOW.replace(minute=0), "m2"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "invalid JSON: "),
        (b"[1, 2]", "not a JSON object but list"),
        (orjson.dumps({"event": "X", "messageId": "m"}), "customer is missing"),
        (
            orjson.dumps(track("Acme Corp", "X", "m", NOW)),
            "customer 'Acme Corp' does not match ^[a-z][a-z0-9_]{0,62}$",
        ),
        (
            orjson.dumps(track("acme", "!!!", "m", NOW)),
            "event '!!!' gives the table name '', not ^[a-z][a-z0-9_]{0,62}$",
        ),
        (
            orjson.dumps({**track("acme", "X", "m", NOW), "receivedAt": None}),
            "receivedAt is not an ISO-8601 timestamp with a time zone",
        ),
        (
            orjson.dumps(track("acme", "X", "m", NOW - timedelta(hours=25))),
            "receivedAt 2026-11-25T12:30:00Z is more than 24 h from its arrival on the stream "
            "at 2026-11-26T13:30:00Z",
        ),
    ],
)
def test_unroutable_records_say_why(data: bytes, reason: str) -> None:
    routed = route(data, NOW)
    assert isinstance(routed, Unroutable)
    assert routed.reason.startswith(reason)
    if not reason.endswith(": "):
        assert routed.reason == reason


def test_a_batch_renders_to_the_same_bytes_every_time() -> None:
    def batch() -> Batch:
        b = Batch("shardId-000000000001")
        for seq, (message_id, event) in enumerate(
            [("m1", "Page Viewed"), ("m2", "Page Viewed"), ("m1", "Page Viewed"), ("m3", "Buy")],
            start=7,
        ):
            b.add(StreamRecord(str(seq), orjson.dumps(track("acme", event, message_id, NOW)), NOW))
        b.add(StreamRecord("11", b"oops", NOW))
        return b

    first, second = render(batch(), "raw"), render(batch(), "raw")
    assert [(o.key, o.body) for o in first.objects] == [(o.key, o.body) for o in second.objects]
    name = "shardId-000000000001-" + "0" * 55 + "7-" + "0" * 54 + "11"
    assert object_name("shardId-000000000001", "7", "11", "") == name
    assert first.keys == [
        f"raw/customer=acme/event=buy/date=2026-11-26/hour=13/{name}.jsonl.gz",
        f"raw/customer=acme/event=page_viewed/date=2026-11-26/hour=13/{name}.jsonl.gz",
        f"errors/date=2026-11-26/hour=13/{name}.jsonl",
    ]
    # The first copy of a messageId wins; records keep sequence order.
    page_viewed = gzip.decompress(first.objects[1].body).splitlines()
    assert [orjson.loads(line)["messageId"] for line in page_viewed] == ["m1", "m2"]
    assert (first.records_in, first.records_out, first.duplicates, first.errors) == (5, 3, 1, 1)
    error = orjson.loads(first.objects[2].body)
    assert error == {
        "reason": error["reason"],
        "shard_id": "shardId-000000000001",
        "sequence_number": "11",
        "arrival": "2026-11-26T13:30:00Z",
        "data": "oops",
    }
    assert error["reason"].startswith("invalid JSON")


# -- leases ----------------------------------------------------------------------------------


def test_a_stale_worker_cannot_plan_or_commit(local_stack: dict[str, str]) -> None:
    url = local_stack["CLICKSTREAM_WAREHOUSE_URL"]
    name = f"s{uuid.uuid4().hex[:10]}"
    a, b = LeaseStore(url), LeaseStore(url)
    a.ensure_schema()
    a.sync_shards(name, [ShardInfo("shardId-000000000000")])
    (held,) = a.acquire(name, "worker-a", 30, 4)
    assert b.acquire(name, "worker-b", 30, 4) == []  # a live lease is not taken
    a.plan(held, "5", ["k1"])
    # Worker a stalls past its lease (a long GC pause, a partition): expire it.
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE clickstream.vortex_shards SET lease_expires = now() - interval '1 s'"
            " WHERE stream = %s",
            (name,),
        )
    conn.close()
    (taken,) = b.acquire(name, "worker-b", 30, 4)
    assert (taken.counter, taken.checkpoint, taken.planned_last, taken.planned_keys) == (
        held.counter + 1,
        None,
        "5",
        ("k1",),
    )
    with pytest.raises(LeaseLost, match="lease 1 of worker-a was taken over by another worker"):
        a.commit(held, "5", BatchCounts(records_in=5))
    with pytest.raises(LeaseLost):
        a.plan(held, "9", ["k2"])
    with pytest.raises(LeaseLost):
        a.renew(held, 30, None)
    b.commit(taken, "5", BatchCounts(records_in=5, files=1))
    (row,) = b.shards(name)
    assert (row["owner"], row["checkpoint"], row["planned_last"], row["records_in"]) == (
        "worker-b",
        "5",
        None,
        5,
    )


def test_a_child_shard_waits_for_its_parents(local_stack: dict[str, str]) -> None:
    store = LeaseStore(local_stack["CLICKSTREAM_WAREHOUSE_URL"])
    store.ensure_schema()
    name = f"s{uuid.uuid4().hex[:10]}"
    store.sync_shards(
        name,
        [
            ShardInfo("shardId-000000000000", (), "10"),
            ShardInfo("shardId-000000000001", ("shardId-000000000000",)),
        ],
    )
    (parent,) = store.acquire(name, "w", 30, 4)
    assert parent.shard_id == "shardId-000000000000"
    store.finish(parent)
    (child,) = store.acquire(name, "w", 30, 4)
    assert child.shard_id == "shardId-000000000001"


# -- the consumer on the local Kinesis -------------------------------------------------------


def test_a_run_writes_exact_files_and_loads_exact_rows(
    pipeline: dict[str, str], stream: str, customer: str, registry_path: Path
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    one, two = recent_hour(2), recent_hour(1)
    records: list[dict[str, Any] | bytes] = [
        track(customer, "Page Viewed", f"p{i}", one + timedelta(minutes=i)) for i in range(30)
    ]
    records += [
        track(customer, "Page Viewed", f"q{i}", two + timedelta(minutes=i)) for i in range(20)
    ]
    records += [
        track(customer, "Add To Cart", f"a{i}", two + timedelta(minutes=i)) for i in range(10)
    ]
    records += [records[0], records[31]]  # a client's retry: the same messageIds again
    records += [b"not json", orjson.dumps({"event": "X", "messageId": "x1"})]
    put_records(kinesis_client(), stream, encoded(*records))

    worker = run_vortex(stream, bucket)

    totals = worker.totals
    assert (totals.records_in, totals.duplicates, totals.errors) == (64, 2, 2)
    assert totals.records_out == 60
    raw = list_keys(bucket, "raw/")
    hours = {"/".join(key.split("/")[1:5]) for key in raw}
    assert hours == {
        f"customer={customer}/event=page_viewed/date={one:%Y-%m-%d}/hour={one:%H}",
        f"customer={customer}/event=page_viewed/date={two:%Y-%m-%d}/hour={two:%H}",
        f"customer={customer}/event=add_to_cart/date={two:%Y-%m-%d}/hour={two:%H}",
    }
    written = [line for key in raw for line in lines(bucket, key)]
    assert sorted(r["messageId"] for r in written) == sorted(
        [f"p{i}" for i in range(30)] + [f"q{i}" for i in range(20)] + [f"a{i}" for i in range(10)]
    )
    for key in raw:  # each file's name is its shard and sequence range
        shard, first, last = key.rsplit("/", 1)[1].removesuffix(".jsonl.gz").rsplit("-", 2)
        assert shard.startswith("shardId-") and len(first) == len(last) == 56
        assert int(first) <= int(last)
    errors = [line for key in list_keys(bucket, "errors/") for line in lines(bucket, key)]
    assert sorted(e["reason"].split(":")[0] for e in errors) == [
        "customer is missing",
        "invalid JSON",
    ]
    rows = shard_rows(stream)
    assert all(r["planned_last"] is None and r["owner"] is None for r in rows)
    assert sum(r["records_in"] for r in rows) == 64
    assert sum(r["files"] for r in rows) == len(raw) + len(list_keys(bucket, "errors/"))

    # Downstream: the loader reads exactly the unique events.
    YamlFileRegistry(registry_path).save(
        Registry().with_streams([Stream(customer, "page_viewed"), Stream(customer, "add_to_cart")])
    )
    loaded = run_cli("load", "--grace-minutes", "0", env=pipeline)
    assert loaded.returncode == 0, loaded.stderr
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert len(message_ids(url, Stream(customer, "page_viewed"))) == 50
    assert len(message_ids(url, Stream(customer, "add_to_cart"))) == 10
