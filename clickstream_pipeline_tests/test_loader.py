"""The load path against the real embedded PostgreSQL and local S3 server."""

from __future__ import annotations

import gzip
import threading
from datetime import datetime
from typing import Any

import orjson
import pytest

from clickstream_pipeline.loader import LoadOutcome, RawStore, load_partition
from clickstream_pipeline.names import Stream
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse import warehouse_for_url
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import (
    message_ids,
    put_file,
    put_raw,
    query,
    recent_hour,
    record,
)

H1, H2 = recent_hour(3), recent_hour(2)


@pytest.fixture
def stream(customer: str) -> Stream:
    return Stream(customer, "add_to_cart")


def load(pipeline: dict[str, str], stream: Stream, hour: datetime) -> LoadOutcome:
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")
    return load_partition(
        store, warehouse_for_url(pipeline["CLICKSTREAM_WAREHOUSE_URL"]), stream, hour
    )


def test_duplicates_in_file_across_files_and_across_hours_load_once(
    pipeline: dict[str, str], stream: Stream
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    put_file(bucket, stream, H1, "a", [record("m1", H1), record("m2", H1), record("m1", H1)])
    put_file(bucket, stream, H1, "b", [record("m2", H1), record("m3", H1)])
    put_file(bucket, stream, H2, "c", [record("m3", H2), record("m4", H2)])

    first = load(pipeline, stream, H1)
    second = load(pipeline, stream, H2)

    assert (first.records_read, first.rows_loaded, first.duplicates) == (5, 3, 2)
    assert (second.records_read, second.rows_loaded, second.duplicates) == (2, 1, 1)
    assert message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream) == {
        "m1": H1,
        "m2": H1,
        "m3": H1,
        "m4": H2,
    }


def test_a_rerun_with_the_same_files_changes_nothing(
    pipeline: dict[str, str], stream: Stream
) -> None:
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1), record("m2", H1)])
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert load(pipeline, stream, H1).rows_loaded == 2
    table = f'"{stream.customer}"."{stream.event}"'
    before = query(url, f"SELECT message_id, _loaded_at FROM {table} ORDER BY 1")

    again = load(pipeline, stream, H1)

    assert again.skipped and again.rows_loaded == 0
    assert query(url, f"SELECT message_id, _loaded_at FROM {table} ORDER BY 1") == before


def test_a_late_file_adds_exactly_its_new_events(pipeline: dict[str, str], stream: Stream) -> None:
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    put_file(bucket, stream, H1, "a", [record("m1", H1), record("m2", H1)])
    load(pipeline, stream, H1)
    put_file(bucket, stream, H1, "late", [record("m2", H1), record("m5", H1), record("m6", H1)])

    reload = load(pipeline, stream, H1)

    assert (reload.rows_replaced, reload.rows_loaded, reload.duplicates) == (2, 4, 1)
    assert sorted(message_ids(url, stream)) == ["m1", "m2", "m5", "m6"]
    ledger = PostgresWarehouse(url).ledger([stream])
    assert ledger[(stream.key, H1)].fingerprint == reload.fingerprint
    assert ledger[(stream.key, H1)].rows_loaded == 4


def test_bad_records_and_unreadable_files_are_quarantined_and_good_ones_load(
    pipeline: dict[str, str], stream: Stream
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    missing_id = record("x", H1)
    del missing_id["messageId"]
    missing_received = record("x", H1)
    del missing_received["receivedAt"]
    bad_time = {**record("bad-time", H1), "receivedAt": "yesterday"}
    put_file(
        bucket,
        stream,
        H1,
        "mixed",
        [
            record("good-1", H1),
            b'{"messageId": "broken", ',
            b"[1, 2, 3]",
            missing_id,
            missing_received,
            bad_time,
            b'{"messageId": "nul", "receivedAt": "2026-01-01T00:00:00Z", "x": "\\u0000"}',
            b"\xff\xfe not utf-8",
            record("good-2", H1),
        ],
    )
    good = gzip.compress(orjson.dumps(record("good-3", H1)) + b"\n")
    put_raw(bucket, stream, H1, "truncated.jsonl.gz", good + gzip.compress(b'{"a": 1}\n')[:15])
    put_raw(bucket, stream, H1, "not-gzip.jsonl.gz", b"this is not gzip at all\n")

    outcome = load(pipeline, stream, H1)

    assert (outcome.records_read, outcome.quarantined, outcome.rows_loaded) == (12, 9, 3)
    assert sorted(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == [
        "good-1",
        "good-2",
        "good-3",
    ]
    quarantined = {}
    for key in outcome.quarantine_keys:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        quarantined[key.rsplit("/", 1)[1]] = [orjson.loads(line) for line in body.splitlines()]
    mixed = quarantined.pop("mixed.jsonl.gz.errors.jsonl")
    assert [(q["line"], q["error"].split(":")[0]) for q in mixed] == [
        (2, "invalid JSON"),
        (3, "not a JSON object but list"),
        (4, "messageId is missing or not a non-empty string"),
        (5, "receivedAt is missing"),
        (6, "receivedAt is not an ISO-8601 timestamp with a time zone"),
        (7, "contains a \\u0000 character, which the warehouse cannot store"),
        (8, "invalid JSON"),
    ]
    assert mixed[1]["raw"] == "[1, 2, 3]" and mixed[6]["raw"] == "\\xff\\xfe not utf-8"
    assert {q["source_key"] for q in mixed} == {
        f"raw/customer={stream.customer}/event={stream.event}/date={H1:%Y-%m-%d}/hour={H1:%H}/"
        "mixed.jsonl.gz"
    }
    assert [
        (q["line"], q["error"].split(":")[0], q["raw"])
        for q in quarantined.pop("truncated.jsonl.gz.errors.jsonl")
    ] == [(2, "truncated gzip file", None)]
    assert [
        (q["line"], q["error"].split(":")[0])
        for q in quarantined.pop("not-gzip.jsonl.gz.errors.jsonl")
    ] == [(1, "not a valid gzip file")]
    assert quarantined == {}
    assert outcome.quarantine_keys[0].startswith(
        f"quarantine/customer={stream.customer}/event={stream.event}/date={H1:%Y-%m-%d}/hour={H1:%H}/"
    )


def test_properties_become_typed_columns_and_new_ones_add_columns(
    pipeline: dict[str, str], stream: Stream
) -> None:
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    put_file(
        bucket,
        stream,
        H1,
        "a",
        [
            record(
                "m1",
                H1,
                productId="X1",
                unitPrice=9.99,
                quantity=2,
                isGift=True,
                experiment={"name": "b"},
                **{"Page Title": "Home"},
            ),
            record("m2", H1, productId="X2", unitPrice=5, quantity=1, isGift=False),
        ],
    )
    first = load(pipeline, stream, H1)
    put_file(
        bucket,
        stream,
        H2,
        "b",
        [
            record("m3", H2, productId="X3", quantity="two", couponCode="WELCOME"),
        ],
    )
    second = load(pipeline, stream, H2)

    assert first.new_columns == ["is_gift", "page_title", "product_id", "quantity", "unit_price"]
    assert second.new_columns == ["coupon_code"]
    columns = dict(
        query(
            url,
            (
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s"
            ),
            (stream.customer, stream.event),
        )
    )
    assert {k: columns[k] for k in first.new_columns + second.new_columns} == {
        "is_gift": "boolean",
        "page_title": "text",
        "product_id": "text",
        "quantity": "bigint",
        "unit_price": "double precision",
        "coupon_code": "text",
    }
    assert "experiment" not in columns
    table = f'"{stream.customer}"."{stream.event}"'
    rows = query(
        url,
        f"SELECT message_id, product_id, unit_price, quantity, is_gift, coupon_code, "
        f"properties->>'quantity' FROM {table} ORDER BY message_id",
    )
    assert rows == [
        ("m1", "X1", 9.99, 2, True, None, "2"),
        ("m2", "X2", 5.0, 1, False, None, "1"),
        ("m3", "X3", None, None, None, "WELCOME", "two"),
    ]


def test_two_loads_of_the_same_partition_at_once_give_one_copy(
    pipeline: dict[str, str], stream: Stream
) -> None:
    records = [record(f"m{i}", H1) for i in range(2000)]
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", records)
    outcomes: list[LoadOutcome] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(load(pipeline, stream, H1)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(o.skipped for o in outcomes) == [False, True, True]
    assert len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == 2000


def test_hostile_property_names_stay_inside_their_table(
    pipeline: dict[str, str], stream: Stream
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    hostile = {
        'x"; DROP TABLE clickstream.load_ledger; --': 1,
        "select": "kw",
        "message_id": "not the id",
        "_hour": "nope",
        "": "empty",
        "naïve": "unicode",
        "a" * 200: "long",
    }
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1, **hostile)])
    outcome = load(pipeline, stream, H1)

    assert outcome.rows_loaded == 1
    assert outcome.new_columns == [
        "hour",
        "na_ve",
        "select",
        "x_drop_table_clickstream_load_ledger",
    ]
    assert query(
        url, "SELECT count(*) FROM clickstream.load_ledger WHERE stream = %s", (stream.key,)
    ) == [(1,)]
    table = f'"{stream.customer}"."{stream.event}"'
    assert query(url, f"SELECT message_id, \"select\", properties->>'message_id' FROM {table}") == [
        ("m1", "kw", "not the id")
    ]


def test_concurrent_first_loads_of_one_customers_events_create_its_schema_once(
    pipeline: dict[str, str], customer: str
) -> None:
    streams = [Stream(customer, f"event_{i}") for i in range(6)]
    for stream in streams:
        put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record(f"{stream}-1", H1)])
    errors: list[BaseException] = []

    def first_load(stream: Stream) -> None:
        try:
            load(pipeline, stream, H1)
        except BaseException as error:  # collected: a thread's exception would be lost
            errors.append(error)

    threads = [threading.Thread(target=first_load, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert {
        s.event: len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], s)) for s in streams
    } == {s.event: 1 for s in streams}


def test_the_first_copy_wins_across_chunks_of_a_large_partition(
    pipeline: dict[str, str], stream: Stream
) -> None:
    from clickstream_pipeline.warehouse.postgres import CHUNK_RECORDS

    bucket = pipeline["CLICKSTREAM_BUCKET"]
    first = [record(f"m{i}", H1, n=i, copy="first") for i in range(CHUNK_RECORDS + 500)]
    again = [record("m5", H1, n=5, copy="second"), record(f"m{CHUNK_RECORDS + 1}", H1)]
    put_file(bucket, stream, H1, "a", first[: CHUNK_RECORDS + 200])
    put_file(bucket, stream, H1, "b", [*first[CHUNK_RECORDS + 200 :], *again])

    outcome = load(pipeline, stream, H1)

    assert (outcome.records_read, outcome.rows_loaded, outcome.duplicates) == (
        CHUNK_RECORDS + 502,
        CHUNK_RECORDS + 500,
        2,
    )
    table = f'"{stream.customer}"."{stream.event}"'
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert query(url, f"SELECT copy, n FROM {table} WHERE message_id = 'm5'") == [("first", 5)]
    assert query(url, f"SELECT count(*), count(DISTINCT message_id) FROM {table}") == [
        (CHUNK_RECORDS + 500, CHUNK_RECORDS + 500)
    ]


# Values at the edges of each column kind: the rule that flattens them must be the same whether
# the column existed when the rows were sent or was added after them.
EDGE_VALUES: dict[str, list[Any]] = {
    "late_int": [0, -1, 2**63 - 1, -(2**63), 1.5, "7", True, None, {"a": 1}, 7, 8, 9, 10],
    "late_num": [
        *(1.5, 0.0, -0.0, -(2**53), 1e-300, 2.5e-320, -7, 2**63 - 1, "1", False, 3.25),
        *(2.0**53, 2**53 + 1, 1e300),
    ],
    "late_str": ["tab\there", "line\nbreak", "back\\slash", "ünï", "", 5, None, "x", "y"],
    "late_bool": [True, False, 1, "true", None, True, False, True],
}


def test_columns_added_after_rows_were_sent_hold_what_rows_formatted_later_hold(
    pipeline: dict[str, str], stream: Stream
) -> None:
    from clickstream_pipeline.warehouse.postgres import FIRST_RECORDS

    bucket = pipeline["CLICKSTREAM_BUCKET"]
    filler = [record(f"f{i}", H1, filler=i) for i in range(FIRST_RECORDS)]
    rows = max(len(values) for values in EDGE_VALUES.values())

    def edge_records(prefix: str, hour: datetime) -> list[dict[str, Any]]:
        return [
            record(
                f"{prefix}{i}",
                hour,
                **{name: values[i] for name, values in EDGE_VALUES.items() if i < len(values)},
            )
            for i in range(rows)
        ]

    # H1: the properties first appear after the first records, so their columns come late;
    # H2: the columns exist, and rows are formatted with them.
    put_file(bucket, stream, H1, "a", [*filler, *edge_records("late", H1)])
    put_file(bucket, stream, H2, "a", edge_records("early", H2))

    late = load(pipeline, stream, H1)
    early = load(pipeline, stream, H2)

    assert sorted(late.new_columns) == ["filler", "late_bool", "late_int", "late_num", "late_str"]
    assert early.new_columns == []
    table = f'"{stream.customer}"."{stream.event}"'
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    columns = ", ".join(EDGE_VALUES)

    def values(prefix: str) -> list[tuple[Any, ...]]:
        return query(
            url,
            f"SELECT {columns} FROM {table} WHERE message_id LIKE %s "
            "ORDER BY substr(message_id, length(%s) + 1)::int",
            (f"{prefix}%", prefix),
        )

    assert values("late") == values("early")
    early_values = values("early")
    assert early_values[:4] == [
        (0, 1.5, "tab\there", True),
        (-1, 0.0, "line\nbreak", False),
        (2**63 - 1, 0.0, "back\\slash", None),
        (-(2**63), -(2.0**53), "ünï", None),
    ]
    assert [row[0] for row in early_values[4:10]] == [None, None, None, None, None, 7]
    # A double holds magnitudes up to 2**53, where it still holds every integer.
    assert [row[1] for row in early_values[4:8]] == [1e-300, None, -7.0, None]
    assert [row[1] for row in early_values[11:14]] == [2.0**53, None, None]
    assert [row[2] for row in early_values[4:7]] == ["", None, None]


def test_each_property_is_given_a_column_once_and_never_past_the_column_cap() -> None:
    from clickstream_pipeline.records import KIND_BOOLEAN, KIND_INTEGER, KIND_STRING
    from clickstream_pipeline.warehouse.base import MAX_PROPERTY_COLUMNS, PropertyColumns

    filler = {f"filler_{i}": "bigint" for i in range(MAX_PROPERTY_COLUMNS - 4)}
    existing = {"message_id": "text", "plan": "text", "score": "jsonb", **filler}
    columns = PropertyColumns(existing, {"text": KIND_STRING, "bigint": KIND_INTEGER})

    added = columns.add(
        {
            "plan": {KIND_INTEGER: 3},  # an existing column keeps its type
            "score": {KIND_INTEGER: 1},  # a type the dialect cannot fill: stays in properties
            "aNew": {KIND_BOOLEAN: 2},  # "aNew" and "a_new" share a column: the first wins
            "a_new": {KIND_STRING: 5},
            "b": {KIND_INTEGER: 1},
            "c": {KIND_STRING: 1},  # the 401st property column: stays in properties
        }
    )
    later = columns.add({"c": {KIND_INTEGER: 1}, "plan": {KIND_BOOLEAN: 1}, "d": {KIND_STRING: 1}})

    assert added == [("a_new", KIND_BOOLEAN), ("b", KIND_INTEGER)]
    assert later == []
    assert columns.by_column() == [
        ("aNew", "a_new", KIND_BOOLEAN),
        ("b", "b", KIND_INTEGER),
        ("plan", "plan", KIND_STRING),
    ]
