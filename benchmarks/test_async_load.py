"""Load on the async API (issue 14): many concurrent tasks on 4 PostgreSQL shards.

``SHARDKIT_LOAD_TASKS`` tasks (default 500) run at once on one event loop for
``SHARDKIT_LOAD_SECONDS`` (default 30).  Each task loops over operations, as a request
handler would, each in an ``AsyncSession`` of its own (``cluster.async_session()``) or
through the async manager (``User.objects.aget`` / ``acreate``):

* routed point reads by shard key (``session.get`` and ``User.objects.aget(id=k)``);
* routed writes: inserts of new users (``session.add`` + ``commit``, and ``acreate``) and
  updates of the task's own users (``UPDATE ... WHERE id = k``);
* one fan-out per 20 operations (``ORDER BY score DESC LIMIT 100`` over the 4 shards,
  under a deadline).

Pools: ``pool_size`` 10 per shard, no overflow, ``pool_timeout`` ``SHARDKIT_LOAD_POOL_TIMEOUT``
(default 10 s); a fan-out's deadline is ``SHARDKIT_LOAD_DEADLINE`` (default 10 s).  With 500
tasks on 40 connections the tasks queue for connections: that is the point.  The only errors
allowed are those pool timeouts (SQLAlchemy's ``TimeoutError``, or a fan-out's
``FanoutTimeoutError`` while waiting for a pooled connection); anything else fails the run.

Afterwards every shard is read back with psycopg2: every acknowledged insert is present exactly
once, on its ring shard, with the score of its last acknowledged update; a row nobody
acknowledged must be one whose write failed (never one nobody attempted).

The driver is ``SHARDKIT_LOAD_DRIVER`` (default ``asyncpg``; ``psycopg`` for psycopg 3); the
seed is ``SHARDKIT_LOAD_USERS`` users per shard (default 10_000).  A table of throughput and
latencies is printed; a quick run::

    SHARDKIT_LOAD_SECONDS=5 SHARDKIT_LOAD_TASKS=100 pytest benchmarks/test_async_load.py -s
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, exc, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from benchmarks.test_fanout_bench import COUNTRIES, DDL, SHARDS, _copy
from shardkit.errors import FanoutTimeoutError
from tests.conftest import DatabaseFactory

TASKS = int(os.environ.get("SHARDKIT_LOAD_TASKS", "500"))
SECONDS = float(os.environ.get("SHARDKIT_LOAD_SECONDS", "30"))
USERS = int(os.environ.get("SHARDKIT_LOAD_USERS", "10000"))
POOL_SIZE = 10
POOL_TIMEOUT = float(os.environ.get("SHARDKIT_LOAD_POOL_TIMEOUT", "10"))
DEADLINE = float(os.environ.get("SHARDKIT_LOAD_DEADLINE", "10"))
DRIVER = os.environ.get("SHARDKIT_LOAD_DRIVER", "asyncpg")
FANOUT_EVERY = 20
FIRST_NEW_ID = 100_000_000  # ids of the inserts: task t writes FIRST_NEW_ID + t * 1_000_000 + n (int32 column)


class LoadBase(shardkit.ModelMixin, DeclarativeBase):
    pass


class LoadUser(LoadBase):
    """The fan-out benchmark's ``bench_users`` table, with the Django-style manager."""

    __tablename__ = "bench_users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int]
    country: Mapped[str] = mapped_column(String(2))


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    pool_timeouts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    acked: dict[int, int] = field(default_factory=dict)  # id -> score of its last acknowledged write
    failed_writes: set[int] = field(default_factory=set)  # ids whose insert or update raised
    fanout_rows: Counter[int] = field(default_factory=Counter)


@dataclass
class World:
    cluster: shardkit.Cluster
    ring: shardkit.HashRing
    dsns: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import psycopg2
    from sqlalchemy.engine import make_url

    factory = DatabaseFactory(Path(tmp_path_factory.mktemp("load")))
    try:
        urls = factory.urls("postgresql", "default", *SHARDS)
        ring = shardkit.HashRing(SHARDS)
        rnd = random.Random(14)
        dsns: dict[str, str] = {}
        for alias in SHARDS:
            u = make_url(urls[alias])
            dsns[alias] = f"host={u.host} port={u.port or 5432} dbname={u.database} user={u.username}"
            rows = [
                (i, f"user{i}", rnd.randint(0, 1_000_000), rnd.choice(COUNTRIES))
                for i in range(1, 4 * USERS + 1)
                if ring.get(i) == alias
            ]
            conn = psycopg2.connect(dsns[alias])
            try:
                with conn.cursor() as cur:
                    cur.execute(DDL)
                _copy(conn, iter(rows))
                conn.commit()
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("VACUUM ANALYZE bench_users")
            finally:
                conn.close()
        cluster = shardkit.Cluster(
            urls,
            routers=[shardkit.HashRingRouter(ring)],
            engine_options={"pool_size": POOL_SIZE, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT},
            async_driver=DRIVER,
        )
        yield World(cluster, ring, dsns)
        cluster.dispose()
    finally:
        factory.drop_all()


def _is_pool_timeout(error: BaseException) -> bool:
    if isinstance(error, exc.TimeoutError):  # QueuePool limit ... reached, connection timed out
        return True
    return isinstance(error, FanoutTimeoutError) and "waiting for a pooled connection" in str(error)


async def _task(number: int, world: World, stats: Stats, stop: float) -> None:
    cluster = world.cluster
    rnd = random.Random(number)
    own: list[int] = []  # this task's acknowledged inserts
    next_id = FIRST_NEW_ID + number * 1_000_000
    ops = 0
    while time.monotonic() < stop:
        ops += 1
        roll = rnd.random()
        if ops % FANOUT_EVERY == 0:
            kind = "fan-out top 100"
        elif roll < 0.6:
            kind = "read (session.get)" if roll < 0.3 else "read (objects.aget)"
        elif roll < 0.8 or not own:
            kind = "insert (session)" if roll < 0.7 else "insert (objects.acreate)"
        else:
            kind = "update"
        key: int | None = None
        score = rnd.randint(0, 1_000_000)
        started = time.perf_counter()
        try:
            if kind == "fan-out top 100":
                stmt = select(LoadUser).order_by(LoadUser.score.desc(), LoadUser.id).limit(100)
                async with cluster.async_session() as s:
                    result = await s.execute(stmt.execution_options(shardkit_deadline=DEADLINE))
                    stats.fanout_rows[len(result.scalars().all())] += 1
            elif kind.startswith("read"):
                key = rnd.choice(own) if own and rnd.random() < 0.3 else rnd.randint(1, 4 * USERS)
                if kind == "read (session.get)":
                    async with cluster.async_session() as s:
                        user = await s.get(LoadUser, key)
                else:
                    with cluster.activated():
                        user = await LoadUser.objects.aget(id=key)
                if user is None or user.id != key or shardkit.db_of(user) != world.ring.get(key):
                    stats.errors.append(f"{kind} of {key} read {user!r} from {shardkit.db_of(user)}")
            elif kind.startswith("insert"):
                key, next_id = next_id, next_id + 1
                fields = {"id": key, "name": f"t{number}", "score": score, "country": "se"}
                if kind == "insert (session)":
                    async with cluster.async_session() as s:
                        s.add(LoadUser(**fields))
                        await s.commit()
                else:
                    with cluster.activated():
                        await LoadUser.objects.acreate(**fields)
                stats.acked[key] = score
                own.append(key)
            else:
                key = rnd.choice(own)
                async with cluster.async_session() as s:
                    result = await s.execute(update(LoadUser).where(LoadUser.id == key).values(score=score))
                    await s.commit()
                changed = getattr(result, "rowcount", None)
                if changed != 1:
                    stats.errors.append(f"update of {key} changed {changed} rows")
                stats.acked[key] = score
        except Exception as error:
            if not kind.startswith("read") and key is not None and not kind.startswith("fan"):
                stats.failed_writes.add(key)
            if _is_pool_timeout(error):
                stats.pool_timeouts[kind] += 1
            else:
                stats.errors.append(f"{kind}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        stats.latencies[kind].append(time.perf_counter() - started)


async def _load(world: World, stats: Stats) -> float:
    stop = time.monotonic() + SECONDS
    started = time.perf_counter()
    try:
        await asyncio.gather(*(_task(n, world, stats, stop) for n in range(TASKS)))
    finally:
        await world.cluster.adispose()
    return time.perf_counter() - started


def _read_back(world: World) -> dict[int, list[tuple[str, int]]]:
    """id -> [(shard, score)] of every row written by the load, read with psycopg2."""
    import psycopg2

    found: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for alias in SHARDS:
        conn = psycopg2.connect(world.dsns[alias])
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id, score FROM bench_users WHERE id >= %s", (FIRST_NEW_ID,))
                for key, score in cur.fetchall():
                    found[key].append((alias, score))
        finally:
            conn.close()
    return found


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(stats: Stats, elapsed: float) -> str:
    lines = [
        f"async load: {TASKS} tasks, {SECONDS:g} s, 4 PostgreSQL shards ({DRIVER}), pool_size {POOL_SIZE}/shard "
        f"(no overflow, pool_timeout {POOL_TIMEOUT:g} s), fan-out every {FANOUT_EVERY} ops, {USERS} users/shard",
        f"{'operation':<26}{'done':>9}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}{'pool t/o':>10}",
    ]
    total = 0
    for kind in sorted(set(stats.latencies) | set(stats.pool_timeouts)):
        values = stats.latencies.get(kind, [])
        total += len(values)
        p50 = statistics.median(values) * 1e3 if values else float("nan")
        p99 = _percentile(values, 0.99) * 1e3 if values else float("nan")
        lines.append(
            f"{kind:<26}{len(values):>9}{len(values) / elapsed:>10.1f}{p50:>10.1f}{p99:>10.1f}"
            f"{stats.pool_timeouts.get(kind, 0):>10}"
        )
    lines.append(
        f"{'all':<26}{total:>9}{total / elapsed:>10.1f}{'':>20}{sum(stats.pool_timeouts.values()):>10}"
        f"   errors: {len(stats.errors)}; elapsed {elapsed:.1f} s"
    )
    return "\n".join(lines)


def test_async_load(benchmark: Any, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    stats = Stats()
    elapsed: float = benchmark.pedantic(lambda: asyncio.run(_load(world, stats)), rounds=1, iterations=1)
    table = _table(stats, elapsed)
    benchmark.extra_info["table"] = table
    with capsys.disabled():
        print("\n" + table)

    assert not stats.errors, f"{len(stats.errors)} errors, first: {stats.errors[:5]}"
    assert sum(len(v) for v in stats.latencies.values()) > 0
    assert set(stats.fanout_rows) <= {100}, f"fan-outs that did not give 100 rows: {stats.fanout_rows}"

    found = _read_back(world)
    for key, score in stats.acked.items():
        rows = found.get(key, [])
        assert len(rows) == 1, f"acknowledged write {key} is present {len(rows)} times: {rows}"
        assert rows[0] == (world.ring.get(key), score), f"row {key}: {rows[0]}, acknowledged on {world.ring.get(key)}"
    unacknowledged = set(found) - set(stats.acked)
    assert unacknowledged <= stats.failed_writes, f"rows nobody wrote: {sorted(unacknowledged - stats.failed_writes)}"
