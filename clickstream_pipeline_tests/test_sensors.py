"""Sensor outputs, asserted exactly, against the real local S3 server and PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest

from clickstream_pipeline.definitions import defs
from clickstream_pipeline.jobs import LOAD_JOB, PARTITIONS_TAG
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import YamlFileRegistry
from clickstream_pipeline.resources import RegistryResource, S3StorageResource, WarehouseResource
from clickstream_pipeline.sensors import (
    DiscoveryResource,
    registry_sync_sensor,
    s3_discovery_sensor,
)
from clickstream_pipeline_tests.helpers import put_file, recent_hour, record

H1, H2, NEXT_HOUR = recent_hour(3), recent_hour(2), recent_hour(-1)


def key(stream: Stream, hour: datetime) -> str:
    return f"{hour:%Y-%m-%d-%H}:00|{stream}"


def resources() -> dict[str, object]:
    return {
        "s3": S3StorageResource(),
        "warehouse": WarehouseResource(),
        "registry": RegistryResource(),
        "discovery": DiscoveryResource(grace_minutes=0, batch_size=2),
    }


def tick(instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources())
    result = s3_discovery_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def partitions_of(result: dg.SensorResult) -> list[list[str]]:
    return [
        r.run_config["ops"]["load_partitions"]["config"]["partitions"]
        for r in result.run_requests or []
    ]


def register(path: Path, *streams: Stream) -> None:
    backend = YamlFileRegistry(path)
    with backend.edit() as edit:
        edit.registry = edit.registry.with_streams(streams)


def test_registry_sync_adds_new_streams_once(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance, customer: str
) -> None:
    register(registry_path, Stream(customer, "page_view"), Stream(customer, "add_to_cart"))
    context = dg.build_sensor_context(instance=instance, resources=resources())

    result = registry_sync_sensor(context)

    assert isinstance(result, dg.SensorResult)
    assert result.dynamic_partitions_requests == [
        dg.AddDynamicPartitionsRequest(
            "stream", [f"{customer}.add_to_cart", f"{customer}.page_view"]
        )
    ]
    instance.add_dynamic_partitions("stream", [f"{customer}.add_to_cart", f"{customer}.page_view"])
    assert registry_sync_sensor(context) == dg.SkipReason(
        "every registered stream is already a partition"
    )


def test_discovery_requests_completed_hours_of_registered_streams_only(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    stream, other, unregistered = (Stream(customer, e) for e in ("page_view", "signup", "login"))
    register(registry_path, stream, other)
    for hour in (H1, H2, NEXT_HOUR):
        put_file(bucket, stream, hour, "a", [record(f"{hour:%H}-1", hour)])
    put_file(bucket, other, H1, "a", [record("o1", H1)])
    put_file(bucket, unregistered, H1, "a", [record("u1", H1)])

    first = tick(instance)

    # Oldest hours first, two partitions per run (batch_size=2); the next hour is not complete.
    assert partitions_of(first) == [[key(stream, H1), key(other, H1)], [key(stream, H2)]]
    assert [r.tags[PARTITIONS_TAG] for r in first.run_requests or []] == ["2", "1"]
    assert all(re.fullmatch(r"\d{8}T\d{6}-\d", r.run_key or "") for r in first.run_requests or [])
    assert first.dynamic_partitions_requests == [
        dg.AddDynamicPartitionsRequest("stream", [str(stream), str(other)])
    ]
    cursor = json.loads(first.cursor or "")
    assert cursor["scanned"] == [str(stream), str(other)]
    assert sorted(cursor["requested"]) == sorted([key(stream, H1), key(other, H1), key(stream, H2)])

    # Requested but not loaded yet: the next tick asks for nothing again.
    assert partitions_of(tick(instance, first.cursor)) == []


def test_discovery_after_loads_late_files_and_registry_changes(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    stream = Stream(customer, "page_view")
    register(registry_path, stream)
    put_file(bucket, stream, H1, "a", [record("m1", H1)])
    first = tick(instance)
    instance.add_dynamic_partitions("stream", [str(stream)])
    job = defs.get_job_def(LOAD_JOB)
    [run] = first.run_requests or []
    assert job.execute_in_process(run_config=run.run_config, instance=instance).success

    loaded = tick(instance, first.cursor)
    assert partitions_of(loaded) == []
    assert json.loads(loaded.cursor or "")["requested"] == {}  # landed, so forgotten

    put_file(bucket, stream, H1, "late", [record("m2", H1)])
    late = tick(instance, loaded.cursor)
    assert partitions_of(late) == [[key(stream, H1)]]

    # Removed from the registry: new files are ignored...
    YamlFileRegistry(registry_path).save(
        YamlFileRegistry(registry_path).load().with_removed(customer)
    )
    put_file(bucket, stream, H2, "a", [record("m3", H2)])
    removed = tick(instance, late.cursor)
    assert partitions_of(removed) == []
    assert json.loads(removed.cursor or "")["scanned"] == []
    # ...until the stream is added back: every hour that is not loaded is requested.
    register(registry_path, stream)
    readded = tick(instance, removed.cursor)
    assert partitions_of(readded) == [[key(stream, H1), key(stream, H2)]]


@pytest.mark.parametrize("grace_minutes", [0, 24 * 60])
def test_grace_period_holds_back_recent_hours(
    pipeline: dict[str, str],
    registry_path: Path,
    instance: dg.DagsterInstance,
    customer: str,
    grace_minutes: int,
) -> None:
    stream = Stream(customer, "page_view")
    register(registry_path, stream)
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H2, "a", [record("m1", H2)])
    context = dg.build_sensor_context(
        instance=instance,
        resources={**resources(), "discovery": DiscoveryResource(grace_minutes=grace_minutes)},
    )
    result = s3_discovery_sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert partitions_of(result) == ([[key(stream, H2)]] if grace_minutes == 0 else [])
