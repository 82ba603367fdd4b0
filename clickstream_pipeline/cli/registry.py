"""``clickstream registry``: list and edit the registry."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import click
from rich.table import Table

from clickstream_pipeline.cli.app import (
    cli,
    err,
    out,
)
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.registry import YamlFileRegistry, dump_registry, registry_backend


@cli.group()
def registry() -> None:
    """List and edit the registry of customers and events (CLICKSTREAM_REGISTRY)."""


@registry.command("list")
def registry_list() -> None:
    """Print every registered stream, one per line."""
    for stream in registry_backend().load().streams:
        out.print(stream.key)


@registry.command("add")
@click.argument("customer")
@click.argument("events", nargs=-1, required=True)
def registry_add(customer: str, events: tuple[str, ...]) -> None:
    """Register EVENTS for CUSTOMER (created if new); they load from the next sensor tick."""
    backend = registry_backend()
    added = backend.add(customer, events)
    if added:
        err.print(f"registered {', '.join(f'{customer}.{e}' for e in added)} in {backend.location}")
    already = [e for e in dict.fromkeys(events) if e not in added]
    if already:
        err.print(
            f"already registered in {backend.location}: "
            + ", ".join(f"{customer}.{e}" for e in already)
        )


@registry.command("remove")
@click.argument("customer")
@click.argument("events", nargs=-1)
def registry_remove(customer: str, events: tuple[str, ...]) -> None:
    """Stop loading EVENTS of CUSTOMER (all of its events if none are given).

    Raw files and warehouse tables are kept; adding the stream back resumes loading.
    """
    backend = registry_backend()
    backend.remove(customer, events)
    removed = ", ".join(f"{customer}.{e}" for e in events) if events else f"customer {customer}"
    err.print(f"removed {removed} from {backend.location}")


@registry.command("history")
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(min=1), help="Newest changes."
)
def registry_history(limit: int) -> None:
    """Print the registry's changes, newest first: when, who, from where, what."""
    backend = registry_backend()
    history = getattr(backend, "history", None)
    if history is None:
        raise ClickstreamError(
            f"the registry in {backend.location} keeps no history: "
            "a postgresql:// registry (CLICKSTREAM_REGISTRY), or the API over one, does"
        )
    table = Table(title=f"registry history ({backend.location})", title_justify="left")
    for column in ("#", "when (UTC)", "who", "from", "change"):
        table.add_column(column)
    for change in history(limit):
        table.add_row(
            str(change.id),
            f"{change.changed_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
            change.actor,
            change.origin,
            f"{change.action} {change.customer}.{change.event}",
        )
    out.print(table)


@registry.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--replace",
    is_flag=True,
    help="Also remove registered events the file does not list (default: only add).",
)
def registry_import(file: str, replace: bool) -> None:
    """Register every customer and event of a registry YAML FILE (a file registry, an export).

    Nothing is removed unless --replace; the change is one edit (one transaction in PostgreSQL).
    """
    if not Path(file).is_file():
        raise ClickstreamError(f"cannot import {file}: no such file")
    imported = YamlFileRegistry(file).load()
    backend = registry_backend()
    with backend.edit() as edit:
        before = edit.registry
        merged = imported if replace else before
        if not replace:
            for customer, events in imported.customers:  # in the file's order
                merged = merged.with_added(customer, events)
        edit.registry = merged
    added = len(set(merged.streams) - set(before.streams))
    removed = len(set(before.streams) - set(merged.streams))
    err.print(
        f"imported {file} into {backend.location}: {added} streams added, {removed} removed, "
        f"{len(merged.streams)} registered"
    )


@registry.command("export")
def registry_export() -> None:
    """Print the registry as YAML (the file registry's format), for review or another backend."""
    out.print(dump_registry(registry_backend().load()), end="", markup=False, soft_wrap=True)


@registry.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
def registry_serve(host: str, port: int) -> None:
    """Serve the registry API over CLICKSTREAM_REGISTRY_BACKEND (default: CLICKSTREAM_REGISTRY).

    Clients set CLICKSTREAM_REGISTRY=http(s)://<host>:<port> and CLICKSTREAM_REGISTRY_TOKEN.
    Tokens: CLICKSTREAM_REGISTRY_READ_TOKEN and CLICKSTREAM_REGISTRY_WRITE_TOKEN (or *_FILE,
    a mounted Secret); at least one is required. The OpenAPI document is at /openapi.json.
    """
    import os

    import uvicorn

    from clickstream_pipeline.registry_service import READ_TOKEN, WRITE_TOKEN, Tokens, create_app

    location = os.environ.get("CLICKSTREAM_REGISTRY_BACKEND") or os.environ.get(
        "CLICKSTREAM_REGISTRY", ""
    )
    if location.startswith(("http://", "https://")):
        raise ClickstreamError(
            f"the registry API cannot serve another registry API ({location}): set "
            "CLICKSTREAM_REGISTRY_BACKEND to a postgresql:// URL or a YAML file"
        )
    tokens = Tokens()
    if not tokens.configured():
        raise ClickstreamError(
            f"no tokens: set {WRITE_TOKEN} (and {READ_TOKEN} for read-only clients), or their "
            "_FILE forms naming a mounted Secret"
        )
    backend = registry_backend(location or None)
    err.print(
        f"serving the registry in {backend.location} on http://{host}:{port} "
        "(OpenAPI at /openapi.json)"
    )
    uvicorn.run(
        create_app(backend, tokens),
        host=host,
        port=port,
        log_level="info",
        access_log=True,
        timeout_graceful_shutdown=10,
    )
