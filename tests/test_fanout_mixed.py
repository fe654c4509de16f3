"""Fan-out over a cluster mixing SQLite and PostgreSQL shards: answers as the first shard's
dialect would give them, NULL placement included (PostgreSQL puts NULLs last, SQLite first)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, create_engine, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import shardkit
from tests.conftest import DatabaseFactory

SHARDS = ["lite0", "pg1", "lite2", "pg3"]


class Base(DeclarativeBase):
    pass


class Player(Base):
    __tablename__ = "players"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    score: Mapped[int | None]
    team: Mapped[str] = mapped_column(String(2))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[shardkit.Cluster, Any]]:
    factory = DatabaseFactory(tmp_path_factory.mktemp("mixed"))
    try:
        urls = {alias: factory.url("sqlite" if alias.startswith("lite") else "postgresql", alias) for alias in SHARDS}
        cluster = shardkit.Cluster(
            {"default": urls["lite0"], **urls}, routers=[shardkit.HashRingRouter(shardkit.HashRing(SHARDS))]
        )
        cluster.create_all(Base)
        single = create_engine(factory.url("sqlite", "single"))
        Base.metadata.create_all(single)
        rnd = random.Random(5)
        rows = [
            {
                "id": i,
                "name": f"p{i:03d}",
                "score": None if i % 7 == 0 else rnd.randint(0, 50),
                "team": rnd.choice("ab"),
            }
            for i in range(1, 301)
        ]
        with cluster.session() as s:
            s.execute(insert(Player), rows)
            s.commit()
        with Session(single) as s:
            s.execute(insert(Player), rows)
            s.commit()
        yield cluster, single
        cluster.dispose()
        single.dispose()
    finally:
        factory.drop_all()


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize(("limit", "offset"), [(None, 0), (25, 0), (25, 30)])
def test_order_with_nulls_as_the_reference_dialect(
    world: tuple[shardkit.Cluster, Any], descending: bool, limit: int | None, offset: int
) -> None:
    cluster, single = world
    order = Player.score.desc() if descending else Player.score.asc()
    stmt = select(Player.id, Player.score).order_by(order, Player.id).limit(limit).offset(offset)
    with cluster.session() as s:
        result = s.execute(stmt)
        got = [tuple(r) for r in result]
        assert set(shardkit.shards_of(result)) == set(SHARDS)
    with single.connect() as conn:
        expected = [tuple(r) for r in conn.execute(stmt)]
    assert got == expected


def test_explicit_nulls_placement_is_kept(world: tuple[shardkit.Cluster, Any]) -> None:
    cluster, single = world
    stmt = select(Player.id).order_by(Player.score.desc().nulls_first(), Player.id).limit(20)
    with cluster.session() as s:
        got = s.scalars(stmt).all()
    with single.connect() as conn:
        assert got == conn.scalars(stmt).all()


def test_group_by_on_mixed_shards(world: tuple[shardkit.Cluster, Any]) -> None:
    cluster, single = world
    stmt = (
        select(Player.team, func.count(), func.sum(Player.score), func.min(Player.score))
        .group_by(Player.team)
        .order_by(Player.team)
    )
    with cluster.session() as s:
        got = [tuple(r) for r in s.execute(stmt)]
    with single.connect() as conn:
        assert got == [tuple(r) for r in conn.execute(stmt)]


def test_pending_changes_are_flushed_once_before_a_fan_out(world: tuple[shardkit.Cluster, Any]) -> None:
    cluster, _single = world
    with cluster.session() as s:
        s.add_all([Player(id=10_000 + i, name=f"new{i}", score=1, team="z") for i in range(20)])
        # the fan-out's autoflush writes them first (in this thread), then every shard counts them
        assert s.scalar(select(func.count()).select_from(Player).where(Player.team == "z")) == 20
        s.rollback()
