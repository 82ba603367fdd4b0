"""The Redshift dialect: exact SQL, staged files in the local S3 server, and the whole flow run
against the embedded PostgreSQL (only COPY from S3 is done by the test wrapper)."""

from __future__ import annotations

import gzip
import os
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

import orjson
import psycopg2
import pytest

from clickstream_pipeline.errors import ClickstreamError, WriteConflict
from clickstream_pipeline.layout import raw_key
from clickstream_pipeline.loader import (
    TRANSIENT_ERRORS,
    LoadOutcome,
    RawStore,
    fingerprint,
    load_partition,
    with_retries,
)
from clickstream_pipeline.names import Stream
from clickstream_pipeline.records import ReadStats, validate_line
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse import Warehouse, warehouse_for_url
from clickstream_pipeline.warehouse.base import PartitionLoad, SourceFile
from clickstream_pipeline.warehouse.redshift import (
    RedshiftConfig,
    RedshiftWarehouse,
    part_count,
    table_name,
)
from clickstream_pipeline_tests.conftest import list_keys
from clickstream_pipeline_tests.helpers import (
    message_ids,
    new_database,
    put_file,
    query,
    recent_hour,
    record,
)
from clickstream_pipeline_tests.redshift_on_postgres import (
    SERIALIZABLE,
    SNAPSHOT,
    Faults,
    RedshiftOnPostgres,
    install_shims,
)

T = TypeVar("T")

H0, H1, H2 = recent_hour(4), recent_hour(3), recent_hour(2)
ROLE = "arn:aws:iam::123456789012:role/clickstream-copy"
URL = f"redshift://loader:s3cret@example.abc123.us-east-1.redshift.amazonaws.com:5439/dev?iam_role={ROLE}"


@pytest.fixture
def stream(customer: str) -> Stream:
    return Stream(customer, "add_to_cart")


@pytest.fixture(scope="session")
def redshift_db(local_stack: dict[str, str]) -> str:
    """A database of its own on the embedded server: Redshift's ledger differs from PostgreSQL's."""
    emulation = new_database(local_stack["CLICKSTREAM_WAREHOUSE_URL"], "redshift_emulation")
    install_shims(emulation)
    return emulation


@pytest.fixture
def engine(pipeline: dict[str, str], redshift_db: str) -> RedshiftOnPostgres:
    pipeline["CLICKSTREAM_WAREHOUSE_URL"] = redshift_db
    return RedshiftOnPostgres(redshift_db)


def redshift(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, url: str = URL
) -> RedshiftWarehouse:
    return RedshiftWarehouse(
        RedshiftConfig.from_url(url), s3_client(), pipeline["CLICKSTREAM_BUCKET"], connect=engine
    )


def load(
    pipeline: dict[str, str], warehouse: RedshiftWarehouse, stream: Stream, hour: datetime
) -> LoadOutcome:
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")
    return load_partition(store, warehouse, stream, hour)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("staged_mb", "slices", "parts"),
    [(0.1, 4, 1), (2.5, 4, 3), (40, 4, 4), (40, 16, 16), (5000, 4, 8), (3000, 2, 4), (1, 1, 1)],
)
def test_part_count_follows_slices_and_the_size_limits(
    staged_mb: float, slices: int, parts: int
) -> None:
    assert part_count(int(staged_mb * 1024 * 1024), slices) == parts


def test_url_with_password_and_role() -> None:
    config = RedshiftConfig.from_url(URL + "&parts=8&keep_staged=true")
    assert (config.host, config.port, config.database, config.user, config.password) == (
        "example.abc123.us-east-1.redshift.amazonaws.com",
        5439,
        "dev",
        "loader",
        "s3cret",
    )
    assert (config.iam_role, config.parts, config.keep_staged) == (ROLE, 8, True)


def test_url_with_iam_credentials_and_role_from_the_environment() -> None:
    config = RedshiftConfig.from_url(
        "redshift://loader@host/dev?cluster_id=analytics&region=eu-west-1", default_iam_role=ROLE
    )
    assert (config.password, config.cluster_id, config.region, config.iam_role) == (
        None,
        "analytics",
        "eu-west-1",
        ROLE,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redshift://loader:s3cret@host/dev", "Redshift needs an IAM role for COPY"),
        ("redshift://loader:s3cret@host/dev?iam_role=role/x", "Redshift needs an IAM role"),
        (f"redshift://loader@host/dev?iam_role={ROLE}", "give a password, or cluster_id="),
        (f"redshift://:s3cret@host/dev?iam_role={ROLE}", "a user name is required"),
        (f"redshift://loader:s3cret@host/?iam_role={ROLE}", "expected redshift://user"),
        (f"redshift://loader:s3cret@host/dev?iam_role={ROLE}&parts=0", "parts must be between"),
    ],
)
def test_bad_urls_are_one_line_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ClickstreamError) as raised:
        RedshiftConfig.from_url(url)
    assert message in str(raised.value)
    assert "s3cret" not in str(raised.value) and "\n" not in str(raised.value)


def test_the_url_scheme_chooses_the_dialect(pipeline: dict[str, str]) -> None:
    assert isinstance(warehouse_for_url(URL), RedshiftWarehouse)


# --- the whole flow on PostgreSQL ---------------------------------------------------------------


def test_exact_sql_of_a_first_load_with_new_columns_and_of_a_reload(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    put_file(bucket, stream, H1, "a", [record("m1", H1, productId="X1", quantity=2)])
    warehouse = redshift(pipeline, engine)
    first = load(pipeline, warehouse, stream, H1)
    [(load_id,)] = query(
        pipeline["CLICKSTREAM_WAREHOUSE_URL"],
        'SELECT load_id FROM "clickstream"."load_ledger" WHERE stream = %s',
        (str(stream),),
    )
    table = f'"{stream.customer}"."{stream.event}"'
    staged = f"s3://{bucket}/staged/{stream}/{H1:%Y-%m-%dT%H}/{load_id}"
    ledger_check = (
        'SELECT fingerprint FROM "clickstream"."load_ledger" '
        "WHERE stream = %(stream)s AND hour = %(hour)s"
    )
    # The dedup probe looks back 7 days by default, as a literal the sort key prunes with.
    params = {"stream": str(stream), "hour": H1, "since": H1 - timedelta(days=7)}
    columns = (
        '"message_id", "user_id", "anonymous_id", "event_name", "event_timestamp", "sent_at", '
        '"received_at", "properties", "context", "_source_key", "_line"'
    )
    sent = [statement for statement, _ in engine.statements]
    assert first.new_columns == ["product_id", "quantity"]
    assert sent[:8] == [
        "SET statement_timeout TO 1800000",
        "COMMIT",
        'CREATE SCHEMA IF NOT EXISTS "clickstream"',
        'CREATE TABLE IF NOT EXISTS "clickstream"."load_ledger" (stream VARCHAR(128) NOT NULL, '
        "hour TIMESTAMPTZ NOT NULL, load_id VARCHAR(64) NOT NULL, "
        "fingerprint VARCHAR(64) NOT NULL, files VARCHAR(65535) NOT NULL, "
        "records_read BIGINT NOT NULL, rows_loaded BIGINT NOT NULL, duplicates BIGINT NOT NULL, "
        "quarantined BIGINT NOT NULL, new_columns VARCHAR(65535) NOT NULL, run_id VARCHAR(64), "
        "loaded_at TIMESTAMPTZ NOT NULL DEFAULT GETDATE(), seconds DOUBLE PRECISION, "
        "files_read BIGINT, bytes_read BIGINT, PRIMARY KEY (stream, hour)) "
        "DISTSTYLE AUTO SORTKEY (stream, hour)",
        'CREATE TABLE IF NOT EXISTS "clickstream"."load_ledger_files" (stream VARCHAR(128) NOT '
        "NULL, hour TIMESTAMPTZ NOT NULL, load_id VARCHAR(64) NOT NULL, key VARCHAR(1024) NOT "
        "NULL, etag VARCHAR(128) NOT NULL, size BIGINT NOT NULL) DISTSTYLE AUTO SORTKEY "
        "(stream, hour)",
        "COMMIT",
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'clickstream' AND table_name = 'load_ledger'",
        "ROLLBACK",
    ]
    # Every check ends its transaction; each transaction that writes begins with its LOCK.
    assert sent[8:] == [
        ledger_check,
        "ROLLBACK",
        f'CREATE SCHEMA IF NOT EXISTS "{stream.customer}"',
        f"CREATE TABLE IF NOT EXISTS {table} (message_id VARCHAR(256) NOT NULL, user_id "
        "VARCHAR(256), anonymous_id VARCHAR(256), event_name VARCHAR(256), event_timestamp "
        "TIMESTAMPTZ, sent_at TIMESTAMPTZ, received_at TIMESTAMPTZ NOT NULL, properties SUPER, "
        "context SUPER, _hour TIMESTAMPTZ NOT NULL, _source_key VARCHAR(1024) NOT NULL, "
        "_loaded_at TIMESTAMPTZ NOT NULL DEFAULT GETDATE()) DISTKEY (message_id) SORTKEY "
        "(received_at)",
        "COMMIT",
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s",
        "ROLLBACK",
        f"LOCK {table}",
        f'ALTER TABLE {table} ADD COLUMN "product_id" VARCHAR(65535)',
        "COMMIT",
        f"LOCK {table}",
        f'ALTER TABLE {table} ADD COLUMN "quantity" BIGINT',
        "COMMIT",
        "SELECT COUNT(*) FROM stv_slices",
        "ROLLBACK",
        'CREATE TEMP TABLE "_clickstream_staging" ("message_id" VARCHAR(256) NOT NULL, '
        '"user_id" VARCHAR(256), "anonymous_id" VARCHAR(256), "event_name" VARCHAR(256), '
        '"event_timestamp" TIMESTAMPTZ, "sent_at" TIMESTAMPTZ, "received_at" TIMESTAMPTZ NOT NULL, '
        '"properties" VARCHAR(65535), "context" VARCHAR(65535), "_source_key" VARCHAR(1024) NOT '
        'NULL, "_line" INTEGER NOT NULL, "product_id" VARCHAR(65535), "quantity" BIGINT) '
        "DISTKEY (message_id)",
        f'COPY "_clickstream_staging" ({columns}, "product_id", "quantity") FROM '
        f"'{staged}/manifest.json' IAM_ROLE '{ROLE}' MANIFEST GZIP FORMAT AS JSON "
        f"'{staged}/jsonpaths.json' TIMEFORMAT 'auto' STATUPDATE OFF COMPUPDATE OFF",
        'SELECT COUNT(*) FROM "_clickstream_staging"',
        "COMMIT",
        f"LOCK {table}",
        ledger_check,
        f"DELETE FROM {table} WHERE _hour = %(hour)s",
        f'INSERT INTO {table} ("message_id", "user_id", "anonymous_id", "event_name", '
        '"event_timestamp", "sent_at", "received_at", "properties", "context", "_hour", '
        '"_source_key", "product_id", "quantity") SELECT s.message_id, s.user_id, '
        "s.anonymous_id, s.event_name, s.event_timestamp, s.sent_at, s.received_at, "
        "JSON_PARSE(s.properties), JSON_PARSE(s.context), %(hour)s, s._source_key, "
        's."product_id", s."quantity" FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY '
        'message_id ORDER BY _source_key, _line) AS _copy FROM "_clickstream_staging") s '
        f"WHERE s._copy = 1 AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.message_id = "
        "s.message_id AND t.received_at >= %(since)s)",
        "COMMIT",
        'LOCK "clickstream"."load_ledger", "clickstream"."load_ledger_files"',
        'DELETE FROM "clickstream"."load_ledger" WHERE stream = %(stream)s AND hour = %(hour)s',
        'DELETE FROM "clickstream"."load_ledger_files" WHERE stream = %(stream)s AND hour = '
        "%(hour)s",
        'INSERT INTO "clickstream"."load_ledger_files" (stream, hour, load_id, key, etag, size) '
        "VALUES (%s, %s, %s, %s, %s, %s)",
        'INSERT INTO "clickstream"."load_ledger" (stream, hour, load_id, fingerprint, files, '
        "records_read, rows_loaded, duplicates, quarantined, new_columns, run_id, seconds, "
        "files_read, bytes_read) VALUES (%(stream)s, %(hour)s, %(load_id)s, %(fingerprint)s, "
        "%(files)s, %(records_read)s, %(rows_loaded)s, %(duplicates)s, %(quarantined)s, "
        "%(new_columns)s, %(run_id)s, %(seconds)s, %(files_read)s, %(bytes_read)s)",
        "COMMIT",
    ]
    assert [p for _, p in engine.statements if p == params][:1] == [params]

    # A late file without new properties: the same transaction, no DDL.
    put_file(bucket, stream, H1, "late", [record("m2", H1, productId="X2")])
    engine.statements.clear()
    second = load(pipeline, redshift(pipeline, engine), stream, H1)
    assert second.new_columns == [] and second.rows_loaded == 2
    kinds = [statement.split(" ")[0] for statement, _ in engine.statements]
    assert kinds == [
        *("SET", "COMMIT"),  # the statement timeout
        *("CREATE", "CREATE", "CREATE", "COMMIT", "SELECT", "ROLLBACK"),  # the ledger, once
        *("SELECT", "ROLLBACK"),  # loaded already?
        *("CREATE", "CREATE", "COMMIT"),  # the table, once per object
        *("SELECT", "ROLLBACK"),  # its columns
        *("SELECT", "ROLLBACK"),  # the slices, once per object
        *("CREATE", "COPY", "SELECT", "COMMIT"),  # staging, no lock
        *("LOCK", "SELECT", "DELETE", "INSERT", "COMMIT"),  # the rows
        *("LOCK", "DELETE", "DELETE", "INSERT", "INSERT", "COMMIT"),  # the ledger row, its files
    ]
    assert not any("ALTER TABLE" in statement for statement, _ in engine.statements)


def test_staged_parts_and_manifest(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    records = [record(f"m{i:05d}", H1, note="x" * 400, rank=i) for i in range(12_000)]
    put_file(bucket, stream, H1, "a", records[:6000])
    put_file(bucket, stream, H1, "b", records[6000:])
    # No parts= in the URL: one part per slice of the (emulated, 4-slice) cluster.
    warehouse = redshift(pipeline, engine, URL + "&keep_staged=true")

    outcome = load(pipeline, warehouse, stream, H1)

    prefix = f"staged/{stream}/{H1:%Y-%m-%dT%H}/"
    keys = list_keys(bucket, prefix)
    manifest_key = next(k for k in keys if k.endswith("/manifest.json"))
    entries = orjson.loads(s3_client().get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    parts = sorted(k for k in keys if k.endswith(".json.gz"))
    assert len(parts) == 4
    assert [e["url"] for e in entries["entries"]] == [f"s3://{bucket}/{k}" for k in parts]
    assert all(e["mandatory"] is True for e in entries["entries"])
    assert sorted(keys) == sorted(
        [*parts, manifest_key, manifest_key.replace("manifest", "jsonpaths")]
    )
    bodies = [s3_client().get_object(Bucket=bucket, Key=k)["Body"].read() for k in parts]
    sizes = [len(b) for b in bodies]
    assert [e["meta"]["content_length"] for e in entries["entries"]] == sizes
    assert max(sizes) / min(sizes) < 1.05
    staged_ids = sorted(
        orjson.loads(line)["message_id"]
        for body in bodies
        for line in gzip.decompress(body).splitlines()
    )
    assert staged_ids == [f"m{i:05d}" for i in range(12_000)]
    assert outcome.rows_loaded == 12_000
    assert len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == 12_000


def test_dedup_ledger_and_staged_files_removed_after_commit(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    put_file(bucket, stream, H1, "a", [record("m1", H1), record("m2", H1), record("m1", H1), b"{"])
    put_file(bucket, stream, H2, "a", [record("m2", H2), record("m3", H2, isGift=True)])
    warehouse = redshift(pipeline, engine)

    first = load(pipeline, warehouse, stream, H1)
    second = load(pipeline, warehouse, stream, H2)
    again = load(pipeline, warehouse, stream, H2)

    assert (first.rows_loaded, first.duplicates, first.quarantined) == (2, 1, 1)
    assert (second.rows_loaded, second.duplicates) == (1, 1)
    assert again.skipped
    assert message_ids(url, stream) == {"m1": H1, "m2": H1, "m3": H2}
    table = f'"{stream.customer}"."{stream.event}"'
    assert query(
        url, f"SELECT properties->>'isGift', is_gift FROM {table} WHERE message_id = 'm3'"
    ) == [("true", True)]
    assert query(
        url,
        'SELECT hour, rows_loaded, duplicates, quarantined FROM "clickstream"."load_ledger" '
        "WHERE stream = %s ORDER BY hour",
        (str(stream),),
    ) == [(H1, 2, 1, 1), (H2, 1, 1, 0)]
    assert list_keys(bucket, f"staged/{stream}/") == []


def test_a_retry_after_a_disconnect_at_commit_never_loads_twice(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    put_file(
        pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record(f"m{i}", H1) for i in range(50)]
    )
    engine.faults = Faults(disconnect_after_load_commit=1)
    warehouse = redshift(pipeline, engine)

    outcome = with_retries(lambda: load(pipeline, warehouse, stream, H1), base_delay=0.01)

    assert outcome.skipped  # the second attempt found its load in the ledger
    assert len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == 50
    assert query(
        pipeline["CLICKSTREAM_WAREHOUSE_URL"],
        'SELECT count(*) FROM "clickstream"."load_ledger" WHERE stream = %s',
        (str(stream),),
    ) == [(1,)]


def test_a_failed_copy_reports_redshift_load_errors_and_loads_nothing(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    engine.faults = Faults(copy_error="Invalid digit, Value 'x', Pos 0, Type: Long")

    with pytest.raises(ClickstreamError) as raised:
        load(pipeline, redshift(pipeline, engine), stream, H1)

    assert str(raised.value) == (
        f"COPY of {stream} {H1:%Y-%m-%d %H}:00 failed: Load into table '_clickstream_staging' "
        "failed. Check 'sys_load_error_detail' system table for details. "
        "(s3://bucket/staged/part-0000.json.gz line 3 column quantity: Invalid digit, Value 'x', "
        "Pos 0, Type: Long)"
    )
    assert message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream) == {}
    assert list_keys(pipeline["CLICKSTREAM_BUCKET"], f"staged/{stream}/") == []


# --- a real cluster ---------------------------------------------------------------------------

LIVE_URL = os.environ.get("CLICKSTREAM_TEST_REDSHIFT_URL")
LIVE_BUCKET = os.environ.get("CLICKSTREAM_TEST_REDSHIFT_BUCKET")


LIVE = pytest.mark.skipif(
    not (LIVE_URL and LIVE_BUCKET),
    reason="set CLICKSTREAM_TEST_REDSHIFT_URL (redshift://...?iam_role=...) and "
    "CLICKSTREAM_TEST_REDSHIFT_BUCKET (an S3 bucket the role can read) to run against a cluster "
    "(make test-redshift)",
)


def live_put(client: Any, stream: Stream, hour: datetime, lines: list[dict[str, Any]]) -> None:
    body = gzip.compress(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    key = raw_key("raw", stream, hour, f"{uuid.uuid4().hex[:8]}.jsonl.gz")
    client.put_object(Bucket=LIVE_BUCKET, Key=key, Body=body)


def live_warehouse(client: Any) -> RedshiftWarehouse:
    assert LIVE_URL and LIVE_BUCKET
    return RedshiftWarehouse(RedshiftConfig.from_url(LIVE_URL), client, LIVE_BUCKET)


def live_load(client: Any, warehouse: RedshiftWarehouse, stream: Stream, hour: datetime) -> Any:
    """A load as a batch runs it: retried on transient errors (a 1023 among them)."""
    store = RawStore(client, LIVE_BUCKET or "", "raw")
    return lambda: with_retries(lambda: load_partition(store, warehouse, stream, hour))


def live_rows(warehouse: RedshiftWarehouse, stream: Stream) -> tuple[int, int, int]:
    """(rows, distinct message ids, ledger rows) of ``stream``."""
    with warehouse.connection() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*), COUNT(DISTINCT message_id) FROM {table_name(stream)}")
        rows, ids = cur.fetchone()
        cur.execute(
            'SELECT COUNT(*) FROM "clickstream"."load_ledger" WHERE stream = %s', (str(stream),)
        )
        (ledger,) = cur.fetchone()
        conn.rollback()
    return rows, ids, ledger


@LIVE
def test_live_cluster_loads_exactly_once(customer: str) -> None:
    import boto3

    client = boto3.client("s3")
    stream = Stream(customer, "live_check")
    live_put(client, stream, H1, [record("m1", H1), record("m2", H1), record("m1", H1)])
    warehouse = live_warehouse(client)
    store = RawStore(client, LIVE_BUCKET or "", "raw")
    first = load_partition(store, warehouse, stream, H1)
    again = load_partition(store, warehouse, stream, H1)
    assert (first.rows_loaded, first.duplicates, again.skipped) == (2, 1, True)
    assert warehouse.row_counts([stream]) == {str(stream): 2}


@LIVE
@pytest.mark.parametrize("runs", ["one batch", "two runs"])
def test_live_two_loads_of_one_hour_at_once_load_it_once(customer: str, runs: str) -> None:
    """A sensor run and a backfill loading the same hour, on the cluster's own isolation."""
    import boto3

    client = boto3.client("s3")
    stream = Stream(customer, "live_same_hour")
    live_put(client, stream, H1, [record(f"m{i}", H1) for i in range(20)])
    first = live_warehouse(client)
    second = first if runs == "one batch" else live_warehouse(client)

    at_once(live_load(client, first, stream, H1), live_load(client, second, stream, H1))

    assert live_rows(first, stream) == (20, 20, 1)


@LIVE
def test_live_two_hours_sharing_a_message_id_at_once_keep_it_once(customer: str) -> None:
    import boto3

    client = boto3.client("s3")
    stream = Stream(customer, "live_shared_id")
    live_put(client, stream, H1, [record("shared", H1), record("a", H1)])
    live_put(client, stream, H2, [record("shared", H2), record("b", H2)])
    warehouse = live_warehouse(client)

    at_once(live_load(client, warehouse, stream, H1), live_load(client, warehouse, stream, H2))

    assert live_rows(warehouse, stream) == (3, 3, 2)


@LIVE
def test_live_four_tables_at_once_and_the_same_new_column_from_two_hours(customer: str) -> None:
    import boto3

    client = boto3.client("s3")
    streams = [Stream(customer, f"live_four_{n}") for n in range(4)]
    for stream in streams:
        live_put(client, stream, H1, [record("m1", H1), record("m2", H1)])
    warehouse = live_warehouse(client)
    at_once(*(live_load(client, warehouse, stream, H1) for stream in streams))
    assert [live_rows(warehouse, stream) for stream in streams] == [(2, 2, 1)] * 4

    # Two hours of one table that bring the same new property at once.
    stream = streams[0]
    live_put(client, stream, H2, [record("c1", H2, coupon="A1")])
    live_put(client, stream, H0, [record("c2", H0, coupon="B2")])
    at_once(live_load(client, warehouse, stream, H2), live_load(client, warehouse, stream, H0))
    assert live_rows(warehouse, stream) == (4, 4, 3)


def test_iam_credentials_are_fetched_once_and_renewed_before_they_expire(
    local_stack: dict[str, str],
) -> None:
    """The IAM path against the local AWS API server (moto serves Redshift's control plane)."""
    import boto3

    boto3.client("redshift").create_cluster(
        ClusterIdentifier="analytics",
        NodeType="ra3.xlplus",
        MasterUsername="admin",
        MasterUserPassword="Passw0rd!",
        DBName="dev",
    )
    config = RedshiftConfig.from_url(
        f"redshift://loader@host/dev?cluster_id=analytics&iam_role={ROLE}"
    )
    credentials = RedshiftWarehouse(config, s3_client(), "bucket").credentials
    calls: list[str] = []

    def count(**_: Any) -> None:
        calls.append("GetClusterCredentials")

    # Sixteen connections at once, from the threads of one batch: one call, one client.
    with ThreadPoolExecutor(16) as pool:
        issued = set(pool.map(lambda _: credentials.get(), range(16)))
    [(user, password)] = issued
    assert user == "IAM:loader" and len(password) >= 16
    credentials._client.meta.events.register("before-send.redshift.*", count)
    assert credentials.get() == (user, password)
    assert calls == []
    # With less than the renewal margin left (900 s here), a new pair is asked for.
    credentials.RENEW_BEFORE = timedelta(seconds=900)
    assert credentials.get() != (user, password)
    assert calls == ["GetClusterCredentials"]


def test_copy_takes_the_default_role_chained_roles_and_the_bucket_region(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    chained = f"{ROLE},arn:aws:iam::210987654321:role/bucket-reader"
    assert RedshiftConfig.from_url(URL.replace(ROLE, chained)).iam_role == chained
    with pytest.raises(ClickstreamError) as raised:
        RedshiftConfig.from_url(f"{URL}&bucket_region=west")
    assert str(raised.value) == (
        "invalid Redshift URL: bucket_region 'west' is not an AWS region (e.g. us-west-2)"
    )
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    url = URL.replace(f"iam_role={ROLE}", "iam_role=default") + "&bucket_region=eu-west-1"

    outcome = load(pipeline, redshift(pipeline, engine, url), stream, H1)

    assert outcome.rows_loaded == 1
    [copy] = [s for s, _ in engine.statements if s.startswith("COPY ")]
    assert " MANIFEST GZIP " in copy
    assert (
        copy.split(" FROM ")[1]
        .split(" MANIFEST ")[0]
        .endswith("IAM_ROLE default REGION 'eu-west-1'")
    )


def test_properties_beyond_the_varchar_limit_are_quarantined(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    big = record("big", H1, blob="x" * 70_000)
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1), big])

    outcome = load(pipeline, redshift(pipeline, engine), stream, H1)

    assert (outcome.rows_loaded, outcome.quarantined) == (1, 1)
    [key] = outcome.quarantine_keys
    body = s3_client().get_object(Bucket=pipeline["CLICKSTREAM_BUCKET"], Key=key)["Body"].read()
    entry = orjson.loads(body)
    assert (entry["line"], entry["error"]) == (
        2,
        "properties larger than 65535 bytes, the most Redshift can stage as VARCHAR before "
        "JSON_PARSE",
    )
    assert orjson.loads(entry["raw"])["messageId"] == "big"


OLD_LEDGER_DDL = (
    'CREATE TABLE "clickstream"."load_ledger" (stream VARCHAR(128) NOT NULL, hour TIMESTAMPTZ '
    "NOT NULL, load_id VARCHAR(64) NOT NULL, fingerprint VARCHAR(64) NOT NULL, files "
    "VARCHAR(65535) NOT NULL, records_read BIGINT NOT NULL, rows_loaded BIGINT NOT NULL, "
    "duplicates BIGINT NOT NULL, quarantined BIGINT NOT NULL, new_columns VARCHAR(65535) NOT "
    "NULL, run_id VARCHAR(64), loaded_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
    "PRIMARY KEY (stream, hour))"
)


def test_a_ledger_from_before_load_seconds_gets_the_new_columns(
    pipeline: dict[str, str], local_stack: dict[str, str], stream: Stream
) -> None:
    old = new_database(local_stack["CLICKSTREAM_WAREHOUSE_URL"], "redshift_old_ledger")
    install_shims(old)
    with psycopg2.connect(old) as setup, setup.cursor() as cur:
        cur.execute('CREATE SCHEMA "clickstream"')
        cur.execute(OLD_LEDGER_DDL)
        cur.execute(
            'INSERT INTO "clickstream"."load_ledger" VALUES '
            "(%s, %s, 'l1', 'fp', '[]', 3, 3, 0, 0, '[]', NULL)",
            (str(stream), H2),
        )
    setup.close()
    engine = RedshiftOnPostgres(old)
    pipeline["CLICKSTREAM_WAREHOUSE_URL"] = old
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])

    load(pipeline, redshift(pipeline, engine), stream, H1)

    sent = [statement for statement, _ in engine.statements]
    ledger = '"clickstream"."load_ledger"'
    assert sent[8:17] == [
        *(f"LOCK {ledger}", f"ALTER TABLE {ledger} ADD COLUMN seconds DOUBLE PRECISION", "COMMIT"),
        *(f"LOCK {ledger}", f"ALTER TABLE {ledger} ADD COLUMN files_read BIGINT", "COMMIT"),
        *(f"LOCK {ledger}", f"ALTER TABLE {ledger} ADD COLUMN bytes_read BIGINT", "COMMIT"),
    ]
    rows = query(
        old,
        'SELECT hour, seconds IS NOT NULL, files_read, bytes_read > 0 FROM "clickstream".'
        '"load_ledger" WHERE stream = %s ORDER BY hour',
        (str(stream),),
    )
    assert rows == [(H1, True, 1, True), (H2, False, None, None)]


# --- concurrent loads, as Redshift isolates them -----------------------------------------------
# Each case runs the loads of one batch (threads sharing one warehouse object) or of two runs
# (a warehouse object each, as a sensor run and a backfill have) at once, made to overlap at
# the same statement every time, under both of Redshift's isolation levels.

ISOLATIONS = pytest.mark.parametrize("isolation", [SNAPSHOT, SERIALIZABLE])


def at_once(*actions: Callable[[], T]) -> list[T]:
    """Run the actions in threads at once; each one's value, or its error raised here."""
    with ThreadPoolExecutor(len(actions)) as pool:
        futures = [pool.submit(action) for action in actions]
        return [future.result(timeout=120) for future in futures]


def retried(
    pipeline: dict[str, str], warehouse: RedshiftWarehouse, stream: Stream, hour: datetime
) -> Callable[[], LoadOutcome]:
    """A load as a batch runs it: retried on transient errors."""
    return lambda: with_retries(
        lambda: load(pipeline, warehouse, stream, hour), base_delay=0.01, max_delay=0.1
    )


def rows_and_ids(url: str, stream: Stream) -> tuple[int, int]:
    [(rows, ids)] = query(
        url,
        f'SELECT COUNT(*), COUNT(DISTINCT message_id) FROM "{stream.customer}"."{stream.event}"',
    )
    return rows, ids


def ledger_rows(url: str, stream: Stream) -> list[tuple[datetime, int]]:
    return query(
        url,
        'SELECT hour, COUNT(*) FROM "clickstream"."load_ledger" WHERE stream = %s '
        "GROUP BY hour ORDER BY hour",
        (str(stream),),
    )


def existing(pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream) -> None:
    """The stream's table and the ledger as a running deployment has them: an hour loaded."""
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H0, "a", [record("h0", H0)])
    load(pipeline, redshift(pipeline, engine), stream, H0)


@ISOLATIONS
def test_two_runs_loading_one_partition_at_once_load_it_once(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream, isolation: str
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    existing(pipeline, engine, stream)
    put_file(
        pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record(f"m{i}", H1) for i in range(20)]
    )
    engine.isolation = isolation
    engine.overlap(2)  # both at their first LOCK

    outcomes = at_once(
        retried(pipeline, redshift(pipeline, engine), stream, H1),
        retried(pipeline, redshift(pipeline, engine), stream, H1),
    )

    assert rows_and_ids(url, stream) == (21, 21)
    assert ledger_rows(url, stream) == [(H0, 1), (H1, 1)]
    # Each run either loaded the hour (the later one replacing it with the same rows) or found
    # it in the ledger.
    assert [o.rows_loaded for o in outcomes if not o.skipped] in ([20], [20, 20])


@ISOLATIONS
def test_two_hours_sharing_a_message_id_loaded_at_once_keep_it_once(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream, isolation: str
) -> None:
    url, bucket = pipeline["CLICKSTREAM_WAREHOUSE_URL"], pipeline["CLICKSTREAM_BUCKET"]
    existing(pipeline, engine, stream)
    put_file(bucket, stream, H1, "a", [record("shared", H1), record("h1", H1)])
    put_file(bucket, stream, H2, "a", [record("shared", H2), record("h2", H2)])
    engine.isolation = isolation
    engine.overlap(2)
    warehouse = redshift(pipeline, engine)  # one batch: one warehouse object, two threads

    first, second = at_once(
        retried(pipeline, warehouse, stream, H1), retried(pipeline, warehouse, stream, H2)
    )

    assert rows_and_ids(url, stream) == (4, 4)
    assert sorted(message_ids(url, stream)) == ["h0", "h1", "h2", "shared"]
    assert (first.rows_loaded + second.rows_loaded, first.duplicates + second.duplicates) == (3, 1)
    assert ledger_rows(url, stream) == [(H0, 1), (H1, 1), (H2, 1)]


@ISOLATIONS
def test_four_streams_loaded_at_once_never_conflict(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, customer: str, isolation: str
) -> None:
    url, bucket = pipeline["CLICKSTREAM_WAREHOUSE_URL"], pipeline["CLICKSTREAM_BUCKET"]
    streams = [Stream(customer, f"event_{n}") for n in range(4)]
    for stream in streams:
        put_file(bucket, stream, H1, "a", [record(f"{stream.event}-{i}", H1) for i in range(5)])
    engine.isolation = isolation
    engine.overlap(4)
    warehouse = redshift(pipeline, engine)

    outcomes = at_once(*(retried(pipeline, warehouse, stream, H1) for stream in streams))

    assert [o.rows_loaded for o in outcomes] == [5, 5, 5, 5]
    assert [rows_and_ids(url, stream) for stream in streams] == [(5, 5)] * 4
    assert [ledger_rows(url, stream) for stream in streams] == [[(H1, 1)]] * 4
    assert engine.aborts == []  # not even one conflict to retry


def two_loaders(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, runs: str
) -> tuple[RedshiftWarehouse, RedshiftWarehouse]:
    """The warehouse objects of two loads: one shared (threads of one batch) or one each (two
    runs, as a sensor run and a backfill in their own processes)."""
    if runs == "one batch":
        shared = redshift(pipeline, engine)
        return shared, shared
    return redshift(pipeline, engine), redshift(pipeline, engine)


@ISOLATIONS
@pytest.mark.parametrize("runs", ["one batch", "two runs"])
def test_two_hours_bringing_the_same_new_property_at_once_both_load(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream, isolation: str, runs: str
) -> None:
    url, bucket = pipeline["CLICKSTREAM_WAREHOUSE_URL"], pipeline["CLICKSTREAM_BUCKET"]
    put_file(bucket, stream, H1, "a", [record("old", H1)])
    load(pipeline, redshift(pipeline, engine), stream, H1)  # the table, without the property
    put_file(bucket, stream, H2, "a", [record("a", H2, coupon="A1")])
    put_file(bucket, stream, recent_hour(1), "a", [record("b", recent_hour(1), coupon="B2")])
    engine.isolation = isolation
    # Both hours add the column at once (a loader that adds one stream's columns one load at
    # a time lets the second go on after the barrier's timeout).
    engine.overlap(2, before="ALTER TABLE", timeout=3)
    first, second = two_loaders(pipeline, engine, runs)

    at_once(retried(pipeline, first, stream, H2), retried(pipeline, second, stream, recent_hour(1)))

    table = f'"{stream.customer}"."{stream.event}"'
    assert query(url, f"SELECT message_id, coupon FROM {table} ORDER BY message_id") == [
        ("a", "A1"),
        ("b", "B2"),
        ("old", None),
    ]
    assert len(ledger_rows(url, stream)) == 3


@ISOLATIONS
@pytest.mark.parametrize("runs", ["one batch", "two runs"])
def test_the_first_loads_of_a_new_table_at_once_both_load(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream, isolation: str, runs: str
) -> None:
    url, bucket = pipeline["CLICKSTREAM_WAREHOUSE_URL"], pipeline["CLICKSTREAM_BUCKET"]
    existing(pipeline, engine, Stream(f"{stream.customer}_w", stream.event))  # the ledger
    put_file(bucket, stream, H1, "a", [record("a", H1, coupon="A1")])
    put_file(bucket, stream, H2, "a", [record("b", H2, coupon="B2")])
    engine.isolation = isolation
    engine.overlap(2, before=f'CREATE SCHEMA IF NOT EXISTS "{stream.customer}"', timeout=3)
    first, second = two_loaders(pipeline, engine, runs)

    at_once(retried(pipeline, first, stream, H1), retried(pipeline, second, stream, H2))

    table = f'"{stream.customer}"."{stream.event}"'
    assert query(url, f"SELECT message_id, coupon FROM {table} ORDER BY message_id") == [
        ("a", "A1"),
        ("b", "B2"),
    ]
    assert ledger_rows(url, stream) == [(H1, 1), (H2, 1)]


def test_a_conflict_abort_is_retried_and_names_the_table(
    pipeline: dict[str, str],
    engine: RedshiftOnPostgres,
    stream: Stream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    engine.faults = Faults(conflicts_at_commit=1)

    outcome = retried(pipeline, redshift(pipeline, engine), stream, H1)()

    assert (outcome.rows_loaded, rows_and_ids(url, stream)) == (1, (1, 1))
    assert ledger_rows(url, stream) == [(H1, 1)]
    detail = f"Serializable isolation violation on table - {stream}, transactions forming the cycle"
    [warning] = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert f"Redshift aborted the load of {stream} {H1:%Y-%m-%d %H}:00 for a concurrent " in warning
    assert f"(ERROR 1023: {detail}" in warning

    # One that keeps conflicting fails, as a transient failure a step retry may pass.
    engine.faults = Faults(conflicts_at_commit=10)
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H2, "a", [record("m2", H2)])
    with pytest.raises(WriteConflict) as raised:
        retried(pipeline, redshift(pipeline, engine), stream, H2)()
    assert isinstance(raised.value, TRANSIENT_ERRORS)
    assert str(raised.value).startswith(
        f"Redshift aborted the load of {stream} {H2:%Y-%m-%d %H}:00"
    )
    assert len(engine.aborts) == 1 + 4  # every attempt
    assert message_ids(url, stream) == {"m1": H1}


def test_a_crash_between_the_data_commit_and_the_ledger_commit_only_reloads_the_same_rows(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    put_file(
        pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record(f"m{i}", H1) for i in range(30)]
    )
    engine.faults = Faults(disconnect_after_data_commit=1)

    outcome = retried(pipeline, redshift(pipeline, engine), stream, H1)()

    assert engine.faults.disconnect_after_data_commit == 0  # the crash happened
    assert (outcome.skipped, outcome.rows_loaded, outcome.rows_replaced) == (False, 30, 30)
    assert rows_and_ids(url, stream) == (30, 30)
    assert ledger_rows(url, stream) == [(H1, 1)]


def test_a_duplicate_is_dropped_within_the_lookback_and_loaded_again_beyond_it(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    """The dedup probe reads the table's rows received since the hour less the look-back
    (default 7 days; ``dedup_lookback_days=0``: all history)."""
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    within, beyond = H1 + timedelta(days=6, hours=23), H1 + timedelta(days=8)
    put_file(bucket, stream, H1, "a", [record("first", H1)])
    put_file(bucket, stream, within, "a", [record("first", within), record("w", within)])
    put_file(bucket, stream, beyond, "a", [record("first", beyond), record("b", beyond)])
    default = redshift(pipeline, engine)
    assert default.config.dedup_lookback_days == 7

    assert load(pipeline, default, stream, H1).rows_loaded == 1
    inside = load(pipeline, default, stream, within)
    outside = load(pipeline, default, stream, beyond)

    assert (inside.rows_loaded, inside.duplicates) == (1, 1)
    assert (outside.rows_loaded, outside.duplicates) == (2, 0)  # its first copy is 8 days old
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    table = f'"{stream.customer}"."{stream.event}"'
    count = f"SELECT count(*) FROM {table} WHERE message_id = 'first'"
    assert query(url, count) == [(2,)]

    # All history: the replaced hour's copy is found again, 8 days back.
    everything = redshift(pipeline, engine, f"{URL}&dedup_lookback_days=0")
    engine.statements.clear()
    put_file(
        bucket,
        stream,
        beyond,
        "a",
        [record("first", beyond), record("b", beyond), record("c", beyond)],
    )
    again = load(pipeline, everything, stream, beyond)
    assert (again.rows_loaded, again.duplicates) == (2, 1)
    assert query(url, count) == [(1,)]
    [insert] = [s for s, _ in engine.statements if s.startswith("INSERT INTO " + table)]
    assert insert.endswith("WHERE t.message_id = s.message_id)")


def test_the_lookback_must_be_a_whole_number_of_days() -> None:
    with pytest.raises(ClickstreamError) as raised:
        RedshiftConfig.from_url(f"{URL}&dedup_lookback_days=-1")
    assert str(raised.value) == (
        "invalid Redshift URL: dedup_lookback_days must be >= 0 (0: all history)"
    )
    with pytest.raises(ClickstreamError) as raised:
        RedshiftConfig.from_url(f"{URL}&dedup_lookback_days=week")
    assert "dedup_lookback_days must be whole numbers" in str(raised.value)


# --- odd records: byte limits and text that is not UTF-8 -------------------------------------

Dialect = tuple[str, str, Warehouse]


@pytest.fixture(params=["postgresql", "redshift"])
def dialect(
    request: pytest.FixtureRequest,
    pipeline: dict[str, str],
    local_stack: dict[str, str],
    engine: RedshiftOnPostgres,
) -> Dialect:
    """(name, URL, warehouse) of each dialect over the test's bucket: the session's PostgreSQL,
    or Redshift through the emulation."""
    if request.param == "redshift":
        return "redshift", pipeline["CLICKSTREAM_WAREHOUSE_URL"], redshift(pipeline, engine)
    url = local_stack["CLICKSTREAM_WAREHOUSE_URL"]
    return "postgresql", url, warehouse_for_url(url)


def test_a_long_user_id_and_a_lone_surrogate_never_fail_their_hour(
    pipeline: dict[str, str], dialect: Dialect, engine: RedshiftOnPostgres, stream: Stream
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    long_id = "é" * 150  # 150 characters, 300 bytes of UTF-8
    # A browser's JSON.stringify of a string cut inside an emoji: legal JSON, not UTF-8.
    cut = orjson.dumps(record("cut", H1, title="ab")).replace(b'"ab"', b'"ab\\ud83d"')
    lines: list[dict[str, Any] | bytes] = [record(f"m{i}", H1) for i in range(34)]
    lines += [{**record("long", H1), "userId": long_id}, cut]
    put_file(bucket, stream, H1, "a", lines)
    name, url, warehouse = dialect

    outcome = load_partition(RawStore(s3_client(), bucket, "raw"), warehouse, stream, H1)

    table = f'"{stream.customer}"."{stream.event}"'
    [(title,)] = query(url, f"SELECT properties->>'title' FROM {table} WHERE message_id = 'cut'")
    assert title == "ab\ufffd"
    if name == "postgresql":  # text: any length
        assert (outcome.rows_loaded, outcome.quarantined) == (36, 0)
        assert query(url, f"SELECT user_id FROM {table} WHERE message_id = 'long'") == [(long_id,)]
        return
    assert (outcome.rows_loaded, outcome.quarantined) == (35, 1)
    [key] = outcome.quarantine_keys
    entry = orjson.loads(s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    assert (entry["line"], entry["error"]) == (
        35,
        "userId is 300 bytes of UTF-8, more than the 256 of Redshift's user_id VARCHAR(256)",
    )
    assert "long" not in message_ids(url, stream)


def test_both_dialects_flatten_the_same_numbers(
    pipeline: dict[str, str], dialect: Dialect, stream: Stream
) -> None:
    # A DOUBLE PRECISION column holds magnitudes 0 and 1e-300 to 2**53 (every integer there
    # exactly); a BIGINT one 64-bit integers. The rest stays in properties only.
    numbers = [1.5, 0, -7, 2**53, -(2.0**53), 2**53 + 1, 1e300, 1e-300, 2.5e-320, 2**63 - 1]
    integers = [1, 2**63 - 1, -(2**63), "2", 2**63, 3, 4, 5, 6, 7]
    lines = [
        record(f"m{i}", H1, number=number, integer=integer)
        for i, (number, integer) in enumerate(zip(numbers, integers, strict=True))
    ]
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", lines)
    _, url, warehouse = dialect

    outcome = load_partition(
        RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw"), warehouse, stream, H1
    )

    assert outcome.rows_loaded == 10
    table = f'"{stream.customer}"."{stream.event}"'
    rows = query(url, f"SELECT number, integer FROM {table} ORDER BY substr(message_id, 2)::int")
    assert [number for number, _ in rows] == [
        *(1.5, 0.0, -7.0, 2.0**53, -(2.0**53), None, None, 1e-300, None, None)
    ]
    assert [integer for _, integer in rows] == [1, 2**63 - 1, -(2**63), None, None, 3, 4, 5, 6, 7]


# --- Serverless ---------------------------------------------------------------------------------

SERVERLESS_URL = (
    "redshift://loader@default.123456789012.us-east-1.redshift-serverless.amazonaws.com:5439/dev"
    f"?workgroup=default&iam_role={ROLE}"
)


def test_serverless_loads_without_provisioned_only_system_tables(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    engine.serverless = True  # any STL/STV/SVL/SVCS table is an error, as on Serverless
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1), record("m2", H1)])
    warehouse = redshift(pipeline, engine, SERVERLESS_URL)

    outcome = load(pipeline, warehouse, stream, H1)

    assert warehouse.config.serverless
    assert outcome.rows_loaded == 2
    assert not [s for s, _ in engine.statements if re.search(r"\b(stl|stv|svl|svcs)_", s)]
    # A host alone says Serverless too.
    host_only = SERVERLESS_URL.replace("loader@", "loader:s3cret@").replace(
        "workgroup=default&", ""
    )
    assert RedshiftConfig.from_url(host_only).serverless
    assert not RedshiftConfig.from_url(URL).serverless


def test_a_failed_copy_on_serverless_reports_its_sessions_load_errors(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    engine.serverless = True
    engine.faults = Faults(copy_error="Invalid digit, Value 'x', Pos 0, Type: Long")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])

    with pytest.raises(ClickstreamError) as raised:
        load(pipeline, redshift(pipeline, engine, SERVERLESS_URL), stream, H1)

    assert str(raised.value).endswith(
        "(s3://bucket/staged/part-0000.json.gz line 3 column quantity: Invalid digit, Value 'x', "
        "Pos 0, Type: Long)"
    )
    assert (
        "SELECT file_name, line_number, column_name, error_message FROM sys_load_error_detail "
        "WHERE session_id = pg_backend_pid() ORDER BY start_time DESC, line_number LIMIT 5"
    ) in [s for s, _ in engine.statements]


def test_an_hour_of_5000_files_loads_and_the_ledger_keeps_every_file(
    pipeline: dict[str, str], dialect: Dialect, engine: RedshiftOnPostgres, stream: Stream
) -> None:
    """What 8 busy shards write in an hour (here at the warehouse seam: the loader's reads of
    5,000 files are the same reads as of one)."""
    files = tuple(
        SourceFile(raw_key("raw", stream, H1, f"shard-{n:05d}.jsonl.gz"), f"{n:032x}", 100 + n)
        for n in range(5000)
    )
    stats = ReadStats(records_read=2)
    records = [
        (files[n].key, validate_line(orjson.dumps(record(f"m{n}", H1)), 1, stats)) for n in (0, 1)
    ]
    load = PartitionLoad(stream, H1, files, fingerprint(files))
    name, url, warehouse = dialect

    result = warehouse.load_partition(load, iter(records), stats)  # type: ignore[arg-type]

    assert result.rows_loaded == 2
    assert warehouse.ledger([stream])[(str(stream), H1)].fingerprint == load.fingerprint
    if name == "redshift":
        listed = query(
            url,
            'SELECT key, etag, size FROM "clickstream"."load_ledger_files" WHERE stream = %s '
            "AND hour = %s ORDER BY key",
            (str(stream), H1),
        )
        inserts = [s for s, _ in engine.statements if 'INTO "clickstream"."load_ledger_files"' in s]
        assert len(inserts) == 5  # 1,000 rows a statement
    else:
        [(listed_json,)] = query(
            url,
            'SELECT files FROM "clickstream"."load_ledger" WHERE stream = %s AND hour = %s',
            (str(stream), H1),
        )
        listed = [(f["key"], f["etag"], f["size"]) for f in listed_json]
    assert listed == [(f.key, f.etag, f.size) for f in files]

    # Loaded again with the same files: found in the ledger, nothing written.
    assert warehouse.load_partition(load, iter(records), ReadStats()).skipped  # type: ignore[arg-type]


def test_properties_named_like_system_columns_stay_in_properties(
    pipeline: dict[str, str], dialect: Dialect, stream: Stream
) -> None:
    _, url, warehouse = dialect
    props = {"xmin": 1, "ctid": "x", "oid": 5, "tableoid": 6, "Cmax": 2, "plan": "pro"}
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1, **props)])

    outcome = load_partition(
        RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw"), warehouse, stream, H1
    )

    assert (outcome.rows_loaded, outcome.new_columns) == (1, ["plan"])
    table = f'"{stream.customer}"."{stream.event}"'
    [(plan, kept)] = query(url, f"SELECT plan, properties::text FROM {table}")
    assert plan == "pro" and orjson.loads(kept) == props


def test_a_load_stuck_behind_a_lock_times_out_and_is_retried_later(
    pipeline: dict[str, str], engine: RedshiftOnPostgres, stream: Stream
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    existing(pipeline, engine, stream)
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    warehouse = redshift(pipeline, engine, f"{URL}&statement_timeout=1")
    assert warehouse.config.statement_timeout == 1
    # A long query holding the table (Redshift has no lock_timeout: the statement timeout ends
    # the wait).
    blocker = psycopg2.connect(url)
    try:
        with blocker.cursor() as cur:
            cur.execute(f'LOCK TABLE "{stream.customer}"."{stream.event}" IN ACCESS EXCLUSIVE MODE')
        with pytest.raises(psycopg2.errors.QueryCanceled) as raised:
            load(pipeline, warehouse, stream, H1)
    finally:
        blocker.rollback()
        blocker.close()
    assert isinstance(raised.value, TRANSIENT_ERRORS)
    assert "statement timeout" in str(raised.value)
    assert "m1" not in message_ids(url, stream)

    assert load(pipeline, warehouse, stream, H1).rows_loaded == 1  # the lock gone


@pytest.mark.parametrize("value", ["0", "soon"])
def test_a_bad_statement_timeout_is_one_line(value: str) -> None:
    with pytest.raises(ClickstreamError) as raised:
        RedshiftConfig.from_url(f"{URL}&statement_timeout={value}")
    assert "\n" not in str(raised.value) and "statement_timeout" in str(raised.value)
