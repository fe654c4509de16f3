"""Consistent hashing of shard keys to shard aliases, and the router built on it.

``HashRing`` maps a shard key (int, str, bytes or uuid.UUID, encoded as
specified in :mod:`shardkit.ring._keys`) to an alias, as a classic ring with
virtual nodes or as a fixed set of logical buckets.  ``HashRingRouter`` plugs
a ring into shardkit's router chain.

The lookup runs in C (``shardkit.ring._speedups``) when the extension is
built, else in pure Python (``_lookup_py``, the specification); the
environment variable ``SHARDKIT_RING_IMPL=c|python`` forces one, and
:data:`IMPLEMENTATION` records the choice (``"c"`` or ``"python"``).

``SHARDKIT_DISABLE_EXTENSIONS=1``, the install-time switch of ``setup.py``, is read
at import time too: with it set, the C extension is not even loaded (as with
``SHARDKIT_RING_IMPL=python``), so a checkout whose extension was built before
stops using it without a rebuild.  Setting it together with ``SHARDKIT_RING_IMPL=c``
is an ImportError.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ._keys import INT_MAX, INT_MIN


@contextmanager
def _extensions_switch() -> Iterator[None]:
    """Make ``SHARDKIT_DISABLE_EXTENSIONS`` select the pure-Python ring while ``_ring`` is imported."""
    disabled = os.environ.get("SHARDKIT_DISABLE_EXTENSIONS", "").strip() not in ("", "0")
    forced = os.environ.get("SHARDKIT_RING_IMPL")
    if not disabled or (forced or "").strip().lower() == "python":
        yield
        return
    if (forced or "").strip():
        raise ImportError(
            f"SHARDKIT_DISABLE_EXTENSIONS=1 and SHARDKIT_RING_IMPL={forced} contradict each other: unset one"
        )
    os.environ["SHARDKIT_RING_IMPL"] = "python"  # read once, by _ring's import, then put back as it was
    try:
        yield
    finally:
        if forced is None:
            os.environ.pop("SHARDKIT_RING_IMPL", None)
        else:
            os.environ["SHARDKIT_RING_IMPL"] = forced


with _extensions_switch():
    from ._ring import DEFAULT_BUCKETS, DEFAULT_VNODES, IMPLEMENTATION, HashRing, _impl
from .router import HashRingRouter  # noqa: E402 - after the implementation is chosen

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_VNODES",
    "IMPLEMENTATION",
    "INT_MAX",
    "INT_MIN",
    "HashRing",
    "HashRingRouter",
    "encode_key",
    "hash_key",
]

encode_key = _impl.encode_key
"""The canonical bytes of a shard key (the selected implementation of ``_keys.encode_key``)."""

hash_key = _impl.hash_key
"""MurmurHash3 x86 32-bit (seed 0, unsigned) of :func:`encode_key`."""
