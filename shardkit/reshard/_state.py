"""The reshard's state, kept in tables on the ``default`` database.

* ``shardkit_reshard``: one row per reshard: the old and new ring (``to_dict()`` JSON), the
  tables it moves, its phase (``copying`` -> ``fenced`` -> ``merging`` -> ``switched`` ->
  ``deleting`` -> ``done``) and timestamps.  At most one row is not ``done``: the active reshard.
* ``shardkit_reshard_progress``: per reshard, step (``copy`` / ``delete``), table and source
  shard, the last primary key done (JSON) and the rows moved so far.
* ``shardkit_ring``: the current ring (JSON + version), written at cut-over; read it with
  :func:`load_current_ring`.
* ``shardkit_reshard_lease``: who runs the reshard (``host:pid``) and its heartbeat.  On
  PostgreSQL the lock itself is a session advisory lock (released by the server when the
  holder dies, even by SIGKILL); elsewhere the lease is taken over when its heartbeat is older
  than the TTL or its holder is a dead process of this host.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    text,
)

from ..errors import ReshardLockedError
from ..ring import HashRing

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from .._cluster import Cluster

__all__ = ["ACTIVE_PHASES", "PHASES", "Lease", "ReshardState", "StateStore", "load_current_ring", "owner_name"]

PHASES = ("copying", "fenced", "merging", "switched", "deleting", "done")
ACTIVE_PHASES = PHASES[:-1]

_ADVISORY_KEY = 0x5348_4B52  # "SHKR": the reshard lock's key on PostgreSQL

metadata = MetaData()
reshards = Table(
    "shardkit_reshard",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("old_ring", Text, nullable=False),
    Column("new_ring", Text, nullable=False),
    Column("tables", Text, nullable=False),
    Column("phase", String(20), nullable=False),
    Column("started", Float, nullable=False),
    Column("updated", Float, nullable=False),
)
progress = Table(
    "shardkit_reshard_progress",
    metadata,
    Column("reshard_id", Integer, primary_key=True, autoincrement=False),
    Column("step", String(10), primary_key=True),
    Column("tbl", String(255), primary_key=True),
    Column("source", String(255), primary_key=True),
    Column("last_pk", Text),
    Column("rows", BigInteger, nullable=False, default=0),
    Column("done", Boolean, nullable=False, default=False),
)
rings = Table(
    "shardkit_ring",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("ring", Text, nullable=False),
    Column("reshard_id", Integer),
    Column("updated", Float, nullable=False),
)
leases = Table(
    "shardkit_reshard_lease",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(255)),
    Column("heartbeat", Float),
)


def owner_name() -> str:
    """``host:pid`` of this process: who holds a reshard lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dumps(ring: HashRing) -> str:
    return json.dumps(ring.to_dict(), sort_keys=True)


@dataclass
class ReshardState:
    """The active (or last) reshard as stored on ``default``."""

    id: int
    old_ring: HashRing
    new_ring: HashRing
    tables: list[str]
    phase: str
    started: float


@dataclass
class Progress:
    last_pk: list[Any] | None
    rows: int
    done: bool


def _has_tables(conn: Connection) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(conn).has_table("shardkit_ring"))


def load_current_ring(cluster: Cluster) -> HashRing | None:
    """The ring the last reshard switched the cluster to (stored on ``default``), or ``None``
    when no reshard ever finished its cut-over (then the ring of your settings is current).

    Every process should build its :class:`~shardkit.ring.HashRingRouter` from this ring when
    there is one::

        ring = load_current_ring(cluster) or HashRing.from_dict(settings.SHARDKIT_RING)
    """
    with cluster.engine("default").connect() as conn:
        if not _has_tables(conn):
            return None
        row = conn.execute(select(rings.c.ring).where(rings.c.id == 1)).first()
    return None if row is None else HashRing.from_dict(json.loads(row[0]))


class StateStore:
    """Reads and writes the state tables on the ``default`` database of ``cluster``."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.engine: Engine = cluster.engine("default")

    def exists(self) -> bool:
        with self.engine.connect() as conn:
            return _has_tables(conn)

    def ensure(self) -> None:
        metadata.create_all(self.engine, checkfirst=True)

    # -- the reshard row ----------------------------------------------------
    def active(self) -> ReshardState | None:
        if not self.exists():
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(reshards).where(reshards.c.phase != "done").order_by(reshards.c.id.desc()).limit(1)
            ).first()
        if row is None:
            return None
        return ReshardState(
            id=row.id,
            old_ring=HashRing.from_dict(json.loads(row.old_ring)),
            new_ring=HashRing.from_dict(json.loads(row.new_ring)),
            tables=json.loads(row.tables),
            phase=row.phase,
            started=row.started,
        )

    def create(self, old: HashRing, new: HashRing, tables: list[str]) -> ReshardState:
        now = time.time()
        with self.engine.begin() as conn:
            result = conn.execute(
                reshards.insert().values(
                    old_ring=_dumps(old),
                    new_ring=_dumps(new),
                    tables=json.dumps(tables),
                    phase="copying",
                    started=now,
                    updated=now,
                )
            )
            pk = result.inserted_primary_key
            assert pk is not None
            rid = int(pk[0])
        return ReshardState(rid, old, new, tables, "copying", now)

    def set_phase(self, state: ReshardState, phase: str, *, ring: HashRing | None = None) -> None:
        """Store the phase (and, at cut-over, the new current ring) in one transaction."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(reshards.update().where(reshards.c.id == state.id).values(phase=phase, updated=now))
            if ring is not None:
                values = {
                    "version": ring.version,
                    "generation": ring.generation,
                    "ring": _dumps(ring),
                    "reshard_id": state.id,
                    "updated": now,
                }
                if conn.execute(rings.update().where(rings.c.id == 1).values(**values)).rowcount == 0:
                    conn.execute(rings.insert().values(id=1, **values))
        state.phase = phase

    # -- progress -------------------------------------------------------------
    def progress(self, state: ReshardState, step: str, table: str, source: str) -> Progress:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(progress.c.last_pk, progress.c.rows, progress.c.done).where(
                    progress.c.reshard_id == state.id,
                    progress.c.step == step,
                    progress.c.tbl == table,
                    progress.c.source == source,
                )
            ).first()
        if row is None:
            return Progress(None, 0, False)
        return Progress(None if row.last_pk is None else json.loads(row.last_pk), int(row.rows), bool(row.done))

    def save_progress(
        self, state: ReshardState, step: str, table: str, source: str, last_pk: list[Any] | None, rows: int, done: bool
    ) -> None:
        where = (
            (progress.c.reshard_id == state.id)
            & (progress.c.step == step)
            & (progress.c.tbl == table)
            & (progress.c.source == source)
        )
        values = {"last_pk": None if last_pk is None else json.dumps(last_pk), "rows": rows, "done": done}
        with self.engine.begin() as conn:
            if conn.execute(progress.update().where(where).values(**values)).rowcount == 0:
                conn.execute(
                    progress.insert().values(reshard_id=state.id, step=step, tbl=table, source=source, **values)
                )

    def all_progress(self, state: ReshardState) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(progress).where(progress.c.reshard_id == state.id)).mappings().all()
        return [dict(r) for r in rows]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process: alive
        return True
    return True


class Lease:
    """The one-reshard-at-a-time lock, on the ``default`` database.

    :param ttl: (not PostgreSQL) a lease whose heartbeat is older than this many seconds is
        taken over; so is one held by a dead process of this host.
    """

    def __init__(self, store: StateStore, *, ttl: float = 60.0) -> None:
        self.store = store
        self.ttl = ttl
        self.owner = owner_name()
        self._conn: Connection | None = None
        self._last_beat = 0.0

    def _holder(self) -> tuple[str | None, float | None]:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(leases.c.owner, leases.c.heartbeat).where(leases.c.id == 1)).first()
        return (None, None) if row is None else (row.owner, row.heartbeat)

    def _refuse(self) -> ReshardLockedError:
        owner, beat = self._holder()
        age = f", last heartbeat {time.time() - beat:.0f}s ago" if beat else ""
        return ReshardLockedError(
            f"another reshard is running (held by {owner or 'an unknown process'}{age}); "
            "wait for it to finish, or stop it: a killed reshard resumes where it stopped",
            owner=owner,
        )

    def acquire(self) -> None:
        engine = self.store.engine
        now = time.time()
        if engine.dialect.name == "postgresql":
            conn = engine.connect()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _ADVISORY_KEY}).scalar()
            conn.commit()  # a session-level lock outlives the transaction
            if not got:
                conn.close()
                raise self._refuse()
            self._conn = conn
            with engine.begin() as c:
                if (
                    c.execute(leases.update().where(leases.c.id == 1).values(owner=self.owner, heartbeat=now)).rowcount
                    == 0
                ):
                    c.execute(leases.insert().values(id=1, owner=self.owner, heartbeat=now))
            self._last_beat = now
            return
        owner, _ = self._holder()
        with engine.begin() as c:
            if owner is None and c.execute(select(leases.c.id).where(leases.c.id == 1)).first() is None:
                c.execute(leases.insert().values(id=1, owner=None, heartbeat=None))
        dead = ""
        host, _, pid = (owner or "").rpartition(":")
        if owner and host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            dead = owner
        with engine.begin() as c:
            taken = c.execute(
                leases.update()
                .where(
                    (leases.c.id == 1)
                    & (
                        leases.c.owner.is_(None)
                        | (leases.c.owner == self.owner)
                        | (leases.c.owner == dead)
                        | (leases.c.heartbeat < now - self.ttl)
                    )
                )
                .values(owner=self.owner, heartbeat=now)
            ).rowcount
        if taken != 1:
            raise self._refuse()
        self._last_beat = now

    def beat(self, *, every: float = 2.0) -> None:
        """Refresh the heartbeat (at most every ``every`` seconds)."""
        now = time.time()
        if now - self._last_beat < every:
            return
        self._last_beat = now
        with self.store.engine.begin() as c:
            c.execute(leases.update().where((leases.c.id == 1) & (leases.c.owner == self.owner)).values(heartbeat=now))

    def release(self) -> None:
        with self.store.engine.begin() as c:
            c.execute(leases.update().where((leases.c.id == 1) & (leases.c.owner == self.owner)).values(owner=None))
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _ADVISORY_KEY})
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None
