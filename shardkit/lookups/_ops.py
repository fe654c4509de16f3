"""Operating lookups: build one for an existing table (backfill), check it (verify), fix it (repair).

All three scan in batches by primary key (keyset pages), so they can run while the
application writes: a row written meanwhile brings its own lookup; a lookup written for a row
deleted meanwhile is only *stale* (reads ignore it, the next verify reports it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, Text, func, select, tuple_

from . import _store
from ._declare import Lookup, lookup_for
from ._write import stale

__all__ = ["BackfillProgress", "VerifyReport", "backfill", "count_rows", "repair", "verify"]

_STATE_MD = MetaData()
PROGRESS_TABLE = Table(
    "shardkit_lookup_progress",
    _STATE_MD,
    Column("lookup", String(255), primary_key=True),
    Column("alias", String(255), primary_key=True),
    Column("last", Text, nullable=True),  # JSON list of the last primary key done; NULL: alias finished
)
_FINISHED = "__finished__"
SAMPLE = 100  # keys kept per kind in a report


@dataclass
class BackfillProgress:
    """Where a backfill is: ``alias`` being scanned, rows ``done`` of ``total`` (estimated)."""

    lookup: str
    alias: str
    done: int = 0
    total: int = 0
    written: int = 0
    conflicts: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (value, key, holder)
    finished: bool = False


@dataclass
class VerifyReport:
    """What :func:`verify` found for one lookup."""

    lookup: str
    rows_checked: int = 0
    lookups_checked: int = 0
    missing: list[tuple[Any, Any]] = field(default_factory=list)  # rows without lookup: (value, key)
    stale: list[tuple[Any, Any]] = field(default_factory=list)  # lookups without row: (value, key)
    young: list[tuple[Any, Any]] = field(default_factory=list)  # lookups without row, still within grace
    conflicts: list[tuple[Any, Any, Any]] = field(default_factory=list)  # unique value held by another row
    repaired_missing: int = 0
    repaired_stale: int = 0
    missing_count: int = 0
    stale_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing_count and not self.stale_count and not self.conflicts

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return v if isinstance(v, int | float | str | bool) or v is None else str(v)

        return {
            "lookup": self.lookup,
            "ok": self.ok,
            "rows_checked": self.rows_checked,
            "lookups_checked": self.lookups_checked,
            "rows_without_lookup": self.missing_count,
            "lookups_without_row": self.stale_count,
            "young_lookups_without_row": len(self.young),
            "unique_conflicts": len(self.conflicts),
            "repaired_rows_without_lookup": self.repaired_missing,
            "repaired_lookups_without_row": self.repaired_stale,
            "samples": {
                "rows_without_lookup": [[plain(v), plain(k)] for v, k in self.missing],
                "lookups_without_row": [[plain(v), plain(k)] for v, k in self.stale],
                "unique_conflicts": [[plain(v), plain(k), plain(h)] for v, k, h in self.conflicts],
            },
        }


def _resolve(lookup: Lookup | str, cluster: Any = None) -> Lookup:
    if cluster is not None:
        _store.ring_router(cluster)  # settles each lookup's shard key with the router's
    return lookup if isinstance(lookup, Lookup) else lookup_for(lookup)


def _scan(
    conn: Any, table: Table, pk: Sequence[Any], cols: Sequence[Any], batch: int, after: Any
) -> Iterator[list[Any]]:
    """Rows of ``cols`` (the primary key first) in primary-key order, ``batch`` at a time."""
    last = after
    while True:
        stmt = select(*pk, *cols).order_by(*pk).limit(batch)
        if last is not None:
            stmt = stmt.where(tuple_(*pk) > tuple_(*last)) if len(pk) > 1 else stmt.where(pk[0] > last[0])
        rows = conn.execute(stmt).all()
        if not rows:
            return
        yield rows
        last = tuple(rows[-1][: len(pk)])
        if len(rows) < batch:
            return


def _row_aliases(cluster: Any, lookup: Lookup) -> list[str]:
    router = _store.ring_router(cluster)
    return list(router.ring)


def _ensure_progress_table(cluster: Any) -> None:
    _STATE_MD.create_all(cluster.engine(cluster.router.default), checkfirst=True)


def _load_progress(cluster: Any, name: str) -> dict[str, Any]:
    _ensure_progress_table(cluster)
    with cluster.engine(cluster.router.default).connect() as conn:
        table = PROGRESS_TABLE
        rows = conn.execute(select(table.c.alias, table.c.last).where(table.c.lookup == name))
        return {alias: (_FINISHED if last == _FINISHED else json.loads(last)) for alias, last in rows}


def _save_progress(cluster: Any, name: str, alias: str, last: Any) -> None:
    text_value = last if last == _FINISHED else json.dumps(list(last), default=str)
    with cluster.engine(cluster.router.default).begin() as conn:
        table = PROGRESS_TABLE
        updated = conn.execute(
            table.update().where(table.c.lookup == name, table.c.alias == alias).values(last=text_value)
        ).rowcount
        if not updated:
            conn.execute(table.insert().values(lookup=name, alias=alias, last=text_value))


def _write_lookups(
    cluster: Any, lookup: Lookup, pairs: list[tuple[Any, Any]]
) -> tuple[int, list[tuple[Any, Any, Any]]]:
    """Insert lookup rows (value, key) where missing: (rows written, unique conflicts)."""
    router = _store.ring_router(cluster)
    by_alias: dict[str, list[dict[str, Any]]] = {}
    ms = _store.now_ms()
    for value, key in pairs:
        by_alias.setdefault(_store.alias_of(router, lookup, value), []).append(
            {"value": value, "shard_key": key, "created_ms": ms}
        )
    written = 0
    conflicts: list[tuple[Any, Any, Any]] = []
    for alias, rows in by_alias.items():
        with cluster.engine(alias).begin() as conn:
            left = _store.insert_claims(conn, lookup, rows)
            written += len(rows) - len(left)
            if left and lookup.unique:
                held = _store.read_keys(conn, lookup, [r["value"] for r in left])
                for row in left:
                    holders = held.get(row["value"], [])
                    if holders and holders[0][0] != row["shard_key"]:
                        conflicts.append((row["value"], row["shard_key"], holders[0][0]))
    return written, conflicts


def count_rows(cluster: Any, lookup: Lookup | str) -> int:
    """Rows of the lookup's table on the ring's shards (what a backfill reads)."""
    table = _resolve(lookup).model.__table__
    total = 0
    for alias in _row_aliases(cluster, _resolve(lookup)):
        with cluster.engine(alias).connect() as conn:
            total += int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    return total


def backfill(
    cluster: Any,
    lookup: Lookup | str,
    *,
    batch: int = 1000,
    restart: bool = False,
    progress: Callable[[BackfillProgress], None] | None = None,
) -> list[BackfillProgress]:
    """Write the missing lookup rows of every existing row of the lookup's table.

    Resumable: the last primary key done on each shard is kept in ``shardkit_lookup_progress``
    on the ``default`` alias, so a backfill that stopped goes on where it was (``restart=True``
    starts over).  Safe while the application writes (see the module docstring).  A unique
    value that two rows already share is reported in ``conflicts`` (neither row is changed).

    :param lookup: a :class:`Lookup` or its name, ``"User.email"``.
    :returns: one :class:`BackfillProgress` per shard.
    """
    lk = _resolve(lookup, cluster)
    name = lk.label
    done = {} if restart else _load_progress(cluster, name)
    if restart:
        _ensure_progress_table(cluster)
    table = lk.model.__table__
    pk = list(table.primary_key.columns)
    key_col = table.c[lk.key_column.name]
    col = table.c[lk.column.name]
    out: list[BackfillProgress] = []
    for alias in _row_aliases(cluster, lk):
        state = BackfillProgress(lookup=name, alias=alias)
        after = done.get(alias)
        if after == _FINISHED:
            state.finished = True
            out.append(state)
            if progress is not None:
                progress(state)
            continue
        with cluster.engine(alias).connect() as conn:
            state.total = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
            for rows in _scan(conn, table, pk, [key_col, col], batch, after):
                conn.rollback()  # no snapshot held between batches
                pairs = [(r[-1], r[-2]) for r in rows if r[-1] is not None]
                written, conflicts = _write_lookups(cluster, lk, pairs)
                state.written += written
                state.conflicts.extend(conflicts)
                state.done += len(rows)
                _save_progress(cluster, name, alias, tuple(rows[-1][: len(pk)]))
                if progress is not None:
                    progress(state)
        _save_progress(cluster, name, alias, _FINISHED)
        state.finished = True
        if progress is not None:
            progress(state)
        out.append(state)
    with cluster.engine(cluster.router.default).begin() as conn:  # a later backfill starts afresh
        conn.execute(PROGRESS_TABLE.delete().where(PROGRESS_TABLE.c.lookup == name))
    return out


def verify(cluster: Any, lookup: Lookup | str, *, batch: int = 1000, repair: bool = False) -> VerifyReport:
    """Rows without a lookup, and lookups without a row; with ``repair=True`` fix both.

    A lookup without a row is removed only once it is older than the lookup's grace and no
    writer of that row is in flight (the same test a writer takes over a unique value by);
    younger ones are reported in ``young``.
    """
    lk = _resolve(lookup, cluster)
    router = _store.ring_router(cluster)
    report = VerifyReport(lookup=lk.label)
    table = lk.model.__table__
    pk = list(table.primary_key.columns)
    key_col = table.c[lk.key_column.name]
    col = table.c[lk.column.name]
    # 1. every row has its lookup
    for alias in _row_aliases(cluster, lk):
        with cluster.engine(alias).connect() as conn:
            for rows in _scan(conn, table, pk, [key_col, col], batch, None):
                conn.rollback()
                pairs = [(r[-1], r[-2]) for r in rows if r[-1] is not None]
                report.rows_checked += len(rows)
                by_alias: dict[str, list[tuple[Any, Any]]] = {}
                for value, key in pairs:
                    by_alias.setdefault(_store.alias_of(router, lk, value), []).append((value, key))
                lost: list[tuple[Any, Any]] = []
                for lalias, group in by_alias.items():
                    with cluster.engine(lalias).connect() as lconn:
                        have = _store.read_keys(lconn, lk, [v for v, _k in group])
                    for value, key in group:
                        if key not in [k for k, _ms in have.get(value, [])]:
                            lost.append((value, key))
                report.missing_count += len(lost)
                report.missing.extend(lost[: max(0, SAMPLE - len(report.missing))])
                if repair and lost:
                    written, conflicts = _write_lookups(cluster, lk, lost)
                    report.repaired_missing += written
                    report.conflicts.extend(conflicts)
                elif lost and lk.unique:
                    for value, key in lost:
                        lalias = _store.alias_of(router, lk, value)
                        with cluster.engine(lalias).connect() as lconn:
                            holders = _store.read_keys(lconn, lk, [value]).get(value, [])
                        if holders and holders[0][0] != key:
                            report.conflicts.append((value, key, holders[0][0]))
    # 2. every lookup has its row
    ltable = lk.table
    lpk = [ltable.c.value, ltable.c.shard_key] if not lk.unique else [ltable.c.value]
    for lalias in list(router.ring):
        with cluster.engine(lalias).connect() as lconn:
            for lrows in _scan(lconn, ltable, lpk, [ltable.c.shard_key, ltable.c.created_ms], batch, None):
                lconn.rollback()
                entries = [(r[0], r[-2], r[-1]) for r in lrows]  # value, key, created_ms
                report.lookups_checked += len(entries)
                by_row_alias: dict[str, list[tuple[Any, Any, int]]] = {}
                for value, key, ms in entries:
                    by_row_alias.setdefault(_store.key_alias(router, lk, key), []).append((value, key, ms))
                for ralias, entries_here in by_row_alias.items():
                    present: set[tuple[Any, Any]] = set()
                    with cluster.engine(ralias).connect() as rconn:
                        for part in _store.chunks(entries_here):
                            keys = list({k for _v, k, _ms in part})
                            for key, value in rconn.execute(select(key_col, col).where(key_col.in_(keys))):
                                present.add((value, key))
                    for value, key, ms in entries_here:
                        if (value, key) in present:
                            continue
                        if _store.now_ms() - ms < lk.grace * 1000:
                            report.young.append((value, key))
                            continue
                        report.stale_count += 1
                        if len(report.stale) < SAMPLE:
                            report.stale.append((value, key))
                        if repair and stale(cluster, router, lk, value, key, ms):
                            with cluster.engine(lalias).begin() as dconn:
                                report.repaired_stale += _store.remove(dconn, lk, [(value, key)], ms)
    return report


def repair(cluster: Any, lookup: Lookup | str, *, batch: int = 1000) -> VerifyReport:
    """:func:`verify` with ``repair=True``."""
    return verify(cluster, lookup, batch=batch, repair=True)
