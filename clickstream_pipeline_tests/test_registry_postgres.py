"""The PostgreSQL registry on the embedded PostgreSQL: the same edits as the YAML file, an
append-only history, and concurrent writers that all land."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, load_registry, registry_backend
from clickstream_pipeline.registry_postgres import PostgresRegistry
from clickstream_pipeline_tests.helpers import run_cli


def test_edits_are_history_and_the_registry_is_derived_from_it(registry_url: str) -> None:
    backend = registry_backend(registry_url)
    assert isinstance(backend, PostgresRegistry)
    assert backend.load() == Registry()  # before any change: empty, nothing created
    assert backend.history() == []
    alice = PostgresRegistry(registry_url, actor="alice", origin="laptop")
    with alice.edit() as edit:
        edit.registry = edit.registry.with_added("acme", ["page_view", "add_to_cart"])
    with alice.edit() as edit:
        edit.registry = edit.registry.with_added("globex", ["video_play"])
    bob = PostgresRegistry(registry_url, actor="bob", origin="job")
    with bob.edit() as edit:
        edit.registry = edit.registry.with_removed("acme", ["page_view"])
    with bob.edit() as edit:
        edit.registry = edit.registry.with_added("acme", ["page_view"])  # back, now last

    assert load_registry(registry_url).as_mapping() == {
        "acme": ["add_to_cart", "page_view"],
        "globex": ["video_play"],
    }
    assert [
        (c.actor, c.origin, c.action, f"{c.customer}.{c.event}") for c in backend.history()
    ] == [
        ("bob", "job", "add", "acme.page_view"),
        ("bob", "job", "remove", "acme.page_view"),
        ("alice", "laptop", "add", "globex.video_play"),
        ("alice", "laptop", "add", "acme.add_to_cart"),
        ("alice", "laptop", "add", "acme.page_view"),
    ]
    assert [c.id for c in backend.history(2)] == [5, 4]
    # An edit that changes nothing writes nothing; a failed edit writes nothing.
    with bob.edit() as edit:
        edit.registry = edit.registry.with_added("acme", ["page_view"])
    with pytest.raises(ClickstreamError, match="invalid event 'Bad Name'"):
        with bob.edit() as edit:
            edit.registry = edit.registry.with_added("acme", ["Bad Name"])
    assert len(backend.history()) == 5


def test_twenty_concurrent_writers_all_land_once(registry_url: str) -> None:
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            writer = PostgresRegistry(registry_url, actor=f"writer{i}")
            with writer.edit() as edit:
                edit.registry = edit.registry.with_added("acme", [f"event_{i:02d}"])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    backend = PostgresRegistry(registry_url)
    assert set(backend.load().streams) == {Stream("acme", f"event_{i:02d}") for i in range(20)}
    history = backend.history()
    assert sorted(c.actor for c in history) == sorted(f"writer{i}" for i in range(20))
    assert sorted(c.event for c in history) == [f"event_{i:02d}" for i in range(20)]


def test_the_cli_edits_lists_and_shows_history(registry_url: str) -> None:
    env = {"CLICKSTREAM_REGISTRY": registry_url, "CLICKSTREAM_REGISTRY_ACTOR": "ops@example"}
    added = run_cli("registry", "add", "acme", "page_view", "checkout", env=env)
    assert added.returncode == 0, added.stderr
    location = registry_url.partition("@")[2]
    assert added.stderr.strip() == (
        f"registered acme.page_view, acme.checkout in postgresql://{location}"
    )
    assert run_cli("registry", "remove", "acme", "checkout", env=env).returncode == 0
    listed = run_cli("registry", "list", env=env)
    assert listed.stdout.splitlines() == ["acme.page_view"]
    history = run_cli("registry", "history", env=env)
    assert history.returncode == 0, history.stderr
    rows = [line for line in history.stdout.splitlines() if "ops@example" in line]
    assert [" ".join(r.replace("│", " ").split()[-2:]) for r in rows] == [
        "remove acme.checkout",
        "add acme.checkout",
        "add acme.page_view",
    ]


def test_history_of_a_file_registry_is_one_line(registry_path: object) -> None:
    done = run_cli("registry", "history")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("clickstream: error: the registry in ")
    assert done.stderr.strip().endswith(
        "keeps no history: a postgresql:// registry (CLICKSTREAM_REGISTRY), "
        "or the API over one, does"
    )


def test_an_unreachable_registry_database_is_one_line(local_stack: dict[str, str]) -> None:
    url = "postgresql://nobody:secret@127.0.0.1:1/registry"
    done = run_cli("registry", "list", env={"CLICKSTREAM_REGISTRY": url})
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        "clickstream: error: cannot connect to the registry at postgresql://127.0.0.1:1/registry:"
    )
    assert "secret" not in done.stderr


def test_import_and_export_move_a_registry_between_backends(
    registry_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "registry.yaml"
    source.write_text(
        "customers:\n  acme:\n    events: [page_view, add_to_cart]\n"
        "  globex:\n    events: [video_play]\n"
    )
    env = {"CLICKSTREAM_REGISTRY": registry_url}
    assert run_cli("registry", "add", "initech", "login", env=env).returncode == 0

    merged = run_cli("registry", "import", str(source), env=env)
    assert merged.returncode == 0, merged.stderr
    assert merged.stderr.strip().endswith("3 streams added, 0 removed, 4 registered")
    replaced = run_cli("registry", "import", "--replace", str(source), env=env)
    assert replaced.stderr.strip().endswith("0 streams added, 1 removed, 3 registered")

    exported = run_cli("registry", "export", env=env)
    assert exported.returncode == 0, exported.stderr
    # The file's format, in name order: the same export from any history, stable under review.
    assert exported.stdout == (
        "customers:\n  acme:\n    events: [add_to_cart, page_view]\n"
        "  globex:\n    events: [video_play]\n"
    )
    back = tmp_path / "back.yaml"
    back.write_text(exported.stdout)
    assert load_registry(str(back)) == load_registry(registry_url)

    missing = run_cli("registry", "import", str(tmp_path / "nope.yaml"), env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"clickstream: error: cannot import {tmp_path / 'nope.yaml'}: no such file"
    )


def test_a_backend_applies_only_the_changes_made_since_its_last_read(registry_url: str) -> None:
    reader, writer = PostgresRegistry(registry_url), PostgresRegistry(registry_url, actor="w")
    writer.save(Registry.from_mapping({"globex": ["video_play"], "acme": ["signup", "page_view"]}))
    first = reader.load()
    assert first.as_mapping() == {"acme": ["page_view", "signup"], "globex": ["video_play"]}
    assert reader.load() is first  # nothing changed since: the registry held
    with writer.edit() as edit:
        edit.registry = edit.registry.with_removed("acme", ["signup"]).with_added(
            "initech", ["login"]
        )
    writer.add("acme", ["signup"])  # back again
    writer.remove("globex")

    applied = reader.load()
    assert applied == PostgresRegistry(registry_url).load()  # as derived from the whole history
    assert applied.as_mapping() == {"acme": ["page_view", "signup"], "initech": ["login"]}
