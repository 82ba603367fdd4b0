"""uv.lock as data: the versions it pins, for the lock tests and ``make test-latest``.

``python -m clickstream_pipeline_tests.lockfile diff uv.lock FREEZE`` prints every package whose
version in a ``pip freeze``-style list differs from the lock's (what a fresh resolve would move).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "uv.lock"


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path = LOCK) -> dict[str, set[str]]:
    """Each package in the lock and its versions (more than one where markers split them)."""
    versions: dict[str, set[str]] = {}
    for package in tomllib.loads(lock.read_text())["package"]:
        if "version" in package:
            versions.setdefault(normalize(package["name"]), set()).add(package["version"])
    return versions


def freeze_versions(freeze: Path) -> dict[str, str]:
    """``name==version`` lines (``uv pip list --format freeze``), editable installs left out."""
    pins: dict[str, str] = {}
    for line in freeze.read_text().splitlines():
        name, separator, version = line.partition("==")
        if separator:
            pins[normalize(name)] = version.strip()
    return pins


def drift(lock: Path, freeze: Path) -> list[str]:
    """One line per package whose version differs from the lock's, or that it does not hold."""
    locked = locked_versions(lock)
    lines = []
    for name, version in sorted(freeze_versions(freeze).items()):
        pinned = locked.get(name)
        if pinned is None:
            lines.append(f"{name} {version} (not in the lock)")
        elif version not in pinned:
            lines.append(f"{name} {' / '.join(sorted(pinned))} -> {version}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] != "diff":
        sys.stderr.write("usage: python -m clickstream_pipeline_tests.lockfile diff LOCK FREEZE\n")
        return 2
    lines = drift(Path(argv[2]), Path(argv[3]))
    sys.stdout.write(f"{len(lines)} packages differ from {argv[2]}:\n")
    sys.stdout.write("".join(f"  {line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
