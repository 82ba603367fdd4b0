"""The Dagster UI as a person sees it, in headless Chromium (Debian's package) driven by
Playwright: the asset catalog lists the tables by customer, a table's partitions page shows its
loaded hours, and the backfill dialog opens. Screenshots go to CLICKSTREAM_UI_SCREENSHOTS
(default .clickstream/ui-screenshots in the repository) for a person to look at."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, TimeoutError, sync_playwright

from clickstream_pipeline.local.stack import DAGSTER_YAML
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline_tests.helpers import (
    deployment,
    put_file,
    recent_hour,
    record,
    run_cli,
)

CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).resolve().parents[1]
# Chromium as root, offline: no sandbox, and none of its background connections (this machine
# refuses them, many at a time).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
H1, H2 = recent_hour(3), recent_hour(2)


def screenshots() -> Path:
    path = Path(
        os.environ.get("CLICKSTREAM_UI_SCREENSHOTS") or ROOT / ".clickstream/ui-screenshots"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium; .ci/run installs it and sets CLICKSTREAM_REQUIRE_CHROMIUM, so in CI a
    missing browser fails instead of skipping."""
    if CHROMIUM is None:
        if os.environ.get("CLICKSTREAM_REQUIRE_CHROMIUM") or os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's package")
        pytest.skip("chromium is not installed here (apt-get install -y chromium)")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.slow(seconds=110)
def test_the_ui_lists_tables_by_customer_shows_loaded_hours_and_opens_a_backfill(
    pipeline: dict[str, str],
    registry_path: Path,
    tmp_path: Path,
    customer: str,
    monkeypatch: pytest.MonkeyPatch,
    browser: Browser,
) -> None:
    views, signups = Stream(customer, "page_view"), Stream(customer, "signup")
    other = Stream(f"{customer}x", "video_play")
    YamlFileRegistry(registry_path).save(Registry().with_streams([views, signups, other]))
    for hour in (H1, H2):
        put_file(pipeline["CLICKSTREAM_BUCKET"], views, hour, "a", [record(f"m{hour:%H}", hour)])
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    load = run_cli("load", "--grace-minutes", "0", env={**pipeline, "DAGSTER_HOME": str(home)})
    assert load.returncode == 0, load.stderr
    shots = screenshots()

    with deployment(tmp_path, monkeypatch, home) as services:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{services.url}/assets")
        dismiss_welcome(page)
        page.get_by_text(f"{customer} / signup").first.wait_for(timeout=60_000)
        page.screenshot(path=shots / "catalog.png")
        catalog = page.inner_text("body")
        for stream in (views, signups, other):
            assert f"{stream.customer} / {stream.event}" in catalog
            assert f"raw / {stream.customer} / {stream.event}" in catalog
        assert f"Table {views.key}: the validated, deduplicated" in catalog

        page.goto(f"{services.url}/assets/{customer}/page_view?view=partitions")
        dismiss_welcome(page)
        page.get_by_text("Materialized (2)").wait_for(timeout=60_000)
        page.screenshot(path=shots / "partitions.png")
        assert "Failed (0)" in page.inner_text("body")

        page.get_by_role("button", name="Materialize…").click()
        dialog = page.get_by_text(f"Launch runs to materialize {customer} / page_view")
        dialog.wait_for(timeout=60_000)
        page.screenshot(path=shots / "backfill-dialog.png")
        text = page.inner_text("body")
        assert "Partition selection" in text and "Launch backfill" in text
        assert "Backfills all partitions in a single run." in text


def dismiss_welcome(page: Page) -> None:
    """The first visit asks to join the community; a person would skip it."""
    try:
        page.get_by_role("button", name="Skip").click(timeout=5_000)
    except TimeoutError:
        pass
