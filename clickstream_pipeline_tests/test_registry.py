from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import (
    Registry,
    YamlFileRegistry,
    dump_registry,
    parse_registry,
    registry_backend,
)

GOOD = """\
customers:
  acme:
    events: [add_to_cart, remove_from_cart, page_view]
  globex:
    events: [video_play]
"""


def test_parses_the_design_example() -> None:
    registry = parse_registry(GOOD, "registry.yaml")
    assert registry.customers == (
        ("acme", ("add_to_cart", "remove_from_cart", "page_view")),
        ("globex", ("video_play",)),
    )
    assert [s.key for s in registry.streams] == [
        "acme.add_to_cart",
        "acme.page_view",
        "acme.remove_from_cart",
        "globex.video_play",
    ]
    assert Stream("acme", "page_view") in registry
    assert Stream("globex", "page_view") not in registry


@pytest.mark.parametrize(
    ("text", "registry"),
    [
        ("", Registry()),
        ("customers:\n", Registry()),
        ("customers: {}\n", Registry()),
        ("customers:\n  acme:\n", Registry((("acme", ()),))),
        ("customers:\n  acme:\n    events: []\n", Registry((("acme", ()),))),
        ("customers:\n  acme:\n    events: [a, a, b]\n", Registry((("acme", ("a", "b")),))),
    ],
)
def test_empty_and_degenerate_registries(text: str, registry: Registry) -> None:
    assert parse_registry(text, "r.yaml") == registry


RULE = "names must match ^[a-z][a-z0-9_]{0,62}$"
TOP = "registry r.yaml must be a mapping with one key, 'customers'"
ENTRY = "registry r.yaml: customer 'acme' must be a mapping with an 'events' list"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "customers: [acme",
            "registry r.yaml is not valid YAML at line 1: "
            "expected ',' or ']', but got '<stream end>'",
        ),
        ("- acme\n", TOP),
        ("customers: {}\nextra: 1\n", TOP),
        ("customers: [acme]\n", "registry r.yaml: 'customers' must be a mapping of customer names"),
        ("customers:\n  acme: [page_view]\n", ENTRY),
        ("customers:\n  acme:\n    events: page_view\n", ENTRY),
        ("customers:\n  acme:\n    events: [a]\n    tables: [b]\n", ENTRY),
        ("customers:\n  Acme:\n    events: [a]\n", f"invalid customer 'Acme': {RULE}"),
        ("customers:\n  acme:\n    events: [Page-View]\n", f"invalid event 'Page-View': {RULE}"),
        ("customers:\n  acme:\n    events: [1]\n", f"invalid event 1: {RULE}"),
        ("customers:\n  7:\n    events: [a]\n", f"invalid customer 7: {RULE}"),
        (
            "customers:\n  acme:\n    events: ['a; drop table x']\n",
            f"invalid event 'a; drop table x': {RULE}",
        ),
    ],
)
def test_every_rejection_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ClickstreamError) as raised:
        parse_registry(text, "r.yaml")
    assert str(raised.value) == message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ClickstreamError, match=r"^registry file .*nope\.yaml not found: create it"):
        YamlFileRegistry(path).load()


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"customers:\n  \xff\xfe: {}\n")
    with pytest.raises(ClickstreamError, match=r"^cannot read registry file .*r\.yaml: 'utf-8'"):
        YamlFileRegistry(path).load()


def test_backend_comes_from_the_environment(
    registry_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert registry_backend().location == str(registry_path)
    monkeypatch.delenv("CLICKSTREAM_REGISTRY")
    assert registry_backend().location == "registry.yaml"
    assert registry_backend("file:///etc/r.yaml").location == "/etc/r.yaml"
    assert registry_backend("https://houston.example/").location == "https://houston.example"
    with pytest.raises(ClickstreamError, match="unsupported registry location 'ftp://houston/'"):
        registry_backend("ftp://houston/")


def test_add_and_remove_keep_other_entries() -> None:
    registry = parse_registry(GOOD, "r.yaml")
    added = registry.with_added("acme", ["checkout", "page_view"]).with_added("initech", ["login"])
    assert added.as_mapping() == {
        "acme": ["add_to_cart", "remove_from_cart", "page_view", "checkout"],
        "globex": ["video_play"],
        "initech": ["login"],
    }
    removed = added.with_removed("acme", ["remove_from_cart"]).with_removed("globex")
    assert removed.as_mapping() == {
        "acme": ["add_to_cart", "page_view", "checkout"],
        "initech": ["login"],
    }
    with pytest.raises(ClickstreamError, match="customer 'globex' is not in the registry"):
        removed.with_removed("globex")
    with pytest.raises(ClickstreamError, match="event 'signup' is not registered for customer"):
        removed.with_removed("acme", ["signup"])
    with pytest.raises(ClickstreamError, match="invalid event 'Bad'"):
        removed.with_added("acme", ["Bad"])


def test_dump_round_trips() -> None:
    registry = parse_registry(GOOD, "r.yaml")
    assert parse_registry(dump_registry(registry), "r.yaml") == registry
    assert parse_registry(dump_registry(Registry()), "r.yaml") == Registry()


def test_save_is_atomic_and_keeps_permissions(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    path.chmod(0o640)
    backend = YamlFileRegistry(path)
    with backend.edit() as edit:
        edit.registry = edit.registry.with_added("globex", ["video_pause"])
    assert backend.load().as_mapping()["globex"] == ["video_play", "video_pause"]
    assert path.stat().st_mode & 0o777 == 0o640
    # No temporary file is left behind next to the registry.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.yaml.lock", "r.yaml"]


def test_failed_edit_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    with pytest.raises(ClickstreamError), YamlFileRegistry(path).edit() as edit:
        edit.registry = edit.registry.with_removed("nobody")
    assert path.read_text() == GOOD


def _add_event(path: str, index: int) -> None:
    backend = YamlFileRegistry(path)
    with backend.edit() as edit:
        edit.registry = edit.registry.with_added("acme", [f"event_{index}"])


def test_concurrent_edits_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_event, args=(str(path), i)) for i in range(12)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    events = YamlFileRegistry(path).load().as_mapping()["acme"]
    assert sorted(events[3:]) == sorted(f"event_{i}" for i in range(12))
    assert events[:3] == ["add_to_cart", "remove_from_cart", "page_view"]
