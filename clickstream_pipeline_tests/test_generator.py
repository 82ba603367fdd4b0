from __future__ import annotations

import gzip
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from clickstream_pipeline.cli import main
from clickstream_pipeline.generator import (
    GeneratedFile,
    GeneratorSpec,
    customer_names,
    event_names,
    generate_files,
)
from clickstream_pipeline.layout import parse_raw_key
from clickstream_pipeline.registry import registry_backend
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline_tests.conftest import list_keys

NOW = datetime(2026, 11, 26, 14, 30, tzinfo=UTC)
SPEC = GeneratorSpec(
    customers=2,
    events=2,
    hours=3,
    events_per_file=400,
    files_per_hour=2,
    duplicate_rate=0.1,
    bad_record_rate=0.05,
    late_files=3,
    seed=7,
)


def lines_of(generated: GeneratedFile) -> list[bytes]:
    return gzip.decompress(generated.body).splitlines()


def is_valid(line: bytes) -> bool:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(record, dict) or "messageId" not in record or "receivedAt" not in record:
        return False
    try:
        datetime.fromisoformat(record["receivedAt"])
    except ValueError:
        return False
    return True


def test_files_follow_the_raw_layout_and_hours_end_before_now() -> None:
    files = list(generate_files(SPEC, "raw", NOW))
    assert len(files) == 2 * 2 * 3 * 2 + 3
    first = datetime(2026, 11, 26, 11, tzinfo=UTC)
    for generated in files:
        parsed = parse_raw_key("raw", generated.key)
        assert parsed is not None
        assert (parsed.stream, parsed.hour) == (generated.stream, generated.hour)
        assert parsed.name.endswith(".jsonl.gz")
        assert first <= generated.hour <= first + timedelta(hours=2)
    assert {f.stream.key for f in files} == {
        "acme.page_view",
        "acme.add_to_cart",
        "globex.page_view",
        "globex.add_to_cart",
    }


def test_valid_records_are_segment_track_calls_received_in_their_hour() -> None:
    seen: set[str] = set()
    for generated in generate_files(SPEC, "raw", NOW):
        for line in lines_of(generated):
            if not is_valid(line):
                continue
            record = orjson.loads(line)
            if record["messageId"] in seen:
                continue  # a re-delivery repeats the original bytes, from its original hour
            seen.add(record["messageId"])
            assert record["type"] == "track"
            assert set(record) == {
                "messageId",
                "type",
                "event",
                "userId",
                "anonymousId",
                "timestamp",
                "sentAt",
                "receivedAt",
                "properties",
                "context",
            }
            received = datetime.fromisoformat(record["receivedAt"])
            assert generated.hour <= received < generated.hour + timedelta(hours=1)
            assert datetime.fromisoformat(record["sentAt"]) < received
            assert isinstance(record["properties"], dict) and record["properties"]
            assert len(record["messageId"]) == 36


def test_counts_match_the_content() -> None:
    seen: dict[str, set[str]] = {}
    for generated in generate_files(SPEC, "raw", NOW):
        lines = lines_of(generated)
        assert len(lines) == generated.records == 400
        stream_seen = seen.setdefault(generated.stream.key, set())
        new = duplicates = bad = 0
        for line in lines:
            if not is_valid(line):
                bad += 1
            elif (message_id := orjson.loads(line)["messageId"]) in stream_seen:
                duplicates += 1
            else:
                stream_seen.add(message_id)
                new += 1
        assert (new, duplicates, bad) == (
            generated.new_messages,
            generated.duplicates,
            generated.bad_records,
        )
        assert duplicates > 0 and bad > 0


def test_duplicates_are_in_file_cross_file_and_cross_hour() -> None:
    first_seen: dict[str, tuple[datetime, str]] = {}
    kinds: Counter[str] = Counter()
    for generated in generate_files(SPEC, "raw", NOW):
        for line in lines_of(generated):
            if not is_valid(line):
                continue
            message_id = orjson.loads(line)["messageId"]
            where = (generated.hour, generated.key)
            if message_id not in first_seen:
                first_seen[message_id] = where
            elif first_seen[message_id] == where:
                kinds["in-file"] += 1
            elif first_seen[message_id][0] == generated.hour:
                kinds["cross-file"] += 1
            else:
                kinds["cross-hour"] += 1
    assert set(kinds) == {"in-file", "cross-file", "cross-hour"}


def test_every_kind_of_bad_record_is_produced() -> None:
    kinds: Counter[str] = Counter()
    for generated in generate_files(SPEC, "raw", NOW):
        for line in lines_of(generated):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                kinds["invalid_json"] += 1
                continue
            if not isinstance(record, dict):
                kinds["not_an_object"] += 1
            elif "messageId" not in record:
                kinds["missing_message_id"] += 1
            elif "receivedAt" not in record:
                kinds["missing_received_at"] += 1
            elif not is_valid(line):
                kinds["bad_timestamp"] += 1
    assert set(kinds) == {
        "invalid_json",
        "not_an_object",
        "missing_message_id",
        "missing_received_at",
        "bad_timestamp",
    }


def test_generation_is_deterministic_and_late_files_separable() -> None:
    every = [(f.key, f.body) for f in generate_files(SPEC, "raw", NOW)]
    assert every == [(f.key, f.body) for f in generate_files(SPEC, "raw", NOW)]
    on_time = [(f.key, f.body) for f in generate_files(SPEC, "raw", NOW, include="on_time")]
    late = [(f.key, f.body) for f in generate_files(SPEC, "raw", NOW, include="late")]
    assert len(late) == 3 and all("/late-" in key for key, _ in late)
    assert sorted(on_time + late) == sorted(every)
    other_seed = GeneratorSpec(**{**SPEC.__dict__, "seed": 8})
    assert [f.body for f in generate_files(other_seed, "raw", NOW)] != [b for _, b in every]


def test_skew_makes_heavy_customers_and_hours_heavier() -> None:
    spec = GeneratorSpec(
        customers=3,
        events=1,
        hours=3,
        events_per_file=10,
        files_per_hour=1,
        skew=20,
        heavy_customers=1,
        heavy_hours=1,
    )
    records = {
        (f.stream.customer, f.hour.hour): f.records for f in generate_files(spec, "raw", NOW)
    }
    assert records == {
        ("acme", 11): 200,
        ("acme", 12): 200,
        ("acme", 13): 200,
        ("globex", 11): 200,
        ("globex", 12): 10,
        ("globex", 13): 10,
        ("initech", 11): 200,
        ("initech", 12): 10,
        ("initech", 13): 10,
    }


def test_names_beyond_the_built_in_lists_stay_valid() -> None:
    assert customer_names(22)[-2:] == ["customer_020", "customer_021"]
    assert event_names(21)[-1] == "event_020"
    spec = GeneratorSpec(customers=25, events=25, hours=1, events_per_file=1, files_per_hour=1)
    assert len({s.key for s in spec.streams}) == 625


@pytest.mark.parametrize(
    ("field", "value"),
    [("customers", 0), ("events_per_file", 0), ("duplicate_rate", 1.0), ("late_files", -1)],
)
def test_spec_rejects_impossible_values(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        GeneratorSpec(**{field: value})  # type: ignore[arg-type]


def test_cli_writes_to_the_bucket_and_registers_streams(
    bucket: str, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = (
        "generate --customers 2 --events 2 --hours 2 --events-per-file 50 --files-per-hour 2 "
        "--late-files 1 --duplicate-rate 0.1 --bad-record-rate 0.1 --seed 3 --start 2026-11-25T22"
    )
    with pytest.raises(SystemExit) as exited:
        main(args.split())
    assert exited.value.code == 0
    keys = list_keys(bucket, "raw/")
    assert len(keys) == 2 * 2 * 2 * 2 + 1
    assert "raw/customer=acme/event=page_view/date=2026-11-25/hour=22/part-0000.jsonl.gz" in keys
    assert (
        "raw/customer=globex/event=add_to_cart/date=2026-11-25/hour=23/part-0001.jsonl.gz" in keys
    )
    assert [s.key for s in registry_backend().load().streams] == [
        "acme.add_to_cart",
        "acme.page_view",
        "globex.add_to_cart",
        "globex.page_view",
    ]
    body = s3_client().get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    assert len(gzip.decompress(body).splitlines()) == 50
    assert "17 files (1 late), 850 records" in capsys.readouterr().out
