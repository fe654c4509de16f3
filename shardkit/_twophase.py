"""Commits across shards: two-phase commit with a decision log, and ordered plain commits.

With ``Cluster(cross_shard_writes="twophase")``, a commit that wrote to more
than one alias runs:

1. ``PREPARE TRANSACTION 'shardkit_<txid>_<n>_<i>'`` on every written alias
   (participant ``i`` of ``n``; any failure: every prepared one is rolled back,
   the commit raises the error);
2. the decision, a row with ``txid`` in ``shardkit_twophase_log`` on the
   ``default`` alias, committed on its own connection;
3. ``COMMIT PREPARED`` on every alias that can be reached, then the log row is
   deleted.  If some cannot, :class:`~shardkit.errors.TwoPhaseCommitError` says
   the decision (commit), which aliases are done and which ones recovery will finish.

A crash or a failed ``COMMIT PREPARED`` can leave prepared transactions *in
doubt*: they hold their locks until resolved.  :func:`recover` resolves them by
presumed abort: a transaction whose decision row exists is committed everywhere
at once, any other is rolled back everywhere once it is older than ``min_age``
seconds (a younger one may belong to a commit still in progress), so no write
is ever half applied.  Only GIDs of exactly shardkit's format are touched.

PostgreSQL needs ``max_prepared_transactions`` above zero for this; every
written alias must be PostgreSQL (checked before anything is written).

With ``cross_shard_writes="allow"``, :class:`CommitOrder` makes a commit over
several connections commit them one by one in the order of DATABASES, and a
failure part way raise :class:`~shardkit.errors.PartialCommitError` naming the
aliases that committed and those that did not.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError

from .errors import (
    CrossShardWriteError,
    PartialCommitError,
    ShardkitError,
    TwoPhaseCommitError,
    TwoPhaseRecoveryError,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ._cluster import Cluster
    from ._session import ShardSession

__all__ = ["CommitOrder", "InDoubt", "make_gid", "parse_gid", "recover", "two_phase_commit"]

GID_PREFIX = "shardkit_"
#: ``shardkit_<txid: 32 hex digits>_<participants>_<index>``, and nothing else
_GID_RE = re.compile(r"shardkit_(?P<txid>[0-9a-f]{32})_(?P<count>[1-9][0-9]{0,5})_(?P<index>0|[1-9][0-9]{0,5})")
_PG_UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a GID that no longer exists

_metadata = MetaData()
twophase_log = Table(
    "shardkit_twophase_log",
    _metadata,
    Column("txid", String(32), primary_key=True),
    Column("aliases", String(2000), nullable=False),
    Column("decided_at", DateTime(timezone=True), server_default=func.now()),
)


def check_twophase_aliases(cluster: Cluster, aliases: set[str]) -> None:
    """Refuse, before anything is written, a two-phase commit over a non-PostgreSQL alias."""
    others = sorted(a for a in aliases if cluster.spec(a).dialect_name != "postgresql")
    if len(aliases) > 1 and others:
        raise CrossShardWriteError(
            f"two-phase commit needs PostgreSQL, but this transaction also writes to {', '.join(others)} "
            f"({', '.join(cluster.spec(a).dialect_name for a in others)}); nothing was written",
            aliases=sorted(aliases),
        )


def _autocommit(cluster: Cluster, alias: str) -> Any:
    return cluster.engine(alias).connect().execution_options(isolation_level="AUTOCOMMIT")


def make_gid(txid: str, count: int, index: int) -> str:
    """The GID of participant ``index`` (of ``count``) of transaction ``txid``: ``shardkit_<txid>_<count>_<index>``."""
    gid = f"{GID_PREFIX}{txid}_{count}_{index}"
    if parse_gid(gid) is None:
        raise ShardkitError(f"not a shardkit two-phase GID: {gid!r}", gid=gid)
    return gid


def parse_gid(gid: str) -> str | None:
    """The ``txid`` of a GID that shardkit wrote, else ``None``.

    The whole GID is checked (prefix, 32 hex digits, participant count >= 2, index below
    it, nothing else), so a prepared transaction of another application is never taken
    for shardkit's, whatever its name looks like.
    """
    match = _GID_RE.fullmatch(gid)
    if match is None or int(match["count"]) < 2 or int(match["index"]) >= int(match["count"]):
        return None
    return match["txid"]


def _gid_literal(gid: str) -> str:
    """``gid`` as an SQL string literal, for statements that take no bind parameters."""
    if parse_gid(gid) is None:  # only shardkit's own GIDs are ever spliced into SQL
        raise ShardkitError(f"not a shardkit two-phase GID: {gid!r}", gid=gid)
    return "'" + gid.replace("'", "''") + "'"


def _brief(exc: BaseException) -> str:
    """``DriverError: first line`` of a database error (a driver's message holds no password)."""
    orig = getattr(exc, "orig", None)
    shown = orig if isinstance(orig, BaseException) else exc
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0].strip()}" if lines else type(shown).__name__


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def _discard(conn: Connection) -> None:
    """Never reuse ``conn`` (its state is unknown after a failure): a later rollback skips it."""
    with contextlib.suppress(Exception):
        conn.invalidate()


# -- the steps of a two-phase commit (module functions: one place each) -------------------


def _prepare(conn: Connection, gid: str) -> None:
    conn.exec_driver_sql(f"PREPARE TRANSACTION {_gid_literal(gid)}")


def _log_decision(cluster: Cluster, txid: str, aliases: list[str]) -> None:
    with cluster.engine().begin() as conn:
        twophase_log.create(conn, checkfirst=True)
        conn.execute(insert(twophase_log).values(txid=txid, aliases=",".join(aliases)))


def _finish_prepared(cluster: Cluster, alias: str, gid: str, verb: str) -> None:
    """``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` on a connection of its own."""
    with _autocommit(cluster, alias) as conn:
        conn.exec_driver_sql(f"{verb} PREPARED {_gid_literal(gid)}")


def _forget_decision(cluster: Cluster, txid: str) -> None:
    with cluster.engine().begin() as conn:
        conn.execute(delete(twophase_log).where(twophase_log.c.txid == txid))


def two_phase_commit(session: ShardSession, aliases: list[str]) -> None:
    """Prepare every alias, log the decision, commit every prepared transaction.

    Before the decision is logged, any failure rolls back every prepared transaction and
    is raised as it came.  Once it is logged the transaction *is* committed: every alias
    that can be reached gets ``COMMIT PREPARED`` even if another fails, then
    :class:`~shardkit.errors.TwoPhaseCommitError` names those done and those left prepared
    for :func:`recover` (which commits them at once, whatever ``min_age``).
    """
    cluster = session.cluster
    check_twophase_aliases(cluster, set(aliases))
    held = {id(conn.engine): conn for conn in _held_connections(session)}
    conns: dict[str, Connection] = {}
    for alias in aliases:  # two aliases sharing one engine share one connection: one participant
        conn = held[id(cluster.engine(alias))]
        if all(known is not conn for known in conns.values()):
            conns[alias] = conn
    aliases = list(conns)
    if len(aliases) < 2:
        return  # one database after all: its plain COMMIT is atomic
    txid = uuid.uuid4().hex
    # the alias is not in the GID (it may hold any character); its position is
    gids = {alias: make_gid(txid, len(aliases), i) for i, alias in enumerate(aliases)}
    attempted: list[str] = []
    try:
        for alias in aliases:
            attempted.append(alias)  # a PREPARE that failed may still have happened on the server
            try:
                _prepare(conns[alias], gids[alias])
            except BaseException:
                _discard(conns[alias])
                raise
    except BaseException:
        _roll_back_prepared(cluster, attempted, gids)
        raise
    try:
        _log_decision(cluster, txid, aliases)
    except BaseException as exc:
        # The decision's COMMIT may have reached 'default' before the failure.  Only once its
        # absence is certain may the participants be rolled back; else a participant that
        # cannot be rolled back would be committed by recovery while the others were not.
        try:
            with cluster.engine().begin() as conn:
                if inspect(conn).has_table(twophase_log.name):  # else it was never written
                    conn.execute(delete(twophase_log).where(twophase_log.c.txid == txid))
        except Exception:
            raise TwoPhaseCommitError(
                f"two-phase commit {txid}: logging the decision on 'default' failed ({_brief(exc)}) and "
                f"whether it was written cannot be checked: {', '.join(aliases)} stay prepared, holding their "
                "locks, until 'shardkit twophase recover' can read 'default': it commits them if the decision "
                "was written, else rolls them back",
                decision="unknown",
                txid=txid,
                committed=[],
                not_committed=list(aliases),
                errors={"default": exc},
            ) from exc
        _roll_back_prepared(cluster, aliases, gids)
        raise
    done: list[str] = []
    errors: dict[str, BaseException] = {}
    for alias in aliases:
        try:
            _finish_prepared(cluster, alias, gids[alias], "COMMIT")
        except Exception as exc:
            if _sqlstate(exc) != _PG_UNDEFINED_OBJECT:  # else recovery committed it already
                errors[alias] = exc
                _discard(conns[alias])
                continue
        done.append(alias)
    if errors:
        left = list(errors)
        first = errors[left[0]]
        raise TwoPhaseCommitError(
            f"two-phase commit {txid}: the decision is COMMIT (logged on 'default'); committed on "
            f"{', '.join(done) or 'no shard yet'}; COMMIT PREPARED failed on {', '.join(left)} "
            f"({_brief(first)}): those stay prepared, holding their locks, until "
            "'shardkit twophase recover' (or cluster.recover_twophase()) commits them",
            decision="commit",
            txid=txid,
            committed=done,
            not_committed=left,
            errors=errors,
        ) from first
    with contextlib.suppress(Exception):  # committed everywhere; a leftover row is removed by recover()
        _forget_decision(cluster, txid)


def _roll_back_prepared(cluster: Cluster, aliases: list[str], gids: dict[str, str]) -> None:
    """ROLLBACK PREPARED on each alias, even if one of them fails (recovery rolls back what is left)."""
    for alias in aliases:
        with contextlib.suppress(Exception):
            _finish_prepared(cluster, alias, gids[alias], "ROLLBACK")


# -- cross_shard_writes="allow": one connection after the other, in a known order ---------------


class CommitOrder:
    """Take over one ``Session.commit()`` of a transaction that holds several connections.

    SQLAlchemy commits a session's connections in no set order and stops at the first
    failure without saying which committed.  Made by ``ShardSession.commit`` before it calls
    ``Session.commit()``, and told (:meth:`add`) of every connection the transaction opens
    meanwhile (the final flush may open some), this hooks the ``commit`` event of each
    connection once there are two or more.  When SQLAlchemy commits the first of them (after
    ``before_commit`` listeners and the final flush ran, as usual), the hook:

    * with ``cross_shard_writes="twophase"`` and several written aliases, runs
      :func:`two_phase_commit` (SQLAlchemy's own COMMITs then find nothing left to do);
    * otherwise commits every connection one by one, in a known order (aliases only read
      from first, then the written ones, each in the order of DATABASES); if one fails, the
      later ones are rolled back and :class:`~shardkit.errors.PartialCommitError` is raised
      (or, if nothing had committed yet, the driver's error, as SQLAlchemy would raise it).

    One connection: nothing is hooked.  ``failed`` tells the session to roll back.
    """

    __slots__ = ("_conns", "_fired", "_hooked", "failed", "session")

    def __init__(self, session: ShardSession) -> None:
        self.session = session
        self._conns: list[Connection] = list(_held_connections(session))
        self._hooked = 0  # _conns[:_hooked] have the listener
        self._fired = False
        self.failed = False  #: the ordered (or two-phase) commit raised: roll the session back
        self._hook()

    def add(self, conn: Connection) -> None:
        """The transaction has begun on one more connection (a savepoint repeats one: ignored)."""
        if any(known is conn for known in self._conns) or conn not in _held_connections(self.session):
            return
        self._conns.append(conn)
        self._hook()

    def _hook(self) -> None:
        if len(self._conns) < 2:
            return
        for conn in self._conns[self._hooked :]:
            event.listen(conn, "commit", self._on_commit)
        self._hooked = len(self._conns)

    def _on_commit(self, conn: Connection) -> None:
        if self._fired:
            return
        self._fired = True
        session = self.session
        try:
            if session.cluster.cross_shard_writes != "twophase":
                _commit_each(session)
            elif len(session._tx_write_aliases) > 1:
                two_phase_commit(session, sorted(session._tx_write_aliases))
            # else one written alias: SQLAlchemy's own COMMITs are atomic enough
        except BaseException:
            self.failed = True
            raise


def _held_connections(session: ShardSession) -> list[Connection]:
    """Every connection the root transaction opened itself and will commit.

    A connection the session was given (``bind=`` a Connection, joined with a savepoint or
    rollback-only) is left out: its transaction belongs to the caller, never committed here.
    """
    trans = session.get_transaction()
    if trans is None or session.twophase:  # SQLAlchemy's own twophase=True session: its business
        return []
    # SQLAlchemy keeps them in SessionTransaction._connections: (conn, trans, should_commit, autoclose)
    # under two keys each (the connection and its engine)
    conns = {id(entry[0]): entry[0] for entry in trans._connections.values() if entry[2] and entry[3]}
    return list(conns.values())


def _transaction_connections(session: ShardSession) -> list[tuple[str, Connection]]:
    """(alias, connection) of every connection the root transaction will commit, in commit order:
    those with no known write first, then the written ones, each group in DATABASES order."""
    conns = _held_connections(session)
    aliases = session.cluster.aliases
    rank = {alias: i for i, alias in enumerate(aliases)}
    by_engine: dict[int, str] = {}
    for alias in reversed(aliases):  # two aliases sharing one engine: the first one names it
        engine = session.cluster._engines.get(alias)
        if engine is not None:
            by_engine[id(engine)] = alias
    found = [(by_engine.get(id(conn.engine), str(conn.engine.url.database)), conn) for conn in conns]
    # aliases this transaction is not known to have written to first: if one of them fails,
    # nothing that matters is committed yet and every write can still be rolled back
    written = session._tx_write_aliases
    return sorted(found, key=lambda item: (item[0] in written, rank.get(item[0], len(rank))))


def _commit_each(session: ShardSession) -> None:
    conns = _transaction_connections(session)
    committed: list[str] = []
    for position, (alias, conn) in enumerate(conns):
        try:
            conn.dialect.do_commit(conn.connection)  # what Connection.commit() runs
        except Exception as exc:
            _discard(conn)
            rest = conns[position + 1 :]
            for _, later in rest:
                try:
                    later.dialect.do_rollback(later.connection)
                except Exception:
                    _discard(later)
            error = _as_dbapi_error(conn, exc)
            if not committed:
                raise error from None
            rolled_back = [name for name, _ in rest]
            raise PartialCommitError(
                f"commit failed on {alias!r} ({_brief(error)}) after {', '.join(committed)} had committed "
                f"(cross_shard_writes='allow' commits one alias after the other); "
                f"{'rolled back on ' + ', '.join(rolled_back) if rolled_back else 'no alias was left to roll back'}. "
                f"The databases now disagree: {', '.join(committed)} hold this transaction's writes, "
                f"{', '.join([alias, *rolled_back])} do not (unless {alias!r} applied its COMMIT before the "
                "connection failed)",
                alias=alias,
                committed=committed,
                not_committed=[alias, *rolled_back],
                rolled_back=rolled_back,
            ) from error
        committed.append(alias)


def _as_dbapi_error(conn: Connection, exc: Exception) -> Exception:
    """The driver's error as SQLAlchemy would have raised it from ``Connection.commit()``."""
    if isinstance(exc, DBAPIError) or not isinstance(exc, conn.dialect.loaded_dbapi.Error):
        return exc
    return DBAPIError.instance(
        None, None, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=True, dialect=conn.dialect
    )


@dataclass(frozen=True)
class InDoubt:
    """One prepared transaction found by :func:`recover`, and what was (or would be) done."""

    alias: str
    gid: str
    txid: str
    action: str  # "commit" or "rollback"


def recover(cluster: Cluster, *, min_age: float = 60.0, dry_run: bool = False) -> list[InDoubt]:
    """Resolve prepared transactions left in doubt by a crash or a failed commit (presumed abort).

    Only prepared transactions whose GID shardkit wrote are ever touched (the whole GID is
    checked: see :func:`parse_gid`); another application's are left alone.  A transaction
    whose decision is logged is committed at once; one with no decision is rolled back once
    it has been prepared for ``min_age`` seconds.

    An alias that cannot be reached (or fails while resolving) does not stop the others:
    every other alias is resolved, then :class:`~shardkit.errors.TwoPhaseRecoveryError`
    names the aliases that failed (``errors``) and carries what was resolved (``resolved``).

    :param min_age: only roll back undecided transactions prepared at least this many
        seconds ago (a younger one may belong to a commit still in progress).
    :param dry_run: report what would be done, change nothing.
    :returns: every in-doubt transaction resolved (or, with ``dry_run``, to resolve).

    >>> for d in shardkit.twophase.recover(cluster, min_age=0):  # doctest: +SKIP
    ...     print(d.alias, d.gid, d.action)
    """
    errors: dict[str, BaseException] = {}
    # Scan first, read the decisions second: a decision logged between the two reads then
    # belongs to a transaction we have already seen, so it is honoured, never rolled back.
    scans: list[tuple[str, list[tuple[str, str, bool]]]] = []
    seen_databases: set[str] = set()
    for alias in cluster.aliases:
        spec = cluster.spec(alias)
        if spec.dialect_name != "postgresql":
            continue
        where = spec.url.set(password=None).render_as_string()
        if where in seen_databases:  # two aliases on one database: resolve its transactions once
            continue
        seen_databases.add(where)
        try:
            scans.append((alias, _scan(cluster, alias, min_age)))
        except Exception as exc:
            errors[alias] = exc
    decided: set[str] = set()
    settled: set[str] = set()  # decisions old enough that no commit can still be running on them
    try:
        with cluster.engine().connect() as conn:
            if inspect(conn).has_table(twophase_log.name):
                for txid, decided_at in conn.execute(select(twophase_log.c.txid, twophase_log.c.decided_at)):
                    decided.add(txid)
                    if decided_at is None or _age_seconds(decided_at) >= min_age:
                        settled.add(txid)
    except Exception as exc:  # without the decisions nothing can be resolved safely
        errors["default"] = exc
        raise _recovery_error(errors, []) from exc
    found: list[InDoubt] = []
    pending: set[str] = set()  # txids that still have a prepared transaction somewhere
    for alias, rows in scans:
        try:
            with _autocommit(cluster, alias) as conn:
                for gid, txid, old in rows:
                    if txid in decided:
                        action = "commit"  # decided: at once, whatever its age
                    elif old:
                        action = "rollback"
                    else:
                        pending.add(txid)  # no decision yet: its commit may still be running
                        continue
                    if dry_run:
                        pending.add(txid)
                    else:
                        verb = "COMMIT" if action == "commit" else "ROLLBACK"
                        try:
                            conn.exec_driver_sql(f"{verb} PREPARED {_gid_literal(gid)}")
                        except DBAPIError as exc:
                            if _sqlstate(exc) != _PG_UNDEFINED_OBJECT:
                                raise
                            continue  # resolved meanwhile, by its own commit or another recovery
                    found.append(InDoubt(alias, gid, txid, action))
        except Exception as exc:
            errors[alias] = exc
    if not dry_run and not errors:  # with an alias unscanned, a decision may still be needed there
        finished = settled - pending
        if finished:
            try:
                with cluster.engine().begin() as conn:
                    conn.execute(delete(twophase_log).where(twophase_log.c.txid.in_(sorted(finished))))
            except Exception as exc:
                errors["default"] = exc
    if errors:
        raise _recovery_error(errors, found) from next(iter(errors.values()))
    return found


def _scan(cluster: Cluster, alias: str, min_age: float) -> list[tuple[str, str, bool]]:
    """(gid, txid, old enough) of every prepared transaction of shardkit's on ``alias``'s database."""
    with _autocommit(cluster, alias) as conn:
        rows = conn.execute(
            text(
                "SELECT gid, prepared < now() - make_interval(secs => :age) AS old FROM pg_prepared_xacts "
                "WHERE database = current_database() AND substr(gid, 1, :n) = :prefix"
            ),
            {"prefix": GID_PREFIX, "n": len(GID_PREFIX), "age": float(min_age)},
        ).all()
    found = []
    for gid, old in rows:
        txid = parse_gid(gid)
        if txid is not None:  # anything else is not shardkit's: never touched
            found.append((gid, txid, bool(old)))
    return found


def _recovery_error(errors: dict[str, BaseException], resolved: list[InDoubt]) -> TwoPhaseRecoveryError:
    names = ", ".join(repr(alias) for alias in errors)
    details = "; ".join(f"{alias}: {_brief(exc)}" for alias, exc in errors.items())
    done = f"resolved {len(resolved)} in-doubt transaction(s) elsewhere" if resolved else "resolved nothing"
    return TwoPhaseRecoveryError(
        f"two-phase recovery could not finish on {names} ({details}); {done}; "
        "run it again once every alias can be reached",
        errors=dict(errors),
        resolved=list(resolved),
        aliases=list(errors),
    )


def _age_seconds(when: Any) -> float:
    if when.tzinfo is None:  # SQLite keeps no zone: it was written as UTC by server_default
        when = when.replace(tzinfo=UTC)
    return float((datetime.now(UTC) - when).total_seconds())
