"""FencingRouter: the router that keeps writes safe while a reshard cuts over.

Put it **first** in ``DATABASE_ROUTERS``.  It passes (``None``) on everything except while a
reshard on this cluster is in one of its two short windows:

* **write fence** (from the start of the final catch-up until the new ring is in place): a
  write of a key whose owner changes (old ring != new ring) raises
  :class:`~shardkit.reshard.ShardMovingError` naming the key; so does an UPDATE/DELETE
  statement on a moving table whose single key is not known.  Writes of keys that stay put
  are routed as usual.  Retry after a short sleep.
* **read fence** (from the merge of the copies until the old copies are deleted): a read of
  a moving table that would go to *every* shard (no shard key in WHERE) raises
  ``ShardMovingError``, because for that short while some rows exist on two shards.  Reads
  that name their keys are routed by the ring and stay exact.

In the reshard's own process the :class:`~shardkit.reshard.Resharder` raises and lifts the
fences directly.  Other processes learn them from the state table on ``default``:
``FencingRouter(poll_interval=1.0)`` plus ``fence.watch(cluster)`` re-reads it at most once
per interval, and also swaps its ring router's ring when a reshard has switched it.
Run the reshard with ``fence_grace`` >= that interval plus your longest write transaction.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable

from ..ring import HashRing, HashRingRouter
from ..typing import ShardTargets
from ._errors import ShardMovingError

if TYPE_CHECKING:
    from .._cluster import Cluster

__all__ = ["FencingRouter", "find_ring_router"]


@dataclass(frozen=True)
class _Fence:
    router: HashRingRouter
    old: HashRing
    new: HashRing
    tables: frozenset[str]
    writes: bool
    reads: bool


def find_ring_router(cluster: Cluster) -> HashRingRouter | None:
    """The first :class:`HashRingRouter` of the cluster's router chain."""
    for r in cluster.router.routers:
        if isinstance(r, HashRingRouter):
            return r
    return None


def _table_name(model: Any) -> str | None:
    table = getattr(model, "__table__", None)
    if table is None:
        try:
            table = inspect(model).local_table
        except (NoInspectionAvailable, AttributeError):
            return None
    return getattr(table, "fullname", None)


class FencingRouter:
    """Refuses writes to keys that are moving during a reshard's cut-over (see the module doc).

    :param poll_interval: when watching a cluster (:meth:`watch`), re-read the reshard state
        from ``default`` at most this often (seconds).
    """

    def __init__(self, poll_interval: float = 1.0) -> None:
        self.poll_interval = poll_interval
        self._fence: _Fence | None = None
        self._cluster: Cluster | None = None
        self._polled = 0.0
        self._poll_lock = threading.Lock()

    # -- control (the Resharder in-process; watch() for other processes) ------------
    def fence(
        self, router: HashRingRouter, old: HashRing, new: HashRing, tables: Any, *, writes: bool, reads: bool
    ) -> None:
        """Raise (or change) the fences for ``tables`` moving from ``old`` to ``new``."""
        self._fence = _Fence(router, old, new, frozenset(tables), writes, reads) if writes or reads else None

    def lift(self) -> None:
        """Lift every fence."""
        self._fence = None

    @property
    def active(self) -> tuple[bool, bool]:
        """(write fence up, read fence up)."""
        f = self._fence
        return (False, False) if f is None else (f.writes, f.reads)

    def watch(self, cluster: Cluster) -> FencingRouter:
        """Follow the reshard state stored on ``cluster``'s ``default`` (for processes other
        than the one running the reshard)."""
        self._cluster = cluster
        self._polled = 0.0
        return self

    def _poll(self) -> None:
        cluster = self._cluster
        if cluster is None or time.monotonic() - self._polled < self.poll_interval:
            return
        with self._poll_lock:
            if time.monotonic() - self._polled < self.poll_interval:
                return
            self._polled = time.monotonic()
            from ._state import StateStore, load_current_ring

            router = find_ring_router(cluster)
            if router is None:
                return
            current = load_current_ring(cluster)
            if current is not None and current.version != router.ring.version:
                router.ring = current
            state = StateStore(cluster).active()
            if state is None:
                self._fence = None
                return
            writes = state.phase in ("fenced", "merging")
            reads = state.phase in ("merging", "switched")
            tables = json.loads(json.dumps(state.tables))
            self.fence(router, state.old_ring, state.new_ring, tables, writes=writes, reads=reads)

    # -- the router methods ---------------------------------------------------------------
    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        self._poll()
        f = self._fence
        if f is None or not f.writes:
            return None
        table = _table_name(model)
        if table is None or table not in f.tables:
            return None
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
            spec = f.router._spec(model)
            key = getattr(instance, spec.attr) if spec is not None else None
        if key is not None and f.old.get(key) != f.new.get(key):
            raise ShardMovingError(
                f"key {key!r} of {table} is moving from {f.old.get(key)} to {f.new.get(key)}; retry shortly",
                key=key,
                table=table,
            )
        return alias

    def db_for_read(self, model: Any, **hints: Any) -> str | ShardTargets | None:
        self._poll()
        f = self._fence
        if f is None or not f.reads:
            return None
        table = _table_name(model)
        if table is None or table not in f.tables:
            return None
        target = f.router.db_for_read(model, **hints)
        if isinstance(target, ShardTargets) and target.all_shards:
            raise ShardMovingError(
                f"a read of every shard of {table} is refused while moved rows are being cleaned up; retry shortly",
                key=None,
                table=table,
            )
        return None
