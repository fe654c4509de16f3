"""SQLAlchemy's ``test/ext/test_horizontal_shard.py``, ``ShardTest`` and its layouts, on shardkit.

Every test runs on each layout of the ``world`` fixture (DistinctEngine, AttachedFile,
TableNameConvention on SQLite and PostgreSQL; MultipleDialect on SQLite + PostgreSQL).
Where the peer picks shards with ``set_shard_id`` / ``set_shard()`` shardkit uses
:func:`shardkit.using`; where the peer's choosers pick, :class:`ContinentRouter` does.

Statement counts: the peer sends a lazy or selectin load from an object to every shard
("that information is not transferred", says its test); shardkit keeps every load from an
object on that object's shard, so those counts are lower, and say so where they differ.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import delete, event, inspect, select, text, update
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session, defer, lazyload, selectinload

import shardkit

from .weather import World


def test_get(world: World) -> None:
    # ShardTest.test_get
    sess = world.fixture_data()
    tokyo = sess.get(world.WeatherLocation, 1)
    assert tokyo.city == "Tokyo"
    newyork = sess.get(world.WeatherLocation, 2)
    assert newyork.city == "New York"
    t2 = sess.get(world.WeatherLocation, 1)
    assert t2 is tokyo


def test_get_one(world: World) -> None:
    # ShardTest.test_get_one
    sess = world.fixture_data()
    brasilia = sess.get_one(world.WeatherLocation, 6)
    assert brasilia.id == 6
    assert brasilia.city == "Brasilia"
    toronto = sess.get_one(world.WeatherLocation, 3)
    assert toronto.id == 3
    assert toronto.city == "Toronto"
    with pytest.raises(NoResultFound, match="No row was found when one was required"):
        sess.get_one(world.WeatherLocation, 25)


def test_get_explicit_shard(world: World) -> None:
    # ShardTest.test_get_explicit_shard (Query.set_shard(), also spelled Query.using())
    wl = world.WeatherLocation
    sess = world.fixture_data()
    tokyo = sess.query(wl).set_shard("europe").where(wl.id == 1).first()
    assert tokyo is None
    newyork = sess.query(wl).set_shard("north_america").where(wl.id == 2).first()
    assert newyork.city == "New York"
    assert sess.query(wl).using("asia").where(wl.id == 1).one().city == "Tokyo"
    # now it found it
    t2 = sess.get(wl, 1)
    assert t2.city == "Tokyo"


@pytest.mark.parametrize("option_type", ["none", "lazyload", "selectinload"])
@pytest.mark.parametrize("limit_shard", ["none", "lead_only", "propagate_to_loaders", "bind_arg"])
def test_set_shard_option_relationship(world: World, option_type: str, limit_shard: str) -> None:
    # ShardTest.test_set_shard_option_relationship
    wl = world.WeatherLocation
    sess = world.fixture_data()
    stmt = select(wl).filter(wl.city == "New York")
    bind_arguments: dict[str, Any] = {}
    # the peer: [2, 2, 2, 2] with no shard given, its loads going to every shard, and [2, 1, 1, 1]
    # for lead_only + lazyload and for bind_arg; shardkit loads New York's reports from New
    # York's shard only
    counts = [2, 1, 1, 1] if limit_shard == "none" else [2, 0, 0, 0]
    if option_type == "lazyload":
        stmt = stmt.options(lazyload(wl.reports))
    elif option_type == "selectinload":
        stmt = stmt.options(selectinload(wl.reports))
    if limit_shard == "lead_only":
        stmt = stmt.options(shardkit.using("north_america", propagate_to_loaders=False))
    elif limit_shard == "propagate_to_loaders":
        stmt = stmt.options(shardkit.using("north_america"))
    elif limit_shard == "bind_arg":
        bind_arguments["shard_id"] = "north_america"
    world.reset_counts()
    w1 = sess.scalars(stmt, bind_arguments=bind_arguments).first()
    assert [r.temperature for r in w1.reports] == [75.0]
    assert world.statement_counts() == counts


@pytest.mark.parametrize("option_type", ["none", "defer"])
@pytest.mark.parametrize("limit_shard", ["none", "lead_only", "propagate_to_loaders", "bind_arg"])
def test_set_shard_option_column(world: World, option_type: str, limit_shard: str) -> None:
    # ShardTest.test_set_shard_option_column
    wl = world.WeatherLocation
    sess = world.fixture_data()
    stmt = select(wl).filter(wl.city == "New York")
    bind_arguments: dict[str, Any] = {}
    if limit_shard == "none":
        counts = [2, 1, 1, 1] if option_type == "defer" else [1, 1, 1, 1]
    else:
        counts = [2, 0, 0, 0] if option_type == "defer" else [1, 0, 0, 0]
    if option_type == "defer":
        stmt = stmt.options(defer(wl.continent))
    if limit_shard == "lead_only":
        stmt = stmt.options(shardkit.using("north_america", propagate_to_loaders=False))
    elif limit_shard == "propagate_to_loaders":
        stmt = stmt.options(shardkit.using("north_america"))
    elif limit_shard == "bind_arg":
        bind_arguments["shard_id"] = "north_america"
    world.reset_counts()
    w1 = sess.scalars(stmt, bind_arguments=bind_arguments).first()
    assert w1.continent == "North America"
    assert world.statement_counts() == counts


def test_query_explicit_shard_via_bind_opts(world: World) -> None:
    # ShardTest.test_query_explicit_shard_via_bind_opts
    wl = world.WeatherLocation
    sess = world.fixture_data()
    stmt = select(wl).filter(wl.id == 1)
    tokyo = sess.execute(stmt, bind_arguments={"shard_id": "asia"}).scalars().first()
    assert tokyo.city == "Tokyo"


def test_plain_db_lookup(world: World) -> None:
    # ShardTest.test_plain_db_lookup
    world.fixture_data()
    locations = world.models.weather_locations
    with world.engines["asia"].connect() as conn:
        assert conn.execute(locations.select()).fetchall() == [(1, "Asia", "Tokyo")]
    with world.engines["north_america"].connect() as conn:
        assert conn.execute(locations.select().order_by(locations.c.id)).fetchall() == [
            (2, "North America", "New York"),
            (3, "North America", "Toronto"),
        ]


def test_plain_core_lookup_w_shard(world: World) -> None:
    # ShardTest.test_plain_core_lookup_w_shard
    sess = world.fixture_data()
    rows = sess.execute(world.models.weather_locations.select(), bind_arguments={"shard_id": "asia"}).fetchall()
    assert rows == [(1, "Asia", "Tokyo")]


def test_roundtrip_future(world: World) -> None:
    # ShardTest.test_roundtrip_future
    wl = world.WeatherLocation
    sess = world.fixture_data()
    tokyo = sess.execute(select(wl).filter_by(city="Tokyo")).scalars().one()
    assert tokyo.city == "Tokyo"
    asia_and_europe = sess.execute(select(wl).filter(wl.continent.in_(["Europe", "Asia"]))).scalars()
    assert {c.city for c in asia_and_europe} == {"Tokyo", "London", "Dublin"}


def test_roundtrip(world: World) -> None:
    # ShardTest.test_roundtrip
    wl, rep = world.WeatherLocation, world.Report
    sess = world.fixture_data()
    tokyo = sess.query(wl).filter_by(city="Tokyo").one()
    assert tokyo.city == "Tokyo"
    sess.expire_all()

    t = sess.get(wl, tokyo.id)
    assert t.city == tokyo.city
    assert t.reports[0].temperature == 80.0
    north_american_cities = sess.query(wl).filter(wl.continent == "North America")
    assert {c.city for c in north_american_cities} == {"New York", "Toronto"}
    asia_and_europe = sess.query(wl).filter(wl.continent.in_(["Europe", "Asia"]))
    assert {c.city for c in asia_and_europe} == {"Tokyo", "London", "Dublin"}

    # the shard token stored with each instance
    assert {inspect(c).key[2] for c in asia_and_europe} == {"europe", "asia"}
    assert {inspect(c).identity_token for c in asia_and_europe} == {"europe", "asia"}

    newyork = sess.query(wl).filter_by(city="New York").one()
    newyork_report = newyork.reports[0]
    tokyo_report = tokyo.reports[0]
    # same primary key, two identity keys
    assert inspect(newyork_report).identity_key == (rep, (1,), "north_america")
    assert inspect(tokyo_report).identity_key == (rep, (1,), "asia")
    assert inspect(newyork_report).identity_token == "north_america"
    assert inspect(tokyo_report).identity_token == "asia"
    assert shardkit.db_of(newyork_report) == "north_america"


def test_get_baked_query(world: World) -> None:
    # ShardTest.test_get_baked_query
    from sqlalchemy.ext.baked import BakedQuery

    wl = world.WeatherLocation
    sess = world.fixture_data()
    tokyo = sess.query(wl).filter_by(city="Tokyo").one()
    tokyo_city = tokyo.city
    sess.expunge_all()
    bakery = BakedQuery.bakery()
    bq = bakery(lambda session: session.query(wl))
    t = bq(sess).get(tokyo.id)
    assert t.city == tokyo_city
    assert inspect(t).key[2] == "asia"


def test_get_baked_query_shard_id(world: World) -> None:
    # ShardTest.test_get_baked_query_shard_id
    from sqlalchemy.ext.baked import BakedQuery

    wl = world.WeatherLocation
    sess = world.fixture_data()
    tokyo = sess.query(wl).filter_by(city="Tokyo").one()
    tokyo_city = tokyo.city
    sess.expunge_all()
    bakery = BakedQuery.bakery()
    bq = bakery(lambda session: session.query(wl))
    t = bq(sess).with_post_criteria(lambda q: q.set_shard("asia")).get(tokyo.id)
    assert t.city == tokyo_city
    assert inspect(t).key[2] == "asia"


def test_filter_baked_query_shard_id(world: World) -> None:
    # ShardTest.test_filter_baked_query_shard_id
    from sqlalchemy.ext.baked import BakedQuery

    wl = world.WeatherLocation
    sess = world.fixture_data()
    tokyo = sess.query(wl).filter_by(city="Tokyo").one()
    tokyo_city, tokyo_id = tokyo.city, tokyo.id
    sess.expunge_all()
    bakery = BakedQuery.bakery()
    bq = bakery(lambda session: session.query(wl)).with_criteria(lambda q: q.filter_by(id=tokyo_id))
    t = bq(sess).with_post_criteria(lambda q: q.set_shard("asia")).one()
    assert t.city == tokyo_city


def test_shard_id_event(world: World) -> None:
    # ShardTest.test_shard_id_event: each row's load event sees the shard it came from
    wl = world.WeatherLocation
    canary: list[str] = []

    def load(instance: Any, ctx: Any) -> None:
        canary.append(ctx.bind_arguments["shard_id"])

    event.listen(wl, "load", load)
    try:
        sess = world.fixture_data()
        tokyo = sess.query(wl).filter_by(city="Tokyo").set_shard("asia").one()
        sess.query(wl).all()  # Tokyo is in the identity map: no second load event
        assert tokyo.continent == "Asia"
    finally:
        event.remove(wl, "load", load)
    assert canary == [
        "asia",
        "north_america",
        "north_america",
        "europe",
        "europe",
        "south_america",
        "south_america",
    ]


def test_baked_mix(world: World) -> None:
    # ShardTest.test_baked_mix: one baked query, a sharded session and a plain one
    from sqlalchemy.ext.baked import BakedQuery

    wl = world.WeatherLocation
    sess = world.fixture_data()
    tokyo = sess.query(wl).filter_by(city="Tokyo").one()
    tokyo_city, tokyo_id = tokyo.city, tokyo.id
    sess.expunge_all()
    bakery = BakedQuery.bakery()

    def get_tokyo(s: Session) -> Any:
        bq = bakery(lambda session: session.query(wl))
        return bq(s).get(tokyo_id)

    with Session(bind=world.engines["asia"], autoflush=True) as sess2:
        assert get_tokyo(sess).city == tokyo_city
        assert get_tokyo(sess2).city == tokyo_city


@pytest.mark.parametrize("synchronize_session", ["fetch", "evaluate", "auto"])
@pytest.mark.parametrize("legacy", [True, False])
def test_orm_update_synchronize(world: World, synchronize_session: str, legacy: bool) -> None:
    # ShardTest.test_orm_update_synchronize
    rep = world.Report
    sess = world.fixture_data()
    assert {row.temperature for row in sess.query(rep.temperature)} == {80.0, 75.0, 85.0}
    temps = sess.query(rep).all()
    assert {t.temperature for t in temps} == {80.0, 75.0, 85.0}
    if legacy:
        sess.query(rep).filter(rep.temperature >= 80).update(
            {"temperature": rep.temperature + 6}, synchronize_session=synchronize_session
        )
    else:
        sess.execute(
            update(rep)
            .filter(rep.temperature >= 80)
            .values(temperature=rep.temperature + 6)
            .execution_options(synchronize_session=synchronize_session)
        )
    world.reset_counts()
    assert {t.temperature for t in temps} == {86.0, 75.0, 91.0}
    assert world.statement_counts() == [0, 0, 0, 0]
    assert {row.temperature for row in sess.query(rep.temperature)} == {86.0, 75.0, 91.0}


@pytest.mark.parametrize("synchronize_session", ["fetch", "evaluate", "auto"])
@pytest.mark.parametrize("legacy", [True, False])
def test_orm_delete_synchronize(world: World, synchronize_session: str, legacy: bool) -> None:
    # ShardTest.test_orm_delete_synchronize
    rep = world.Report
    sess = world.fixture_data()
    temps = sess.query(rep).all()
    assert {t.temperature for t in temps} == {80.0, 75.0, 85.0}
    if legacy:
        sess.query(rep).filter(rep.temperature >= 80).delete(synchronize_session=synchronize_session)
    else:
        sess.execute(
            delete(rep).filter(rep.temperature >= 80).execution_options(synchronize_session=synchronize_session)
        )
    world.reset_counts()
    for t in temps:
        assert inspect(t).deleted is (t.temperature >= 80)
    assert world.statement_counts() == [0, 0, 0, 0]
    assert {row.temperature for row in sess.query(rep.temperature)} == {75.0}


def test_plain_core_textual_lookup_w_shard(distinct_world: World) -> None:
    # DistinctEngineShardTest.test_plain_core_textual_lookup_w_shard
    world = distinct_world
    sess = world.fixture_data()
    stmt = text("SELECT * FROM weather_locations")
    assert sess.execute(stmt, bind_arguments={"shard_id": "asia"}).fetchall() == [(1, "Asia", "Tokyo")]


def test_plain_core_textual_lookup(distinct_world: World) -> None:
    # DistinctEngineShardTest.test_plain_core_textual_lookup: the peer runs a bare text() on
    # every shard; shardkit runs a bare text() on "default" and on the shards a router picks
    # for a model given as ``shardkit_model``
    world = distinct_world
    sess = world.fixture_data()
    stmt = text("SELECT * FROM weather_locations WHERE id=1")
    merged = sess.execute(stmt.execution_options(shardkit_model=world.WeatherLocation))
    assert merged.fetchall() == [(1, "Asia", "Tokyo")]
    assert sess.execute(stmt).fetchall() == []  # "default" is north_america: no Tokyo there


# --- where the peer documents its own wrong answer, the single-database answer ----------------
# The peer's examples/sharding/__init__.py: "all shards will be queried and the results joined
# together": its ORDER BY / LIMIT are per shard, concatenated, and Query.count() gets one count
# per shard (MultipleResultsFound).  shardkit answers as one database holding every row would.


def test_query_order_by_limit_is_global(world: World) -> None:
    # ShardTest (peer: concatenated per-shard ORDER BY / LIMIT)
    wl, rep = world.WeatherLocation, world.Report
    sess = world.fixture_data()
    assert [c.city for c in sess.query(wl).order_by(wl.city).limit(3)] == ["Brasilia", "Dublin", "London"]
    assert [c.city for c in sess.query(wl).order_by(wl.city.desc()).offset(1).limit(2)] == ["Tokyo", "Quito"]
    hottest = sess.query(rep).order_by(rep.temperature.desc()).first()
    assert hottest.temperature == 85.0 and inspect(hottest).identity_token == "south_america"
    stmt = select(wl.city).order_by(wl.continent, wl.city.desc()).limit(4)
    assert sess.scalars(stmt).all() == ["Tokyo", "London", "Dublin", "Toronto"]


def test_query_count_is_one_number(world: World) -> None:
    # ShardTest (peer: Query.count() raises, one count per shard)
    from sqlalchemy import func

    wl, rep = world.WeatherLocation, world.Report
    sess = world.fixture_data()
    assert sess.query(wl).count() == 7
    assert sess.query(wl).filter(wl.continent.in_(["Europe", "Asia"])).count() == 3
    assert sess.query(rep).count() == 3
    assert sess.scalar(select(func.count()).select_from(wl)) == 7
    assert sess.query(func.avg(rep.temperature)).scalar() == pytest.approx(80.0)
    by_continent = sess.execute(select(wl.continent, func.count()).group_by(wl.continent).order_by(wl.continent)).all()
    assert [tuple(r) for r in by_continent] == [
        ("Asia", 1),
        ("Europe", 2),
        ("North America", 2),
        ("South America", 2),
    ]
