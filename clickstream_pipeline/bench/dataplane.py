"""Data plane: one (stream, hour) of N events in 4 gzip files, loaded four ways, each in its own
process (so peak RSS and CPU are the loader's own): this project through Dagster, the COPY-only
limit, naive row inserts, and dlt."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import psycopg2.extras

from clickstream_pipeline.bench.common import Measured, run_measured, stack_process
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.generator import GeneratorSpec, generate_files, write_files
from clickstream_pipeline.layout import hour_floor, hour_prefix
from clickstream_pipeline.names import Stream
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.base import LOADED_COLUMNS, snake_case

STREAM = Stream("acme", "page_view")
FILES = 4
MODULE = "clickstream_pipeline.bench.dataplane"
# Disk per row loaded, measured: 10,000,000 events through all four loaders took 36 GB at most.
DISK_BYTES_PER_ROW = 1_000


def run(sizes: list[int], peers: bool = True) -> dict[str, Any]:
    """Measure every loader; this project at each size, the peers at the largest."""
    _check_disk(sum(sizes) + (3 * max(sizes) if peers else 0))
    results: dict[str, Any] = {"files_per_partition": FILES, "sizes": {}}
    first_hour = hour_floor(datetime.now(UTC)) - timedelta(days=2)
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as root,
        stack_process(Path(root) / "stack") as stack,
    ):
        env = stack.env
        os.environ.update(env)
        url = env["CLICKSTREAM_WAREHOUSE_URL"]
        for index, events in enumerate(sizes):
            hour = first_hour + timedelta(hours=index)
            _write(env, events, hour)
            _settle(url)
            measured = run_measured(
                [MODULE, "clickstream", STREAM.key, hour.isoformat()],
                {**env, "DAGSTER_HOME": tempfile.mkdtemp(dir=root)},
            )
            entry = {"clickstream": _row(events, measured)}
            if peers and events == max(sizes):
                rows = Path(root) / "rows.tsv"
                _export_rows(url, hour, rows)
                _settle(url)
                entry["copy_only"] = _row(events, run_measured([MODULE, "copy", str(rows)], env))
                _settle(url)
                entry["naive_inserts"] = _row(
                    events, run_measured([MODULE, "naive", hour.isoformat()], env)
                )
                if _has_dlt():
                    _settle(url)
                    entry["dlt"] = _row(
                        events, run_measured([MODULE, "dlt", hour.isoformat()], env)
                    )
            results["sizes"][str(events)] = entry
    return results


def _check_disk(rows: int) -> None:
    """Fail before starting, in one line, when the temporary folder cannot hold every loader's
    rows (PostgreSQL's tables and WAL, and the exported rows): a full disk would fail a loader
    part-way, after minutes of work."""
    folder = tempfile.gettempdir()
    need, free = rows * DISK_BYTES_PER_ROW, shutil.disk_usage(folder).free
    if free < need:
        raise ClickstreamError(
            f"the data-plane benchmark needs about {need / 1e9:.0f} GB free in {folder} "
            f"({free / 1e9:.0f} GB are); set TMPDIR to a larger disk or pass smaller --events"
        )


def _settle(url: str) -> None:
    """Let PostgreSQL finish what the previous step left (hint bits, statistics, dirty buffers,
    WAL) before the next loader is timed, so no loader pays for another's writes."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
        cur.execute("CHECKPOINT")
    conn.close()


def _row(events: int, measured: Measured) -> dict[str, Any]:
    seconds = float(measured.result["seconds"])
    return {
        "events": events,
        "seconds": round(seconds, 2),
        "events_per_second": round(events / seconds) if seconds else 0,
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "cpu_seconds": round(measured.cpu_seconds, 2),
        "process_wall_seconds": round(measured.wall_seconds, 2),
        "rows": measured.result.get("rows"),
    }


def _has_dlt() -> bool:
    try:
        import dlt  # noqa: F401
    except ImportError:
        return False
    return True


def _write(env: dict[str, str], events: int, hour: datetime) -> None:
    spec = GeneratorSpec(
        customers=1,
        events=1,
        hours=1,
        events_per_file=max(1, events // FILES),
        files_per_hour=FILES,
        seed=events,
        start=hour,
    )
    write_files(s3_client(), env["CLICKSTREAM_BUCKET"], generate_files(spec, "raw", hour))


def _export_rows(url: str, hour: datetime, path: Path) -> None:
    """The loaded rows, already flattened, as COPY text: what the COPY-only limit loads."""
    with psycopg2.connect(url) as conn, conn.cursor() as cur, path.open("wb") as out:
        cur.execute("CREATE SCHEMA IF NOT EXISTS bench_copy")
        cur.execute("DROP TABLE IF EXISTS bench_copy.page_view")
        cur.execute("CREATE TABLE bench_copy.page_view (LIKE acme.page_view INCLUDING ALL)")
        query = cur.mogrify("SELECT * FROM acme.page_view WHERE _hour = %s", (hour,)).decode()
        cur.copy_expert(f"COPY ({query}) TO STDOUT", out)
    conn.close()


# --- the loaders, each run in a child process ---------------------------------------------------


def _records(hour: datetime) -> Iterator[dict[str, Any]]:
    """Download, gunzip and parse the partition's files (what a plain script does)."""
    client, bucket = s3_client(), os.environ["CLICKSTREAM_BUCKET"]
    listing = client.list_objects_v2(Bucket=bucket, Prefix=hour_prefix("raw", STREAM, hour))
    for obj in listing.get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        for line in gzip.decompress(body).splitlines():
            yield orjson.loads(line)


def load_clickstream(stream_key: str, hour_iso: str) -> dict[str, Any]:
    import dagster as dg

    from clickstream_pipeline.definitions import build_defs
    from clickstream_pipeline.jobs import LOAD_JOB, run_config_for
    from clickstream_pipeline.layout import load_key
    from clickstream_pipeline.partitions import table_asset_key
    from clickstream_pipeline.registry import Registry
    from clickstream_pipeline.runner import QUIET_CONSOLE

    stream, hour = Stream.parse(stream_key), datetime.fromisoformat(hour_iso)
    instance = dg.DagsterInstance.get()
    job = build_defs(Registry().with_streams([stream])).get_job_def(LOAD_JOB)
    config = {**run_config_for([load_key(stream, hour)], 1), **QUIET_CONSOLE}
    began = time.perf_counter()
    result = job.execute_in_process(run_config=config, instance=instance)
    seconds = time.perf_counter() - began
    [loaded] = [
        m
        for m in result.asset_materializations_for_node("load_partitions")
        if m.asset_key == table_asset_key(stream)
    ]
    return {"seconds": seconds, "rows": loaded.metadata["rows_loaded"].value}


def load_copy(rows_path: str) -> dict[str, Any]:
    with psycopg2.connect(os.environ["CLICKSTREAM_WAREHOUSE_URL"]) as conn, conn.cursor() as cur:
        began = time.perf_counter()
        with open(rows_path, "rb") as rows:
            cur.copy_expert("COPY bench_copy.page_view FROM STDIN", rows, size=1 << 20)
        conn.commit()
        seconds = time.perf_counter() - began
        rows_loaded = cur.rowcount
    conn.close()
    return {"seconds": seconds, "rows": rows_loaded}


def load_naive(hour_iso: str) -> dict[str, Any]:
    """What many tutorials do: parse in Python, flatten, insert rows in pages of 1,000."""
    hour = datetime.fromisoformat(hour_iso)
    url = os.environ["CLICKSTREAM_WAREHOUSE_URL"]
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS bench_naive")
        cur.execute("DROP TABLE IF EXISTS bench_naive.page_view")
        cur.execute("CREATE TABLE bench_naive.page_view (LIKE acme.page_view INCLUDING ALL)")
        conn.commit()
        began = time.perf_counter()
        rows = (
            (
                r["messageId"],
                r.get("userId"),
                r.get("anonymousId"),
                r.get("event"),
                r.get("timestamp"),
                r.get("sentAt"),
                r["receivedAt"],
                json.dumps(r.get("properties")),
                json.dumps(r.get("context")),
                hour,
                "naive",
                *(r["properties"].get(k) for k in ("loadTimeMs", "path", "referrer")),
            )
            for r in _records(hour)
        )
        columns = [
            *LOADED_COLUMNS,
            *(snake_case(k) for k in ("loadTimeMs", "path", "referrer")),
        ]
        psycopg2.extras.execute_batch(
            cur,
            f"INSERT INTO bench_naive.page_view ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})",
            rows,
            page_size=1000,
        )
        conn.commit()
        seconds = time.perf_counter() - began
        cur.execute("SELECT count(*) FROM bench_naive.page_view")
        count = cur.fetchone()
    conn.close()
    return {"seconds": seconds, "rows": count[0] if count else 0}


def load_dlt(hour_iso: str) -> dict[str, Any]:
    """dlt, the popular Python loader: merge on messageId into the same PostgreSQL."""
    import dlt

    hour = datetime.fromisoformat(hour_iso)
    url = os.environ["CLICKSTREAM_WAREHOUSE_URL"]
    socket_dir = url.split("host=", 1)[1]
    # dlt insists on host and port; libpq's host= parameter still selects the Unix socket.
    credentials = f"postgresql://postgres:x@localhost:5432/clickstream?host={socket_dir}"
    pipeline = dlt.pipeline(
        pipeline_name="bench_dlt",
        destination=dlt.destinations.postgres(credentials),
        dataset_name="bench_dlt",
        pipelines_dir=tempfile.mkdtemp(),
    )
    began = time.perf_counter()
    pipeline.run(
        _records(hour), table_name="page_view", write_disposition="merge", primary_key="messageId"
    )
    seconds = time.perf_counter() - began
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM bench_dlt.page_view")
        count = cur.fetchone()
    conn.close()
    return {"seconds": seconds, "rows": count[0] if count else 0}


def main(argv: list[str]) -> None:
    loaders: dict[str, Callable[..., dict[str, Any]]] = {
        "clickstream": load_clickstream,
        "copy": load_copy,
        "naive": load_naive,
        "dlt": load_dlt,
    }
    result = loaders[argv[0]](*argv[1:])
    print(json.dumps(result))  # noqa: T201 - the parent reads this line


if __name__ == "__main__":
    main(sys.argv[1:])
