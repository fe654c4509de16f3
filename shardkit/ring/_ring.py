"""HashRing: which shard owns a key, in two layouts, with add/remove and (de)serialization.

The ring knows nothing of SQLAlchemy: it maps shard keys (int, str, bytes,
uuid.UUID; encoded as specified in :mod:`shardkit.ring._keys`) to aliases.

Two modes
---------
``mode="ring"`` (the default) is the classic consistent-hash ring: each alias
puts ``round(vnodes * weight)`` points (at least one) on a 32-bit circle; the
point of alias ``a`` number ``i`` sits at ``hash_key(f"{a}#{i}")``.  A key
belongs to the first point at or after its hash (wrapping around).  Points
with equal positions are ordered by alias, so the layout depends only on the
aliases, their weights and ``vnodes``, never on the order they were added.

``mode="buckets"`` splits the 32-bit hash space into ``buckets`` equal ranges
(``bucket = hash * buckets >> 32``) and keeps a bucket -> alias table.  A
fresh table gives each alias its largest-remainder share of buckets (ties by
alias) as contiguous blocks in alias order.  ``add`` takes buckets only from
the shards most above their new fair share (evenly spaced within each donor)
and ``remove`` hands the removed shard's buckets, in bucket order, to the
shards most below theirs; so only the minimum number of buckets move and no
bucket moves between two shards that stay.  The table depends on the history
of adds and removes, so it is part of the layout and of :meth:`to_dict`.

Versions
--------
``version`` is a content hash of the canonical layout (a 53-bit int, safe in
JSON for every language): equal layouts have equal versions in every process,
a changed layout a different one.  ``generation`` counts the adds and removes
since the first layout; it orders layouts during a reshard but is not part of
equality or of ``version``.

Thread safety: lookups may run while another thread calls ``add``/``remove``;
they see either the old or the new layout (a mutation builds new arrays and
swaps them in).  Mutations themselves must not run concurrently.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeAlias

from ..errors import ConfigError, UnknownAliasError
from . import _keys, _lookup_py

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_VNODES",
    "IMPLEMENTATION",
    "MAX_ALIAS_LENGTH",
    "MAX_BUCKETS",
    "MAX_POINTS",
    "MAX_SHARDS",
    "HashRing",
    "Weight",
]

logger = logging.getLogger(__name__)

Weight: TypeAlias = "int | float"

DEFAULT_VNODES = 1024
"""Virtual nodes per unit of weight: peak/mean load <= 1.10 at 10 shards (measured, see docs/ring.md)."""

DEFAULT_BUCKETS = 65536
"""Logical buckets in ``mode="buckets"``: within 1% of perfect balance up to ~650 equal shards."""

# Limits, checked before anything is allocated, so that a small hostile layout (63 bytes of JSON
# giving two shards weight 16 at 65536 vnodes, a few KB naming 300 shards x 65536 vnodes, runs of
# 2**24 buckets each) is refused in well under a millisecond instead of allocating.  Each is set
# just above what a real cluster needs, because every process that follows a stored ring
# rebuilds it on each change:
# * points: vnodes x weight, summed over the shards ("weight" multiplies the vnodes: a shard of
#   weight 2 gets 2 x vnodes points).  1000 shards x the default 1024 vnodes (1,024,000 points)
#   fit; a ring at the limit builds in about 1 s and 40 MB of transient memory, the most a layout
#   that is accepted can cost (half of what the old limit of 2**21 points allowed).
# * buckets: 2**20 is 100 buckets (1% balance) for each of 10,000 shards; a table that size
#   builds in tens of milliseconds.
# * shards: 131,072 (more than 65,536 switches owner slots to 32 bits); their cost grows with the
#   size of the layout that names them, not out of proportion to it.
MAX_VNODES = 1 << 16
MAX_POINTS = 1 << 20
MAX_POINTS_PER_ALIAS = MAX_POINTS
MAX_BUCKETS = 1 << 20
MAX_SHARDS = 1 << 17
MAX_ALIAS_LENGTH = 255
_MAX_SLOTS_H = 1 << 16  # owner slots that fit in array('H')

_SPEC = "shardkit-ring/1"
_MODE_NAMES = {"ring": "ring", "classic": "ring", "buckets": "buckets"}

Mode: TypeAlias = Literal["ring", "buckets"]


# --------------------------------------------------------------- implementation switch
def _load_implementation() -> tuple[ModuleType, str]:
    """Pick the lookup module from ``SHARDKIT_RING_IMPL`` (``c``, ``python`` or unset)."""
    choice = os.environ.get("SHARDKIT_RING_IMPL", "").strip().lower()
    if choice == "python":
        return _lookup_py, "python"
    if choice not in ("", "c"):
        raise ImportError(f"SHARDKIT_RING_IMPL must be 'c' or 'python', not {choice!r}")
    try:
        from . import _speedups  # type: ignore[attr-defined, unused-ignore]
    except ImportError as exc:
        if choice == "c":
            raise ImportError(
                "SHARDKIT_RING_IMPL=c but the C extension shardkit.ring._speedups cannot be imported "
                f"({exc}); build it with `pip install -e .` or `python setup.py build_ext --inplace` "
                "(needs a C compiler), or unset SHARDKIT_RING_IMPL to use the pure-Python ring"
            ) from exc
        here = Path(__file__).parent
        built = any(here.glob("_speedups*.so")) or any(here.glob("_speedups*.pyd"))
        log = logger.warning if built else logger.info
        log(
            "shardkit.ring: the C speedups %s (%s); using the pure-Python ring lookup",
            "are present but do not load" if built else "are not built",
            exc,
        )
        return _lookup_py, "python"
    return _speedups, "c"


_impl, IMPLEMENTATION = _load_implementation()


# --------------------------------------------------------------------------- helpers
def _check_alias(alias: object) -> str:
    if not isinstance(alias, str) or not alias:
        raise ConfigError(f"a shard alias must be a non-empty str, not {alias!r:.80}", alias=alias)
    if len(alias) > MAX_ALIAS_LENGTH:
        raise ConfigError(
            f"a shard alias is {len(alias)} characters long ({alias[:40]!r}...); the limit is {MAX_ALIAS_LENGTH}",
            alias=alias[:40],
            limit=MAX_ALIAS_LENGTH,
        )
    return alias


def _check_table_size(runs: Sequence[Any], nbuckets: int) -> None:
    """Refuse a run-length table that covers more than ``nbuckets`` (before building anything)."""
    if len(runs) > nbuckets:
        raise ConfigError(f"'table' has {len(runs)} runs, more than its {nbuckets} buckets", buckets=nbuckets)
    total = 0
    for run in runs:
        count = run[1] if isinstance(run, list | tuple) and len(run) == 2 else None
        if isinstance(count, int) and not isinstance(count, bool):
            total += count
            if total > nbuckets:
                raise ConfigError(f"'table' covers more than its {nbuckets} buckets", buckets=nbuckets)


def _check_shard_count(count: int) -> None:
    if count > MAX_SHARDS:
        raise ConfigError(f"{count} shards are too many for one ring; the limit is {MAX_SHARDS}", limit=MAX_SHARDS)


def _check_weight(alias: str, weight: object) -> Weight:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ConfigError(
            f"weight of shard {alias!r} must be a positive int or float, not {weight!r}",
            alias=alias,
            weight=weight,
        )
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(
            f"weight of shard {alias!r} must be positive and finite, not {weight!r}",
            alias=alias,
            weight=weight,
        )
    # canonical form: an integral float is stored as int, so 1 and 1.0 are one layout
    if isinstance(weight, float) and weight.is_integer():
        return int(weight)
    return weight


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in [{low}, {high}], not {value!r:.80}", **{name: value})
    return value


def _largest_remainder(total: int, weights: Mapping[str, Weight]) -> dict[str, int]:
    """Split ``total`` units in proportion to ``weights``; ties by alias."""
    wsum = sum(Fraction(w) for w in weights.values())
    shares = {a: total * Fraction(w) / wsum for a, w in weights.items()}
    quotas = {a: math.floor(s) for a, s in shares.items()}
    left = total - sum(quotas.values())
    for a in sorted(shares, key=lambda a: (-(shares[a] - quotas[a]), a))[:left]:
        quotas[a] += 1
    return quotas


def _spread(count: int, take: int) -> list[int]:
    """``take`` evenly spaced distinct positions out of ``range(count)``."""
    return [((2 * j + 1) * count) // (2 * take) for j in range(take)]


class HashRing:
    """Consistent hashing of shard keys to shard aliases.

    :param shards: aliases (each of weight 1), or a mapping alias -> weight
        (a positive int or float; a shard of weight 2 owns twice the keys).
    :param vnodes: ``mode="ring"``: points per unit of weight (default
        :data:`DEFAULT_VNODES`).  More points, better balance, bigger ring.
    :param mode: ``"ring"`` (classic consistent hashing with virtual nodes;
        ``"classic"`` is accepted as a synonym) or ``"buckets"`` (a fixed
        number of logical buckets and a bucket -> alias table: near-perfect
        balance, minimal movement).
    :param buckets: ``mode="buckets"``: the number of logical buckets (default
        :data:`DEFAULT_BUCKETS`); choose at least 100 x the most shards you
        will ever run for 1% balance.  Fixed for the life of the ring.
    :raises ConfigError: bad alias, weight, vnodes, buckets or mode.

    >>> ring = HashRing(["s0", "s1", "s2"])
    >>> ring.get(42) in ring
    True
    >>> HashRing({"s0": 1, "s1": 2}, vnodes=160).get_many(["a", "b"])  # doctest: +SKIP
    ['s1', 's0']
    >>> HashRing([f"s{i}" for i in range(10)], mode="buckets", buckets=4096)  # doctest: +SKIP
    """

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(
        self,
        shards: Iterable[str] | Mapping[str, Weight] = (),
        *,
        vnodes: int = DEFAULT_VNODES,
        mode: str = "ring",
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        if not isinstance(mode, str) or mode not in _MODE_NAMES:
            raise ConfigError(f"mode must be 'ring' or 'buckets', not {mode!r:.80}", mode=mode)
        self._mode: Mode = "ring" if _MODE_NAMES[mode] == "ring" else "buckets"
        self._vnodes = _check_int("vnodes", vnodes, 1, MAX_VNODES)
        self._nbuckets = _check_int("buckets", buckets, 1, MAX_BUCKETS)
        self._impl = _impl
        self._generation = 0
        self._version: int | None = None
        weights: dict[str, Weight] = {}
        if isinstance(shards, str | bytes):
            raise ConfigError("shards must be a collection of aliases, not a single str", shards=shards)
        if isinstance(shards, Sized):
            _check_shard_count(len(shards))  # before looking at any of them
        items: Iterable[tuple[Any, Any]] = shards.items() if isinstance(shards, Mapping) else ((a, 1) for a in shards)
        for alias, weight in items:
            alias = _check_alias(alias)
            if alias in weights:
                raise ConfigError(f"shard {alias!r} is listed twice", alias=alias)
            weights[alias] = _check_weight(alias, weight)
            if len(weights) > MAX_SHARDS:  # an iterator of unknown length
                _check_shard_count(len(weights))
        self._weights = weights
        self._slots: list[str | None] = list(weights)
        self._slot_of = {a: i for i, a in enumerate(self._slots)}
        self._points: array[int] | None = None
        self._owners: array[int] = array(self._owner_typecode())
        if self._mode == "ring":
            total = sum(self._npoints(alias, weight) for alias, weight in weights.items())
            self._check_total_points(total)  # validate before the work
            # sorted by (position, alias), as plain ints: the position above the alias's rank
            # (sorting ints is about 3x faster than sorting (position, alias) tuples)
            order = sorted(weights)
            bits = max(1, (len(order) - 1).bit_length())
            mask = (1 << bits) - 1
            packed: list[int] = []
            for rank, alias in enumerate(order):
                packed.extend([(h << bits) | rank for h in self._point_hashes(alias, weights[alias])])
            packed.sort()
            slot_of_rank = [self._slot_of[a] for a in order]
            # straight into the arrays (no second list of Python ints: half the transient memory)
            self._points = array("I", map(bits.__rrshift__, packed))
            self._owners = array(self._owner_typecode(), map(slot_of_rank.__getitem__, map(mask.__and__, packed)))
            del packed
        else:
            if weights and len(weights) > self._nbuckets:
                raise ConfigError(
                    f"{len(weights)} shards do not fit in {self._nbuckets} buckets", buckets=self._nbuckets
                )
            self._owners = self._fresh_table()
        self._install()

    # ------------------------------------------------------------------ lookups
    def get(self, key: Any) -> str:
        """Return the alias that owns ``key``.

        (Each ring replaces this method by its implementation's bound
        ``Lookup.get``, so a lookup is a single C call.)

        :param key: int (signed 64-bit), str, bytes or uuid.UUID.
        :raises InvalidKeyError: for any other key (``None``, bool, float ...).
        :raises ConfigError: when the ring has no shards.
        """
        if self._lookup is None:  # pragma: no cover - replaced per instance
            return self._empty_get(key)
        return str(self._lookup.get(key))  # pragma: no cover

    def get_many(self, keys: Iterable[Any]) -> list[str]:
        """Return ``[self.get(k) for k in keys]`` in one call (one C loop for a list or tuple).

        :param keys: an iterable of keys (not a single str or bytes).
        :raises InvalidKeyError: for the first refused key.
        :raises ConfigError: when the ring has no shards and ``keys`` is not empty.
        """
        if self._lookup is None:  # pragma: no cover - replaced per instance
            return self._empty_get_many(keys)
        return list(self._lookup.get_many(keys))  # pragma: no cover

    def _install(self) -> None:
        """Build the lookup for the current arrays and bind get/get_many to it."""
        self._version = None
        if not self._weights:
            self._lookup: Any = None
            self.get = self._empty_get  # type: ignore[method-assign]
            self.get_many = self._empty_get_many  # type: ignore[method-assign]
            return
        self._lookup = self._impl.Lookup(tuple(self._slots), self._owners, self._points)
        self.get = self._lookup.get  # type: ignore[method-assign]
        self.get_many = self._lookup.get_many  # type: ignore[method-assign]

    def _empty_get(self, key: Any) -> str:
        raise ConfigError(f"the ring has no shards: cannot route the key {key!r}", key=key)

    def _empty_get_many(self, keys: Iterable[Any]) -> list[str]:
        if isinstance(keys, str | bytes):
            raise _keys.invalid_key(keys, "get_many() takes an iterable of keys, not a single str or bytes")
        for key in keys:
            self._empty_get(key)
        return []

    def owner_index(self, key: Any) -> int:
        """Internal slot number of the owner of ``key`` (for tests and tools)."""
        if self._lookup is None:
            self._empty_get(key)
        return int(self._lookup.owner_index(key))

    # -------------------------------------------------------------- introspection
    @property
    def mode(self) -> Mode:
        """``"ring"`` or ``"buckets"``."""
        return self._mode

    @property
    def vnodes(self) -> int:
        """Points per unit of weight (``mode="ring"``)."""
        return self._vnodes

    @property
    def buckets(self) -> int:
        """Number of logical buckets (``mode="buckets"``)."""
        return self._nbuckets

    @property
    def weights(self) -> dict[str, Weight]:
        """A copy of alias -> weight, in the order the shards were added."""
        return dict(self._weights)

    @property
    def generation(self) -> int:
        """How many adds and removes this layout has seen (serialized; not part of equality)."""
        return self._generation

    @property
    def version(self) -> int:
        """Content hash of the layout: same layout, same version, in every process."""
        if self._version is None:
            canonical = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            digest = hashlib.blake2b(canonical.encode("ascii"), digest_size=8).digest()
            self._version = int.from_bytes(digest, "big") >> 11  # 53 bits: an exact JSON number
        return self._version

    @property
    def npoints(self) -> int:
        """Ring points (``mode="ring"``) or buckets (``mode="buckets"``) in the lookup arrays."""
        return len(self._owners)

    @property
    def nbytes(self) -> int:
        """Bytes of the lookup arrays (ring points + owner slots, or the bucket table)."""
        return 0 if self._lookup is None else int(self._lookup.nbytes)

    def memory_per_point(self) -> float:
        """Bytes per ring point (or per bucket): 6 with up to 65536 aliases, else 8 (2 or 4 in buckets mode)."""
        return self.nbytes / self.npoints if self.npoints else 0.0

    @property
    def implementation(self) -> str:
        """``"c"`` or ``"python"``: the lookup this ring uses."""
        return "c" if self._impl is not _lookup_py else "python"

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._weights))

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, alias: object) -> bool:
        return alias in self._weights

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._canonical() == other._canonical()

    def __repr__(self) -> str:
        size = f"vnodes={self._vnodes}" if self._mode == "ring" else f"buckets={self._nbuckets}"
        return f"<HashRing mode={self._mode} {size} shards={self._weights!r} version={self.version}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (HashRing.from_dict, (self.to_dict(),))

    def copy(self) -> HashRing:
        """An independent ring with the same layout and generation (arrays are copied, not rebuilt)."""
        new = HashRing.__new__(HashRing)
        new.__dict__.update(
            _mode=self._mode,
            _vnodes=self._vnodes,
            _nbuckets=self._nbuckets,
            _impl=self._impl,
            _generation=self._generation,
            _weights=dict(self._weights),
            _slots=list(self._slots),
            _slot_of=dict(self._slot_of),
            _points=None if self._points is None else array("I", self._points),
            _owners=array(self._owners.typecode, self._owners),
        )
        new._install()
        return new

    __copy__ = copy

    # ------------------------------------------------------------------ mutation
    def add(self, alias: str, weight: Weight = 1) -> None:
        """Add a shard.

        ``mode="ring"``: its points are merged into the sorted arrays (no
        re-sort).  ``mode="buckets"``: it takes its fair share of buckets from
        the shards most above their new share.  Either way only keys that now
        belong to ``alias`` move.

        :raises ConfigError: the alias is already in the ring, or the weight is bad.
        """
        alias = _check_alias(alias)
        if alias in self._weights:
            raise ConfigError(f"shard {alias!r} is already in the ring", alias=alias)
        weight = _check_weight(alias, weight)
        _check_shard_count(len(self._weights) + 1)
        if self._mode == "ring":
            npoints = self._npoints(alias, weight)  # validate before touching anything
            self._check_total_points(len(self._owners) + npoints)
        elif len(self._weights) + 1 > self._nbuckets:
            raise ConfigError(
                f"shard {alias!r} does not fit: {self._nbuckets} buckets are all taken",
                alias=alias,
                buckets=self._nbuckets,
            )
        slot = self._take_slot(alias)
        old_weights = self._weights
        self._weights = {**old_weights, alias: weight}
        if self._mode == "ring":
            self._merge_points(alias, slot, npoints)
        else:
            self._owners = self._table_after_add(alias, slot, old_weights)
        self._generation += 1
        self._install()

    def remove(self, alias: str) -> None:
        """Remove a shard; only its keys move (to the shards that follow its points, or
        spread over the shards most below their new share of buckets).

        :raises UnknownAliasError: the alias is not in the ring.
        :raises ConfigError: removing the last shard of a buckets ring (its buckets would have no owner).
        """
        if alias not in self._weights:
            raise UnknownAliasError(f"shard {alias!r} is not in the ring", alias=alias)
        if self._mode == "buckets" and len(self._weights) == 1:
            raise ConfigError(
                f"cannot remove {alias!r}: it is the last shard of the ring and owns every bucket",
                alias=alias,
            )
        slot = self._slot_of[alias]
        weight = self._weights[alias]
        new_weights = {a: w for a, w in self._weights.items() if a != alias}
        if self._mode == "ring":
            self._drop_points(alias, slot, self._npoints(alias, weight))
        else:
            self._owners = self._table_after_remove(alias, slot, new_weights)
        self._weights = new_weights
        del self._slot_of[alias]
        self._slots[slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        self._generation += 1
        self._install()

    # ------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description of the layout; :meth:`from_dict` rebuilds the same ring.

        Keys: ``version`` (content hash of the layout), ``generation``, ``mode``,
        ``shards`` (alias -> weight), then ``vnodes`` (ring) or ``buckets`` and
        ``table`` (buckets: run-length list of ``[alias, count]`` in bucket order).
        """
        out: dict[str, Any] = {
            "version": self.version,
            "generation": self._generation,
            "mode": self._mode,
            "shards": dict(self._weights),
        }
        if self._mode == "ring":
            out["vnodes"] = self._vnodes
        else:
            out["buckets"] = self._nbuckets
            out["table"] = [list(run) for run in self._runs()]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HashRing:
        """Rebuild a ring from :meth:`to_dict` output (or a hand-written settings dict).

        Only ``shards`` is required (a list of aliases or a mapping alias ->
        weight).  A buckets layout without ``table`` gets the fresh table.  If
        ``version`` is given it must match the layout, which catches edited or
        corrupted settings.

        :raises ConfigError: an invalid or inconsistent description.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a ring description must be a mapping, not {type(data).__name__}")
        known = {"version", "generation", "mode", "shards", "vnodes", "buckets", "table"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown keys in a ring description: {unknown}", keys=unknown)
        if "shards" not in data:
            raise ConfigError("a ring description needs 'shards'")
        mode = data.get("mode", "ring")
        shards = data["shards"]
        if not isinstance(shards, Mapping | list | tuple):
            raise ConfigError("'shards' must be a list of aliases or a mapping alias -> weight")
        # every size is checked before anything is allocated: shards, then (in the constructor)
        # names, points or buckets, and the table's runs before the table is built
        _check_shard_count(len(shards))
        if isinstance(mode, str) and _MODE_NAMES.get(mode) == "ring" and "table" in data:
            raise ConfigError("'table' is only valid with mode='buckets'")
        table = data.get("table")
        if isinstance(table, list | tuple):  # its size, before the fresh table is built
            nbuckets = _check_int("buckets", data.get("buckets", DEFAULT_BUCKETS), 1, MAX_BUCKETS)
            _check_table_size(table, nbuckets)
        ring = cls(
            shards,
            mode=mode,
            vnodes=data.get("vnodes", DEFAULT_VNODES),
            buckets=data.get("buckets", DEFAULT_BUCKETS),
        )
        if ring._mode == "buckets" and data.get("table") is not None:
            ring._owners = ring._table_from_runs(data["table"])
            ring._install()
        ring._generation = _check_int("generation", data.get("generation", 0), 0, 2**53)
        if "version" in data and data["version"] != ring.version:
            raise ConfigError(
                f"ring version {data['version']!r:.80} does not match its layout (computed {ring.version}): "
                "the description was edited or corrupted",
                version=data["version"],
            )
        return ring

    # ------------------------------------------------------------------ internals
    def _canonical(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": _SPEC,
            "mode": self._mode,
            "shards": sorted([a, w] for a, w in self._weights.items()),
        }
        if self._mode == "ring":
            out["vnodes"] = self._vnodes
        else:
            out["buckets"] = self._nbuckets
            out["table"] = self._runs()
        return out

    def _owner_typecode(self) -> str:
        return "H" if len(self._slots) <= _MAX_SLOTS_H else "I"

    def _take_slot(self, alias: str) -> int:
        try:
            slot = self._slots.index(None)
            self._slots[slot] = alias
        except ValueError:
            slot = len(self._slots)
            self._slots.append(alias)
        self._slot_of[alias] = slot
        if self._owners.typecode != self._owner_typecode():
            self._owners = array(self._owner_typecode(), self._owners)
        return slot

    def _check_total_points(self, total: int) -> None:
        if total > MAX_POINTS:
            raise ConfigError(
                f"the ring would have {total} points (vnodes={self._vnodes} x the weights of "
                f"{len(self._weights) or 'its'} shards); the limit is {MAX_POINTS}: use fewer vnodes, "
                "or mode='buckets'",
                points=total,
                limit=MAX_POINTS,
                vnodes=self._vnodes,
            )

    def _npoints(self, alias: str, weight: Weight) -> int:
        n = max(1, round(self._vnodes * weight))
        if n > MAX_POINTS_PER_ALIAS:
            raise ConfigError(
                f"shard {alias!r} would get {n} ring points (vnodes x weight); the limit is {MAX_POINTS_PER_ALIAS}",
                alias=alias,
                weight=weight,
            )
        return n

    def _point_hashes(self, alias: str, weight: Weight) -> list[int]:
        hash_key = self._impl.hash_key
        return [hash_key(f"{alias}#{i}") for i in range(self._npoints(alias, weight))]

    def _merge_points(self, alias: str, slot: int, npoints: int) -> None:
        """Merge the new alias's points into the sorted arrays (ties: by alias)."""
        hash_key = self._impl.hash_key
        new = sorted(hash_key(f"{alias}#{i}") for i in range(npoints))
        points = self._points
        assert points is not None
        owners = self._owners
        slots = self._slots
        out_points = array("I")
        out_owners = array(owners.typecode)
        prev = 0
        n = len(points)
        for h in new:
            pos = bisect_left(points, h, prev)
            while pos < n and points[pos] == h and (slots[owners[pos]] or "") < alias:
                pos += 1
            out_points.extend(points[prev:pos])
            out_owners.extend(owners[prev:pos])
            out_points.append(h)
            out_owners.append(slot)
            prev = pos
        out_points.extend(points[prev:])
        out_owners.extend(owners[prev:])
        self._points = out_points
        self._owners = out_owners

    def _drop_points(self, alias: str, slot: int, npoints: int) -> None:
        """Cut the alias's points out of the arrays, found by recomputing their positions."""
        points = self._points
        assert points is not None
        owners = self._owners
        drop: set[int] = set()
        for h in set(self._point_hashes(alias, self._weights[alias])):
            for pos in range(bisect_left(points, h), bisect_right(points, h)):
                if owners[pos] == slot:
                    drop.add(pos)
        if len(drop) != npoints:  # pragma: no cover - would mean a corrupted ring
            raise ConfigError(f"ring corrupted: found {len(drop)} of {npoints} points of {alias!r}")
        out_points = array("I")
        out_owners = array(owners.typecode)
        prev = 0
        for pos in sorted(drop):
            out_points.extend(points[prev:pos])
            out_owners.extend(owners[prev:pos])
            prev = pos + 1
        out_points.extend(points[prev:])
        out_owners.extend(owners[prev:])
        self._points = out_points
        self._owners = out_owners

    def _fresh_table(self) -> array[int]:
        """Largest-remainder shares as contiguous blocks, aliases in sorted order."""
        table = array(self._owner_typecode())
        if not self._weights:
            return table
        quotas = _largest_remainder(self._nbuckets, self._weights)
        for alias in sorted(quotas):
            table.extend(array(table.typecode, [self._slot_of[alias]]) * quotas[alias])
        return table

    def _buckets_by_slot(self) -> dict[int, list[int]]:
        by_slot: dict[int, list[int]] = {}
        for bucket, slot in enumerate(self._owners):
            by_slot.setdefault(slot, []).append(bucket)
        return by_slot

    def _table_after_add(self, alias: str, slot: int, old_weights: Mapping[str, Weight]) -> array[int]:
        n = self._nbuckets
        table = array(self._owner_typecode(), self._owners)
        if not old_weights:
            return array(table.typecode, [slot]) * n
        total = sum(Fraction(w) for w in self._weights.values())
        take = min(n, math.floor(n * Fraction(self._weights[alias]) / total + Fraction(1, 2)))
        by_slot = self._buckets_by_slot()
        # key = (count - fair share) * total: how far above its new share a donor is
        heap = [
            (-(len(by_slot.get(self._slot_of[a], ())) * total - n * Fraction(w)), a) for a, w in old_weights.items()
        ]
        heapq.heapify(heap)
        gives: dict[str, int] = {}
        while take and heap:
            key, donor = heapq.heappop(heap)
            given = gives.get(donor, 0)
            if given == len(by_slot.get(self._slot_of[donor], ())):
                continue  # nothing left to give: drop it from the heap
            gives[donor] = given + 1
            take -= 1
            heapq.heappush(heap, (key + total, donor))
        for donor, count in gives.items():
            owned = by_slot[self._slot_of[donor]]
            for i in _spread(len(owned), count):
                table[owned[i]] = slot
        return table

    def _table_after_remove(self, alias: str, slot: int, new_weights: Mapping[str, Weight]) -> array[int]:
        n = self._nbuckets
        table = array(self._owners.typecode, self._owners)
        by_slot = self._buckets_by_slot()
        total = sum(Fraction(w) for w in new_weights.values())
        # key = (fair share - count) * total: how far below its new share a receiver is
        heap = [
            (-(n * Fraction(w) - len(by_slot.get(self._slot_of[a], ())) * total), a) for a, w in new_weights.items()
        ]
        heapq.heapify(heap)
        for bucket in by_slot.get(slot, ()):
            key, receiver = heapq.heappop(heap)
            table[bucket] = self._slot_of[receiver]
            heapq.heappush(heap, (key + total, receiver))
        return table

    def _runs(self) -> list[tuple[str, int]]:
        runs: list[tuple[str, int]] = []
        slots = self._slots
        prev = -1
        count = 0
        for slot in self._owners:
            if slot == prev:
                count += 1
                continue
            if count:
                runs.append((slots[prev] or "", count))
            prev, count = slot, 1
        if count:
            runs.append((slots[prev] or "", count))
        return runs

    def _table_from_runs(self, runs: object) -> array[int]:
        if not isinstance(runs, Sequence) or isinstance(runs, str | bytes):
            raise ConfigError("'table' must be a list of [alias, count] runs")
        _check_table_size(runs, self._nbuckets)
        checked: list[tuple[int, int]] = []
        total = 0
        for run in runs:  # check every run and the total before building anything
            if not (isinstance(run, Sequence) and not isinstance(run, str | bytes) and len(run) == 2):
                raise ConfigError(f"bad run {run!r:.80} in 'table': expected [alias, count]")
            alias, count = run
            if not isinstance(alias, str) or alias not in self._slot_of:
                raise UnknownAliasError(f"'table' names {alias!r:.80}, which is not in 'shards'", alias=alias)
            count = _check_int("count", count, 1, self._nbuckets)
            total += count
            if total > self._nbuckets:
                raise ConfigError(f"'table' covers more than its {self._nbuckets} buckets", buckets=self._nbuckets)
            checked.append((self._slot_of[alias], count))
        if total != self._nbuckets:
            raise ConfigError(f"'table' covers {total} buckets, not {self._nbuckets}", buckets=self._nbuckets)
        table = array(self._owner_typecode())
        for slot, count in checked:
            table.extend(array(table.typecode, [slot]) * count)
        return table
