"""Finding work: which (stream, hour)s have files whose set differs from what was loaded.

Each stream is listed with one paginated ListObjectsV2 call that starts after the stream's
lookback boundary (S3 returns keys in order, and ``date=/hour=`` sort chronologically), so a tick
costs one request per stream plus one per 1,000 files in the window: it grows with new files,
never with the bucket. A stream seen for the first time (new, or re-added to the registry) is
listed in full once, so every hour it has files for is loaded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from clickstream_pipeline.layout import hour_path, parse_raw_key, stream_prefix
from clickstream_pipeline.loader import RawStore, fingerprint
from clickstream_pipeline.names import Stream
from clickstream_pipeline.warehouse.base import LedgerEntry, SourceFile, Warehouse

LIST_CONCURRENCY = 16


@dataclass(frozen=True, order=True)
class PendingPartition:
    """A completed (stream, hour) whose files are not what the ledger says was loaded."""

    hour: datetime
    stream: Stream
    files: tuple[SourceFile, ...]
    fingerprint: str
    reload: bool  # True when an earlier load of this partition exists (late or rewritten files)


@dataclass(frozen=True)
class Listing:
    """One stream's files grouped by hour, and how many list requests that took."""

    stream: Stream
    hours: dict[datetime, tuple[SourceFile, ...]]
    requests: int


def list_stream(
    store: RawStore, stream: Stream, since: datetime | None, until: datetime | None = None
) -> Listing:
    """List a stream's raw files in hours at or after ``since`` (all of them if None) and, if
    ``until`` is given, before it (listing stops at the first page that passes it)."""
    prefix = stream_prefix(store.raw_prefix, stream)
    arguments = {"Bucket": store.bucket, "Prefix": prefix}
    if since is not None:
        # "<prefix>date=D/hour=H" (no trailing "/") sorts just before every key of that hour.
        arguments["StartAfter"] = f"{prefix}{hour_path(since)}"
    hours: dict[datetime, list[SourceFile]] = defaultdict(list)
    requests = 0
    end = None if until is None else f"{prefix}{hour_path(until)}"
    for page in store.client.get_paginator("list_objects_v2").paginate(**arguments):  # type: ignore[arg-type]
        requests += 1
        contents = page.get("Contents", [])
        for obj in contents:
            parsed = parse_raw_key(store.raw_prefix, obj["Key"])
            if parsed is None or parsed.stream != stream:
                continue
            if since is not None and parsed.hour < since:
                continue
            if until is not None and parsed.hour >= until:
                continue
            hours[parsed.hour].append(SourceFile(obj["Key"], obj["ETag"].strip('"'), obj["Size"]))
        if end is not None and contents and contents[-1]["Key"] > end:
            break
    return Listing(stream, {hour: tuple(sorted(files)) for hour, files in hours.items()}, requests)


def list_streams(
    store: RawStore,
    streams: Iterable[tuple[Stream, datetime | None]],
    until: datetime | None = None,
) -> list[Listing]:
    """List several streams in parallel (S3 latency, not CPU, is the cost)."""
    work = list(streams)
    if not work:
        return []
    with ThreadPoolExecutor(min(LIST_CONCURRENCY, len(work)), thread_name_prefix="s3-list") as pool:
        return list(pool.map(lambda item: list_stream(store, item[0], item[1], until), work))


def pending_partitions(
    listings: Iterable[Listing],
    ledger: dict[tuple[str, datetime], LedgerEntry],
    now: datetime,
    grace: timedelta,
) -> list[PendingPartition]:
    """Completed hours (end + grace <= now) whose file fingerprint differs from the ledger's."""
    pending = []
    for listing in listings:
        for hour, files in listing.hours.items():
            if hour + timedelta(hours=1) + grace > now:
                continue
            current = fingerprint(files)
            entry = ledger.get((listing.stream.key, hour))
            if entry is not None and entry.fingerprint == current:
                continue
            pending.append(
                PendingPartition(hour, listing.stream, files, current, entry is not None)
            )
    return sorted(pending)


def range_pending(
    store: RawStore,
    warehouse: Warehouse,
    streams: Iterable[Stream],
    since: datetime,
    until: datetime,
    now: datetime,
    grace: timedelta,
) -> list[PendingPartition]:
    """Pending partitions of ``streams`` in the hours ``[since, until)`` (a backfill's scope):
    one listing per stream from ``since``, compared with the ledger from ``since``."""
    selected = list(streams)
    listings = list_streams(store, [(stream, since) for stream in selected], until)
    ledger = warehouse.ledger(selected, since) if selected else {}
    return pending_partitions(listings, ledger, now, grace)
