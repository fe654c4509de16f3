"""Fan-out through the session: a ring-sharded ``User`` read across 4 shards.

Every answer is compared with one database holding all rows (``single``).
The cluster (``default`` + 4 shards) and the reference database are built
once per backend (SQLite files, PostgreSQL databases) for this module; the
tests only read.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, ForeignKey, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter, ShardedResult, db_of, shards_of
from shardkit.errors import UnsupportedQueryError
from shardkit.fanout import cursor_of, keyset_page

from .conftest import BACKENDS, PG_URL, DatabaseFactory, require_server

SHARDS = ["s0", "s1", "s2", "s3"]
COUNTRIES = ["br", "de", "fr", "in", "jp", "us"]
N_USERS = 240
N_ORDERS = 500


class Base(DeclarativeBase):
    pass


class User(shardkit.ModelMixin, Base):
    __tablename__ = "fan_users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int]
    country: Mapped[str] = mapped_column(String(2))


class Order(Base):
    __tablename__ = "fan_orders"
    __shard_key__ = "user_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("fan_users.id"))
    amount: Mapped[int]


users_t = User.__table__
orders_t = Order.__table__


@dataclass
class World:
    backend: str
    cluster: shardkit.Cluster
    ring: HashRing
    single: Engine  # one database holding every row

    def ref(self, stmt: Any) -> list[Any]:
        with self.single.connect() as conn:
            return list(conn.execute(stmt).all())


def _rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rnd = random.Random(20240607)
    users = [
        {
            "id": i,
            "name": f"user{i:03d}",
            "score": rnd.randint(0, 60),  # many ties: the id breaks them
            "country": rnd.choice(COUNTRIES),
        }
        for i in range(1, N_USERS + 1)
    ]
    orders = [{"id": j, "user_id": rnd.randint(1, N_USERS), "amount": rnd.randint(1, 500)} for j in range(1, N_ORDERS)]
    return users, orders


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    backend: str = request.param
    if backend == "postgresql":
        require_server(PG_URL, "pg")
    factory = DatabaseFactory(Path(tmp_path_factory.mktemp(f"fanout_session_{backend}")))
    try:
        urls = factory.urls(backend, "default", *SHARDS)
        ring = HashRing(SHARDS)
        cluster = shardkit.Cluster(urls, routers=[HashRingRouter(ring)])
        created = cluster.create_all(Base)
        assert "fan_users" not in created["default"]  # sharded tables live on the ring only
        single = create_engine(factory.url(backend, "single"))
        Base.metadata.create_all(single)
        users, orders = _rows()
        with cluster.session() as s:
            s.add_all(User(**u) for u in users)
            s.commit()  # the users first: no relationship() tells the flush the FK order
            s.add_all(Order(**o) for o in orders)
            s.commit()
        with single.begin() as conn:
            conn.execute(users_t.insert(), users)
            conn.execute(orders_t.insert(), orders)
        yield World(backend, cluster, ring, single)
        cluster.dispose()
        single.dispose()
    finally:
        factory.drop_all()


@pytest.fixture
def s(world: World) -> Iterator[shardkit.ShardSession]:
    with world.cluster.session() as session:
        yield session


def ids(objs: Any) -> list[int]:
    return [o.id for o in objs]


# ----------------------------------------------------------------- rows, ORDER BY


def test_rows_are_spread_over_every_shard(world: World) -> None:
    placed: dict[str, int] = {}
    for alias in SHARDS:
        with world.cluster.engine(alias).connect() as conn:
            placed[alias] = conn.execute(select(func.count()).select_from(users_t)).scalar_one()
    assert sum(placed.values()) == N_USERS
    assert all(n > 0 for n in placed.values()), placed


def test_order_by_limit_offset_is_the_global_answer(world: World, s: shardkit.ShardSession) -> None:
    order = (User.score.desc(), User.id)
    stmt = select(User).order_by(*order).limit(10).offset(7)
    got = s.scalars(stmt).all()
    want = [r.id for r in world.ref(select(users_t.c.id).order_by(users_t.c.score.desc(), users_t.c.id)
                                    .limit(10).offset(7))]  # fmt: skip
    assert ids(got) == want
    # iteration, .first(), execute() rows
    assert [u.id for u in s.scalars(stmt)] == want
    assert (
        s.scalars(select(User).order_by(*order)).first().id
        == world.ref(  # type: ignore[union-attr]
            select(users_t.c.id).order_by(users_t.c.score.desc(), users_t.c.id).limit(1)
        )[0].id
    )
    rows = s.execute(select(User.id, User.name).order_by(User.name.desc()).limit(5)).all()
    assert [tuple(r) for r in rows] == [
        tuple(r) for r in world.ref(select(users_t.c.id, users_t.c.name).order_by(users_t.c.name.desc()).limit(5))
    ]
    assert list(rows[0]._mapping) == ["id", "name"]


def test_whole_table_ordered(world: World, s: shardkit.ShardSession) -> None:
    got = s.scalars(select(User).order_by(User.country, User.score, User.id)).all()
    want = world.ref(select(users_t.c.id).order_by(users_t.c.country, users_t.c.score, users_t.c.id))
    assert ids(got) == [r.id for r in want]


def test_one_and_scalar_one(world: World, s: shardkit.ShardSession) -> None:
    user = s.scalars(select(User).where(User.name == "user123")).one()  # no key: every shard asked
    assert user.id == 123
    assert s.execute(select(func.count()).select_from(User)).scalar_one() == N_USERS
    assert s.scalar(select(func.max(User.score))) == world.ref(select(func.max(users_t.c.score)))[0][0]


def test_entities_know_their_shard(world: World, s: shardkit.ShardSession) -> None:
    result = s.scalars(select(User).order_by(User.id))
    assert isinstance(result._real_result, ShardedResult)  # type: ignore[attr-defined]
    assert set(shards_of(result)) == set(SHARDS)
    users = result.all()
    assert len(users) == N_USERS
    for user in users:
        assert db_of(user) == world.ring.get(user.id)
    # the identity map is per shard: the same object comes back on a second read
    again = s.scalars(select(User).where(User.id == users[0].id)).one()
    assert again is users[0]


def test_legacy_query_returns_what_one_database_returns(world: World, s: shardkit.ShardSession) -> None:
    # regression: Query over a fan-out gave 1-tuples, not objects (the ORM's result attributes
    # that make Query apply .scalars() / .unique() were not carried to the merged result)
    all_ids = [r.id for r in world.ref(select(users_t.c.id).order_by(users_t.c.id))]
    first = s.query(User).order_by(User.id).first()
    assert isinstance(first, User) and first.id == all_ids[0]
    users = s.query(User).order_by(User.id).all()
    assert all(isinstance(u, User) for u in users) and ids(users) == all_ids
    assert ids(s.query(User).order_by(User.id).limit(5).offset(3)) == all_ids[3:8]
    one = s.query(User).filter(User.name == "user123").one()
    assert isinstance(one, User) and one.id == 123
    rows = s.query(User.id, User.name).order_by(User.id).limit(2).all()
    assert [tuple(r) for r in rows] == [(i, f"user{i:03d}") for i in all_ids[:2]]
    assert s.query(User.id).order_by(User.id.desc()).limit(1).scalar() == all_ids[-1]
    assert s.query(User).filter(User.country == "de").count() == len(
        world.ref(select(users_t.c.id).where(users_t.c.country == "de"))
    )
    pairs = s.query(User, Order).join(Order, Order.user_id == User.id).order_by(Order.id).limit(3).all()
    assert [(type(u), type(o)) for u, o in pairs] == [(User, Order)] * 3


# ------------------------------------------------------------------- aggregates


def test_scalar_aggregates_equal_one_database(world: World, s: shardkit.ShardSession) -> None:
    def agg(t: Any) -> Any:
        return select(func.count(), func.sum(t.score), func.avg(t.score), func.min(t.score), func.max(t.score))

    got = s.execute(agg(User)).one()
    want = world.ref(agg(users_t.c))[0]
    assert tuple(got[:2]) == tuple(want[:2])
    assert float(got[2]) == pytest.approx(float(want[2]), rel=1e-12)
    assert tuple(got[3:]) == tuple(want[3:])


def test_group_by_having_equals_one_database(world: World, s: shardkit.ShardSession) -> None:
    def grouped(t: Any) -> Any:
        n = func.count().label("n")
        return (
            select(t.country, n, func.sum(t.score), func.avg(t.score).label("avg"), func.min(t.score),
                   func.max(t.score))
            .group_by(t.country)
            .having(func.count() > 38)
            .order_by(t.country)
        )  # fmt: skip

    got = s.execute(grouped(User)).all()
    want = world.ref(grouped(users_t.c))
    assert 0 < len(want) < len(COUNTRIES)  # HAVING keeps some groups, drops others
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in got] == [(r[0], r[1], r[2], r[4], r[5]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert float(g.avg) == pytest.approx(float(w.avg), rel=1e-12)


def test_group_by_a_selected_function_equals_one_database(world: World, s: shardkit.ShardSession) -> None:
    # regression: GROUP BY func.f(x), also selected, was refused
    def by(t: Any, key: Any) -> Any:
        return select(key, func.count(), func.sum(t.score)).group_by(key).order_by(key)

    for make in (lambda t: func.substr(t.name, 5, 2), lambda t: func.lower(t.country), lambda t: func.length(t.name)):
        got = [tuple(r) for r in s.execute(by(User, make(User)))]
        assert got == [tuple(r) for r in world.ref(by(users_t.c, make(users_t.c)))]
    legacy = s.query(func.upper(User.country), func.count()).group_by(func.upper(User.country)).order_by(
        func.upper(User.country)
    )  # fmt: skip
    want = world.ref(
        select(func.upper(users_t.c.country), func.count())
        .group_by(func.upper(users_t.c.country))
        .order_by(func.upper(users_t.c.country))
    )
    assert [tuple(r) for r in legacy] == [tuple(r) for r in want]


def test_group_by_ordered_by_aggregate_with_limit(world: World, s: shardkit.ShardSession) -> None:
    def stmt(t: Any) -> Any:
        return select(t.country, func.count().label("n")).group_by(t.country).order_by(
            func.count().desc(), t.country
        ).limit(3)  # fmt: skip

    assert [tuple(r) for r in s.execute(stmt(User))] == [tuple(r) for r in world.ref(stmt(users_t.c))]


def test_distinct(world: World, s: shardkit.ShardSession) -> None:
    got = s.scalars(select(User.country).distinct().order_by(User.country)).all()
    assert got == [r[0] for r in world.ref(select(users_t.c.country).distinct().order_by(users_t.c.country))]
    unordered = s.execute(select(User.country, User.score).distinct()).all()
    want = world.ref(select(users_t.c.country, users_t.c.score).distinct())
    assert sorted(map(tuple, unordered)) == sorted(map(tuple, want))
    assert len(unordered) == len(want)  # no duplicates across shards
    n = s.scalar(select(func.count(User.country.distinct())))
    assert n == world.ref(select(func.count(users_t.c.country.distinct())))[0][0]


# ---------------------------------------------------------------- manager API


def test_manager_api_fans_out(world: World) -> None:
    with world.cluster.activate():
        top = User.objects.order_by("-score")[:10]
        want = world.ref(select(users_t.c.score).order_by(users_t.c.score.desc()).limit(10))
        assert [u.score for u in top] == [r.score for r in want]  # ties: compare the scores
        top_ids = User.objects.order_by("-score", "id")[:10]
        want_ids = world.ref(select(users_t.c.id).order_by(users_t.c.score.desc(), users_t.c.id).limit(10))
        assert ids(top_ids) == [r.id for r in want_ids]
        assert User.objects.count() == N_USERS
        assert User.objects.filter(country="de").count() == len(
            world.ref(select(users_t.c.id).where(users_t.c.country == "de"))
        )
        first = User.objects.filter(country="jp").first()
        assert first is not None
        assert first.id == min(r.id for r in world.ref(select(users_t.c.id).where(users_t.c.country == "jp")))
        assert db_of(first) == world.ring.get(first.id)
        assert User.objects.get(id=77).name == "user077"
        assert User.objects.filter(score__gte=55).exists()


# ------------------------------------------------------------ co-located join


def test_colocated_join_merges(world: World, s: shardkit.ShardSession) -> None:
    stmt = select(User, Order).join(Order, Order.user_id == User.id).order_by(Order.amount.desc(), Order.id)
    got = s.execute(stmt).all()
    want = world.ref(
        select(users_t.c.id, orders_t.c.id)
        .join(orders_t, orders_t.c.user_id == users_t.c.id)
        .order_by(orders_t.c.amount.desc(), orders_t.c.id)
    )
    assert [(u.id, o.id) for u, o in got] == [tuple(r) for r in want]
    for user, order in got:
        assert db_of(user) == db_of(order) == world.ring.get(user.id)

    def per_user(u: Any, o: Any, o_from: Any) -> Any:
        return (
            select(u.country, func.count(o.id), func.sum(o.amount))
            .join(o_from, o.user_id == u.id)
            .group_by(u.country)
            .order_by(u.country)
        )

    assert [tuple(r) for r in s.execute(per_user(User, Order, Order))] == [
        tuple(r) for r in world.ref(per_user(users_t.c, orders_t.c, orders_t))
    ]


# ------------------------------------------------------------------- refusals


def test_window_function_is_refused(s: shardkit.ShardSession) -> None:
    stmt = select(User.id, func.row_number().over(order_by=User.score))
    with pytest.raises(UnsupportedQueryError, match="window"):
        s.execute(stmt)
    with pytest.raises(UnsupportedQueryError):
        s.execute(select(func.string_agg(User.name, ",")))


# ------------------------------------------------------------------- explain


def test_explain_shows_every_shard_sql(s: shardkit.ShardSession) -> None:
    stmt = select(User.country, func.avg(User.score)).group_by(User.country).order_by(User.country)
    text = s.explain(stmt)
    assert text.startswith("fan-out over 4 shards")
    for alias in SHARDS:
        assert f"  {alias}:\n    SELECT" in text
    # AVG is sent as SUM + COUNT
    assert text.count("sum(fan_users.score)") == len(SHARDS)
    assert text.count("count(fan_users.score)") == len(SHARDS)
    single = s.explain(select(User).where(User.id == 5))
    assert single.startswith("single shard: ")


# ------------------------------------------------------------------- keyset


def test_keyset_walks_the_global_order(world: World, s: shardkit.ShardSession) -> None:
    base = select(User).order_by(User.score.desc(), User.id)
    pages: list[list[int]] = []
    after = None
    while True:
        page = s.scalars(keyset_page(base, after=after, page_size=35)).all()
        if not page:
            break
        pages.append(ids(page))
        after = cursor_of(base, (page[-1],))
    assert [len(p) for p in pages[:-1]] == [35] * (len(pages) - 1)
    walked = [i for p in pages for i in p]
    assert walked == [r.id for r in world.ref(select(users_t.c.id).order_by(users_t.c.score.desc(), users_t.c.id))]

    # Core-style columns: the cursor comes from the row itself
    cols = select(User.id, User.score).order_by(User.score, User.id)
    first = s.execute(keyset_page(cols, after=None, page_size=50)).all()
    second = s.execute(keyset_page(cols, after=cursor_of(cols, first[-1]), page_size=50)).all()
    want = world.ref(select(users_t.c.id, users_t.c.score).order_by(users_t.c.score, users_t.c.id).limit(100))
    assert [tuple(r) for r in first + second] == [tuple(r) for r in want]


# ---------------------------------------------------------- routing by the key


class _Recorder:
    """Counts the statements on ``fan_users`` each shard engine receives, with their parameters."""

    def __init__(self, world: World) -> None:
        self.engines = {alias: world.cluster.engine(alias) for alias in SHARDS}
        self.seen: dict[str, list[Any]] = {alias: [] for alias in SHARDS}
        self._hooks = []
        for alias, engine in self.engines.items():

            def hook(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool,
                     _alias: str = alias) -> None:  # fmt: skip
                if "fan_users" in statement:
                    self.seen[_alias].append(parameters)

            event.listen(engine, "before_cursor_execute", hook)
            self._hooks.append((engine, hook))

    def close(self) -> None:
        for engine, hook in self._hooks:
            event.remove(engine, "before_cursor_execute", hook)

    def counts(self) -> dict[str, int]:
        return {a: len(v) for a, v in self.seen.items() if v}

    def values(self, alias: str) -> set[int]:
        out: set[int] = set()
        for params in self.seen[alias]:
            vals = params.values() if isinstance(params, dict) else params
            out.update(v for v in vals if isinstance(v, int) and not isinstance(v, bool))
        return out


@pytest.fixture
def recorder(world: World) -> Iterator[_Recorder]:
    rec = _Recorder(world)
    yield rec
    rec.close()


def test_key_equality_goes_to_one_shard(world: World, s: shardkit.ShardSession, recorder: _Recorder) -> None:
    user = s.scalars(select(User).where(User.id == 42)).one()
    owner = world.ring.get(42)
    assert recorder.counts() == {owner: 1}
    assert db_of(user) == owner
    result = s.execute(select(User.name).where(User.id == 42))
    assert shards_of(result) == (owner,)
    assert recorder.counts() == {owner: 2}


def test_key_in_list_goes_to_owning_shards_only(world: World, s: shardkit.ShardSession, recorder: _Recorder) -> None:
    wanted = [3, 17, 42, 99, 150, 201]
    by_shard: dict[str, set[int]] = {}
    for key in wanted:
        by_shard.setdefault(world.ring.get(key), set()).add(key)
    assert len(by_shard) >= 2
    result = s.scalars(select(User).where(User.id.in_(wanted)).order_by(User.id))
    assert set(shards_of(result)) == set(by_shard)
    assert ids(result.all()) == wanted
    assert recorder.counts() == dict.fromkeys(by_shard, 1)
    for alias, keys in by_shard.items():
        assert recorder.values(alias) == keys, alias


def test_sql_in_explain_matches_what_runs(world: World, s: shardkit.ShardSession, recorder: _Recorder) -> None:
    stmt = select(User.country, func.count()).group_by(User.country)
    s.execute(stmt).all()
    assert recorder.counts() == dict.fromkeys(SHARDS, 1)
    assert re.search(r"GROUP BY fan_users.country", s.explain(stmt))
