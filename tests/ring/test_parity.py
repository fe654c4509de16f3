"""C == Python: hypothesis over random keys and random layouts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.errors import InvalidKeyError
from shardkit.ring import INT_MAX, INT_MIN, HashRing, _lookup_py, _ring

from .conftest import c_module


@pytest.fixture(autouse=True)
def ring_impl() -> Iterator[None]:
    """Overrides the parametrized fixture: these tests use both modules at once."""
    c_module()
    yield


KEYS = st.one_of(st.integers(INT_MIN, INT_MAX), st.text(), st.binary(), st.uuids())
BAD = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.integers().filter(lambda i: not INT_MIN <= i <= INT_MAX),
    st.lists(st.integers(), max_size=2),
)
ALIAS = st.text(min_size=1, max_size=12)


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, Any]:
    aliases = draw(st.lists(ALIAS, min_size=1, max_size=12, unique=True))
    weighted = draw(st.booleans())
    shards: Any = {a: draw(st.sampled_from([1, 2, 3, 0.5, 1.25])) for a in aliases} if weighted else aliases
    if draw(st.booleans()):
        return {"shards": shards, "mode": "ring", "vnodes": draw(st.integers(1, 300))}
    return {"shards": shards, "mode": "buckets", "buckets": draw(st.integers(len(aliases) + 4, 5000))}


def build(impl: Any, layout: dict[str, Any], ops: list[tuple[str, str]]) -> HashRing:
    saved = _ring._impl
    _ring._impl = impl
    try:
        ring = HashRing(**layout)
        for op, alias in ops:
            if op == "add" and alias not in ring:
                ring.add(alias)
            elif op == "remove" and alias in ring and len(ring) > 1:
                ring.remove(alias)
        return ring
    finally:
        _ring._impl = saved


OPS = st.lists(st.tuples(st.sampled_from(["add", "remove"]), ALIAS), max_size=4)


@settings(max_examples=80, deadline=None)
@given(layouts(), OPS, st.lists(KEYS, max_size=40))
def test_c_equals_python(layout: dict[str, Any], ops: list[tuple[str, str]], keys: list[Any]) -> None:
    py = build(_lookup_py, layout, ops)
    c = build(c_module(), layout, ops)
    assert c == py and c.version == py.version
    expected = [py.get(k) for k in keys]
    assert [c.get(k) for k in keys] == expected
    assert c.get_many(keys) == expected == py.get_many(keys)
    assert c.get_many(tuple(keys)) == expected
    assert [c.owner_index(k) for k in keys] == [py.owner_index(k) for k in keys]


@settings(max_examples=150, deadline=None)
@given(BAD)
def test_c_refuses_what_python_refuses(key: Any) -> None:
    c = build(c_module(), {"shards": ["a", "b"]}, [])
    py = build(_lookup_py, {"shards": ["a", "b"]}, [])
    with pytest.raises(InvalidKeyError) as ce:
        c.get(key)
    with pytest.raises(InvalidKeyError) as pe:
        py.get(key)
    assert str(ce.value) == str(pe.value)
    with pytest.raises(InvalidKeyError):
        c.get_many(["ok", key])
