"""The names the CLI's ring arithmetic had here, kept importable (tests/cli imports them): the
arithmetic lives in :mod:`shardkit.ring._layout`, shared by ``shardkit ring`` and the resharder."""

from __future__ import annotations

from ..ring._layout import (
    HASH_SPACE,
    bucket_ranges,
    bucket_table,
    exact_movement,
    exact_shares,
    ideal_shares,
    layout_points,
    owner_of_hash,
    units,
)

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
