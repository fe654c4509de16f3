"""Resharder: plan, copy, verify, cut over and clean up a change of ring, resumably.

The run, step by step (each step is idempotent; the phase is stored on ``default``):

1. **copy** (phase ``copying``): for every moving table (parents first) and every old shard,
   scan the rows in primary-key batches, hash their shard keys with the *new* ring, and copy
   the rows that now belong elsewhere into the target's hidden shadow table.  Progress (the
   last primary key) is saved after every batch.  Writes keep going to the old owners.
2. **fence** (phase ``fenced``): writes of moving keys are refused, by the
   :class:`FencingRouter` of every process and by the databases themselves (triggers, see
   :mod:`._dbfence`, whose installation waits for the write transactions under way); then a
   **catch-up** pass compares every moving row with its copy and repairs the differences.
3. **verify**: row counts and checksums per primary-key range, source against target; any
   difference is a :class:`ReshardVerifyError` listing every differing primary key, the
   fences are lifted and nothing is switched (the next run repairs and verifies again).
4. **merge** (phase ``merging``): each target moves its shadow rows into the real tables and
   drops the shadows, in one transaction per target.  A run resumed here raises the fences
   again and catches up the targets not merged yet before it merges them.
5. **switch** (phase ``switched``): the new ring is stored on ``default`` with the phase, in
   one transaction, and put in the ring router (``router.ring = new``); moving keys stay
   fenced for ``fence_grace`` seconds while every other process reads the new ring.
6. **delete** (phase ``deleting``): writes are unfenced (the databases still refuse a key
   the new ring gives to another shard), the moved rows are deleted from their old shards
   (children first); then phase ``done`` and the database fence is removed.

A killed run (even SIGKILL) started again continues from its stored phase and progress; the
database fence stays up meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, inspect, select

from ..errors import ConfigError, ReshardError, ReshardVerifyError
from ..ring import HashRing, HashRingRouter
from . import _copy, _dbfence, _pg
from ._fence import FencingRouter, fences_of, find_ring_router
from ._state import Lease, ReshardState, StateStore, load_current_ring
from ._tables import SOURCE_COLUMN, MovingTable, discover

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .._cluster import Cluster

__all__ = [
    "Move",
    "ProgressEvent",
    "RangeCheck",
    "ReshardPlan",
    "ReshardResult",
    "Resharder",
    "VerifyReport",
    "reshard",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 10_000
DEFAULT_WORKERS = 4

Emit = Callable[..., None]
Job = Callable[[Emit], Any]


class _Stopped(Exception):
    """A worker was told to stop (another one failed, or the run was interrupted)."""


# --------------------------------------------------------------------------- results
def _describe_ring(ring: HashRing) -> str:
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
            f"current ring: {_describe_ring(self.old_ring)}",
            f"new ring:     {_describe_ring(self.new_ring)}",
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


@dataclass(frozen=True)
class ProgressEvent:
    """One step of progress: ``kind`` is ``"start"``, ``"advance"`` or ``"end"``."""

    kind: str
    step: str  # "copy", "delete", "plan"
    table: str
    source: str
    scanned: int  # rows scanned so far on this source
    total: int  # rows on this source when the step started
    moved: int  # rows copied or deleted so far
    elapsed: float


# ----------------------------------------------------------------------- movement
def _movement(old: HashRing, new: HashRing) -> str:
    """A description of the hash space that changes owner: arcs (ring) or buckets."""
    if old.mode == "buckets" and new.mode == "buckets" and old.buckets == new.buckets:
        a, b = _table(old), _table(new)
        moved = sum(1 for x, y in zip(a, b, strict=True) if x != y)
        return f"{moved} of {old.buckets} buckets ({100.0 * moved / old.buckets:.2f}%)"
    if old.mode == "ring" and new.mode == "ring" and len(old) and len(new):
        p1, o1 = _points(old)
        p2, o2 = _points(new)
        bounds = sorted(set(p1) | set(p2))
        arcs, width, prev_moving = 0, 0, False
        prev = bounds[-1] - (1 << 32)
        for point in bounds:
            i, j = bisect_left(p1, point) % len(p1), bisect_left(p2, point) % len(p2)
            moving = o1[i] != o2[j]
            if moving:
                width += point - prev
                arcs += 0 if prev_moving else 1
            prev_moving, prev = moving, point
        return f"{arcs} arcs, {100.0 * width / (1 << 32):.2f}% of the ring"
    return "every key is re-hashed (the ring mode or bucket count changed)"


def _table(ring: HashRing) -> list[str]:
    out: list[str] = []
    for alias, count in ring.to_dict()["table"]:
        out.extend([alias] * count)
    return out


def _points(ring: HashRing) -> tuple[list[int], list[str]]:
    slots = ring._slots
    return list(ring._points or ()), [slots[o] or "" for o in ring._owners]


# ---------------------------------------------------------------------- the resharder
class Resharder:
    """Move a cluster's sharded rows from its current ring to a new one.

    :param cluster: the :class:`~shardkit.Cluster`.
    :param router: its :class:`~shardkit.HashRingRouter` (default: the first one in the chain).
        Its ``ring`` is the current ring unless a previous reshard stored one on ``default``.
    :param new_ring: the target ring; or say ``add=``/``remove=`` (applied to the current ring).
    :param models: mapped classes or Tables to move (their co-located children come along);
    :param metadata: or a declarative base / MetaData whose sharded tables all move.
    :param batch_size: rows per keyset batch.
    :param fence_grace: seconds moving keys stay fenced after the switch, while every other
        process reads the new ring (make it >= their ``poll_interval`` + longest transaction);
        on a database without the database fence (MySQL), also the wait between raising the
        write fence and the catch-up.
    :param progress: called with a :class:`ProgressEvent` as batches go (always from the
        calling thread, one table and source at a time).
    :param workers: (all shards PostgreSQL) table/source-shard tasks run at once by the copy,
        the catch-up, the verify and the delete; ``1`` runs them one after the other.

    >>> Resharder(cluster, add="s4", models=[User]).run()  # doctest: +SKIP
    """

    def __init__(
        self,
        cluster: Cluster,
        router: HashRingRouter | None = None,
        new_ring: HashRing | None = None,
        *,
        add: str | None = None,
        remove: str | None = None,
        weight: float = 1,
        models: Iterable[Any] | None = None,
        metadata: Any = None,
        batch_size: int = DEFAULT_BATCH,
        fence_grace: float = 1.2,
        lease_ttl: float = 60.0,
        progress: Callable[[ProgressEvent], None] | None = None,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if sum(x is not None for x in (new_ring, add, remove)) != 1:
            raise ConfigError("say what the new ring is: exactly one of new_ring=, add=, remove=")
        self.cluster = cluster
        found = router if router is not None else find_ring_router(cluster)
        if found is None:
            raise ConfigError("the cluster has no HashRingRouter: pass router=")
        self.router: HashRingRouter = found
        self._new_ring, self._add, self._remove, self._weight = new_ring, add, remove, weight
        self.tables = discover(self.router, models, metadata)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, not {batch_size!r}")
        self.batch_size = batch_size
        if workers < 1:
            raise ConfigError(f"workers must be positive, not {workers!r}")
        self.workers = workers
        self.fence_grace = fence_grace
        self.progress = progress
        self.store = StateStore(cluster)
        self.lease_ttl = lease_ttl
        self._lock = threading.Lock()

    # -- rings ------------------------------------------------------------------------
    def _requested(self, base: HashRing) -> HashRing:
        if self._new_ring is not None:
            return self._new_ring
        new = base.copy()
        if self._add is not None and self._add not in base:
            new.add(self._add, self._weight)
        if self._remove is not None and self._remove in base:
            new.remove(self._remove)
        return new

    def rings(self) -> tuple[HashRing, HashRing, ReshardState | None]:
        """(old ring, new ring, the stored reshard in progress or None); reads ``default`` only."""
        active = self.store.active()
        if active is not None:
            requested = self._requested(active.old_ring)
            if requested != active.new_ring:
                raise ReshardError(
                    f"another reshard is in progress (ring version {active.old_ring.version} -> "
                    f"{active.new_ring.version}, phase {active.phase}); finish it first "
                    "(run it again with the same target) before starting a different one",
                    phase=active.phase,
                )
            return active.old_ring, active.new_ring, active
        old = load_current_ring(self.cluster) if self.store.exists() else None
        old = old if old is not None else self.router.ring
        return old, self._requested(old), None

    def _engines(self, old: HashRing, new: HashRing) -> dict[str, Engine]:
        for alias in (*old, *new):
            self.cluster.check_alias(alias)
        return {a: self.cluster.engine(a) for a in dict.fromkeys((*old, *new))}

    def _emit(self, *args: Any) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(*args))

    # -- plan ---------------------------------------------------------------------------
    def plan(self) -> ReshardPlan:
        """Count, on the shards, the rows of every table that move, per source and target."""
        old, new, _ = self.rings()
        engines = self._engines(old, new)
        t0 = time.perf_counter()
        moves: list[Move] = []
        rows: dict[str, int] = {}
        for mt in self.tables:
            rows[mt.name] = 0
            for source in old:
                counts: Counter[str] = Counter()
                if not _has(engines[source], mt.table.name):
                    continue
                with engines[source].connect() as conn:
                    result = conn.execution_options(stream_results=True, yield_per=50_000).execute(select(mt.key))
                    for part in result.partitions():
                        keys = [r[0] for r in part]
                        rows[mt.name] += len(keys)
                        counts.update(new.get_many(keys))
                for target, n in sorted(counts.items()):
                    if target != source:
                        moves.append(Move(mt.name, source, target, n))
        return ReshardPlan(old, new, self.tables, moves, rows, _movement(old, new), time.perf_counter() - t0)

    # -- run ----------------------------------------------------------------------------
    def run(self, dry_run: bool = False, batch_size: int | None = None) -> ReshardResult:
        """Run (or resume) the reshard to the end; see the module docstring for the steps.

        :param dry_run: write nothing; return the steps that would run (with measured counts).
        :raises ReshardLockedError: another reshard is running.
        :raises ReshardVerifyError: verify found differences; nothing was switched.
        """
        if batch_size is not None:
            self.batch_size = batch_size
        old, new, state = self.rings()
        if new == old and state is None:
            return ReshardResult(old, new, "done", steps=["nothing to do: the ring is already the target ring"])
        if dry_run:
            return self._dry_run(old, new, state)
        self.store.ensure()
        lease = Lease(self.store, ttl=self.lease_ttl)
        lease.acquire()
        try:
            old, new, state = self.rings()  # again, under the lock
            if new == old and state is None:
                return ReshardResult(old, new, "done", steps=["nothing to do: the ring is already the target ring"])
            return self._run(old, new, state, lease)
        finally:
            lease.release()
            for fence in self._fences():  # back to following the stored state
                fence.follow()

    def _dry_run(self, old: HashRing, new: HashRing, state: ReshardState | None) -> ReshardResult:
        plan = self.plan()
        names = ", ".join(t.name for t in self.tables)
        steps = [f"resume the stored reshard #{state.id} at phase {state.phase}"] if state else []
        targets = sorted({m.target for m in plan.moves if m.rows})
        steps.append(f"create {names} and their shadow tables on {', '.join(new)} (where missing)")
        steps += [f"copy {m.rows} rows of {m.table} from {m.source} to {m.target}" for m in plan.moves if m.rows]
        steps += [
            "fence writes to moving keys (in this process, in every following process and in the databases); "
            "wait for in-flight writes; catch up the rows written during the copy",
            "verify row counts and checksums per key range on source and target",
            f"merge the shadow tables into {names} on {', '.join(targets) or 'no shard'}",
            f"switch the ring: version {old.version} -> {new.version} (stored on default); "
            f"wait {self.fence_grace:g}s for other processes to follow; unfence writes",
        ]
        steps += [
            f"delete {m.rows} rows of {m.table} from {m.source}"
            for mt in reversed(self.tables)
            for m in _sum_by_source(plan.moves, mt.name)
        ]
        return ReshardResult(old, new, state.phase if state else "planned", steps=steps, resumed_from=None)

    def _fences(self) -> list[FencingRouter]:
        return fences_of(self.cluster)

    def _set_fence(self, old: HashRing, new: HashRing, *, writes: bool, reads: bool) -> None:
        for fence in self._fences():
            fence.fence(self.router, old, new, [t.name for t in self.tables], writes=writes, reads=reads)

    def _db_fence(self, engines: dict[str, Engine], old: HashRing, new: HashRing, state: ReshardState,
                  stage: str) -> None:  # fmt: skip
        """Raise the database-side fence at ``stage`` on every shard (idempotent).  Installing it
        waits for the write transactions under way: it is also the in-flight barrier."""
        for alias, engine in engines.items():
            if _dbfence.supported(engine):
                arcs = _dbfence.fenced_arcs(old, new, alias, stage)
                _dbfence.install(engine, self.tables, arcs, state.id, alias=alias)
            else:
                _copy.barrier(engine, [t.table for t in self.tables if _has(engine, t.table.name)], alias=alias)

    def _db_unfence(self, engines: dict[str, Engine]) -> None:
        for alias, engine in engines.items():
            _dbfence.remove(engine, self.tables, alias=alias)

    def _run(self, old: HashRing, new: HashRing, state: ReshardState | None, lease: Lease) -> ReshardResult:
        engines = self._engines(old, new)
        names = [t.name for t in self.tables]
        result = ReshardResult(old, new, "copying", resumed_from=state.phase if state else None)
        if state is None:
            state = self.store.create(old, new, names)
            logger.info("reshard #%s: ring %s -> %s", state.id, old.version, new.version)
        elif sorted(state.tables) != sorted(names):
            raise ReshardError(
                f"the stored reshard #{state.id} moves tables {state.tables}, this run names {names}", tables=names
            )
        if not self._fences():
            logger.warning("no FencingRouter in the router chain: writes are fenced by the databases only")
        if state.phase in ("copying", "fenced"):
            t0 = time.perf_counter()
            self._prepare(engines, new)
            self._copy(engines, old, new, state, lease, result)
            result.seconds["copy"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._set_fence(old, new, writes=True, reads=False)
            self.store.set_phase(state, "fenced")
            try:
                self._fence_and_check(engines, old, new, state, lease, result, set(new))
            except BaseException:  # nothing switched: lift the fences, back to copying
                try:
                    self._db_unfence(engines)
                    self._set_fence(old, new, writes=False, reads=False)
                    self.store.set_phase(state, "copying")
                except Exception:  # the fences stay up until a run gets past this point
                    logger.exception("reshard #%s: could not lift the fence after a failure", state.id)
                raise
            result.seconds["fenced"] = time.perf_counter() - t0
            self._set_fence(old, new, writes=True, reads=True)
            self.store.set_phase(state, "merging")
        elif state.phase == "merging":  # resumed: the fence again, then catch up what is not merged
            self._set_fence(old, new, writes=True, reads=True)
            pending = {t for t in new if any(_has(engines[t], mt.shadow.name) for mt in self.tables)}
            self._fence_and_check(engines, old, new, state, lease, result, pending)
        if state.phase == "merging":
            t0 = time.perf_counter()
            self._set_fence(old, new, writes=True, reads=True)
            for target in new:
                self._merge(engines[target])
            self.store.set_phase(state, "switched", ring=new)
            result.seconds["merge+switch"] = time.perf_counter() - t0
        if state.phase == "switched":
            self.router.ring = new
            self._set_fence(old, new, writes=True, reads=True)
            if result.resumed_from == "switched":  # a run killed here: the fence again, to be sure
                self._db_fence(engines, old, new, state, "fence")
            time.sleep(self.fence_grace)  # every following process reads the new ring meanwhile
            for alias, engine in engines.items():
                if _dbfence.supported(engine):
                    _dbfence.set_stage(engine, _dbfence.fenced_arcs(old, new, alias, "switched"), state.id)
            self.store.set_phase(state, "deleting")
        if state.phase == "deleting":
            self.router.ring = new
            self._set_fence(old, new, writes=False, reads=True)
            if result.resumed_from == "deleting":
                self._db_fence(engines, old, new, state, "switched")
            t0 = time.perf_counter()
            self._delete(engines, old, new, state, lease, result)
            result.seconds["delete"] = time.perf_counter() - t0
            self._db_unfence(engines)  # before "done": a run killed in between removes it again
            self.store.set_phase(state, "done")
            self._set_fence(old, new, writes=False, reads=False)
        self.router.ring = new
        result.phase = state.phase
        return result

    def _fence_and_check(
        self, engines: dict[str, Engine], old: HashRing, new: HashRing, state: ReshardState, lease: Lease,
        result: ReshardResult, targets: set[str],
    ) -> None:  # fmt: skip
        """Under the write fence: the database fence (and barrier), the catch-up, then the verify
        of the copies on ``targets``.  :raises ReshardVerifyError: the copies differ."""
        t0 = time.perf_counter()
        self._db_fence(engines, old, new, state, "fence")
        if not all(_dbfence.supported(e) for e in engines.values()):
            time.sleep(self.fence_grace)  # no database fence here: let routed writes land first
            for source in old:
                _copy.barrier(engines[source], [t.table for t in self.tables if _has(engines[source], t.table.name)])
        result.seconds["barrier"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        result.repaired += self._catch_up(engines, old, new, lease, targets)
        result.seconds["catch-up"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        report = self._verify_copies(engines, old, new, lease, targets)
        result.seconds["verify"] = time.perf_counter() - t1
        result.verify = report
        if not report.ok:
            raise ReshardVerifyError("verify failed: the cut-over did not happen\n" + report.render(), report=report)

    def _catch_up(
        self, engines: dict[str, Engine], old: HashRing, new: HashRing, lease: Lease | None, targets: set[str]
    ) -> int:
        """Repair every copy on ``targets`` from its source; the number of rows repaired."""
        return self._compare_all(engines, old, new, lease, repair=True, targets=targets)[1]

    def _verify_copies(
        self, engines: dict[str, Engine], old: HashRing, new: HashRing, lease: Lease | None, targets: set[str]
    ) -> VerifyReport:
        """Compare every moving row with its copy on ``targets``."""
        return self._compare_all(engines, old, new, lease, repair=False, targets=targets)[0]

    # -- the steps ---------------------------------------------------------------------
    def _prepare(self, engines: dict[str, Engine], new: HashRing) -> None:
        for target in new:
            engine = engines[target]
            for mt in self.tables:
                mt.table.create(engine, checkfirst=True)
                mt.shadow.create(engine, checkfirst=True)

    def _copy(
        self,
        engines: dict[str, Engine],
        old: HashRing,
        new: HashRing,
        state: ReshardState,
        lease: Lease,
        result: ReshardResult,
    ) -> None:
        if self._fast(engines):
            jobs = [
                self._copy_job(engines, mt, source, new, state, result)
                for mt in self.tables
                for source in old
                if not self.store.progress(state, "copy", mt.name, source).done and _has(engines[source], mt.table.name)
            ]
            self._parallel(jobs, lease)
            return
        for mt in self.tables:
            fast = _copy.use_copy(engines, mt)
            cols = list(mt.table.columns)
            key_at = cols.index(mt.key) if not fast else mt.key_index
            npk = len(mt.pk)
            pk_at = [cols.index(c) for c in mt.pk] if not fast else list(range(npk))
            for source in old:
                prog = self.store.progress(state, "copy", mt.name, source)
                if prog.done or not _has(engines[source], mt.table.name):
                    continue
                last = _copy.pk_from_json(mt, prog.last_pk) if prog.last_pk is not None else None
                moved, scanned, t0 = prog.rows, 0, time.perf_counter()
                raw_scan = _copy.can_scan_raw(engines[source], mt)
                with engines[source].connect() as conn:
                    total = int(conn.execute(select(func.count()).select_from(mt.table)).scalar() or 0)
                    conn.commit()
                    self._emit("start", "copy", mt.name, source, 0, total, moved, 0.0)
                    done = False
                    while not done:
                        if fast and raw_scan:
                            rows = _copy.keyset_raw(engines[source], mt, last, self.batch_size)
                        else:
                            rows = _copy.keyset(conn, mt, last, self.batch_size, full=not fast)
                        conn.commit()  # no snapshot held between batches
                        done = len(rows) < self.batch_size
                        moving: dict[str, list[Any]] = {}
                        if rows:
                            owners = new.get_many([r[key_at] for r in rows])
                            for row, owner in zip(rows, owners, strict=True):
                                if owner != source:
                                    moving.setdefault(owner, []).append(row if not fast else row[0])
                            _copy.copy_batch(engines, mt, source, moving, full_rows=not fast)
                            last = tuple(rows[-1][i] for i in pk_at)
                        n = sum(len(v) for v in moving.values())
                        moved += n
                        scanned += len(rows)
                        result.copied[mt.name] = result.copied.get(mt.name, 0) + n
                        self.store.save_progress(
                            state, "copy", mt.name, source,
                            None if last is None else _copy.pk_to_json(last), moved, done,
                        )  # fmt: skip
                        lease.beat()
                        self._emit("advance", "copy", mt.name, source, scanned, total, moved, time.perf_counter() - t0)
                self._emit("end", "copy", mt.name, source, scanned, total, moved, time.perf_counter() - t0)

    # -- the PostgreSQL fast path: parallel table/source tasks (see _pg) -------------------------
    def _fast(self, engines: dict[str, Engine]) -> bool:
        return all(_pg.fast_ok(engines, mt) for mt in self.tables)

    def _parallel(self, jobs: Sequence[Job], lease: Lease | None) -> list[Any]:
        """Run ``jobs`` in up to ``workers`` threads; return their results in order.

        Each job gets an ``emit(*ProgressEvent fields)``; the events are passed on from this
        thread, job after job (a job's events wait until the jobs before it have ended), so a
        progress display sees one table and source at a time.  The lease is kept alive from
        here.  The first failure stops the other jobs (at their next batch) and is raised.
        """
        if not jobs:
            return []
        if self.workers == 1 or self.store.engine.dialect.name == "sqlite":  # one after the other, here
            # (progress rows go to default; SQLite takes one writer at a time)

            def emit(*fields: Any) -> None:
                self._emit(*fields)
                if lease is not None:
                    lease.beat()

            return [job(emit) for job in jobs]
        events: queue.SimpleQueue[tuple[int, tuple[Any, ...]]] = queue.SimpleQueue()
        stop = threading.Event()

        def start(i: int, job: Job) -> Any:
            def emit(*fields: Any) -> None:
                if stop.is_set():
                    raise _Stopped
                events.put((i, fields))

            return job(emit)

        pending: list[list[tuple[Any, ...]]] = [[] for _ in jobs]
        current = 0

        def flush(ended: set[int]) -> None:
            nonlocal current
            while True:
                try:
                    i, fields = events.get_nowait()
                except queue.Empty:
                    break
                pending[i].append(fields)
            while current < len(jobs):
                for fields in pending[current]:
                    self._emit(*fields)
                pending[current] = []
                if current not in ended:
                    return
                current += 1

        workers = min(self.workers, len(jobs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardkit-reshard") as pool:
            futures: list[Future[Any]] = [pool.submit(start, i, job) for i, job in enumerate(jobs)]
            try:
                while True:
                    _, running = wait(futures, timeout=0.25, return_when=FIRST_EXCEPTION)
                    ended = {i for i, f in enumerate(futures) if f.done()}  # before reading the events
                    for f in futures:
                        if f.done() and f.exception() is not None:
                            raise f.exception()  # type: ignore[misc]
                    flush(ended)
                    if lease is not None:
                        lease.beat()
                    if not running:
                        return [f.result() for f in futures]
            except BaseException:
                stop.set()
                for f in futures:
                    f.cancel()
                raise

    def _copy_job(
        self, engines: dict[str, Engine], mt: MovingTable, source: str, new: HashRing, state: ReshardState,
        result: ReshardResult,
    ) -> Job:  # fmt: skip
        """Copy the moving rows of ``mt`` on ``source`` into the targets' shadow tables."""
        lock = self._lock

        def job(emit: Emit) -> None:
            prog = self.store.progress(state, "copy", mt.name, source)
            last = int(prog.last_pk[0]) if prog.last_pk is not None else None
            moved, scanned, t0 = prog.rows, 0, time.perf_counter()
            engine = engines[source]
            src = engine.raw_connection()
            targets: dict[str, Any] = {}
            try:
                total = _count(engine, src, mt.table)
                mode = _pg.scan_mode(engine, src, mt, total)
                emit("start", "copy", mt.name, source, 0, total, moved, 0.0)
                while True:
                    batch = _pg.scan(engine, src, mt, last, self.batch_size, mode)
                    n = 0
                    for target, mask in batch.moving(new, source).items():
                        if batch.extra is not None:  # "rows": the lines are here
                            lines = _pg.pick(batch.extra, mask)
                        else:
                            ids = _pg.pick(batch.pks, mask)
                            lines = _pg.copy_out_ids(engine, src, mt, ids).split(b"\n")[:-1]
                        if target not in targets:
                            targets[target] = engines[target].raw_connection()
                        _pg.copy_in_shadow(engines[target], targets[target], mt, _pg.shadow_lines(lines, source))
                        n += len(lines)
                    done = batch.size < self.batch_size
                    last = batch.last if batch.last is not None else last
                    moved += n
                    scanned += batch.size
                    with lock:
                        result.copied[mt.name] = result.copied.get(mt.name, 0) + n
                    self.store.save_progress(
                        state, "copy", mt.name, source, None if last is None else [last], moved, done
                    )
                    emit("advance", "copy", mt.name, source, scanned, total, moved, time.perf_counter() - t0)
                    if done:
                        break
                emit("end", "copy", mt.name, source, scanned, total, moved, time.perf_counter() - t0)
            finally:
                src.close()
                for raw in targets.values():
                    raw.close()

        return job

    def _compare_all(
        self, engines: dict[str, Engine], old: HashRing, new: HashRing, lease: Lease | None, *, repair: bool,
        targets: set[str] | None = None,
    ) -> tuple[VerifyReport, int]:  # fmt: skip
        """Compare every moving row with its copy (on ``targets``, default every shard): repair
        (catch-up) or report (verify)."""
        report = VerifyReport()
        repaired = 0
        if self._fast(engines):
            pairs = [(mt, s) for mt in self.tables for s in old if _has(engines[s], mt.table.name)]
            shadows = {t: {mt.name for mt in self.tables if _has(engines[t], mt.shadow.name)} for t in new}
            jobs = [self._compare_job(engines, mt, s, new, shadows, repair=repair, only=targets) for mt, s in pairs]
            for part, n in self._parallel(jobs, lease):  # in table, source order
                repaired += n
                report.rows += part.rows
                report.ranges += part.ranges
                report.missing += part.missing
                report.extra += part.extra
                report.different += part.different
            return report, repaired
        for mt in self.tables:
            for source in old:
                repaired += self._compare(engines, mt, source, new, report, repair=repair, only=targets)
        return report, repaired

    def _compare_job(
        self, engines: dict[str, Engine], mt: MovingTable, source: str, new: HashRing,
        shadows: dict[str, set[str]], *, repair: bool, only: set[str] | None = None,
    ) -> Job:  # fmt: skip
        """:meth:`_compare` on raw COPY: moving rows as COPY lines (or server md5s) on both sides."""

        def job(emit: Emit) -> tuple[VerifyReport, int]:
            report = VerifyReport()
            engine = engines[source]
            targets = [t for t in new if t != source and t in engines and (only is None or t in only)]
            src: dict[str, dict[Any, bytes]] = {t: {} for t in targets}
            raw = engine.raw_connection()
            try:
                mode = _pg.scan_mode(engine, raw, mt, _count(engine, raw, mt.table))
                last: int | None = None
                while True:
                    batch = _pg.scan(engine, raw, mt, last, self.batch_size, mode, digests=True)
                    extra = batch.extra
                    assert extra is not None
                    for target, mask in batch.moving(new, source).items():
                        into = src.setdefault(target, {})
                        into.update(zip(_pg.pick(batch.pks, mask), _pg.pick(extra, mask), strict=True))
                    last = batch.last if batch.last is not None else last
                    if batch.size < self.batch_size:
                        break
            finally:
                raw.close()
            repaired = 0
            for target in targets:
                tgt: dict[Any, bytes] = {}
                if mt.name in shadows.get(target, set()):
                    raw = engines[target].raw_connection()
                    try:
                        for pks, values in _pg.shadow_rows(engines[target], raw, mt, source, mode, self.batch_size):
                            tgt.update(zip(pks, values, strict=True))
                    finally:
                        raw.close()
                s, t = src[target], tgt
                missing = [(pk,) for pk in s if pk not in t]
                extra_ = [(pk,) for pk in t if pk not in s]
                different = [(pk,) for pk, v in s.items() if pk in t and t[pk] != v]
                if repair:
                    if missing or extra_ or different:
                        with engine.connect() as sconn:
                            rows = _copy.fetch_rows(sconn, mt, missing + different)
                        with engines[target].begin() as tconn:
                            _copy.delete_keys(tconn, mt, mt.shadow, extra_ + different)
                            _copy.insert_shadow(tconn, mt, rows, source)
                        repaired += len(missing) + len(extra_) + len(different)
                    continue
                report.rows += len(s)
                report.missing += [(mt.name, source, target, pk) for pk in sorted(missing)]
                report.extra += [(mt.name, source, target, pk) for pk in sorted(extra_)]
                report.different += [(mt.name, source, target, pk) for pk in sorted(different)]
                sd = {(pk,): _pg.line_digest(v, mode) for pk, v in s.items()}
                td = {(pk,): _pg.line_digest(v, mode) for pk, v in t.items()}
                report.ranges += _ranges(mt.name, source, target, sd, td, self.batch_size)
            return report, repaired

        return job

    def _delete_job(
        self, engines: dict[str, Engine], source: str, new: HashRing, state: ReshardState, result: ReshardResult
    ) -> Job:
        """Delete from ``source`` the rows the new ring gives elsewhere, children first."""
        lock = self._lock

        def job(emit: Emit) -> None:
            engine = engines[source]
            for mt in reversed(self.tables):
                prog = self.store.progress(state, "delete", mt.name, source)
                if prog.done or not _has(engine, mt.table.name):
                    continue
                last = int(prog.last_pk[0]) if prog.last_pk is not None else None
                deleted, scanned, t0 = prog.rows, 0, time.perf_counter()
                emit("start", "delete", mt.name, source, 0, 0, deleted, 0.0)
                raw = engine.raw_connection()
                try:
                    while True:
                        batch = _pg.scan(engine, raw, mt, last, self.batch_size, "keys")
                        gone = sorted(
                            pk for mask in batch.moving(new, source).values() for pk in _pg.pick(batch.pks, mask)
                        )
                        _pg.delete_ids(engine, raw, mt.table, mt.pk[0].name, gone)
                        done = batch.size < self.batch_size
                        last = batch.last if batch.last is not None else last
                        deleted += len(gone)
                        scanned += batch.size
                        with lock:
                            result.deleted[mt.name] = result.deleted.get(mt.name, 0) + len(gone)
                        self.store.save_progress(
                            state, "delete", mt.name, source, None if last is None else [last], deleted, done
                        )
                        emit("advance", "delete", mt.name, source, scanned, 0, deleted, time.perf_counter() - t0)
                        if done:
                            break
                finally:
                    raw.close()
                emit("end", "delete", mt.name, source, scanned, 0, deleted, time.perf_counter() - t0)

        return job

    def _compare(
        self, engines: dict[str, Engine], mt: MovingTable, source: str, new: HashRing, report: VerifyReport, *,
        repair: bool, only: set[str] | None = None,
    ) -> int:  # fmt: skip
        """Compare the moving rows of ``source`` with their copies; repair them (catch-up) or report."""
        src_engine = engines[source]
        if not _has(src_engine, mt.table.name):
            return 0
        targets = [t for t in new if t != source and t in engines and (only is None or t in only)]
        sql_md5 = all(e.dialect.name == "postgresql" for e in engines.values())
        src: dict[str, dict[tuple[Any, ...], str]] = {t: {} for t in targets}
        with src_engine.connect() as conn:
            for batch in _copy.digests(conn, mt, mt.table, sql_md5=sql_md5, batch=self.batch_size):
                owners = new.get_many([k for _, k, _ in batch])
                for (pk, _, digest), owner in zip(batch, owners, strict=True):
                    if owner != source and owner in src:
                        src[owner][pk] = digest
        repaired = 0
        for target in targets:
            tgt: dict[tuple[Any, ...], str] = {}
            engine = engines[target]
            if _has(engine, mt.shadow.name):
                with engine.connect() as conn:
                    where = mt.shadow.c[SOURCE_COLUMN] == source
                    for batch in _copy.digests(
                        conn, mt, mt.shadow, sql_md5=sql_md5, batch=self.batch_size, where=where
                    ):
                        tgt.update((pk, d) for pk, _, d in batch)
            s, t = src[target], tgt
            missing = [pk for pk in s if pk not in t]
            extra = [pk for pk in t if pk not in s]
            different = [pk for pk, d in s.items() if pk in t and t[pk] != d]
            if repair:
                if missing or extra or different:
                    with src_engine.connect() as sconn:
                        rows = _copy.fetch_rows(sconn, mt, missing + different)
                    with engine.begin() as tconn:
                        _copy.delete_keys(tconn, mt, mt.shadow, extra + different)
                        _copy.insert_shadow(tconn, mt, rows, source)
                    repaired += len(missing) + len(extra) + len(different)
                continue
            report.rows += len(s)
            report.missing += [(mt.name, source, target, pk) for pk in sorted(missing)]
            report.extra += [(mt.name, source, target, pk) for pk in sorted(extra)]
            report.different += [(mt.name, source, target, pk) for pk in sorted(different)]
            report.ranges += _ranges(mt.name, source, target, s, t, self.batch_size)
        return repaired

    def _merge(self, engine: Engine) -> None:
        """Move every shadow table's rows into its real table and drop it: one transaction."""
        present = [mt for mt in self.tables if _has(engine, mt.shadow.name)]
        if not present:
            return
        with engine.begin() as conn, _dbfence.bypass(conn):
            for mt in present:  # parents first
                cols = [c.name for c in mt.table.columns]
                src = select(*[mt.shadow.c[c] for c in cols])
                conn.execute(mt.table.insert().from_select(cols, src))
            for mt in present:
                mt.shadow.drop(conn)

    def _delete(
        self,
        engines: dict[str, Engine],
        old: HashRing,
        new: HashRing,
        state: ReshardState,
        lease: Lease,
        result: ReshardResult,
    ) -> None:
        if self._fast(engines):  # one task per source shard: children first on each
            self._parallel([self._delete_job(engines, source, new, state, result) for source in old], lease)
            return
        for mt in reversed(self.tables):  # children first
            key_at = mt.key_index
            for source in old:
                prog = self.store.progress(state, "delete", mt.name, source)
                if prog.done or not _has(engines[source], mt.table.name):
                    continue
                last = _copy.pk_from_json(mt, prog.last_pk) if prog.last_pk is not None else None
                deleted, scanned, t0 = prog.rows, 0, time.perf_counter()
                npk = len(mt.pk)
                self._emit("start", "delete", mt.name, source, 0, 0, deleted, 0.0)
                done = False
                with engines[source].connect() as conn:
                    while not done:
                        rows = _copy.keyset(conn, mt, last, self.batch_size)
                        done = len(rows) < self.batch_size
                        gone: list[tuple[Any, ...]] = []
                        if rows:
                            owners = new.get_many([r[key_at] for r in rows])
                            gone = [tuple(r[:npk]) for r, o in zip(rows, owners, strict=True) if o != source]
                            if gone:
                                with _dbfence.bypass(conn):
                                    _copy.delete_keys(conn, mt, mt.table, gone)
                            last = tuple(rows[-1][:npk])
                        conn.commit()
                        deleted += len(gone)
                        scanned += len(rows)
                        result.deleted[mt.name] = result.deleted.get(mt.name, 0) + len(gone)
                        self.store.save_progress(
                            state, "delete", mt.name, source,
                            None if last is None else _copy.pk_to_json(last), deleted, done,
                        )  # fmt: skip
                        lease.beat()
                        self._emit("advance", "delete", mt.name, source, scanned, 0, deleted, time.perf_counter() - t0)
                self._emit("end", "delete", mt.name, source, scanned, 0, deleted, time.perf_counter() - t0)

    # -- separate steps (Python API) ----------------------------------------------------------
    def copy(self, batch_size: int | None = None) -> ReshardResult:
        """Only the copy phase (resumable; may be called again): nothing is fenced or switched."""
        if batch_size is not None:
            self.batch_size = batch_size
        self.store.ensure()
        lease = Lease(self.store, ttl=self.lease_ttl)
        lease.acquire()
        try:
            old, new, state = self.rings()
            engines = self._engines(old, new)
            if state is None:
                state = self.store.create(old, new, [t.name for t in self.tables])
            result = ReshardResult(old, new, state.phase)
            if state.phase in ("copying", "fenced"):
                self._prepare(engines, new)
                self._copy(engines, old, new, state, lease, result)
            return result
        finally:
            lease.release()

    def verify(self) -> VerifyReport:
        """Compare the moving rows with their copies (no fence, no repair, no switch).

        While writes go on, rows written since the copy show up as differences; the run's own
        verify happens under the write fence, after a catch-up.
        """
        old, new, _ = self.rings()
        engines = self._engines(old, new)
        report, _ = self._compare_all(engines, old, new, None, repair=False)
        return report


def _sum_by_source(moves: Sequence[Move], table: str) -> list[Move]:
    out: Counter[str] = Counter()
    for m in moves:
        if m.table == table:
            out[m.source] += m.rows
    return [Move(table, s, "", n) for s, n in sorted(out.items()) if n]


def _count(engine: Engine, raw: Any, table: Any) -> int:
    cur = raw.cursor()
    cur.execute(f"SELECT count(*) FROM {engine.dialect.identifier_preparer.format_table(table)}")
    n = int(cur.fetchone()[0])
    raw.commit()
    return n


def _has(engine: Engine, name: str) -> bool:
    with engine.connect() as conn:
        return bool(inspect(conn).has_table(name))


def _ranges(
    table: str, source: str, target: str, src: dict[tuple[Any, ...], str], tgt: dict[tuple[Any, ...], str], size: int
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
                sum(int(src[k][:16], 16) for k in s_part) % (1 << 64),
                sum(int(tgt[k][:16], 16) for k in t_part) % (1 << 64),
            )
        )  # fmt: skip
    return out


def reshard(
    cluster: Cluster,
    new_ring: HashRing | None = None,
    *,
    router: HashRingRouter | None = None,
    add: str | None = None,
    remove: str | None = None,
    models: Iterable[Any] | None = None,
    metadata: Any = None,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    **options: Any,
) -> ReshardResult:
    """Run (or resume) a reshard of ``cluster`` to ``new_ring`` (or ``add=``/``remove=`` one shard).

    The function form of :class:`Resharder`: ``Resharder(cluster, router, new_ring, ...).run()``.
    """
    resharder = Resharder(
        cluster, router, new_ring, add=add, remove=remove, models=models, metadata=metadata,
        batch_size=batch_size, **options,
    )  # fmt: skip
    return resharder.run(dry_run=dry_run)
