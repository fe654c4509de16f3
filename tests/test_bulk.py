"""Bulk writes on a ring: every row lands on the shard its key names, one batch per shard."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import BigInteger, String, event, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit

SHARDS = ["s0", "s1", "s2", "s3"]


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int] = mapped_column(default=7)


@pytest.fixture
def ring_cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[tuple[shardkit.Cluster, shardkit.HashRing]]:
    ring = shardkit.HashRing(SHARDS)
    cluster = shardkit.Cluster(make_urls("default", *SHARDS), routers=[shardkit.HashRingRouter(ring)])
    cluster.create_all(Base)
    yield cluster, ring
    cluster.dispose()


def placement(cluster: shardkit.Cluster) -> dict[int, str]:
    where = {}
    for alias in SHARDS:
        with cluster.engine(alias).connect() as conn:
            for (member_id,) in conn.execute(text("SELECT id FROM members")):
                assert member_id not in where, f"id {member_id} on two shards"
                where[member_id] = alias
    return where


def test_bulk_insert_groups_rows_per_shard(ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing]) -> None:
    cluster, ring = ring_cluster
    batches: Counter[str] = Counter()
    for alias in SHARDS:
        event.listen(
            cluster.engine(alias),
            "before_cursor_execute",
            lambda *a, alias=alias: batches.update([alias]) if "INSERT" in a[2] else None,
        )
    rows = [{"id": i, "name": f"m{i}"} for i in range(1, 401)]
    with cluster.session() as s:
        result = s.execute(insert(Member), rows)
        s.commit()
    assert result.rowcount == 400  # type: ignore[attr-defined]
    where = placement(cluster)
    assert len(where) == 400
    assert all(where[i] == ring.get(i) for i in where)
    for alias in SHARDS:  # column defaults applied, as the ORM's bulk form applies them
        with cluster.engine(alias).connect() as conn:
            assert set(conn.execute(text("SELECT DISTINCT score FROM members")).scalars()) <= {7}
    assert set(batches) == set(SHARDS) and max(batches.values()) <= 2  # one executemany per shard


def test_bulk_insert_assigns_ids(ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing]) -> None:
    cluster, ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member), [{"name": f"n{i}"} for i in range(100)])
        s.commit()
    where = placement(cluster)
    assert len(where) == 100
    assert all(where[i] == ring.get(i) for i in where)


def test_add_all_lands_every_object_on_its_shard(ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing]) -> None:
    cluster, ring = ring_cluster
    members = [Member(name=f"x{i}") for i in range(300)]
    with cluster.session() as s:
        s.add_all(members)
        s.commit()
        assert all(shardkit.db_of(m) == ring.get(m.id) for m in members)
        one = members[7]
        found = s.scalars(select(Member).where(Member.id == one.id)).one()
        assert found is one
    where = placement(cluster)
    assert where == {m.id: ring.get(m.id) for m in members}


def test_bulk_forms_on_one_placed_alias(ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing]) -> None:
    from sqlalchemy import update

    cluster, _ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member).options(shardkit.using("s2")), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        s.execute(update(Member).options(shardkit.using("s2")), [{"id": 1, "name": "A"}])
        s.commit()
    with cluster.engine("s2").connect() as conn:
        assert sorted(conn.execute(text("SELECT id, name FROM members"))) == [(1, "A"), (2, "b")]
