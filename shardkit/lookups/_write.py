"""Keeping lookups in step with the rows, in the order that never loses a row's lookup.

* **insert**: the lookup row is written first.  When it lives on the row's own shard it is
  written in the row's transaction (both commit or neither); otherwise on a connection of its
  own, committed before the row is even sent.  A row therefore never exists without its lookup;
  a crash or a rollback can leave a lookup without a row, which reads ignore and
  ``verify --repair`` (or the next writer of that value, after ``grace`` seconds) removes.
* **update of the column**: the new lookup first (as an insert), then the row, and the old
  lookup is removed once the transaction committed.
* **delete**: the row first, the lookup once the transaction committed.
* ``cross_shard_writes="twophase"``: every lookup write joins the session's transaction, so the
  two-phase commit covers it.

Unique lookups: the value is claimed before the row is written.  A value already held is
refused with :class:`~shardkit.errors.UniqueLookupError`, after undoing every lookup this flush
claimed.  A held value whose row is missing is *stale* (its writer rolled back or died) and is
taken over only when (1) the row is still missing once (2) no transaction that may be writing it
is in flight on the row's shard (PostgreSQL: the writer holds a shared advisory lock for its
whole transaction; SQLite: the writer holds the file's write lock) and (3) the lookup is older
than ``grace`` seconds (which covers the moment between the lookup's commit and the row's
first statement).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect, select
from sqlalchemy.engine import Connection

from .._session import ShardSession
from . import _store
from ._declare import Lookup, any_declared, lookups_of

if TYPE_CHECKING:
    from ..ring import HashRingRouter

__all__ = ["claim_rows", "tx_state"]

logger = logging.getLogger(__name__)

_INFO = "shardkit.lookups"
COMMIT_FIRST = "shardkit.commit_first"  # aliases the ordered commit commits first among those written


@dataclass
class _Claim:
    lookup: Lookup
    value: Any
    key: Any
    ms: int
    alias: str
    inline: bool  # written in the session's transaction (else committed on its own connection)


@dataclass
class TxState:
    """What one session transaction did to lookups (kept in ``session.info``)."""

    claims: list[_Claim] = field(default_factory=list)  # made by this transaction
    removals: list[tuple[Lookup, Any, Any]] = field(default_factory=list)  # (lookup, value, key) after commit
    inline_aliases: set[str] = field(default_factory=set)  # lookup rows written in the session's transaction
    # (lookup, value, key) a DELETE statement by the lookup column aimed at: removed after commit if the row is gone
    maybe_gone: list[tuple[Lookup, Any, Any]] = field(default_factory=list)

    def pending(self, lookup: Lookup, value: Any) -> bool:
        return any(c.lookup is lookup and c.value == value for c in self.claims)


def tx_state(session: Any, create: bool = True) -> TxState | None:
    state = session.info.get(_INFO)
    if state is None and create:
        state = session.info[_INFO] = TxState()
    return state  # type: ignore[no-any-return]


def _inline(session: ShardSession, lookup_alias: str, row_alias: str) -> bool:
    if session.cluster.cross_shard_writes == "twophase" or lookup_alias == row_alias:
        return True
    if lookup_alias in session.tx_write_aliases:
        # this transaction already writes there: SQLite's file lock would make a second connection wait on us
        return session.cluster.engine(lookup_alias).dialect.name == "sqlite"
    return False


def claim_rows(session: ShardSession, items: list[tuple[Lookup, Any, Any, str]]) -> None:
    """Write the lookup rows of ``items`` = ``(lookup, value, shard key, row alias)`` before their rows.

    :raises UniqueLookupError: a unique value is held by another row (or a write in flight);
        every lookup row this call wrote is gone again.
    """
    if not items:
        return
    router = _store.ring_router(session.cluster)
    state = tx_state(session)
    assert state is not None
    ms = _store.now_ms()
    # (lookup alias, inline?) -> lookup -> rows;  row alias -> lookup -> values (in-flight marks)
    groups: dict[tuple[str, bool], dict[Lookup, list[dict[str, Any]]]] = {}
    marks: dict[str, dict[Lookup, list[Any]]] = {}
    seen: dict[tuple[Lookup, Any], Any] = {}
    commit_first: set[str] = set()  # lookups written in the session's transaction for a row elsewhere
    for lookup, value, key, row_alias in items:
        if lookup.unique:
            other = seen.get((lookup, value), key)
            if other != key:  # two new rows of this flush with one unique value
                raise _store.refused(lookup, value, holder=other, pending=True)
            seen[(lookup, value)] = key
        alias = _store.alias_of(router, lookup, value)
        inline = _inline(session, alias, row_alias)
        if inline and alias != row_alias and session.cluster.cross_shard_writes != "twophase":
            commit_first.add(alias)
        groups.setdefault((alias, inline), {}).setdefault(lookup, []).append(
            {"value": value, "shard_key": key, "created_ms": ms}
        )
        if lookup.unique and not inline:
            marks.setdefault(row_alias, {}).setdefault(lookup, []).append(value)
    done: list[_Claim] = []
    own: dict[str, Connection] = {}
    try:
        for row_alias, by_lookup in marks.items():  # before any lookup commits: "my row is coming"
            conn = session.connection(bind_arguments={"shard_id": row_alias})
            for lookup, values in by_lookup.items():
                _store.defer_in_flight(conn, lookup, values)
        rank = {a: i for i, a in enumerate(session.cluster.aliases)}
        # own connections first, committed before the session's transaction touches their
        # databases (SQLite: its write lock would make them wait on us), in DATABASES order
        ordered = sorted(groups.items(), key=lambda g: (g[0][1], rank.get(g[0][0], 0)))
        for (alias, inline), by_lookup in ordered:
            if inline and own:
                for conn in own.values():  # the lookups are durable before any row is sent
                    conn.commit()
            if inline:
                if alias not in session.tx_write_aliases:
                    session.note_writes((alias,))
                conn = session.connection(bind_arguments={"shard_id": alias})
                state.inline_aliases.add(alias)
                if alias in commit_first:  # a row elsewhere: this commits before it (_twophase.CommitOrder)
                    session.info.setdefault(COMMIT_FIRST, set()).add(alias)
            else:
                engine = session.cluster.engine(alias)
                if len(by_lookup) == 1 and alias not in own and _store.raw_ok(engine):
                    ((lookup, rows),) = by_lookup.items()
                    if len(rows) == 1 and lookup.plain_types and _store.claim_one(engine, lookup, rows[0]):
                        # one statement, committed at once (autocommit): the usual single insert
                        done.append(_Claim(lookup, rows[0]["value"], rows[0]["shard_key"], ms, alias, False))
                        continue
                conn = own.get(alias) or own.setdefault(alias, engine.connect())
            for lookup, rows in by_lookup.items():
                left = _store.insert_claims(conn, lookup, rows)
                taken = {(r["value"], r["shard_key"]) for r in left}
                for row in rows:
                    if (row["value"], row["shard_key"]) not in taken:
                        done.append(_Claim(lookup, row["value"], row["shard_key"], ms, alias, inline))
                if left and lookup.unique:
                    for row in left:
                        if _resolve(session, router, conn, lookup, row["value"], row["shard_key"], ms, state):
                            done.append(_Claim(lookup, row["value"], row["shard_key"], ms, alias, inline))
        for conn in own.values():
            if conn.in_transaction():
                conn.commit()
    except BaseException:
        for conn in own.values():
            with contextlib.suppress(Exception):
                conn.rollback()
        _undo(session, done)  # those already committed on their own connections too
        raise
    finally:
        for conn in own.values():
            with contextlib.suppress(Exception):
                conn.close()
    state.claims.extend(done)


def _resolve(
    session: ShardSession,
    router: HashRingRouter,
    conn: Connection,
    lookup: Lookup,
    value: Any,
    key: Any,
    ms: int,
    state: TxState,
) -> bool:
    """A unique value already has a lookup row: ours already (False), a stale one taken over
    (True), or a refusal."""
    found = _store.read_keys(conn, lookup, [value]).get(value, [])
    if not found:  # it went away meanwhile: claim it now
        left = _store.insert_claims(conn, lookup, [{"value": value, "shard_key": key, "created_ms": ms}])
        if not left:
            return True
        found = _store.read_keys(conn, lookup, [value]).get(value, [])
    holder, holder_ms = found[0]
    if holder == key:
        return False
    if state.pending(lookup, value):  # claimed earlier in this very transaction for another row
        raise _store.refused(lookup, value, holder=holder, pending=True)
    verdict = holder_state(session.cluster, router, lookup, value, holder, holder_ms)
    if verdict != "stale":
        raise _store.refused(lookup, value, holder=holder, pending=verdict == "pending")
    if _store.take_over(conn, lookup, value, holder, holder_ms, key, ms):
        logger.info("lookup %s: took over %r from a missing row (shard key %r)", lookup.label, value, holder)
        return True
    raise _store.refused(lookup, value, holder=holder, pending=True)


def holder_state(cluster: Any, router: HashRingRouter, lookup: Lookup, value: Any, holder: Any, holder_ms: int) -> str:
    """What the lookup ``value -> holder`` points at: ``"row"`` (the row is there), ``"pending"``
    (no row yet, but its writer may still be at work: within the grace period, or a transaction
    that may write it is in flight) or ``"stale"`` (no row, and none can come)."""
    alias = _store.key_alias(router, lookup, holder)
    with cluster.engine(alias).connect() as probe:
        try:
            if _store.row_exists(probe, lookup, holder, value):
                return "row"
            if _store.now_ms() - holder_ms < lookup.grace * 1000:
                return "pending"
            probe.rollback()
            if not _store.probe_free(probe, lookup, value):
                return "pending"
            # the in-flight mark is ours now: a writer that had it has ended; look again
            return "row" if _store.row_exists(probe, lookup, holder, value) else "stale"
        finally:
            probe.rollback()


def stale(cluster: Any, router: HashRingRouter, lookup: Lookup, value: Any, holder: Any, holder_ms: int) -> bool:
    """Whether the lookup ``value -> holder`` points at a row that is not there and never will be."""
    return holder_state(cluster, router, lookup, value, holder, holder_ms) == "stale"


def _undo(session: ShardSession, claims: Iterable[_Claim]) -> None:
    """Remove lookup rows this transaction claimed (a refused flush, a rollback)."""
    by_alias: dict[tuple[str, bool], list[_Claim]] = {}
    for claim in claims:
        by_alias.setdefault((claim.alias, claim.inline), []).append(claim)
    for (alias, inline), group in by_alias.items():
        try:
            if inline:
                conn = session.connection(bind_arguments={"shard_id": alias})
                for claim in group:
                    _store.remove(conn, claim.lookup, [(claim.value, claim.key)], claim.ms)
            else:
                with session.cluster.engine(alias).begin() as conn:
                    for claim in group:
                        _store.remove(conn, claim.lookup, [(claim.value, claim.key)], claim.ms)
        except Exception as exc:  # the lookup stays stale: verify --repair or a later writer removes it
            logger.warning("lookup cleanup on %s failed (%s); `shardkit lookup verify --repair` removes it", alias, exc)


def remove_after_commit(cluster: Any, removals: list[tuple[Lookup, Any, Any]]) -> None:
    """Delete the lookups of deleted rows and of replaced values, now that the rows are committed."""
    if not removals:
        return
    router = _store.ring_router(cluster)
    by_alias: dict[str, list[tuple[Lookup, Any, Any]]] = {}
    for lookup, value, key in removals:
        by_alias.setdefault(_store.alias_of(router, lookup, value), []).append((lookup, value, key))
    for alias, group in by_alias.items():
        try:
            with cluster.engine(alias).begin() as conn:
                for lookup, value, key in group:
                    _store.remove(conn, lookup, [(value, key)])
        except Exception as exc:
            logger.warning("removing old lookups on %s failed (%s); verify --repair removes them", alias, exc)


# -- the session events ------------------------------------------------------------------------


def _stored_value(session: ShardSession, alias: str, lookup: Lookup, st: Any) -> Any:
    """The value of the lookup column the row holds now (before this flush writes it)."""
    table = lookup.model.__table__
    mapper = st.mapper
    pk = mapper.primary_key_from_instance(st.obj())
    cols = [table.c[c.name] for c in mapper.primary_key]
    conn = session.connection(bind_arguments={"shard_id": alias})
    return conn.execute(
        select(table.c[lookup.column.name]).where(*[c == v for c, v in zip(cols, pk, strict=True)])
    ).scalar()


def _history(obj: Any, attr: str) -> tuple[Any, Any, bool]:
    """(new value, old value, changed) of ``obj.attr`` in this flush."""
    hist = inspect(obj).attrs[attr].history
    if not hist.added and not hist.deleted:
        return None, None, False
    new = hist.added[0] if hist.added else None
    old = hist.deleted[0] if hist.deleted else None
    return new, old, new != old


@event.listens_for(ShardSession, "before_flush")
def _lookups_before_flush(session: Any, flush_context: Any, instances: Any) -> None:
    """Claim the lookups of the flush's new rows and new values; note those to remove after the commit.

    Reads the objects of the flush from ``session.flush_aliases`` (decided by shardkit's own
    ``before_flush``, which runs first: new, changed and deleted objects, each with its alias),
    so a flush of models without lookups costs one dictionary look-up per object."""
    if not any_declared() or not isinstance(session, ShardSession):
        return
    placed = [(st, alias) for st, alias in session.flush_aliases.items() if lookups_of(st.class_)]
    if not placed:
        return
    _store.ring_router(session.cluster)  # settles each lookup's shard key with the router's
    deleted = {id(obj) for obj in session.deleted}
    items: list[tuple[Lookup, Any, Any, str]] = []
    removals: list[tuple[Lookup, Any, Any]] = []
    for st, row_alias in placed:
        obj = st.obj()
        if obj is None:
            continue
        lookups = lookups_of(st.class_)
        first = next(iter(lookups.values()))
        if st.key is None:  # a new row
            key = getattr(obj, first.key_attr)
            for lookup in lookups.values():
                value = getattr(obj, lookup.attr, None)
                if value is not None:
                    items.append((lookup, value, key, row_alias))
        elif id(obj) in deleted:  # its lookups go once the delete is committed
            key_hist = st.attrs[first.key_attr].history
            key = (key_hist.deleted or key_hist.unchanged or (getattr(obj, first.key_attr),))[0]
            for lookup in lookups.values():
                hist = st.attrs[lookup.attr].history
                value = (hist.deleted or hist.unchanged or (getattr(obj, lookup.attr, None),))[0]  # loads if expired
                if value is not None:
                    removals.append((lookup, value, key))
        else:  # changed: a new value is claimed now, the old one removed after the commit
            key = getattr(obj, first.key_attr)
            for lookup in lookups.values():
                new, old, changed = _history(obj, lookup.attr)
                if not changed:
                    continue
                if old is None and not st.attrs[lookup.attr].history.deleted:  # set while expired: ask the row
                    old = _stored_value(session, row_alias, lookup, st)
                if new is not None:
                    items.append((lookup, new, key, row_alias))
                if old is not None:
                    removals.append((lookup, old, key))
    if items:
        claim_rows(session, items)
    if removals:
        state = tx_state(session)
        assert state is not None
        state.removals.extend(removals)


@event.listens_for(ShardSession, "after_commit")
def _lookups_after_commit(session: Any) -> None:
    state = session.info.pop(_INFO, None)
    session.info.pop(COMMIT_FIRST, None)
    if state is None or not isinstance(session, ShardSession):
        return
    removals = list(state.removals)
    if state.maybe_gone:
        removals.extend(_gone(session.cluster, state.maybe_gone))
    remove_after_commit(session.cluster, removals)


def _gone(cluster: Any, candidates: list[tuple[Lookup, Any, Any]]) -> list[tuple[Lookup, Any, Any]]:
    """Those of ``candidates`` whose row is not there (a DELETE statement removed it)."""
    router = _store.ring_router(cluster)
    out: list[tuple[Lookup, Any, Any]] = []
    for lookup, value, key in candidates:
        try:
            with cluster.engine(_store.key_alias(router, lookup, key)).connect() as conn:
                if not _store.row_exists(conn, lookup, key, value):
                    out.append((lookup, value, key))
        except Exception as exc:  # left stale: verify --repair removes it
            logger.warning("checking a deleted row of %s failed (%s)", lookup.label, exc)
    return out


@event.listens_for(ShardSession, "after_transaction_end")
def _lookups_after_rollback(session: Any, transaction: Any) -> None:
    """The root transaction ended without a commit (a rollback, or ``close()``): remove the lookup
    rows it committed on their own connections (``after_commit`` already took the state of a commit)."""
    if transaction.parent is not None or transaction.nested:  # a savepoint or an inner transaction
        return
    session.info.pop(COMMIT_FIRST, None)
    state = session.info.pop(_INFO, None)
    if state is None or not isinstance(session, ShardSession):
        return
    own = [c for c in state.claims if not c.inline]  # the inline ones were rolled back with the rows
    if own:
        by_alias: dict[str, list[_Claim]] = {}
        for claim in own:
            by_alias.setdefault(claim.alias, []).append(claim)
        for alias, group in by_alias.items():
            try:
                with session.cluster.engine(alias).begin() as conn:
                    for claim in group:
                        _store.remove(conn, claim.lookup, [(claim.value, claim.key)], claim.ms)
            except Exception as exc:
                logger.warning("lookup cleanup after rollback on %s failed (%s)", alias, exc)
