"""The registry API (`clickstream registry serve`, a real uvicorn server) over the PostgreSQL
registry on the embedded PostgreSQL: routes, tokens, ETags, hostile names, concurrent writers,
and the pipeline's own reads and the CLI through it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, load_registry, registry_backend, registry_etag
from clickstream_pipeline.registry_http import HttpRegistry
from clickstream_pipeline.registry_postgres import PostgresRegistry
from clickstream_pipeline_tests.helpers import (
    READ_TOKEN,
    WRITE_TOKEN,
    free_port,
    outside_env,
    registry_server,
    run_cli,
)


@pytest.fixture
def api(registry_url: str) -> Iterator[str]:
    with registry_server(registry_url) as url:
        yield url


def call(method: str, url: str, token: str | None = WRITE_TOKEN, **named: str) -> requests.Response:
    """A request with ``token``; keyword arguments are headers (``If_Match`` is If-Match)."""
    headers = {name.replace("_", "-"): value for name, value in named.items()}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, url, headers=headers, timeout=30)


def changes(registry_url: str) -> list[str]:
    return [f"{c.action} {c.customer}.{c.event}" for c in PostgresRegistry(registry_url).history()]


def test_tokens_none_wrong_read_and_write(api: str, registry_url: str) -> None:
    routes = [
        ("GET", "/customers"),
        ("GET", "/customers/acme"),
        ("GET", "/history"),
        ("PUT", "/customers/acme/events/page_view"),
        ("DELETE", "/customers/acme/events/page_view"),
        ("DELETE", "/customers/acme"),
    ]
    for method, path in routes:
        for token in (None, "not-a-token"):
            response = call(method, api + path, token)
            assert response.status_code == 401, (method, path, token)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert set(response.json()) == {"error"}
        read = call(method, api + path, READ_TOKEN)
        if method == "GET":
            assert read.status_code in (200, 404), (path, read.text)  # acme does not exist yet
        else:
            assert (read.status_code, read.json()) == (
                403,
                {"error": "this token may read the registry, not change it"},
            )
    assert changes(registry_url) == []  # nothing refused was written

    assert call("PUT", api + "/customers/acme/events/page_view").status_code == 201
    assert call("GET", api + "/customers/acme", READ_TOKEN).json() == {"events": ["page_view"]}
    assert call("DELETE", api + "/customers/acme/events/page_view").status_code == 200
    assert call("PUT", api + "/customers/acme/events/signup").status_code == 201
    assert call("DELETE", api + "/customers/acme").json() == {"removed": ["acme.signup"]}
    assert call("GET", api + "/history", READ_TOKEN).status_code == 200
    # The OpenAPI document and the health probe need no token.
    assert requests.get(api + "/healthz", timeout=10).json() == {"status": "ok", "streams": 0}
    assert requests.get(api + "/openapi.json", timeout=10).status_code == 200


def test_add_list_remove_and_history_over_http(api: str, registry_url: str) -> None:
    created = call("PUT", api + "/customers/acme/events/page_view", X_Clickstream_Actor="ann")
    assert (created.status_code, created.json()) == (
        201,
        {"customer": "acme", "event": "page_view", "created": True},
    )
    again = call("PUT", api + "/customers/acme/events/page_view")
    assert (again.status_code, again.json()["created"]) == (200, False)
    assert call("PUT", api + "/customers/globex/events/video_play").status_code == 201
    listed = call("GET", api + "/customers", READ_TOKEN)
    assert listed.json() == {
        "customers": {"acme": {"events": ["page_view"]}, "globex": {"events": ["video_play"]}}
    }
    assert listed.headers["ETag"] == registry_etag(load_registry(registry_url))
    unchanged = call("GET", api + "/customers", READ_TOKEN, If_None_Match=listed.headers["ETag"])
    assert (unchanged.status_code, unchanged.content) == (304, b"")

    assert call("DELETE", api + "/customers/acme/events/signup").json() == {
        "error": "acme.signup is not in the registry"
    }
    assert call("DELETE", api + "/customers/initech").status_code == 404
    assert call("GET", api + "/customers/initech", READ_TOKEN).status_code == 404
    removed = call("DELETE", api + "/customers/globex/events/video_play")
    assert (removed.status_code, removed.json()) == (200, {"removed": ["globex.video_play"]})

    history = call("GET", api + "/history?limit=2", READ_TOKEN).json()["changes"]
    assert [(c["id"], c["action"], c["customer"], c["event"]) for c in history] == [
        (3, "remove", "globex", "video_play"),
        (2, "add", "globex", "video_play"),
    ]
    first = PostgresRegistry(registry_url).history()[-1]
    assert (first.actor, first.origin) == ("ann (api)", "127.0.0.1")
    assert call("GET", api + "/history?limit=0", READ_TOKEN).status_code == 400


def test_a_write_based_on_a_stale_read_is_refused(api: str, registry_url: str) -> None:
    assert call("PUT", api + "/customers/acme/events/page_view").status_code == 201
    read = call("GET", api + "/customers", READ_TOKEN).headers["ETag"]
    # Someone else changes the registry after that read.
    assert call("PUT", api + "/customers/acme/events/signup").status_code == 201
    for method, path in [
        ("PUT", "/customers/acme/events/checkout"),
        ("DELETE", "/customers/acme/events/page_view"),
        ("DELETE", "/customers/acme"),
    ]:
        stale = call(method, api + path, If_Match=read)
        assert stale.status_code == 412, (method, path)
        assert stale.json()["error"].startswith("the registry changed since it was read")
    assert changes(registry_url) == ["add acme.signup", "add acme.page_view"]
    fresh = call("GET", api + "/customers", READ_TOKEN).headers["ETag"]
    done = call("PUT", api + "/customers/acme/events/checkout", If_Match=fresh)
    assert done.status_code == 201
    assert done.headers["ETag"] != fresh

    # A whole-registry edit through the client is one conditional PUT /customers.
    client = HttpRegistry(api, WRITE_TOKEN)
    with pytest.raises(ClickstreamError, match="changed while this edit was being made"):
        with client.edit() as edit:
            assert call("PUT", api + "/customers/acme/events/refund").status_code == 201
            edit.registry = edit.registry.with_added("globex", ["video_play"])
    assert "globex" not in load_registry(registry_url).as_mapping()
    no_condition = requests.put(
        api + "/customers",
        json={"customers": {}},
        headers={"Authorization": f"Bearer {WRITE_TOKEN}"},
        timeout=10,
    )
    assert no_condition.status_code == 428
    assert len(load_registry(registry_url).streams) == 4


HOSTILE = [
    ("acme", "Bad Name"),
    ("acme", "page_view;DROP TABLE x"),
    ("Acme", "page_view"),
    ("acme", "x" * 64),
    ("acme", "événement"),
    ("acme", "a\x00b"),
    ("acme", "1st"),
    ("%2E%2E", "page_view"),
    ("acme", "page_view.json"),
    ("acme%2F..%2Fglobex", "page_view"),
    ("acme", ""),
]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_malformed_and_hostile_names_are_refused_in_one_line(
    api: str, registry_url: str, method: str
) -> None:
    assert call("PUT", api + "/customers/acme/events/page_view").status_code == 201
    for customer, event in HOSTILE:
        path = f"/customers/{requests.utils.quote(customer, safe='%')}/events/"
        response = call(method, api + path + requests.utils.quote(event, safe=""))
        assert response.status_code == 400, (customer, event, response.text)
        message = response.json()["error"]
        assert "\n" not in message and len(message) < 300
        assert "names must match" in message or "names matching" in message
    bad_body = requests.put(
        api + "/customers",
        data=b'{"customers": {"acme": {"events": ["Bad Name"]}}}',
        headers={"Authorization": f"Bearer {WRITE_TOKEN}", "If-Match": "*"},
        timeout=10,
    )
    assert bad_body.json() == {
        "error": "invalid event 'Bad Name': names must match ^[a-z][a-z0-9_]{0,62}$"
    }
    not_json = requests.put(
        api + "/customers",
        data=b"customers: {}",
        headers={"Authorization": f"Bearer {WRITE_TOKEN}", "If-Match": "*"},
        timeout=10,
    )
    assert not_json.status_code == 400
    assert changes(registry_url) == ["add acme.page_view"]  # nothing else written


def test_twenty_concurrent_writers_over_http_land_once_each(api: str, registry_url: str) -> None:
    answers: list[int] = []

    def add(i: int) -> None:
        path = f"/customers/acme/events/event_{i:02d}"
        answers.append(call("PUT", api + path, X_Clickstream_Actor=f"w{i}").status_code)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [201] * 20
    history = PostgresRegistry(registry_url).history()
    assert sorted((c.actor, c.event) for c in history) == sorted(
        (f"w{i} (api)", f"event_{i:02d}") for i in range(20)
    )
    assert set(HttpRegistry(api, READ_TOKEN).load().streams) == {
        Stream("acme", f"event_{i:02d}") for i in range(20)
    }


def test_the_cli_and_the_pipeline_use_the_api(
    api: str, registry_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "CLICKSTREAM_REGISTRY": api,
        "CLICKSTREAM_REGISTRY_TOKEN": WRITE_TOKEN,
        "CLICKSTREAM_REGISTRY_ACTOR": "ops@example",
    }
    added = run_cli("registry", "add", "acme", "page_view", "checkout", env=env)
    assert (added.returncode, added.stderr.strip()) == (
        0,
        f"registered acme.page_view, acme.checkout in {api}",
    )
    assert run_cli("registry", "remove", "acme", "checkout", env=env).returncode == 0
    assert run_cli("registry", "list", env=env).stdout.splitlines() == ["acme.page_view"]
    history = run_cli("registry", "history", env=env)
    rows = [line for line in history.stdout.splitlines() if "ops@example (api)" in line]
    assert [" ".join(r.replace("│", " ").split()[-2:]) for r in rows] == [
        "remove acme.checkout",
        "add acme.checkout",
        "add acme.page_view",
    ]
    source = tmp_path / "registry.yaml"
    source.write_text("customers:\n  globex:\n    events: [video_play]\n")
    imported = run_cli("registry", "import", str(source), env=env)
    assert imported.stderr.strip().endswith("1 streams added, 0 removed, 2 registered")
    exported = run_cli("registry", "export", env=env)
    assert exported.stdout == (
        "customers:\n  acme:\n    events: [page_view]\n  globex:\n    events: [video_play]\n"
    )

    # A read token cannot change it; a missing or wrong token cannot read it: one line each.
    refused = run_cli(
        "registry", "add", "acme", "x", env={**env, "CLICKSTREAM_REGISTRY_TOKEN": READ_TOKEN}
    )
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        f"clickstream: error: registry at {api}: this token may read the registry, not change it",
    )
    anonymous = run_cli("registry", "list", env={**outside_env(), "CLICKSTREAM_REGISTRY": api})
    assert anonymous.stderr.strip() == (
        f"clickstream: error: registry at {api}: a bearer token is required "
        "(Authorization: Bearer ...)"
    )
    bad_name = run_cli("registry", "add", "acme", "Bad Name", env=env)
    assert bad_name.stderr.strip() == (
        "clickstream: error: invalid event 'Bad Name': names must match ^[a-z][a-z0-9_]{0,62}$"
    )

    # The pipeline's reads: the same registry, and unchanged reads are 304s on one backend.
    monkeypatch.setenv("CLICKSTREAM_REGISTRY_TOKEN", READ_TOKEN)
    backend = registry_backend(api)
    assert backend is registry_backend(api)
    first = backend.load()
    assert first.as_mapping() == {"acme": ["page_view"], "globex": ["video_play"]}
    assert backend.load() is first  # a 304: the held snapshot
    assert call("PUT", api + "/customers/acme/events/signup").status_code == 201
    assert backend.load().as_mapping()["acme"] == ["page_view", "signup"]


def test_serve_refuses_to_start_without_tokens_and_reads_rotated_secret_files(
    registry_url: str, tmp_path: Path
) -> None:
    env = {**outside_env(), "CLICKSTREAM_REGISTRY_BACKEND": registry_url}
    refused = run_cli("registry", "serve", "--port", str(free_port()), env=env)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "clickstream: error: no tokens: set CLICKSTREAM_REGISTRY_WRITE_TOKEN (and "
        "CLICKSTREAM_REGISTRY_READ_TOKEN for read-only clients), or their _FILE forms naming "
        "a mounted Secret",
    )
    loop = run_cli(
        "registry", "serve", env={**env, "CLICKSTREAM_REGISTRY_BACKEND": "https://other.example"}
    )
    assert loop.stderr.strip().startswith(
        "clickstream: error: the registry API cannot serve another registry API"
    )

    secret = tmp_path / "write-token"
    secret.write_text("first-token\n")
    rotating = {
        "CLICKSTREAM_REGISTRY_WRITE_TOKEN": "",
        "CLICKSTREAM_REGISTRY_WRITE_TOKEN_FILE": str(secret),
    }
    with registry_server(registry_url, env=rotating) as url:
        assert call("GET", url + "/customers", "first-token").status_code == 200
        secret.write_text("second-token, first-token\n")  # rotation: both, for a while
        assert call("GET", url + "/customers", "second-token").status_code == 200
        assert call("GET", url + "/customers", "first-token").status_code == 200
        secret.write_text("second-token\n")
        assert call("GET", url + "/customers", "first-token").status_code == 401
        assert call("PUT", url + "/customers/acme/events/page_view", "second-token").ok


def test_the_openapi_document_describes_every_route(api: str) -> None:
    document = requests.get(api + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert {path: sorted(ops) for path, ops in document["paths"].items()} == {
        "/customers": ["get", "put"],
        "/customers/{customer}": ["delete", "get"],
        "/customers/{customer}/events/{event}": ["delete", "put"],
        "/history": ["get"],
        "/healthz": ["get"],
    }
    put = document["paths"]["/customers/{customer}/events/{event}"]["put"]
    assert sorted(put["responses"]) == ["200", "201", "400", "403", "412"]
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }


def test_an_empty_registry_file_behind_the_api(tmp_path: Path) -> None:
    with registry_server(str(tmp_path / "registry.yaml")) as url:
        assert call("GET", url + "/customers", READ_TOKEN).json() == {"customers": {}}
        assert call("PUT", url + "/customers/acme/events/page_view").status_code == 201
        assert load_registry(str(tmp_path / "registry.yaml")) == Registry().with_added(
            "acme", ["page_view"]
        )
        history = call("GET", url + "/history", READ_TOKEN)
        assert history.status_code == 501


def test_a_change_made_elsewhere_is_served_within_a_second(api: str, registry_url: str) -> None:
    assert call("GET", api + "/customers", READ_TOKEN).json() == {"customers": {}}
    PostgresRegistry(registry_url).add("acme", ["page_view"])  # not through this server
    started = time.monotonic()
    while call("GET", api + "/customers", READ_TOKEN).json() == {"customers": {}}:
        assert time.monotonic() - started < 1, "the change was not served within a second"
        time.sleep(0.02)
    assert call("GET", api + "/customers/acme", READ_TOKEN).json() == {"events": ["page_view"]}
