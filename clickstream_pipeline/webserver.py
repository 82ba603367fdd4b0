"""The Dagster webserver's GraphQL API: queueing runs and backfills, reloading the code location."""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import dagster as dg

from clickstream_pipeline.errors import ClickstreamError, first_line

if TYPE_CHECKING:
    from dagster_graphql import DagsterGraphQLClient

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:3000"
DEFAULT_LOCATION = "clickstream_pipeline"


def graphql_client(url: str) -> DagsterGraphQLClient:
    """A GraphQL client of the webserver at ``url``; an unreachable one is a one-line error."""
    from dagster_graphql import DagsterGraphQLClient

    base = url if "://" in url else f"http://{url}"
    parts = urlsplit(base)
    if not parts.hostname:
        raise ClickstreamError(f"not a Dagster webserver URL: {url!r}")
    try:
        with urllib.request.urlopen(f"{base.rstrip('/')}/server_info", timeout=10):
            pass
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise ClickstreamError(
            f"cannot reach the Dagster webserver at {url}: {first_line(reason)}"
        ) from None
    return DagsterGraphQLClient(
        parts.hostname,
        port_number=parts.port,
        use_https=parts.scheme == "https",
        path_prefix=parts.path.rstrip("/"),
    )


class DagsterWebserverResource(dg.ConfigurableResource):
    """The webserver that serves this code location (default: CLICKSTREAM_DAGSTER_URL, else
    http://localhost:3000), through which a registry change reloads the location."""

    url: str | None = None
    location: str | None = None  # default: the name the location was loaded under

    def base_url(self) -> str:
        return self.url or os.environ.get("CLICKSTREAM_DAGSTER_URL") or DEFAULT_URL

    def request_reload(self, location: str) -> None:
        """Ask the webserver to reload ``location`` and return at once.

        The webserver starts a new code server and then stops this one, so the request must not
        hold up the sensor tick that makes it: it finishes in a thread. An unreachable webserver
        is a ClickstreamError now."""
        client = graphql_client(self.base_url())
        name = self.location or location

        def reload() -> None:
            try:
                client.reload_repository_location(name)
            except Exception as error:  # this process may be the one being replaced
                log.warning("reload of code location %s: %s", name, first_line(error))

        threading.Thread(target=reload, name="reload-code-location", daemon=True).start()


# What the UI's "Materialize" dialog sends for a range of hours of the selected assets.
LAUNCH_BACKFILL = """mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on RunConflict { message }
  }
}"""


def launch_backfill(
    url: str,
    tables: list[dg.AssetKey],
    hours: list[str],
    title: str,
    tags: dict[str, str],
) -> str:
    """Launch a Dagster asset backfill of ``tables`` over ``hours`` (hourly partition keys) on
    the webserver at ``url``, as its "Materialize" dialog does; return the backfill's id."""
    import requests
    from dagster_graphql import DagsterGraphQLClientError

    client = graphql_client(url)
    params = {
        "assetSelection": [{"path": list(key.path)} for key in tables],
        "partitionNames": hours,
        "title": title,
        "tags": [{"key": key, "value": value} for key, value in tags.items()],
    }
    refused = "the webserver did not take the backfill"
    try:
        # The client has no method for backfills; its GraphQL transport is what it uses itself.
        data = client._execute(LAUNCH_BACKFILL, {"params": params})
    except (DagsterGraphQLClientError, requests.RequestException) as error:
        raise ClickstreamError(f"{refused}: {first_line(error)}") from None
    launched = data["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        reason = launched.get("message") or launched["__typename"]
        raise ClickstreamError(f"{refused}: {first_line(reason)}")
    return str(launched["backfillId"])
