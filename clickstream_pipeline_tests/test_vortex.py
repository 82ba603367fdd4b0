"""Vortex, the microbatcher, on the embedded stack: the local Kinesis and S3 server and the
embedded PostgreSQL (leases, checkpoints, and the warehouse the files load into)."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
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
from clickstream_pipeline_tests.helpers import (
    free_port,
    message_ids,
    recent_hour,
    run_cli,
    wait_for,
)
from clickstream_pipeline_tests.moto_kinesis import fix_moto_resharding

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


def new_worker(stream: str, bucket: str, kinesis: Any = None, **overrides: Any) -> Vortex:
    """A worker on the session's PostgreSQL and S3 server (a 6 s lease unless overridden)."""
    return Vortex(
        VortexConfig(stream=stream, bucket=bucket, **{"lease_seconds": 6.0, **overrides}),
        LeaseStore(os.environ["CLICKSTREAM_WAREHOUSE_URL"]),
        s3_client(),
        kinesis,
    )


def run_vortex(stream: str, bucket: str, until_idle: float = 1.5, **overrides: Any) -> Vortex:
    worker = new_worker(stream, bucket, **overrides)
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

    # A parent recorded but never read to its end that ages out of the stream (no longer
    # listed) has nothing left to read: its child does not wait for it forever.
    store.sync_shards(
        name,
        [
            ShardInfo("shardId-000000000001", ("shardId-000000000000",)),
            ShardInfo("shardId-000000000002", (), "20"),
            ShardInfo("shardId-000000000003", ("shardId-000000000002",)),
        ],
    )
    assert [s.shard_id for s in store.acquire(name, "w", 30, 4)] == ["shardId-000000000002"]
    store.sync_shards(
        name,
        [
            ShardInfo("shardId-000000000001", ("shardId-000000000000",)),
            ShardInfo("shardId-000000000003", ("shardId-000000000002",)),
        ],
    )
    assert [s.shard_id for s in store.acquire(name, "w", 30, 4)] == ["shardId-000000000003"]


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


# -- crashes, takeovers, resharding and Kinesis faults ----------------------------------------


def start_vortex(
    stream: str, env: dict[str, str], log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """``clickstream vortex`` in a process group of its own, as a user runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "clickstream_pipeline.cli", "vortex", "--stream", stream, *args],
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def valid_records(
    customer: str, count: int, hour: datetime, prefix: str = "m"
) -> list[dict[str, Any]]:
    return [
        track(customer, "Page Viewed", f"{prefix}{i}", hour + timedelta(seconds=i))
        for i in range(count)
    ]


def written_ids(bucket: str) -> list[str]:
    """Every messageId in the raw files, with repeats."""
    return [line["messageId"] for key in list_keys(bucket, "raw/") for line in lines(bucket, key)]


@pytest.fixture
def commits_held(local_stack: dict[str, str], stream: str) -> Iterator[None]:
    """Checkpoint commits of ``stream`` wait in the database (a trigger sleeps), so a worker can
    be killed after its upload and before its checkpoint."""
    url = local_stack["CLICKSTREAM_WAREHOUSE_URL"]
    LeaseStore(url).ensure_schema()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "CREATE OR REPLACE FUNCTION clickstream.hold_commit() RETURNS trigger AS $$ BEGIN "
            "PERFORM pg_sleep(300); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        cur.execute(
            f"CREATE TRIGGER hold_{stream} BEFORE UPDATE ON clickstream.vortex_shards FOR EACH ROW "
            f"WHEN (NEW.stream = '{stream}' AND NEW.checkpoint IS DISTINCT FROM OLD.checkpoint) "
            "EXECUTE FUNCTION clickstream.hold_commit()"
        )
    try:
        yield
    finally:
        with conn.cursor() as cur:
            # The held commits first: DROP TRIGGER would wait for them (up to the trigger's
            # 300 s sleep) when the test ends before it has ended them itself.
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE "
                "'%%vortex_shards%%' AND state = 'active' AND pid <> pg_backend_pid()"
            )
            cur.execute(f"DROP TRIGGER IF EXISTS hold_{stream} ON clickstream.vortex_shards")
        conn.close()


def test_killed_between_upload_and_checkpoint_a_restart_rewrites_the_same_objects(
    pipeline: dict[str, str], stream: str, customer: str, commits_held: None, tmp_path: Path
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    records = valid_records(customer, 40, recent_hour(2)) + valid_records(
        customer, 40, recent_hour(1), "n"
    )
    put_records(kinesis_client(), stream, encoded(*records))
    process = start_vortex(
        stream, pipeline, tmp_path / "vortex.log", "--lease-seconds", "3", "--max-delay", "1"
    )
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]

    def commit_waiting() -> bool:
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'clickstream-vortex' AND wait_event = 'PgSleep' AND query LIKE %s",
                (f"%{stream}%",),
            )
            (waiting,) = cur.fetchone() or (0,)
        conn.close()
        return bool(waiting)

    try:
        # A worker has one database connection: the first shard's checkpoint holds it, so the
        # other shard's batch may be planned (and uploaded) before that, or not at all.
        def uploaded() -> tuple[set[str], dict[str, str]] | None:
            planned = {k for r in shard_rows(stream) for k in r["planned_keys"] or ()}
            found = objects(bucket, "raw/")
            if planned and planned == set(found) and commit_waiting():
                return planned, found
            return None

        planned, before = wait_for(uploaded, "a batch uploaded, its commit waiting", 120)
    finally:
        kill(process)
    assert all(r["checkpoint"] is None for r in shard_rows(stream))  # nothing committed

    # The commit that was waiting dies with its worker (the server would otherwise finish it
    # once the trigger's sleep ends); a new worker takes the shards over once the leases
    # expire and replays each planned batch.
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'clickstream-vortex' AND query LIKE %s",
            (f"%{stream}%",),
        )
        assert cur.fetchone() == (1,)  # one connection per worker
        cur.execute(f"DROP TRIGGER hold_{stream} ON clickstream.vortex_shards")
    conn.close()
    worker = run_vortex(stream, bucket)

    after = objects(bucket, "raw/")
    assert planned <= set(after)
    assert {key: after[key] for key in before} == before  # the same keys, the same bytes
    assert sorted(written_ids(bucket)) == sorted(r["messageId"] for r in records)
    assert worker.totals.records_in == 80
    rows = shard_rows(stream)
    assert all(r["checkpoint"] is not None and r["planned_last"] is None for r in rows)
    assert [r["lease_counter"] for r in rows] == [2, 2]  # each shard was taken over once


def test_two_workers_share_the_shards_and_one_takes_over_when_the_other_dies(
    pipeline: dict[str, str], customer: str, tmp_path: Path
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    stream = f"s{uuid.uuid4().hex[:10]}"
    ensure_stream(kinesis_client(), stream, 4)
    hour = recent_hour(1)
    first = valid_records(customer, 200, hour)
    put_records(kinesis_client(), stream, encoded(*first))
    args = ("--lease-seconds", "3", "--max-delay", "0.5")
    a = start_vortex(stream, pipeline, tmp_path / "a.log", *args)
    b = start_vortex(stream, pipeline, tmp_path / "b.log", *args)
    try:

        def shared() -> list[str] | None:
            owners = sorted(r["owner"] or "" for r in shard_rows(stream))
            return owners if len(set(owners)) == 2 and "" not in owners else None

        owners = wait_for(shared, "the two workers holding two shards each", 60)
        assert owners.count(owners[0]) == 2
        wait_for(lambda: len(written_ids(bucket)) == 200, "the first records written", 60)
        kill(a)
        second = valid_records(customer, 200, hour, "late")
        put_records(kinesis_client(), stream, encoded(*second))

        def taken_over() -> bool:
            rows = shard_rows(stream)
            return len({r["owner"] for r in rows}) == 1 and len(written_ids(bucket)) == 400

        wait_for(taken_over, "the survivor holding all four shards, every record written", 90)
    finally:
        kill(a) if a.poll() is None else None
        b.send_signal(signal.SIGTERM)
        b.wait(60)
    assert b.returncode == 0
    assert sorted(written_ids(bucket)) == sorted(r["messageId"] for r in first + second)


def test_a_split_and_a_merge_mid_stream_lose_and_double_nothing(
    pipeline: dict[str, str], customer: str, registry_path: Path
) -> None:
    fix_moto_resharding()
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    stream = f"s{uuid.uuid4().hex[:10]}"
    kinesis = kinesis_client()
    ensure_stream(kinesis, stream, 2)
    hour = recent_hour(1)
    worker = new_worker(stream, bucket, max_delay_seconds=0.5, lease_seconds=3.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        put_records(kinesis, stream, encoded(*valid_records(customer, 100, hour, "a")))
        shards = [s["ShardId"] for s in kinesis.list_shards(StreamName=stream)["Shards"]]
        kinesis.split_shard(
            StreamName=stream, ShardToSplit=shards[0], NewStartingHashKey=str(2**126)
        )
        put_records(kinesis, stream, encoded(*valid_records(customer, 100, hour, "b")))
        open_shards = [  # by hash range: the first two are adjacent
            s["ShardId"]
            for s in sorted(
                kinesis.list_shards(StreamName=stream)["Shards"],
                key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]),
            )
            if "EndingSequenceNumber" not in s["SequenceNumberRange"]
        ]
        kinesis.merge_shards(
            StreamName=stream, ShardToMerge=open_shards[0], AdjacentShardToMerge=open_shards[1]
        )
        put_records(kinesis, stream, encoded(*valid_records(customer, 100, hour, "c")))
        wait_for(lambda: len(written_ids(bucket)) >= 300, "every record written", 90)
        time.sleep(2)  # nothing more may come: no record is written twice
    finally:
        worker.stop()
        thread.join(60)
    ids = written_ids(bucket)
    assert len(ids) == len(set(ids)) == 300
    rows = {r["shard_id"]: r for r in shard_rows(stream)}
    assert len(rows) == 5  # 2 + 2 children of the split + 1 child of the merge
    assert sum(r["records_in"] for r in rows.values()) == 300
    assert sum(r["finished"] for r in rows.values()) == 3  # the closed parents, read to the end

    YamlFileRegistry(registry_path).save(Registry().with_streams([Stream(customer, "page_viewed")]))
    loaded = run_cli("load", "--grace-minutes", "0", env=pipeline)
    assert loaded.returncode == 0, loaded.stderr
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert len(message_ids(url, Stream(customer, "page_viewed"))) == 300


def test_expired_iterators_and_throttling_are_waited_out(
    pipeline: dict[str, str], stream: str, customer: str
) -> None:
    """moto never expires an iterator nor throttles: Kinesis's answers are injected at the
    client, before the request is sent."""
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    records = valid_records(customer, 50, recent_hour(1))
    put_records(kinesis_client(), stream, encoded(*records))
    kinesis = kinesis_client()
    faults = iter(["ExpiredIteratorException", "ProvisionedThroughputExceededException"] * 3)
    injected: list[str] = []

    def fault(**_: Any) -> tuple[Any, dict[str, Any]] | None:
        code = next(faults, None)
        if code is None:
            return None
        injected.append(code)
        error = {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return (None, error)

    kinesis.meta.events.register("before-call.kinesis.GetRecords", fault)
    worker = new_worker(stream, bucket, kinesis)
    worker.run(until_idle=1.5)
    assert len(injected) == 6
    assert sorted(written_ids(bucket)) == sorted(r["messageId"] for r in records)
    assert worker.totals.records_in == 50


# -- operations: metrics and health ----------------------------------------------------------


def test_metrics_expose_each_shards_counters_lag_and_lease(
    pipeline: dict[str, str], stream: str, customer: str, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    bucket = pipeline["CLICKSTREAM_BUCKET"]
    records: list[dict[str, Any] | bytes] = [*valid_records(customer, 30, recent_hour(1))]
    records += [records[0], b"{broken"]
    put_records(kinesis_client(), stream, encoded(*records))
    run_vortex(stream, bucket)
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "clickstream_pipeline.cli", "metrics", "--port", str(port)],
        env={**os.environ, **pipeline},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    return str(r.read().decode())
            except OSError:
                return None

        text = wait_for(scrape, "the metrics endpoint", 60)
    finally:
        exporter.terminate()
        exporter.wait(30)
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("stream") == stream:
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    assert {name: value for name, value in samples.items() if "vortex" in name} == {
        "clickstream_vortex_records_read_total": 32.0,
        "clickstream_vortex_bytes_read_total": float(sum(len(d) for d, _ in encoded(*records))),
        "clickstream_vortex_records_written_total": 30.0,
        "clickstream_vortex_bytes_written_total": samples["clickstream_vortex_bytes_written_total"],
        "clickstream_vortex_files_written_total": float(
            len(list_keys(bucket, "raw/")) + len(list_keys(bucket, "errors/"))
        ),
        "clickstream_vortex_duplicates_dropped_total": 1.0,
        "clickstream_vortex_errors_total": 1.0,
        "clickstream_vortex_millis_behind_latest": 0.0,
        "clickstream_vortex_shard_held": 0.0,  # the worker left when the stream was drained
        "clickstream_vortex_shard_read_failing_seconds": 0.0,
    }
    assert samples["clickstream_vortex_bytes_written_total"] == sum(
        s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
        for key in list_keys(bucket, "raw/") + list_keys(bucket, "errors/")
    )


def test_health_says_whether_every_shard_is_being_read(
    pipeline: dict[str, str], stream: str, tmp_path: Path
) -> None:
    env = {**pipeline, "CLICKSTREAM_KINESIS_STREAM": stream}

    def vortex_line() -> str:
        result = run_cli("health", "--no-daemon", env=env)
        (line,) = [line for line in result.stdout.splitlines() if "vortex" in line]
        return " ".join(line.replace("│", " ").split())

    assert vortex_line() == f"vortex DOWN no vortex worker has read stream '{stream}' yet"
    process = start_vortex(stream, pipeline, tmp_path / "vortex.log", "--lease-seconds", "6")
    try:
        wait_for(lambda: len([r for r in shard_rows(stream) if r["owner"]]) == 2, "shards held", 60)
        assert (
            vortex_line() == f"vortex up 2 shards of {stream} read by 1 worker, at most 0 ms behind"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0
    down = vortex_line()
    assert down.startswith("vortex DOWN 2 of 2 shards held by no live worker: shardId-")


@pytest.mark.slow(seconds=45)
def test_the_demo_goes_from_the_stream_to_exact_rows(tmp_path: Path) -> None:
    """`clickstream demo` (what `make demo` runs), smaller: events on the stream, vortex, S3,
    Dagster, tables holding exactly the unique valid events, late events reloaded."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clickstream_pipeline.cli",
            "demo",
            *("--root", str(tmp_path / "demo"), "--customers", "2", "--events", "2"),
            *("--hours", "2", "--events-per-file", "300"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("CLICKSTREAM_", "AWS_"))},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == (
        "every table holds exactly the unique valid events: nothing lost, nothing twice"
    )
    (vortex_line,) = [line for line in lines if line.startswith("vortex: ")]
    assert "duplicates dropped within batches" in vortex_line
    assert "a third load found 0 to do" in done.stdout


def test_kinesis_unreachable_for_a_while_is_waited_out_and_then_is_one_error(
    pipeline: dict[str, str], stream: str, customer: str
) -> None:
    from botocore.exceptions import EndpointConnectionError

    from clickstream_pipeline.errors import ClickstreamError

    bucket = pipeline["CLICKSTREAM_BUCKET"]
    records = valid_records(customer, 20, recent_hour(1))
    put_records(kinesis_client(), stream, encoded(*records))
    refusals = {"left": 2}

    def unreachable(**_: Any) -> None:
        if refusals["left"]:
            refusals["left"] -= 1
            raise EndpointConnectionError(endpoint_url="http://kinesis.invalid")

    def worker(kinesis: Any) -> Vortex:
        return new_worker(stream, bucket, kinesis, lease_seconds=3.0)

    # One attempt per call: botocore's own retries would wait each refusal out first.
    flaky = kinesis_client(max_attempts=1)
    flaky.meta.events.register("before-send.kinesis.ListShards", unreachable)
    worked = worker(flaky)
    worked.run(until_idle=1.0)
    assert refusals["left"] == 0 and worked.totals.records_in == 20

    refusals["left"] = 1_000
    down = kinesis_client(max_attempts=1)
    down.meta.events.register("before-send.kinesis.ListShards", unreachable)
    with pytest.raises(ClickstreamError, match=r"^cannot reach Kinesis to list the shards of"):
        worker(down).run(until_idle=1.0)


def test_a_worker_holds_no_more_shards_than_its_cap(
    pipeline: dict[str, str], customer: str
) -> None:
    stream = f"s{uuid.uuid4().hex[:10]}"
    ensure_stream(kinesis_client(), stream, 4)
    worker = new_worker(stream, pipeline["CLICKSTREAM_BUCKET"], lease_seconds=3.0, max_shards=3)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(shard_rows(stream)) == 4, "the shards recorded", 30)
        time.sleep(3)  # three ticks: it stays at its cap
        assert sorted(bool(r["owner"]) for r in shard_rows(stream)) == [False, True, True, True]
    finally:
        worker.stop()
        thread.join(60)


def test_until_idle_waits_for_slow_reads_rather_than_taking_them_for_an_idle_stream(
    pipeline: dict[str, str], stream: str, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    records = valid_records(customer, 40, recent_hour(1))
    put_records(kinesis_client(), stream, encoded(*records))
    slow = kinesis_client()
    slowed = {"left": 4}

    def take_long(**_: Any) -> None:
        if slowed["left"]:
            slowed["left"] -= 1
            time.sleep(2.5)  # longer than the idle time: a big GetRecords on a busy stream

    slow.meta.events.register("before-send.kinesis.GetRecords", take_long)
    worker = new_worker(
        stream,
        bucket,
        slow,
        get_records_limit=10,  # four reads for the 40 records
    )
    worker.run(until_idle=1.0)
    assert slowed["left"] == 0
    assert worker.totals.records_in == 40
    assert sorted(written_ids(bucket)) == sorted(r["messageId"] for r in records)


def test_the_kinesis_client_reads_arrival_times_in_utc(stream: str) -> None:
    kinesis = kinesis_client()
    put_records(kinesis, stream, [(b"{}", "k")])
    before = datetime.now(UTC)
    records = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        records += kinesis.get_records(ShardIterator=iterator)["Records"]
    (record,) = records
    arrival = record["ApproximateArrivalTimestamp"]
    assert arrival.tzinfo is UTC
    assert abs(arrival - before) < timedelta(seconds=30)
    summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    assert summary["StreamCreationTimestamp"].tzinfo is UTC


# -- a shard whose reads keep failing ----------------------------------------------------------


@pytest.fixture
def reads_fail(local_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """While ``["on"]``, every GetRecords of the local Kinesis server (it runs in this process)
    answers HTTP 500, as moto did on a release the local speed-up did not fit."""
    from moto.kinesis.models import Shard

    state = {"on": True}
    working = Shard.get_records

    def get_records(self: Shard, last_sequence_id: str, limit: int | None) -> Any:
        if state["on"]:
            raise RuntimeError("injected server error")
        return working(self, last_sequence_id, limit)

    monkeypatch.setattr(Shard, "get_records", get_records)
    return state


def test_until_idle_a_shard_whose_reads_keep_failing_is_one_error_after_six_ticks(
    pipeline: dict[str, str], stream: str, customer: str, reads_fail: dict[str, bool]
) -> None:
    put_records(kinesis_client(), stream, encoded(*valid_records(customer, 10, recent_hour(1))))
    done = subprocess.run(
        [
            *(sys.executable, "-m", "clickstream_pipeline.cli", "vortex", "--stream", stream),
            *("--until-idle", "1", "--lease-seconds", "3"),  # ticks of 1 s
        ],
        env={**os.environ, **pipeline},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert re.fullmatch(
        rf"clickstream: error: shard shardId-00000000000[01] of '{stream}': reads failed for "
        r"6 ticks in a row: An error occurred \(500\) when calling the GetRecords operation.*",
        last,
    ), last
    assert "Traceback" not in done.stderr
    # Nothing was read, so nothing is checkpointed: a later run reads every record.
    assert {row["checkpoint"] for row in shard_rows(stream)} == {None}


def test_a_service_shows_failing_reads_in_metrics_and_health_and_recovers(
    pipeline: dict[str, str], stream: str, customer: str, reads_fail: dict[str, bool]
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from clickstream_pipeline.metrics import PipelineCollector
    from clickstream_pipeline.warehouse import warehouse_for_url

    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    env = {**pipeline, "CLICKSTREAM_KINESIS_STREAM": stream}
    records = valid_records(customer, 10, recent_hour(1))
    put_records(kinesis_client(), stream, encoded(*records))
    worker = new_worker(
        stream, pipeline["CLICKSTREAM_BUCKET"], lease_seconds=3.0, max_delay_seconds=1.0
    )
    service = threading.Thread(target=worker.run, daemon=True)
    service.start()
    try:
        failing = wait_for(
            lambda: [r for r in shard_rows(stream) if r["read_error"]] or None,
            "shards recorded as failing",
            60,
        )
        assert failing[0]["read_error"].startswith(
            "An error occurred (500) when calling the GetRecords operation"
        )
        # Two minutes of failures, as the clock would have it, without waiting them out.
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE clickstream.vortex_shards SET failing_since = now() - interval '120 s' "
                "WHERE stream = %s",
                (stream,),
            )
        registry = CollectorRegistry()
        registry.register(PipelineCollector(lambda: warehouse_for_url(url), vortex_url=url))
        scraped = generate_latest(registry).decode()
        seconds = {
            sample.labels["shard"]: sample.value
            for family in text_string_to_metric_families(scraped)
            for sample in family.samples
            if sample.name == "clickstream_vortex_shard_read_failing_seconds"
            and sample.labels["stream"] == stream
        }
        assert sorted(seconds) == ["shardId-000000000000", "shardId-000000000001"]
        assert all(120 <= value < 180 for value in seconds.values()), seconds
        health = run_cli("health", "--no-daemon", env=env)
        assert health.returncode == 1
        # The table wraps a long detail onto the rows below: read it as one text.
        table = " ".join(health.stdout.replace("│", " ").split())
        assert re.search(
            r"vortex DOWN reads of 2 of 2 shards failing: shardId-000000000000 for 12\d s: "
            r"An error occurred \(500\) when calling the GetRecords operation",
            table,
        ), health.stdout
        assert service.is_alive()  # a service keeps backing off; it does not exit

        reads_fail["on"] = False
        wait_for(
            lambda: all(r["read_error"] is None for r in shard_rows(stream)) or None,
            "reads working again",
            90,
        )
        wait_for(lambda: sorted(written_ids(pipeline["CLICKSTREAM_BUCKET"])) or None, "files", 60)
    finally:
        worker.stop()
        service.join(60)
    assert sorted(written_ids(pipeline["CLICKSTREAM_BUCKET"])) == sorted(
        r["messageId"] for r in records
    )
    assert {r["failing_seconds"] for r in shard_rows(stream)} == {None}
