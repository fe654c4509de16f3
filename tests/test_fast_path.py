"""The fast path of a routed SELECT gives what the listeners' path gives.

``ShardSession._execute_internal`` routes a plain SELECT itself, before SQLAlchemy builds an
``ORMExecuteState`` for the ``do_orm_execute`` listeners.  Every case below runs in a normal
session and in one whose fast path is off (a subclass saying no in ``_fast_path_ok``): the
rows, the objects' aliases and identity keys, and the errors must be the same; the routers
are asked as often; user listeners still see every statement, with its alias.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, event, func, inspect, lambda_stmt, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import shardkit
from shardkit._session import ShardSession
from shardkit.errors import InvalidKeyError
from shardkit.ring import HashRing, HashRingRouter


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "fp_users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")
    orders: Mapped[list[Order]] = relationship(back_populates="user", order_by="Order.id")


class Order(Base):
    __tablename__ = "fp_orders"
    __shard_key__ = "user_id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("fp_users.id"))
    user: Mapped[User] = relationship(back_populates="orders")


class Note(Base):  # not sharded: the routers pass, "default" answers
    __tablename__ = "fp_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(50), default="")


SHARDS = ["s0", "s1", "s2"]
RING = HashRing(SHARDS, vnodes=64)


def _keys_on(alias: str, n: int) -> list[int]:
    return list(itertools.islice((i for i in itertools.count(1) if RING.get(i) == alias), n))


K0, K1, K2 = _keys_on("s0", 3), _keys_on("s1", 3), _keys_on("s2", 3)
ALL_KEYS = sorted(K0 + K1 + K2)


class SlowSession(ShardSession):
    """A session that never takes the fast path: the reference."""

    def _fast_path_ok(self) -> bool:
        return False


class CountingRouter:
    """A Django-style router in front of the ring: counts its questions, answers nothing."""

    def __init__(self) -> None:
        self.reads = 0

    def db_for_read(self, model: Any, **hints: Any) -> None:
        self.reads += 1
        return None


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[shardkit.Cluster, CountingRouter]]:
    counting = CountingRouter()
    settings = {a: {"ENGINE": "sqlite", "NAME": str(tmp_path / f"{a}.db")} for a in ["default", *SHARDS]}
    cluster = shardkit.Cluster(settings, routers=[counting, HashRingRouter(RING)])
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add_all([User(id=k, name=f"u{k}") for k in ALL_KEYS])
        s.add_all([Order(id=k * 10 + j, user_id=k) for k in ALL_KEYS for j in range(2)])
        s.add(Note(id=1, body="n"))
        s.commit()
    # the same primary key on another shard, placed explicitly: two objects, two identities
    with cluster.session() as s:
        s.save(User(id=K0[0], name="copy"), using="s1")
        s.commit()
    try:
        yield cluster, counting
    finally:
        cluster.dispose()


def _describe(value: Any) -> Any:
    """A result in a comparable form: mapped objects by class, key, name and where they live."""
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if hasattr(value, "__mapper__"):
        key = inspect(value).key
        return (type(value).__name__, key[1] if key else None, key[2] if key else None, shardkit.db_of(value))
    if hasattr(value, "_fields"):  # a Row
        return tuple(_describe(v) for v in value)
    return value


def _run(session: ShardSession, case: Callable[[ShardSession], Any]) -> Any:
    try:
        return ("ok", _describe(case(session)))
    except InvalidKeyError as exc:
        return ("InvalidKeyError", str(exc))


def _lambda_statement(key: int) -> Any:
    return lambda_stmt(lambda: select(User).where(User.id == key))


CASES: dict[str, Callable[[ShardSession], Any]] = {
    "eq": lambda s: s.scalars(select(User).where(User.id == K1[0])).all(),
    "eq reversed": lambda s: s.scalars(select(User).where(K2[0] == User.id)).all(),
    "eq missing key": lambda s: s.scalars(select(User).where(User.id == 10_000_019)).all(),
    "eq as text": lambda s: s.scalars(select(User).where(User.id == str(K2[1]))).all(),
    "wrong key type": lambda s: s.scalars(select(User).where(User.id == "abc")).all(),
    "scalar": lambda s: s.scalar(select(User.name).where(User.id == K0[1])),
    "execute columns": lambda s: s.execute(select(User.id, User.name).where(User.id == K1[1])).all(),
    "count": lambda s: s.scalar(select(func.count()).select_from(User).where(User.id == K2[0])),
    "core table": lambda s: s.execute(User.__table__.select().where(User.__table__.c.id == K1[2])).all(),
    "get": lambda s: [s.get(User, K0[0]), s.get(User, K1[0]), s.get(User, 10_000_019)],
    "get twice": lambda s: [s.get(User, K2[0]), s.get(User, K2[0])],
    "get with options": lambda s: s.get(User, K1[1], populate_existing=True, with_for_update=True),
    "in one shard": lambda s: s.scalars(select(User).where(User.id.in_(K0[:2])).order_by(User.id)).all(),
    "in spanning": lambda s: s.scalars(select(User).where(User.id.in_([K0[0], K1[0], K2[0]])).order_by(User.id)).all(),
    "no key: fan-out": lambda s: s.scalars(select(User).order_by(User.id, User.name)).all(),
    "unsharded": lambda s: s.scalars(select(Note)).all(),
    "using option": lambda s: s.scalars(select(User).where(User.id == K0[0]).options(shardkit.using("s1"))).all(),
    "shardkit_using": lambda s: s.scalars(
        select(User).where(User.id == K0[0]).execution_options(shardkit_using="s1")
    ).all(),
    "shardkit_using on execute": lambda s: s.scalars(
        select(User).where(User.id == K0[0]), execution_options={"shardkit_using": "s1"}
    ).all(),
    "shard_id bind argument": lambda s: s.scalars(
        select(User).where(User.id == K0[0]), bind_arguments={"shard_id": "s1"}
    ).all(),
    "populate_existing": lambda s: [
        s.get(User, K1[0]),
        s.scalars(select(User).where(User.id == K1[0]).execution_options(populate_existing=True)).one(),
    ],
    "with_for_update": lambda s: s.scalars(select(User).where(User.id == K2[1]).with_for_update()).all(),
    "yield_per": lambda s: list(s.scalars(select(User).where(User.id == K0[2]).execution_options(yield_per=1))),
    "stream": lambda s: list(
        s.execute(select(User).where(User.id == K1[2]), execution_options={"stream_results": True}).scalars()
    ),
    "lambda": lambda s: s.scalars(_lambda_statement(K2[2])).all(),
    "text": lambda s: s.execute(text("SELECT body FROM fp_notes")).all(),
    "lazy load": lambda s: [s.get(User, K1[0]).orders, s.get(Order, K1[0] * 10).user],
    "selectinload": lambda s: [
        (u, u.orders) for u in s.scalars(select(User).where(User.id == K2[0]).options(selectinload(User.orders))).all()
    ],
    "refresh": lambda s: [s.refresh(u) or u for u in [s.get(User, K0[1])]],
    "expired attribute": lambda s: [(s.expire(u), u.name)[1] for u in [s.get(User, K2[1])]],
    "legacy query": lambda s: s.query(User).filter(User.id == K1[1]).all(),
    "legacy query using": lambda s: s.query(User).using("s1").filter(User.id == K0[0]).all(),
    "pinned": lambda s: s.cluster.session(using="s1").scalars(select(User).where(User.id == K0[0])).all(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_as_the_listeners_path(world: tuple[shardkit.Cluster, CountingRouter], name: str) -> None:
    cluster, counting = world
    case = CASES[name]
    with SlowSession(cluster) as slow:
        counting.reads = 0
        expected = _run(slow, case)
        slow_reads = counting.reads
        slow_keys = sorted(map(repr, slow.identity_map.keys()))
    with ShardSession(cluster) as fast:
        counting.reads = 0
        got = _run(fast, case)
        fast_reads = counting.reads
        fast_keys = sorted(map(repr, fast.identity_map.keys()))
    assert got == expected
    assert fast_keys == slow_keys  # objects keyed by the alias they came from, alike
    assert fast_reads == slow_reads  # the routers are asked as often (Django asks once a query)


def _count_listener_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = ShardSession._execute_routed

    def counted(self: ShardSession, orm_context: Any) -> Any:
        calls[0] += 1
        return original(self, orm_context)

    monkeypatch.setattr(ShardSession, "_execute_routed", counted)
    return calls


def test_plain_reads_take_the_fast_path(
    world: tuple[shardkit.Cluster, CountingRouter], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, counting = world
    calls = _count_listener_path(monkeypatch)
    with cluster.session() as s:
        counting.reads = 0
        assert s.scalars(select(User).where(User.id == K1[0])).one().name == f"u{K1[0]}"
        assert s.get(User, K2[0]) is not None
        assert s.scalar(select(User.name).where(User.id == K0[1])) == f"u{K0[1]}"
        assert calls[0] == 0
        assert counting.reads == 3
        # these take the listeners' path: named shards, a lazy load, a fan-out is run by it
        s.scalars(select(User).where(User.id == K0[0]).options(shardkit.using("s1"))).all()
        assert calls[0] == 1
        s.get(User, K2[0]).orders  # noqa: B018
        assert calls[0] == 2
        s.scalars(select(User).where(User.id.in_([K0[0], K1[0]]))).all()
        assert calls[0] == 2  # routed once on the fast path, run by the fan-out's own code
        assert counting.reads == 6


def test_fast_path_objects_live_where_they_came_from(world: tuple[shardkit.Cluster, CountingRouter]) -> None:
    cluster, _ = world
    with cluster.session() as s:
        ring_copy = s.get(User, K0[0])
        other = s.scalars(select(User).where(User.id == K0[0]).options(shardkit.using("s1"))).one()
        assert ring_copy is not other
        assert (shardkit.db_of(ring_copy), shardkit.db_of(other)) == ("s0", "s1")
        assert inspect(ring_copy).key[2] == "s0"
        assert s.scalars(select(User).where(User.id == K0[0])).one() is ring_copy


def test_user_listeners_still_see_every_statement(world: tuple[shardkit.Cluster, CountingRouter]) -> None:
    cluster, _ = world
    seen: list[tuple[Any, Any, bool]] = []
    with cluster.session() as s:

        @event.listens_for(s, "do_orm_execute")
        def watch(orm_context: Any) -> None:
            seen.append(
                (
                    orm_context.bind_arguments.get("shard_id"),
                    orm_context.execution_options.get("identity_token"),
                    orm_context.is_select,
                )
            )

        s.scalars(select(User).where(User.id == K2[1])).one()
        s.get(User, K1[1])
        assert seen == [("s2", "s2", True), ("s1", "s1", True)]


def test_a_listener_that_runs_first_takes_the_listeners_path(
    world: tuple[shardkit.Cluster, CountingRouter], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, _ = world
    calls = _count_listener_path(monkeypatch)

    class Redirecting(ShardSession):
        pass

    def redirect(orm_context: Any) -> None:  # runs before shardkit's: may name the shard
        orm_context.bind_arguments["shard_id"] = "s1"

    event.listen(Redirecting, "do_orm_execute", redirect, insert=True)
    with Redirecting(cluster) as s:
        got = s.scalars(select(User).where(User.id == K0[0])).one()
        assert calls[0] == 1
        assert (got.name, shardkit.db_of(got)) == ("copy", "s1")
    with cluster.session() as s:  # a listener of the session itself runs after shardkit's
        seen: list[Any] = []
        event.listen(s, "do_orm_execute", lambda ctx: seen.append(ctx.bind_arguments["shard_id"]), insert=True)
        got = s.scalars(select(User).where(User.id == K0[0])).one()
        assert (seen, shardkit.db_of(got)) == (["s0"], "s0")


def test_autoflush_before_a_fast_read(world: tuple[shardkit.Cluster, CountingRouter]) -> None:
    cluster, _ = world
    with cluster.session() as s:
        new_key = next(k for k in itertools.count(500) if RING.get(k) == "s1")
        s.add(User(id=new_key, name="fresh"))
        found = s.scalars(select(User).where(User.id == new_key)).one()
        assert (found.name, shardkit.db_of(found)) == ("fresh", "s1")
        u = s.get(User, K2[0])
        u.name = "renamed"
        assert s.scalar(select(User.name).where(User.id == K2[0])) == "renamed"
        s.rollback()
    with cluster.session() as s:
        assert s.get(User, new_key) is None
        with s.no_autoflush:
            u = s.get(User, K2[0])
            u.name = "not yet"
            assert s.scalar(select(User.name).where(User.id == K2[0])) == f"u{K2[0]}"


class LookupBase(DeclarativeBase):
    pass


class Member(LookupBase):
    __tablename__ = "fp_members"
    __shard_key__ = "id"
    __lookups__ = {"email": {"unique": True}}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(80))


@pytest.fixture
def lookup_cluster(tmp_path: Path) -> Iterator[shardkit.Cluster]:
    settings = {a: {"ENGINE": "sqlite", "NAME": str(tmp_path / f"{a}.db")} for a in ["default", *SHARDS]}
    cluster = shardkit.Cluster(settings, routers=[HashRingRouter(RING)])
    cluster.create_all(LookupBase)
    with cluster.session() as s:
        s.add_all([Member(id=k, email=f"m{k}@x") for k in ALL_KEYS])
        s.commit()
    try:
        yield cluster
    finally:
        cluster.dispose()


LOOKUP_CASES: dict[str, Callable[[ShardSession], Any]] = {
    "by lookup": lambda s: s.scalars(select(Member).where(Member.email == f"m{K1[0]}@x")).all(),
    "by lookup, none": lambda s: s.scalars(select(Member).where(Member.email == "nobody@x")).all(),
    "by lookup in": lambda s: s.scalars(
        select(Member).where(Member.email.in_([f"m{K0[0]}@x", f"m{K2[0]}@x"])).order_by(Member.id)
    ).all(),
    "by shard key": lambda s: s.scalars(select(Member).where(Member.id == K2[1])).all(),
    "get": lambda s: s.get(Member, K0[1]),
    "neither": lambda s: s.scalars(select(Member).order_by(Member.id)).all(),
}


@pytest.mark.parametrize("name", list(LOOKUP_CASES))
def test_lookup_reads_same_as_the_listeners_path(lookup_cluster: shardkit.Cluster, name: str) -> None:
    case = LOOKUP_CASES[name]
    statements: list[tuple[str, str]] = []

    def log(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        statements.append((conn.engine.url.database.rsplit("/", 1)[-1], statement.split()[0]))

    for alias in ["default", *SHARDS]:
        event.listen(lookup_cluster.engine(alias), "before_cursor_execute", log)
    with SlowSession(lookup_cluster) as slow:
        expected = _run(slow, case)
        slow_statements = sorted(statements)
    statements.clear()
    with ShardSession(lookup_cluster) as fast:
        got = _run(fast, case)
        fast_statements = sorted(statements)
    assert got == expected
    assert fast_statements == slow_statements  # the same lookup reads, on the same databases
