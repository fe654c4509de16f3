"""The plan's "moving hash space" (shardkit.ring._layout) against the rings' own answers."""

from __future__ import annotations

import re
from bisect import bisect_right
from itertools import pairwise

import pytest

from shardkit import HashRing
from shardkit.ring import hash_key
from shardkit.ring._layout import HASH_SPACE, describe_movement, hash_ranges, pieces


@pytest.mark.parametrize("mode", ["ring", "buckets"])
def test_pieces_cover_the_hash_space_with_both_owners(mode: str) -> None:
    make = (
        (lambda s: HashRing(s, mode="buckets", buckets=300))
        if mode == "buckets"
        else (lambda s: HashRing(s, vnodes=40))
    )
    old, new = make(["a", "b", "c"]), make(["a", "b", "c", "d"])
    parts = list(pieces(old, new))
    assert parts[0][0] == 0 and parts[-1][1] == HASH_SPACE - 1
    assert all(p[1] + 1 == q[0] for p, q in pairwise(parts))
    starts = [p[0] for p in parts]
    for key in range(3000):
        at = bisect_right(starts, hash_key(key)) - 1
        assert parts[at][2:] == (old.get(key), new.get(key)), key


def test_movement_of_the_classic_ring_counts_arcs_and_width() -> None:
    old, new = HashRing(["a", "b", "c"], vnodes=50), HashRing(["a", "b", "c", "d"], vnodes=50)
    moving = hash_ranges(old, new, lambda o, n: o != n)
    text = describe_movement(old, new)
    arcs, pct = re.fullmatch(r"(\d+) arcs, ([\d.]+)% of the ring", text).groups()  # type: ignore[union-attr]
    wraps = len(moving) > 1 and moving[0][0] == 0 and moving[-1][1] == HASH_SPACE - 1
    assert int(arcs) == len(moving) - wraps
    width = sum(hi - lo + 1 for lo, hi in moving)
    assert float(pct) == round(100.0 * width / HASH_SPACE, 2)
    keys = range(20_000)
    share = sum(old.get(k) != new.get(k) for k in keys) / len(keys)
    assert abs(share - width / HASH_SPACE) < 0.02
    assert describe_movement(old, old) == "0 arcs, 0.00% of the ring"


def test_movement_between_modes_rehashes_everything() -> None:
    assert "every key" in describe_movement(HashRing(["a"]), HashRing(["a"], mode="buckets"))
