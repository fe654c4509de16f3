"""Commits across shards: two-phase commit with a decision log, and ordered plain commits.

With ``Cluster(cross_shard_writes="twophase")``, a commit whose transaction holds several
connections first asks each PostgreSQL one whether its transaction wrote anything
(``txid_current_if_assigned()``: a transaction that inserted, updated, deleted, locked rows
or changed the schema has a transaction id, however the statement was sent: ORM, Core,
``text()``, ``session.connection().execute()``).  Those that did are the *participants*;
the others (and any other alias known to be only read from) are committed first, one by one.
Then, with two participants or more:

1. ``PREPARE TRANSACTION 'shardkit_<txid>_<n>_<i>'`` on every participant (``i`` of
   ``n``; any failure: every prepared one is rolled back, the commit raises the error);
2. the decision, a row ``(txid, decision='commit')`` in ``shardkit_twophase_log`` on the
   ``default`` alias, committed on its own connection;
3. ``COMMIT PREPARED`` on every participant that can be reached, then the log row is
   deleted.  If some cannot, :class:`~shardkit.errors.TwoPhaseCommitError` says the
   decision (commit), which aliases are done and which ones recovery will finish.

A crash or a failed ``COMMIT PREPARED`` can leave prepared transactions *in doubt*: they
hold their locks until resolved.  :func:`recover` resolves them by presumed abort: a
transaction whose commit decision is logged is committed everywhere at once; any other is
rolled back once it is older than ``min_age`` seconds, but only after recovery has written
an *abort* decision for it under the same key (``txid``).  The log's primary key makes the
two decisions exclusive: a committer that stalled past ``min_age`` and tries to log COMMIT
after recovery logged ABORT fails, rolls back and raises; a recovery that finds COMMIT
already logged commits instead of rolling back.  An abort row is kept for
:data:`ABORT_RETENTION` seconds after its transaction is gone, so a committer stalled that
long still finds it.  ``COMMIT PREPARED`` answering "no such GID" (SQLSTATE 42704) is
never taken as done: the participant's transaction status is asked for.  Only GIDs of
exactly shardkit's format are touched.

PostgreSQL needs ``max_prepared_transactions`` above zero for this; every participant must
be PostgreSQL (checked before anything is committed).

With ``cross_shard_writes="allow"``, :class:`CommitOrder` makes a commit over several
connections commit them one by one in the order of DATABASES, and a failure part way raise
:class:`~shardkit.errors.PartialCommitError` naming the aliases that committed and those
that did not.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
import weakref
from collections.abc import Callable
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
    literal,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError

from . import _sqla
from .errors import (
    CrossShardWriteError,
    PartialCommitError,
    ShardkitError,
    TwoPhaseCommitError,
    TwoPhaseRecoveryError,
    brief,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from ._cluster import Cluster
    from ._session import ShardSession

__all__ = ["ABORT_RETENTION", "CommitOrder", "InDoubt", "make_gid", "parse_gid", "recover", "two_phase_commit"]

GID_PREFIX = "shardkit_"
#: ``shardkit_<txid: 32 hex digits>_<participants>_<index>``, and nothing else
_GID_RE = re.compile(r"shardkit_(?P<txid>[0-9a-f]{32})_(?P<count>[1-9][0-9]{0,5})_(?P<index>0|[1-9][0-9]{0,5})")
_PG_UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a GID that no longer exists

#: Seconds an abort decision stays in the log after its last prepared transaction is gone.  A
#: committer that stalled before logging COMMIT (for longer than recovery's ``min_age``) must
#: still find the abort row when its INSERT finally arrives; a TCP connection gives up long before.
ABORT_RETENTION = 3600.0

COMMIT = "commit"
ABORT = "abort"

_metadata = MetaData()
twophase_log = Table(
    "shardkit_twophase_log",
    _metadata,
    Column("txid", String(32), primary_key=True),
    Column("aliases", String(2000), nullable=False),
    Column("decided_at", DateTime(timezone=True), server_default=func.now()),
    # 'commit' (written by the committer) or 'abort' (written by recovery, or by a committer
    # that could not log its commit); one row per txid: the first decision wins
    Column("decision", String(8), nullable=False, server_default=COMMIT),
)

logger = logging.getLogger(__name__)


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


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def _discard(conn: Connection) -> None:
    """Never reuse ``conn`` (its state is unknown after a failure): a later rollback skips it."""
    with contextlib.suppress(Exception):
        conn.invalidate()


def _note(exc: BaseException, message: str) -> None:
    """Say which alias failed, and what the databases hold, on an error raised as the driver gave it."""
    logger.warning("%s: %s", message, brief(exc))
    with contextlib.suppress(Exception):
        exc.add_note(f"shardkit: {message}")


# -- the decision log -----------------------------------------------------------------------

_log_ready: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose log table has every column


def _ensure_log(engine: Engine) -> None:
    """Create the decision log on ``engine``, or add the ``decision`` column to an older one.

    Runs in a transaction of its own (remembered per engine only once committed).
    """
    if engine in _log_ready:
        return
    try:
        with engine.begin() as conn:
            found = inspect(conn)
            if not found.has_table(twophase_log.name):
                twophase_log.create(conn)
            elif "decision" not in {col["name"] for col in found.get_columns(twophase_log.name)}:
                # written by an older shardkit: every row it holds is a commit decision
                conn.execute(
                    text(f"ALTER TABLE {twophase_log.name} ADD COLUMN decision VARCHAR(8) DEFAULT 'commit' NOT NULL")
                )
    except Exception:
        with engine.connect() as conn:  # another process made it meanwhile?
            found = inspect(conn)
            if not found.has_table(twophase_log.name) or "decision" not in {
                col["name"] for col in found.get_columns(twophase_log.name)
            }:
                raise
    _log_ready.add(engine)


def _read_decision(engine: Engine, txid: str) -> str | None:
    with engine.connect() as conn:
        found = conn.execute(select(twophase_log.c.decision).where(twophase_log.c.txid == txid)).scalar_one_or_none()
    return None if found is None else str(found)


def _record_abort(cluster: Cluster, txid: str, aliases: list[str]) -> tuple[str, bool]:
    """Log ABORT for ``txid`` unless a decision is logged already: ``(decision in the log, written here)``.

    The primary key makes it one decision per txid: whoever inserts first decides.
    """
    engine = cluster.engine()
    _ensure_log(engine)
    for _attempt in range(3):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":  # a committer's INSERT in flight holds the key
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
                conn.execute(insert(twophase_log).values(txid=txid, aliases=",".join(aliases), decision=ABORT))
            return ABORT, True
        except IntegrityError:
            pass
        found = _read_decision(engine, txid)
        if found is not None:
            return found, False
        # the row was deleted between the two statements (its transaction is finished): again
    raise ShardkitError(f"two-phase transaction {txid}: its decision keeps changing in the log", txid=txid)


# -- the steps of a two-phase commit (module functions: one place each) -------------------


def _prepare(conn: Connection, gid: str) -> None:
    conn.exec_driver_sql(f"PREPARE TRANSACTION {_gid_literal(gid)}")


def _log_decision(cluster: Cluster, txid: str, aliases: list[str]) -> None:
    """Log COMMIT for ``txid``; :class:`~sqlalchemy.exc.IntegrityError` if recovery logged ABORT first."""
    engine = cluster.engine()
    _ensure_log(engine)
    with engine.begin() as conn:
        conn.execute(insert(twophase_log).values(txid=txid, aliases=",".join(aliases), decision=COMMIT))


def _finish_prepared(cluster: Cluster, alias: str, gid: str, verb: str) -> None:
    """``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` on a connection of its own."""
    with _autocommit(cluster, alias) as conn:
        conn.exec_driver_sql(f"{verb} PREPARED {_gid_literal(gid)}")


def _forget_decision(cluster: Cluster, txid: str) -> None:
    with cluster.engine().begin() as conn:
        conn.execute(delete(twophase_log).where(twophase_log.c.txid == txid))


def _assigned_xid(conn: Connection) -> int | None:
    """The transaction id of ``conn``'s transaction if it wrote anything (PostgreSQL), else ``None``."""
    found = conn.exec_driver_sql("SELECT txid_current_if_assigned()").scalar()
    return None if found is None else int(found)


def _xact_status(cluster: Cluster, alias: str, xid: int | None) -> str | None:
    """'committed', 'aborted' or 'in progress' for ``xid`` on ``alias``; ``None`` if it cannot be told."""
    if xid is None:
        return None
    try:
        with _autocommit(cluster, alias) as conn:
            found = conn.execute(text("SELECT txid_status(:xid)"), {"xid": xid}).scalar()
    except Exception:
        return None
    return None if found is None else str(found)


def two_phase_commit(
    session: ShardSession, participants: list[tuple[str, Connection]], xids: dict[str, int] | None = None
) -> None:
    """Prepare every participant, log the decision, commit every prepared transaction.

    ``participants`` are ``(alias, connection)`` pairs, one per connection; ``xids`` the
    transaction id of each (from :func:`_assigned_xid`), used to tell what became of a
    prepared transaction that vanished.

    Before the decision is logged, any failure rolls back every prepared transaction and
    is raised as it came.  If two-phase recovery logged ABORT first (this commit stalled
    longer than its ``min_age``), everything is rolled back and
    :class:`~shardkit.errors.TwoPhaseCommitError` with ``decision == "abort"`` is raised.
    Once COMMIT is logged the transaction *is* committed: every alias that can be reached
    gets ``COMMIT PREPARED`` even if another fails, then
    :class:`~shardkit.errors.TwoPhaseCommitError` names those done and those left prepared
    for :func:`recover` (which commits them at once, whatever ``min_age``).
    """
    cluster = session.cluster
    conns = dict(participants)
    aliases = list(conns)
    xids = dict(xids or {})
    check_twophase_aliases(cluster, set(aliases))
    txid = uuid.uuid4().hex
    # the alias is not in the GID (it may hold any character); its position is
    gids = {alias: make_gid(txid, len(aliases), i) for i, alias in enumerate(aliases)}
    attempted: list[str] = []
    try:
        for alias in aliases:
            attempted.append(alias)  # a PREPARE that failed may still have happened on the server
            try:
                _prepare(conns[alias], gids[alias])
            except BaseException as exc:
                _discard(conns[alias])
                _note(exc, f"PREPARE TRANSACTION failed on {alias!r}; rolled back on every alias, nothing committed")
                raise
    except BaseException:
        _roll_back_prepared(cluster, attempted, gids)
        raise
    try:
        _log_decision(cluster, txid, aliases)
    except Exception as exc:
        _settle_unlogged(cluster, txid, aliases, gids, exc)  # raises unless COMMIT was logged after all
    _commit_prepared(cluster, txid, aliases, gids, conns, xids)


def _settle_unlogged(cluster: Cluster, txid: str, aliases: list[str], gids: dict[str, str], exc: Exception) -> None:
    """Logging COMMIT failed: find (or make) the decision, act on it; return only if it is COMMIT.

    Whether the COMMIT row reached ``default`` is unknown, and recovery may be at work: only
    once ABORT is the logged decision may the participants be rolled back (else a participant
    that cannot be rolled back could be committed by recovery while the others were not).
    """
    try:
        decision, ours = _record_abort(cluster, txid, aliases)
    except Exception:
        raise TwoPhaseCommitError(
            f"two-phase commit {txid}: logging the decision on 'default' failed ({brief(exc)}) and "
            f"whether it was written cannot be checked: {', '.join(aliases)} stay prepared, holding their "
            "locks, until 'shardkit twophase recover' can read 'default': it commits them if the decision "
            "was written, else rolls them back",
            decision="unknown",
            txid=txid,
            committed=[],
            not_committed=list(aliases),
            errors={"default": exc},
        ) from exc
    if decision == COMMIT:  # the COMMIT row did arrive: carry on as if its answer had
        return
    clean = _roll_back_prepared(cluster, aliases, gids)
    if ours:
        if clean:  # every participant is rolled back: nobody needs this abort row any more
            with contextlib.suppress(Exception):
                _forget_decision(cluster, txid)
        _note(exc, f"logging the decision on 'default' failed; rolled back on {', '.join(aliases)}, nothing committed")
        raise exc
    raise TwoPhaseCommitError(
        f"two-phase commit {txid}: not committed: two-phase recovery decided ABORT before this commit "
        f"could log COMMIT on 'default' (it was prepared longer than recovery's min_age with no decision, "
        f"'default' answered only after that); rolled back on {', '.join(aliases)}, nothing was committed",
        decision=ABORT,
        txid=txid,
        committed=[],
        not_committed=list(aliases),
        errors={"default": exc},
    ) from exc


def _commit_prepared(
    cluster: Cluster,
    txid: str,
    aliases: list[str],
    gids: dict[str, str],
    conns: dict[str, Connection],
    xids: dict[str, int],
) -> None:
    done: list[str] = []
    errors: dict[str, BaseException] = {}
    reasons: dict[str, str] = {}
    for alias in aliases:
        try:
            _finish_prepared(cluster, alias, gids[alias], "COMMIT")
        except Exception as exc:
            if _sqlstate(exc) != _PG_UNDEFINED_OBJECT:
                errors[alias] = exc
                reasons[alias] = f"COMMIT PREPARED failed ({brief(exc)}); it stays prepared"
                _discard(conns[alias])
                continue
            # the prepared transaction is gone: finished by someone else.  Never assume how.
            status = _xact_status(cluster, alias, xids.get(alias))
            if status != "committed":
                errors[alias] = exc
                reasons[alias] = (
                    "its prepared transaction was rolled back by someone else"
                    if status == "aborted"
                    else "its prepared transaction vanished and whether it committed cannot be told; check it"
                )
                continue
        done.append(alias)
    if errors:
        left = list(errors)
        first = errors[left[0]]
        recoverable = [a for a in left if reasons[a].endswith("stays prepared")]
        detail = "; ".join(f"{alias}: {reasons[alias]}" for alias in left)
        tail = (
            f"{', '.join(recoverable)} hold their locks until 'shardkit twophase recover' "
            "(or cluster.recover_twophase()) commits them"
            if recoverable
            else "recovery cannot finish them"
        )
        raise TwoPhaseCommitError(
            f"two-phase commit {txid}: the decision is COMMIT (logged on 'default'); committed on "
            f"{', '.join(done) or 'no shard yet'}; not on {', '.join(left)} ({detail}); {tail}",
            decision=COMMIT,
            txid=txid,
            committed=done,
            not_committed=left,
            errors=errors,
        ) from first
    with contextlib.suppress(Exception):  # committed everywhere; a leftover row is removed by recover()
        _forget_decision(cluster, txid)


def _roll_back_prepared(cluster: Cluster, aliases: list[str], gids: dict[str, str]) -> bool:
    """ROLLBACK PREPARED on each alias, even if one of them fails (recovery rolls back what is left).

    True if none is left prepared (rolled back here, or gone already).
    """
    clean = True
    for alias in aliases:
        try:
            _finish_prepared(cluster, alias, gids[alias], "ROLLBACK")
        except Exception as exc:
            if _sqlstate(exc) != _PG_UNDEFINED_OBJECT:
                clean = False
    return clean


# -- the commit of a transaction over several connections ----------------------------------------


def _listen_commit(conn: Connection, fn: Callable[[Connection], None]) -> None:
    """``event.listen(conn, "commit", fn)``, also on SQLAlchemy 2.0 releases that refuse it for a
    connection of an engine made by ``engine.execution_options()`` (its events are joined twice;
    later releases accept it): there the listener is put on the connection's own events directly,
    as ``event.listen`` itself would."""
    try:
        event.listen(conn, "commit", fn)
    except InvalidRequestError:
        _sqla.listen_on_connection(conn, "commit", fn)


class CommitOrder:
    """Take over one ``Session.commit()`` of a transaction that holds several connections.

    SQLAlchemy commits a session's connections in no set order and stops at the first
    failure without saying which committed.  Made by ``ShardSession.commit`` before it calls
    ``Session.commit()``, and told (:meth:`add`) of every connection the transaction opens
    meanwhile (the final flush may open some), this hooks the ``commit`` event of each
    connection once there are two or more.  When SQLAlchemy commits the first of them (after
    ``before_commit`` listeners and the final flush ran, as usual), the hook:

    * with ``cross_shard_writes="twophase"``: commits first the connections that wrote
      nothing (asked of PostgreSQL itself), then runs :func:`two_phase_commit` over those
      that wrote, if there are two or more (else commits the one that wrote last);
    * otherwise commits every connection one by one, in a known order (aliases only read
      from first, then the written ones, each in the order of DATABASES); if one fails, the
      later ones are rolled back and :class:`~shardkit.errors.PartialCommitError` is raised
      (or, if nothing had committed yet, the driver's error, as SQLAlchemy would raise it).

    SQLAlchemy's own COMMITs then find nothing left to do.  One connection: nothing is
    hooked.  ``failed`` tells the session to roll back.
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
            _listen_commit(conn, self._on_commit)
        self._hooked = len(self._conns)

    def _on_commit(self, conn: Connection) -> None:
        if self._fired:
            return
        self._fired = True
        session = self.session
        try:
            if session.cluster.cross_shard_writes == "twophase":
                _commit_twophase(session)
            else:
                _commit_each(_transaction_connections(session))
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
    return _sqla.committed_connections(trans)


def _transaction_connections(session: ShardSession) -> list[tuple[str, Connection]]:
    """(alias, connection) of every connection the root transaction will commit, in commit order:
    those with no known write first, then the written ones, each group in DATABASES order."""
    conns = _held_connections(session)
    aliases = session.cluster.aliases
    rank = {alias: i for i, alias in enumerate(aliases)}
    by_engine: dict[int, str] = {}
    for alias in reversed(aliases):  # two aliases sharing one engine: the first one names it
        engine = session.cluster.created_engine(alias)
        if engine is not None:
            by_engine[id(engine)] = alias
    found = [(by_engine.get(id(conn.engine), str(conn.engine.url.database)), conn) for conn in conns]
    # aliases this transaction is not known to have written to first: if one of them fails,
    # nothing that matters is committed yet and every write can still be rolled back
    written = session.tx_write_aliases
    first = session.info.get("shardkit.commit_first") or ()  # shardkit.lookups: lookups before their rows
    return sorted(found, key=lambda item: (item[0] in written, item[0] not in first, rank.get(item[0], len(rank))))


def _commit_twophase(session: ShardSession) -> None:
    """``cross_shard_writes="twophase"``: split the connections by what they did, commit accordingly."""
    conns = _transaction_connections(session)
    written = session.tx_write_aliases
    readers: list[tuple[str, Connection]] = []
    participants: list[tuple[str, Connection]] = []
    xids: dict[str, int] = {}
    for position, (alias, conn) in enumerate(conns):
        if conn.dialect.name == "postgresql":
            try:  # the server knows whether this transaction wrote, however the write was sent
                xid = _assigned_xid(conn)
            except Exception as exc:
                _discard(conn)
                _roll_back_each(conns[:position] + conns[position + 1 :])
                _note(exc, f"the commit failed on {alias!r} before any alias committed; rolled back on every alias")
                raise
            if xid is None:
                readers.append((alias, conn))
            else:
                participants.append((alias, conn))
                xids[alias] = xid
        elif alias in written:  # another database: only the writes shardkit routed are known
            participants.append((alias, conn))
        else:
            readers.append((alias, conn))
    if len(participants) > 1:
        check_twophase_aliases(session.cluster, {alias for alias, _ in participants})
    for position, (alias, conn) in enumerate(readers):  # they wrote nothing: a failure loses nothing
        try:
            conn.dialect.do_commit(conn.connection)
        except Exception as exc:
            _discard(conn)
            _roll_back_each(readers[position + 1 :] + participants)
            error = _as_dbapi_error(conn, exc)
            _note(
                error,
                f"the commit failed on {alias!r} (it wrote nothing) before any write was committed; "
                "rolled back on every alias that wrote",
            )
            raise error from None
    if len(participants) > 1:
        two_phase_commit(session, participants, xids)
    elif participants:  # one database wrote: its plain COMMIT is atomic
        alias, conn = participants[0]
        try:
            conn.dialect.do_commit(conn.connection)
        except Exception as exc:
            _discard(conn)
            error = _as_dbapi_error(conn, exc)
            _note(error, f"the commit failed on {alias!r}, the only alias this transaction wrote to")
            raise error from None


def _roll_back_each(conns: list[tuple[str, Connection]]) -> None:
    for _, conn in conns:
        try:
            conn.dialect.do_rollback(conn.connection)
        except Exception:
            _discard(conn)


def _commit_each(conns: list[tuple[str, Connection]]) -> None:
    committed: list[str] = []
    for position, (alias, conn) in enumerate(conns):
        try:
            conn.dialect.do_commit(conn.connection)  # what Connection.commit() runs
        except Exception as exc:
            _discard(conn)
            rest = conns[position + 1 :]
            _roll_back_each(rest)
            error = _as_dbapi_error(conn, exc)
            rolled_back = [name for name, _ in rest]
            if not committed:
                _note(
                    error,
                    f"the commit failed on {alias!r}, the first alias committed; "
                    f"{'rolled back on ' + ', '.join(rolled_back) if rolled_back else 'nothing else to roll back'}",
                )
                raise error from None
            raise PartialCommitError(
                f"commit failed on {alias!r} ({brief(error)}) after {', '.join(committed)} had committed "
                f"(the aliases are committed one after the other); "
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
    whose commit decision is logged is committed at once.  One with no decision is rolled
    back once it has been prepared for ``min_age`` seconds, after an abort decision is logged
    for it: a committer still trying to log COMMIT then fails and rolls back too, and if its
    COMMIT was logged first, the transaction is committed instead.

    Decision rows are removed once no prepared transaction needs them: a commit decision
    ``min_age`` seconds old, an abort decision :data:`ABORT_RETENTION` seconds old.

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
        if spec.dialect_name != "postgresql" or spec.replica_of is not None:  # a replica only replays them
            continue
        where = spec.url.set(password=None).render_as_string()
        if where in seen_databases:  # two aliases on one database: resolve its transactions once
            continue
        seen_databases.add(where)
        try:
            scans.append((alias, _scan(cluster, alias, min_age)))
        except Exception as exc:
            errors[alias] = exc
    try:
        decisions = _read_log(cluster, upgrade=not dry_run)
    except Exception as exc:  # without the decisions nothing can be resolved safely
        errors["default"] = exc
        raise _recovery_error(errors, []) from exc
    # undecided transactions old enough to roll back: log ABORT for each first (or learn it was
    # decided meanwhile); the participants found of each are recorded with it
    found_on: dict[str, list[str]] = {}
    overdue: set[str] = set()
    for alias, rows in scans:
        for _gid, txid, old in rows:
            found_on.setdefault(txid, []).append(alias)
            if old and txid not in decisions:
                overdue.add(txid)
    if not dry_run:
        for txid in sorted(overdue):
            try:
                decisions[txid] = (_record_abort(cluster, txid, found_on[txid])[0], 0.0)
            except Exception as exc:
                errors["default"] = exc  # undecided it stays: rolled back by a later run
    found: list[InDoubt] = []
    pending: set[str] = set()  # txids that still have a prepared transaction somewhere
    for alias, rows in scans:
        try:
            with _autocommit(cluster, alias) as conn:
                for gid, txid, _old in rows:
                    logged = decisions.get(txid)
                    if logged is not None and logged[0] == COMMIT:
                        action = "commit"  # decided: at once, whatever its age
                    elif (logged is not None and logged[0] == ABORT) or (dry_run and txid in overdue):
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
                                pending.add(txid)
                                raise
                            continue  # resolved meanwhile, by its own commit or another recovery
                    found.append(InDoubt(alias, gid, txid, action))
        except Exception as exc:
            errors[alias] = exc
    if not dry_run and not errors:  # with an alias unscanned, a decision may still be needed there
        keep_abort = max(float(min_age), ABORT_RETENTION)
        finished = sorted(
            txid
            for txid, (decision, age) in decisions.items()
            if txid not in pending and age >= (min_age if decision == COMMIT else keep_abort)
        )
        if finished:
            try:
                with cluster.engine().begin() as conn:
                    conn.execute(delete(twophase_log).where(twophase_log.c.txid.in_(finished)))
            except Exception as exc:
                errors["default"] = exc
    if errors:
        raise _recovery_error(errors, found) from next(iter(errors.values()))
    return found


def _read_log(cluster: Cluster, *, upgrade: bool) -> dict[str, tuple[str, float]]:
    """txid -> (decision, age in seconds) of every row of the decision log on ``default``."""
    engine = cluster.engine()
    with engine.connect() as conn:
        if not inspect(conn).has_table(twophase_log.name):
            return {}
    if upgrade:
        _ensure_log(engine)  # a log written by an older shardkit gets its decision column
    with engine.connect() as conn:
        columns = {col["name"] for col in inspect(conn).get_columns(twophase_log.name)}
        # a log an older shardkit wrote (read by a dry run) holds commit decisions only
        decision: Any = twophase_log.c.decision if "decision" in columns else literal(COMMIT)
        query = select(twophase_log.c.txid, twophase_log.c.decided_at, decision)
        found: dict[str, tuple[str, float]] = {}
        for txid, decided_at, outcome in conn.execute(query):
            age = float("inf") if decided_at is None else _age_seconds(decided_at)
            found[txid] = (str(outcome), age)
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
    details = "; ".join(f"{alias}: {brief(exc)}" for alias, exc in errors.items())
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
