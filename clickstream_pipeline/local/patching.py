"""Replace a dependency's methods only where they are still the ones a replacement was written for.

The local stack speeds moto's Kinesis up, and the tests make it reshard like Amazon Kinesis, by
replacing methods of moto's classes. moto changes its internals in patch releases (5.2.6 turned a
record's ``created_at`` from an epoch number into a datetime), so a replacement written against
one release can turn every request into a 500 on the next. ``install()`` checks, as it installs
a set of replacements, that each original takes the same parameters and that the replacements
pass a behavioural self-check against this moto; otherwise it puts moto's own methods back and
logs one warning line. Nothing in this module knows about Kinesis.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger("clickstream.local")


@dataclass(frozen=True)
class Replacement:
    """``owner.name`` becomes ``function``, which takes the original's parameters."""

    owner: type
    name: str
    function: Callable[..., Any]

    @property
    def label(self) -> str:
        return f"{self.owner.__name__}.{self.name}"


# Per (class, name): our replacement, and the package's method it displaced, so a second
# install() checks and self-checks against the package's own method, never against ours.
_OURS: dict[tuple[type, str], Any] = {}
_ORIGINALS: dict[tuple[type, str], Any] = {}


def _ours(owner: type, name: str) -> bool:
    key = (owner, name)
    return key in _OURS and owner.__dict__.get(name) is _OURS[key]


def original(owner: type, name: str) -> Any:
    """The method of ``owner`` as its package defines it, whether ours replaced it or not."""
    if _ours(owner, name):
        return _ORIGINALS[(owner, name)]
    return owner.__dict__.get(name)


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def install(
    purpose: str,
    package: str,
    replacements: Sequence[Replacement],
    self_check: Callable[[Mapping[str, Any]], None],
) -> bool:
    """Install ``replacements`` for ``purpose`` if ``package`` is as they expect; True if installed.

    ``self_check`` gets the originals by label and raises (anything) if the replaced methods do
    not behave as ``package``'s own would. On a mismatch the originals stay (or are put back) and
    one warning line says which release and what differed. Idempotent."""
    originals: dict[str, Any] = {}
    try:
        for replacement in replacements:
            method = original(replacement.owner, replacement.name)
            if method is None:
                raise LookupError(f"{replacement.label} does not exist")
            expected, found = _parameters(replacement.function), _parameters(method)
            if found != expected:
                raise TypeError(f"{replacement.label} takes ({', '.join(found)})")
            originals[replacement.label] = method
        # The self-check runs on the replaced classes: replacements may call one another.
        for replacement in replacements:
            setattr(replacement.owner, replacement.name, replacement.function)
        self_check(originals)
    except Exception as error:  # any surprise in a dependency's internals means "not this one"
        for replacement in replacements:
            if replacement.owner.__dict__.get(replacement.name) is replacement.function:
                own = originals.get(replacement.label) or original(
                    replacement.owner, replacement.name
                )
                setattr(replacement.owner, replacement.name, own)
        log.warning(
            "%s: %s %s is not the release it was written for (%s); using %s's own methods",
            purpose,
            package,
            _version(package),
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            package,
        )
        return False
    for replacement in replacements:
        key = (replacement.owner, replacement.name)
        _ORIGINALS[key] = originals[replacement.label]
        _OURS[key] = replacement.function
    return True


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(version unknown)"
