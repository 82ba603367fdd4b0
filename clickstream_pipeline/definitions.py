"""The code location's single entry point: ``defs``, built from the registry.

The code server reads the registry once as it loads and keeps that snapshot in the location's
reconstruction metadata; a run worker rebuilds the same definitions from the snapshot of the code
server that launched its run, never from the registry, so a table removed while a run is in
flight does not fail it. A registry change reaches a running deployment through the
``registry_sync_sensor``, which reloads the location. A registry service (the API, PostgreSQL)
that is down as the location loads leaves it built from the last registry read from it
(``registry_snapshot``), so the location stays loaded.
"""

from __future__ import annotations

import logging
import warnings

import dagster as dg
from dagster._core.definitions.definitions_load_context import (
    DefinitionsLoadContext,
    StateBackedDefinitionsLoader,
)

from clickstream_pipeline import registry_snapshot
from clickstream_pipeline.alerts import (
    AlertResource,
    load_failure_alert_sensor,
    slow_load_alert_sensor,
    stream_freshness_alert_sensor,
)
from clickstream_pipeline.assets import table_assets
from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError, first_line
from clickstream_pipeline.jobs import load_partitions_job
from clickstream_pipeline.registry import (
    Registry,
    dump_registry,
    load_registry,
    parse_registry,
    registry_backend,
)
from clickstream_pipeline.resources import (
    DiscoveryResource,
    RegistryResource,
    S3StorageResource,
    WarehouseResource,
)
from clickstream_pipeline.sensors import build_registry_sync_sensor, build_s3_discovery_sensor
from clickstream_pipeline.webserver import DagsterWebserverResource

SNAPSHOT_KEY = "clickstream/registry"
# Dagster copies sensors as it builds a repository and flags the copies' `owners` parameter as
# beta although no sensor here sets it; every code server and run worker would log it.
warnings.filterwarnings("ignore", message="Parameter `owners`", category=dg.BetaWarning)


def build_defs(registry: Registry, location: str | None = None) -> dg.Definitions:
    """Every asset, job, sensor and resource for the tables of ``registry``."""
    settings = Settings.from_env()
    scheme = (settings.warehouse_url or "").partition("://")[0]
    streams = registry.streams
    return dg.Definitions(
        assets=table_assets(
            streams, settings.raw_prefix, "redshift" if scheme == "redshift" else "postgres"
        ),
        jobs=[load_partitions_job],
        sensors=[
            build_registry_sync_sensor(streams, location),
            build_s3_discovery_sensor(streams),
            load_failure_alert_sensor,
            slow_load_alert_sensor,
            stream_freshness_alert_sensor,
        ],
        resources={
            "s3": S3StorageResource(),
            "warehouse": WarehouseResource(),
            "registry": RegistryResource(),
            "discovery": DiscoveryResource(),
            "alerts": AlertResource(),
            "webserver": DagsterWebserverResource(),
        },
    )


class RegistryDefinitionsLoader(StateBackedDefinitionsLoader[str]):
    """Reads the registry when the code location loads; rebuilds from that snapshot in runs."""

    @property
    def defs_key(self) -> str:
        return SNAPSHOT_KEY

    def fetch_state(self) -> str:
        """The registry now; if a registry service is down, the last one read from it."""
        location = Settings.from_env().registry
        try:
            registry = load_registry(location, missing_ok=True)
        except ClickstreamError as error:
            snapshot = (
                registry_snapshot.last_good() if registry_snapshot.is_service(location) else None
            )
            if snapshot is None:
                raise
            logging.getLogger(__name__).warning(
                "registry unreachable (%s): %s", first_line(error), snapshot.describe()
            )
            return dump_registry(snapshot.registry)
        if registry_snapshot.is_service(location):
            # Where it was read from, without credentials: the snapshot is shown and logged.
            registry_snapshot.remember(registry, registry_backend(location).location)
        return dump_registry(registry)

    def defs_from_state(self, state: str) -> dg.Definitions:
        registry = parse_registry(state, "snapshot in the code location")
        return build_defs(registry, DefinitionsLoadContext.get().code_location_name)


@dg.definitions
def defs() -> dg.Definitions:
    """The definitions for the registry as it is now (or as the launching code server saw it)."""
    with warnings.catch_warnings():
        # Dagster flags its own preview and beta parameters used here (partitioned checks,
        # reconstruction metadata); the code server would log them at every load.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return RegistryDefinitionsLoader().build_defs()
