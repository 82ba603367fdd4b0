"""The lock: uv.lock pins every requirement within its range, and this environment is exactly it.

`make install` (and so `demo`, `test`, `dev`, `bench`, CI) syncs .venv to uv.lock and the image
installs its runtime part, so what runs is what the tests ran with. A user who `pip install`s the
package still gets the ranges in pyproject.toml, which these tests hold the lock to.
"""

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from clickstream_pipeline_tests.lockfile import locked_versions, normalize

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
UV = Path(sys.executable).parent / "uv"
# `make test-latest` runs the suite on the newest releases the ranges allow, on purpose not the
# lock's: only the test that the environment is the lock does not apply there.
UNLOCKED = os.environ.get("CLICKSTREAM_TEST_UNLOCKED") == "1"


def requirements() -> list[Requirement]:
    """The runtime requirements and every extra's."""
    project = PYPROJECT["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts.extend(extra)
    return [Requirement(text) for text in texts]


def uv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(UV), *args],
        cwd=ROOT,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": sys.prefix, "UV_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_lock_pins_every_requirement_within_its_range() -> None:
    locked = locked_versions()
    assert len(requirements()) >= 30
    for requirement in requirements():
        name = normalize(requirement.name)
        assert name in locked, f"{name} is not in uv.lock"
        for version in locked[name]:
            assert requirement.specifier.contains(version, prereleases=True), (name, version)
    # The Dagster family at one release (FACTS.md: an unpinned dagster-aws resolves to 2021's).
    assert {name: locked[name] for name in ("dagster", "dagster-webserver", "dagster-graphql")} == {
        name: {"1.13.27"} for name in ("dagster", "dagster-webserver", "dagster-graphql")
    }
    for name in ("dagster-aws", "dagster-k8s", "dagster-postgres"):
        assert locked[name] == {"0.29.27"}


def test_the_lock_is_current_with_pyproject() -> None:
    """A requirement changed without `make lock` fails here, not on a newcomer's machine."""
    result = uv("lock", "--check")
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(UNLOCKED, reason="make test-latest runs on the newest releases, not the lock")
def test_the_installed_environment_is_the_lock() -> None:
    locked = locked_versions()
    project = normalize(PYPROJECT["project"]["name"])
    # pip is the seed `python -m venv` puts there to install uv; uv leaves it.
    outside = {"pip", project}
    installed = {normalize(d.metadata["Name"]): d.version for d in distributions()}
    differing = {
        name: (version, sorted(locked.get(name, ())))
        for name, version in installed.items()
        if name not in outside and version not in locked.get(name, ())
    }
    assert differing == {}, "installed version, locked versions"
    # And nothing the lock holds for this platform is missing or extra (uv's own comparison).
    result = uv("sync", "--check", "--frozen", "--all-extras")
    assert result.returncode == 0, result.stderr


def test_the_image_installs_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (uv_version,) = locked_versions()["uv"]
    assert re.search(r"^COPY uv\.lock pyproject\.toml README\.md \./$", dockerfile, re.MULTILINE)
    assert f"pip install --no-cache-dir uv=={uv_version} " in dockerfile
    assert "uv sync --frozen --no-editable" in dockerfile
    assert "--extra" not in dockerfile and "--all-extras" not in dockerfile  # the runtime only


def test_the_makefile_installs_the_lock_with_its_uv() -> None:
    # Not the make that runs this suite (`make test`): its flags would reach this one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "--dry-run",
            "--always-make",
            "install",
            "VENV=/nonexistent/venv",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (uv_version,) = locked_versions()["uv"]
    assert result.stdout.splitlines() == [
        "python3 -m venv /nonexistent/venv",
        "/nonexistent/venv/bin/python -m pip install --quiet --disable-pip-version-check "
        f"'uv=={uv_version}'",
        "/nonexistent/venv/bin/uv sync --quiet --frozen --all-extras",
        "/nonexistent/venv/bin/uv pip check --quiet",
        "touch /nonexistent/venv/.installed",
    ]
