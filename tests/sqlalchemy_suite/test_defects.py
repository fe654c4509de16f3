"""Regressions for the defects issue 12 found while porting the peer's suite, one test each.

They run on the weather model (see ``weather.py``), on every layout unless the test needs a
plain database per shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, delete, func, insert, inspect, lambda_stmt, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship, selectinload

import shardkit
from shardkit import shards_of
from shardkit.errors import UnknownAliasError

from ..conftest import StatementLog
from .weather import SHARDS, World

CITIES = ["Tokyo", "New York", "Toronto", "London", "Dublin", "Brasilia", "Quito"]


def test_legacy_query_returns_objects_and_uniques_joined_collections(world: World) -> None:
    # Query over a fan-out gave 1-tuples; with a joined collection, one entry per joined row
    wl = world.WeatherLocation
    sess = world.fixture_data()
    first = sess.query(wl).order_by(wl.id).first()
    assert isinstance(first, wl) and first.city == "Tokyo"
    assert [c.city for c in sess.query(wl).order_by(wl.id)] == CITIES
    joined = sess.query(wl).options(joinedload(wl.reports)).order_by(wl.id).all()
    assert [c.city for c in joined] == CITIES
    assert [len(c.reports) for c in joined] == [1, 1, 0, 0, 0, 0, 1]
    assert sess.query(wl).filter(wl.continent != "Asia").count() == 6
    assert sess.query(func.count(wl.id)).scalar() == 7


def test_ids_from_a_python_default_follow_add_order(world: World) -> None:
    # grouping a flush's INSERTs by shard ran the id generator in shard order: the third
    # city added (Toronto, north_america) got id 1
    sess = world.fixture_data()
    wl = world.WeatherLocation
    assert [(c.id, c.city) for c in sess.query(wl).order_by(wl.id)] == list(enumerate(CITIES, start=1))
    more = [wl(continent, city) for continent, city in [("Europe", "Paris"), ("Asia", "Seoul"), ("Europe", "Rome")]]
    sess.add_all(more)
    sess.flush()
    assert [c.id for c in more] == [8, 9, 10]


def test_rows_without_python_defaults_are_still_grouped_per_shard(world: World) -> None:
    # the grouping stays for classes whose rows run no Python-side default: one INSERT
    # statement (an executemany) per shard for reports given their ids and times
    import datetime

    sess = world.fixture_data()
    wl, rep = world.WeatherLocation, world.Report
    places = sess.query(wl).order_by(wl.id).all()
    now = datetime.datetime(2024, 1, 1)
    for i in range(40):
        report = rep(float(i), id_=100 + i)
        report.report_time = now
        places[i % len(places)].reports.append(report)
    world.reset_counts()
    sess.flush()
    shards_written = {inspect(p).identity_token for p in places}
    assert sum(world.statement_counts()) == len(shards_written)  # one INSERT per shard


def test_selectin_load_follows_each_parents_shard(world: World) -> None:
    # a selectin load went to every shard (the router cannot read the reports' shard from
    # "location_id IN (...)"); it now runs on the shard the parents came from
    wl = world.WeatherLocation
    sess = world.fixture_data()
    world.reset_counts()
    places = sess.scalars(select(wl).options(selectinload(wl.reports)).order_by(wl.id)).all()
    # one SELECT of the locations per shard, one selectin load per shard holding locations
    assert world.statement_counts() == [2, 2, 2, 2]
    assert {p.city: [r.temperature for r in p.reports] for p in places}["Quito"] == [85.0]
    for p in places:
        assert {inspect(r).identity_token for r in p.reports} <= {inspect(p).identity_token}


def test_text_runs_on_default_or_where_told(distinct_world: World) -> None:
    world = distinct_world
    sess = world.fixture_data()
    stmt = text("SELECT city FROM weather_locations ORDER BY id")
    assert sess.execute(stmt).scalars().all() == ["New York", "Toronto"]  # "default" is north_america
    everywhere = sess.execute(stmt.execution_options(shardkit_using=list(SHARDS)))
    assert everywhere.scalars().all() == ["New York", "Toronto", "Tokyo", "London", "Dublin", "Brasilia", "Quito"]
    by_router = sess.execute(stmt, execution_options={"shardkit_model": world.WeatherLocation})
    assert shards_of(by_router) == SHARDS
    assert sorted(by_router.scalars()) == sorted(CITIES)
    two = sess.execute(stmt.execution_options(shardkit_using=("asia", "europe"))).scalars().all()
    assert two == ["Tokyo", "London", "Dublin"]
    bump = sess.execute(
        text("UPDATE weather_reports SET temperature = temperature + 1").execution_options(shardkit_using=list(SHARDS))
    )
    assert bump.rowcount == 3  # type: ignore[attr-defined]
    with pytest.raises(UnknownAliasError):
        sess.execute(stmt.execution_options(shardkit_using=["asia", "mars"]))


def test_lambda_stmt_fans_out(world: World) -> None:
    wl = world.WeatherLocation
    sess = world.fixture_data()
    cities = sess.scalars(lambda_stmt(lambda: select(wl).order_by(wl.city))).all()
    assert [c.city for c in cities] == sorted(CITIES)

    def top(limit: int) -> Any:  # one lambda, cached by SQLAlchemy; new values on each call
        return lambda_stmt(lambda: select(wl.city).where(wl.id > limit).order_by(wl.id.desc()).limit(limit))

    for limit in (2, 3):
        assert sess.scalars(top(limit)).all() == list(reversed(CITIES))[:limit]
    count = lambda_stmt(lambda: select(func.count()).select_from(wl))
    assert sess.scalar(count) == 7


def test_core_select_of_a_mapped_table_routes_like_the_model(world: World) -> None:
    # table.select() of a mapped table went to "default" (docs: only unmapped tables do)
    locations = world.models.weather_locations
    sess = world.fixture_data()
    rows = sess.execute(select(locations.c.id, locations.c.city).order_by(locations.c.id)).all()
    assert [tuple(r) for r in rows] == list(enumerate(CITIES, start=1))
    europe = sess.execute(locations.select().where(locations.c.continent == "Europe").order_by(locations.c.id))
    assert shards_of(europe) == ("europe",)
    assert [r.city for r in europe] == ["London", "Dublin"]
    assert sess.execute(select(func.count()).select_from(locations)).scalar() == 7
    reports = world.models.weather_reports
    done = sess.execute(update(reports).values(temperature=reports.c.temperature - 1))
    assert done.rowcount == 3  # type: ignore[attr-defined]
    assert sorted(sess.execute(select(reports.c.temperature)).scalars()) == [74.0, 79.0, 84.0]
    ids = world.models.ids  # a table no class maps: "default"
    assert sess.execute(select(ids.c.nextid)).scalar() == 8


class RingBase(DeclarativeBase):
    pass


class Post(RingBase):
    __tablename__ = "posts"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    comments: Mapped[list[Comment]] = relationship()


class Comment(RingBase):
    __tablename__ = "comments"
    __shard_key__ = "thread"  # the post's id, copied: the selectin WHERE names post_id only
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    thread: Mapped[int] = mapped_column(BigInteger)
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id"))


def test_selectin_load_stays_on_the_parents_shard_on_a_ring(make_urls: Callable[..., dict[str, str]]) -> None:
    # a selectin load whose WHERE the ring router cannot read (post_id, not the shard key) went
    # to every shard; each shard's parents now load their children from that shard only
    shards = ["s0", "s1", "s2"]
    ring = shardkit.HashRing(shards)
    cluster = shardkit.Cluster(make_urls("default", *shards), routers=[shardkit.HashRingRouter(ring)])
    cluster.create_all(RingBase)
    log = StatementLog(cluster)
    with cluster.session() as s:
        for i in range(1, 13):
            s.add(Post(id=i, comments=[Comment(id=100 * i + k, thread=i) for k in range(i % 3)]))
        s.commit()
        log.seen.clear()
        posts = s.scalars(select(Post).options(selectinload(Post.comments)).order_by(Post.id)).all()
        assert [len(p.comments) for p in posts] == [i % 3 for i in range(1, 13)]
        holding = {ring.get(p.id) for p in posts}
        assert sorted(log.aliases("FROM comments")) == sorted(holding)  # one load per shard, its own
        for p in posts:
            assert {shardkit.db_of(c) for c in p.comments} <= {ring.get(p.id)}
    cluster.dispose()


def test_core_writes_on_a_mapped_table_route_like_the_model(make_urls: Callable[..., dict[str, str]]) -> None:
    # Core statements on a table a class maps went to "default" (where a sharded table is not)
    shards = ["s0", "s1", "s2"]
    ring = shardkit.HashRing(shards)
    cluster = shardkit.Cluster(make_urls("default", *shards), routers=[shardkit.HashRingRouter(ring)])
    cluster.create_all(RingBase)
    posts = Post.__table__
    with cluster.session() as s:
        s.execute(insert(posts), [{"id": i} for i in range(1, 31)])
        s.execute(insert(posts).values(id=31))
        s.commit()
        for alias in shards:
            with cluster.engine(alias).connect() as conn:
                held = conn.execute(select(posts.c.id)).scalars().all()
                assert held and all(ring.get(i) == alias for i in held)
        assert s.execute(select(func.count()).select_from(posts)).scalar() == 31
        assert s.execute(delete(posts).where(posts.c.id > 20)).rowcount == 11  # type: ignore[attr-defined]
        assert s.execute(select(func.max(posts.c.id))).scalar() == 20
    cluster.dispose()


CONTINENT_SHARD = {
    "Asia": "asia",
    "North America": "north_america",
    "Europe": "europe",
    "South America": "south_america",
}


def test_from_statement_over_a_select_reads_every_shard(world: World) -> None:
    # review of issue 12: from_statement() was routed with db_for_write and run as a write
    # fan-out: Query.from_statement() gave [], select().from_statement() raised IndexError
    wl = world.WeatherLocation
    locations = world.models.weather_locations
    sess = world.fixture_data()
    got = sess.scalars(select(wl).from_statement(select(locations).where(locations.c.id > 1))).all()
    assert sorted(c.city for c in got) == sorted(CITIES[1:])
    assert all(inspect(c).identity_token == CONTINENT_SHARD[c.continent] for c in got)
    assert sorted(c.id for c in sess.query(wl).from_statement(select(locations)).all()) == list(range(1, 8))


def test_from_statement_over_text_reads_every_shard(distinct_world: World) -> None:
    wl = distinct_world.WeatherLocation
    sess = distinct_world.fixture_data()
    raw = text("SELECT id, continent, city FROM weather_locations")
    got = sess.query(wl).from_statement(raw).all()
    assert sorted(c.city for c in got) == sorted(CITIES)
    assert all(isinstance(c, wl) and inspect(c).identity_token == CONTINENT_SHARD[c.continent] for c in got)
    assert [inspect(c).identity_token for c in got] == sorted(
        (inspect(c).identity_token for c in got), key=SHARDS.index
    )  # concatenated in alias order
    assert len(sess.scalars(select(wl).from_statement(raw)).all()) == 7


def test_query_count_over_limit_group_by_distinct_and_exists(world: World) -> None:
    # review of issue 12: refused ("LIMIT/OFFSET in a subquery", "SELECT without FROM")
    wl = world.WeatherLocation
    sess = world.fixture_data()
    assert sess.query(wl).order_by(wl.city).limit(3).count() == 3
    assert sess.query(wl).order_by(wl.city).limit(3).offset(5).count() == 2
    assert sess.query(wl.continent).group_by(wl.continent).count() == 4
    assert sess.query(wl.continent).distinct().count() == 4
    assert sess.query(sess.query(wl).filter(wl.city == "Quito").exists()).scalar() is True
    assert sess.query(sess.query(wl).filter(wl.city == "Atlantis").exists()).scalar() is False
