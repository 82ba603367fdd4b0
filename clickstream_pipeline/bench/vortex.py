"""Vortex: one ``clickstream vortex`` process from the local Kinesis stream to the local S3 server,
beside a bare boto3 read of the same stream; its peak RSS at two stream lengths; and one stream
end to end (put, vortex to S3, ``clickstream load`` into PostgreSQL) with its rows checked."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg2
from psycopg2 import sql

from clickstream_pipeline.bench.common import Measured, run_measured, stack_process
from clickstream_pipeline.generator import _record_factory, customer_names, event_names
from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.vortex.kinesis import ensure_stream, kinesis_client, put_records
from clickstream_pipeline.vortex.leases import LeaseStore

MODULE = "clickstream_pipeline.bench.vortex"
SHARDS = 4
STREAMS = [Stream(c, e) for c in customer_names(5) for e in event_names(4)]
HOURS = 2
# Some records are put twice (a producer's retry) and some cannot be routed (they go to
# errors/): the rows loaded must equal the unique valid events put, exactly.
DUPLICATE_RATE = 0.01
UNROUTABLE_RATE = 0.005
# The bare read's GetRecords size, the same as vortex's (VortexConfig.get_records_limit).
GET_RECORDS_LIMIT = 10_000


def run(events: int = 200_000, end_to_end_events: int = 1_000_000) -> dict[str, Any]:
    """Throughput and peak RSS at ``events`` and twice as many, then the end to end run."""
    from clickstream_pipeline.vortex import VortexConfig

    results: dict[str, Any] = {
        "shards": SHARDS,
        "events": events,
        "flush_limits": {  # vortex's defaults, which the runs use
            "max_records": VortexConfig.max_records,
            "max_bytes": VortexConfig.max_bytes,
            "max_delay_seconds": VortexConfig.max_delay_seconds,
        },
        "lengths": {},
    }
    first_hour = hour_floor(datetime.now(UTC)) - timedelta(hours=HOURS + 1)
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as root,
        stack_process(Path(root) / "stack") as stack,
    ):
        env = stack.env
        os.environ.update(env)
        for length in (events, 2 * events):
            stream = f"bench-vortex-{length}"
            put = _put(env, stream, length, first_hour)
            bare = run_measured([MODULE, "read", stream], env)
            if bare.result["records"] != length:
                raise RuntimeError(f"the bare read got {bare.result['records']:,} of {length:,}")
            vortex = _vortex(env, stream, f"bench-vortex-{length}/raw", length)
            results["lengths"][str(length)] = {
                "stream_bytes": put.result["bytes"],
                "vortex": _row(length, vortex),
                "bare_read": _row(length, bare),
            }
            _delete_stream(stream)
        at_n = results["lengths"][str(events)]
        results["vortex_vs_bare_read"] = round(
            at_n["vortex"]["events_per_second"] / at_n["bare_read"]["events_per_second"], 3
        )
        rss = [results["lengths"][str(n)]["vortex"]["peak_rss_mb"] for n in (events, 2 * events)]
        results["rss_growth"] = round(rss[1] / rss[0], 3)
        results["end_to_end"] = _end_to_end(Path(root), env, end_to_end_events, first_hour)
    return results


def _put(env: dict[str, str], stream: str, count: int, first_hour: datetime) -> Measured:
    ensure_stream(kinesis_client(), stream, SHARDS)
    put = run_measured([MODULE, "put", stream, str(count), first_hour.isoformat()], env)
    if put.result["records"] != count:
        raise RuntimeError(f"{put.result['records']:,} of {count:,} records were put")
    return put


def _vortex(env: dict[str, str], stream: str, raw_prefix: str, count: int) -> Measured:
    measured = run_measured(
        [MODULE, "vortex", stream, str(count)], {**env, "CLICKSTREAM_RAW_PREFIX": raw_prefix}
    )
    if measured.result["records_in"] != count:
        raise RuntimeError(f"vortex read {measured.result['records_in']:,} of {count:,} records")
    return measured


def _delete_stream(stream: str) -> None:
    """The local server keeps every record in memory: free a measured stream's."""
    kinesis_client().delete_stream(StreamName=stream, EnforceConsumerDeletion=True)


def _row(events: int, measured: Measured) -> dict[str, Any]:
    seconds = float(measured.result["seconds"])
    return {
        "seconds": round(seconds, 2),
        "events_per_second": round(events / seconds),
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "cpu_seconds": round(measured.cpu_seconds, 2),
        "process_wall_seconds": round(measured.wall_seconds, 2),
        **{k: v for k, v in measured.result.items() if k not in ("seconds", "records_in")},
    }


def _end_to_end(
    root: Path, env: dict[str, str], events: int, first_hour: datetime
) -> dict[str, Any]:
    """Put ``events`` on a stream, vortex them to S3, ``clickstream load`` them: each stage's
    time, and the rows loaded, which must equal the unique valid events put."""
    stream = "bench-vortex-end-to-end"
    raw_prefix = "bench-vortex-end-to-end/raw"
    put = _put(env, stream, events, first_hour)
    vortex = _vortex(env, stream, raw_prefix, events)
    _delete_stream(stream)
    registry = root / "vortex-registry.yaml"
    YamlFileRegistry(registry).save(Registry().with_streams(STREAMS))
    home = Path(tempfile.mkdtemp(dir=root))
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    load = run_measured(
        ["clickstream_pipeline.cli", "load", "--grace-minutes", "0"],
        {
            **env,
            "CLICKSTREAM_REGISTRY": str(registry),
            "DAGSTER_HOME": str(home),
            "CLICKSTREAM_RAW_PREFIX": raw_prefix,
        },
    )
    rows = _rows_loaded(env["CLICKSTREAM_WAREHOUSE_URL"])
    expected = put.result["unique_valid"]
    if rows != expected:
        raise RuntimeError(
            f"end to end: {rows:,} rows loaded, {expected:,} unique valid events put"
        )
    stages = {
        "put": (put.result["seconds"], put),
        "vortex": (vortex.result["seconds"], vortex),
        "load": (load.wall_seconds, load),
    }
    total = sum(seconds for seconds, _ in stages.values())
    return {
        "events": events,
        "unique_valid_events": expected,
        "duplicates_put": put.result["duplicates"],
        "unroutable_put": put.result["unroutable"],
        "rows_loaded": rows,
        "vortex_files": vortex.result["files"],
        "total_seconds": round(total, 1),
        "stages": {
            name: {
                "seconds": round(seconds, 1),
                "share": round(seconds / total, 3),
                "peak_rss_mb": round(measured.peak_rss_mb, 1),
                "cpu_seconds": round(measured.cpu_seconds, 1),
            }
            for name, (seconds, measured) in stages.items()
        },
    }


def _rows_loaded(url: str) -> int:
    rows = 0
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        for stream in STREAMS:
            table = sql.Identifier(stream.customer, stream.event)
            cur.execute("SELECT to_regclass(%s)", (f"{stream.customer}.{stream.event}",))
            found = cur.fetchone()
            if found is not None and found[0] is not None:
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
                counted = cur.fetchone()
                rows += int(counted[0]) if counted else 0
    conn.close()
    return rows


# --- records -------------------------------------------------------------------------------


def stream_records(
    count: int, first_hour: datetime, seed: int = 0
) -> tuple[list[tuple[bytes, str]], dict[str, int]]:
    """``count`` (data, partition key) records: Segment track calls with ``customer``, spread
    over ``STREAMS`` x ``HOURS`` hours from ``first_hour``, some put twice and some unroutable;
    and how many of each kind."""
    rng = random.Random(seed)
    random_ = rng.random
    makers = [
        (stream, _record_factory(stream, first_hour + timedelta(hours=h), rng))
        for stream in STREAMS
        for h in range(HOURS)
    ]
    recent: deque[tuple[bytes, str]] = deque(maxlen=1024)
    records: list[tuple[bytes, str]] = []
    counts = {"unique_valid": 0, "duplicates": 0, "unroutable": 0}
    for _ in range(count):
        roll = random_()
        if roll < DUPLICATE_RATE and recent:
            records.append(recent[int(random_() * len(recent))])
            counts["duplicates"] += 1
            continue
        stream, make = makers[int(random_() * len(makers))]
        record = {"customer": stream.customer, **make()}
        key = str(record["messageId"])
        if roll < DUPLICATE_RATE + UNROUTABLE_RATE:
            records.append((_unroutable(record, rng), key))
            counts["unroutable"] += 1
            continue
        # A copy: orjson's bytes keep a 4 KiB buffer, 4 GB for a million records held here.
        data = bytes(memoryview(orjson.dumps(record)))
        recent.append((data, key))
        records.append((data, key))
        counts["unique_valid"] += 1
    return records, counts


def _unroutable(record: dict[str, object], rng: random.Random) -> bytes:
    kind = int(rng.random() * 3)
    if kind == 0:
        line = orjson.dumps(record)
        return line[: len(line) // 2]  # not JSON
    del record["customer" if kind == 1 else "receivedAt"]
    return orjson.dumps(record)


# --- child processes ------------------------------------------------------------------------


def child_put(stream: str, count: str, first_hour: str) -> dict[str, Any]:
    """Build the records, then put them (timed) 500 a call, as ``put_records`` does."""
    records, counts = stream_records(
        int(count), datetime.fromisoformat(first_hour), seed=zlib.crc32(stream.encode())
    )
    kinesis = kinesis_client()
    began = time.perf_counter()
    put = put_records(kinesis, stream, records)
    return {
        "seconds": time.perf_counter() - began,
        "records": put,
        "bytes": sum(len(data) for data, _ in records),
        **counts,
    }


def child_read(stream: str) -> dict[str, Any]:
    """The bare read: GetShardIterator TRIM_HORIZON, then GetRecords over each shard until a
    call returns nothing; the records are only counted."""
    import boto3

    kinesis = boto3.session.Session().client("kinesis")
    began = time.perf_counter()
    records = calls = 0
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            response = kinesis.get_records(ShardIterator=iterator, Limit=GET_RECORDS_LIMIT)
            calls += 1
            if not response["Records"]:
                break
            records += len(response["Records"])
            iterator = response.get("NextShardIterator")
    return {"seconds": time.perf_counter() - began, "records": records, "get_records_calls": calls}


class _TimedLeaseStore:
    """A worker's lease store, noting when the last batch was committed: the stream is in S3
    and checkpointed then."""

    def __init__(self, store: LeaseStore) -> None:
        self._store = store
        self.last_commit = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def commit(self, *args: Any, **kwargs: Any) -> None:
        self._store.commit(*args, **kwargs)
        self.last_commit = max(self.last_commit, time.perf_counter())


class _CountingKinesis:
    """A worker's Kinesis client, counting the records GetRecords returns: once every record
    put was read, ``on_all_read`` (the reader that read the last ones still batches them
    before it sees the stop)."""

    def __init__(self, client: Any, records: int, on_all_read: Callable[[], None]) -> None:
        self._client = client
        self._left = records
        self._on_all_read = on_all_read
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_records(self, **request: Any) -> Any:
        response = self._client.get_records(**request)
        with self._lock:
            self._left -= len(response.get("Records", []))
            done = self._left <= 0
        if done:
            self._on_all_read()
        return response


def child_vortex(stream: str, records: str) -> dict[str, Any]:
    """The worker ``clickstream vortex --stream STREAM`` runs (its defaults and logging),
    stopped as SIGTERM stops it the moment all ``records`` put are read: readers write what
    they batched, then it exits. Seconds from the start to the last batch committed.

    Not ``--until-idle``: its idle wait would be counted as work."""
    from clickstream_pipeline.vortex import vortex_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    with vortex_worker(stream) as worker:
        store = _TimedLeaseStore(worker.store)
        worker.store = store  # type: ignore[assignment]
        worker.kinesis = _CountingKinesis(worker.kinesis, int(records), worker.stop)
        began = time.perf_counter()
        totals = worker.run()
        ended = time.perf_counter()
    return {
        "seconds": store.last_commit - began,
        "run_seconds": round(ended - began, 2),
        "records_in": totals.records_in,
        "records_out": totals.records_out,
        "files": totals.files,
        "bytes_out": totals.bytes_out,
        "duplicates": totals.duplicates,
        "errors": totals.errors,
    }


def main(argv: list[str]) -> None:
    commands: dict[str, Callable[..., dict[str, Any]]] = {
        "put": child_put,
        "read": child_read,
        "vortex": child_vortex,
    }
    print(json.dumps(commands[argv[0]](*argv[1:])))  # noqa: T201 - the parent reads this line


if __name__ == "__main__":
    main(sys.argv[1:])
