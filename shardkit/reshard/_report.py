"""What a reshard reports: its plan, the verify's range checks and differing keys, a run's result."""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..ring import HashRing
    from ._tables import MovingTable

Digest = str | bytes
"""What rows are compared by: a hex digest of the row, or the row's own bytes (a COPY text line)."""

RowDigests = dict[tuple[Any, ...], Digest]
"""primary key -> digest of the row."""

__all__ = [
    "Digest",
    "Move",
    "RangeCheck",
    "ReshardPlan",
    "ReshardResult",
    "RowDigests",
    "VerifyReport",
    "describe_ring",
    "differences",
    "range_checks",
    "sum_by_source",
]


def describe_ring(ring: HashRing) -> str:
    n = len(ring)
    return (
        f"version {ring.version} (mode {ring.mode}, generation {ring.generation}, "
        f"{n} shard{'' if n == 1 else 's'}: {', '.join(ring) or 'none'})"
    )


@dataclass(frozen=True)
class Move:
    """Rows of ``table`` on ``source`` that the new ring gives to ``target`` (counted on the shard)."""

    table: str
    source: str
    target: str
    rows: int


@dataclass
class ReshardPlan:
    """What a reshard moves: measured row counts per table and per source/target shard."""

    old_ring: HashRing
    new_ring: HashRing
    tables: list[MovingTable]
    moves: list[Move]
    rows: dict[str, int]  # table -> rows in the cluster
    movement: str  # the moving arcs / buckets of hash space
    seconds: float = 0.0

    @property
    def moving_rows(self) -> dict[str, int]:
        """table -> rows that move."""
        out: Counter[str] = Counter()
        for m in self.moves:
            out[m.table] += m.rows
        return {t.name: out[t.name] for t in self.tables}

    def render(self) -> str:
        """The plan as a text report: both rings, the hash space that moves, then rows per table
        and per source -> target pair (what ``shardkit reshard plan`` prints)."""
        lines = [
            f"current ring: {describe_ring(self.old_ring)}",
            f"new ring:     {describe_ring(self.new_ring)}",
            f"moving hash space: {self.movement}",
        ]
        moving = self.moving_rows
        for t in self.tables:
            total = self.rows.get(t.name, 0)
            pct = 100.0 * moving[t.name] / total if total else 0.0
            colo = f" (co-located with {t.parent} by {t.key.name})" if t.parent else ""
            lines.append(f"table {t.name}{colo}: {moving[t.name]} of {total} rows move ({pct:.1f}%)")
            for m in self.moves:
                if m.table == t.name and m.rows:
                    lines.append(f"  {m.source} -> {m.target}: {m.rows} rows")
        scanned = sum(self.rows.values())
        if self.seconds > 0:
            lines.append(
                f"counted on the shards: {scanned} rows in {self.seconds:.2f}s ({scanned / self.seconds:,.0f} rows/s)"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class RangeCheck:
    """Counts and checksums of one primary-key range of moving rows, source against target."""

    table: str
    source: str
    target: str
    low: Any
    high: Any
    source_rows: int
    target_rows: int
    source_sum: int
    target_sum: int

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_sum == self.target_sum


@dataclass
class VerifyReport:
    """The result of a verify: every range checked and every differing primary key."""

    ranges: list[RangeCheck] = field(default_factory=list)
    missing: list[tuple[str, str, str, tuple[Any, ...]]] = field(default_factory=list)  # (table, src, tgt, pk)
    extra: list[tuple[str, str, str, tuple[Any, ...]]] = field(default_factory=list)
    different: list[tuple[str, str, str, tuple[Any, ...]]] = field(default_factory=list)
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    @property
    def differing_keys(self) -> list[tuple[str, tuple[Any, ...]]]:
        """(table, primary key) of every row that differs, missing or extra."""
        return sorted({(t, pk) for t, _, _, pk in [*self.missing, *self.extra, *self.different]}, key=repr)

    def add(
        self, table: str, source: str, target: str, src: RowDigests, tgt: RowDigests,
        size: int,
    ) -> None:  # fmt: skip
        """Add the comparison of the moving rows of ``table`` on ``source`` (primary key -> hex
        digest) with their copies on ``target``: the differing keys and the range checks."""
        missing, extra, different = differences(src, tgt)
        self.rows += len(src)
        self.missing += [(table, source, target, pk) for pk in sorted(missing)]
        self.extra += [(table, source, target, pk) for pk in sorted(extra)]
        self.different += [(table, source, target, pk) for pk in sorted(different)]
        self.ranges += range_checks(table, source, target, src, tgt, size)

    def extend(self, other: VerifyReport) -> None:
        """Add the ranges, keys and rows of ``other`` (the report of one table and source)."""
        self.rows += other.rows
        self.ranges += other.ranges
        self.missing += other.missing
        self.extra += other.extra
        self.different += other.different

    def render(self) -> str:
        bad = [r for r in self.ranges if not r.ok]
        lines = [f"verified {self.rows} moving rows in {len(self.ranges)} key ranges: {len(bad)} ranges differ"]
        for kind, items in (("missing on target", self.missing), ("extra on target", self.extra),
                            ("different", self.different)):  # fmt: skip
            for table, src, tgt, pk in items:
                lines.append(f"  {kind}: {table} {src}->{tgt} primary key {pk[0] if len(pk) == 1 else pk!r}")
        return "\n".join(lines)


@dataclass
class ReshardResult:
    """What a run did (or, with ``dry_run``, would do)."""

    old_ring: HashRing
    new_ring: HashRing
    phase: str
    steps: list[str] = field(default_factory=list)
    copied: dict[str, int] = field(default_factory=dict)  # table -> rows copied by this run
    deleted: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    verify: VerifyReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds spent by this run
    resumed_from: str | None = None

    @property
    def copy_rate(self) -> float:
        """Rows copied per second in the copy phase of this run."""
        secs = self.seconds.get("copy", 0.0)
        return sum(self.copied.values()) / secs if secs > 0 else 0.0


def _checksum(digest: str | bytes) -> int:
    """64 bits of a row's digest: a hex digest, or the bytes of a row (a COPY text line), by md5."""
    return int((hashlib.md5(digest).hexdigest() if isinstance(digest, bytes) else digest)[:16], 16)


def differences(src: dict[Any, Digest], tgt: dict[Any, Digest]) -> tuple[list[Any], list[Any], list[Any]]:
    """The primary keys (of primary key -> digest maps) missing on the target, extra on the
    target, and on both with different digests."""
    missing = [pk for pk in src if pk not in tgt]
    extra = [pk for pk in tgt if pk not in src]
    different = [pk for pk, d in src.items() if pk in tgt and tgt[pk] != d]
    return missing, extra, different


def sum_by_source(moves: Sequence[Move], table: str) -> list[Move]:
    out: Counter[str] = Counter()
    for m in moves:
        if m.table == table:
            out[m.source] += m.rows
    return [Move(table, s, "", n) for s, n in sorted(out.items()) if n]


def range_checks(
    table: str,
    source: str,
    target: str,
    src: RowDigests,
    tgt: RowDigests,
    size: int,
) -> list[RangeCheck]:
    """Counts and checksums per range of ``size`` source primary keys (target rows by the same bounds)."""
    spks = sorted(src)
    tpks = sorted(tgt)
    bounds = [spks[i] for i in range(0, len(spks), size)] or [()]
    out: list[RangeCheck] = []
    for n, low in enumerate(bounds):
        nxt = bounds[n + 1] if n + 1 < len(bounds) else None
        s_part = spks[n * size : (n + 1) * size]
        lo_i = 0 if n == 0 else bisect_left(tpks, low)
        hi_i = len(tpks) if nxt is None else bisect_left(tpks, nxt)
        t_part = tpks[lo_i:hi_i]
        high = s_part[-1] if s_part else None
        out.append(
            RangeCheck(
                table, source, target, low or None, high,
                len(s_part), len(t_part),
                sum(_checksum(src[k]) for k in s_part) % (1 << 64),
                sum(_checksum(tgt[k]) for k in t_part) % (1 << 64),
            )
        )  # fmt: skip
    return out
