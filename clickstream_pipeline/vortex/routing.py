"""Where one stream record goes: ``customer=/event=/hour=`` of the raw layout, or the errors
prefix with the reason it cannot be routed."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.names import NAME_RULE, Stream, is_valid_name
from clickstream_pipeline.records import timestamp_value, valid_timestamp
from clickstream_pipeline.warehouse.base import snake_case

# A receivedAt this far from the record's arrival on the stream is a broken clock or a replay
# from elsewhere: writing it would reopen an hour loaded long ago (or create one far ahead).
MAX_CLOCK_SKEW = timedelta(hours=24)


# A stream carries a few thousand distinct customers and event names, each in millions of
# records: their checks are remembered rather than redone per record.
_NAME_CACHE = 65_536


@functools.lru_cache(maxsize=_NAME_CACHE)
def _valid_customer(customer: str) -> bool:
    return is_valid_name(customer)


@functools.lru_cache(maxsize=_NAME_CACHE)
def _table_name(event: str) -> str:
    return snake_case(event)


@functools.lru_cache(maxsize=_NAME_CACHE)
def _stream(customer: str, event: str) -> Stream:
    return Stream(customer, event)


@dataclass(frozen=True, slots=True)
class Routed:
    """A record that belongs to ``stream``'s raw files for ``hour``."""

    stream: Stream
    hour: datetime
    message_id: str


@dataclass(frozen=True, slots=True)
class Unroutable:
    """A record that goes to the errors prefix, and why."""

    reason: str


def route(data: bytes, arrival: datetime) -> Routed | Unroutable:
    """Route one record's data (a Segment track call plus ``customer``) that reached the
    stream at ``arrival``."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        return Unroutable(f"invalid JSON: {error}")
    if not isinstance(record, dict):
        return Unroutable(f"not a JSON object but {type(record).__name__}")
    customer = record.get("customer")
    if customer is None:
        return Unroutable("customer is missing")
    if not isinstance(customer, str) or not _valid_customer(customer):
        return Unroutable(f"customer {customer!r} does not match {NAME_RULE}")
    name = record.get("event")
    if not isinstance(name, str) or not name.strip():
        return Unroutable("event is missing or not a non-empty string")
    event = _table_name(name)
    if not is_valid_name(event):
        return Unroutable(f"event {name!r} gives the table name {event!r}, not {NAME_RULE}")
    message_id = record.get("messageId")
    if not isinstance(message_id, str) or not message_id.strip():
        return Unroutable("messageId is missing or not a non-empty string")
    received_text = valid_timestamp(record.get("receivedAt"))
    if received_text is None:
        if "receivedAt" not in record:
            return Unroutable("receivedAt is missing")
        return Unroutable("receivedAt is not an ISO-8601 timestamp with a time zone")
    received_at = timestamp_value(received_text).astimezone(UTC)
    if abs(received_at - arrival) > MAX_CLOCK_SKEW:
        return Unroutable(
            f"receivedAt {received_text} is more than {MAX_CLOCK_SKEW.total_seconds() / 3600:g} h"
            f" from its arrival on the stream at {arrival:%Y-%m-%dT%H:%M:%SZ}"
        )
    return Routed(_stream(customer, event), hour_floor(received_at), message_id)
