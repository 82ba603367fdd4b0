"""Turn benchmark results into goals met or missed, a Markdown page and a chart."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import psutil

LOADER_NAMES = {
    "clickstream": "clickstream_pipeline (through Dagster)",
    "copy_only": "COPY FROM STDIN of flattened rows (the limit)",
    "naive_inserts": "psycopg2 execute_batch row inserts",
    "dlt": "dlt (merge on messageId)",
}


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) for every goal the results cover."""
    rows: list[tuple[str, str, str, bool | None]] = []
    data = results.get("dataplane")
    if data:
        sizes = data["sizes"]
        largest = sizes[max(sizes, key=int)]
        ours = largest["clickstream"]
        if "copy_only" in largest:
            ratio = ours["events_per_second"] / largest["copy_only"]["events_per_second"]
            rows.append(("data plane vs COPY-only", ">= 0.5x", f"{ratio:.2f}x", ratio >= 0.5))
        if "dlt" in largest:
            ratio = ours["events_per_second"] / largest["dlt"]["events_per_second"]
            rows.append(("data plane vs dlt", ">= 3x", f"{ratio:.1f}x", ratio >= 3))
        peak = max(entry["clickstream"]["peak_rss_mb"] for entry in sizes.values())
        rows.append(("peak RSS", "<= 500 MB", f"{peak:.0f} MB", peak <= 500))
        if len(sizes) > 1:
            low = sizes[min(sizes, key=int)]["clickstream"]["peak_rss_mb"]
            growth = peak / low
            rows.append(("RSS flat as N grows", "<= 1.25x", f"{growth:.2f}x", growth <= 1.25))
    orchestration = results.get("orchestration")
    if orchestration:
        for path in ("clickstream_load", "daemon", "ui_backfill"):
            if path in orchestration:
                rate = orchestration[path]["partitions_per_minute"]
                rows.append(
                    (
                        f"partitions/min, {path.replace('_', ' ')}",
                        ">= 400",
                        f"{rate:,}",
                        rate >= 400,
                    )
                )
    scale = results.get("scale")
    if scale:
        n = f"{scale['streams']:,} tables"
        timed = [
            ("code location load", scale["definitions_load_seconds"], 10),
            ("a run worker's definitions", scale.get("run_worker_definitions_seconds"), 5),
            ("registry-sync tick", scale["registry_sync_tick_seconds"], 10),
            ("discovery tick, new files", scale["discovery_steady_tick"]["seconds"], 10),
        ]
        graphql = scale["graphql"]
        hours_loaded = graphql.get("hours_loaded")
        timed.append(
            (
                f"a table's partition status in the UI, {hours_loaded:,} hours loaded"
                if hours_loaded
                else "partition status query (cold)",
                graphql["partition_health_cold_seconds"],
                1 if hours_loaded else 10,
            )
        )
        for label, value, limit in timed:
            if value is not None:
                rows.append((f"{label}, {n}", f"<= {limit} s", f"{value:.2f} s", value <= limit))
        listing = scale.get("backfill_listing")
        if listing:
            rows.append(
                (
                    f"backfill listing, {listing['hours']} h of {n}",
                    "<= 10 s",
                    f"{listing['seconds']:.2f} s (CPU: "
                    + (
                        f"S3 server {listing['s3_server_cpu_seconds']} s, "
                        if listing.get("s3_server_cpu_seconds") is not None
                        else ""
                    )
                    + f"client {listing['client_cpu_seconds']} s)",
                    listing["seconds"] <= 10,
                )
            )
        backfill = scale["backfill_submit"]
        label = f"UI-path backfill launch, {backfill['partitions']:,} partitions"
        if backfill.get("seconds") is None:
            rows.append((label, "<= 5 s", backfill.get("failed", "failed")[:60], False))
        else:
            seconds, rss = backfill["seconds"], backfill["peak_rss_mb"]
            rows.append((label, "<= 5 s", f"{seconds:.2f} s", seconds <= 5))
            rows.append((f"{label}: webserver peak RSS", "<= 500 MB", f"{rss:.0f} MB", rss <= 500))
            iteration = backfill["daemon_iteration_seconds"]
            submission = backfill.get("run_submission_iteration_seconds")
            rows.append(
                (
                    "backfill daemon iteration over it",
                    "<= 2 s",
                    f"{iteration:.2f} s"
                    + (f" (the one submitting its run: {submission:.1f} s)" if submission else ""),
                    iteration <= 2,
                )
            )
        deployment = scale.get("deployment")
        if deployment:
            seconds = deployment["registry_add_to_asset_seconds"]
            rows.append(
                (
                    f"a registry add is an asset in the UI (webserver, daemon), {n}",
                    "<= 60 s",
                    f"{seconds:.1f} s",
                    seconds <= 60,
                )
            )
        idle = scale.get("idle_load")
        if idle:
            seconds = idle["seconds"]
            rows.append(
                (
                    f"clickstream load with nothing to do, {idle['streams']} tables",
                    "<= 3 s",
                    f"{seconds:.2f} s",
                    seconds <= 3,
                )
            )
        requests = [
            scale[k]["s3_requests"].get("ListObjectsV2", 0)
            for k in ("discovery_steady_tick", "discovery_steady_tick_bigger_bucket")
        ]
        rows.append(
            (
                "S3 requests per tick independent of bucket size",
                "equal",
                f"{requests[0]:,} / {requests[1]:,}",
                requests[0] == requests[1],
            )
        )
    skew = results.get("skew")
    if skew:
        alone, mixed = skew["light_alone_p99_seconds"], skew["light_beside_heavy_p99_seconds"]
        rows.append(
            (
                f"skew: light partitions' p99 beside a "
                f"{skew['heavy_events'] // skew['light_events']}x one",
                "<= alone + 25%",
                f"{mixed:.2f} s vs {alone:.2f} s alone",
                mixed <= alone * 1.25,
            )
        )
    vortex = results.get("vortex")
    if vortex:
        at_n = vortex["lengths"][str(vortex["events"])]
        ratio = vortex["vortex_vs_bare_read"]
        rows.append(
            (
                f"vortex vs a bare boto3 read of the stream, {vortex['events']:,} events",
                ">= 0.7x",
                f"{ratio:.2f}x ({at_n['vortex']['events_per_second']:,} vs "
                f"{at_n['bare_read']['events_per_second']:,} events/s)",
                ratio >= 0.7,
            )
        )
        low, high = (
            vortex["lengths"][str(n)]["vortex"]["peak_rss_mb"]
            for n in sorted(map(int, vortex["lengths"]))
        )
        growth = vortex["rss_growth"]
        rows.append(
            (
                "vortex peak RSS flat as the stream doubles",
                "<= 1.25x",
                f"{growth:.2f}x ({low:.0f} MB, {high:.0f} MB)",
                growth <= 1.25,
            )
        )
        ends = vortex["end_to_end"]
        rows.append(
            (
                f"end to end, {ends['events']:,} events: rows loaded = unique valid events put",
                "exact",
                f"{ends['rows_loaded']:,} / {ends['unique_valid_events']:,}",
                ends["rows_loaded"] == ends["unique_valid_events"],
            )
        )
    # The registry API's goals are in its own section (registry_goals).
    return rows


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:,.1f} s" if value >= 1000 else f"{value:.1f} ms"


REGISTRY_P99_MS = 50


def registry_goals(registry: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(goal, target, measured, met) for the registry API's loads and a sensor tick's read."""
    rows: list[tuple[str, str, str, bool]] = []
    loads = registry["loads"]
    labels = {
        "reads_small": ("reads", "registry API reads (GET /customers), {streams:,} streams"),
        "reads": ("reads", "registry API reads (GET /customers), {streams:,} streams"),
        "writes": ("writes", "registry API writes (PUT, 1 in 3 DELETE), {streams:,} streams"),
    }
    entries = [(name, kind, label) for name, (kind, label) in labels.items() if name in loads]
    if "mixed" in loads:
        mixed = loads["mixed"]
        entries += [
            (
                "mixed",
                "reads",
                f"registry API reads beside {mixed['writes']['target_per_second']:,.0f}"
                " writes/s, {streams:,} streams",
            ),
            (
                "mixed",
                "writes",
                f"registry API writes beside {mixed['reads']['target_per_second']:,.0f}"
                " reads/s, {streams:,} streams",
            ),
        ]
    for name, kind, label in entries:
        load = loads[name]
        figures = load[kind]
        rate = figures["target_per_second"]
        p99 = figures["p99_ms"]
        met = (
            p99 is not None
            and p99 <= REGISTRY_P99_MS
            and figures["errors"] == 0
            and figures["achieved_per_second"] >= 0.99 * rate
        )
        rows.append(
            (
                f"{label.format(streams=load['streams'])}, {rate:,.0f}/s: p99",
                f"<= {REGISTRY_P99_MS} ms",
                f"{_ms(p99)} ({figures['achieved_per_second']:,.0f}/s answered, "
                + (
                    f"{load['writes_committed_per_second']:,.0f}/s committed, "
                    if kind == "writes" and "writes_committed_per_second" in load
                    else ""
                )
                + f"{figures['errors']:,} errors)",
                met,
            )
        )
    tick = registry.get("sensor_tick")
    if tick:
        for kind, label in (("http", "through the API"), ("postgresql", "from postgresql://")):
            reads = tick[kind]
            worst = max(reads[k]["p99_ms"] for k in ("first", "unchanged", "after_a_change"))
            rows.append(
                (
                    f"a sensor tick's registry read {label}, {reads['streams']:,} streams: p99",
                    f"<= {REGISTRY_P99_MS} ms",
                    f"{_ms(reads['unchanged']['p99_ms'])} unchanged, "
                    f"{_ms(reads['after_a_change']['p99_ms'])} after a change, "
                    f"{_ms(reads['first']['p99_ms'])} first",
                    worst <= REGISTRY_P99_MS,
                )
            )
    return rows


def markdown(results: dict[str, Any], chart: str | None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `clickstream bench` (`make bench`); the raw figures are in",
        "`benchmarks/results.json`. Benchmarks are not tests: CI only runs `clickstream bench",
        "--quick` to prove the command works.",
        "",
        f"Machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, embedded PostgreSQL 16 (pgserver) and moto's S3 "
        "server in its own process.",
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for goal, target, measured, met in goals(results):
        mark = "yes" if met else ("no" if met is False else "-")
        lines.append(f"| {goal} | {target} | {measured} | {mark} |")
    data = results.get("dataplane")
    if data:
        lines += [
            "",
            f"## Data plane: one (stream, hour) in {data['files_per_partition']} gzip files",
            "",
            "Each loader runs in its own process; events/s is over the load itself (process",
            "start-up and imports excluded), peak RSS is the process's. Before each loader,",
            "`VACUUM ANALYZE` and `CHECKPOINT` settle what the previous one left to PostgreSQL",
            "(without them the COPY-only limit measured 30 % lower after our load).",
            "",
        ]
        if chart:
            lines += [f"![events per second by loader]({chart})", ""]
        lines += [
            "| events | loader | events/s | seconds | peak RSS MB | CPU s |",
            "|---|---|---|---|---|---|",
        ]
        for events, entry in sorted(data["sizes"].items(), key=lambda item: int(item[0])):
            for name, row in entry.items():
                lines.append(
                    f"| {int(events):,} | {LOADER_NAMES.get(name, name)} | "
                    f"{row['events_per_second']:,} | {row['seconds']} | {row['peak_rss_mb']} | "
                    f"{row['cpu_seconds']} |"
                )
    orchestration = results.get("orchestration")
    if orchestration:
        lines += [
            "",
            f"## Orchestration: {orchestration['partitions']:,} partitions of "
            f"{orchestration['events_per_partition']} events, files to rows",
            "",
            "| path | partitions loaded | wall s | machine CPU s | partitions/min |",
            "|---|---|---|---|---|",
        ]
        for path in ("clickstream_load", "daemon", "ui_backfill"):
            if path in orchestration:
                row = orchestration[path]
                lines.append(
                    f"| {path.replace('_', ' ')} | {row['partitions_loaded']:,} | "
                    f"{row['wall_seconds']} | {row['machine_cpu_seconds']} | "
                    f"{row['partitions_per_minute']:,} |"
                )
        lines += ["", "The daemon path includes the daemon's start-up and its first sensor ticks."]
    skew = results.get("skew")
    if skew:
        lines += [
            "",
            f"## Skew: one customer with {skew['heavy_events']:,} events, "
            f"{skew['partitions'] - 1} with {skew['light_events']:,}",
            "",
            "Seconds from the run's start to each partition loaded; the light partitions are",
            "loaded once alone and once beside the heavy one.",
            "",
            "| | p50 | p99 |",
            "|---|---|---|",
            f"| light partitions, alone | {skew['light_alone_p50_seconds']} | "
            f"{skew['light_alone_p99_seconds']} |",
            f"| light partitions, beside the heavy one | "
            f"{skew['light_beside_heavy_p50_seconds']} | "
            f"{skew['light_beside_heavy_p99_seconds']} |",
            f"| the heavy partition | {skew['heavy_latency_seconds']} | |",
        ]
    scale = results.get("scale")
    if scale:
        s3 = scale.get("s3", "local (moto)")
        lines += ["", f"## Scale: {scale['streams']:,} streams, S3: {s3}", ""]
        if s3.startswith("s3://"):
            lines += [
                "Measured against S3 itself (`clickstream bench --s3-bucket`); PostgreSQL is the",
                "local one.",
            ]
        else:
            lines += [
                "Listing time is bound by the local S3 server: moto scans every key in the bucket",
                "for each ListObjectsV2, so the same requests take longer as the bucket grows",
                "(compare the two discovery ticks); S3 answers a listing from its index. Each",
                "listing step reports the CPU it cost the S3 server (`s3_server_cpu_seconds`) and",
                "this side (`client_cpu_seconds`, boto3 and our code): only the client's carries",
                "over to S3, where the requests (16 in flight) wait on the network instead.",
                "`clickstream bench --only scale --s3-bucket NAME` measures against S3.",
            ]
        lines += ["", "```json"]
        import json

        lines += [json.dumps(scale, indent=2), "```"]
    vortex = results.get("vortex")
    if vortex:
        limits = vortex["flush_limits"]
        lines += [
            "",
            f"## Vortex: a Kinesis stream of {vortex['shards']} shards to raw files in S3",
            "",
            "One `clickstream vortex` process with its defaults (a shard's batch is written at",
            f"{limits['max_records']:,} records or {limits['max_bytes'] // 2**20} MiB) drains a "
            "stream pre-loaded on the local Kinesis",
            "server, beside a bare boto3 loop that reads the same stream (GetShardIterator",
            "TRIM_HORIZON, then GetRecords of 10,000 over each shard until a call returns nothing)",
            "and only counts the records. Each runs in its own process; seconds run from its start",
            "(imports excluded) to vortex's last batch committed, or to the bare read's last call.",
            "Vortex is stopped as SIGTERM stops it once every record was read, so no idle wait",
            "is counted (`--until-idle` would add its idle seconds). About 1 % of the records are",
            "put twice and 0.5 % cannot be routed (they go to `errors/`).",
            "",
            "| events | reader | events/s | seconds | peak RSS MB | CPU s | files |",
            "|---|---|---|---|---|---|---|",
        ]
        for events, entry in sorted(vortex["lengths"].items(), key=lambda item: int(item[0])):
            for name in ("vortex", "bare_read"):
                row = entry[name]
                lines.append(
                    f"| {int(events):,} | {name.replace('_', ' ')} | "
                    f"{row['events_per_second']:,} | {row['seconds']} | {row['peak_rss_mb']} | "
                    f"{row['cpu_seconds']} | {row.get('files', '')} |"
                )
        largest = vortex["lengths"][max(vortex["lengths"], key=int)]
        events = max(map(int, vortex["lengths"]))
        lines += [
            "",
            "Both readers wait on the local Kinesis server (moto answers GetRecords from one",
            "Python process); the CPU column is what carries over to Kinesis itself: vortex "
            f"spends {largest['vortex']['cpu_seconds'] / events * 1e6:.0f} µs",
            f"of CPU per event (routing, gzip, uploads), the bare read "
            f"{largest['bare_read']['cpu_seconds'] / events * 1e6:.0f} µs.",
        ]
        ends = vortex["end_to_end"]
        lines += [
            "",
            f"End to end, {ends['events']:,} events ({ends['unique_valid_events']:,} unique and "
            f"valid; {ends['rows_loaded']:,} rows loaded):",
            "put on the stream 500 a call, vortex to S3 as above, then `clickstream load",
            "--grace-minutes 0` (its process's wall time, start-up included).",
            "",
            "| stage | seconds | share | peak RSS MB | CPU s |",
            "|---|---|---|---|---|",
        ]
        for name, stage in ends["stages"].items():
            lines.append(
                f"| {name} | {stage['seconds']} | {stage['share']:.0%} | {stage['peak_rss_mb']} "
                f"| {stage['cpu_seconds']} |"
            )
        lines.append(f"| total | {ends['total_seconds']} | | | |")
    registry = results.get("registry")
    if registry:
        lines += registry_markdown(registry)
    return "\n".join(lines) + "\n"


def registry_markdown(registry: dict[str, Any]) -> list[str]:
    """The "Registry API" section: goals, each load's figures, a sensor tick's read, method."""
    loads = registry["loads"]
    tick = registry.get("sensor_tick")
    lines = [
        "",
        f"## Registry API: {registry['streams']:,} streams in PostgreSQL, "
        f"the load generator on the same {registry['cores']} cores",
        "",
        *_wrap(
            "`clickstream registry serve` (one uvicorn process: reads answered on the event "
            "loop, writes on worker threads) over a `postgresql://` registry on the embedded "
            f"PostgreSQL, {registry['customers']} customers x "
            f"{registry['streams'] // registry['customers']} events, a fresh server process for "
            "each load. The load generator is one process (asyncio on uvloop, aiohttp) on the "
            "same machine and runs open loop: requests leave on a fixed schedule whatever the "
            "answers do, and each latency runs from the request's scheduled send time, so a "
            "server falling behind shows as the queueing it causes (no coordinated omission). "
            f"Each load runs {registry['warmup_seconds']:.0f} s of warm-up, then "
            f"{registry['seconds']:.0f} s measured (the small registry's reads half as long). "
            "Reads are unconditional `GET /customers` (the whole registry each time); writes are "
            "`PUT /customers/<c>/events/<new event>`, every third a `DELETE` of an event put a "
            "second before. Percentiles cover every request of the measured window: one given "
            "up after 5 s counts at that latency and as an error. CPU is percent of one core "
            "over the load, per process. Committed writes are the history rows the load added, "
            "whether or not their client still waited for the answer."
        ),
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for goal, target, measured, met in registry_goals(registry):
        lines.append(f"| {goal} {target} | {measured} | {'yes' if met else 'no'} |")
    lines += [
        "",
        "| load | streams | kind | target/s | answered/s | p50 | p95 | p99 | max | errors "
        "| CPU: server | PostgreSQL | generator | PostgreSQL sessions per request |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, load in loads.items():
        cpu = load["cpu_percent_of_a_core"]
        for kind in ("reads", "writes"):
            if kind not in load:
                continue
            f = load[kind]
            lines.append(
                f"| {name.replace('_', ' ')} | {load['streams']:,} | {kind} | "
                f"{f['target_per_second']:,.0f} | {f['achieved_per_second']:,.0f} | "
                f"{_ms(f['p50_ms'])} | {_ms(f['p95_ms'])} | {_ms(f['p99_ms'])} | "
                f"{_ms(f['max_ms'])} | {f['errors']:,} | {cpu['server']} % | {cpu['postgres']} % | "
                f"{cpu['load_generator']} % | "
                f"{load['postgres_sessions_per_request']} |"
            )
    if tick:
        lines += [
            "",
            "A sensor tick's registry read: `load_registry(location, missing_ok=True)` as the",
            "registry-sync sensor calls it, in a process of its own, on an idle server: the first",
            "read of a new backend (a process's first tick), unchanged reads (the API answers",
            "304 to the ETag held), and the read after each of a few changes made meanwhile.",
            "",
            "| path | first p50 / p99 | unchanged p50 / p99 | after a change p50 / p99 |",
            "|---|---|---|---|",
        ]
        for kind, label in (("http", "through the API"), ("postgresql", "postgresql://")):
            reads = tick[kind]
            cells = [
                f"{_ms(reads[k]['p50_ms'])} / {_ms(reads[k]['p99_ms'])} ({reads[k]['reads']} reads)"
                for k in ("first", "unchanged", "after_a_change")
            ]
            lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", *_registry_bounds(loads)]
    return lines


def _registry_bounds(loads: dict[str, Any]) -> list[str]:
    """What bounds the loads, from their figures."""
    text: list[str] = []
    reads = loads.get("reads")
    if reads:
        per = reads["cpu_ms_per_answered_request"]
        total = per["server"] + per["postgres"] + per["load_generator"]
        rate = reads["reads"]["target_per_second"]
        cores = reads["cpu_percent_of_a_core"]["machine_capacity"] // 100
        text.append(
            f"A read costs {per['server']} ms of the server's CPU, {per['postgres']} ms of "
            f"PostgreSQL's and {per['load_generator']} ms of the generator's "
            f"({total * rate / 1000:.1f} of the {cores} cores at {rate:,.0f}/s): it is answered "
            "on the event loop from the registry the backend gave at most 0.1 s before (or "
            "since the server's own last write), so PostgreSQL is asked for the newest change "
            "id at most ten times a second whatever the read rate, and the registry's size "
            "hardly matters (compare the small registry)."
        )
    writes = loads.get("writes")
    if writes:
        cost = writes.get("server_cpu_ms_per_committed_write")
        rate = writes["writes"]["target_per_second"]
        text.append(
            "Writes are serialized: each holds the registry's advisory lock from its read to its "
            f"commit, on 8 worker threads of their own with a pooled connection each. The "
            f"server committed {writes['writes_committed_per_second']:,} writes/s of the "
            f"{rate:,.0f}/s sent"
            + (
                f" and spent {cost} ms of CPU on each (about 1 ms of it building the new "
                "registry in name order, the rest HTTP, the pool and the queries), so one "
                f"server process could commit about {1000 / cost:,.0f} writes/s"
                if cost
                else ""
            )
            + "."
        )
    mixed = loads.get("mixed")
    if mixed:
        cpu = mixed["cpu_percent_of_a_core"]["server"]
        text.append(
            f"Together, the server's one process used {cpu} % of a core, reads on the event "
            "loop and writes in their threads taking turns on one interpreter lock: the mix has "
            "the longest tails of the loads. These figures are one process; deploy/registry.yaml "
            "runs two replicas."
        )
    return _wrap(" ".join(text))


def _wrap(text: str, width: int = 95) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def chart(results: dict[str, Any], path: Path) -> bool:
    """A bar chart of events/s by loader at the largest size; False without matplotlib."""
    data = results.get("dataplane")
    if not data:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    sizes = data["sizes"]
    largest = sizes[max(sizes, key=int)]
    names = list(largest)
    rates = [largest[n]["events_per_second"] for n in names]
    figure, axis = plt.subplots(figsize=(8, 3.6), dpi=120)
    colours = ["#2563eb" if n == "clickstream" else "#9ca3af" for n in names]
    bars = axis.barh([LOADER_NAMES.get(n, n) for n in names], rates, color=colours)
    axis.bar_label(bars, labels=[f"{r:,}/s" for r in rates], padding=4, fontsize=9)
    axis.invert_yaxis()
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1000:,.0f}k"))
    axis.set_xlabel("events per second (higher is better)")
    axis.set_title(f"Loading one partition of {int(max(sizes, key=int)):,} events", fontsize=11)
    axis.spines[["top", "right"]].set_visible(False)
    axis.set_xlim(0, max(rates) * 1.25)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
