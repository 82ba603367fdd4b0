from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.code_pointer import CodePointer
from dagster._core.definitions.definitions_load_context import (
    DefinitionsLoadContext,
    DefinitionsLoadType,
)
from dagster._core.definitions.reconstruct import (
    initialize_repository_def_from_pointer,
    reconstruct_repository_def_from_pointer,
)

from clickstream_pipeline import registry_snapshot
from clickstream_pipeline.assets import TABLES_ASSET
from clickstream_pipeline.batch import QUARANTINE_CHECK
from clickstream_pipeline.definitions import defs
from clickstream_pipeline.metrics import SENSORS
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import hourly_partitions
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.registry_postgres import PostgresRegistry
from clickstream_pipeline_tests.helpers import defs_for

ROOT = Path(__file__).resolve().parents[1]
POINTER = CodePointer.from_module("clickstream_pipeline.definitions", "defs", None)


def asset_keys(repository: dg.RepositoryDefinition) -> list[str]:
    return sorted(key.to_user_string() for key in repository.asset_graph.get_all_asset_keys())


def test_definitions_load_from_the_registry(registry_path: Path) -> None:
    YamlFileRegistry(registry_path).save(
        Registry.from_mapping({"acme": ["page_view", "add_to_cart"], "globex": ["video_play"]})
    )

    loaded = defs()

    dg.Definitions.validate_loadable(loaded)
    repository = loaded.get_repository_def()
    assert asset_keys(repository) == [
        "acme/add_to_cart",
        "acme/page_view",
        "globex/video_play",
        "raw/acme/add_to_cart",
        "raw/acme/page_view",
        "raw/globex/video_play",
    ]
    graph = repository.asset_graph
    table, raw = dg.AssetKey(["acme", "page_view"]), dg.AssetKey(["raw", "acme", "page_view"])
    assert graph.get(table).group_name == graph.get(raw).group_name == "acme"
    assert graph.get(table).parent_keys == {raw}
    assert graph.get(table).is_executable and not graph.get(raw).is_executable
    # One partitions definition for every asset: a backfill over any of them has one root.
    assert {graph.get(key).partitions_def for key in graph.get_all_asset_keys()} == {
        hourly_partitions
    }
    spec = loaded.get_assets_def(table).specs_by_key[table]
    assert spec.metadata["dagster/table_name"] == "acme.page_view"
    assert spec.kinds == {"postgres"} and spec.freshness_policy is not None
    assert {check.name for check in graph.asset_check_keys if check.asset_key == table} == {
        QUARANTINE_CHECK
    }
    assert {sensor.name for sensor in loaded.sensors or ()} == set(SENSORS)


def test_a_missing_registry_is_an_empty_location(registry_path: Path) -> None:
    assert asset_keys(defs().get_repository_def()) == []


def test_an_invalid_registry_fails_the_load_in_one_line(registry_path: Path) -> None:
    registry_path.write_text("customers:\n  Acme:\n    events: [x]\n")

    with pytest.raises(Exception, match="invalid customer 'Acme'"):
        defs()


def test_a_run_worker_rebuilds_the_launching_servers_tables_not_the_registrys(
    registry_path: Path,
) -> None:
    registry = YamlFileRegistry(registry_path)
    registry.save(Registry.from_mapping({"acme": ["page_view", "signup"]}))
    # Loading sets a process-wide load context: keep it to this test.
    with DefinitionsLoadContext.scoped(DefinitionsLoadContext(DefinitionsLoadType.INITIALIZATION)):
        served = initialize_repository_def_from_pointer(POINTER)
        # A table removed (and the registry unreadable) while the run is queued or running.
        registry.save(Registry.from_mapping({"acme": ["page_view"]}))
        registry_path.write_text("{not yaml")

        worker = reconstruct_repository_def_from_pointer(POINTER, served.repository_load_data)

    assert asset_keys(worker) == asset_keys(served)
    assert "acme/signup" in asset_keys(worker)


def test_loading_outside_a_code_server_reads_the_registry_each_time(registry_path: Path) -> None:
    registry = YamlFileRegistry(registry_path)
    registry.save(Registry.from_mapping({"acme": ["page_view"]}))
    assert asset_keys(defs().get_repository_def()) == ["acme/page_view", "raw/acme/page_view"]
    registry.save(Registry.from_mapping({"acme": ["signup"]}))
    assert asset_keys(defs().get_repository_def()) == ["acme/signup", "raw/acme/signup"]


def test_dagster_validates_the_workspace() -> None:
    result = subprocess.run(
        [
            Path(sys.executable).parent / "dagster",
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_every_warehouse_writer_is_in_the_warehouse_pool() -> None:
    # The production instance limits this pool (deploy/dagster.yaml concurrency.pools).
    loaded = defs_for(Stream("acme", "page_view"))
    job = loaded.get_job_def("load_partitions_job")
    assert [node.definition.pools for node in job.graph.node_dict.values()] == [{"warehouse"}]
    tables = loaded.get_assets_def(dg.AssetKey(["acme", "page_view"]))
    assert (tables.op.name, tables.op.pool) == (TABLES_ASSET, "warehouse")


def test_a_registry_service_that_is_down_serves_the_last_good_snapshot(
    registry_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dagster.yaml").touch()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # an instance of its own (SQLite)
    monkeypatch.setenv("CLICKSTREAM_REGISTRY", registry_url)
    PostgresRegistry(registry_url).save(Registry.from_mapping({"acme": ["page_view", "signup"]}))
    assert "acme/signup" in loaded_keys()  # read, and kept as the last good registry

    down = "postgresql://nobody@127.0.0.1:1/registry"
    assert registry_snapshot.last_good() is not None
    monkeypatch.setenv("CLICKSTREAM_REGISTRY", down)
    assert loaded_keys() >= {"acme/page_view", "acme/signup"}
    snapshot = registry_snapshot.last_good()
    assert snapshot is not None
    assert snapshot.location == "postgresql://" + registry_url.partition("@")[2]  # no password

    # Without a snapshot (another instance), the load fails in one line.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dagster.yaml").touch()
    with pytest.raises(
        Exception, match=r"cannot connect to the registry at postgresql://127\.0\.0\.1:1/"
    ):
        defs()


def loaded_keys() -> set[str]:
    return {key.to_user_string() for key in defs().resolve_all_asset_keys()}
