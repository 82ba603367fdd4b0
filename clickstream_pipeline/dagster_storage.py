"""Dagster's PostgreSQL storage, holding its connections open in every process.

``dagster_postgres`` opens a new connection for every query outside the webserver: each costs
PostgreSQL a backend process, several milliseconds. The backfill daemon asks the event log once
per target table on every iteration, so a backfill over 2,000 tables spent most of each
iteration connecting (11.1 s an iteration; 2.9 s with this class, docs/design.md). This class
keeps each storage's connection open the way Dagster's own webserver does
(``optimize_for_webserver``), without the webserver's statement timeout. As there, the
connections last as long as the instance object: Dagster disposes no storage engine when an
instance closes, so a long-lived process keeps one instance (the daemon, the webserver and the
metrics collector do) rather than opening one per task.

Select it in ``dagster.yaml`` (deploy/dagster.yaml does)::

    storage:
      custom:
        module: clickstream_pipeline.dagster_storage
        class: PooledPostgresStorage
        config:
          postgres_url: {env: DAGSTER_POSTGRES_URL}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dagster._serdes import ConfigurableClassData
    from dagster_postgres.auth import PgTokenProvider

# Connections older than this are replaced when next taken from the pool, so a server-side idle
# timeout or a failover never leaves a process holding a dead connection for long.
POOL_RECYCLE_SECONDS = 3600
# No statement timeout: a daemon's or a run worker's queries are as Dagster leaves them.
NO_STATEMENT_TIMEOUT = 0
# One connection per storage stays open; threads that need more at once (the daemon's sensor
# and run-queue workers) open extra ones and close them when done, as without a pool.
UNLIMITED_OVERFLOW = -1


class PooledPostgresStorage(DagsterPostgresStorage):
    """``DagsterPostgresStorage`` whose run, event-log and schedule storages each keep one
    connection open (a SQLAlchemy ``QueuePool``)."""

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: PgTokenProvider | None = None,
    ) -> None:
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        for storage in (self.run_storage, self.event_log_storage, self.schedule_storage):
            storage.optimize_for_webserver(
                statement_timeout=NO_STATEMENT_TIMEOUT,
                pool_recycle=POOL_RECYCLE_SECONDS,
                max_overflow=UNLIMITED_OVERFLOW,
            )

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PooledPostgresStorage:
        return cls(
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            inst_data=inst_data,
            token_provider=get_token_provider_from_config(config_value),
        )
