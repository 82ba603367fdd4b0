"""The registry API as a registry backend: ``CLICKSTREAM_REGISTRY=https://...``.

Reads are conditional (``If-None-Match``): the server answers 304 while the registry is the one
this backend already holds, so a sensor asking every tick moves a few hundred bytes. An add or a
remove is one idempotent request per stream; a whole-registry edit (``registry import``) is one
conditional ``PUT /customers``, refused with 412 if anyone changed the registry after it was read.
The bearer token comes from ``CLICKSTREAM_REGISTRY_TOKEN`` (or ``CLICKSTREAM_REGISTRY_TOKEN_FILE``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from clickstream_pipeline.errors import ClickstreamError, ServiceUnavailable, first_line
from clickstream_pipeline.names import Stream, validate_name
from clickstream_pipeline.registry import (
    Change,
    EditableRegistry,
    Registry,
    RegistryEdit,
    default_actor,
)

# Headers naming who changes the registry and from where, recorded in its history.
ACTOR_HEADER = "X-Clickstream-Actor"
ORIGIN_HEADER = "X-Clickstream-Origin"
TIMEOUT = (3.05, 15)  # seconds: connect, read


def registry_from_json(document: Any, source: str) -> Registry:
    """A registry from the API's ``{"customers": {"acme": {"events": [...]}}}``."""
    customers = document.get("customers") if isinstance(document, dict) else None
    if not isinstance(customers, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("events"), list)
        for entry in customers.values()
    ):
        raise ClickstreamError(f"{source} did not answer with a registry document")
    return Registry.from_mapping({c: entry["events"] for c, entry in customers.items()})


def registry_to_json(registry: Registry) -> dict[str, Any]:
    return {"customers": {c: {"events": list(events)} for c, events in registry.customers}}


class HttpRegistry(EditableRegistry):
    """The registry behind the registry API (``clickstream registry serve``)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._session = requests.Session()
        # Connection failures are retried for every method (the request was never sent);
        # a 502/503/504 and a dropped response only for reads.
        retry = Retry(
            total=2,
            connect=2,
            read=1,
            status=2,
            backoff_factor=0.2,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        self._session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
        self._session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
        self._session.headers["User-Agent"] = "clickstream-registry-client"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        self._cached: tuple[str, Registry] | None = None  # (ETag, registry)
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.url

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        ok: tuple[int, ...] = (200,),
    ) -> requests.Response:
        """One request; an answer outside ``ok`` is a one-line ClickstreamError."""
        try:
            response = self._session.request(
                method,
                f"{self.url}{path}",
                headers={
                    **(headers or {}),
                    **({"Content-Type": "application/json"} if body else {}),
                },
                data=orjson.dumps(body) if body is not None else None,
                timeout=TIMEOUT,
            )
        except requests.RequestException as error:
            raise ServiceUnavailable(
                f"cannot reach the registry at {self.url}: {_reason(error)}"
            ) from None
        if response.status_code in ok:
            return response
        try:
            detail = str(response.json()["error"])
        except (ValueError, KeyError, TypeError):
            detail = first_line(Exception(response.text)) if response.text else response.reason
        message = f"registry at {self.url}: {detail}"
        if response.status_code >= 500:
            raise ServiceUnavailable(message)
        raise ClickstreamError(message)

    def _get(self) -> tuple[str, Registry]:
        """The registry and its ETag; 304 while it is the one held already."""
        with self._lock:
            cached = self._cached
        headers = {"If-None-Match": cached[0]} if cached else {}
        response = self._request("GET", "/customers", headers=headers, ok=(200, 304))
        if response.status_code == 304 and cached is not None:
            return cached
        try:
            document = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ClickstreamError(f"registry at {self.url} did not answer with JSON") from None
        fetched = (response.headers.get("ETag", ""), registry_from_json(document, self.url))
        with self._lock:
            self._cached = fetched
        return fetched

    def load(self) -> Registry:
        return self._get()[1]

    def _writer_headers(self, actor: str | None, origin: str | None) -> dict[str, str]:
        return {
            ACTOR_HEADER: actor or default_actor(),
            ORIGIN_HEADER: origin or socket.gethostname(),
        }

    def save(self, registry: Registry) -> None:
        with self.edit() as edit:
            edit.registry = registry

    @contextlib.contextmanager
    def edit(self, actor: str | None = None, origin: str | None = None) -> Iterator[RegistryEdit]:
        """Read, change, then write the whole registry if nobody else changed it meanwhile."""
        etag, current = self._get()
        change = RegistryEdit(current)
        yield change
        if change.registry == current:
            return
        headers = {"If-Match": etag, **self._writer_headers(actor, origin)}
        response = self._request(
            "PUT",
            "/customers",
            headers=headers,
            body=registry_to_json(change.registry),
            ok=(200, 412),
        )
        if response.status_code == 412:
            raise ClickstreamError(
                f"the registry at {self.url} changed while this edit was being made; nothing "
                "was written: run it again"
            )

    def add(
        self, customer: str, events: Iterable[str], actor: str | None = None
    ) -> tuple[str, ...]:
        """One idempotent PUT per event; the events that were new."""
        streams = [Stream(customer, event) for event in dict.fromkeys(events)]  # names checked
        headers = self._writer_headers(actor, None)
        added = []
        for stream in streams:
            response = self._request("PUT", _stream_path(stream), headers=headers, ok=(200, 201))
            if response.status_code == 201:
                added.append(stream.event)
        return tuple(added)

    def remove(self, customer: str, events: Iterable[str] = (), actor: str | None = None) -> None:
        """A DELETE per event, or one for the whole customer when none are given."""
        headers = self._writer_headers(actor, None)
        paths = [_stream_path(Stream(customer, e)) for e in events] or [
            f"/customers/{validate_name(customer, 'customer')}"
        ]
        for path in paths:
            self._request("DELETE", path, headers=headers)

    def history(self, limit: int | None = None) -> list[Change]:
        """The registry's changes, newest first, as the server's backend records them."""
        query = f"?limit={limit}" if limit else ""
        document = self._request("GET", f"/history{query}").json()
        return [
            Change(
                id=c["id"],
                changed_at=datetime.fromisoformat(c["changed_at"]),
                actor=c["actor"],
                origin=c["origin"],
                action=c["action"],
                customer=c["customer"],
                event=c["event"],
            )
            for c in document["changes"]
        ]


def _stream_path(stream: Stream) -> str:
    return f"/customers/{stream.customer}/events/{stream.event}"


def _reason(error: requests.RequestException) -> str:
    """Why a request got no answer, in a few words ("Connection refused", "timed out")."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    inner = error.args[0] if error.args else error
    text = first_line(getattr(inner, "reason", inner))
    return text.rpartition("] ")[2] if "] " in text else text
