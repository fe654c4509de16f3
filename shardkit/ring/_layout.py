"""Exact arithmetic on a ring layout: who owns which hash range, each shard's share, what moves.

One home for the layout arithmetic that ``shardkit ring`` prints and the resharder uses
(its plan's "moving hash space", the hash ranges its database fence refuses).  The
layout is read from the ring's own arrays (:func:`_arrays`, the one place that does), as
docs/ring.md specifies it:

* classic ring: point ``i`` of alias ``a`` sits at ``hash_key(f"{a}#{i}")``; a hash
  belongs to the first point at or after it (wrapping), ties by alias.  A shard's exact
  share is the total length of the arcs that end at its points.
* buckets: ``bucket = hash * buckets >> 32``; the table gives each bucket's owner, so a
  share is a count of buckets.

Either way the 32-bit hash space is a list of *runs*: ``starts[i]`` is the first hash of a
run over which one alias owns every hash (:func:`runs`).  Two layouts compared run by run
(:func:`pieces`) give what moves between them.  The tests check all of this against
``ring.get`` key by key.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from fractions import Fraction
from math import sqrt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._ring import HashRing

__all__ = [
    "HASH_SPACE",
    "balance",
    "bucket_ranges",
    "bucket_table",
    "describe_movement",
    "exact_movement",
    "exact_shares",
    "hash_ranges",
    "ideal_shares",
    "layout_points",
    "memory",
    "movement_on_add",
    "movement_on_remove",
    "owner_of_hash",
    "pieces",
    "runs",
    "units",
]

HASH_SPACE = 1 << 32


def _arrays(ring: HashRing) -> tuple[list[int] | None, list[str]]:
    """(the classic ring's sorted points or ``None`` in buckets mode, the owner of each point or
    bucket): the ring's private arrays, read here only."""
    slots = ring._slots
    points = ring._points
    return (None if points is None else list(points)), [slots[o] or "" for o in ring._owners]


def layout_points(ring: HashRing) -> tuple[list[int], list[str]]:
    """The classic ring's sorted points and their owners (ties ordered by alias)."""
    points, owners = _arrays(ring)
    return (points or []), (owners if points is not None else [])


def bucket_table(ring: HashRing) -> list[str]:
    """Bucket number -> owner (buckets mode)."""
    points, owners = _arrays(ring)
    return owners if points is None else []


def runs(ring: HashRing) -> tuple[list[int], list[str]]:
    """The hash space as runs of one owner: ``(starts, owners)``, ``starts[0] == 0``; run ``i``
    is ``[starts[i], starts[i + 1] - 1]`` (the last one ends at ``HASH_SPACE - 1``)."""
    if not len(ring):
        return [], []
    points, owners = _arrays(ring)
    if points is None:  # bucket b starts at the first hash h with h * n >> 32 == b
        n = len(owners)
        return [-(-b * HASH_SPACE // n) for b in range(n)], owners
    starts, out = [0], [owners[0]]  # (p[-1], 2**32) and [0, p[0]] belong to the first point
    for k in range(1, len(points)):
        starts.append(points[k - 1] + 1)
        out.append(owners[k])
    if points[-1] + 1 < HASH_SPACE:
        starts.append(points[-1] + 1)
        out.append(owners[0])
    return starts, out


def pieces(old: HashRing, new: HashRing) -> Iterator[tuple[int, int, str, str]]:
    """``(first, last, old owner, new owner)`` of every hash range over which neither layout
    changes owner, in hash order, covering the whole hash space (nothing for an empty ring)."""
    s1, o1 = runs(old)
    s2, o2 = runs(new)
    if not s1 or not s2:
        return
    i = j = 0
    start = 0
    while start < HASH_SPACE:
        end1 = s1[i + 1] if i + 1 < len(s1) else HASH_SPACE
        end2 = s2[j + 1] if j + 1 < len(s2) else HASH_SPACE
        end = min(end1, end2)
        yield start, end - 1, o1[i], o2[j]
        if end == end1:
            i += 1
        if end == end2:
            j += 1
        start = end


def hash_ranges(old: HashRing, new: HashRing, keep: Callable[[str, str], bool]) -> list[tuple[int, int]]:
    """The closed hash ranges ``[first, last]`` (adjacent ones joined) where ``keep(old owner,
    new owner)`` is true; e.g. ``keep=str.__ne__``: every hash that changes owner."""
    out: list[tuple[int, int]] = []
    for first, last, a, b in pieces(old, new):
        if keep(a, b):
            _join(out, first, last)
    return out


def _join(out: list[tuple[int, int]], first: int, last: int) -> None:
    """Append the range ``[first, last]`` to ``out``, joined to the last one when adjacent."""
    if out and out[-1][1] == first - 1:
        out[-1] = (out[-1][0], last)
    else:
        out.append((first, last))


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


def exact_shares(ring: HashRing) -> dict[str, Fraction]:
    """Each shard's exact share of the hash space (sums to 1)."""
    if not len(ring):
        return {}
    if ring.mode == "buckets":
        counts = units(ring)
        return {alias: Fraction(n, ring.buckets) for alias, n in counts.items()}
    starts, owners = runs(ring)
    arcs: Counter[str] = Counter()
    for k, (start, alias) in enumerate(zip(starts, owners, strict=True)):
        arcs[alias] += (starts[k + 1] if k + 1 < len(starts) else HASH_SPACE) - start
    return {alias: Fraction(arcs.get(alias, 0), HASH_SPACE) for alias in ring.weights}


def exact_movement(
    old: HashRing, new: HashRing
) -> tuple[dict[tuple[str, str], Fraction], dict[tuple[str, str], list[int]]]:
    """What moves from ``old`` to ``new``: ``(from, to) -> share of the hash space``,
    and for buckets mode ``(from, to) -> bucket numbers`` (empty for the classic ring)."""
    buckets: dict[tuple[str, str], list[int]] = {}
    if old.mode == "buckets":
        for bucket, (a, b) in enumerate(zip(bucket_table(old), bucket_table(new), strict=True)):
            if a != b:
                buckets.setdefault((a, b), []).append(bucket)
        return {pair: Fraction(len(bs), old.buckets) for pair, bs in buckets.items()}, buckets
    moves: Counter[tuple[str, str]] = Counter()
    for first, last, a, b in pieces(old, new):
        if a != b:
            moves[a, b] += last - first + 1
    return {pair: Fraction(n, HASH_SPACE) for pair, n in moves.items()}, buckets


def describe_movement(old: HashRing, new: HashRing) -> str:
    """The hash space that changes owner, in words: buckets, or arcs of the ring."""
    if old.mode == "buckets" and new.mode == "buckets" and old.buckets == new.buckets:
        moved = sum(1 for a, b in zip(bucket_table(old), bucket_table(new), strict=True) if a != b)
        return f"{moved} of {old.buckets} buckets ({100.0 * moved / old.buckets:.2f}%)"
    if old.mode == "ring" and new.mode == "ring" and len(old) and len(new):
        arcs = hash_ranges(old, new, str.__ne__)
        if len(arcs) > 1 and arcs[0][0] == 0 and arcs[-1][1] == HASH_SPACE - 1:
            arcs = [*arcs[1:-1], (arcs[-1][0], arcs[0][1] + HASH_SPACE)]  # one arc across the wrap
        width = sum(last - first + 1 for first, last in arcs)
        return f"{len(arcs)} arcs, {100.0 * width / HASH_SPACE:.2f}% of the ring"
    return "every key is re-hashed (the ring mode or bucket count changed)"


def bucket_ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted bucket numbers as inclusive ``(first, last)`` runs."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        _join(out, n, n)
    return out


def balance(loads: Mapping[str, Any], weights: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """``(peak / mean, coefficient of variation)`` of per-shard loads (key counts, or shares).

    With ``weights``, each load is first divided by the shard's ideal share, so a shard of
    weight 2 carrying twice the keys counts as balanced; ``(0.0, 0.0)`` for no load at all.
    The coefficient of variation is the population standard deviation over the mean."""
    if not loads:
        return 0.0, 0.0
    ideal = ideal_shares(dict(weights)) if weights else None
    values = [float(Fraction(v) / ideal[a]) if ideal else float(v) for a, v in loads.items()]
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0, 0.0
    cv = sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean
    return max(values) / mean, cv


def movement_on_add(ring: HashRing, alias: str, weight: int | float = 1) -> tuple[HashRing, Fraction, Fraction]:
    """``(the ring after adding alias, exact share of the hash space that moves, ideal share)``;
    the ideal is the new shard's weight over the new total weight (``1/(n+1)`` for equal weights)."""
    new = ring.copy()
    new.add(alias, weight)
    moved = sum(exact_movement(ring, new)[0].values(), Fraction(0))
    return new, moved, ideal_shares(new.weights)[alias]


def movement_on_remove(ring: HashRing, alias: str) -> tuple[HashRing, Fraction, Fraction]:
    """``(the ring after removing alias, exact share of the hash space that moves, ideal share)``;
    the ideal is the removed shard's weight over the old total weight."""
    new = ring.copy()
    new.remove(alias)
    moved = sum(exact_movement(ring, new)[0].values(), Fraction(0))
    return new, moved, ideal_shares(ring.weights)[alias]


def memory(ring: HashRing) -> dict[str, Any]:
    """The ring's own memory accounting: lookup entries (points or buckets), their bytes, bytes per entry."""
    return {"entries": ring.npoints, "bytes": ring.nbytes, "bytes_per_entry": ring.memory_per_point()}
