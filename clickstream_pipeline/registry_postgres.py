"""The registry in PostgreSQL: an append-only history of changes, the registry derived from it.

``CLICKSTREAM_REGISTRY=postgresql://...`` selects it. Every change is a row of
``clickstream.registry_changes`` (when, who, from where, add or remove, which stream); nothing is
updated or deleted. The current registry is every stream whose latest change is an add,
customers and events in name order (``Registry.sorted``: the same on every replica and in every
export, whatever the history). Edits run in one transaction under an
advisory lock: two writers at once both land, one after the other, and neither is lost.

A backend keeps a few pooled connections and the registry it last derived, tagged with the newest
change's id: a read that finds no newer change is one indexed query. Every insert happens under
the lock, held to commit, so ids are committed in order and the newest id names the registry.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extras
import sqlalchemy
import sqlalchemy.exc

from clickstream_pipeline.errors import ClickstreamError, first_line
from clickstream_pipeline.names import validate_name
from clickstream_pipeline.registry import (
    Change,
    EditableRegistry,
    Registry,
    RegistryEdit,
    default_actor,
)

SCHEMA = "clickstream"

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.registry_changes (
    id          bigserial   PRIMARY KEY,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    origin      text        NOT NULL,
    action      text        NOT NULL CHECK (action IN ('add', 'remove')),
    customer    text        NOT NULL,
    event       text        NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_changes_stream
    ON {SCHEMA}.registry_changes (customer, event, id);
"""

# The registry as of now: each stream's latest change, kept when it is an add; in name order.
_CURRENT = f"""
SELECT customer, event FROM (
    SELECT DISTINCT ON (customer, event) customer, event, action
    FROM {SCHEMA}.registry_changes ORDER BY customer, event, id DESC
) latest WHERE action = 'add' ORDER BY customer, event
"""

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('clickstream.registry', 0))"
_VERSION = f"SELECT coalesce(max(id), 0) FROM {SCHEMA}.registry_changes"
_CHANGES_SINCE = (
    f"SELECT action, customer, event FROM {SCHEMA}.registry_changes "
    "WHERE id > %s AND id <= %s ORDER BY id"
)
# Connections per backend: the registry API's worker threads (registry_service.WORKERS) each
# get one without waiting.
POOL_SIZE = 16


class PostgresRegistry(EditableRegistry):
    """A registry kept as a history of changes in a PostgreSQL database."""

    def __init__(self, url: str, actor: str | None = None, origin: str | None = None) -> None:
        self.url = url
        self.actor = actor
        self.origin = origin
        self._engine: sqlalchemy.Engine | None = None
        self._engine_lock = threading.Lock()
        self._snapshot: tuple[int, Registry] | None = None  # (newest change id, registry)

    @property
    def location(self) -> str:
        # The URL without its credentials: locations are printed and logged.
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def _pool(self) -> sqlalchemy.Engine:
        with self._engine_lock:
            if self._engine is None:
                # SQLAlchemy's pool only: connections checked before use (a restarted server
                # costs one retry, not an error), opened as needed up to POOL_SIZE and then kept
                # (closing and reopening them under load costs more than the queries).
                self._engine = sqlalchemy.create_engine(
                    "postgresql+psycopg2://",
                    creator=lambda: psycopg2.connect(
                        self.url, application_name="clickstream-registry", connect_timeout=10
                    ),
                    pool_size=POOL_SIZE,
                    max_overflow=0,
                    pool_timeout=30,
                    pool_pre_ping=True,
                )
            return self._engine

    def close(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        try:
            conn = self._pool().raw_connection()
        except (psycopg2.Error, sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError) as error:
            cause = getattr(error, "orig", None) or error
            raise ClickstreamError(
                f"cannot connect to the registry at {self.location}: {first_line(cause)}"
            ) from None
        transaction = conn.driver_connection  # the psycopg2 connection the pool holds
        assert transaction is not None
        try:
            with transaction, transaction.cursor() as cur:
                yield cur
        except psycopg2.Error as error:
            raise ClickstreamError(f"registry at {self.location}: {first_line(error)}") from None
        finally:
            conn.close()  # back to the pool

    @staticmethod
    def _exists(cur: Any) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.registry_changes",))
        return bool(cur.fetchone()[0])

    def _current(self, cur: Any) -> Registry:
        """The registry now: the one held if no change was made since, else the one held with
        the changes since applied (the whole history is read only the first time)."""
        cur.execute(_VERSION)
        version = cur.fetchone()[0]
        snapshot = self._snapshot
        if snapshot is not None and snapshot[0] == version:
            return snapshot[1]
        if snapshot is not None and snapshot[0] < version:
            # Every id up to `version` is committed: inserts commit in id order (the lock).
            cur.execute(_CHANGES_SINCE, (snapshot[0], version))
            pairs = set(snapshot[1].pairs)
            for action, customer, event in cur.fetchall():
                pair = (validate_name(customer, "customer"), validate_name(event, "event"))
                if action == "add":
                    pairs.add(pair)
                else:
                    pairs.discard(pair)
            registry = Registry.from_pairs(pairs)
        else:
            cur.execute(_CURRENT)
            customers: dict[str, list[str]] = {}
            for customer, event in cur.fetchall():
                customers.setdefault(customer, []).append(event)
            registry = Registry.from_mapping(customers)
        self._snapshot = (version, registry)
        return registry

    def load(self) -> Registry:
        """The current registry (empty before the first change; reading creates nothing)."""
        with self._transaction() as cur:
            if self._snapshot is None and not self._exists(cur):
                return Registry()
            return self._current(cur)

    def save(self, registry: Registry) -> None:
        with self.edit() as edit:
            edit.registry = registry

    @contextlib.contextmanager
    def edit(self, actor: str | None = None, origin: str | None = None) -> Iterator[RegistryEdit]:
        """Read, change and record under the registry's lock, in one transaction: the
        difference becomes history rows (removals, then additions in the registry's order),
        made by ``actor`` from ``origin`` (default: this backend's, else the user and host).
        Afterwards ``registry`` is the registry as recorded (in name order)."""
        written: tuple[int, Registry] | None = None
        with self._transaction() as cur:
            if not self._exists(cur):
                cur.execute(_LOCK)
                cur.execute(_DDL)
            cur.execute(_LOCK)
            current = self._current(cur)
            change = RegistryEdit(current)
            yield change
            before, after = current.pairs, change.registry.pairs
            rows = [("remove", *pair) for pair in sorted(before - after)] + [
                ("add", customer, event)
                for customer, events in change.registry.customers
                for event in events
                if (customer, event) not in before
            ]
            if rows:
                who = actor or self.actor or default_actor()
                where = origin or self.origin or socket.gethostname()
                ids = psycopg2.extras.execute_values(
                    cur,
                    f"INSERT INTO {SCHEMA}.registry_changes "
                    "(actor, origin, action, customer, event) VALUES %s RETURNING id",
                    [(who, where, *row) for row in rows],
                    fetch=True,
                )
                # Inserted under the lock, held to commit: the newest id names this registry.
                written = (max(i for (i,) in ids), change.registry.sorted())
        if written is not None:  # committed
            self._snapshot = written
        change.registry = written[1] if written else current

    def history(self, limit: int | None = None) -> list[Change]:
        """Changes, newest first (at most ``limit``)."""
        with self._transaction() as cur:
            if not self._exists(cur):
                return []
            cur.execute(
                "SELECT id, changed_at, actor, origin, action, customer, event "
                f"FROM {SCHEMA}.registry_changes ORDER BY id DESC LIMIT %s",
                (limit,),
            )
            return [Change(*row) for row in cur.fetchall()]
