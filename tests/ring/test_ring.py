"""HashRing behaviour: API, errors, serialization, versions, balance and movement."""

from __future__ import annotations

import copy
import json
import pickle
import random
import subprocess
import sys
import uuid
from collections import Counter
from types import ModuleType

import pytest

from shardkit.errors import ConfigError, InvalidKeyError, UnknownAliasError
from shardkit.ring import DEFAULT_VNODES, HashRing

ALIASES = [f"s{i}" for i in range(10)]


def keys_of_every_type(n: int = 400) -> list[object]:
    rnd = random.Random(7)
    out: list[object] = []
    for i in range(n):
        out += [rnd.getrandbits(64) - 2**63, f"user:{i}", rnd.randbytes(8), uuid.UUID(int=rnd.getrandbits(128))]
    return out


@pytest.fixture(params=["ring", "buckets"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make(shards: object, mode: str, **kw: object) -> HashRing:
    if mode == "buckets":
        kw.setdefault("buckets", 4096)
    else:
        kw.setdefault("vnodes", 64)
    return HashRing(shards, mode=mode, **kw)  # type: ignore[arg-type]


def test_basic_api(mode: str, ring_impl: ModuleType) -> None:
    ring = make(["s0", "s1", "s2"], mode)
    assert ring.implementation == ("c" if ring_impl.__name__.endswith("_speedups") else "python")
    assert list(ring) == ["s0", "s1", "s2"]
    assert len(ring) == 3
    assert "s1" in ring and "s9" not in ring and 3 not in ring
    keys = keys_of_every_type(50)
    owners = ring.get_many(keys)
    assert owners == [ring.get(k) for k in keys]
    assert ring.get_many(tuple(keys)) == owners
    assert ring.get_many(iter(keys)) == owners
    assert ring.get_many([]) == []
    assert set(owners) == {"s0", "s1", "s2"}
    assert ring.mode == mode


def test_default_constructor_and_weights() -> None:
    ring = HashRing({"s0": 1, "s1": 2}, vnodes=160)
    assert ring.vnodes == 160
    assert ring.weights == {"s0": 1, "s1": 2}
    assert HashRing(["a"]).vnodes == DEFAULT_VNODES
    assert HashRing(["a"], mode="classic") == HashRing(["a"])
    assert HashRing({"a": 1.0}) == HashRing({"a": 1})


def test_weights_shift_load(mode: str) -> None:
    ring = make({"s0": 1, "s1": 3}, mode, vnodes=DEFAULT_VNODES) if mode == "ring" else make({"s0": 1, "s1": 3}, mode)
    counts = Counter(ring.get_many(range(40_000)))
    assert 2.6 < counts["s1"] / counts["s0"] < 3.4


def test_order_of_shards_does_not_change_a_classic_ring() -> None:
    a = HashRing(ALIASES, vnodes=50)
    b = HashRing(list(reversed(ALIASES)), vnodes=50)
    assert a == b and a.version == b.version
    keys = keys_of_every_type(50)
    assert a.get_many(keys) == b.get_many(keys)


def test_weight_too_big_for_the_ring() -> None:
    with pytest.raises(ConfigError, match="'big'"):
        HashRing({"big": 1.5e300})


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), True, "1", None])
def test_bad_weight(mode: str, weight: object) -> None:
    with pytest.raises(ConfigError) as info:
        make({"bad": weight}, mode)
    assert "bad" in str(info.value) and info.value.alias == "bad"  # type: ignore[attr-defined]
    ring = make(["s0"], mode)
    with pytest.raises(ConfigError, match="'bad'"):
        ring.add("bad", weight=weight)  # type: ignore[arg-type]
    assert list(ring) == ["s0"]


@pytest.mark.parametrize("alias", ["", 3, None])
def test_bad_alias(alias: object) -> None:
    with pytest.raises(ConfigError):
        HashRing([alias])  # type: ignore[list-item]


def test_bad_options() -> None:
    with pytest.raises(ConfigError):
        HashRing(["a"], mode="nope")
    with pytest.raises(ConfigError):
        HashRing(["a"], vnodes=0)
    with pytest.raises(ConfigError):
        HashRing(["a"], mode="buckets", buckets=0)
    with pytest.raises(ConfigError):
        HashRing(["a", "b"], mode="buckets", buckets=1)
    with pytest.raises(ConfigError):
        HashRing("abc")
    with pytest.raises(ConfigError, match="twice"):
        HashRing(["a", "a"])


def test_duplicate_add_and_unknown_remove(mode: str) -> None:
    ring = make(["s0", "s1"], mode)
    with pytest.raises(ConfigError, match="'s0'") as info:
        ring.add("s0")
    assert info.value.alias == "s0"  # type: ignore[attr-defined]
    with pytest.raises(UnknownAliasError, match="'nope'") as info2:
        ring.remove("nope")
    assert info2.value.alias == "nope"  # type: ignore[attr-defined]
    assert isinstance(info2.value, KeyError)


def test_empty_ring() -> None:
    ring = HashRing()
    assert len(ring) == 0 and list(ring) == []
    with pytest.raises(ConfigError, match="no shards"):
        ring.get(1)
    with pytest.raises(ConfigError):
        ring.get_many([1])
    assert ring.get_many([]) == []
    ring.add("s0")
    assert ring.get(1) == "s0"
    ring.remove("s0")
    with pytest.raises(ConfigError):
        ring.get("x")
    with pytest.raises(InvalidKeyError):
        ring.get_many("abc")


def test_last_bucket_shard_cannot_go() -> None:
    ring = HashRing(["s0"], mode="buckets", buckets=16)
    with pytest.raises(ConfigError, match="last shard"):
        ring.remove("s0")
    empty = HashRing(mode="buckets", buckets=16)
    empty.add("x")
    assert empty.get(5) == "x"


def test_add_then_remove_restores_layout(mode: str) -> None:
    ring = make(ALIASES, mode)
    before = ring.copy()
    keys = keys_of_every_type(100)
    owners = ring.get_many(keys)
    ring.add("new", weight=2)
    assert ring != before and ring.version != before.version
    assert ring.generation == 1
    ring.remove("new")
    assert ring.generation == 2
    if mode == "ring":  # the classic ring is a function of the shard set
        assert ring.get_many(keys) == owners
        assert ring == before and ring.version == before.version
    else:  # the bucket table remembers its history, but stays balanced
        counts = Counter(ring._owners)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_classic_add_equals_fresh_build() -> None:
    ring = HashRing(ALIASES, vnodes=100)
    ring.add("s10", weight=0.5)
    ring.remove("s3")
    ring.add("s3")
    fresh = HashRing({**dict.fromkeys(ALIASES, 1), "s10": 0.5}, vnodes=100)
    assert ring == fresh
    assert ring._points == fresh._points
    keys = keys_of_every_type(100)
    assert ring.get_many(keys) == fresh.get_many(keys)


def test_colliding_points_are_ordered_by_alias(monkeypatch: pytest.MonkeyPatch, ring_impl: ModuleType) -> None:
    # force every point onto a few positions: ties are broken by alias, whatever the add order
    from shardkit.ring import _ring

    class Colliding:
        Lookup = ring_impl.Lookup
        encode_key = ring_impl.encode_key

        @staticmethod
        def hash_key(key: object) -> int:
            return ring_impl.hash_key(key) % 4 * 1000

    monkeypatch.setattr(_ring, "_impl", Colliding)
    a = HashRing(["b", "a", "c"], vnodes=3)
    b = HashRing(["c"], vnodes=3)
    b.add("a")
    b.add("b")
    assert [a._slots[o] for o in a._owners] == [b._slots[o] for o in b._owners]
    b.remove("a")
    assert [b._slots[o] for o in b._owners] == [s for s in (a._slots[o] for o in a._owners) if s != "a"]


def test_round_trip_json(mode: str) -> None:
    ring = make({"s0": 1, "s1": 2.5, "s2": 1}, mode)
    ring.add("s3")
    ring.remove("s0")
    data = json.loads(json.dumps(ring.to_dict()))
    again = HashRing.from_dict(data)
    assert again == ring
    assert again.version == ring.version == data["version"]
    assert again.generation == ring.generation == 2
    keys = keys_of_every_type(100)
    assert again.get_many(keys) == ring.get_many(keys)
    assert pickle.loads(pickle.dumps(ring)) == ring
    assert copy.copy(ring) == ring


def test_from_dict_hand_written() -> None:
    ring = HashRing.from_dict({"shards": ["a", "b"]})
    assert ring == HashRing(["a", "b"])
    buckets = HashRing.from_dict({"mode": "buckets", "buckets": 64, "shards": {"a": 1, "b": 3}})
    assert buckets.to_dict()["table"] == [["a", 16], ["b", 48]]


def test_from_dict_rejects_bad_input() -> None:
    good = HashRing(["a", "b"], mode="buckets", buckets=8).to_dict()
    with pytest.raises(ConfigError, match="does not match"):
        HashRing.from_dict({**good, "version": good["version"] + 1})
    with pytest.raises(ConfigError):
        HashRing.from_dict({**good, "table": [["a", 3]]})
    with pytest.raises(UnknownAliasError):
        HashRing.from_dict({**good, "table": [["zz", 8]], "version": None} | {"version": 0})
    with pytest.raises(ConfigError, match="unknown keys"):
        HashRing.from_dict({**good, "extra": 1})
    with pytest.raises(ConfigError):
        HashRing.from_dict({"mode": "ring"})
    with pytest.raises(ConfigError):
        HashRing.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        HashRing.from_dict({"shards": ["a"], "table": []})


def test_version_is_the_same_in_another_process(mode: str) -> None:
    ring = make({"s0": 1, "s1": 2}, mode)
    ring.add("s2")
    code = (
        "import json,sys; from shardkit.ring import HashRing; "
        "r = HashRing.from_dict(json.loads(sys.argv[1])); print(r.version, r.get('k'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ring.to_dict())], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(ring.version), ring.get("k")]
    assert make({"s0": 1, "s1": 2}, mode).version != ring.version


def _array_bytes_per_point(ring: HashRing) -> int:
    return ring._owners.itemsize + (ring._points.itemsize if ring._points is not None else 0)


def test_memory_per_point() -> None:
    ring = HashRing(ALIASES, vnodes=100)
    assert ring.npoints == 1000
    assert _array_bytes_per_point(ring) == 6
    # the C lookup adds its prefix table (at most 4 points per range): at most 2 bytes a point
    assert 6 <= ring.memory_per_point() < 8
    assert HashRing(ALIASES, mode="buckets", buckets=1024).memory_per_point() == 2
    big = HashRing([f"s{i}" for i in range(1000)], vnodes=160)
    assert big.memory_per_point() <= 8


def test_many_aliases_switch_to_wide_owner_slots(ring_impl: ModuleType) -> None:
    ring = HashRing([f"a{i}" for i in range(65536)], vnodes=1)
    assert ring._owners.typecode == "H"
    ring.add("one-more")
    assert ring._owners.typecode == "I"
    assert _array_bytes_per_point(ring) == 8
    assert 8 <= ring.memory_per_point() <= 10.01  # + the prefix table: at most 2 bytes a point
    assert ring.get("x") in ring


# ------------------------------------------------------------- balance / movement
N_KEYS = 200_000


@pytest.fixture(scope="module")
def int_keys() -> list[int]:
    rnd = random.Random(42)
    return [rnd.getrandbits(63) for _ in range(N_KEYS)]


def peak_over_mean(owners: list[str], n: int) -> float:
    return max(Counter(owners).values()) / (len(owners) / n)


def test_classic_balance_with_default_vnodes(int_keys: list[int]) -> None:
    ring = HashRing(ALIASES)
    assert peak_over_mean(ring.get_many(int_keys), 10) <= 1.10


@pytest.mark.parametrize("shards", [10, 100])
def test_bucket_balance(shards: int, int_keys: list[int]) -> None:
    ring = HashRing([f"s{i}" for i in range(shards)], mode="buckets")
    counts = Counter(ring._owners)
    assert max(counts.values()) / (ring.buckets / shards) <= 1.01  # exact share of the hash space
    slack = 1.02 if shards == 10 else 1.10  # plus the sampling noise of 200k keys
    assert peak_over_mean(ring.get_many(int_keys), shards) <= slack


def test_movement_on_add_and_remove(mode: str, int_keys: list[int]) -> None:
    ring = HashRing(ALIASES, mode=mode)
    before = ring.get_many(int_keys)
    ring.add("s10")
    after = ring.get_many(int_keys)
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(b == "s10" for _, b in moved)  # nothing moves between old shards
    assert len(moved) / N_KEYS <= 1.05 / 11 * 1.02  # 2%: sampling noise of 200k keys
    ring.remove("s4")
    final = ring.get_many(int_keys)
    moved = [(a, b) for a, b in zip(after, final, strict=True) if a != b]
    assert all(a == "s4" for a, _ in moved)
    assert len(moved) / N_KEYS <= 1.10 / 11


def test_bucket_history_stays_balanced() -> None:
    ring = HashRing(ALIASES, mode="buckets", buckets=4096)
    for step in range(10, 20):
        ring.add(f"s{step}")
        ring.remove(f"s{step - 10}")
        counts = Counter(ring._owners)
        assert max(counts.values()) - min(counts.values()) <= 1
    ring.add("heavy", weight=3)
    counts = Counter(ring._owners)
    share = 4096 / 13
    assert abs(counts[ring._slot_of["heavy"]] - 3 * share) <= 1


@pytest.mark.parametrize(("value", "expected"), [("python", "python"), ("c", "c"), ("bogus", "ImportError")])
def test_implementation_switch(value: str, expected: str, ring_impl: ModuleType) -> None:
    if ring_impl.__name__.endswith("_lookup_py"):
        pytest.skip("runs once")
    code = (
        "try:\n import shardkit.ring as r; print(r.IMPLEMENTATION, r.HashRing(['a']).implementation)\n"
        "except ImportError as e: print('ImportError', e)"
    )
    env = {**__import__("os").environ, "SHARDKIT_RING_IMPL": value}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[0] == expected
    if expected != "ImportError":
        assert out.split()[1] == expected


def test_asking_for_c_when_it_cannot_load_says_why(ring_impl: ModuleType) -> None:
    if ring_impl.__name__.endswith("_lookup_py"):
        pytest.skip("runs once")
    code = (
        "import sys; sys.modules['shardkit.ring._speedups'] = None\n"
        "try:\n import shardkit.ring\nexcept ImportError as e: print('ImportError', e)"
    )
    env = {**__import__("os").environ, "SHARDKIT_RING_IMPL": "c"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("ImportError SHARDKIT_RING_IMPL=c but the C extension")
    env["SHARDKIT_RING_IMPL"] = ""
    code = code.replace("import shardkit.ring", "import shardkit.ring as r; print(r.IMPLEMENTATION)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "python"
