"""Streaming a fan-out (``yield_per``): the batch merge and, on PostgreSQL, the shards' next
batches read in the background -- every row once, in the one-database order.

Batches are small (``yield_per`` of 3 to 7 over ~300 rows), so the merge refills every shard
many times; a nullable sort column has its first NULL deep in the stream, so the merge
changes its key form in the middle.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter, shards_of

from ..conftest import BACKENDS, PG_URL, DatabaseFactory, require_server

SHARDS = ["s0", "s1", "s2", "s3"]
N_ROWS = 300


class Base(DeclarativeBase):
    pass


class Player(Base):
    __tablename__ = "stream_players"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    score: Mapped[int]
    bonus: Mapped[int | None]


players = Player.__table__


@dataclass
class World:
    cluster: shardkit.Cluster
    single: Engine

    def ref(self, stmt: Any) -> list[tuple[Any, ...]]:
        with self.single.connect() as conn:
            return [tuple(r) for r in conn.execute(stmt)]


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    backend: str = request.param
    if backend == "postgresql":
        require_server(PG_URL, "pg")
    factory = DatabaseFactory(Path(tmp_path_factory.mktemp(f"fanout_stream_{backend}")))
    try:
        urls = factory.urls(backend, "default", *SHARDS)
        cluster = shardkit.Cluster(urls, routers=[HashRingRouter(HashRing(SHARDS))])
        cluster.create_all(Base)
        single = create_engine(factory.url(backend, "single"))
        Base.metadata.create_all(single)
        rnd = random.Random(13)
        rows = [
            {
                "id": i,
                "name": rnd.choice(["ann", "bob", "cy", "dee", "Eve"]),
                "score": rnd.randint(0, 20),  # ties, broken by the id
                "bonus": None if i > 200 and i % 3 == 0 else rnd.randint(0, 5),  # NULLs late only
            }
            for i in range(1, N_ROWS + 1)
        ]
        with cluster.session() as s:
            s.add_all(Player(**r) for r in rows)
            s.commit()
        with single.begin() as conn:
            conn.execute(players.insert(), rows)
        yield World(cluster, single)
        cluster.dispose()
        single.dispose()
    finally:
        factory.drop_all()


@pytest.mark.parametrize("batch", [3, 7, 1000])
def test_entities_stream_in_the_global_order(world: World, batch: int) -> None:
    stmt = select(Player).order_by(Player.score.desc(), Player.id).execution_options(yield_per=batch)
    want = world.ref(select(players.c.id).order_by(players.c.score.desc(), players.c.id))
    with world.cluster.session() as s:
        result = s.scalars(stmt)
        got = [(p.id,) for p in result]
        assert len(shards_of(result)) == len(SHARDS)
    assert got == want


@pytest.mark.parametrize("batch", [4, 1000])
def test_core_rows_stream_in_the_global_order(world: World, batch: int) -> None:
    stmt = select(players.c.id, players.c.name).order_by(players.c.name.desc(), players.c.id)
    with world.cluster.session() as s:
        got = [tuple(r) for r in s.execute(stmt.execution_options(yield_per=batch))]
    assert got == world.ref(stmt)


def test_a_null_deep_in_the_stream(world: World) -> None:
    """The first batches have no NULL: the merge starts with its fast keys and changes form at
    the first NULL, with batches of every shard in hand."""
    stmt = select(players.c.id, players.c.bonus).order_by(players.c.bonus.desc().nulls_last(), players.c.id)
    with world.cluster.session() as s:
        got = [tuple(r) for r in s.execute(stmt.execution_options(yield_per=5))]
    assert got == world.ref(stmt)
    by_id = select(players.c.bonus, players.c.id).order_by(players.c.id.desc())  # no NULL in the key
    with world.cluster.session() as s:
        assert [tuple(r) for r in s.execute(by_id.execution_options(yield_per=6))] == world.ref(by_id)


def test_a_stream_left_half_read_leaves_the_session_usable(world: World) -> None:
    stmt = select(Player).order_by(Player.score, Player.id).execution_options(yield_per=5)
    with world.cluster.session() as s:
        result = s.scalars(stmt)
        first = [next(result).id for _ in range(12)]
        result.close()
        # the next statements on the same connections, in the same transaction
        assert s.scalar(select(Player.score).where(Player.id == first[0])) is not None
        again = s.scalars(stmt)
        assert [p.id for p in again][:12] == first
        s.commit()
