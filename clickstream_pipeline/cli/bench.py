"""``clickstream bench``: the benchmarks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.table import Table

from clickstream_pipeline.cli.app import (
    cli,
    err,
    out,
    stopped_by_signals,
)

PARTS = ("dataplane", "orchestration", "skew", "scale", "vortex", "registry")


@cli.command()
@click.option("--quick", is_flag=True, help="Tiny sizes, no daemon: proves the benchmark runs.")
@click.option(
    "--events",
    "sizes",
    multiple=True,
    type=click.IntRange(min=100),
    help="Data-plane partition sizes (repeatable; default 100,000 and 1,000,000).",
)
@click.option(
    "--only",
    type=click.Choice(PARTS),
    multiple=True,
    help="Run only these parts (repeatable).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write results.json, benchmarks.md and benchmarks.png "
    "(default: benchmarks/ and docs/, or a temporary folder with --quick).",
)
@click.option(
    "--s3-bucket",
    default=None,
    help="Measure the scale part's S3 requests against this bucket, with this environment's AWS "
    "credentials, instead of the local S3 server (its files go under a fresh prefix, deleted "
    "afterwards).",
)
# Interrupted, a part's stack and loaders stop with it; it exits 143 after SIGTERM (130, Ctrl-C).
@stopped_by_signals(unfinished=True)
def bench(
    quick: bool,
    sizes: tuple[int, ...],
    only: tuple[str, ...],
    output: str | None,
    s3_bucket: str | None,
) -> None:
    """Measure the pipeline side by side with the COPY limit and with peers.

    Data plane (this project, COPY-only, naive inserts, dlt), orchestration (clickstream load and
    the daemon), skew, scale, vortex (Kinesis to S3, beside a bare read of the stream, and end
    to end into the warehouse) and registry (the registry API under open-loop load, and a sensor
    tick's registry read). Writes JSON, a Markdown table and a chart.
    """
    import json
    import tempfile

    from clickstream_pipeline.bench import dataplane, orchestration, registry, report, scale, vortex

    parts = set(only) or set(PARTS)
    if output is None and quick:
        output = tempfile.mkdtemp(prefix="clickstream-bench-")
    base = Path(output) if output else None
    json_path = (base or Path("benchmarks")) / "results.json"
    results: dict[str, object] = {"quick": quick}
    if only and json_path.exists():
        # Re-measure some parts and keep the others' last figures.
        results = {**json.loads(json_path.read_text()), "quick": quick}
    steps = {
        "dataplane": lambda: dataplane.run(
            list(sizes) or ([5_000] if quick else [100_000, 1_000_000])
        ),
        "orchestration": lambda: (
            orchestration.run(customers=5, events=4, per_partition=50, daemon=False)
            if quick
            else orchestration.run()
        ),
        "skew": lambda: orchestration.run_skew(
            **({"customers": 5, "light": 100, "factor": 5} if quick else {})
        ),
        "scale": lambda: (
            scale.run(
                customers=5,
                events=4,
                backfill_hours=1,
                history_hours=48,
                s3_bucket=s3_bucket,
                deployment=False,
            )
            if quick
            else scale.run(s3_bucket=s3_bucket)
        ),
        "vortex": lambda: (
            vortex.run(events=5_000, end_to_end_events=5_000) if quick else vortex.run()
        ),
        "registry": lambda: (
            registry.run(
                customers=5,
                events=4,
                read_rate=100,
                write_rate=10,
                seconds=2,
                warmup=1,
                samples=20,
                small=None,
            )
            if quick
            else registry.run()
        ),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        if name in parts:
            err.print(f"bench: {name} ...")
            began = time.perf_counter()
            # Each part points the environment at the servers it starts; the next part must
            # see this command's own (the credentials --s3-bucket is measured with).
            environment = dict(os.environ)
            try:
                results[name] = steps[name]()
            finally:
                os.environ.clear()
                os.environ.update(environment)
            err.print(f"bench: {name} done in {time.perf_counter() - began:.0f} s")
            # After each part: a later part that fails does not lose this one's figures.
            json_path.write_text(json.dumps(results, indent=2) + "\n")
    docs = base or Path("docs")
    docs.mkdir(parents=True, exist_ok=True)
    chart_path = docs / "benchmarks.png"
    if "dataplane" in parts or not chart_path.exists():
        drawn = report.chart(results, chart_path)
    else:
        drawn = True  # the data plane's chart from its last run, which this one left as it was
    (docs / "benchmarks.md").write_text(
        report.markdown(results, "benchmarks.png" if drawn else None)
    )
    table = Table(title="goals", title_justify="left")
    for column in ("goal", "target", "measured", "met"):
        table.add_column(column)
    measured_registry = results.get("registry")
    registry_rows = (
        report.registry_goals(measured_registry) if isinstance(measured_registry, dict) else []
    )
    for goal, target, measured, met in [*report.goals(results), *registry_rows]:
        table.add_row(goal, target, measured, "yes" if met else "no")
    out.print(table)
    out.print(
        f"results: {json_path}; report: {docs / 'benchmarks.md'}"
        + ("" if drawn else " (no chart: install the bench extra for matplotlib)")
    )
