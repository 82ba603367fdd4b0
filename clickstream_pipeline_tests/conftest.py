"""Fixtures: one real embedded PostgreSQL and one real local S3 server for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import pytest
import yaml

from clickstream_pipeline.local import LocalStack
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline_tests.helpers import new_database


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The embedded stack, started once; its env vars are set for the whole session."""
    root = tmp_path_factory.mktemp("stack")
    with LocalStack(root, bucket="clickstream-test") as env, pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        yield env


@pytest.fixture
def registry_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh registry file location for one test (the file does not exist yet)."""
    path = tmp_path / "registry.yaml"
    monkeypatch.setenv("CLICKSTREAM_REGISTRY", str(path))
    return path


@pytest.fixture
def bucket(local_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket in the local S3 server, set as CLICKSTREAM_BUCKET."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    monkeypatch.setenv("CLICKSTREAM_BUCKET", name)
    return name


@pytest.fixture
def pg_conn(local_stack: dict[str, str]) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(local_stack["CLICKSTREAM_WAREHOUSE_URL"])
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


def list_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix``, through the paginated ListObjectsV2 API."""
    paginator = s3_client().get_paginator("list_objects_v2")
    return [
        obj["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]


@pytest.fixture
def customer() -> str:
    """A customer name no other test uses, so its tables and ledger rows are its own."""
    return f"c{uuid.uuid4().hex[:12]}"


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance of its own for one test (runs, materializations, partitions)."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as test_instance:
        yield test_instance


@pytest.fixture
def pipeline(local_stack: dict[str, str], bucket: str, registry_path: Path) -> dict[str, str]:
    """The whole pipeline's environment: a fresh bucket and registry over the session's servers."""
    return {**local_stack, "CLICKSTREAM_BUCKET": bucket, "CLICKSTREAM_REGISTRY": str(registry_path)}


@pytest.fixture
def registry_url(local_stack: dict[str, str]) -> Iterator[str]:
    """A database of its own: the registry's tables start absent."""
    name = f"reg_{uuid.uuid4().hex[:10]}"
    yield new_database(local_stack["CLICKSTREAM_WAREHOUSE_URL"], name)
    conn = psycopg2.connect(local_stack["CLICKSTREAM_WAREHOUSE_URL"])
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    conn.close()


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    """The Helm chart's values (deploy/helm/values.yaml)."""
    values_yaml = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "values.yaml"
    return dict(yaml.safe_load(values_yaml.read_text()))


@pytest.fixture(scope="module")
def code_server(values: dict[str, Any]) -> dict[str, Any]:
    """The values of the code location's one user deployment."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return dict(deployment)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, longest first (the rest in their order): spread over the parallel
    workers from the start, rather than one left running alone at the end."""

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.kwargs["seconds"]) if mark is not None else 0.0

    items.sort(key=seconds, reverse=True)
    # A slow test's own bound: twice its usual time, and never below the default (300 s).
    for item in items:
        if seconds(item) * 2 > 300 and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds(item) * 2))
