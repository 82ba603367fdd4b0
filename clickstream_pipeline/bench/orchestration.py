"""Orchestration: an hour of many small partitions, from files in S3 to rows loaded, through
``clickstream load`` and through the daemon (sensors + run queue); and skew: one customer with
far more events than the others in the same hour, per-partition latency."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg2

from clickstream_pipeline.bench.common import (
    dagster_home_on_postgres,
    poll,
    run_measured,
    stack_process,
)
from clickstream_pipeline.generator import GeneratorSpec, generate_files, write_files
from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.s3 import s3_client


@contextmanager
def _bench_stack() -> Iterator[tuple[str, dict[str, str], Path]]:
    """A scratch folder, the stack in its own process, and a registry file: (root, env, path)."""
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as root,
        stack_process(Path(root) / "stack") as stack,
    ):
        env = stack.env
        os.environ.update(env)
        registry = Path(root) / "registry.yaml"
        yield root, {**env, "CLICKSTREAM_REGISTRY": str(registry)}, registry


def _machine_cpu() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.system + getattr(times, "nice", 0.0))


def _ledger_count(url: str, hour: datetime) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('clickstream.load_ledger')")
        row = cur.fetchone()
        if row is None or row[0] is None:
            return 0
        cur.execute("SELECT count(*) FROM clickstream.load_ledger WHERE hour = %s", (hour,))
        counted = cur.fetchone()
    conn.close()
    return int(counted[0]) if counted else 0


def _write_hour(env: dict[str, str], spec: GeneratorSpec, registry: Path) -> int:
    YamlFileRegistry(registry).save(Registry().with_streams(spec.streams))
    report = write_files(
        s3_client(),
        env["CLICKSTREAM_BUCKET"],
        generate_files(spec, "raw", spec.start or datetime.now(UTC)),
    )
    return report.files


def _hour_spec(
    customers: int, events: int, per_partition: int, hour: datetime, seed: int
) -> GeneratorSpec:
    """One hour with one file of ``per_partition`` events for every customer x event."""
    return GeneratorSpec(
        customers=customers,
        events=events,
        hours=1,
        events_per_file=per_partition,
        files_per_hour=1,
        start=hour,
        seed=seed,
    )


def run(
    customers: int = 100, events: int = 20, per_partition: int = 100, daemon: bool = True
) -> dict[str, Any]:
    partitions = customers * events
    results: dict[str, Any] = {"partitions": partitions, "events_per_partition": per_partition}
    base = hour_floor(datetime.now(UTC)) - timedelta(days=1)
    with _bench_stack() as (root, env, registry):
        url = env["CLICKSTREAM_WAREHOUSE_URL"]

        hour = base
        spec = _hour_spec(customers, events, per_partition, hour, seed=1)
        _write_hour(env, spec, registry)
        cpu = _machine_cpu()
        measured = run_measured(
            ["clickstream_pipeline.cli", "load", "--grace-minutes", "0"],
            {**env, "DAGSTER_HOME": tempfile.mkdtemp(dir=root)},
        )
        loaded = _ledger_count(url, hour)
        results["clickstream_load"] = {
            "partitions_loaded": loaded,
            "wall_seconds": round(measured.wall_seconds, 1),
            "process_cpu_seconds": round(measured.cpu_seconds, 1),
            "machine_cpu_seconds": round(_machine_cpu() - cpu, 1),
            "partitions_per_minute": round(loaded / measured.wall_seconds * 60),
            "peak_rss_mb": round(measured.peak_rss_mb, 1),
        }
        if daemon:
            hour = base + timedelta(hours=1)
            spec = _hour_spec(customers, events, per_partition, hour, seed=2)
            _write_hour(env, spec, registry)
            results["daemon"] = _through_daemon(env, root, url, hour, partitions)
            # Beyond the sensors' 24-hour lookback: only the backfill loads this hour.
            hour = base - timedelta(days=2)
            spec = _hour_spec(customers, events, per_partition, hour, seed=3)
            results["ui_backfill"] = _through_backfill(env, root, url, spec, registry)
    return results


def _through_backfill(
    env: dict[str, str], root: str, url: str, spec: GeneratorSpec, registry: Path
) -> dict[str, Any]:
    """A code server, webserver and daemon; once the discovery sensor has listed every table,
    an hour of files beyond its lookback, and a backfill of every table over that hour launched
    as the UI launches it: the time until every (table, hour) is in the ledger."""
    from clickstream_pipeline.layout import hour_key
    from clickstream_pipeline.local.dagster import DagsterServices
    from clickstream_pipeline.partitions import table_asset_key
    from clickstream_pipeline.webserver import launch_backfill

    home = dagster_home_on_postgres(Path(root), url, "backfill")
    services = DagsterServices(Path(root) / "dagster")
    os.environ.update({**env, "DAGSTER_HOME": str(home), "CLICKSTREAM_DAGSTER_URL": services.url})
    YamlFileRegistry(registry).save(Registry().with_streams(spec.streams))
    assert spec.start is not None
    partitions = len(spec.streams)
    with services:
        poll(lambda: services.sensor_ticked("s3_discovery_sensor"), timeout=600, every=1)
        _write_hour(env, spec, registry)
        cpu = _machine_cpu()
        began = time.perf_counter()
        launch_backfill(
            services.url,
            [table_asset_key(stream) for stream in spec.streams],
            [hour_key(spec.start)],
            title="bench",
            tags={},
        )
        loaded = 0
        while time.perf_counter() - began < 1800:
            loaded = _ledger_count(url, spec.start)
            if loaded >= partitions:
                break
            time.sleep(1)
        wall = time.perf_counter() - began
    return {
        "partitions_loaded": loaded,
        "wall_seconds": round(wall, 1),
        "machine_cpu_seconds": round(_machine_cpu() - cpu, 1),
        "partitions_per_minute": round(loaded / wall * 60),
        "note": "launch to the last (table, hour) in the ledger: one run of the tables' asset",
    }


def _through_daemon(
    env: dict[str, str], root: str, url: str, hour: datetime, partitions: int, timeout: float = 900
) -> dict[str, Any]:
    """Start dagster-daemon (sensors, run queue) and time it until every partition is loaded."""
    home = dagster_home_on_postgres(Path(root), url, "daemon")
    daemon = Path(sys.executable).parent / "dagster-daemon"
    cpu = _machine_cpu()
    began = time.perf_counter()
    process = subprocess.Popen(
        [str(daemon), "run", "-m", "clickstream_pipeline.definitions"],
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    loaded = 0
    try:
        while time.perf_counter() - began < timeout:
            loaded = _ledger_count(url, hour)
            if loaded >= partitions:
                break
            time.sleep(1)
        wall = time.perf_counter() - began
    finally:
        os.killpg(process.pid, 15)
        process.wait(60)
    return {
        "partitions_loaded": loaded,
        "wall_seconds": round(wall, 1),
        "machine_cpu_seconds": round(_machine_cpu() - cpu, 1),
        "partitions_per_minute": round(loaded / wall * 60),
        "note": "includes daemon start-up and the first sensor ticks",
    }


def run_skew(customers: int = 20, light: int = 1000, factor: int = 100) -> dict[str, Any]:
    """One customer with ``factor`` x the events of the others in the same hour.

    The same light partitions are loaded in two hours: alone, then beside the heavy one, after
    a first hour that creates their tables (so both measured hours load into existing tables).
    Without head-of-line blocking their latency (run start to loaded) barely changes.
    """
    first = hour_floor(datetime.now(UTC)) - timedelta(days=1)
    with _bench_stack() as (root, env, registry):
        _skew_hour(env, root, registry, first - timedelta(hours=1), customers, light, 1)
        alone = _skew_hour(env, root, registry, first, customers, light, 1)
        mixed = _skew_hour(
            env, root, registry, first + timedelta(hours=1), customers, light, factor
        )
    heavy = mixed.pop(_HEAVY)
    del alone[_HEAVY]

    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[max(0, int(len(ordered) * 0.99 + 0.5) - 1)]

    return {
        "partitions": customers,
        "light_events": light,
        "heavy_events": light * factor,
        "heavy_latency_seconds": round(heavy, 2),
        "light_alone_p50_seconds": round(statistics.median(alone.values()), 2),
        "light_alone_p99_seconds": round(p99(list(alone.values())), 2),
        "light_beside_heavy_p50_seconds": round(statistics.median(mixed.values()), 2),
        "light_beside_heavy_p99_seconds": round(p99(list(mixed.values())), 2),
    }


_HEAVY = "acme.page_view"  # the generator's first customer is the heavy one


def _skew_hour(
    env: dict[str, str],
    root: str,
    registry: Path,
    hour: datetime,
    customers: int,
    light: int,
    factor: int,
) -> dict[str, float]:
    """Load one hour with ``clickstream load``; seconds from run start to each partition loaded."""
    import dagster as dg

    from clickstream_pipeline.partitions import table_asset_key

    home = tempfile.mkdtemp(dir=root)
    Path(home, "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    spec = GeneratorSpec(
        customers=customers,
        events=1,
        hours=1,
        events_per_file=light,
        files_per_hour=1,
        skew=factor,
        heavy_customers=1,
        start=hour,
        seed=3,
    )
    _write_hour(env, spec, registry)
    run_measured(
        ["clickstream_pipeline.cli", "load", "--grace-minutes", "0"], {**env, "DAGSTER_HOME": home}
    )
    with dg.DagsterInstance.from_config(home) as instance:
        [run_record] = instance.get_run_records()
        start = run_record.start_time or 0.0
        loaded = {}
        for stream in spec.streams:
            records = instance.fetch_materializations(table_asset_key(stream), limit=1).records
            if records:
                loaded[stream.key] = records[0].timestamp - start
        return loaded
