"""Routed point operations against plain SQLAlchemy (issue #13's figures), peers in one run.

4 local PostgreSQL shards on a ring plus one database holding every row
(``SHARDKIT_BENCH_POINT_USERS`` users, default 20_000).  Every case runs the
same statements over the same 500 keys:

``select``   ``session.scalars(select(User).where(User.id == k)).one()``:
             shardkit's ``cluster.session()`` vs a plain ``Session`` on the
             shard that holds the row (the plain side knows the owner for free).
``get``      ``session.get(User, k)`` in a fresh session per round (so every
             get reads the database), same peers.
``add``      ``session.add(User(...)); session.commit()`` of one new object,
             vs a plain ``Session`` on the owning shard.
``threads``  16 threads doing routed point reads for a fixed time, against
             16 threads of plain SQLAlchemy point reads on the one database
             holding every row.  The two alternate, several pairs (each side
             first in every other pair); the median of the per-pair throughput
             ratios is reported.

Each case runs the two sides alternately (plain, shardkit; then shardkit, plain; ...) and
reports the median of the per-pair ratios, so load from elsewhere on the machine falls on
both sides of a pair; ``select`` and ``get`` interleave the two sides every 25 keys within
a round (each side's round time is the sum of its slices).  Ratios (shardkit time / plain
time, or throughput shardkit / plain) are printed at the end of the run with their targets.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, create_engine, insert, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import shardkit
from tests.conftest import DatabaseFactory

N = int(os.environ.get("SHARDKIT_BENCH_POINT_USERS", "20000"))
SHARDS = ["p0", "p1", "p2", "p3"]
KEYS = list(range(1, N + 1, max(1, N // 500)))[:500]
THREADS = 16
SECONDS = float(os.environ.get("SHARDKIT_BENCH_POINT_SECONDS", "2"))
PAIRS = int(os.environ.get("SHARDKIT_BENCH_POINT_PAIRS", "3"))
PAIRED_ROUNDS = int(os.environ.get("SHARDKIT_BENCH_POINT_ROUNDS", "15"))  # plain/shardkit pairs per case
_FIGURES: dict[str, float] = {}
_TARGETS = {
    "select": ("routed point read / plain, time", "<= 1.10"),
    "get": ("session.get / plain, time", "<= 1.05"),
    "add": ("add + commit of one object / plain, time", "<= 1.10"),
    "threads": (f"{THREADS}-thread point-read throughput / plain one database", ">= 0.92"),
}


class Base(DeclarativeBase):
    pass


class PUser(Base):
    __tablename__ = "pusers"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int]


@dataclass
class World:
    cluster: shardkit.Cluster
    ring: shardkit.HashRing
    single: Engine
    owner_engine: dict[int, Engine] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    databases = DatabaseFactory(tmp_path_factory.mktemp("point"))  # dropped at the end, even on failure
    cluster: shardkit.Cluster | None = None
    single: Engine | None = None
    try:
        urls = {a: make_url(u) for a, u in databases.urls("postgresql", *SHARDS, "default", "single").items()}
        ring = shardkit.HashRing(SHARDS)
        pool = {"pool_size": THREADS, "max_overflow": 0}  # one connection per thread on every side
        settings = {
            a: {
                "ENGINE": "postgresql",
                "NAME": urls[a].database,
                "USER": urls[a].username,
                "HOST": urls[a].host,
                "PORT": urls[a].port,
                "ENGINE_OPTIONS": pool,
            }
            for a in ["default", *SHARDS]
        }
        cluster = shardkit.Cluster(settings, routers=[shardkit.HashRingRouter(ring)])
        cluster.create_all(Base)
        single = create_engine(urls["single"], **pool)
        Base.metadata.create_all(single)
        rows = [{"id": i, "name": f"user{i}", "score": i % 1000} for i in range(1, N + 1)]
        with single.begin() as conn:
            conn.execute(PUser.__table__.insert(), rows)
        with cluster.session() as s:
            s.execute(insert(PUser), rows)  # ORM bulk insert: routed row by row
            s.commit()
        world = World(cluster, ring, single)
        world.owner_engine = {k: cluster.engine(ring.get(k)) for k in KEYS}
        yield world
    finally:
        if cluster is not None:
            cluster.dispose()
        if single is not None:
            single.dispose()
        databases.drop_all()


def _paired(benchmark: Any, case: str, ours: Any, plain: Any, rounds: int) -> None:
    """Run the two sides alternately, ``rounds`` pairs after a warm-up pair; the figure is the
    median of the per-pair ratios (so a noisy neighbour slows both sides of a pair alike), and
    each side's median time is shown beside it."""
    ours_times: list[float] = []
    plain_times: list[float] = []

    def pairs() -> None:
        plain()
        ours()  # warm-up pair: pools filled, statements compiled
        for i in range(rounds):
            first, second = (plain, ours) if i % 2 == 0 else (ours, plain)  # neither always goes first
            for side in (first, second):
                t0 = time.perf_counter()
                side()
                (ours_times if side is ours else plain_times).append(time.perf_counter() - t0)

    benchmark.pedantic(pairs, rounds=1, iterations=1)
    _FIGURES[f"{case}: shardkit"] = statistics.median(ours_times)
    _FIGURES[f"{case}: plain"] = statistics.median(plain_times)
    _FIGURES[f"{case}: ratio"] = statistics.median(o / p for o, p in zip(ours_times, plain_times, strict=True))


CHUNK = 25  # keys per timed slice of a paired round


def _paired_slices(benchmark: Any, case: str, ours: Any, plain: Any, rounds: int) -> None:
    """Like :func:`_paired`, but the two sides interleave within a round: ``ours()`` and
    ``plain()`` each give a side ``(read(keys), finish())``; every slice of CHUNK keys is read
    by both, one right after the other (which goes first alternates), and each side's time is
    the sum of its slices and its ``finish()``.  A noisy moment then falls on both sides of a
    slice, not on one side of a whole round."""
    ours_times: list[float] = []
    plain_times: list[float] = []
    slices = [KEYS[i : i + CHUNK] for i in range(0, len(KEYS), CHUNK)]

    def one_round(n: int, record: bool) -> None:
        sides = {"ours": ours(), "plain": plain()}
        spent = dict.fromkeys(sides, 0.0)
        for j, keys in enumerate(slices):
            order = ("plain", "ours") if (n + j) % 2 == 0 else ("ours", "plain")  # neither always first
            for name in order:
                t0 = time.perf_counter()
                sides[name][0](keys)
                spent[name] += time.perf_counter() - t0
        for name in ("plain", "ours") if n % 2 == 0 else ("ours", "plain"):
            t0 = time.perf_counter()
            sides[name][1]()
            spent[name] += time.perf_counter() - t0
        if record:
            ours_times.append(spent["ours"])
            plain_times.append(spent["plain"])

    def pairs() -> None:
        one_round(0, record=False)  # warm-up: pools filled, statements compiled
        for n in range(rounds):
            one_round(n, record=True)

    benchmark.pedantic(pairs, rounds=1, iterations=1)
    _FIGURES[f"{case}: shardkit"] = statistics.median(ours_times)
    _FIGURES[f"{case}: plain"] = statistics.median(plain_times)
    _FIGURES[f"{case}: ratio"] = statistics.median(o / p for o, p in zip(ours_times, plain_times, strict=True))


def _plain_sessions(world: World) -> dict[Engine, Session]:
    return {engine: Session(engine) for engine in set(world.owner_engine.values())}


def test_select(benchmark: Any, world: World) -> None:
    benchmark.group = "point read by shard key, per 500 keys (plain and shardkit interleaved)"
    session: Any = world.cluster.session()

    def ours() -> tuple[Any, Any]:
        def read(keys: list[int]) -> None:
            for k in keys:
                session.scalars(select(PUser).where(PUser.id == k)).one()

        return read, session.rollback

    sessions = _plain_sessions(world)
    by_key = {k: sessions[e] for k, e in world.owner_engine.items()}

    def plain() -> tuple[Any, Any]:
        def read(keys: list[int]) -> None:
            for k in keys:
                by_key[k].scalars(select(PUser).where(PUser.id == k)).one()

        def finish() -> None:
            for s in sessions.values():
                s.rollback()

        return read, finish

    _paired_slices(benchmark, "select", ours, plain, rounds=PAIRED_ROUNDS)


def test_get(benchmark: Any, world: World) -> None:
    benchmark.group = "session.get by primary key, per 500 keys (plain and shardkit interleaved)"

    def ours() -> tuple[Any, Any]:  # a fresh session per round, so every get reads the database
        session = world.cluster.session()

        def read(keys: list[int]) -> None:
            for k in keys:
                assert session.get(PUser, k) is not None

        return read, session.close

    def plain() -> tuple[Any, Any]:
        sessions = _plain_sessions(world)

        def read(keys: list[int]) -> None:
            for k in keys:
                assert sessions[world.owner_engine[k]].get(PUser, k) is not None

        def finish() -> None:
            for s in sessions.values():
                s.close()

        return read, finish

    _paired_slices(benchmark, "get", ours, plain, rounds=PAIRED_ROUNDS)


_NEXT_ID = count(10 * N)


def test_add_commit(benchmark: Any, world: World) -> None:
    benchmark.group = "add + commit of one object, per 100 objects (plain and shardkit alternating)"

    def ours() -> None:
        with world.cluster.session() as session:
            for _ in range(100):
                session.add(PUser(id=next(_NEXT_ID), name="n", score=1))
                session.commit()

    engines = {a: world.cluster.engine(a) for a in SHARDS}

    def plain() -> None:
        sessions = {a: Session(e) for a, e in engines.items()}
        for _ in range(100):
            new_id = next(_NEXT_ID)
            s = sessions[world.ring.get(new_id)]
            s.add(PUser(id=new_id, name="n", score=1))
            s.commit()
        for s in sessions.values():
            s.close()

    _paired(benchmark, "add", ours, plain, rounds=PAIRED_ROUNDS)


def _throughput(worker: Any) -> float:
    """Point reads per second of ``THREADS`` threads running ``worker(stop, counts, i)`` for SECONDS."""
    stop = threading.Event()
    counts = [0] * THREADS
    threads = [threading.Thread(target=worker, args=(stop, counts, i), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # warm up: pools filled, statements cached
    start_counts = sum(counts)
    t0 = time.perf_counter()
    time.sleep(SECONDS)
    done = sum(counts) - start_counts
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(timeout=10)
    return done / elapsed


def test_threads_throughput(benchmark: Any, world: World) -> None:
    benchmark.group = f"{THREADS} threads of point reads, alternating pairs"

    def routed(stop: threading.Event, counts: list[int], i: int) -> None:
        with world.cluster.session() as s:
            j = i
            while not stop.is_set():
                s.scalars(select(PUser).where(PUser.id == KEYS[j % len(KEYS)])).one()
                s.rollback()
                counts[i] += 1
                j += 7

    def plain(stop: threading.Event, counts: list[int], i: int) -> None:
        with Session(world.single) as s:
            j = i
            while not stop.is_set():
                s.scalars(select(PUser).where(PUser.id == KEYS[j % len(KEYS)])).one()
                s.rollback()
                counts[i] += 1
                j += 7

    ratios: list[float] = []

    def pairs() -> None:
        for i in range(PAIRS):
            if i % 2 == 0:  # neither side always goes first
                ours = _throughput(routed)
                theirs = _throughput(plain)
            else:
                theirs = _throughput(plain)
                ours = _throughput(routed)
            ratios.append(ours / theirs)

    benchmark.pedantic(pairs, rounds=1, iterations=1)
    _FIGURES["threads: ratio"] = statistics.median(ratios)


class _Summary:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not _FIGURES:
            return
        terminalreporter.section(f"shardkit routed point operations ({N} users, 4 PostgreSQL shards, medians)")
        for case, (what, target) in _TARGETS.items():
            value = _FIGURES.get(f"{case}: ratio")
            if value is None:
                continue
            ours, plain = _FIGURES.get(f"{case}: shardkit"), _FIGURES.get(f"{case}: plain")
            times = f"  ({ours * 1e3:.1f} ms vs {plain * 1e3:.1f} ms)" if ours and plain else ""
            terminalreporter.write_line(f"  {what:<58} {value:6.3f}x  target {target}{times}")


@pytest.fixture(scope="session", autouse=True)
def _point_summary_plugin(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("shardkit-point-summary"):
        manager.register(_Summary(), "shardkit-point-summary")
