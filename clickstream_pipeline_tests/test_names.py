from __future__ import annotations

import urllib.parse

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.names import NAME_RULE, Stream, is_valid_name, validate_name

VALID = ["a", "acme", "add_to_cart", "x1", "a_", "select", "a" * 63]
INVALID = [
    "",
    "A",
    "Acme",
    "1acme",
    "_acme",
    "acme-corp",
    "acme.corp",
    "acme corp",
    "a" * 64,
    "caf\u00e9",
    "acme\n",
    "acme;drop",
    'ac"me',
    None,
    7,
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name, "customer") == name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_rejected_with_the_value_and_the_rule(name: object) -> None:
    with pytest.raises(ClickstreamError) as raised:
        validate_name(name, "event")
    assert str(raised.value) == f"invalid event {name!r}: names must match {NAME_RULE}"


def test_stream_key_round_trip() -> None:
    stream = Stream.parse("acme.add_to_cart")
    assert stream == Stream("acme", "add_to_cart")
    assert stream.key == str(stream) == "acme.add_to_cart"


@pytest.mark.parametrize("key", ["acme", "acme.", ".cart", "acme.Cart", "acme.add.cart"])
def test_stream_parse_rejects_malformed_keys(key: str) -> None:
    with pytest.raises(ClickstreamError):
        Stream.parse(key)


@given(st.text(max_size=70))
def test_validation_agrees_with_the_rule(text: str) -> None:
    assert is_valid_name(text) == (
        0 < len(text) <= 63
        and text[0] in "abcdefghijklmnopqrstuvwxyz"
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in text)
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.from_regex(NAME_RULE, fullmatch=True))
def test_every_accepted_name_is_a_safe_identifier_and_path_part(
    name: str, pg_conn: psycopg2.extensions.connection
) -> None:
    assert validate_name(name) == name
    # An S3 path part that needs no escaping and cannot climb out of its prefix.
    assert urllib.parse.quote(name, safe="") == name
    assert "/" not in name and name not in (".", "..")
    # A PostgreSQL identifier that quoting leaves intact (no escaping, no truncation) and that
    # works as a schema and table name, reserved words included.
    quoted = sql.Identifier(name).as_string(pg_conn)
    assert quoted == f'"{name}"'
    with pg_conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE SCHEMA {0}; CREATE TABLE {0}.{0} (x int)").format(sql.Identifier(name))
        )
        cur.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema = %s",
            (name,),
        )
        assert cur.fetchall() == [(name, name)]
    pg_conn.rollback()
