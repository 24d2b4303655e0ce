"""The test helpers themselves: key dumps and the choice of servers."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import redis

from neps_redis.server import ServerBinary
from tests.helpers import dump_keys, newest, select_binaries


def _fill(client: redis.Redis) -> None:
    client.set("s", b"v")
    client.hset("h", mapping={"a": b"1"})
    client.rpush("l", b"1", b"2")
    client.sadd("set", b"x", b"y")
    client.zadd("z", {b"m": 1.5})
    client.xadd("x", {"f": b"v"}, id="1-0")
    client.xgroup_create("x", "workers", id="0")


def test_a_dump_holds_every_key_with_its_type_and_value(r: redis.Redis) -> None:
    # Given
    _fill(r)

    # When
    dump = dump_keys(r)

    # Then
    assert {key: kind for key, (kind, _) in dump.items()} == {
        b"s": "string",
        b"h": "hash",
        b"l": "list",
        b"set": "set",
        b"z": "zset",
        b"x": "stream",
    }
    assert dump[b"h"][1] == {b"a": b"1"}
    assert dump[b"set"][1] == {b"x", b"y"}
    assert dump[b"z"][1] == [(b"m", 1.5)]
    assert dump[b"x"][1]["entries"] == [(b"1-0", {b"f": b"v"})]


def test_a_dump_is_unchanged_by_reads_and_changed_by_any_write(
    r: redis.Redis,
) -> None:
    # Given
    _fill(r)
    before = dump_keys(r)

    # When reading only
    r.get("s")
    r.xrange("x")
    r.zscore("z", b"m")

    # Then
    assert dump_keys(r) == before

    # When a consumer group reads, which adds no entry
    r.xreadgroup("workers", "worker-1", {"x": ">"})

    # Then
    assert dump_keys(r) != before


def test_a_dump_can_be_limited_to_a_pattern(r: redis.Redis) -> None:
    r.set("neps:run:a", b"1")
    r.set("other", b"2")
    assert set(dump_keys(r, "neps:*")) == {b"neps:run:a"}


def _binary(
    name: Literal["redis", "valkey"], version: tuple[int, int, int]
) -> ServerBinary:
    return ServerBinary(Path(f"/bin/{name}-server"), name, version)


BINARIES = [
    _binary("redis", (6, 2, 14)),
    _binary("redis", (7, 0, 15)),
    _binary("valkey", (9, 1, 2)),
]


@pytest.mark.parametrize(
    ("spec", "ids"),
    [
        ("", ["redis-6.2.14", "redis-7.0.15", "valkey-9.1.2"]),
        ("valkey", ["valkey-9.1.2"]),
        ("redis-6.2,valkey", ["redis-6.2.14", "valkey-9.1.2"]),
        ("redis-7", ["redis-7.0.15"]),
        (" redis-6.2.14 , ", ["redis-6.2.14"]),
    ],
)
def test_servers_are_selected_by_name_id_or_id_prefix(
    spec: str, ids: list[str]
) -> None:
    kept, unmatched = select_binaries(BINARIES, spec)
    assert [b.id for b in kept] == ids
    assert unmatched == []


def test_a_selection_matching_no_server_is_reported() -> None:
    kept, unmatched = select_binaries(BINARIES, "redis-6.2.1,keydb")
    assert kept == []
    assert unmatched == ["redis-6.2.1", "keydb"]


def test_the_default_server_is_the_newest_release() -> None:
    assert newest(BINARIES).id == "valkey-9.1.2"
    assert newest(BINARIES[:2]).id == "redis-7.0.15"
