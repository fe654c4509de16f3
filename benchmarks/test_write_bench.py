"""Routed writes on 4 PostgreSQL shards (issue #5's figures), peers in the same run.

N users (``SHARDKIT_BENCH_WRITE_USERS``, default 100_000), each with one order
co-located on its shard (``Order.__shard_key__ = "user_id"``).  Every round
starts from empty tables.  Cases:

``bulk: shardkit``     ``session.execute(insert(User), rows)`` then the same for orders,
                       routed row by row on the ring, one executemany per shard.
``bulk: executemany``  the floor: rows already grouped by shard (grouping not timed),
                       one Core executemany per shard per table, same connections.
``add_all: shardkit``  ``session.add_all(users + orders)``; commit; routed per object.
``add_all: plain``     plain SQLAlchemy ``add_all`` of the same objects into ONE database.

Throughput ratios (shardkit / peer) are printed at the end of the run, with their targets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, create_engine, insert, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import shardkit
from tests.conftest import DatabaseFactory

N = int(os.environ.get("SHARDKIT_BENCH_WRITE_USERS", "100000"))
SHARDS = ["w0", "w1", "w2", "w3"]
_FIGURES: dict[str, float] = {}
_TARGETS = {"bulk: shardkit": ">= 0.90", "add_all: shardkit": ">= 0.90"}  # issue 13


class Base(DeclarativeBase):
    pass


class WUser(Base):
    __tablename__ = "wusers"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int]


class WOrder(Base):
    __tablename__ = "worders"
    __shard_key__ = "user_id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("wusers.id"))
    total: Mapped[int]
    user: Mapped[WUser] = relationship()  # tells the unit of work to insert users first


@dataclass
class World:
    cluster: shardkit.Cluster
    ring: shardkit.HashRing
    single: Any  # engine of the one database
    users: list[dict[str, Any]]
    orders: list[dict[str, Any]]

    def truncate(self) -> None:
        for engine in [*(self.cluster.engine(a) for a in SHARDS), self.single]:
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE worders, wusers"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    databases = DatabaseFactory(tmp_path_factory.mktemp("writes"))  # dropped at the end, even on failure
    try:
        urls = databases.urls("postgresql", *SHARDS, "default", "single")
        ring = shardkit.HashRing(SHARDS)
        cluster = shardkit.Cluster({a: urls[a] for a in ["default", *SHARDS]}, routers=[shardkit.HashRingRouter(ring)])
        single = create_engine(urls["single"])
        try:
            cluster.create_all(Base)
            Base.metadata.create_all(single)
            users = [{"id": i, "name": f"user{i}", "score": i % 1000} for i in range(1, N + 1)]
            orders = [{"id": i, "user_id": i, "total": i % 97} for i in range(1, N + 1)]
            yield World(cluster, ring, single, users, orders)
        finally:
            cluster.dispose()
            single.dispose()
    finally:
        databases.drop_all()


def _run(benchmark: Any, world: World, fn: Any, key: str) -> None:
    benchmark.pedantic(fn, setup=world.truncate, rounds=3, iterations=1)
    _FIGURES[key] = benchmark.stats.stats.median


def test_bulk_shardkit(benchmark: Any, world: World) -> None:
    def run() -> None:
        with world.cluster.session() as s:
            s.execute(insert(WUser), world.users)
            s.execute(insert(WOrder), world.orders)
            s.commit()

    _run(benchmark, world, run, "bulk: shardkit")
    with world.cluster.engine(world.ring.get(1)).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM worders WHERE user_id = 1")).scalar() == 1


def test_bulk_executemany_floor(benchmark: Any, world: World) -> None:
    owners = world.ring.get_many([u["id"] for u in world.users])
    users_by: dict[str, list[dict[str, Any]]] = {a: [] for a in SHARDS}
    orders_by: dict[str, list[dict[str, Any]]] = {a: [] for a in SHARDS}
    for user, order, alias in zip(world.users, world.orders, owners, strict=True):
        users_by[alias].append(user)
        orders_by[alias].append(order)

    def run() -> None:
        conns = {a: world.cluster.engine(a).connect() for a in SHARDS}
        try:
            for alias, conn in conns.items():
                conn.execute(insert(WUser.__table__), users_by[alias])
                conn.execute(insert(WOrder.__table__), orders_by[alias])
                conn.commit()
        finally:
            for conn in conns.values():
                conn.close()

    _run(benchmark, world, run, "bulk: executemany")


def test_add_all_shardkit(benchmark: Any, world: World) -> None:
    def run() -> None:
        with world.cluster.session() as s:
            s.add_all([WUser(**u) for u in world.users])
            s.add_all([WOrder(**o) for o in world.orders])
            s.commit()

    _run(benchmark, world, run, "add_all: shardkit")


def test_add_all_plain_one_database(benchmark: Any, world: World) -> None:
    def run() -> None:
        with Session(world.single) as s:
            s.add_all([WUser(**u) for u in world.users])
            s.add_all([WOrder(**o) for o in world.orders])
            s.commit()

    _run(benchmark, world, run, "add_all: plain")


class _Summary:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not _FIGURES:
            return
        terminalreporter.section(f"shardkit routed writes ({N} users + {N} orders, 4 shards, medians)")
        for name, seconds in _FIGURES.items():
            terminalreporter.write_line(f"  {name:<22} {seconds:8.3f} s   {2 * N / seconds:10.0f} rows/s")
        for ours, peer in (("bulk: shardkit", "bulk: executemany"), ("add_all: shardkit", "add_all: plain")):
            if ours in _FIGURES and peer in _FIGURES:
                ratio = _FIGURES[peer] / _FIGURES[ours]
                figure = f"throughput {ours} / {peer}"
                terminalreporter.write_line(f"  {figure:<52} {ratio:6.3f}x  target {_TARGETS[ours]}")


@pytest.fixture(scope="session", autouse=True)
def _write_summary_plugin(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("shardkit-write-summary"):
        manager.register(_Summary(), "shardkit-write-summary")
