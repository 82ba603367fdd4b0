"""The S3 layout: where raw files land, where quarantined records go, and how to parse keys.

Raw files (written by the microbatcher)::

    <raw prefix>/customer=<c>/event=<e>/date=YYYY-MM-DD/hour=HH/<name>.jsonl[.gz]

Quarantined records (written by the loader)::

    quarantine/customer=<c>/event=<e>/date=YYYY-MM-DD/hour=HH/<source name>.errors.jsonl
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.names import Stream, is_valid_name

QUARANTINE_PREFIX = "quarantine"
RAW_SUFFIXES = (".jsonl", ".jsonl.gz")
# Dagster's hourly partition key format (``HourlyPartitionsDefinition``).
HOUR_KEY_FORMAT = "%Y-%m-%d-%H:%M"

_PARTITION_PATH_RE = re.compile(
    r"customer=(?P<customer>[^/]+)/event=(?P<event>[^/]+)/"
    r"date=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/(?P<name>[^/]+)"
)


@dataclass(frozen=True, order=True)
class RawFile:
    """A raw file's place in the layout: its stream, its UTC hour and its file name."""

    stream: Stream
    hour: datetime
    name: str


def hour_floor(moment: datetime) -> datetime:
    """The start of the UTC hour containing ``moment`` (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_key(hour: datetime) -> str:
    """The hourly partition key of ``hour``, e.g. ``2026-11-26-13:00``."""
    return hour_floor(hour).strftime(HOUR_KEY_FORMAT)


def parse_hour_key(key: str) -> datetime:
    return datetime.strptime(key, HOUR_KEY_FORMAT).replace(tzinfo=UTC)


def load_key(stream: Stream, hour: datetime) -> str:
    """The batch load job's name for one (stream, hour): ``<hour>|<customer>.<event>``, e.g.
    ``2026-11-26-13:00|acme.page_view`` (the partition keys of earlier releases, so runs queued
    before an upgrade still load)."""
    return f"{hour_key(hour)}|{stream.key}"


def parse_load_key(key: str) -> tuple[Stream, datetime]:
    """The (stream, hour) of a load key; a malformed key is a ClickstreamError."""
    hour, _, stream = key.partition("|")
    try:
        return Stream.parse(stream), parse_hour_key(hour)
    except ValueError:
        raise ClickstreamError(
            f"not a load key such as 2026-11-26-13:00|acme.page_view: {key!r}"
        ) from None


def stream_of(key: str) -> str:
    """The ``customer.event`` part of a load key."""
    return key.partition("|")[2]


def hour_path(hour: datetime) -> str:
    hour = hour_floor(hour)
    return f"date={hour:%Y-%m-%d}/hour={hour:%H}"


def stream_prefix(raw_prefix: str, stream: Stream) -> str:
    """``<raw prefix>/customer=<c>/event=<e>/``: every raw file of one stream."""
    return f"{raw_prefix}/customer={stream.customer}/event={stream.event}/"


def hour_prefix(raw_prefix: str, stream: Stream, hour: datetime) -> str:
    """The prefix holding one (stream, hour)'s raw files."""
    return f"{stream_prefix(raw_prefix, stream)}{hour_path(hour)}/"


def raw_key(raw_prefix: str, stream: Stream, hour: datetime, name: str) -> str:
    return f"{hour_prefix(raw_prefix, stream, hour)}{name}"


def quarantine_key(stream: Stream, hour: datetime, source_name: str) -> str:
    """Where the bad records of one raw file go."""
    return (
        f"{QUARANTINE_PREFIX}/customer={stream.customer}/event={stream.event}/"
        f"{hour_path(hour)}/{source_name}.errors.jsonl"
    )


def parse_raw_key(raw_prefix: str, key: str) -> RawFile | None:
    """The RawFile of an S3 key, or None when the key is outside the raw layout."""
    head = f"{raw_prefix}/"
    if not key.startswith(head):
        return None
    match = _PARTITION_PATH_RE.fullmatch(key[len(head) :])
    if match is None or not match["name"].endswith(RAW_SUFFIXES):
        return None
    if not (is_valid_name(match["customer"]) and is_valid_name(match["event"])):
        return None
    try:
        day = datetime.strptime(match["date"], "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    hour = int(match["hour"])
    if hour > 23:
        return None
    stream = Stream(match["customer"], match["event"])
    return RawFile(stream, day + timedelta(hours=hour), match["name"])
