from __future__ import annotations

from pathlib import Path

import psutil
import psycopg2
import pytest

from clickstream_pipeline.local import LocalStack
from clickstream_pipeline.local.stack import wait_gone
from clickstream_pipeline.s3 import s3_client


def test_stack_serves_real_s3_over_http(local_stack: dict[str, str], bucket: str) -> None:
    assert local_stack["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    client = s3_client()
    client.put_object(Bucket=bucket, Key="raw/a.jsonl", Body=b'{"x": 1}\n')
    assert client.get_object(Bucket=bucket, Key="raw/a.jsonl")["Body"].read() == b'{"x": 1}\n'
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert {"clickstream-test", bucket} <= names


def test_stack_serves_real_postgresql(local_stack: dict[str, str]) -> None:
    assert local_stack["CLICKSTREAM_WAREHOUSE_URL"].startswith(
        "postgresql://postgres:@/clickstream?host="
    )
    with psycopg2.connect(local_stack["CLICKSTREAM_WAREHOUSE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        row = cur.fetchone()
        assert row is not None and int(row[0]) >= 160000
        cur.execute("CREATE TEMP TABLE t (message_id text PRIMARY KEY, properties jsonb)")
        cur.execute("INSERT INTO t VALUES ('m1', '{\"sku\": \"X1\"}')")
        cur.execute("SELECT properties->>'sku' FROM t")
        assert cur.fetchall() == [("X1",)]


def test_stack_env_points_everything_inside_its_root(local_stack: dict[str, str]) -> None:
    root = Path(local_stack["DAGSTER_HOME"]).parent
    assert local_stack["CLICKSTREAM_REGISTRY"] == str(root / "registry.yaml")
    assert Path(local_stack["DAGSTER_HOME"]).is_dir()
    assert (root / "pg" / "PG_VERSION").read_text().strip() == "16"


def test_stack_restarts_on_the_same_data(tmp_path: Path) -> None:
    with LocalStack(tmp_path, bucket="restart-test") as env:
        with psycopg2.connect(env["CLICKSTREAM_WAREHOUSE_URL"]) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
        conn.close()
    with LocalStack(tmp_path, bucket="restart-test") as env:
        with psycopg2.connect(env["CLICKSTREAM_WAREHOUSE_URL"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT n FROM kept")
            assert cur.fetchall() == [(42,)]
        conn.close()


def test_s3_requests_are_counted_by_operation(local_stack: dict[str, str], bucket: str) -> None:
    from clickstream_pipeline.metrics import s3_requests

    before = s3_requests()
    client = s3_client()
    client.put_object(Bucket=bucket, Key="raw/x.jsonl", Body=b"{}\n")
    client.list_objects_v2(Bucket=bucket, Prefix="raw/")
    client.list_objects_v2(Bucket=bucket, Prefix="raw/")
    after = s3_requests()
    assert after.get("PutObject", 0) - before.get("PutObject", 0) == 1
    assert after.get("ListObjectsV2", 0) - before.get("ListObjectsV2", 0) == 2


def test_stop_ends_postgresql_should_pgserver_keep_its_handles_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop reads pgserver's handle list through a guard: on a release without the class
    attributes it uses, the stack's PostgreSQL is still stopped, and nothing raises."""
    from pgserver.postgres_server import PostgresServer

    stack = LocalStack(tmp_path, bucket="guard-test")
    stack.start()
    postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
    monkeypatch.delattr(PostgresServer, "_instances")
    monkeypatch.delattr(PostgresServer, "_lock")
    stack.stop()
    assert wait_gone([postmaster], 5) == []
    assert not (tmp_path / "pg" / "postmaster.pid").exists()
