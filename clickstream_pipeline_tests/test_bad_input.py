"""Hostile and broken input: good records always load, bad ones are quarantined with a reason,
nothing crashes — and a property test over random batches and load orders."""

from __future__ import annotations

import gzip
import random
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickstream_pipeline.loader import LoadOutcome, RawStore, load_partition
from clickstream_pipeline.names import Stream
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse import warehouse_for_url
from clickstream_pipeline_tests.helpers import (
    message_ids,
    put_file,
    put_raw,
    query,
    recent_hour,
    record,
)

H1, H2, H3 = recent_hour(4), recent_hour(3), recent_hour(2)


def load(pipeline: dict[str, str], stream: Stream, hour: datetime) -> LoadOutcome:
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")
    return load_partition(
        store, warehouse_for_url(pipeline["CLICKSTREAM_WAREHOUSE_URL"]), stream, hour
    )


def quarantined(bucket: str, outcome: LoadOutcome) -> list[tuple[int, str]]:
    entries = []
    for key in outcome.quarantine_keys:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        entries += [(e["line"], e["error"]) for e in map(orjson.loads, body.splitlines())]
    return entries


DEEP = (
    b'{"messageId": "deep", "receivedAt": "2026-01-01T00:00:00Z", "properties": {"a": '
    + (b"[" * 5000 + b"]" * 5000)
    + b"}}"
)


@pytest.mark.parametrize(
    ("name", "body", "error"),
    [
        ("empty.jsonl", b"", None),
        ("empty.jsonl.gz", gzip.compress(b"", mtime=0), None),
        ("blank-lines.jsonl", b"\n\n   \n", None),
        ("deep.jsonl", DEEP + b"\n", "invalid JSON: depth limit exceeded"),
        ("scalar.jsonl", b"42\n", "not a JSON object but int"),
        ("string.jsonl", b'"hello"\n', "not a JSON object but str"),
        ("null.jsonl", b"null\n", "not a JSON object but NoneType"),
        ("latin1.jsonl", '{"messageId": "é"}'.encode("latin-1") + b"\n", "invalid JSON"),
        (
            "id-number.jsonl",
            b'{"messageId": 7, "receivedAt": "2026-01-01T00:00:00Z"}\n',
            "messageId is missing or not a non-empty string",
        ),
        (
            "id-blank.jsonl",
            b'{"messageId": "  ", "receivedAt": "2026-01-01T00:00:00Z"}\n',
            "messageId is missing or not a non-empty string",
        ),
        (
            "no-zone.jsonl",
            b'{"messageId": "z", "receivedAt": "2026-01-01T00:00:00"}\n',
            "receivedAt is not an ISO-8601 timestamp with a time zone",
        ),
        (
            "week-date.jsonl",
            b'{"messageId": "w", "receivedAt": "2026-W01-1T00:00:00Z"}\n',
            "receivedAt is not an ISO-8601 timestamp with a time zone",
        ),
        ("garbage.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "truncated gzip file"),
    ],
)
def test_broken_files_and_lines_never_block_good_records(
    pipeline: dict[str, str], customer: str, name: str, body: bytes, error: str | None
) -> None:
    stream = Stream(customer, "page_view")
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    put_file(bucket, stream, H1, "good", [record("good-1", H1)])
    put_raw(bucket, stream, H1, name, body)

    outcome = load(pipeline, stream, H1)

    assert sorted(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == ["good-1"]
    found = quarantined(bucket, outcome)
    if error is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0][1].startswith(error), found


def test_a_5_mb_line_and_extreme_numbers_load(pipeline: dict[str, str], customer: str) -> None:
    stream = Stream(customer, "page_view")
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    big = record("big", H1, blob="x" * (5 * 1024 * 1024))
    numbers = (
        b'{"messageId": "numbers", "receivedAt": "2026-01-01T00:00:00Z", "properties": '
        b'{"huge": 123456789012345678901234567890, "tiny": 1e-400, "vast": 1e400, "ok": 1.5}}'
    )
    put_file(
        pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [big, numbers, record("n", H1, ok=2.5)]
    )

    outcome = load(pipeline, stream, H1)

    assert (outcome.rows_loaded, outcome.quarantined) == (3, 0)
    table = f'"{stream.customer}"."{stream.event}"'
    rows = query(
        url,
        f"SELECT message_id, ok, huge, vast, properties->>'huge', length(blob) FROM {table} "
        "ORDER BY 1",
    )
    assert rows == [
        ("big", None, None, None, None, 5 * 1024 * 1024),
        ("n", 2.5, None, None, None, None),
        # Beyond bigint or beyond double: NULL in the column (a double would round it; the
        # rule both dialects share), exact in properties.
        ("numbers", 1.5, None, None, "123456789012345678901234567890", None),
    ]


def test_a_late_file_landing_during_a_load_is_picked_up_next(
    pipeline: dict[str, str], customer: str
) -> None:
    from clickstream_pipeline.discovery import list_stream, pending_partitions
    from clickstream_pipeline.warehouse.postgres import PostgresWarehouse

    stream = Stream(customer, "page_view")
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    put_file(bucket, stream, H1, "a", [record("m1", H1)])
    store = RawStore(s3_client(), bucket, "raw")
    listed = store.list_partition(stream, H1)
    put_file(bucket, stream, H1, "late", [record("m2", H1)])  # lands after the listing
    warehouse = PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"])
    assert load_partition(store, warehouse, stream, H1, files=listed).rows_loaded == 1

    ledger = warehouse.ledger([stream])
    now = datetime.now(UTC)
    pending = pending_partitions([list_stream(store, stream, None)], ledger, now, timedelta())
    assert [(p.stream, p.hour, p.reload) for p in pending] == [(stream, H1, True)]
    assert load_partition(store, warehouse, stream, H1).rows_loaded == 2


# --- the property: whatever the batch and the order of loads -------------------------------


BAD_LINES = [b"{", b"[]", b'{"receivedAt": "2026-01-01T00:00:00Z"}', b'{"messageId": "x"}']


@pytest.mark.slow(seconds=50)
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batches=st.lists(
        st.lists(
            st.one_of(
                st.integers(0, 30), st.sampled_from(range(len(BAD_LINES))).map(lambda i: -1 - i)
            ),
            min_size=0,
            max_size=25,
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_rows_equal_unique_valid_messages_whatever_the_order(
    pipeline: dict[str, str], batches: list[list[int]], seed: int
) -> None:
    """Files of random valid (by message number) and invalid lines spread over three hours,
    loaded in a random order, some twice: the table holds each valid message exactly once and
    the quarantine holds every invalid line."""
    stream = Stream(f"p{uuid.uuid4().hex[:12]}", "page_view")
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    hours = [H1, H2, H3]
    valid: set[str] = set()
    invalid = 0
    for index, batch in enumerate(batches):
        hour = hours[index % 3]
        lines: list[dict[str, object] | bytes | str] = []
        for item in batch:
            if item >= 0:
                lines.append(record(f"m{item}", hour, n=item))
                valid.add(f"m{item}")
            else:
                lines.append(BAD_LINES[-1 - item])
                invalid += 1
        put_file(bucket, stream, hour, f"f{index}", lines)
    order = hours * 2
    random.Random(seed).shuffle(order)
    outcomes = [load(pipeline, stream, hour) for hour in order]

    loaded = message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream) if valid else {}
    assert set(loaded) == valid
    first_loads = {o.hour: o for o in reversed(outcomes) if not o.skipped}
    assert sum(o.quarantined for o in first_loads.values()) == invalid


def test_timestamps_outside_the_warehouses_ranges_are_refused_not_loaded(
    pipeline: dict[str, str], customer: str
) -> None:
    stream = Stream(customer, "page_view")
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    received = f"{H1:%Y-%m-%dT%H}:05:00"

    def stamped(message_id: str, **stamps: str) -> dict[str, object]:
        return {**record(message_id, H1), **stamps}

    put_file(
        pipeline["CLICKSTREAM_BUCKET"],
        stream,
        H1,
        "a",
        [
            # PostgreSQL accepts zone offsets up to 15:59; Python would take +16:00 and more.
            stamped("far_zone", receivedAt=f"{received}+16:00"),
            stamped("edge_zone", receivedAt=f"{received}+15:59"),
            stamped("bad_sent", sentAt=f"{received}+18:00", timestamp=f"{H1:%Y-%m-%d}T24:00:00Z"),
            stamped("no_day", receivedAt=f"{H1:%Y}-02-30T10:00:00Z"),
        ],
    )

    outcome = load(pipeline, stream, H1)

    assert (outcome.rows_loaded, outcome.quarantined) == (2, 2)
    table = f'"{stream.customer}"."{stream.event}"'
    rows = query(
        url, f"SELECT message_id, received_at, sent_at, event_timestamp FROM {table} ORDER BY 1"
    )
    # Optional timestamps out of range are NULL; the record still loads.
    assert [(row[0], row[2] is None, row[3] is None) for row in rows] == [
        ("bad_sent", True, True),
        ("edge_zone", False, False),
    ]
    assert rows[1][1] == datetime.fromisoformat(f"{received}+15:59")
