"""Load on the async API (issue 14): many concurrent tasks on 4 PostgreSQL shards.

``SHARDKIT_LOAD_TASKS`` tasks (default 500) run at once on one event loop for
``SHARDKIT_LOAD_SECONDS`` (default 30).  Each task loops over operations, as a request
handler would, each in an ``AsyncSession`` of its own (``cluster.async_session()``) or
through the async manager (``User.objects.aget`` / ``acreate``):

* routed point reads by shard key (``session.get`` and ``User.objects.aget(id=k)``);
* routed writes: inserts of new users (``session.add`` + ``commit``, and ``acreate``) and
  updates of the task's own users (``UPDATE ... WHERE id = k``);
* one fan-out per 20 operations (``ORDER BY score DESC LIMIT 100`` over the 4 shards), each
  task at its own phase (``SHARDKIT_LOAD_FANOUT_EVERY``, default 20; 0 for none).

Pools: ``pool_size`` 10 per shard, no overflow, ``pool_timeout`` ``SHARDKIT_LOAD_POOL_TIMEOUT``
(default 10 s); a fan-out has no deadline unless ``SHARDKIT_LOAD_DEADLINE`` gives one (a
deadline measures the loop's backlog too: under this load a statement's answer may wait
seconds for the loop to read it).  With 500 tasks on 40 connections the tasks queue for
connections: that is the point.  The only errors allowed are those pool timeouts
(SQLAlchemy's ``TimeoutError``, alone or as the cause of a fan-out's error, or a fan-out's
``FanoutTimeoutError`` while waiting for a pooled connection); anything else fails the run.
A ticker task measures the loop's lag (how late a 10 ms sleep wakes up): under CPU
saturation it, not the databases, sets the latencies.

Two cases, side by side in one run: ``uncapped`` (every task runs its fan-out when its turn
comes) and ``capped`` (at most ``SHARDKIT_LOAD_FANOUT_LIMIT``, default 4, fan-outs at a time,
an ``asyncio.Semaphore`` in the app).  A fan-out keeps each shard's connection (its session's
transaction) until every shard has answered, so while it waits for a connection of a busy shard
it holds one of each other shard: with many at once they take most of the pools from each other
and from the point operations.  The closing line gives the capped / uncapped throughput ratio.

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
import contextlib
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
from shardkit.errors import FanoutTimeoutError, ShardQueryError
from tests.conftest import DatabaseFactory

TASKS = int(os.environ.get("SHARDKIT_LOAD_TASKS", "500"))
SECONDS = float(os.environ.get("SHARDKIT_LOAD_SECONDS", "30"))
USERS = int(os.environ.get("SHARDKIT_LOAD_USERS", "10000"))
POOL_SIZE = 10
POOL_TIMEOUT = float(os.environ.get("SHARDKIT_LOAD_POOL_TIMEOUT", "10"))
DEADLINE = float(os.environ.get("SHARDKIT_LOAD_DEADLINE", "0")) or None  # a fan-out's deadline; 0: none
DRIVER = os.environ.get("SHARDKIT_LOAD_DRIVER", "asyncpg")
FANOUT_EVERY = int(os.environ.get("SHARDKIT_LOAD_FANOUT_EVERY", "20"))  # 0: no fan-out
# the "capped" case: at most this many fan-outs at a time (an asyncio.Semaphore); see the module docstring
FANOUT_LIMIT = int(os.environ.get("SHARDKIT_LOAD_FANOUT_LIMIT", "4"))
CASES = {"uncapped": 0, "capped": FANOUT_LIMIT}
ID_SPAN = 600_000_000  # a case's inserts: task t writes base + t * 1_000_000 + n (an int32 column)
FIRST_NEW_ID = 100_000_000


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
    loop_lag: list[float] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds of this process during the load


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


def _is_pool_timeout(error: BaseException | None) -> bool:
    """SQLAlchemy's pool ``TimeoutError`` (QueuePool limit ... reached): itself, as a cause, or as
    every failed shard's error of a fan-out; or a fan-out deadline that passed while waiting for
    a pooled connection."""
    if error is None:
        return False
    if isinstance(error, exc.TimeoutError):
        return True
    if isinstance(error, FanoutTimeoutError) and "waiting for a pooled connection" in str(error):
        return True
    if isinstance(error, ShardQueryError):
        errors = getattr(error, "errors", None) or {}
        if errors and all(_is_pool_timeout(e) for e in errors.values()):
            return True
    return _is_pool_timeout(error.__cause__)


async def _task(
    number: int, world: World, stats: Stats, stop: float, gate: asyncio.Semaphore | None, base: int
) -> None:
    cluster = world.cluster
    rnd = random.Random(number)
    own: list[int] = []  # this task's acknowledged inserts
    next_id = base + number * 1_000_000
    ops = 0
    phase = rnd.randrange(FANOUT_EVERY) if FANOUT_EVERY else 0  # tasks do their fan-outs at different ops
    while time.monotonic() < stop:
        ops += 1
        roll = rnd.random()
        if FANOUT_EVERY and ops % FANOUT_EVERY == phase:
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
                async with gate or contextlib.nullcontext(), cluster.async_session() as s:
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


async def _ticker(stats: Stats, stop: float) -> None:
    while time.monotonic() < stop:
        started = time.perf_counter()
        await asyncio.sleep(0.01)
        stats.loop_lag.append(time.perf_counter() - started - 0.01)


async def _load(world: World, stats: Stats, limit: int, base: int) -> float:
    stop = time.monotonic() + SECONDS
    started, cpu = time.perf_counter(), time.process_time()
    try:
        gate = asyncio.Semaphore(limit) if limit else None
        await asyncio.gather(_ticker(stats, stop), *(_task(n, world, stats, stop, gate, base) for n in range(TASKS)))
    finally:
        await world.cluster.adispose()
    stats.cpu = time.process_time() - cpu
    return time.perf_counter() - started


def _read_back(world: World, base: int) -> dict[int, list[tuple[str, int]]]:
    """id -> [(shard, score)] of every row written by the load, read with psycopg2."""
    import psycopg2

    found: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for alias in SHARDS:
        conn = psycopg2.connect(world.dsns[alias])
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id, score FROM bench_users WHERE id >= %s AND id < %s", (base, base + ID_SPAN))
                for key, score in cur.fetchall():
                    found[key].append((alias, score))
        finally:
            conn.close()
    return found


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(stats: Stats, elapsed: float, limit: int) -> str:
    lines = [
        f"async load: {TASKS} tasks, {SECONDS:g} s, 4 PostgreSQL shards ({DRIVER}), pool_size {POOL_SIZE}/shard "
        f"(no overflow, pool_timeout {POOL_TIMEOUT:g} s), fan-out every {FANOUT_EVERY} ops "
        f"(deadline {DEADLINE or 'none'}, at most {limit or 'any number'} at a time), {USERS} users/shard",
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
    if stats.loop_lag:
        lag = stats.loop_lag
        lines.append(
            f"event loop lag (a 10 ms sleep woke up late by): p50 {statistics.median(lag) * 1e3:.1f} ms, "
            f"p99 {_percentile(lag, 0.99) * 1e3:.1f} ms, max {max(lag) * 1e3:.1f} ms; "
            f"acknowledged writes {len(stats.acked)}; this process used {stats.cpu:.1f} s of CPU "
            f"({stats.cpu / elapsed:.0%} of one core); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
    return "\n".join(lines)


_THROUGHPUT: dict[str, tuple[float, int, int]] = {}  # case -> (operations per second, operations, pool timeouts)


@pytest.mark.parametrize("case", list(CASES))
def test_async_load(case: str, benchmark: Any, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    limit = CASES[case]
    base = FIRST_NEW_ID + list(CASES).index(case) * ID_SPAN
    stats = Stats()
    elapsed: float = benchmark.pedantic(lambda: asyncio.run(_load(world, stats, limit, base)), rounds=1, iterations=1)
    table = f"[{case}] " + _table(stats, elapsed, limit)
    done = sum(len(v) for v in stats.latencies.values())
    _THROUGHPUT[case] = (done / elapsed, done, sum(stats.pool_timeouts.values()))
    if len(_THROUGHPUT) == len(CASES):
        (a, (ra, _, ta)), (b, (rb, _, tb)) = list(_THROUGHPUT.items())[:2]
        table += f"\nthroughput {b} / {a}: {rb / ra:.2f}x ({rb:.1f} vs {ra:.1f} ops/s; pool timeouts {tb} vs {ta})"
    benchmark.extra_info["table"] = table
    with capsys.disabled():
        print("\n" + table)

    assert not stats.errors, f"{len(stats.errors)} errors, first: {stats.errors[:5]}"
    assert done > 0
    assert set(stats.fanout_rows) <= {100}, f"fan-outs that did not give 100 rows: {stats.fanout_rows}"

    found = _read_back(world, base)
    for key, score in stats.acked.items():
        rows = found.get(key, [])
        assert len(rows) == 1, f"acknowledged write {key} is present {len(rows)} times: {rows}"
        assert rows[0] == (world.ring.get(key), score), f"row {key}: {rows[0]}, acknowledged on {world.ring.get(key)}"
    unacknowledged = set(found) - set(stats.acked)
    assert unacknowledged <= stats.failed_writes, f"rows nobody wrote: {sorted(unacknowledged - stats.failed_writes)}"
