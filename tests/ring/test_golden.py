"""Stability: committed golden vectors (key -> alias) for fixed layouts, both implementations."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import mmh3
import pytest

from shardkit.ring import HashRing

from .make_golden import layouts, load_key

GOLDEN = json.loads((Path(__file__).parent / "golden.json").read_text(encoding="utf-8"))
KEYS = [load_key(item) for item in GOLDEN["keys"]]


def test_golden_has_every_key_type() -> None:
    assert {item[0] for item in GOLDEN["keys"]} == {"int", "str", "bytes", "uuid"}
    assert len(KEYS) >= 300


def test_encoding_and_hash_are_stable(ring_impl: ModuleType) -> None:
    assert [ring_impl.encode_key(k).hex() for k in KEYS] == GOLDEN["encoded"]
    assert [ring_impl.hash_key(k) for k in KEYS] == GOLDEN["hashes"]
    assert [mmh3.hash(bytes.fromhex(e), 0, signed=False) for e in GOLDEN["encoded"]] == GOLDEN["hashes"]


@pytest.mark.parametrize("name", sorted(GOLDEN["layouts"]))
def test_owners_are_stable(name: str) -> None:
    entry: dict[str, Any] = GOLDEN["layouts"][name]
    ring = HashRing.from_dict(entry["ring"])
    assert ring.get_many(KEYS) == entry["owners"]
    assert [ring.get(k) for k in KEYS] == entry["owners"]


@pytest.mark.parametrize("name", sorted(GOLDEN["layouts"]))
def test_layouts_rebuild_to_the_same_version(name: str) -> None:
    # the same constructor calls and history give the committed layout and version
    ring = layouts()[name]
    assert ring.to_dict() == GOLDEN["layouts"][name]["ring"]
