"""Pure-Python ring lookup: the reference implementation.

``shardkit.ring._speedups`` (C) defines the same names with the same
signatures and must give the same answer for every key and every layout;
the ring test suite runs against both, and hypothesis compares them.

A :class:`Lookup` is an immutable snapshot of one layout, in one of two forms:

* **ring** (``points`` given): ``points`` is a sorted array of 32-bit ring
  positions and ``owners`` the parallel array of owner slots.  A key belongs
  to the owner of the first point at or after ``hash_key(key)``, wrapping
  around to point 0 past the end (``bisect_left``).
* **buckets** (``points`` is ``None``): ``owners`` is the bucket -> slot
  table of ``N = len(owners)`` buckets, each an equal range of the 32-bit hash
  space: ``bucket = (hash_key(key) * N) >> 32``.

``aliases[slot]`` is the alias a slot stands for.  ``HashRing`` builds these
objects; they are not meant to be made by hand (the C version checks its
arguments only as far as memory safety requires).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from ._keys import encode_key, hash_key, invalid_key

__all__ = ["Lookup", "encode_key", "hash_key"]


class Lookup:
    """One layout, ready for lookups.

    :param aliases: slot -> alias (``None`` for a free slot no point refers to).
    :param owners: ``array('H')`` or ``array('I')``: owner slot of each point,
        or of each bucket when ``points`` is ``None``.
    :param points: ``array('I')`` of sorted ring positions, or ``None`` for
        the bucket form.
    """

    __slots__ = ("_aliases", "_n", "_owners", "_points")

    def __init__(
        self,
        aliases: tuple[str | None, ...],
        owners: array[int],
        points: array[int] | None = None,
    ) -> None:
        if not isinstance(aliases, tuple):
            raise TypeError("aliases must be a tuple")
        if owners.typecode not in ("H", "I"):
            raise TypeError("owners must be an array of typecode 'H' or 'I'")
        if points is not None:
            if points.typecode != "I":
                raise TypeError("points must be an array of typecode 'I'")
            if len(points) != len(owners):
                raise ValueError("points and owners must have the same length")
        if not len(owners):
            raise ValueError("a Lookup needs at least one point or bucket")
        self._aliases = aliases
        self._owners = owners
        self._points = points
        self._n = len(owners)

    def owner_index(self, key: Any) -> int:
        """Return the owner slot of ``key``.

        :raises InvalidKeyError: for a key the encoding refuses.
        """
        h = hash_key(key)
        points = self._points
        if points is None:
            return self._owners[(h * self._n) >> 32]
        i = bisect_left(points, h)
        if i == self._n:
            i = 0
        return self._owners[i]

    def get(self, key: Any) -> str:
        """Return the alias that owns ``key``.

        :raises InvalidKeyError: for a key the encoding refuses.
        """
        alias = self._aliases[self.owner_index(key)]
        assert alias is not None
        return alias

    def get_many(self, keys: Iterable[Any]) -> list[str]:
        """Return ``[get(k) for k in keys]``; ``keys`` is any iterable but a single str/bytes.

        :raises InvalidKeyError: for the first refused key, or when ``keys``
            is itself a str or bytes (almost always a forgotten ``[...]``).
        """
        if isinstance(keys, str | bytes):
            raise invalid_key(keys, "get_many() takes an iterable of keys, not a single str or bytes")
        get = self.get
        return [get(k) for k in keys]

    @property
    def nbytes(self) -> int:
        """Bytes used by the point/owner arrays (the per-point storage)."""
        size = self._owners.itemsize * self._n
        if self._points is not None:
            size += self._points.itemsize * self._n
        return size

    def __len__(self) -> int:
        return self._n
