"""Customer, event and stream names: the rule they follow and the values they become."""

from __future__ import annotations

import re
from dataclasses import dataclass

from clickstream_pipeline.errors import ClickstreamError

# Names become SQL identifiers (schema and table) and S3 path parts, so the rule is strict:
# lower-case, starts with a letter, at most 63 characters (PostgreSQL's identifier limit).
NAME_RULE = "^[a-z][a-z0-9_]{0,62}$"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")


def is_valid_name(value: object) -> bool:
    """True when ``value`` is a string that follows the name rule."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def validate_name(value: object, kind: str = "name") -> str:
    """Return ``value`` if it follows the name rule, else raise a one-line ClickstreamError."""
    if not is_valid_name(value):
        raise ClickstreamError(f"invalid {kind} {value!r}: names must match {NAME_RULE}")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True, order=True)
class Stream:
    """One customer event, ``<customer>.<event>``; loads into the table ``<customer>.<event>``."""

    customer: str
    event: str

    def __post_init__(self) -> None:
        validate_name(self.customer, "customer")
        validate_name(self.event, "event")

    @property
    def key(self) -> str:
        """The stream's partition key and display name, e.g. ``acme.add_to_cart``."""
        return f"{self.customer}.{self.event}"

    @classmethod
    def parse(cls, key: str) -> Stream:
        """Parse ``<customer>.<event>``; raise ClickstreamError for anything else."""
        customer, sep, event = key.partition(".")
        if not sep:
            raise ClickstreamError(f"invalid stream {key!r}: expected <customer>.<event>")
        return cls(customer, event)

    def __str__(self) -> str:
        return self.key
