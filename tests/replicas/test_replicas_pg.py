"""Replicas per shard against a REAL PostgreSQL streaming replica (``tests/replicas/conftest.py``).

Which server answered is asked of the server itself: ``pg_is_in_recovery()`` is true on the
replica only.  Lag is made by pausing the replica's WAL replay; an unreachable replica is the
loopback proxy of ``tests/faults.py`` cut or black-holed in front of it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter
from shardkit._replicas import replicas_of

from ..conftest import DatabaseFactory
from ..faults import TcpProxy
from .pgreplica import PgReplica

pytestmark = pytest.mark.postgres

SHARDS = ["s0", "s1"]
LAG = 3.0  # MAX_REPLICA_LAG of the tests: the primary is shared with other test runs, so its replay is busy
N = 24


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "replica_people"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


IN_RECOVERY = func.pg_is_in_recovery()


def databases_with_replicas(
    urls: dict[str, str], replica: PgReplica, *, proxy: TcpProxy | None = None, **options: Any
) -> dict[str, Any]:
    """default, s0, s1 on the primary; s0_r1 and s1_r1 the same databases on the replica."""
    databases: dict[str, Any] = {"default": urls["default"]}
    for shard in SHARDS:
        name = urls[shard].rsplit("/", 1)[1]
        port = proxy.port if proxy is not None else replica.port
        databases[shard] = {
            "ENGINE": "postgresql",
            "NAME": name,
            "HOST": "127.0.0.1",
            "PORT": 5432,
            "USER": "postgres",
            "REPLICAS": [f"{shard}_r1"],
            **options,
        }
        databases[f"{shard}_r1"] = {"ENGINE": "postgresql", "NAME": name, "HOST": "127.0.0.1", "PORT": port,
                                    "USER": "postgres"}  # fmt: skip
    return databases


@pytest.fixture
def urls(databases: DatabaseFactory, replica: PgReplica) -> dict[str, str]:
    """The primary's databases, with the people 1..N on the ring's shards, replayed on the replica."""
    made = databases.urls("postgresql", "default", *SHARDS)
    cluster = shardkit.Cluster(made, routers=[HashRingRouter(HashRing(SHARDS))])
    try:
        cluster.create_all(Base)
        with cluster.session() as s:
            s.add_all(Person(id=i, name=f"p{i}") for i in range(1, N + 1))
            s.commit()
    finally:
        cluster.dispose()
    replica.wait_caught_up()
    return made


def make_cluster(databases: dict[str, Any]) -> shardkit.Cluster:
    return shardkit.Cluster(databases, routers=[HashRingRouter(HashRing(SHARDS))])


@pytest.fixture
def cluster(urls: dict[str, str], replica: PgReplica) -> Iterator[shardkit.Cluster]:
    made = make_cluster(databases_with_replicas(urls, replica, MAX_REPLICA_LAG=LAG))
    yield made
    made.dispose()


def on_replica(s: shardkit.ShardSession, pk: int, *options: Any, **execution_options: Any) -> tuple[bool, str]:
    stmt = select(Person.name, IN_RECOVERY).where(Person.id == pk).options(*options)
    row = s.execute(stmt, execution_options=execution_options).one()
    return bool(row[1]), row[0]


def test_replica_aliases_are_not_shards(cluster: shardkit.Cluster) -> None:
    assert cluster.spec("s0_r1").replica_of == "s0"
    assert cluster.spec("s0").replicas == ("s0_r1",)
    assert cluster.create_all(Base)["s0_r1"] == []  # read-only: never migrated


def test_routed_reads_run_on_the_replica(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        assert on_replica(s, 3) == (True, "p3")  # the fast path
        assert on_replica(s, 3, shardkit.using(HashRing(SHARDS).get(3))) == (True, "p3")  # the listeners' path
        person = s.get(Person, 5)
        assert person is not None and person.name == "p5"
        assert shardkit.db_of(person) == HashRing(SHARDS).get(5)  # it belongs to the primary
        # ORM entity reads, one shard: the replica answers
        people = s.scalars(select(Person).where(Person.id.in_([7]))).all()
        assert [p.id for p in people] == [7]


def test_primary_on_request(cluster: shardkit.Cluster) -> None:
    shard = HashRing(SHARDS).get(4)
    with cluster.session() as s:
        assert on_replica(s, 4, shardkit.using(shard, primary=True)) == (False, "p4")
        assert on_replica(s, 4, shardkit_primary=True) == (False, "p4")
        assert on_replica(s, 4, shardkit.using(shard)) == (True, "p4")
        assert on_replica(s, 4, shardkit.using(f"{shard}_r1")) == (True, "p4")  # a replica named directly


def test_a_session_reads_its_own_writes(cluster: shardkit.Cluster, replica: PgReplica) -> None:
    replica.pause()  # nothing written now reaches the replica: a read there would not see it
    with cluster.session() as s:
        s.add(Person(id=100, name="new"))
        # pending: the autoflush writes it first, and the read goes to the primary
        assert on_replica(s, 100) == (False, "new")
        # written in this transaction: the primary, also for a read by a lazy path (get)
        s.expire_all()
        assert s.get(Person, 100) is not None
        assert on_replica(s, 100) == (False, "new")
        other = next(i for i in range(1, N + 1) if HashRing(SHARDS).get(i) != HashRing(SHARDS).get(100))
        assert on_replica(s, other)[0] is True  # the shard it did not write to: still the replica
        s.commit()
    with cluster.session() as s:
        person = s.get(Person, 100, options=[shardkit.using(HashRing(SHARDS).get(100), primary=True)])
        assert person is not None and person.name == "new"
        person.name = "changed"  # a write of an object read: to the primary
        s.commit()
    replica.resume()
    replica.wait_caught_up()
    with cluster.session() as s:
        assert on_replica(s, 100) == (True, "changed")


def test_lagging_replica_is_skipped_with_a_warning(
    cluster: shardkit.Cluster, replica: PgReplica, caplog: pytest.LogCaptureFixture
) -> None:
    with cluster.session() as s:
        assert on_replica(s, 2)[0] is True
    replica.pause()
    shard = HashRing(SHARDS).get(2)
    with cluster.session() as s:
        person = s.get(Person, 2)
        assert person is not None
        person.name = "after"
        s.commit()
    time.sleep(LAG + 0.5)  # beyond MAX_REPLICA_LAG
    replicas = replicas_of(cluster)
    assert replicas is not None
    replicas.forget()  # past the check interval
    with caplog.at_level(logging.WARNING, logger="shardkit._replicas"), cluster.session() as s:
        assert on_replica(s, 2) == (False, "after")
    warned = [r for r in caplog.records if r.name == "shardkit._replicas" and r.levelno == logging.WARNING]
    assert any(f"replica {shard}_r1 of {shard} skipped: lag" in r.getMessage() for r in warned), warned
    replica.resume()
    replica.wait_caught_up()
    assert back_on_replica(cluster, 2) == (True, "after")


def back_on_replica(cluster: shardkit.Cluster, pk: int, within: float = 15.0) -> tuple[bool, str]:
    """The read of ``pk`` once its replica is in use again.  The replica's lag is measured as
    PostgreSQL lets a standby measure it (time since the last replayed commit, while WAL it
    received waits for replay): the primary is shared with other test runs whose WAL without a
    commit yet makes that an overestimate for a moment."""
    replicas = replicas_of(cluster)
    assert replicas is not None
    deadline = time.monotonic() + within
    while True:
        replicas.forget()
        with cluster.session() as s:
            found = on_replica(s, pk)
        if found[0] or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_unreachable_replica_falls_back_to_the_primary(
    urls: dict[str, str], replica: PgReplica, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    proxy = TcpProxy(("127.0.0.1", replica.port))
    made = make_cluster(databases_with_replicas(urls, replica, proxy=proxy))
    try:
        with made.session() as s:
            assert on_replica(s, 6)[0] is True
        replicas = replicas_of(made)
        assert replicas is not None
        made.dispose()  # no pooled connection through the proxy: the next read connects anew
        getattr(proxy, fault)()
        replicas.forget()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="shardkit._replicas"), made.session() as s:
            assert on_replica(s, 6) == (False, "p6")
        elapsed = time.monotonic() - started
        assert elapsed < replicas.check_timeout + 1.0, elapsed  # a hung replica is not waited for
        warned = [r.getMessage() for r in caplog.records if r.name == "shardkit._replicas"]
        assert any("skipped" in m for m in warned), warned
        # cached: the next reads do not check again, and stay on the primary
        started = time.monotonic()
        with made.session() as s:
            assert on_replica(s, 6) == (False, "p6")
        assert time.monotonic() - started < 0.5
        proxy.cut()  # a black hole's connections stay open: reset them
        proxy.restore()
        assert back_on_replica(made, 6)[0] is True  # back in use
    finally:
        made.dispose()
        proxy.close()


def test_round_robin_and_weighted_spread_reads(urls: dict[str, str], replica: PgReplica) -> None:
    databases = databases_with_replicas(urls, replica)
    for shard in SHARDS:  # a second replica alias of each shard: the same replica server
        databases[f"{shard}_r2"] = dict(databases[f"{shard}_r1"])
        databases[shard]["REPLICAS"] = [f"{shard}_r1", f"{shard}_r2"]
    made = make_cluster(databases)
    used: list[str] = []
    try:
        for alias in made.aliases:
            from sqlalchemy import event

            event.listen(
                made.engine(alias),
                "before_cursor_execute",
                lambda conn, cur, sql, *a, _alias=alias: used.append(_alias) if "replica_people" in sql else None,
            )
        with made.session() as s:
            for _ in range(4):
                on_replica(s, 1)
        shard = HashRing(SHARDS).get(1)
        assert used == [f"{shard}_r1", f"{shard}_r2"] * 2 or used == [f"{shard}_r2", f"{shard}_r1"] * 2, used
    finally:
        made.dispose()


def test_fanout_over_replicas_equals_the_primary(cluster: shardkit.Cluster) -> None:
    stmt = select(Person.id, Person.name).order_by(Person.id)
    with cluster.session() as s:
        on_replicas = s.execute(stmt).all()
        on_primaries = s.execute(stmt, execution_options={"shardkit_primary": True}).all()
        counted = s.scalar(select(func.count(Person.id)))
        flags = s.execute(select(func.count(Person.id), IN_RECOVERY).group_by(IN_RECOVERY)).all()
    assert on_replicas == on_primaries == [(i, f"p{i}") for i in range(1, N + 1)]
    assert counted == N
    assert flags == [(N, True)]  # every shard's rows came from its replica


# -- the seed's (Django documentation's) primary/replica router, as written ------------------------


class PrimaryReplicaRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        """
        Reads go to a randomly-chosen replica.
        """
        return random.choice(["replica1", "replica2"])

    def db_for_write(self, model: Any, **hints: Any) -> str:
        """
        Writes always go to primary.
        """
        return "primary"

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        """
        Relations between objects are allowed if both objects are
        in the primary/replica pool.
        """
        db_set = {"primary", "replica1", "replica2"}
        if obj1._state.db in db_set and obj2._state.db in db_set:
            return True
        return None

    def allow_migrate(self, db: str, app_label: Any, model_name: Any = None, **hints: Any) -> bool:
        """
        All non-auth models end up in this pool.
        """
        return True


def test_the_seeds_primary_replica_router_keeps_working(databases: DatabaseFactory, replica: PgReplica) -> None:
    url = databases.url("postgresql", "primary")
    name = url.rsplit("/", 1)[1]
    on = {"ENGINE": "django.db.backends.postgresql", "NAME": name, "HOST": "127.0.0.1", "USER": "postgres"}
    dbs = {
        "default": url,
        "primary": {**on, "PORT": "5432", "REPLICAS": ["replica1", "replica2"]},
        "replica1": {**on, "PORT": str(replica.port)},
        "replica2": {**on, "PORT": str(replica.port)},
    }
    made = shardkit.Cluster(dbs, routers=[PrimaryReplicaRouter()])
    try:
        created = made.create_all(Base)
        assert created["replica1"] == created["replica2"] == []
        with made.session() as s:
            s.add(Person(id=1, name="one"))
            s.commit()
        replica.wait_caught_up()
        with made.session() as s:
            person = s.scalars(select(Person).where(Person.id == 1)).one()
            assert shardkit.db_of(person) in ("replica1", "replica2")
            assert s.execute(select(Person.id, IN_RECOVERY)).one() == (1, True)
            person.name = "uno"
            s.commit()
        with made.session() as s:
            assert s.scalar(select(Person.name).options(shardkit.using("primary", primary=True))) == "uno"
        replica.wait_caught_up()
        with made.session() as s:
            assert s.execute(select(Person.name, IN_RECOVERY)).one() == ("uno", True)
    finally:
        made.dispose()


def test_async_sessions_read_on_replicas_too(cluster: shardkit.Cluster, replica: PgReplica) -> None:
    import asyncio

    async def main() -> None:
        try:
            async with cluster.async_session() as s:
                row = (await s.execute(select(Person.name, IN_RECOVERY).where(Person.id == 9))).one()
                assert (row[0], bool(row[1])) == ("p9", True)
                fan = (await s.execute(select(func.count(Person.id), IN_RECOVERY).group_by(IN_RECOVERY))).all()
                assert [(n, bool(flag)) for n, flag in fan] == [(N, True)]
                s.add(Person(id=200, name="async"))
                await s.flush()
                row = (await s.execute(select(Person.name, IN_RECOVERY).where(Person.id == 200))).one()
                assert (row[0], bool(row[1])) == ("async", False)  # its own write: the primary
                await s.rollback()
        finally:
            await cluster.adispose()

    asyncio.run(main())
