"""The registry: which customers and events exist, the single source of truth for partitions.

The default backend is a YAML file::

    customers:
      acme:
        events: [add_to_cart, page_view]

Other backends (a PostgreSQL table, an HTTP service) plug in behind ``RegistryBackend``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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

    @property
    def streams(self) -> tuple[Stream, ...]:
        """Every registered stream, sorted by key."""
        return tuple(
            sorted(
                Stream(customer, event) for customer, events in self.customers for event in events
            )
        )

    def __contains__(self, stream: object) -> bool:
        return isinstance(stream, Stream) and stream.event in self.as_mapping().get(
            stream.customer, ()
        )

    def with_added(self, customer: str, events: Iterable[str]) -> Registry:
        """A copy with ``events`` added to ``customer`` (created if new); others untouched."""
        mapping = self.as_mapping()
        mapping.setdefault(validate_name(customer, "customer"), []).extend(events)
        return Registry.from_mapping(mapping)

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


class RegistryBackend(Protocol):
    """Where a registry is stored. ``save`` may raise ClickstreamError for read-only backends."""

    @property
    def location(self) -> str: ...

    def load(self) -> Registry: ...

    def save(self, registry: Registry) -> None: ...

    def edit(self) -> contextlib.AbstractContextManager[RegistryEdit]: ...


@dataclass
class RegistryEdit:
    """A registry being edited under the backend's lock; assign ``registry`` to change it."""

    registry: Registry


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


class YamlFileRegistry:
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
    def edit(self) -> Iterator[RegistryEdit]:
        """Read-modify-write under an exclusive lock so concurrent edits never lose an entry."""
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
    """The backend for a registry location (``CLICKSTREAM_REGISTRY``): a YAML file path, or a
    ``postgresql://`` URL (an append-only history in the ``clickstream`` schema)."""
    location = location or os.environ.get("CLICKSTREAM_REGISTRY") or DEFAULT_REGISTRY
    scheme, sep, _ = location.partition("://")
    if scheme in ("postgresql", "postgres") and sep:
        from clickstream_pipeline.registry_postgres import PostgresRegistry

        return PostgresRegistry(location)
    if sep and scheme != "file":
        raise ClickstreamError(
            f"unsupported registry location {location!r}: use a YAML file path or a "
            "postgresql:// URL"
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
