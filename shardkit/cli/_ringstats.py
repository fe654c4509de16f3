"""The layout arithmetic ``shardkit ring`` prints: it lives in :mod:`shardkit.ring._layout`
(shared with the resharder); these names stay importable from here."""

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
