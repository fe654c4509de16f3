"""SQLAlchemy's ``examples/sharding/`` scripts, written anew on shardkit.

Each script builds the same weather application on another layout and runs the same
``main()``; here a :class:`~tests.sqlalchemy_suite.weather.ContinentRouter` replaces the
script's three chooser functions.  The scripts use SQLite; the sync ones also run here on
PostgreSQL (separate databases, schemas of one database, prefixed tables of one database).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, ForeignKey, Integer, Table, create_engine, event, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit

from ..conftest import DatabaseFactory
from .weather import SHARDS, ContinentRouter, Models


def _application(prefix: str = "", id_generator: bool = True) -> Models:
    """The scripts' declarative weather model (``prefix`` before each table name)."""

    class Base(DeclarativeBase):
        pass

    ids = Table("ids", Base.metadata, Column("nextid", Integer, nullable=False))
    holder: list[Engine] = []

    def next_id(ctx: Any) -> int:
        with holder[0].begin() as conn:
            nextid = conn.scalar(ids.select().with_for_update())
            conn.execute(ids.update().values({ids.c.nextid: ids.c.nextid + 1}))
        return int(nextid)  # type: ignore[arg-type]

    class WeatherLocation(Base):
        __tablename__ = f"{prefix}weather_locations"

        id: Mapped[int] = mapped_column(primary_key=True, **({"default": next_id} if id_generator else {}))
        continent: Mapped[str]
        city: Mapped[str]
        reports: Mapped[list[Report]] = relationship(back_populates="location")

        def __init__(self, continent: str, city: str) -> None:
            self.continent = continent
            self.city = city

    class Report(Base):
        __tablename__ = f"{prefix}weather_reports"

        id: Mapped[int] = mapped_column(primary_key=True)
        location_id: Mapped[int] = mapped_column(ForeignKey(f"{prefix}weather_locations.id"))
        temperature: Mapped[float]
        report_time: Mapped[datetime.datetime] = mapped_column(default=datetime.datetime.now)
        location: Mapped[WeatherLocation] = relationship(back_populates="reports")

        def __init__(self, temperature: float) -> None:
            self.temperature = temperature

    return Models(
        Base.metadata,
        ids,
        WeatherLocation.__table__,  # type: ignore[arg-type]
        Report.__table__,  # type: ignore[arg-type]
        WeatherLocation,
        Report,
        Base.registry,
        holder,
    )


def _main(sess: shardkit.ShardSession, app: Models, *, get_with_token: bool = False) -> None:
    """The scripts' ``main()``, with shardkit's ``using()`` where they use ``set_shard_id``."""
    wl, rep = app.WeatherLocation, app.Report
    tokyo = wl("Asia", "Tokyo")
    newyork = wl("North America", "New York")
    toronto = wl("North America", "Toronto")
    london = wl("Europe", "London")
    dublin = wl("Europe", "Dublin")
    brasilia = wl("South America", "Brasila")
    quito = wl("South America", "Quito")
    tokyo.reports.append(rep(80.0))
    newyork.reports.append(rep(75))
    quito.reports.append(rep(85))
    sess.add_all([tokyo, newyork, toronto, london, dublin, brasilia, quito])
    sess.commit()

    t = sess.get(wl, tokyo.id, identity_token="asia") if get_with_token else sess.get(wl, tokyo.id)
    assert t.city == tokyo.city
    assert t.reports[0].temperature == 80.0

    # select across shards
    asia_and_europe = sess.execute(select(wl).filter(wl.continent.in_(["Europe", "Asia"]))).scalars()
    assert {c.city for c in asia_and_europe} == {"Tokyo", "London", "Dublin"}

    # a shard for the query and all its loaders: Tokyo is not in north_america
    north_american_cities_w_t = sess.execute(
        select(wl).filter(wl.city.startswith("T")).options(shardkit.using("north_america"))
    ).scalars()
    assert {c.city for c in north_american_cities_w_t} == {"Toronto"}

    # the same report id on two shards: two identities
    newyork_report = newyork.reports[0]
    tokyo_report = tokyo.reports[0]
    assert inspect(newyork_report).identity_key == (rep, (1,), "north_america")
    assert inspect(tokyo_report).identity_key == (rep, (1,), "asia")
    assert inspect(newyork_report).identity_token == "north_america"
    assert inspect(tokyo_report).identity_token == "asia"


def _cluster(app: Models, engines: dict[str, Engine]) -> shardkit.Cluster:
    return shardkit.Cluster({"default": engines["north_america"], **engines}, routers=[ContinentRouter(app)])


@pytest.fixture
def disposer() -> Iterator[Callable[[Engine], Engine]]:
    made: list[Engine] = []
    yield lambda e: made.append(e) or e  # type: ignore[func-returns-value]
    for engine in made:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_separate_databases(backend: str, databases: DatabaseFactory, disposer: Callable[[Engine], Engine]) -> None:
    # examples/sharding/separate_databases.py: four databases (in-memory SQLite in the script)
    app = _application()
    if backend == "sqlite":
        engines = {a: disposer(create_engine("sqlite://")) for a in SHARDS}
    else:
        engines = {a: disposer(create_engine(url)) for a, url in databases.urls("postgresql", *SHARDS).items()}
    for engine in engines.values():
        app.metadata.create_all(engine)
    with engines["north_america"].begin() as conn:
        conn.execute(app.ids.insert(), {"nextid": 1})
    app.id_engine[:] = [engines["north_america"]]
    cluster = _cluster(app, engines)
    with cluster.session() as sess:
        _main(sess, app)
        assert [c.id for c in sess.scalars(select(app.WeatherLocation).order_by(app.WeatherLocation.id))] == [
            1, 2, 3, 4, 5, 6, 7,
        ]  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_separate_schema_translates(
    backend: str, databases: DatabaseFactory, tmp_path: Path, disposer: Callable[[Engine], Engine]
) -> None:
    # examples/sharding/separate_schema_translates.py: one database, a schema per shard,
    # schema_translate_map={None: "schema_N"}; ids repeat across shards, so get() names one
    app = _application(id_generator=False)
    if backend == "sqlite":
        engine = disposer(create_engine("sqlite://"))
        with engine.connect() as conn:
            for i in range(1, 5):
                conn.exec_driver_sql(f'ATTACH DATABASE "{tmp_path / f"schema_{i}.db"}" AS schema_{i}')
    else:
        engine = disposer(create_engine(databases.url("postgresql", "schemas")))
        with engine.begin() as conn:
            for i in range(1, 5):
                conn.execute(text(f"CREATE SCHEMA schema_{i}"))
    engines = {a: engine.execution_options(schema_translate_map={None: f"schema_{i}"}) for i, a in enumerate(SHARDS, 1)}
    for shard_engine in engines.values():
        app.metadata.create_all(shard_engine, tables=[app.weather_locations, app.weather_reports])
    with _cluster(app, engines).session() as sess:
        _main(sess, app, get_with_token=True)
        rows = sess.execute(select(app.WeatherLocation.id, app.WeatherLocation.city).order_by("city")).all()
        assert [tuple(r) for r in rows] == [
            (1, "Brasila"), (2, "Dublin"), (1, "London"), (1, "New York"),
            (2, "Quito"), (1, "Tokyo"), (2, "Toronto"),
        ]  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_separate_tables(backend: str, databases: DatabaseFactory, disposer: Callable[[Engine], Engine]) -> None:
    # examples/sharding/separate_tables.py: one database, tables named per shard by a
    # before_cursor_execute hook that replaces "_prefix_" with the shard's table_prefix
    app = _application(prefix="_prefix__")
    url = "sqlite://" if backend == "sqlite" else databases.url("postgresql", "tables")
    engine = disposer(create_engine(url))

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def before_cursor_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> Any:
        table_prefix = context.execution_options.get("table_prefix", None)
        if table_prefix:
            statement = statement.replace("_prefix_", table_prefix)
        return statement, parameters

    engines = {a: engine.execution_options(table_prefix=a) for a in SHARDS}
    for shard_engine in engines.values():
        app.metadata.create_all(shard_engine, tables=[app.weather_locations, app.weather_reports], checkfirst=False)
    app.ids.create(engine)
    with engine.begin() as conn:
        conn.execute(app.ids.insert(), {"nextid": 1})
    app.id_engine[:] = [engine]
    with _cluster(app, engines).session() as sess:
        _main(sess, app)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT city FROM europe_weather_locations ORDER BY id")).scalars().all() == [
            "London",
            "Dublin",
        ]


def test_asyncio() -> None:
    # examples/sharding/asyncio.py: an AsyncSession whose sync_session_class is the sharded
    # session, over aiosqlite; shards are the async engines' sync_engine
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.orm import immediateload

    app = _application()
    async_engines = {a: create_async_engine("sqlite+aiosqlite://") for a in SHARDS}  # in memory, as the script
    app.id_engine[:] = [async_engines["north_america"].sync_engine]
    cluster = _cluster(app, {a: e.sync_engine for a, e in async_engines.items()})
    session_maker = async_sessionmaker(
        sync_session_class=shardkit.ShardSession, expire_on_commit=False, cluster=cluster
    )
    wl, rep = app.WeatherLocation, app.Report

    async def main() -> None:
        for engine in async_engines.values():
            async with engine.begin() as conn:
                await conn.run_sync(app.metadata.create_all)
        async with async_engines["north_america"].begin() as conn:
            await conn.execute(app.ids.insert(), {"nextid": 1})
        tokyo = wl("Asia", "Tokyo")
        newyork = wl("North America", "New York")
        toronto = wl("North America", "Toronto")
        london = wl("Europe", "London")
        dublin = wl("Europe", "Dublin")
        brasilia = wl("South America", "Brasila")
        quito = wl("South America", "Quito")
        tokyo.reports.append(rep(80.0))
        newyork.reports.append(rep(75))
        quito.reports.append(rep(85))
        async with session_maker() as sess:
            sess.add_all([tokyo, newyork, toronto, london, dublin, brasilia, quito])
            await sess.commit()
            t = await sess.get(wl, tokyo.id, options=[immediateload(wl.reports)])
            assert t is not None and t.city == tokyo.city
            assert t.reports[0].temperature == 80.0
            asia_and_europe = (await sess.execute(select(wl).filter(wl.continent.in_(["Europe", "Asia"])))).scalars()
            assert {c.city for c in asia_and_europe} == {"Tokyo", "London", "Dublin"}
            north_american_cities_w_t = (
                await sess.execute(select(wl).filter(wl.city.startswith("T")).options(shardkit.using("north_america")))
            ).scalars()
            assert {c.city for c in north_american_cities_w_t} == {"Toronto"}
            newyork_report = newyork.reports[0]
            tokyo_report = tokyo.reports[0]
            assert inspect(newyork_report).identity_key == (rep, (1,), "north_america")
            assert inspect(tokyo_report).identity_key == (rep, (1,), "asia")
            # beyond the script: a global order and count over the shards, answered as one database would
            ordered = (await sess.scalars(select(wl).order_by(wl.city.desc()).limit(3))).all()
            assert [c.city for c in ordered] == ["Toronto", "Tokyo", "Quito"]
            assert await sess.scalar(select(func_count()).select_from(wl)) == 7
        for engine in async_engines.values():
            await engine.dispose()

    asyncio.run(main())


def func_count() -> Any:
    from sqlalchemy import func

    return func.count()
