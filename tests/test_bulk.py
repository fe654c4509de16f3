"""Bulk writes on a ring: every row lands on the shard its key names, one batch per shard."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import BigInteger, String, bindparam, delete, event, insert, select, text, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.exc import StaleDataError

import shardkit
from shardkit.errors import CrossShardWriteError, InvalidKeyError, RoutingError

SHARDS = ["s0", "s1", "s2", "s3"]


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int] = mapped_column(default=7)


class Ticket(Base):
    """Sharded by a column that is not its primary key."""

    __tablename__ = "tickets"
    __shard_key__ = "account"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(20), default="open")


class Country(Base):
    """A reference table: the same rows on every shard."""

    __tablename__ = "countries"
    __reference_table__ = True
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


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
    cluster, _ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member).options(shardkit.using("s2")), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        s.execute(update(Member).options(shardkit.using("s2")), [{"id": 1, "name": "A"}])
        s.commit()
    with cluster.engine("s2").connect() as conn:
        assert sorted(conn.execute(text("SELECT id, name FROM members"))) == [(1, "A"), (2, "b")]


def statements_per_shard(cluster: shardkit.Cluster, verb: str) -> Counter[str]:
    """Count the ``verb`` statements (an executemany counts once) each shard receives."""
    seen: Counter[str] = Counter()
    for alias in SHARDS:
        event.listen(
            cluster.engine(alias),
            "before_cursor_execute",
            lambda *a, alias=alias: seen.update([alias]) if a[2].lstrip().upper().startswith(verb) else None,
        )
    return seen


def names(cluster: shardkit.Cluster) -> dict[int, str]:
    out: dict[int, str] = {}
    for alias in SHARDS:
        with cluster.engine(alias).connect() as conn:
            out.update({i: n for i, n in conn.execute(text("SELECT id, name FROM members"))})
    return out


def test_bulk_update_by_primary_key_reaches_each_rows_shard(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    """Issue 10: `execute(update(User), rows)` ran the whole batch on every shard and raised StaleDataError."""
    cluster, ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member), [{"id": i, "name": "old"} for i in range(1, 61)])
        s.commit()
    updates = statements_per_shard(cluster, "UPDATE")
    with cluster.session() as s:
        loaded = s.get(Member, 7)
        assert loaded is not None and loaded.name == "old"
        # int keys and digit strings (converted as the column's type, issue 10) in one batch
        rows = [{"id": i if i % 2 else str(i), "name": f"new{i}"} for i in range(1, 41)]
        result = s.execute(update(Member), rows)
        assert loaded.name == "new7"  # the identity map is synchronized, as SQLAlchemy does on one database
        s.commit()
    assert result.rowcount == 40  # type: ignore[attr-defined]
    assert rows[1] == {"id": "2", "name": "new2"}  # the caller's dicts are not changed
    assert names(cluster) == {i: f"new{i}" if i <= 40 else "old" for i in range(1, 61)}
    assert placement(cluster) == {i: ring.get(i) for i in range(1, 61)}
    touched = {ring.get(i) for i in range(1, 41)}
    assert set(updates) == touched and max(updates.values()) == 1  # one executemany per shard it needs


def test_bulk_update_by_a_non_key_primary_key_routes_by_the_shard_key(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    cluster, ring = ring_cluster
    tickets = [{"id": i, "account": 100 + i % 7} for i in range(1, 31)]
    with cluster.session() as s:
        s.execute(insert(Ticket), tickets)
        s.commit()
    with cluster.session() as s:
        s.execute(update(Ticket), [{"id": t["id"], "account": t["account"], "state": "closed"} for t in tickets[:20]])
        s.commit()
    with cluster.session() as s:
        states = {t.id: (t.state, shardkit.db_of(t)) for t in s.scalars(select(Ticket))}
    assert states == {t["id"]: ("closed" if t["id"] <= 20 else "open", ring.get(t["account"])) for t in tickets}


def test_bulk_update_rows_without_their_shard_key_are_refused_and_write_nothing(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    cluster, _ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Ticket), [{"id": 1, "account": 5}, {"id": 2, "account": 6}])
        s.execute(insert(Member), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        s.commit()
    writes = statements_per_shard(cluster, "UPDATE")
    with cluster.session() as s:
        rows = [{"id": 1, "account": 5, "state": "x"}, {"id": 2, "state": "y"}]
        with pytest.raises(RoutingError, match=r"Ticket.*account") as info:
            s.execute(update(Ticket), rows)
        assert info.value.model is Ticket  # type: ignore[attr-defined]
        s.rollback()
        # a Member row without its key: no id may be made up for a row that already exists
        with pytest.raises(RoutingError, match=r"row 1 of a bulk UPDATE of Member.*\bid\b") as info:
            s.execute(update(Member), [{"id": 1, "name": "A"}, {"name": "B"}])
        assert info.value.model is Member  # type: ignore[attr-defined]
        s.rollback()
    assert not writes
    with cluster.session() as s:
        assert sorted(s.scalars(select(Ticket.state))) == ["open", "open"]
        assert sorted(s.scalars(select(Member.name))) == ["a", "b"]


def test_bulk_update_a_missing_row_still_raises_stale_data(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    cluster, _ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member), [{"id": 1, "name": "a"}])
        s.commit()
    with cluster.session() as s, pytest.raises(StaleDataError):
        s.execute(update(Member), [{"id": 1, "name": "A"}, {"id": 999, "name": "nobody"}])


def test_bulk_update_across_shards_respects_cross_shard_writes(make_urls: Callable[..., dict[str, str]]) -> None:
    ring = shardkit.HashRing(SHARDS)
    cluster = shardkit.Cluster(
        make_urls("default", *SHARDS), routers=[shardkit.HashRingRouter(ring)], cross_shard_writes="refuse"
    )
    try:
        cluster.create_all(Base)
        ids = list(range(1, 40))
        on_one = [i for i in ids if ring.get(i) == ring.get(ids[0])]
        other = next(i for i in ids if ring.get(i) != ring.get(ids[0]))
        for key in (ids[0], other):
            with cluster.session() as s:
                s.execute(insert(Member), [{"id": key, "name": "a"}])
                s.commit()
        updates = statements_per_shard(cluster, "UPDATE")
        with cluster.session() as s:
            with pytest.raises(CrossShardWriteError):
                s.execute(update(Member), [{"id": ids[0], "name": "X"}, {"id": other, "name": "X"}])
            s.rollback()
            assert not updates  # refused before the first shard was written
            s.execute(update(Member), [{"id": i, "name": "Y"} for i in on_one[:1]])
            s.commit()
        with cluster.session() as s:
            assert sorted(s.scalars(select(Member.name))) == ["Y", "a"]
            with pytest.raises(CrossShardWriteError):  # a bulk INSERT across shards: refused up front too
                s.execute(insert(Member), [{"id": 100 + i, "name": "n"} for i in range(20)])
            s.rollback()
        assert not statements_per_shard(cluster, "INSERT")
        assert len(placement(cluster)) == 2
    finally:
        cluster.dispose()


def test_bulk_update_of_a_reference_table_updates_every_shard(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    cluster, _ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Country), [{"code": "fr", "name": "France"}, {"code": "de", "name": "Germany"}])
        s.execute(update(Country), [{"code": "fr", "name": "République française"}])
        s.commit()
    for alias in SHARDS:
        with cluster.engine(alias).connect() as conn:
            assert dict(conn.execute(text("SELECT code, name FROM countries")).all()) == {
                "fr": "République française",
                "de": "Germany",
            }


def test_bulk_delete_by_primary_key_is_refused_by_sqlalchemy_itself(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    """SQLAlchemy 2.x has no ORM bulk DELETE by primary key: the refusal passes through, nothing is deleted."""
    cluster, _ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member), [{"id": i, "name": "a"} for i in range(1, 9)])
        s.commit()
    with cluster.session() as s:
        with pytest.raises(InvalidRequestError, match="Bulk ORM DELETE not supported"):
            s.execute(delete(Member).where(Member.id == bindparam("k")), [{"k": 1}, {"k": 2}])
        s.rollback()
    assert len(placement(cluster)) == 8


def test_multi_row_values_insert_puts_each_row_on_its_shard(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    """Issue 10: `insert(User).values([{...}, {...}])` raised "Can't mix single and multiple VALUES formats"."""
    cluster, ring = ring_cluster
    inserts = statements_per_shard(cluster, "INSERT")
    with cluster.session() as s:
        s.execute(insert(Member).values([{"id": i, "name": f"d{i}"} for i in range(1, 21)]))
        s.execute(insert(Member).values([{Member.id: str(i), "name": f"s{i}"} for i in range(21, 31)]))
        s.execute(insert(Member).values([(i, f"t{i}", 3) for i in range(31, 41)]))  # positional, in column order
        s.commit()
    where = placement(cluster)
    assert where == {i: ring.get(i) for i in range(1, 41)}
    assert names(cluster) == {i: f"{'d' if i <= 20 else 's' if i <= 30 else 't'}{i}" for i in range(1, 41)}
    shards_per_statement = [len({ring.get(i) for i in r}) for r in (range(1, 21), range(21, 31), range(31, 41))]
    assert sum(inserts.values()) == sum(shards_per_statement)  # one multi-row INSERT per shard and statement


def test_multi_row_values_insert_fills_in_ids_and_returns_rows(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing], backend: str
) -> None:
    cluster, ring = ring_cluster
    with cluster.session() as s:
        s.execute(insert(Member).values([{"name": f"gen{i}"} for i in range(12)]))
        returned = s.execute(
            insert(Member).values([{"id": 1000 + i, "name": f"r{i}"} for i in range(12)]).returning(Member.id)
        ).scalars()
        assert sorted(returned) == [1000 + i for i in range(12)]  # every shard's rows
        s.commit()
    where = placement(cluster)
    assert len(where) == 24 and all(where[i] == ring.get(i) for i in where)
    with cluster.session() as s:
        generated = s.scalars(select(Member).where(Member.name.like("gen%"))).all()
        assert len(generated) == 12 and all(shardkit.db_of(m) == ring.get(m.id) for m in generated)


def test_multi_row_values_insert_refuses_a_bad_key_and_writes_nothing(
    ring_cluster: tuple[shardkit.Cluster, shardkit.HashRing],
) -> None:
    cluster, _ring = ring_cluster
    with cluster.session() as s:
        with pytest.raises(InvalidKeyError, match=r"Member\.id"):
            s.execute(insert(Member).values([{"id": 1, "name": "ok"}, {"id": "abc", "name": "bad"}]))
        s.rollback()
    assert placement(cluster) == {}


class ParityRouter:
    """A Django-style router with no batch method: odd ids on s1, even on s2; an UPDATE spans both."""

    def db_for_write(self, model: type, **hints: object) -> str | list[str] | None:
        if model is not Member:
            return None
        instance = hints.get("instance")
        if instance is not None:
            return "s1" if instance.id % 2 else "s2"  # type: ignore[attr-defined]
        if getattr(hints.get("statement"), "is_insert", False):
            return None  # rows of an INSERT: asked one by one (a list here would copy them to both)
        return ["s1", "s2"]

    def db_for_read(self, model: type, **hints: object) -> str | list[str] | None:
        return self.db_for_write(model, **hints)


def test_bulk_forms_ask_a_router_without_a_batch_method_row_by_row(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "s1", "s2"), routers=[ParityRouter()])
    try:
        cluster.create_all(Base)
        with cluster.session() as s:
            s.execute(insert(Member).values([{"id": i, "name": "v"} for i in range(1, 7)]))
            s.execute(update(Member), [{"id": i, "name": f"u{i}"} for i in range(1, 5)])
            s.commit()
        for alias, parity in (("s1", 1), ("s2", 0)):
            with cluster.engine(alias).connect() as conn:
                rows = {i: n for i, n in conn.execute(text("SELECT id, name FROM members"))}
            assert rows == {i: f"u{i}" if i <= 4 else "v" for i in range(1, 7) if i % 2 == parity}
    finally:
        cluster.dispose()
