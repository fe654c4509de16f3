"""FencingRouter: the router that keeps writes safe while a reshard cuts over, and follows the ring.

Every :class:`~shardkit.Cluster` whose router chain has a :class:`~shardkit.HashRingRouter`
gets one, first in the chain, unless the chain has one already (:func:`ensure_fencing`), and
it *follows* the cluster: at most once per ``poll_interval`` (1 s), before routing, it
re-reads the reshard state and the current ring stored on ``default`` and puts that ring in
the ring router.  No process has to opt in.

It passes (``None``) on everything except while a reshard on this cluster is in one of its
windows:

* **write fence** (phases ``fenced``, ``merging`` and ``switched``: from the start of the
  final catch-up until a grace period after the new ring is in place): a write of a key whose
  owner changes (old ring != new ring) raises :class:`~shardkit.reshard.ShardMovingError`
  naming the key; so does an UPDATE/DELETE statement on a moving table whose single key is
  not known.  Writes of keys that stay put are routed as usual.  Retry after a short sleep.
* **read fence** (phases ``merging``, ``switched`` and ``deleting``: from the merge of the
  copies until the old copies are deleted): a read of a moving table that would go to
  *every* shard (no shard key in WHERE) raises ``ShardMovingError``, because for that while
  some rows exist on two shards.  Reads that name their keys are routed by the ring.
* **unknown state**: when the state cannot be read from ``default`` while the last state
  read was an unfinished reshard, reads and writes of the moving tables raise
  ``ShardMovingError`` rather than risk routing by a ring that may be stale.

The database refuses the same writes by itself (:mod:`._dbfence`), so a process that is
behind, or is not shardkit at all, cannot break a reshard; this router gives the clear,
early error.  In the reshard's own process the :class:`~shardkit.reshard.Resharder` raises
and lifts the fences directly.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, select
from sqlalchemy.exc import NoInspectionAvailable

from .._find import ring_router_of
from .._routing import RouterChain
from ..errors import ShardMovingError, first_line
from ..ring import HashRing, HashRingRouter
from ..typing import ShardTargets

if TYPE_CHECKING:
    from .._cluster import Cluster

__all__ = ["FencingRouter", "attach_fencing", "ensure_fencing", "fences_of"]

logger = logging.getLogger(__name__)
_now = time.monotonic

WRITE_PHASES = frozenset(("fenced", "merging", "switched"))
READ_PHASES = frozenset(("merging", "switched", "deleting"))


@dataclass(frozen=True)
class _Fence:
    router: HashRingRouter
    old: HashRing
    new: HashRing
    tables: frozenset[str]
    writes: bool
    reads: bool


def ensure_fencing(routers: Sequence[Any], *args: Any, **kwargs: Any) -> RouterChain:
    """The router chain of a cluster: ``RouterChain(routers, *args, **kwargs)``, and when it has a
    ring router but no :class:`FencingRouter`, one more, hidden, asked first: every process of a
    sharded cluster follows its reshards without saying so.  (Hidden: ``chain.routers`` lists
    the routers as given; the hidden one is ``chain.fencing``.)"""
    loaded = [RouterChain._load(r) for r in routers]
    if not any(isinstance(r, HashRingRouter) for r in loaded) or any(isinstance(r, FencingRouter) for r in loaded):
        return RouterChain(loaded, *args, **kwargs)
    fence = FencingRouter()
    chain = RouterChain([fence, *loaded], *args, **kwargs)
    chain.routers = loaded  # the methods of the fence stay first in the chain's lookups
    chain.fencing = fence  # type: ignore[attr-defined]
    return chain


def fences_of(cluster: Cluster) -> list[FencingRouter]:
    """Every :class:`FencingRouter` of the cluster's chain, the hidden one included."""
    found = [r for r in cluster.router.routers if isinstance(r, FencingRouter)]
    hidden = getattr(cluster.router, "fencing", None)
    return [hidden, *found] if isinstance(hidden, FencingRouter) else found


def _shared_default(cluster: Cluster) -> bool:
    """False for an in-memory SQLite ``default``: nothing another process could have stored."""
    if "default" not in cluster.aliases:
        return False
    url = cluster.spec("default").url
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


def _table_name(model: Any) -> str | None:
    table = getattr(model, "__table__", None)
    if table is None:
        try:
            table = inspect(model).local_table
        except (NoInspectionAvailable, AttributeError):
            return None
    return getattr(table, "fullname", None)


class FencingRouter:
    """Refuses writes to keys that are moving during a reshard's cut-over, and keeps the ring
    router on the ring stored on ``default`` (see the module doc).

    :param poll_interval: re-read the reshard state and the stored ring from ``default`` at
        most this often (seconds), before routing.  Run reshards with a ``fence_grace`` above it.
    """

    def __init__(self, poll_interval: float = 1.0) -> None:
        self.poll_interval = poll_interval
        self._fence: _Fence | None = None
        self._cluster: Cluster | None = None
        self._next_poll = 0.0  # time.monotonic() of the next read of the stored state
        self._poll_lock = threading.Lock()
        self._manual = False  # the Resharder of this process drives the fence
        self._ring_version: int | None = None
        self._reshard: tuple[int, HashRing, HashRing] | None = None
        self._active = False  # the last state read was an unfinished reshard
        self._tables: frozenset[str] = frozenset()  # and the tables it moves
        self._unknown: str | None = None  # why the state could not be read

    # -- control (the Resharder in-process; the stored state otherwise) ------------------
    def fence(
        self, router: HashRingRouter, old: HashRing, new: HashRing, tables: Any, *, writes: bool, reads: bool
    ) -> None:
        """Raise (or change) the fences for ``tables`` moving from ``old`` to ``new``; until
        :meth:`follow`, the stored state no longer changes them."""
        self._manual = True
        self._fence = _Fence(router, old, new, frozenset(tables), writes, reads) if writes or reads else None

    def lift(self) -> None:
        """Lift every fence (until :meth:`follow`, the stored state no longer raises them)."""
        self._manual = True
        self._fence = None

    def follow(self) -> None:
        """Go back to following the state stored on ``default`` (at the next poll)."""
        self._manual = False
        self._next_poll = 0.0
        self._ring_version = None

    @property
    def active(self) -> tuple[bool, bool]:
        """(write fence up, read fence up)."""
        f = self._fence
        return (False, False) if f is None else (f.writes, f.reads)

    def attach(self, cluster: Cluster) -> None:
        """Follow ``cluster`` (called by the cluster itself, whose chain this router is in)."""
        if _shared_default(cluster):
            self.watch(cluster)

    def watch(self, cluster: Cluster) -> FencingRouter:
        """Follow the reshard state and the ring stored on ``cluster``'s ``default``."""
        self._cluster = cluster
        self._next_poll = 0.0
        return self

    def _poll(self) -> None:
        cluster = self._cluster
        if cluster is None:
            self._next_poll = float("inf")
            return
        with self._poll_lock:
            if _now() < self._next_poll:
                return
            self._next_poll = _now() + self.poll_interval
            router = ring_router_of(cluster)
            if router is None:
                return
            try:
                self._read_state(cluster, router)
                self._unknown = None
            except Exception as exc:  # default unreachable: keep the last state, say so
                self._next_poll = _now() + self.poll_interval / 4  # try again soon
                first = first_line(exc)
                if self._unknown is None:  # loud only when it matters: a reshard was under way
                    level = logging.WARNING if self._active else logging.DEBUG
                    logger.log(level, "cannot read the reshard state from default: %s", first)
                self._unknown = first

    def _read_state(self, cluster: Cluster, router: HashRingRouter) -> None:
        from sqlalchemy.pool import SingletonThreadPool, StaticPool

        from ._state import reshards, rings

        engine = cluster.engine("default")
        if isinstance(engine.pool, SingletonThreadPool | StaticPool):
            # one shared connection: reading here could end a transaction of the caller's session
            self._cluster = None
            return
        with engine.connect() as conn:
            if not inspect(conn).has_table(reshards.name):
                self._active = False
                if not self._manual:
                    self._fence = None
                return
            row = conn.execute(select(rings.c.version).where(rings.c.id == 1)).first()
            if row is not None and row.version != self._ring_version:
                ring_text = conn.execute(select(rings.c.ring).where(rings.c.id == 1)).scalar_one()
                current = HashRing.from_dict(json.loads(ring_text))
                self._ring_version = current.version
                if current.version != router.ring.version and not self._manual:
                    router.ring = current
            state = conn.execute(
                select(reshards.c.id, reshards.c.phase, reshards.c.tables)
                .where(reshards.c.phase != "done")
                .order_by(reshards.c.id.desc())
                .limit(1)
            ).first()
            if state is not None and (self._reshard is None or self._reshard[0] != state.id):
                old_text, new_text = conn.execute(
                    select(reshards.c.old_ring, reshards.c.new_ring).where(reshards.c.id == state.id)
                ).one()
                self._reshard = (
                    state.id,
                    HashRing.from_dict(json.loads(old_text)),
                    HashRing.from_dict(json.loads(new_text)),
                )
        self._active = state is not None
        self._tables = frozenset(json.loads(state.tables)) if state is not None else frozenset()
        if self._manual:
            return
        if state is None or self._reshard is None:
            self._fence = None
            return
        _, old, new = self._reshard
        writes, reads = state.phase in WRITE_PHASES, state.phase in READ_PHASES
        self._fence = _Fence(router, old, new, self._tables, writes, reads) if writes or reads else None

    # -- the router methods ---------------------------------------------------------------
    def _guard(self, model: Any) -> tuple[_Fence | None, str]:
        """(the fence if ``model``'s table is fenced, its table name); raises while the state
        of a reshard under way cannot be read."""
        if _now() >= self._next_poll:
            self._poll()
        f = self._fence
        if f is None and self._unknown is None:
            return None, ""
        table = _table_name(model)
        if table is None:
            return None, ""
        if self._unknown is not None and self._active and not self._manual and table in self._tables:
            raise ShardMovingError(
                f"{table} is being resharded and the reshard's state cannot be read from default "
                f"({self._unknown}); the ring of this process may be stale: retry shortly",
                key=None,
                table=table,
            )
        if f is None or table not in f.tables:
            return None, table
        return f, table

    def _moving(self, f: _Fence, table: str, key: Any, model: Any) -> None:
        if key is None:
            return
        convert = getattr(f.router._spec(model), "key", None)  # "5" on an integer column is 5
        if convert is not None:
            key = convert(key)
        if f.old.get(key) != f.new.get(key):
            raise ShardMovingError(
                f"key {key!r} of {table} is moving from {f.old.get(key)} to {f.new.get(key)}; retry shortly",
                key=key,
                table=table,
            )

    def _write_fence(self, model: Any) -> tuple[_Fence, str] | None:
        if self._fence is None and self._unknown is None and _now() < self._next_poll:
            return None  # the common case, kept short: no reshard under way
        f, table = self._guard(model)
        return (f, table) if f is not None and f.writes else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        fenced = self._write_fence(model)
        if fenced is None:
            return None
        f, table = fenced
        instance = hints.get("instance")
        key = hints.get("shard_key")
        if key is None and instance is None:
            raise ShardMovingError(
                f"writes by statement to {table} are refused while its rows move to new shards; retry shortly",
                key=None,
                table=table,
            )
        alias = f.router.db_for_write(model, **hints)  # assigns a generated id first, if needed
        if not isinstance(alias, str):
            return None
        if key is None:
            spec = f.router.shard_key_column(model)
            key = getattr(instance, spec[0]) if spec is not None else None
        self._moving(f, table, key, model)
        return alias

    def db_for_write_instances(self, model: Any, instances: list[Any], **hints: Any) -> list[str] | None:
        """Many new instances at once: passes unless fenced, then checks each key."""
        fenced = self._write_fence(model)
        if fenced is None:
            return None
        f, table = fenced
        method = getattr(f.router, "db_for_write_instances", None)
        spec = f.router.shard_key_column(model)
        if method is None or spec is None:
            return [self.db_for_write(model, instance=i, **hints) or "" for i in instances]
        aliases = method(model, instances, **hints)
        for instance in instances:
            self._moving(f, table, getattr(instance, spec[0], None), model)
        return aliases  # type: ignore[no-any-return]

    def db_for_write_rows(self, model: Any, rows: list[dict[str, Any]], **hints: Any) -> list[str] | None:
        """Many rows at once: passes unless fenced, then checks each row's key."""
        fenced = self._write_fence(model)
        if fenced is None:
            return None
        f, table = fenced
        method = getattr(f.router, "db_for_write_rows", None)
        spec = f.router.shard_key_column(model)
        if method is None or spec is None:
            raise ShardMovingError(
                f"bulk writes to {table} are refused while its rows move to new shards; retry shortly",
                key=None,
                table=table,
            )
        aliases = method(model, rows, **hints)  # may fill in generated keys
        column = spec[1]
        for row in rows:
            key = row.get(spec[0], row.get(getattr(column, "key", spec[0])))
            self._moving(f, table, key, model)
        return aliases  # type: ignore[no-any-return]

    def db_for_read(self, model: Any, **hints: Any) -> str | ShardTargets | None:
        if self._fence is None and self._unknown is None and _now() < self._next_poll:
            return None  # the common case, kept short: no reshard under way
        f, table = self._guard(model)
        if f is None or not f.reads:
            return None
        target = f.router.db_for_read(model, **hints)
        if isinstance(target, ShardTargets) and target.all_shards:
            raise ShardMovingError(
                f"a read of every shard of {table} is refused while moved rows are being cleaned up; retry shortly",
                key=None,
                table=table,
            )
        return None


def attach_fencing(cluster: Cluster) -> None:
    """Let the cluster's fencing routers follow it (called by :class:`~shardkit.Cluster`)."""
    for router in fences_of(cluster):
        router.attach(cluster)
