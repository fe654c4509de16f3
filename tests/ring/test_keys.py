"""The canonical key encoding and its hash (the specification in _keys.py)."""

from __future__ import annotations

import enum
import math
import uuid
from types import ModuleType

import mmh3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardkit.ring as ring_pkg
from shardkit.errors import InvalidKeyError
from shardkit.ring import INT_MAX, INT_MIN, HashRing, _keys


class Color(enum.IntEnum):
    RED = 7


class MyStr(str):
    def __str__(self) -> str:  # must not change the encoding
        return "other"


KEYS = st.one_of(
    st.integers(INT_MIN, INT_MAX),
    st.text(),
    st.binary(),
    st.uuids(),
)

VECTORS = [
    (0, "010000000000000000"),
    (1, "010000000000000001"),
    (-1, "01ffffffffffffffff"),
    (INT_MAX, "017fffffffffffffff"),
    (INT_MIN, "018000000000000000"),
    ("", "02"),
    ("1", "0231"),
    ("é", "02c3a9"),
    ("😀", "02f09f9880"),
    (b"", "03"),
    (b"1", "0331"),
    (uuid.UUID(int=1), "04" + "00" * 15 + "01"),
    (Color.RED, "010000000000000007"),
    (MyStr("ab"), "026162"),
]


@pytest.mark.parametrize(("key", "hexed"), VECTORS)
def test_encoding_vectors(ring_impl: ModuleType, key: object, hexed: str) -> None:
    assert ring_impl.encode_key(key).hex() == hexed
    assert ring_impl.hash_key(key) == mmh3.hash(bytes.fromhex(hexed), 0, signed=False)


def test_type_tags_separate_equal_looking_keys(ring_impl: ModuleType) -> None:
    encoded = {ring_impl.encode_key(k) for k in (1, "1", b"1")}
    assert len(encoded) == 3


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(KEYS)
def test_hash_is_mmh3_of_the_encoding(ring_impl: ModuleType, key: object) -> None:
    data = ring_impl.encode_key(key)
    assert data == _keys.encode_key(key)
    assert ring_impl.hash_key(key) == mmh3.hash(data, 0, signed=False) == _keys.hash_key(key)


BAD_KEYS = [
    None,
    True,
    False,
    1.0,
    math.nan,
    math.inf,
    INT_MAX + 1,
    INT_MIN - 1,
    2**100,
    "\ud800",
    bytearray(b"x"),
    memoryview(b"x"),
    [1],
    (1,),
    {"a": 1},
    object(),
    complex(1, 2),
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: type(k).__name__)
def test_bad_keys_raise_invalid_key_error(ring_impl: ModuleType, key: object) -> None:
    ring = HashRing(["s0", "s1"])
    for call in (ring_impl.encode_key, ring_impl.hash_key, ring.get, lambda k: ring.get_many([1, k])):
        with pytest.raises(InvalidKeyError) as info:
            call(key)
        assert info.value.key is key
        assert isinstance(info.value, TypeError)
        assert type(key).__qualname__ in str(info.value)
        assert repr(key)[:50] in str(info.value)


def test_bad_key_message_is_the_same_in_both_implementations(ring_impl: ModuleType) -> None:
    for key in BAD_KEYS:
        with pytest.raises(InvalidKeyError) as spec:
            _keys.encode_key(key)
        with pytest.raises(InvalidKeyError) as impl:
            ring_impl.hash_key(key)
        assert str(impl.value) == str(spec.value)


def test_long_key_repr_is_truncated() -> None:
    with pytest.raises(InvalidKeyError) as info:
        _keys.encode_key(bytearray(1000))
    assert len(str(info.value)) < 400


def test_get_many_refuses_a_single_string(ring_impl: ModuleType) -> None:
    ring = HashRing(["s0"])
    for keys in ("abc", b"abc"):
        with pytest.raises(InvalidKeyError):
            ring.get_many(keys)


def test_public_encode_key_matches_spec() -> None:
    assert ring_pkg.encode_key("x") == _keys.encode_key("x")
    assert ring_pkg.hash_key(5) == _keys.hash_key(5)
    assert ring_pkg.IMPLEMENTATION in ("c", "python")
