"""Async benchmarks (issue 14) on the local PostgreSQL server, peers side by side in one run.

The data are the fan-out benchmark's (``benchmarks/test_fanout_bench.py``: 4 shard databases
x ``SHARDKIT_BENCH_USERS`` users, default 100_000, loaded once per session); its fixture and
statements are imported, not copied.  Async peers run on asyncpg, each round awaited on one
event loop (``asyncio.Runner``) that every async peer shares.

Fan-out ``ORDER BY score DESC LIMIT 100`` (``TOP_STMT``):

``async shardkit``        ``await s.scalars(...)`` on ``cluster.async_session()``: the 4 shard
                          statements run as coroutines on the loop, merged (the global top 100)
``sync shardkit``         the same statement on ``cluster.session()`` (worker threads)
``async horizontal_shard`` SQLAlchemy's ``ShardedSession`` as the ``sync_session_class`` of an
                          ``AsyncSession`` on the same async engines: shards one after another,
                          rows concatenated (400 unsorted rows: timed as it does)

targets: async shardkit <= 1.0 x sync shardkit, <= 0.8 x async horizontal_shard.

Routed point read ``select(User).where(User.id == k)`` (``POINT_BATCH`` reads per round, a new
session per round, the same keys for both):

``async shardkit``        ``cluster.async_session()``: routed by the ring to the row's shard
``plain AsyncSession``    ``AsyncSession(bind=<that shard's async engine>)``: no routing at all

target: async shardkit <= 1.15 x plain AsyncSession.

A table of medians, ratios and targets is printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import make_url, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from test_fanout_bench import SHARDS, TOP_SQL, TOP_STMT, BenchUser, PgWorld, _raw_query, pg_world

from shardkit import HashRing

__all__ = ["pg_world"]  # the fixture, imported

POINT_BATCH = 50

_FIGURES: dict[str, dict[str, float]] = {}  # case -> peer -> median seconds
_TARGETS: list[tuple[str, str, str, float]] = []  # (case, peer, versus, max ratio)
_NOTES: list[str] = []
_RATIOS: dict[tuple[str, str, str], float] = {}  # (case, peer, versus) -> median of paired ratios

TOP = "fan-out ORDER BY score DESC LIMIT 100"
POINT = f"routed point read ({POINT_BATCH} per round)"
_TARGETS += [
    (TOP, "async shardkit", "sync shardkit", 1.0),
    (TOP, "async shardkit", "async horizontal_shard", 0.8),
    (POINT, "async shardkit", "plain AsyncSession", 1.15),
]


class AsyncWorld:
    """The benchmark world's cluster on asyncpg, one event loop for every async peer."""

    def __init__(self, world: PgWorld) -> None:
        self.world = world
        self.runner = asyncio.Runner()
        world.cluster.async_driver = "asyncpg"
        self.hs_engines = {
            a: create_async_engine(make_url(world.urls[a]).set(drivername="postgresql+asyncpg")) for a in SHARDS
        }

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        async def dispose() -> None:
            await self.world.cluster.adispose()
            for engine in self.hs_engines.values():
                await engine.dispose()

        self.run(dispose())
        self.runner.close()


@pytest.fixture(scope="module")
def aworld(pg_world: PgWorld) -> Iterator[AsyncWorld]:
    world = AsyncWorld(pg_world)
    yield world
    world.close()


def _record(case: str, peer: str, benchmark: Any) -> None:
    _FIGURES.setdefault(case, {})[peer] = benchmark.stats.stats.median


# ------------------------------------------------------------------ fan-out: the global top 100


def _truth(world: PgWorld) -> list[tuple[int, int]]:
    run = _raw_query(world, "single", TOP_SQL)
    try:
        return [(r[0], r[2]) for r in run()]
    finally:
        run.conn.close()  # type: ignore[attr-defined]


async def _top_async(aworld: AsyncWorld) -> list[Any]:
    async with aworld.world.cluster.async_session() as s:
        return list((await s.scalars(TOP_STMT)).all())


def _top_sync(aworld: AsyncWorld) -> list[Any]:
    with aworld.world.cluster.session() as s:
        return s.scalars(TOP_STMT).all()


async def _top_hs(aworld: AsyncWorld) -> list[Any]:
    binds = {a: e.sync_engine for a, e in aworld.hs_engines.items()}

    def sharded(**kw: Any) -> ShardedSession:
        return ShardedSession(
            shards=binds,
            shard_chooser=lambda mapper, instance, **k: "s0",
            identity_chooser=lambda mapper, primary_key, **k: SHARDS,
            execute_chooser=lambda ctx: SHARDS,
        )

    async with AsyncSession(sync_session_class=sharded) as s:
        return list((await s.scalars(TOP_STMT)).all())


@pytest.mark.postgres
def test_top_async_shardkit(benchmark: Any, aworld: AsyncWorld) -> None:
    got = benchmark(lambda: aworld.run(_top_async(aworld)))
    assert [(u.id, u.score) for u in got] == _truth(aworld.world)  # the global top 100
    _record(TOP, "async shardkit", benchmark)


@pytest.mark.postgres
def test_top_sync_shardkit(benchmark: Any, aworld: AsyncWorld) -> None:
    got = benchmark(lambda: _top_sync(aworld))
    assert [(u.id, u.score) for u in got] == _truth(aworld.world)
    _record(TOP, "sync shardkit", benchmark)


@pytest.mark.postgres
def test_top_async_horizontal_shard(benchmark: Any, aworld: AsyncWorld) -> None:
    assert len(benchmark(lambda: aworld.run(_top_hs(aworld)))) == 400  # 4 x 100, not sorted, not cut
    _record(TOP, "async horizontal_shard", benchmark)


# ------------------------------------------------------------------ routed point reads


def _keys(world: PgWorld) -> list[int]:
    rnd = random.Random(99)
    return [rnd.randint(1, 4 * world.n) for _ in range(POINT_BATCH)]


async def _point_shardkit(aworld: AsyncWorld, keys: list[int]) -> int:
    found = 0
    async with aworld.world.cluster.async_session() as s:
        for k in keys:
            found += (await s.execute(select(BenchUser).where(BenchUser.id == k))).scalar_one().id == k
    return found


_RING = HashRing(SHARDS)  # the benchmark data's placement (test_fanout_bench's ring)


async def _point_plain(aworld: AsyncWorld, keys: list[int]) -> int:
    engines = {a: aworld.world.cluster.async_engine(a) for a in SHARDS}  # the same pools as shardkit's
    owner = {k: _RING.get(k) for k in keys}  # known beforehand: no routing in the loop
    found = 0
    sessions = {a: AsyncSession(bind=e) for a, e in engines.items()}
    try:
        for k in keys:
            s = sessions[owner[k]]
            found += (await s.execute(select(BenchUser).where(BenchUser.id == k))).scalar_one().id == k
    finally:
        for s in sessions.values():
            await s.close()
    return found


@pytest.mark.postgres
def test_point_async_shardkit(benchmark: Any, aworld: AsyncWorld) -> None:
    keys = _keys(aworld.world)
    assert benchmark(lambda: aworld.run(_point_shardkit(aworld, keys))) == POINT_BATCH
    _record(POINT, "async shardkit", benchmark)


@pytest.mark.postgres
def test_point_plain_async_session(benchmark: Any, aworld: AsyncWorld) -> None:
    keys = _keys(aworld.world)
    assert benchmark(lambda: aworld.run(_point_plain(aworld, keys))) == POINT_BATCH
    _record(POINT, "plain AsyncSession", benchmark)


# ------------------------------------------------------------------ alternating pairs (the ratios)

PAIRS = 15


def _alternate(peers: dict[str, Callable[[], Any]], rounds: int = PAIRS) -> dict[str, list[float]]:
    """Time each peer once per round, the order rotating every round: a noisy neighbour hits
    every peer alike.  Returns peer -> the times of its rounds."""
    names = list(peers)
    for fn in peers.values():
        fn()  # warm: pools, prepared statements, caches
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            peers[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _pair_ratios(times: dict[str, list[float]], case: str) -> None:
    for peer, versus, _limit in [(p, v, x) for c, p, v, x in _TARGETS if c == case]:
        ratios = [a / b for a, b in zip(times[peer], times[versus], strict=True)]
        _RATIOS[(case, peer, versus)] = statistics.median(ratios)
    for peer, values in times.items():
        _FIGURES.setdefault(case, {})[f"{peer} (paired)"] = statistics.median(values)


@pytest.mark.postgres
def test_top_alternating(aworld: AsyncWorld) -> None:
    times = _alternate(
        {
            "async shardkit": lambda: aworld.run(_top_async(aworld)),
            "sync shardkit": lambda: _top_sync(aworld),
            "async horizontal_shard": lambda: aworld.run(_top_hs(aworld)),
        }
    )
    _pair_ratios(times, TOP)


@pytest.mark.postgres
def test_point_alternating(aworld: AsyncWorld) -> None:
    keys = _keys(aworld.world)
    times = _alternate(
        {
            "async shardkit": lambda: aworld.run(_point_shardkit(aworld, keys)),
            "plain AsyncSession": lambda: aworld.run(_point_plain(aworld, keys)),
        }
    )
    _pair_ratios(times, POINT)


# ------------------------------------------------------------------ the table


class _Summary:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not _FIGURES:
            return
        write = terminalreporter.write_line
        terminalreporter.section("shardkit async figures (medians; asyncpg)")
        for note in _NOTES:
            write(note)
        for case, peers in _FIGURES.items():
            write(f"  {case}")
            for peer, value in peers.items():
                write(f"    {peer:<26} {value * 1e3:10.2f} ms")
        write(f"  targets (median of {PAIRS} alternating rounds' ratios; else the ratio of the medians)")
        for case, peer, versus, limit in _TARGETS:
            ratio = _RATIOS.get((case, peer, versus))
            how = "paired"
            if ratio is None:
                a, b = _FIGURES.get(case, {}).get(peer), _FIGURES.get(case, {}).get(versus)
                if a is None or b is None:
                    write(f"    {case}: {peer} / {versus}: not measured")
                    continue
                ratio, how = a / b, "medians"
            verdict = "met" if ratio <= limit else "MISSED"
            write(f"    {case}: {peer} / {versus} = {ratio:5.2f}x ({how}; target <= {limit:.2f}x) {verdict}")


@pytest.fixture(scope="session", autouse=True)
def _async_summary_plugin(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("shardkit-async-summary"):
        manager.register(_Summary(), "shardkit-async-summary")
