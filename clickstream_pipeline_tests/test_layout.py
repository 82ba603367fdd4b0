from __future__ import annotations

from datetime import UTC, datetime

import pytest

from clickstream_pipeline.layout import (
    RawFile,
    hour_key,
    hour_prefix,
    parse_hour_key,
    parse_raw_key,
    quarantine_key,
    raw_key,
)
from clickstream_pipeline.names import Stream

HOUR = datetime(2026, 11, 26, 13, tzinfo=UTC)
ACME = Stream("acme", "add_to_cart")


def test_raw_key_follows_the_design_layout() -> None:
    key = raw_key("raw", ACME, HOUR, "part-0001.jsonl.gz")
    assert key == "raw/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/part-0001.jsonl.gz"
    assert parse_raw_key("raw", key) == RawFile(ACME, HOUR, "part-0001.jsonl.gz")
    assert (
        hour_prefix("raw", ACME, HOUR)
        == "raw/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/"
    )


def test_quarantine_key_follows_the_design_layout() -> None:
    assert quarantine_key(ACME, HOUR, "part-0001.jsonl.gz") == (
        "quarantine/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/"
        "part-0001.jsonl.gz.errors.jsonl"
    )


def test_hour_keys_are_dagster_hourly_partition_keys() -> None:
    assert hour_key(datetime(2026, 11, 26, 13, 59, 59, tzinfo=UTC)) == "2026-11-26-13:00"
    assert parse_hour_key("2026-11-26-13:00") == HOUR


@pytest.mark.parametrize(
    "key",
    [
        "other/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/a.jsonl",
        "raw/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/a.csv",
        "raw/customer=acme/event=add_to_cart/date=2026-11-26/hour=24/a.jsonl",
        "raw/customer=acme/event=add_to_cart/date=2026-02-30/hour=13/a.jsonl",
        "raw/customer=Acme/event=add_to_cart/date=2026-11-26/hour=13/a.jsonl",
        "raw/customer=acme/event=add-to-cart/date=2026-11-26/hour=13/a.jsonl",
        "raw/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/sub/a.jsonl",
        "raw/customer=acme/event=add_to_cart/date=2026-11-26/a.jsonl",
        "raw/customer=acme/date=2026-11-26/hour=13/a.jsonl",
        "raw/customer=acme/event=add_to_cart/date=2026-11-26/hour=13/",
    ],
)
def test_keys_outside_the_layout_are_ignored(key: str) -> None:
    assert parse_raw_key("raw", key) is None
