"""Exact arithmetic on a ring layout: each shard's share of the key space, and what moves.

Everything here is derived from the layout as docs/ring.md specifies it, through
the ring's public API only (``weights``, ``vnodes``, ``buckets``, ``to_dict()``
and :func:`shardkit.ring.hash_key`):

* classic ring: point ``i`` of alias ``a`` sits at ``hash_key(f"{a}#{i}")``;
  a hash belongs to the first point at or after it (wrapping), ties by alias.
  A shard's exact share is the total length of the arcs that end at its points.
* buckets: ``bucket = hash * buckets >> 32``; the table (``to_dict()["table"]``)
  gives each bucket's owner, so a share is a count of buckets.

The tests check these against ``ring.get`` key by key.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from fractions import Fraction

from ..ring import HashRing, hash_key

__all__ = [
    "HASH_SPACE",
    "bucket_ranges",
    "bucket_table",
    "exact_movement",
    "exact_shares",
    "ideal_shares",
    "layout_points",
    "owner_of_hash",
    "units",
]

HASH_SPACE = 1 << 32


def layout_points(ring: HashRing) -> tuple[list[int], list[str]]:
    """The classic ring's sorted points and their owners (ties ordered by alias)."""
    entries = sorted(
        (hash_key(f"{alias}#{i}"), alias)
        for alias, weight in ring.weights.items()
        for i in range(max(1, round(ring.vnodes * weight)))
    )
    return [h for h, _ in entries], [a for _, a in entries]


def bucket_table(ring: HashRing) -> list[str]:
    """Bucket number -> owner, from the run-length table of ``to_dict()``."""
    table: list[str] = []
    for alias, count in ring.to_dict()["table"]:
        table.extend([alias] * count)
    return table


def units(ring: HashRing) -> dict[str, int]:
    """Ring points (classic) or buckets (buckets mode) per shard."""
    if ring.mode == "buckets":
        counts = Counter(bucket_table(ring))
        return {alias: counts.get(alias, 0) for alias in ring.weights}
    return {alias: max(1, round(ring.vnodes * w)) for alias, w in ring.weights.items()}


def ideal_shares(weights: dict[str, int | float]) -> dict[str, Fraction]:
    """Each shard's weight over the total weight."""
    total = sum(Fraction(w) for w in weights.values())
    return {alias: Fraction(w) / total for alias, w in weights.items()}


def owner_of_hash(points: list[int], owners: list[str], h: int) -> str:
    """The owner of hash ``h`` on a classic ring given by :func:`layout_points`."""
    pos = bisect_left(points, h)
    return owners[pos if pos < len(points) else 0]


def _arcs(points: list[int], owners: list[str]) -> Counter[str]:
    arcs: Counter[str] = Counter()
    if not points:
        return arcs
    arcs[owners[0]] += points[0] + 1 + (HASH_SPACE - 1 - points[-1])
    for k in range(1, len(points)):
        arcs[owners[k]] += points[k] - points[k - 1]
    return arcs


def exact_shares(ring: HashRing) -> dict[str, Fraction]:
    """Each shard's exact share of the hash space (sums to 1)."""
    if not len(ring):
        return {}
    if ring.mode == "buckets":
        counts = units(ring)
        return {alias: Fraction(n, ring.buckets) for alias, n in counts.items()}
    arcs = _arcs(*layout_points(ring))
    return {alias: Fraction(arcs.get(alias, 0), HASH_SPACE) for alias in ring.weights}


def exact_movement(
    old: HashRing, new: HashRing
) -> tuple[dict[tuple[str, str], Fraction], dict[tuple[str, str], list[int]]]:
    """What moves from ``old`` to ``new``: ``(from, to) -> share of the hash space``,
    and for buckets mode ``(from, to) -> bucket numbers`` (empty for the classic ring)."""
    moves: Counter[tuple[str, str]] = Counter()
    buckets: dict[tuple[str, str], list[int]] = {}
    if old.mode == "buckets":
        before, after = bucket_table(old), bucket_table(new)
        for bucket, (a, b) in enumerate(zip(before, after, strict=True)):
            if a != b:
                buckets.setdefault((a, b), []).append(bucket)
        return {pair: Fraction(len(bs), old.buckets) for pair, bs in buckets.items()}, buckets
    old_points, old_owners = layout_points(old)
    new_points, new_owners = layout_points(new)
    if not old_points or not new_points:
        return {}, {}
    cuts = sorted(set(old_points) | set(new_points))
    # every hash in (cuts[j-1], cuts[j]] has one owner before and one after; the wrap
    # interval (cuts[-1], 2**32) + [0, cuts[0]] belongs to the first point of each layout
    prev = cuts[-1] - HASH_SPACE
    for cut in cuts:
        a = owner_of_hash(old_points, old_owners, cut)
        b = owner_of_hash(new_points, new_owners, cut)
        if a != b:
            moves[a, b] += cut - prev
        prev = cut
    return {pair: Fraction(n, HASH_SPACE) for pair, n in moves.items()}, buckets


def bucket_ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted bucket numbers as inclusive ``(first, last)`` runs."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs
