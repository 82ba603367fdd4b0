"""Sensor outputs, asserted exactly, against the real local S3 server and PostgreSQL."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.jobs import LOAD_JOB, PARTITIONS_TAG
from clickstream_pipeline.layout import hour_key
from clickstream_pipeline.loader import fingerprint
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import YamlFileRegistry
from clickstream_pipeline.resources import (
    DiscoveryResource,
    RegistryResource,
    S3StorageResource,
    WarehouseResource,
)
from clickstream_pipeline.sensors import (
    RegistryChange,
    build_registry_sync_sensor,
    build_s3_discovery_sensor,
)
from clickstream_pipeline.warehouse.base import SourceFile
from clickstream_pipeline.webserver import DagsterWebserverResource
from clickstream_pipeline_tests.helpers import (
    defs_for,
    free_port,
    load_keys,
    put_file,
    recent_hour,
    record,
)

H1, H2, NEXT_HOUR = recent_hour(3), recent_hour(2), recent_hour(-1)


def resources(**discovery: int) -> dict[str, object]:
    return {
        "s3": S3StorageResource(),
        "warehouse": WarehouseResource(),
        "registry": RegistryResource(),
        "discovery": DiscoveryResource(**{"grace_minutes": 0, "batch_size": 2, **discovery}),
        "webserver": DagsterWebserverResource(url=f"http://127.0.0.1:{free_port()}"),
    }


def tick(
    instance: dg.DagsterInstance, loaded: tuple[Stream, ...], cursor: str | None = None
) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources())
    result = build_s3_discovery_sensor(loaded)(context)
    assert isinstance(result, dg.SensorResult)
    return result


def partitions_of(result: dg.SensorResult) -> list[list[str]]:
    return [
        r.run_config["ops"]["load_partitions"]["config"]["partitions"]
        for r in result.run_requests or []
    ]


def raw_reported(result: dg.SensorResult) -> list[tuple[str, str | None, Any]]:
    return [
        (event.asset_key.to_user_string(), event.partition, event.metadata["files"].value)
        for event in result.asset_events or []
    ]


def register(path: Path, *streams: Stream) -> None:
    backend = YamlFileRegistry(path)
    with backend.edit() as edit:
        edit.registry = edit.registry.with_streams(streams)


def test_registry_sync_skips_while_the_location_has_every_registered_table(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance, customer: str
) -> None:
    streams = (Stream(customer, "add_to_cart"), Stream(customer, "page_view"))
    register(registry_path, *streams)
    context = dg.build_sensor_context(instance=instance, resources=resources())

    result = build_registry_sync_sensor(streams, "clickstream_pipeline")(context)

    assert isinstance(result, dg.SensorResult)
    assert result.skip_reason == dg.SkipReason("the code location has every registered table (2)")


def test_registry_sync_with_no_webserver_fails_the_tick_in_one_line(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance, customer: str
) -> None:
    loaded = (Stream(customer, "page_view"),)
    register(registry_path, Stream(customer, "signup"))
    context = dg.build_sensor_context(instance=instance, resources=resources())

    with pytest.raises(ClickstreamError) as raised:
        build_registry_sync_sensor(loaded, "clickstream_pipeline")(context)

    assert str(raised.value).startswith("cannot reach the Dagster webserver at http://127.0.0.1:")
    assert "\n" not in str(raised.value)


def test_a_registry_change_is_described_in_one_line() -> None:
    a, b, c, d, e = (Stream("acme", name) for name in ("a", "b", "c", "d", "e"))

    change = RegistryChange.between((a, b), (b, c, d, e, Stream("zeta", "z")))

    assert change.describe() == "added acme.c, acme.d, acme.e and 1 more; removed acme.a"
    assert not RegistryChange.between((a, b), (b, a))


def test_discovery_reports_raw_hours_and_requests_completed_hours_of_its_tables_only(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    stream, other, unregistered = (Stream(customer, e) for e in ("page_view", "signup", "login"))
    for hour in (H1, H2, NEXT_HOUR):
        put_file(bucket, stream, hour, "a", [record(f"{hour:%H}-1", hour)])
    put_file(bucket, other, H1, "a", [record("o1", H1)])
    put_file(bucket, other, H1, "b", [record("o2", H1)])
    put_file(bucket, unregistered, H1, "a", [record("u1", H1)])

    first = tick(instance, (stream, other))

    # Oldest hours first, two partitions per run (batch_size=2); the next hour is not complete.
    assert partitions_of(first) == [load_keys((stream, H1), (other, H1)), load_keys((stream, H2))]
    assert [r.tags[PARTITIONS_TAG] for r in first.run_requests or []] == ["2", "1"]
    assert all(re.fullmatch(r"\d{8}T\d{6}-\d", r.run_key or "") for r in first.run_requests or [])
    assert raw_reported(first) == [
        (f"raw/{customer}/page_view", hour_key(H1), 1),
        (f"raw/{customer}/signup", hour_key(H1), 2),
        (f"raw/{customer}/page_view", hour_key(H2), 1),
    ]
    [event, *_] = first.asset_events or []
    assert isinstance(event, dg.AssetMaterialization)
    keys: Any = event.metadata["keys"].value
    listed = [SourceFile(f["key"], f["etag"], f["size"]) for f in keys]
    assert event.metadata["fingerprint"] == dg.TextMetadataValue(fingerprint(listed))
    assert event.metadata["bytes"] == dg.IntMetadataValue(sum(f.size for f in listed))
    cursor = json.loads(first.cursor or "")
    assert cursor["scanned"] == [str(stream), str(other)]
    assert sorted(cursor["requested"]) == sorted(load_keys((stream, H1), (other, H1), (stream, H2)))

    # Requested but not loaded yet: the next tick asks for nothing, and reports nothing, again.
    again = tick(instance, (stream, other), first.cursor)
    assert (partitions_of(again), raw_reported(again)) == ([], [])


def test_discovery_after_loads_late_files_and_registry_changes(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    stream = Stream(customer, "page_view")
    put_file(bucket, stream, H1, "a", [record("m1", H1)])
    first = tick(instance, (stream,))
    job = defs_for(stream).get_job_def(LOAD_JOB)
    [run] = first.run_requests or []
    assert job.execute_in_process(run_config=run.run_config, instance=instance).success

    loaded = tick(instance, (stream,), first.cursor)
    assert partitions_of(loaded) == []
    assert json.loads(loaded.cursor or "")["requested"] == {}  # landed, so forgotten

    put_file(bucket, stream, H1, "late", [record("m2", H1)])
    late = tick(instance, (stream,), loaded.cursor)
    assert partitions_of(late) == [load_keys((stream, H1))]
    assert raw_reported(late) == [(f"raw/{customer}/page_view", hour_key(H1), 2)]

    # A location loaded without the stream (removed from the registry) ignores new files...
    put_file(bucket, stream, H2, "a", [record("m3", H2)])
    removed = tick(instance, (), late.cursor)
    assert partitions_of(removed) == []
    assert json.loads(removed.cursor or "")["scanned"] == []
    # ...until it is added back: every hour that is not loaded is requested.
    readded = tick(instance, (stream,), removed.cursor)
    assert partitions_of(readded) == [load_keys((stream, H1), (stream, H2))]


@pytest.mark.parametrize("grace_minutes", [0, 24 * 60])
def test_grace_period_holds_back_recent_hours(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str, grace_minutes: int
) -> None:
    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H2, "a", [record("m1", H2)])
    context = dg.build_sensor_context(
        instance=instance, resources=resources(grace_minutes=grace_minutes)
    )
    result = build_s3_discovery_sensor((stream,))(context)
    assert isinstance(result, dg.SensorResult)
    assert partitions_of(result) == ([load_keys((stream, H2))] if grace_minutes == 0 else [])


def test_registry_sync_asks_once_for_the_same_change_then_again_later(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance, customer: str
) -> None:
    loaded = (Stream(customer, "page_view"),)
    register(registry_path, Stream(customer, "signup"))
    change = json.dumps([[f"{customer}.signup"], [f"{customer}.page_view"]])
    sensor = build_registry_sync_sensor(loaded, "clickstream_pipeline")

    def tick(asked_at: float) -> dg.SensorResult:
        cursor = json.dumps({"change": change, "at": asked_at})
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources())
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        return result

    # Asked a minute ago: the reload is under way, the webserver is not asked again.
    recent = tick(time.time() - 60)
    assert recent.skip_reason == dg.SkipReason(
        f"registry added {customer}.signup; removed {customer}.page_view: reload already requested"
    )
    # Asked three minutes ago and still not reloaded: asked again (here, no webserver answers).
    with pytest.raises(ClickstreamError, match="cannot reach the Dagster webserver"):
        tick(time.time() - 180)


def test_registry_sync_takes_a_missing_registry_as_empty(
    pipeline: dict[str, str], registry_path: Path, instance: dg.DagsterInstance
) -> None:
    context = dg.build_sensor_context(instance=instance, resources=resources())

    result = build_registry_sync_sensor((), "clickstream_pipeline")(context)

    assert isinstance(result, dg.SensorResult)
    assert result.skip_reason == dg.SkipReason("the code location has every registered table (0)")


def test_sensor_intervals_default_to_the_production_cadence_and_follow_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (
        "CLICKSTREAM_DISCOVERY_INTERVAL_SECONDS",
        "CLICKSTREAM_REGISTRY_SYNC_INTERVAL_SECONDS",
    ):
        monkeypatch.delenv(name, raising=False)
    assert build_s3_discovery_sensor(()).minimum_interval_seconds == 30
    assert build_registry_sync_sensor((), None).minimum_interval_seconds == 15

    monkeypatch.setenv("CLICKSTREAM_DISCOVERY_INTERVAL_SECONDS", "12")
    monkeypatch.setenv("CLICKSTREAM_REGISTRY_SYNC_INTERVAL_SECONDS", "7.4")
    assert build_s3_discovery_sensor(()).minimum_interval_seconds == 12
    assert build_registry_sync_sensor((), None).minimum_interval_seconds == 7

    monkeypatch.setenv("CLICKSTREAM_DISCOVERY_INTERVAL_SECONDS", "soon")
    with pytest.raises(ClickstreamError) as error:
        build_s3_discovery_sensor(())
    assert str(error.value) == (
        "CLICKSTREAM_DISCOVERY_INTERVAL_SECONDS must be a positive number of seconds or a "
        "factor: 'soon'"
    )
