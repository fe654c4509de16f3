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

This module is the phase machine only: the rows are copied, compared and deleted by a
:class:`._backend.Backend` (portable or PostgreSQL, chosen by :meth:`Resharder._backend`), a
step's table/source jobs run through :func:`._progress.run_jobs`, and the reports are in
:mod:`._report`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from .._find import ring_router_of
from ..errors import ConfigError, ReshardError, ReshardVerifyError
from ..ring import HashRing, HashRingRouter
from ..ring._layout import describe_movement
from . import _dbfence
from ._backend import Backend, Step
from ._fence import FencingRouter, fences_of
from ._pg import PostgresBackend, fast_ok
from ._portable import PortableBackend
from ._progress import Emit, Job, ProgressEvent, run_jobs
from ._report import Move, ReshardPlan, ReshardResult, VerifyReport, sum_by_source
from ._state import Lease, ReshardState, StateStore, load_current_ring
from ._tables import MovingTable, discover

if TYPE_CHECKING:
    from .._cluster import Cluster

__all__ = ["Resharder", "reshard"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 10_000
DEFAULT_WORKERS = 4


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
        found = router if router is not None else ring_router_of(cluster)
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

    def _backend(self, old: HashRing, new: HashRing) -> Backend:
        """The back end for the shards of both rings: PostgreSQL when every shard is PostgreSQL
        through psycopg2 and every moving table has integer keys, else the portable one."""
        for alias in (*old, *new):
            self.cluster.check_alias(alias)
        engines = {a: self.cluster.engine(a) for a in dict.fromkeys((*old, *new))}
        kind = PostgresBackend if all(fast_ok(engines, mt) for mt in self.tables) else PortableBackend
        return kind(engines, self.batch_size)

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _run_jobs(self, backend: Backend, jobs: Sequence[Job], lease: Lease | None) -> list[Any]:
        """Run a step's jobs (in parallel where the back end allows it and ``default`` is not
        SQLite, which takes one writer of the progress rows at a time), beating the lease."""
        parallel = backend.parallel and self.store.engine.dialect.name != "sqlite"
        return run_jobs(jobs, self.workers if parallel else 1, self._emit, lease.beat if lease else _nothing)

    # -- plan ---------------------------------------------------------------------------
    def plan(self) -> ReshardPlan:
        """Count, on the shards, the rows of every table that move, per source and target."""
        old, new, _ = self.rings()
        backend = self._backend(old, new)
        t0 = time.perf_counter()
        moves: list[Move] = []
        rows: dict[str, int] = {}
        for mt in self.tables:
            rows[mt.name] = 0
            for source in old:
                counts: Counter[str] = Counter()
                if not backend.has_table(source, mt.table.name):
                    continue
                with backend.engines[source].connect() as conn:
                    result = conn.execution_options(stream_results=True, yield_per=50_000).execute(select(mt.key))
                    for part in result.partitions():
                        keys = [r[0] for r in part]
                        rows[mt.name] += len(keys)
                        counts.update(new.get_many(keys))
                for target, n in sorted(counts.items()):
                    if target != source:
                        moves.append(Move(mt.name, source, target, n))
        return ReshardPlan(old, new, self.tables, moves, rows, describe_movement(old, new), time.perf_counter() - t0)

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
            for m in sum_by_source(plan.moves, mt.name)
        ]
        return ReshardResult(old, new, state.phase if state else "planned", steps=steps, resumed_from=None)

    def _fences(self) -> list[FencingRouter]:
        return fences_of(self.cluster)

    def _set_fence(self, old: HashRing, new: HashRing, *, writes: bool, reads: bool) -> None:
        for fence in self._fences():
            fence.fence(self.router, old, new, [t.name for t in self.tables], writes=writes, reads=reads)

    def _db_fence(self, backend: Backend, old: HashRing, new: HashRing, state: ReshardState, stage: str) -> None:
        """Raise the database-side fence at ``stage`` on every shard (idempotent).  Installing it
        waits for the write transactions under way: it is also the in-flight barrier."""
        for alias, engine in backend.engines.items():
            if _dbfence.supported(engine):
                _dbfence.install(
                    engine, self.tables, _dbfence.fenced_arcs(old, new, alias, stage), state.id, alias=alias
                )
            else:
                _dbfence.barrier(engine, self._present(backend, alias), alias=alias)

    def _db_unfence(self, backend: Backend) -> None:
        for alias, engine in backend.engines.items():
            _dbfence.remove(engine, self.tables, alias=alias)

    def _present(self, backend: Backend, alias: str) -> list[Any]:
        """The moving tables that exist on ``alias``."""
        return [t.table for t in self.tables if backend.has_table(alias, t.table.name)]

    def _run(self, old: HashRing, new: HashRing, state: ReshardState | None, lease: Lease) -> ReshardResult:
        backend = self._backend(old, new)
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
            self._prepare(backend, new)
            self._copy(backend, old, new, state, lease, result)
            result.seconds["copy"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._set_fence(old, new, writes=True, reads=False)
            self.store.set_phase(state, "fenced")
            try:
                self._fence_and_check(backend, old, new, state, lease, result, set(new))
            except BaseException:  # nothing switched: lift the fences, back to copying
                try:
                    self._db_unfence(backend)
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
            pending = {t for t in new if any(backend.has_table(t, mt.shadow.name) for mt in self.tables)}
            self._fence_and_check(backend, old, new, state, lease, result, pending)
        if state.phase == "merging":
            t0 = time.perf_counter()
            self._set_fence(old, new, writes=True, reads=True)
            for target in new:
                self._merge(backend, target)
            self.store.set_phase(state, "switched", ring=new)
            result.seconds["merge+switch"] = time.perf_counter() - t0
        if state.phase == "switched":
            self.router.ring = new
            self._set_fence(old, new, writes=True, reads=True)
            if result.resumed_from == "switched":  # a run killed here: the fence again, to be sure
                self._db_fence(backend, old, new, state, "fence")
            time.sleep(self.fence_grace)  # every following process reads the new ring meanwhile
            for alias, engine in backend.engines.items():
                if _dbfence.supported(engine):
                    _dbfence.set_stage(engine, _dbfence.fenced_arcs(old, new, alias, "switched"), state.id)
            self.store.set_phase(state, "deleting")
        if state.phase == "deleting":
            self.router.ring = new
            self._set_fence(old, new, writes=False, reads=True)
            if result.resumed_from == "deleting":
                self._db_fence(backend, old, new, state, "switched")
            t0 = time.perf_counter()
            self._delete(backend, old, new, state, lease, result)
            result.seconds["delete"] = time.perf_counter() - t0
            self._db_unfence(backend)  # before "done": a run killed in between removes it again
            self.store.set_phase(state, "done")
            self._set_fence(old, new, writes=False, reads=False)
        self.router.ring = new
        result.phase = state.phase
        return result

    def _fence_and_check(
        self, backend: Backend, old: HashRing, new: HashRing, state: ReshardState, lease: Lease,
        result: ReshardResult, targets: set[str],
    ) -> None:  # fmt: skip
        """Under the write fence: the database fence (and barrier), the catch-up, then the verify
        of the copies on ``targets``.  :raises ReshardVerifyError: the copies differ."""
        t0 = time.perf_counter()
        self._db_fence(backend, old, new, state, "fence")
        if not all(_dbfence.supported(e) for e in backend.engines.values()):
            time.sleep(self.fence_grace)  # no database fence here: let routed writes land first
            for source in old:
                _dbfence.barrier(backend.engines[source], self._present(backend, source))
        result.seconds["barrier"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        result.repaired += self._catch_up(backend, old, new, lease, targets)
        result.seconds["catch-up"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        report = self._verify_copies(backend, old, new, lease, targets)
        result.seconds["verify"] = time.perf_counter() - t1
        result.verify = report
        if not report.ok:
            raise ReshardVerifyError("verify failed: the cut-over did not happen\n" + report.render(), report=report)

    # -- the steps: each a list of table/source jobs over the back end ---------------------
    def _prepare(self, backend: Backend, new: HashRing) -> None:
        for target in new:
            backend.prepare(target, self.tables)

    def _copy(
        self, backend: Backend, old: HashRing, new: HashRing, state: ReshardState, lease: Lease, result: ReshardResult
    ) -> None:
        """Copy the moving rows of every table (parents first) on every source into the shadow tables."""
        jobs = [
            self._batches_job("copy", backend.copy, mt, source, new, state, result.copied)
            for mt in self.tables
            for source in old
            if self._pending(backend, state, "copy", mt, source)
        ]
        self._run_jobs(backend, jobs, lease)

    def _delete(
        self, backend: Backend, old: HashRing, new: HashRing, state: ReshardState, lease: Lease, result: ReshardResult
    ) -> None:
        """Delete the moved rows from their old shards: one job per source shard, children first on each."""

        def per_source(source: str) -> Job:
            def job(emit: Emit) -> None:
                for mt in reversed(self.tables):
                    if self._pending(backend, state, "delete", mt, source):
                        self._batches_job("delete", backend.delete, mt, source, new, state, result.deleted)(emit)

            return job

        self._run_jobs(backend, [per_source(source) for source in old], lease)

    def _pending(self, backend: Backend, state: ReshardState, step: str, mt: MovingTable, source: str) -> bool:
        """True when ``step`` of ``mt`` on ``source`` is not done yet and the table is there."""
        return not self.store.progress(state, step, mt.name, source).done and backend.has_table(source, mt.table.name)

    def _batches_job(
        self, step: str, batches: Callable[[MovingTable, str, HashRing, Sequence[Any] | None], Iterator[Step]],
        mt: MovingTable, source: str, new: HashRing, state: ReshardState, counts: dict[str, int],
    ) -> Job:  # fmt: skip
        """A job that runs ``batches`` (a back end's copy or delete) of ``mt`` on ``source`` from
        its stored progress, saving the progress and emitting an event after every batch."""

        def job(emit: Emit) -> None:
            prog = self.store.progress(state, step, mt.name, source)
            moved, scanned, total, t0 = prog.rows, 0, 0, time.perf_counter()

            def event(kind: str) -> ProgressEvent:
                elapsed = 0.0 if kind == "start" else time.perf_counter() - t0
                return ProgressEvent(kind, step, mt.name, source, scanned, total, moved, elapsed)

            started = False
            for batch in batches(mt, source, new, prog.last_pk):
                if not started:
                    total, started = batch.total, True
                    emit(event("start"))
                moved += batch.moved
                scanned += batch.scanned
                with self._lock:
                    counts[mt.name] = counts.get(mt.name, 0) + batch.moved
                self.store.save_progress(state, step, mt.name, source, batch.last, moved, batch.done)
                emit(event("advance"))
            emit(event("end"))

        return job

    def _catch_up(self, backend: Backend, old: HashRing, new: HashRing, lease: Lease | None, targets: set[str]) -> int:
        """Repair every copy on ``targets`` from its source; the number of rows repaired."""
        return self._compare_all(backend, old, new, lease, repair=True, targets=targets)[1]

    def _verify_copies(
        self, backend: Backend, old: HashRing, new: HashRing, lease: Lease | None, targets: set[str]
    ) -> VerifyReport:
        """Compare every moving row with its copy on ``targets``."""
        return self._compare_all(backend, old, new, lease, repair=False, targets=targets)[0]

    def _compare_all(
        self, backend: Backend, old: HashRing, new: HashRing, lease: Lease | None, *, repair: bool,
        targets: set[str] | None = None,
    ) -> tuple[VerifyReport, int]:  # fmt: skip
        """Compare every moving row with its copy (on ``targets``, default every shard): repair
        (catch-up) or report (verify); one job per table and source."""
        shadowed = {mt.name: {t for t in new if backend.has_table(t, mt.shadow.name)} for mt in self.tables}

        def compare(mt: MovingTable, source: str) -> Job:
            to = [t for t in new if t != source and (targets is None or t in targets)]
            return lambda emit: backend.compare(mt, source, new, to, shadowed[mt.name], repair=repair)

        jobs = [compare(mt, s) for mt in self.tables for s in old if backend.has_table(s, mt.table.name)]
        report, repaired = VerifyReport(), 0
        for part, n in self._run_jobs(backend, jobs, lease):  # in table, source order
            report.extend(part)
            repaired += n
        return report, repaired

    def _merge(self, backend: Backend, target: str) -> None:
        """Move the shadow rows of ``target`` into its real tables and drop the shadows: one transaction."""
        backend.merge(target, self.tables)

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
            backend = self._backend(old, new)
            if state is None:
                state = self.store.create(old, new, [t.name for t in self.tables])
            result = ReshardResult(old, new, state.phase)
            if state.phase in ("copying", "fenced"):
                self._prepare(backend, new)
                self._copy(backend, old, new, state, lease, result)
            return result
        finally:
            lease.release()

    def verify(self) -> VerifyReport:
        """Compare the moving rows with their copies (no fence, no repair, no switch).

        While writes go on, rows written since the copy show up as differences; the run's own
        verify happens under the write fence, after a catch-up.
        """
        old, new, _ = self.rings()
        report, _ = self._compare_all(self._backend(old, new), old, new, None, repair=False)
        return report


def _nothing() -> None:
    pass


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
