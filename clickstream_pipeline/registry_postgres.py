"""The registry in PostgreSQL: an append-only history of changes, the registry derived from it.

``CLICKSTREAM_REGISTRY=postgresql://...`` selects it. Every change is a row of
``clickstream.registry_changes`` (when, who, from where, add or remove, which stream); nothing is
updated or deleted. The current registry is every stream whose latest change is an add,
customers and events in the order they were (last) added. Edits run in one transaction under an
advisory lock: two writers at once both land, one after the other, and neither is lost.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2

from clickstream_pipeline.errors import ClickstreamError, first_line
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, RegistryEdit

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

# The registry as of now: each stream's latest change, kept when it is an add.
_CURRENT = f"""
SELECT customer, event, id FROM (
    SELECT DISTINCT ON (customer, event) customer, event, action, id
    FROM {SCHEMA}.registry_changes ORDER BY customer, event, id DESC
) latest WHERE action = 'add' ORDER BY id
"""

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('clickstream.registry', 0))"


@dataclass(frozen=True)
class Change:
    """One row of the history."""

    id: int
    changed_at: datetime
    actor: str
    origin: str
    action: str
    customer: str
    event: str


def default_actor() -> str:
    """Who is changing the registry: CLICKSTREAM_REGISTRY_ACTOR, else the OS user."""
    explicit = os.environ.get("CLICKSTREAM_REGISTRY_ACTOR")
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


class PostgresRegistry:
    """A registry kept as a history of changes in a PostgreSQL database."""

    def __init__(self, url: str, actor: str | None = None, origin: str | None = None) -> None:
        self.url = url
        self.actor = actor or default_actor()
        self.origin = origin or socket.gethostname()

    @property
    def location(self) -> str:
        # The URL without its credentials: locations are printed and logged.
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        try:
            conn = psycopg2.connect(self.url, application_name="clickstream-registry")
        except psycopg2.OperationalError as error:
            raise ClickstreamError(
                f"cannot connect to the registry at {self.location}: {first_line(error)}"
            ) from None
        try:
            with conn, conn.cursor() as cur:
                yield cur
        except psycopg2.Error as error:
            raise ClickstreamError(f"registry at {self.location}: {first_line(error)}") from None
        finally:
            conn.close()

    @staticmethod
    def _exists(cur: Any) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.registry_changes",))
        return bool(cur.fetchone()[0])

    @staticmethod
    def _current(cur: Any) -> Registry:
        cur.execute(_CURRENT)
        customers: dict[str, list[str]] = {}
        for customer, event, _ in cur.fetchall():
            customers.setdefault(customer, []).append(event)
        return Registry.from_mapping(customers)

    def load(self) -> Registry:
        """The current registry (empty before the first change; reading creates nothing)."""
        with self._transaction() as cur:
            return self._current(cur) if self._exists(cur) else Registry()

    def save(self, registry: Registry) -> None:
        with self.edit() as edit:
            edit.registry = registry

    @contextlib.contextmanager
    def edit(self) -> Iterator[RegistryEdit]:
        """Read, change and record under the registry's lock, in one transaction: the
        difference becomes history rows (removals, then additions in the registry's order)."""
        with self._transaction() as cur:
            if not self._exists(cur):
                cur.execute(_LOCK)
                cur.execute(_DDL)
            cur.execute(_LOCK)
            current = self._current(cur)
            change = RegistryEdit(current)
            yield change
            before, after = set(current.streams), set(change.registry.streams)
            rows = [("remove", s.customer, s.event) for s in current.streams if s not in after] + [
                ("add", customer, event)
                for customer, events in change.registry.customers
                for event in events
                if Stream(customer, event) not in before
            ]
            if rows:
                cur.executemany(
                    f"INSERT INTO {SCHEMA}.registry_changes "
                    "(actor, origin, action, customer, event) VALUES (%s, %s, %s, %s, %s)",
                    [(self.actor, self.origin, *row) for row in rows],
                )

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
