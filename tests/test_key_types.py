"""A shard key of the wrong Python type is routed as its column's type, or refused (issue 10).

Before: ``User(id="740001")`` on a BIGINT key was hashed as a str and stored where
``session.get(User, 740001)`` never looks, and ``where(User.id == "5")`` found nothing.
Each test runs on SQLite files and on real PostgreSQL databases.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import BigInteger, String, Uuid, delete, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit.errors import InvalidKeyError

SHARDS = ["s0", "s1", "s2"]


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")


class Tag(Base):
    __tablename__ = "tags"
    __shard_key__ = "code"
    code: Mapped[str] = mapped_column(String(20), primary_key=True)


class Doc(Base):
    __tablename__ = "docs"
    __shard_key__ = "id"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)


World = tuple[shardkit.Cluster, shardkit.HashRing]


@pytest.fixture
def world(make_urls: Callable[..., dict[str, str]]) -> Iterator[World]:
    ring = shardkit.HashRing(SHARDS, vnodes=64)
    cluster = shardkit.Cluster(make_urls("default", *SHARDS), routers=[shardkit.HashRingRouter(ring)])
    cluster.create_all(Base)
    yield cluster, ring
    cluster.dispose()


def where_is(cluster: shardkit.Cluster, table: str, column: str = "id") -> dict[object, str]:
    """Every stored key of ``table`` -> the shard it is really on (read with plain SQL)."""
    found: dict[object, str] = {}
    for alias in SHARDS:
        with cluster.engine(alias).connect() as conn:
            for (key,) in conn.execute(text(f"SELECT {column} FROM {table}")):
                assert key not in found, f"{key!r} is on two shards"
                found[key] = alias
    return found


def a_key_whose_text_moves(ring: shardkit.HashRing, start: int = 740001) -> int:
    """An int whose decimal text hashes to another shard: where the old bug showed."""
    key = start
    while ring.get(key) == ring.get(str(key)):
        key += 1
    return key


def test_digit_string_for_a_bigint_key_goes_where_get_looks(world: World) -> None:
    cluster, ring = world
    key = a_key_whose_text_moves(ring)
    with cluster.session() as s:
        user = User(id=str(key), name="text")
        s.add(user)
        s.commit()
        assert user.id == key and type(user.id) is int  # the object holds what the database holds
    assert where_is(cluster, "users") == {key: ring.get(key)}
    with cluster.session() as s:
        found = s.get(User, key)
        assert found is not None and found.name == "text"
    with cluster.session() as s:
        by_text = s.get(User, str(key))
        assert by_text is not None and by_text.id == key


def test_where_and_in_with_digit_strings_find_the_rows(world: World) -> None:
    cluster, ring = world
    keys = [a_key_whose_text_moves(ring, start) for start in (5, 1000, 2000, 3000)]
    with cluster.session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in keys)
        s.commit()
    with cluster.session() as s:
        for k in keys:
            assert s.scalars(select(User.name).where(User.id == str(k))).all() == [f"u{k}"]
        names = s.scalars(select(User.name).where(User.id.in_([str(k) for k in keys]))).all()
        assert sorted(names) == sorted(f"u{k}" for k in keys)
        integral = s.scalars(select(User.name).where(User.id == float(keys[0]))).all()
        assert integral == [f"u{keys[0]}"]


def test_many_new_objects_and_bulk_rows_are_converted(world: World) -> None:
    cluster, ring = world
    keys = [a_key_whose_text_moves(ring, start) for start in range(10, 400, 40)]
    with cluster.session() as s:  # one flush of many new objects: the batch path
        s.add_all(User(id=str(k), name="obj") for k in keys[:5])
        s.commit()
    rows = [{"id": str(k), "name": "row"} for k in keys[5:]]
    with cluster.session() as s:  # a bulk insert of dict rows
        s.execute(insert(User), rows)
        s.commit()
    assert rows[0]["id"] == str(keys[5])  # the caller's dicts are not changed
    assert where_is(cluster, "users") == {k: ring.get(k) for k in keys}
    with cluster.session() as s:
        assert len(s.scalars(select(User).where(User.id.in_(keys))).all()) == len(keys)


@pytest.mark.parametrize("bad", ["abc", "5.0", "0x10", 5.5, float("nan"), True, b"5", 2**64, "9" * 30])
def test_a_value_the_column_refuses_is_an_error_and_writes_nothing(world: World, bad: object) -> None:
    cluster, _ring = world
    with cluster.session() as s:
        s.add(User(id=bad, name="bad"))
        with pytest.raises(InvalidKeyError) as info:
            s.commit()
        s.rollback()
    err = info.value
    assert err.model is User and err.column == "id" and err.key is bad  # type: ignore[attr-defined]
    assert "User.id" in str(err) and repr(bad)[:20] in str(err)
    if bad is not True:  # (`User.id == True` is SQL `id = true`, no bound key to route by)
        with cluster.session() as s, pytest.raises(InvalidKeyError, match=r"User\.id"):
            s.scalars(select(User).where(User.id == bad)).all()
    with cluster.session() as s, pytest.raises(InvalidKeyError, match=r"User\.id"):
        s.scalars(select(User).where(User.id.in_([1, bad]))).all()
    with cluster.session() as s, pytest.raises(InvalidKeyError, match=r"User\.id"):
        s.execute(insert(User), [{"id": 1, "name": "ok"}, {"id": bad, "name": "bad"}])
    with cluster.session() as s, pytest.raises(InvalidKeyError, match=r"User\.id"):
        s.execute(insert(User).values([{"id": 1, "name": "ok"}, {"id": bad, "name": "bad"}]))
    assert where_is(cluster, "users") == {}
    with cluster.session() as s:
        s.add(User(id=1, name="kept"))
        s.commit()
    with cluster.session() as s, pytest.raises(InvalidKeyError, match=r"User\.id"):
        s.execute(update(User), [{"id": 1, "name": "changed"}, {"id": bad, "name": "bad"}])
    with cluster.session() as s:
        assert s.scalars(select(User.name)).all() == ["kept"]


def test_text_and_uuid_keys(world: World, backend: str) -> None:
    cluster, ring = world
    u = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    with cluster.session() as s:
        s.add(Tag(code=42))  # a VARCHAR stores the text "42"
        s.add(Doc(id=str(u).upper()))
        s.commit()
    assert where_is(cluster, "tags", "code") == {"42": ring.get("42")}
    stored = where_is(cluster, "docs")
    assert [ring.get(u)] == list(stored.values())
    with cluster.session() as s:
        assert s.get(Tag, "42") is not None
        assert s.get(Doc, u) is not None
        braced = select(Doc).where(Doc.id == "{" + u.hex + "}")
        assert cluster.router.db_for_read(Doc, statement=braced) == ring.get(u)
        if backend == "postgresql":  # (SQLAlchemy binds only UUID objects to a Uuid column on SQLite)
            assert s.scalars(braced).one().id == u
        with pytest.raises(InvalidKeyError, match=r"Doc\.id"):
            s.get(Doc, "not-a-uuid")
        with pytest.raises(InvalidKeyError, match=r"Tag\.code"):
            s.scalars(select(Tag).where(Tag.code == 4.5)).all()


def test_bulk_update_and_multi_row_values_by_digit_strings(world: World) -> None:
    """Issue 10, bulk forms: the rows' keys are converted before each row is routed."""
    cluster, ring = world
    keys = [a_key_whose_text_moves(ring, start) for start in (100, 5000, 90000, 700000)]
    with cluster.session() as s:
        s.execute(insert(User).values([{"id": str(k), "name": "values"} for k in keys]))
        s.commit()
    assert where_is(cluster, "users") == {k: ring.get(k) for k in keys}
    with cluster.session() as s:
        s.execute(update(User), [{"id": str(k), "name": f"bulk{k}"} for k in keys])
        s.commit()
    with cluster.session() as s:
        assert {u.id: u.name for u in s.scalars(select(User))} == {k: f"bulk{k}" for k in keys}


def test_update_and_delete_by_a_digit_string_reach_the_row(world: World) -> None:
    cluster, ring = world
    key = a_key_whose_text_moves(ring, 9000)
    with cluster.session() as s:
        s.add(User(id=key, name="before"))
        s.commit()
    with cluster.session() as s:
        s.execute(update(User).where(User.id == str(key)).values(name="after"))
        s.commit()
        assert s.scalars(select(User.name).where(User.id == key)).one() == "after"
        s.execute(delete(User).where(User.id.in_([str(key)])))
        s.commit()
    assert where_is(cluster, "users") == {}
