"""The registry API in a running deployment: a real code server, webserver and daemon reading
`CLICKSTREAM_REGISTRY=http://...` (the API over the PostgreSQL registry). A stream added through
the API becomes an asset and loads within 60 s; with the API stopped, the pipeline keeps loading
the streams it knows, a reload keeps the location up from its snapshot, and health says stale."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from clickstream_pipeline.local.dagster import DagsterServices
from clickstream_pipeline.names import Stream
from clickstream_pipeline.webserver import DEFAULT_LOCATION
from clickstream_pipeline_tests.helpers import (
    READ_TOKEN,
    WRITE_TOKEN,
    attempt,
    deployment,
    free_port,
    message_ids,
    put_file,
    recent_hour,
    record,
    registry_server,
    run_cli,
    wait_for,
)


@pytest.mark.slow(seconds=300)
def test_a_registry_service_change_reaches_the_deployment_and_an_outage_is_survived(
    pipeline: dict[str, str],
    registry_url: str,
    tmp_path: Path,
    customer: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    known, added = Stream(customer, "page_view"), Stream(customer, "checkout")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    write = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    monkeypatch.setenv("CLICKSTREAM_REGISTRY", api)
    monkeypatch.setenv("CLICKSTREAM_REGISTRY_TOKEN", READ_TOKEN)  # the pipeline only reads
    # Three waits for new files' rows: a tick every 5 s, not 30 (the registry's keeps its own
    # production cadence, which the 60 s promise below is about).
    monkeypatch.setenv("CLICKSTREAM_DISCOVERY_INTERVAL_SECONDS", "5")

    with contextlib.ExitStack() as running_api:
        running_api.enter_context(registry_server(registry_url, port=port))
        path = f"{api}/customers/{known.customer}/events/{known.event}"
        assert requests.put(path, headers=write, timeout=10).status_code == 201
        with deployment(tmp_path, monkeypatch) as services:
            assert f"{customer}/page_view" in services.asset_keys()
            wait_for(lambda: services.sensor_ticked("s3_discovery_sensor"), "discovery")

            # 1. An add through the API is an asset within 60 s, and its files load.
            path = f"{api}/customers/{added.customer}/events/{added.event}"
            started = time.monotonic()
            assert requests.put(path, headers=write, timeout=10).status_code == 201
            wait_for(lambda: f"{customer}/checkout" in services.asset_keys(), "the new asset", 60)
            assert time.monotonic() - started < 60
            hour = recent_hour(3)
            put_file(bucket, added, hour, "a", [record("c1", hour), record("c2", hour)])
            wait_for(lambda: attempt(lambda: message_ids(url, added)), "the new table's rows")
            assert sorted(message_ids(url, added)) == ["c1", "c2"]

            # 2. The API stops. Health says the registry is stale; known streams keep loading.
            running_api.close()
            health = run_cli("health", "--no-daemon", env={"CLICKSTREAM_KINESIS_STREAM": ""})
            assert health.returncode == 0  # a probe: the code server still does its job
            state, detail = table_row(health.stdout, "registry")
            assert state == "STALE", health.stdout
            assert detail.startswith(f"cannot reach the registry at {api}: Connection refused; ")
            assert "; the code location serves the registry as read at " in detail
            assert detail.endswith(" UTC (2 streams)"), detail
            assert (
                health.stderr.strip() == "stale: registry (the pipeline serves its last snapshot)"
            )
            put_file(bucket, known, hour, "b", [record("p1", hour)])
            wait_for(lambda: attempt(lambda: message_ids(url, known)), "the known table's rows")
            assert list(message_ids(url, known)) == ["p1"]

            # 3. A reload while it is down: the location comes back up from the snapshot.
            reload_location(services)
            assert {f"{customer}/checkout", f"{customer}/page_view"} <= services.asset_keys()
            put_file(bucket, added, hour, "b", [record("c3", hour)])
            wait_for(lambda: "c3" in message_ids(url, added), "a load after the reload")


def table_row(table: str, name: str) -> tuple[str, str]:
    """The state and the whole detail (a cell may wrap over lines) of component ``name``."""
    rows: dict[str, list[str]] = {}
    current = None
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) != 3:
            continue
        if cells[0]:
            current = cells[0]
            rows[current] = [cells[1], cells[2]]
        elif current:
            rows[current][1] += " " + cells[2]
    state, detail = rows[name]
    return state, detail


LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries {
  name updatedTimestamp loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def reload_location(services: DagsterServices) -> None:
    """Reload the code location through the webserver; return once it has loaded again."""

    def entry() -> dict[str, Any]:
        entries = services.graphql(LOCATION)["workspaceOrError"]["locationEntries"]
        return next(e for e in entries if e["name"] == DEFAULT_LOCATION)

    before = entry()["updatedTimestamp"]
    services.graphql(
        f'mutation {{ reloadRepositoryLocation(repositoryLocationName: "{DEFAULT_LOCATION}") '
        "{ __typename } }"
    )
    done = wait_for(
        lambda: (
            (e := attempt(entry))
            and e["updatedTimestamp"] > before
            and e["loadStatus"] == "LOADED"
            and e
        ),
        "the reload",
        120,
    )
    assert done["locationOrLoadError"]["__typename"] == "RepositoryLocation", done
