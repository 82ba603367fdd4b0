"""The registry: which customers and events exist, the single source of truth for partitions.

The default backend is a YAML file::

    customers:
      acme:
        events: [add_to_cart, page_view]

Other backends plug in behind ``RegistryBackend``: PostgreSQL (``registry_postgres``, an
append-only history) and the registry API over HTTP (``registry_http``, served by
``registry_service``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import orjson
import yaml

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.names import Stream, validate_name

DEFAULT_REGISTRY = "registry.yaml"


class RegistryNotFound(ClickstreamError):
    """The registry does not exist yet (no stream has been registered)."""


@dataclass(frozen=True)
class Registry:
    """An immutable snapshot of the registry: customers in order, each with its events."""

    customers: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_mapping(cls, customers: Mapping[str, Iterable[str]]) -> Registry:
        """Build a registry from ``{customer: [event, ...]}``, validating every name."""
        entries = []
        for customer, events in customers.items():
            validate_name(customer, "customer")
            unique = tuple(dict.fromkeys(validate_name(e, "event") for e in events))
            entries.append((customer, unique))
        return cls(tuple(entries))

    def as_mapping(self) -> dict[str, list[str]]:
        return {customer: list(events) for customer, events in self.customers}

    @functools.cached_property
    def streams(self) -> tuple[Stream, ...]:
        """Every registered stream, sorted by key (computed once: a registry never changes)."""
        return tuple(Stream(customer, event) for customer, event in sorted(self.pairs))

    @functools.cached_property
    def pairs(self) -> frozenset[tuple[str, str]]:
        """Every registered (customer, event)."""
        return frozenset(
            (customer, event) for customer, events in self.customers for event in events
        )

    def __contains__(self, stream: object) -> bool:
        return isinstance(stream, Stream) and (stream.customer, stream.event) in self.pairs

    def with_added(self, customer: str, events: Iterable[str]) -> Registry:
        """A copy with ``events`` added to ``customer`` (created if new); others untouched.
        Only the new names are validated: the others were when this registry was built."""
        validate_name(customer, "customer")
        new = tuple(dict.fromkeys(validate_name(e, "event") for e in events))
        entries, found = [], False
        for name, existing in self.customers:
            if name == customer:
                found = True
                existing = existing + tuple(e for e in new if e not in existing)
            entries.append((name, existing))
        if not found:
            entries.append((customer, new))
        return Registry(tuple(entries))

    def sorted(self) -> Registry:
        """The same streams with customers and events in name order, no customer left empty:
        the one form every backend that derives its registry (PostgreSQL) answers with."""
        return Registry.from_pairs(self.pairs)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Registry:
        """The registry of these (customer, event)s, already validated, in name order."""
        mapping: dict[str, list[str]] = {}
        for customer, event in sorted(pairs):
            mapping.setdefault(customer, []).append(event)
        return Registry(tuple((c, tuple(events)) for c, events in mapping.items()))

    def with_streams(self, streams: Iterable[Stream]) -> Registry:
        """A copy with every stream in ``streams`` registered."""
        mapping = self.as_mapping()
        for stream in streams:
            mapping.setdefault(stream.customer, []).append(stream.event)
        return Registry.from_mapping(mapping)

    def with_removed(self, customer: str, events: Iterable[str] = ()) -> Registry:
        """A copy without ``events`` of ``customer``, or without the customer if none are given."""
        mapping = self.as_mapping()
        if customer not in mapping:
            raise ClickstreamError(f"customer {customer!r} is not in the registry")
        drop = list(events)
        missing = [e for e in drop if e not in mapping[customer]]
        if missing:
            raise ClickstreamError(
                f"event {missing[0]!r} is not registered for customer {customer!r}"
            )
        if drop:
            mapping[customer] = [e for e in mapping[customer] if e not in drop]
        else:
            del mapping[customer]
        return Registry.from_mapping(mapping)


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


def registry_etag(registry: Registry) -> str:
    """The registry's entity tag: the same registry always has the same tag, on any backend."""
    digest = hashlib.sha256(orjson.dumps(registry.customers)).hexdigest()
    return f'"{digest[:32]}"'


class RegistryBackend(Protocol):
    """Where a registry is stored.

    ``actor`` and ``origin`` name who makes a change and from where, for backends that keep a
    history (default: the current user and host); others ignore them."""

    @property
    def location(self) -> str: ...

    def load(self) -> Registry: ...

    def save(self, registry: Registry) -> None: ...

    def edit(
        self, actor: str | None = None, origin: str | None = None
    ) -> contextlib.AbstractContextManager[RegistryEdit]: ...

    def add(
        self, customer: str, events: Iterable[str], actor: str | None = None
    ) -> tuple[str, ...]: ...

    def remove(
        self, customer: str, events: Iterable[str] = (), actor: str | None = None
    ) -> None: ...


@dataclass
class RegistryEdit:
    """A registry being edited under the backend's lock; assign ``registry`` to change it."""

    registry: Registry


class EditableRegistry:
    """``add`` and ``remove`` as one ``edit`` each; a backend with finer writes overrides them."""

    def edit(
        self, actor: str | None = None, origin: str | None = None
    ) -> contextlib.AbstractContextManager[RegistryEdit]:
        raise NotImplementedError

    def add(
        self, customer: str, events: Iterable[str], actor: str | None = None
    ) -> tuple[str, ...]:
        """Register ``events`` for ``customer`` (created if new); the events that were new."""
        events = tuple(events)
        with self.edit(actor=actor) as edit:
            before = set(edit.registry.streams)
            edit.registry = edit.registry.with_added(customer, events)
        return tuple(e for e in dict.fromkeys(events) if Stream(customer, e) not in before)

    def remove(self, customer: str, events: Iterable[str] = (), actor: str | None = None) -> None:
        """Unregister ``events`` of ``customer``, or the whole customer if none are given."""
        with self.edit(actor=actor) as edit:
            edit.registry = edit.registry.with_removed(customer, events)


def parse_registry(text: str, source: str) -> Registry:
    """Parse registry YAML; every problem is a one-line ClickstreamError naming ``source``."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ClickstreamError(f"registry {source} is not valid YAML{where}: {problem}") from None
    if document is None:
        return Registry()
    if not isinstance(document, dict) or set(document) - {"customers"}:
        raise ClickstreamError(f"registry {source} must be a mapping with one key, 'customers'")
    customers = document.get("customers") or {}
    if not isinstance(customers, dict):
        raise ClickstreamError(
            f"registry {source}: 'customers' must be a mapping of customer names"
        )
    mapping: dict[str, list[str]] = {}
    for customer, entry in customers.items():
        validate_name(customer, "customer")
        events = entry.get("events") if isinstance(entry, dict) else None
        well_formed = entry is None or (
            isinstance(entry, dict) and set(entry) <= {"events"} and isinstance(events, list | None)
        )
        if not well_formed:
            raise ClickstreamError(
                f"registry {source}: customer {customer!r} must be a mapping with an 'events' list"
            )
        mapping[customer] = [validate_name(event, "event") for event in events or []]
    return Registry.from_mapping(mapping)


def dump_registry(registry: Registry) -> str:
    """Serialize a registry as YAML, one customer per block, events in flow style."""
    lines = ["customers:"] if registry.customers else ["customers: {}"]
    for customer, events in registry.customers:
        lines.append(f"  {customer}:")
        lines.append(f"    events: [{', '.join(events)}]")
    return "\n".join(lines) + "\n"


class YamlFileRegistry(EditableRegistry):
    """A registry stored in a YAML file; edits are locked and written atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def location(self) -> str:
        return str(self.path)

    def load(self) -> Registry:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RegistryNotFound(
                f"registry file {self.path} not found: create it with "
                "'clickstream registry add <customer> <event>' or set CLICKSTREAM_REGISTRY"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ClickstreamError(f"cannot read registry file {self.path}: {error}") from None
        return parse_registry(text, str(self.path))

    def save(self, registry: Registry) -> None:
        """Replace the file atomically: readers see the old or the new registry, never a mix."""
        directory = self.path.parent if str(self.path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(dump_registry(registry))
                handle.flush()
                os.fsync(handle.fileno())
            if self.path.exists():
                os.chmod(tmp, self.path.stat().st_mode & 0o777)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def edit(self, actor: str | None = None, origin: str | None = None) -> Iterator[RegistryEdit]:
        """Read-modify-write under an exclusive lock so concurrent edits never lose an entry.
        (A file keeps no history: ``actor`` and ``origin`` are not recorded.)"""
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            lock_file = open(lock_path, "a")
        except OSError as error:
            raise ClickstreamError(f"cannot lock registry file {self.path}: {error}") from None
        with lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            current = self.load() if self.path.exists() else Registry()
            change = RegistryEdit(current)
            yield change
            if change.registry != current:
                self.save(change.registry)


def registry_backend(location: str | None = None) -> RegistryBackend:
    """The backend for a registry location (``CLICKSTREAM_REGISTRY``): a YAML file path, a
    ``postgresql://`` URL (an append-only history in the ``clickstream`` schema), or the
    ``http(s)://`` URL of the registry API (with the token in ``CLICKSTREAM_REGISTRY_TOKEN``).

    Backends are kept per location and token for the process's life: a sensor asking every
    tick reuses the connections and the snapshot it already has."""
    from clickstream_pipeline.config import secret_from_env

    location = location or os.environ.get("CLICKSTREAM_REGISTRY") or DEFAULT_REGISTRY
    scheme = location.partition("://")[0] if "://" in location else ""
    token = secret_from_env("CLICKSTREAM_REGISTRY_TOKEN") if scheme in ("http", "https") else None
    return _backend(location, token)


@functools.lru_cache(maxsize=32)
def _backend(location: str, token: str | None) -> RegistryBackend:
    scheme, sep, _ = location.partition("://")
    if scheme in ("postgresql", "postgres") and sep:
        from clickstream_pipeline.registry_postgres import PostgresRegistry

        return PostgresRegistry(location)
    if scheme in ("http", "https") and sep:
        from clickstream_pipeline.registry_http import HttpRegistry

        return HttpRegistry(location, token)
    if sep and scheme != "file":
        raise ClickstreamError(
            f"unsupported registry location {location!r}: use a YAML file path, a "
            "postgresql:// URL or the registry API's http(s):// URL"
        )
    return YamlFileRegistry(location.removeprefix("file://"))


def load_registry(location: str | None = None, missing_ok: bool = False) -> Registry:
    """The registry at ``location`` (``CLICKSTREAM_REGISTRY``); with ``missing_ok``, one that
    does not exist yet is empty."""
    try:
        return registry_backend(location).load()
    except RegistryNotFound:
        if missing_ok:
            return Registry()
        raise
