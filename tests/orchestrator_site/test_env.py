from __future__ import annotations

import pytest

from orchestrator_site.env import env_bool, env_int, env_list, env_str, parse_database_url
from orchestrator_site.errors import ConfigInvalid


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("false", False), ("no", False), ("", False)]
)
def test_env_bool_accepts_common_spellings(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("X_FLAG", raw)
    assert env_bool("X_FLAG", default=not expected) is expected


def test_env_bool_default_and_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("X_FLAG", raising=False)
    assert env_bool("X_FLAG", default=True) is True
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ConfigInvalid) as info:
        env_bool("X_FLAG", default=True)
    assert info.value.data == {"variable": "X_FLAG"}


def test_env_int(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_N", "42")
    assert env_int("X_N", 1) == 42
    monkeypatch.setenv("X_N", " ")
    assert env_int("X_N", 7) == 7
    monkeypatch.setenv("X_N", "4x")
    with pytest.raises(ConfigInvalid):
        env_int("X_N", 1)


def test_env_list_and_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_L", "a, b,,c ")
    assert env_list("X_L", []) == ["a", "b", "c"]
    monkeypatch.delenv("X_L")
    assert env_list("X_L", ["d"]) == ["d"]
    assert env_str("X_L", "dflt") == "dflt"


def test_parse_database_url_full() -> None:
    db = parse_database_url("postgresql://u%40x:p%2Fw@db.local:6543/my%20db")
    assert (db.user, db.password, db.host, db.port, db.name) == ("u@x", "p/w", "db.local", 6543, "my db")


def test_parse_database_url_defaults() -> None:
    db = parse_database_url("postgres:///orchestrator")
    assert (db.user, db.password, db.host, db.port) == ("postgres", "", "127.0.0.1", 5432)


@pytest.mark.parametrize("url", ["mysql://x/db", "postgres://host:5432/", "postgres://host:notaport/db"])
def test_parse_database_url_rejects(url: str) -> None:
    with pytest.raises(ConfigInvalid):
        parse_database_url(url)


from urllib.parse import quote  # noqa: E402

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@given(user=names, password=names, dbname=names, port=st.integers(1, 65535))
def test_any_quoted_url_parses_back(user: str, password: str, dbname: str, port: int) -> None:
    url = f"postgres://{quote(user, safe='')}:{quote(password, safe='')}@db.internal:{port}/{quote(dbname, safe='')}"
    db = parse_database_url(url)
    assert (db.user, db.password, db.name, db.port, db.host) == (user, password, dbname, port, "db.internal")


def test_env_list_of_an_empty_string_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_L", "")
    assert env_list("X_L", ["default"]) == []


def test_env_str_reads_the_value_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_S", "  spaced  ")
    assert env_str("X_S", "d") == "  spaced  "


def test_env_int_negative_and_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_N", " -3 ")
    assert env_int("X_N", 0) == -3


def test_database_url_is_a_frozen_value() -> None:
    import dataclasses

    db = parse_database_url("postgres://u@h/d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        db.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("raw", "expected"), [("TRUE", True), ("On", True), ("Off", False), ("No", False)])
def test_env_bool_ignores_case(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("X_FLAG", raw)
    assert env_bool("X_FLAG", default=not expected) is expected


def test_config_errors_name_the_variable_in_their_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_N", "ten")
    with pytest.raises(ConfigInvalid) as info:
        env_int("X_N", 1)
    assert info.value.data == {"variable": "X_N"} and "X_N must be an integer" in info.value.message
    assert info.value.code == "config_invalid" and info.value.http_status == 500
