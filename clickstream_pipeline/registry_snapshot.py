"""The last registry a code server read from a registry service, kept in the Dagster instance.

A code location is built from the registry as it loads. When the registry is a service (the API,
or PostgreSQL) that is down at that moment, the location is built from the last registry any code
server of this instance read instead, so it stays loaded and keeps loading the streams it knew;
``clickstream health`` says the registry is stale. The snapshot lives in the instance's key-value
store (PostgreSQL in production), so every pod and every restart sees it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from clickstream_pipeline.registry import Registry, dump_registry, parse_registry

KEY = "clickstream/registry-snapshot"


@dataclass(frozen=True)
class Snapshot:
    registry: Registry
    location: str
    read_at: datetime

    def describe(self) -> str:
        streams = len(self.registry.streams)
        return (
            f"the code location serves the registry as read at "
            f"{self.read_at:%Y-%m-%d %H:%M:%S} UTC ({streams} stream{'s' if streams != 1 else ''})"
        )


def is_service(location: str) -> bool:
    """A registry that can be down: the API or a database (a file cannot)."""
    return location.startswith(("http://", "https://", "postgresql://", "postgres://"))


def _instance_available() -> bool:
    return bool(os.environ.get("DAGSTER_HOME"))


def remember(registry: Registry, location: str) -> None:
    """Keep ``registry``, just read from ``location``, as the last good one."""
    if not _instance_available():
        return
    import dagster as dg

    value = {
        "registry": dump_registry(registry),
        "location": location,
        "read_at": datetime.now(UTC).isoformat(),
    }
    with dg.DagsterInstance.get() as instance:
        instance.run_storage.set_cursor_values({KEY: json.dumps(value)})


def last_good() -> Snapshot | None:
    """The last registry a code server of this instance read from a registry service."""
    if not _instance_available():
        return None
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        stored = instance.run_storage.get_cursor_values({KEY}).get(KEY)
    if not stored:
        return None
    value = json.loads(stored)
    return Snapshot(
        parse_registry(value["registry"], "the registry snapshot in the Dagster instance"),
        value["location"],
        datetime.fromisoformat(value["read_at"]),
    )
