"""Replica routing (issue 16): what choosing a replica adds to a routed point read, as paired ratios.

Three clusters over the same two PostgreSQL shards of the local server
(``SHARDKIT_BENCH_REPLICA_USERS`` rows, default 20_000): ``plain`` has no replicas; ``replicas``
declares each shard's replica -- a REAL streaming replica of the local server started for the run
(``tests/replicas/pgreplica.py``), healthy, ``MAX_REPLICA_LAG`` on, so every read goes through the
policy and the cached lag check; ``routing`` declares replica aliases that name the primary's own
databases (routing's cost without a second server).  Each side runs
``session.scalars(select(User).where(User.id == k)).one()`` over the same keys in one session,
``SHARDKIT_BENCH_OPS`` reads (60) per round, ``SHARDKIT_BENCH_ROUNDS`` rounds (151), in a rotating
order; the figure is the median of the per-round ratios (replicas / plain), so load from elsewhere
on the machine falls on both sides of a pair.

* routed point read with replicas / without: <= 1.05x

What it does NOT separate: the replica is another server process with its own buffers and a smaller
``shared_buffers``; a replica a network hop away costs that hop, which is not routing's cost.  The
routing overhead alone (``Replicas.read_alias``, no I/O) is printed beside it, per read.

Run: ``pytest benchmarks/test_replica_bench.py -p no:cacheprovider -s`` (the table is printed at the end).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter
from shardkit._replicas import replicas_of
from tests.conftest import PG_URL, DatabaseFactory, require_server
from tests.replicas.pgreplica import PgReplica

SHARDS = ["s0", "s1"]
USERS = int(os.environ.get("SHARDKIT_BENCH_REPLICA_USERS", "20000"))
ROUNDS = int(os.environ.get("SHARDKIT_BENCH_ROUNDS", "151"))
OPS = int(os.environ.get("SHARDKIT_BENCH_OPS", "60"))
TARGET = 1.05

_FIGURES: list[tuple[str, str, str, str]] = []


class Base(DeclarativeBase):
    pass


class RUser(Base):
    __tablename__ = "replica_bench_users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class _Summary:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("replica routing figures (median of per-round paired ratios)")
        terminalreporter.write_line(f"{'figure':<58} {'value':>12} {'target':>8}  met")
        for name, value, target, met in _FIGURES:
            terminalreporter.write_line(f"{name:<58} {value:>12} {target:>8}  {met}")


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    require_server(PG_URL, "pg")
    request.config.pluginmanager.register(_Summary(), "shardkit-replica-figures")
    factory = DatabaseFactory(tmp_path_factory.mktemp("replica-bench"))
    replica = PgReplica(PG_URL)
    try:
        try:
            replica.start()
        except Exception as exc:
            pytest.skip(f"!!! cannot start a PostgreSQL streaming replica: {exc}")
        urls = factory.urls("postgresql", "default", *SHARDS)
        ring = HashRing(SHARDS)
        plain = shardkit.Cluster(urls, routers=[HashRingRouter(ring)])
        plain.create_all(Base)
        rows: dict[str, list[dict[str, Any]]] = {a: [] for a in SHARDS}
        for i in range(1, USERS + 1):
            rows[ring.get(i)].append({"id": i, "name": f"user{i}"})
        for alias in SHARDS:
            with plain.engine(alias).begin() as conn:
                conn.execute(insert(RUser), rows[alias])
            with plain.engine(alias).connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE replica_bench_users"))
        replica.wait_caught_up()
        databases: dict[str, Any] = {"default": urls["default"]}
        for alias in SHARDS:
            name = urls[alias].rsplit("/", 1)[1]
            on = {"ENGINE": "postgresql", "NAME": name, "HOST": "127.0.0.1", "USER": "postgres"}
            databases[alias] = {**on, "PORT": 5432, "REPLICAS": [f"{alias}_r1"], "MAX_REPLICA_LAG": 30.0}
            databases[f"{alias}_r1"] = {**on, "PORT": replica.port}
        with_replicas = shardkit.Cluster(databases, routers=[HashRingRouter(ring)])
        # the same, its replica aliases naming the primary's databases: routing's cost without a second server
        same_server = dict(databases)
        for alias in SHARDS:
            same_server[f"{alias}_r1"] = {**databases[f"{alias}_r1"], "PORT": 5432}
        routing_only = shardkit.Cluster(same_server, routers=[HashRingRouter(ring)])
        yield {"plain": plain, "replicas": with_replicas, "routing": routing_only}
        plain.dispose()
        with_replicas.dispose()
        routing_only.dispose()
    finally:
        replica.stop()
        factory.drop_all()


def test_replica_point_read(clusters: dict[str, Any]) -> None:
    with_replicas = clusters["replicas"]
    keys = list(range(1, USERS + 1, max(1, USERS // OPS)))[:OPS]
    sessions = {side: cluster.session() for side, cluster in clusters.items()}

    def run(side: str) -> float:
        s = sessions[side]
        started = time.perf_counter()
        for k in keys:
            s.scalars(select(RUser).where(RUser.id == k)).one()
        s.rollback()
        return (time.perf_counter() - started) / len(keys)

    for side in ("plain", "replicas", "routing") * 2:  # warm-up: pools, caches, the lag check
        run(side)
    with sessions["replicas"] as s:  # the reads really are on the replica
        assert s.execute(select(RUser.name, text("pg_is_in_recovery()")).where(RUser.id == 1)).one()[1] is True
    ratios, plain_t, ours_t, routing_ratios = [], [], [], []
    sides = ["plain", "replicas", "routing"]
    for r in range(ROUNDS):
        order = sides[r % 3 :] + sides[: r % 3]
        got = {side: run(side) for side in order}
        plain_t.append(got["plain"])
        ours_t.append(got["replicas"])
        ratios.append(got["replicas"] / got["plain"])
        routing_ratios.append(got["routing"] / got["plain"])
    for s in sessions.values():
        s.close()
    replicas = replicas_of(with_replicas)
    assert replicas is not None
    n = 20000
    started = time.perf_counter()
    for _ in range(n):
        replicas.read_alias("s0")
    choose_us = (time.perf_counter() - started) / n * 1e6
    with with_replicas.session() as s:
        started = time.perf_counter()
        for _ in range(n):
            s.read_on("s0")
        read_on_us = (time.perf_counter() - started) / n * 1e6
    ratio = statistics.median(ratios)
    spread = f"{min(ratios):.3f}..{max(ratios):.3f}"
    _FIGURES.append(
        (
            "routed point read: replicas / no replicas (paired)",
            f"{ratio:.3f}x",
            f"<={TARGET}x",
            "yes" if ratio <= TARGET else "NO",
        )
    )
    _FIGURES.append(("  per-round ratios, min..max", spread, "", ""))
    routing = statistics.median(routing_ratios)
    _FIGURES.append(("  replica aliases on the primary's server / no replicas", f"{routing:.3f}x", "", ""))
    _FIGURES.append(("  median read, no replicas", f"{statistics.median(plain_t) * 1e6:.0f} us", "", ""))
    _FIGURES.append(("  median read, replicas", f"{statistics.median(ours_t) * 1e6:.0f} us", "", ""))
    _FIGURES.append(("  replica choice alone (policy + cached lag check)", f"{choose_us:.2f} us", "", ""))
    _FIGURES.append(("  the session's whole read decision (ShardSession.read_on)", f"{read_on_us:.2f} us", "", ""))
    print(f"\nreplica point read ratio {ratio:.3f} (rounds {spread}); choice {choose_us:.2f} us")
    assert ratio <= TARGET * 1.5, f"replica routing costs {ratio:.3f}x a read without replicas"


def test_replica_point_read_sqlite(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same read on SQLite files (replica aliases naming the shard's own file): no server to
    schedule, so what remains is routing's CPU cost, paired the same way."""
    folder = tmp_path_factory.mktemp("replica-bench-sqlite")
    ring = HashRing(SHARDS)
    files = {alias: {"ENGINE": "sqlite", "NAME": str(folder / f"{alias}.db")} for alias in ["default", *SHARDS]}
    plain = shardkit.Cluster(files, routers=[HashRingRouter(ring)])
    plain.create_all(Base)
    rows: dict[str, list[dict[str, Any]]] = {a: [] for a in SHARDS}
    for i in range(1, USERS + 1):
        rows[ring.get(i)].append({"id": i, "name": f"user{i}"})
    for alias in SHARDS:
        with plain.engine(alias).begin() as conn:
            conn.execute(insert(RUser), rows[alias])
    databases: dict[str, Any] = dict(files)
    for alias in SHARDS:
        databases[alias] = {**files[alias], "REPLICAS": [f"{alias}_r1"]}
        databases[f"{alias}_r1"] = dict(files[alias])
    with_replicas = shardkit.Cluster(databases, routers=[HashRingRouter(ring)])
    keys = list(range(1, USERS + 1, max(1, USERS // OPS)))[:OPS]
    sessions = {"plain": plain.session(), "replicas": with_replicas.session()}

    def run(side: str) -> float:
        s = sessions[side]
        started = time.perf_counter()
        for k in keys:
            s.scalars(select(RUser).where(RUser.id == k)).one()
        s.rollback()
        return (time.perf_counter() - started) / len(keys)

    for side in ("plain", "replicas") * 3:
        run(side)
    ratios, plain_t = [], []
    for r in range(ROUNDS):
        order = ("plain", "replicas") if r % 2 == 0 else ("replicas", "plain")
        got = {side: run(side) for side in order}
        plain_t.append(got["plain"])
        ratios.append(got["replicas"] / got["plain"])
    for s in sessions.values():
        s.close()
    plain.dispose()
    with_replicas.dispose()
    ratio = statistics.median(ratios)
    _FIGURES.append(
        (
            "SQLite point read: replicas / no replicas (paired)",
            f"{ratio:.3f}x",
            f"<={TARGET}x",
            "yes" if ratio <= TARGET else "NO",
        )
    )
    _FIGURES.append(("  median read, no replicas (SQLite)", f"{statistics.median(plain_t) * 1e6:.0f} us", "", ""))
    assert ratio <= TARGET * 1.5, f"replica routing costs {ratio:.3f}x a read without replicas"
