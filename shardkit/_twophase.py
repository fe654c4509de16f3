"""Atomic commits across PostgreSQL shards: two-phase commit with a decision log.

With ``Cluster(cross_shard_writes="twophase")``, a commit that wrote to more
than one alias runs:

1. ``PREPARE TRANSACTION 'shardkit_<txid>_<n>_<alias>'`` on every written
   alias (any failure: every prepared one is rolled back, the commit raises);
2. the decision, a row with ``txid`` in ``shardkit_twophase_log`` on the
   ``default`` alias, committed on its own connection;
3. ``COMMIT PREPARED`` on every alias, then the log row is deleted.

A crash can leave prepared transactions *in doubt*: they hold their locks
until resolved.  :func:`recover` resolves them by presumed abort: a
transaction whose decision row exists is committed everywhere, any other is
rolled back everywhere, so no write is ever half applied.  Run it after a
crash (``shardkit twophase recover``); it only touches transactions prepared
longer ago than ``min_age`` seconds, so it never races a commit in progress.

PostgreSQL needs ``max_prepared_transactions`` above zero for this; every
written alias must be PostgreSQL (checked before anything is written).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, DateTime, MetaData, String, Table, delete, func, insert, select, text

from .errors import CrossShardWriteError

if TYPE_CHECKING:
    from ._cluster import Cluster
    from ._session import ShardSession

__all__ = ["InDoubt", "recover", "two_phase_commit"]

GID_PREFIX = "shardkit_"

_metadata = MetaData()
twophase_log = Table(
    "shardkit_twophase_log",
    _metadata,
    Column("txid", String(32), primary_key=True),
    Column("aliases", String(2000), nullable=False),
    Column("decided_at", DateTime(timezone=True), server_default=func.now()),
)


def _crash_point(name: str) -> None:
    """Test hook: ``SHARDKIT_TEST_CRASH=<name>`` kills the process at that point (SIGKILL)."""
    if os.environ.get("SHARDKIT_TEST_CRASH") == name:  # pragma: no cover - the process dies
        os.kill(os.getpid(), signal.SIGKILL)


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


def two_phase_commit(session: ShardSession, aliases: list[str]) -> None:
    """Prepare every alias, log the decision, commit every prepared transaction."""
    cluster = session.cluster
    check_twophase_aliases(cluster, set(aliases))
    txid = uuid.uuid4().hex
    # the alias is not in the GID (it may hold any character); its position is
    gids = {alias: f"{GID_PREFIX}{txid}_{len(aliases)}_{i}" for i, alias in enumerate(aliases)}
    conns = {alias: session.connection(bind_arguments={"shard_id": alias}) for alias in aliases}
    prepared: list[str] = []
    try:
        for alias in aliases:
            conns[alias].exec_driver_sql(f"PREPARE TRANSACTION '{gids[alias]}'")
            prepared.append(alias)
            _crash_point("after_prepare")
        with cluster.engine().begin() as conn:
            twophase_log.create(conn, checkfirst=True)
            conn.execute(insert(twophase_log).values(txid=txid, aliases=",".join(aliases)))
    except BaseException:
        for alias in prepared:  # every one, even if one of them fails; then the original error
            with contextlib.suppress(Exception), _autocommit(cluster, alias) as conn:
                conn.exec_driver_sql(f"ROLLBACK PREPARED '{gids[alias]}'")
        raise
    _crash_point("after_decision")
    for alias in aliases:
        with _autocommit(cluster, alias) as conn:
            conn.exec_driver_sql(f"COMMIT PREPARED '{gids[alias]}'")
    with cluster.engine().begin() as conn:
        conn.execute(delete(twophase_log).where(twophase_log.c.txid == txid))


@dataclass(frozen=True)
class InDoubt:
    """One prepared transaction found by :func:`recover`, and what was (or would be) done."""

    alias: str
    gid: str
    txid: str
    action: str  # "commit" or "rollback"


def recover(cluster: Cluster, *, min_age: float = 60.0, dry_run: bool = False) -> list[InDoubt]:
    """Resolve prepared transactions left in doubt by a crash (presumed abort).

    :param min_age: only transactions prepared at least this many seconds ago (a younger one
        may belong to a commit still in progress).
    :param dry_run: report what would be done, change nothing.
    :returns: every in-doubt transaction resolved (or, with ``dry_run``, to resolve).

    >>> for d in shardkit.twophase.recover(cluster, min_age=0):  # doctest: +SKIP
    ...     print(d.alias, d.gid, d.action)
    """
    # Scan first, read the decisions second: a decision logged between the two reads then
    # belongs to a transaction we have already seen, so it is honoured, never rolled back.
    scans: list[tuple[str, list[Any]]] = []
    seen_databases: set[str] = set()
    for alias in cluster.aliases:
        spec = cluster.spec(alias)
        if spec.dialect_name != "postgresql":
            continue
        where = spec.url.set(password=None).render_as_string()
        if where in seen_databases:  # two aliases on one database: resolve its transactions once
            continue
        seen_databases.add(where)
        with _autocommit(cluster, alias) as conn:
            rows = conn.execute(
                text(
                    "SELECT gid, prepared < now() - make_interval(secs => :age) AS old "
                    "FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE :prefix"
                ),
                {"prefix": GID_PREFIX + "%", "age": float(min_age)},
            ).all()
        scans.append((alias, list(rows)))
    decided: set[str] = set()
    settled: set[str] = set()  # decisions old enough that no commit can still be running on them
    with cluster.engine().connect() as conn:
        if _has_log(conn):
            for txid, decided_at in conn.execute(select(twophase_log.c.txid, twophase_log.c.decided_at)):
                decided.add(txid)
                if decided_at is None or _age_seconds(decided_at) >= min_age:
                    settled.add(txid)
    found: list[InDoubt] = []
    pending: set[str] = set()  # txids that still have a prepared transaction somewhere
    for alias, rows in scans:
        with _autocommit(cluster, alias) as conn:
            for gid, old in rows:
                txid = gid[len(GID_PREFIX) :].split("_", 1)[0]
                if not old or dry_run:
                    pending.add(txid)
                    if not old:
                        continue
                action = "commit" if txid in decided else "rollback"
                if not dry_run:
                    verb = "COMMIT" if action == "commit" else "ROLLBACK"
                    conn.exec_driver_sql(f"{verb} PREPARED '{gid}'")
                found.append(InDoubt(alias, gid, txid, action))
    finished = settled - pending
    if finished and not dry_run:
        with cluster.engine().begin() as conn:
            conn.execute(delete(twophase_log).where(twophase_log.c.txid.in_(sorted(finished))))
    return found


def _age_seconds(when: Any) -> float:
    from datetime import datetime

    if when.tzinfo is None:  # SQLite keeps no zone: it was written as UTC by server_default
        when = when.replace(tzinfo=UTC)
    return float((datetime.now(UTC) - when).total_seconds())


def _has_log(conn: Any) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(conn).has_table(twophase_log.name))
