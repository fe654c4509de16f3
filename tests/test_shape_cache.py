"""The router's per-shape routing cache gives the answers a fresh walk of each statement gives.

HashRingRouter works out once per statement shape (SQLAlchemy's cache key) where the shard
key's parameters sit, and reads only the values on each execution.  Each case below builds
statements of one shape with different values: a router that has seen the shape before (it
learnt the shape from another statement) must answer exactly as a router that never saw it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import String, and_, bindparam, delete, lambda_stmt, literal_column, or_, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit.errors import InvalidKeyError
from shardkit.ring import HashRing, HashRingRouter
from shardkit.typing import ShardTargets


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "shape_users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")


SHARDS = ["s0", "s1", "s2", "s3"]
RING = HashRing(SHARDS, vnodes=64)


def _keys_on(alias: str, n: int) -> list[int]:
    return list(itertools.islice((i for i in itertools.count(1) if RING.get(i) == alias), n))


K0, K1, K2 = _keys_on("s0", 3), _keys_on("s1", 3), _keys_on("s2", 3)

# (statement builder, the values each statement of the shape is built with)
CASES: list[tuple[str, Callable[[Any], Any], list[Any]]] = [
    ("eq", lambda k: select(User).where(User.id == k), [K0[0], K1[0], K2[0], K0[1]]),
    ("eq reversed", lambda k: select(User).where(k == User.id), [K1[0], K0[0], K2[1]]),
    ("eq as text", lambda k: select(User).where(User.id == k), ["5", "17", 5]),
    ("eq and more", lambda k: select(User).where(and_(User.name != "x", User.id == k)), [K2[0], K0[2]]),
    ("two where calls", lambda k: select(User).where(User.name == "a").where(User.id == k), [K0[0], K1[1]]),
    ("filter_by", lambda k: select(User).filter_by(id=k), [K1[2], K2[2]]),
    ("limit", lambda k: select(User).where(User.id == k).limit(3), [K0[0], K2[0]]),
    (
        "in",
        lambda ks: select(User).where(User.id.in_(ks)),
        [[K0[0]], [K0[0], K0[1]], [K0[0], K1[0]], [K0[0], K1[0], K2[0]], [], [None], [None, K1[1]]],
    ),
    (
        "in and eq",
        lambda v: select(User).where(User.id.in_(v[0]), User.id == v[1]),
        [([K0[0], K1[0]], K1[0]), ([K0[0], K1[0]], K2[0]), ([K2[0]], K2[0])],
    ),
    ("or", lambda k: select(User).where(or_(User.id == k, User.id == k + 1)), [K0[0], K1[0]]),
    ("no key", lambda k: select(User).where(User.name == k), ["a", "b"]),
    ("literal", lambda k: select(User).where(User.id == literal_column(str(k))), [K0[0], K1[0]]),
    ("named bind", lambda k: select(User).where(User.id == bindparam("uid", k)), [K0[0], K2[0]]),
    ("callable bind", lambda k: select(User).where(User.id == bindparam("uid", callable_=lambda: k)), [K1[0], K2[1]]),
    ("null", lambda k: select(User).where(User.id == k), [None, K0[0], None]),
    ("update", lambda k: update(User).where(User.id == k).values(name="x"), [K0[0], K1[0]]),
    ("delete in", lambda ks: delete(User).where(User.id.in_(ks)), [[K0[0], K2[0]], [K1[0]], [K1[0], K1[1]]]),
]


def _answer(router: HashRingRouter, statement: Any, **hints: Any) -> Any:
    """A router's answer in a comparable form: an alias, or each shard's SQL with its values."""
    try:
        target = router.db_for_read(User, statement=statement, **hints)
    except InvalidKeyError as exc:
        return ("refused", str(exc))
    if isinstance(target, ShardTargets):
        return (
            target.reason,
            target.all_shards,
            {
                alias: None if stmt is None else str(stmt.compile(compile_kwargs={"literal_binds": True}))
                for alias, stmt in target.statements.items()
            },
        )
    return target


def _fresh() -> HashRingRouter:
    return HashRingRouter(RING.copy())


@pytest.mark.parametrize(("name", "build", "values"), CASES, ids=[c[0] for c in CASES])
def test_a_seen_shape_answers_as_a_fresh_walk(name: str, build: Callable[[Any], Any], values: list[Any]) -> None:
    warm = _fresh()
    for value in values:
        # a router that learnt the shape from the previous statements ...
        seen = _answer(warm, build(value))
        # ... answers as one that sees this statement first
        assert seen == _answer(_fresh(), build(value)), (name, value)
    # and learnt each shape once (a value of another type may make another shape: "5" vs 5;
    # a literal is part of the SQL: each value is a shape of its own)
    shapes = len(values) if name == "literal" else len({type(v) for v in values})
    assert len(warm._shapes) <= shapes


def test_the_same_statement_object_again_and_with_parameters() -> None:
    router = _fresh()
    statement = select(User).where(User.id == bindparam("k"))
    # no value bound: every shard, until the parameters name one (as a selectin load's do)
    assert isinstance(_answer(router, statement), tuple)
    for key in (K0[0], K1[0], K2[0], "7"):
        assert router.db_for_read(User, statement=statement, parameters={"k": key}) == RING.get(int(key))
    assert _answer(router, statement, parameters={"k": None}) == _answer(_fresh(), statement, parameters={"k": None})
    assert _answer(router, statement) == _answer(_fresh(), statement)


def test_write_by_statement_uses_the_shape_too() -> None:
    router = _fresh()
    for key in (K0[0], K1[0], K2[0]):
        assert router.db_for_write(User, statement=update(User).where(User.id == key).values(name="n")) == RING.get(key)


def test_bad_key_refused_whatever_the_cache_holds() -> None:
    router = _fresh()
    assert router.db_for_read(User, statement=select(User).where(User.id == 5)) == RING.get(5)
    with pytest.raises(InvalidKeyError):
        router.db_for_read(User, statement=select(User).where(User.id == "abc"))
    assert router.db_for_read(User, statement=select(User).where(User.id == 6)) == RING.get(6)


def test_lambda_statements_are_walked_with_their_values() -> None:
    router = _fresh()
    for key in (K0[0], K1[0], K2[0]):
        statement = lambda_stmt(lambda: select(User).where(User.id == key))  # noqa: B023
        assert router.db_for_read(User, statement=statement) == RING.get(key)


@pytest.fixture
def cluster() -> Any:
    dbs = {alias: "sqlite://" for alias in ["default", *SHARDS]}
    cluster = shardkit.Cluster(dbs, routers=[HashRingRouter(RING.copy())])
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add_all([User(id=k, name=f"u{k}") for k in (*K0, *K1, *K2)])
        s.commit()
    yield cluster
    cluster.dispose()


def test_session_reads_of_one_shape_each_go_to_their_shard(cluster: Any) -> None:
    with cluster.session() as s:
        for key in (K0[0], K1[0], K2[0], K0[1], K1[1]):
            result = s.execute(select(User).where(User.id == key))
            assert shardkit.shards_of(result) == (RING.get(key),)
            assert [u.id for u in result.scalars()] == [key]
        spread = s.execute(select(User).where(User.id.in_([K0[0], K1[0]])))
        assert sorted(u.id for u in spread.scalars()) == sorted([K0[0], K1[0]])
        one = s.execute(select(User).where(User.id.in_([K2[0], K2[1]])))
        assert shardkit.shards_of(one) == ("s2",)


def test_using_and_execution_options_still_win_over_a_seen_shape(cluster: Any) -> None:
    with cluster.session() as s:
        key = K0[0]
        assert shardkit.shards_of(s.execute(select(User).where(User.id == key))) == ("s0",)
        # the same shape, placed by hand: the routers are not asked
        placed = s.execute(select(User).where(User.id == key).options(shardkit.using("s1")))
        assert shardkit.shards_of(placed) == ("s1",) and placed.scalars().all() == []
        by_option = s.execute(select(User).where(User.id == key).execution_options(shardkit_using="s2"))
        assert shardkit.shards_of(by_option) == ("s2",) and by_option.scalars().all() == []
        assert shardkit.shards_of(s.execute(select(User).where(User.id == key))) == ("s0",)
        assert s.get(User, K1[0]) is not None and s.get(User, K2[1]).id == K2[1]  # type: ignore[union-attr]
