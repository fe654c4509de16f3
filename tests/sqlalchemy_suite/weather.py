"""The weather model of SQLAlchemy's ``test/ext/test_horizontal_shard.py``, in shardkit's terms.

The peer picks shards with three functions given to ``ShardedSession``: ``shard_chooser``
(where an object is written), ``identity_chooser`` (where ``get()`` looks) and
``execute_chooser`` (where a statement runs).  Here one router does all three, as a shardkit
user would write it: :class:`ContinentRouter`.

Each *layout* is one way of giving the four shards to the cluster, as the peer's test
classes do (``DistinctEngine``, ``AttachedFile``, ``TableNameConvention``,
``MultipleDialect``), on SQLite and on PostgreSQL.  ``"default"`` is the north_america
engine: the peer keeps its ``ids`` table there.
"""

from __future__ import annotations

import datetime
import re
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import deferred, registry, relationship
from sqlalchemy.pool import SingletonThreadPool
from sqlalchemy.sql import operators, visitors

import shardkit

from ..conftest import DatabaseFactory

SHARDS = ("north_america", "asia", "europe", "south_america")
SHARD_OF = {
    "North America": "north_america",
    "Asia": "asia",
    "Europe": "europe",
    "South America": "south_america",
}

LAYOUTS = ("distinct_engine", "legacy_api", "attached_file", "table_name_convention", "multiple_dialect")


class WeatherLocation:
    def __init__(self, continent: str, city: str) -> None:
        self.continent = continent
        self.city = city


class Report:
    def __init__(self, temperature: float, id_: int | None = None) -> None:
        self.temperature = temperature
        if id_:
            self.id = id_


@dataclass
class Models:
    """One mapping of the weather model (a schema-qualified one for the schema layouts)."""

    metadata: MetaData
    ids: Table
    weather_locations: Table
    weather_reports: Table
    WeatherLocation: type[Any]
    Report: type[Any]
    registry: registry
    id_engine: list[Engine] = field(default_factory=list)  # where id_generator takes ids


def make_models(schema: str | None) -> Models:
    """Map fresh ``WeatherLocation`` / ``Report`` subclasses on their own tables."""
    metadata = MetaData()
    ids = Table("ids", metadata, Column("nextid", Integer, nullable=False))
    holder: list[Engine] = []

    def id_generator(ctx: Any) -> int:
        # the peer's id generator: a counter row in the north_america database
        with holder[0].begin() as conn:
            nextid = conn.execute(ids.select().with_for_update()).scalar()
            conn.execute(ids.update().values({ids.c.nextid: ids.c.nextid + 1}))
            return int(nextid)  # type: ignore[arg-type]

    weather_locations = Table(
        "weather_locations",
        metadata,
        Column("id", Integer, primary_key=True, default=id_generator),
        Column("continent", String(30), nullable=False),
        Column("city", String(50), nullable=False),
        schema=schema,
    )
    weather_reports = Table(
        "weather_reports",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("location_id", Integer, ForeignKey(weather_locations.c.id)),
        Column("temperature", Numeric(asdecimal=False)),
        Column("report_time", DateTime, default=datetime.datetime.now),
        schema=schema,
    )
    reg = registry(metadata=metadata)
    location_cls = type("WeatherLocation", (WeatherLocation,), {})
    report_cls = type("Report", (Report,), {})
    reg.map_imperatively(
        location_cls,
        weather_locations,
        properties={
            "reports": relationship(report_cls, backref="location"),
            "city": deferred(weather_locations.c.city),
        },
    )
    reg.map_imperatively(report_cls, weather_reports)
    return Models(metadata, ids, weather_locations, weather_reports, location_cls, report_cls, reg, holder)


_MODELS: dict[str | None, Models] = {}


def models_for(schema: str | None) -> Models:
    if schema not in _MODELS:
        _MODELS[schema] = make_models(schema)
    return _MODELS[schema]


class ContinentRouter:
    """The peer's three choosers as one router.

    * writes of a location go to its continent's shard, a report follows its location
      (``shard_chooser``);
    * a read whose WHERE compares ``continent`` with literals goes to those continents'
      shards, any other read to all four (``execute_chooser``); ``get()`` of a key not in
      the identity map is such a read (``identity_chooser``);
    * a load from an object (lazy, selectin, refresh) passes: shardkit keeps it on the
      object's shard.
    """

    def __init__(self, models: Models) -> None:
        self.models = models

    def db_for_write(self, model: type[Any], *, instance: Any = None, statement: Any = None, **hints: Any) -> Any:
        if instance is not None:
            if isinstance(instance, self.models.WeatherLocation):
                return SHARD_OF[instance.continent]
            if isinstance(instance, self.models.Report):
                return self.db_for_write(model, instance=instance.location)
            return None
        if statement is not None and model in (self.models.WeatherLocation, self.models.Report):
            return self.shards_for(statement)  # bulk UPDATE / DELETE by statement
        return None

    def db_for_read(self, model: type[Any], *, instance: Any = None, statement: Any = None, **hints: Any) -> Any:
        if instance is not None or model not in (self.models.WeatherLocation, self.models.Report):
            return None
        return self.shards_for(statement)

    def shards_for(self, statement: Any) -> list[str]:
        found: list[str] = []
        continent = self.models.weather_locations.c.continent
        for criterion in getattr(statement, "_where_criteria", ()):
            for element in visitors.iterate(criterion):
                if not hasattr(element, "left") or not hasattr(element, "operator"):
                    continue
                left, right = element.left, element.right
                if not (hasattr(left, "shares_lineage") and left.shares_lineage(continent)):
                    continue
                value = getattr(right, "effective_value", None)
                if element.operator is operators.eq:
                    found.append(SHARD_OF[value])
                elif element.operator is operators.in_op:
                    found.extend(SHARD_OF[v] for v in value)
        return list(dict.fromkeys(found)) or list(SHARDS)


@dataclass
class World:
    """A cluster over one layout, with the peer's fixture data written by :meth:`fixture_data`."""

    layout: str
    backend: str
    cluster: shardkit.Cluster
    models: Models
    engines: dict[str, Engine]  # shard alias -> the engine DATABASES gave it
    counts: Counter[str] = field(default_factory=Counter)
    sessions: list[shardkit.ShardSession] = field(default_factory=list)

    @property
    def WeatherLocation(self) -> Any:  # the peer's class names
        return self.models.WeatherLocation

    @property
    def Report(self) -> Any:
        return self.models.Report

    def session(self, **kw: Any) -> shardkit.ShardSession:
        sess = self.cluster.session(autoflush=True, **kw)
        self.sessions.append(sess)  # closed by dispose(): the peer's tests leave them open
        return sess

    def fixture_data(self) -> shardkit.ShardSession:
        """The peer's ``_fixture_data``: seven cities, three reports (two with id 1)."""
        wl, rep = self.WeatherLocation, self.Report
        tokyo = wl("Asia", "Tokyo")
        newyork = wl("North America", "New York")
        toronto = wl("North America", "Toronto")
        london = wl("Europe", "London")
        dublin = wl("Europe", "Dublin")
        brasilia = wl("South America", "Brasilia")
        quito = wl("South America", "Quito")
        tokyo.reports.append(rep(80.0, id_=1))
        newyork.reports.append(rep(75, id_=1))
        quito.reports.append(rep(85))
        sess = self.session()
        for c in [tokyo, newyork, toronto, london, dublin, brasilia, quito]:
            sess.add(c)
        sess.flush()
        from sqlalchemy import inspect

        assert inspect(newyork).key[2] == "north_america"
        assert inspect(newyork).identity_token == "north_america"
        assert inspect(dublin).key[2] == "europe"
        assert inspect(dublin).identity_token == "europe"
        sess.commit()
        sess.close()
        return sess

    def count_statements(self) -> Iterator[None]:
        raise NotImplementedError  # replaced in __post_init__

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for alias, engine in self.engines.items():
            if id(engine) in seen:
                continue
            seen.add(id(engine))
            event.listen(engine, "before_cursor_execute", self._counter(alias))

    def _counter(self, alias: str) -> Callable[..., None]:
        def count(conn: Any, *args: Any) -> None:
            if conn.engine is self.engines[alias]:
                self.counts[alias] += 1

        return count

    def statement_counts(self) -> list[int]:
        return [self.counts[a] for a in SHARDS]

    def reset_counts(self) -> None:
        self.counts.clear()


# ------------------------------------------------------------------------------- layouts


def _sqlite_file(tmp: Path, name: str) -> str:
    return str(tmp / f"{name}-{uuid.uuid4().hex[:6]}.db")


PG_DATABASES = ("north_america", "asia", "europe", "south_america", "schemas", "tnc")


def pg_databases(databases: DatabaseFactory) -> dict[str, str]:
    """The PostgreSQL databases the layouts use (made once per module: creating one is slow)."""
    return databases.urls("postgresql", *PG_DATABASES)


def _pg_schema_engine(pg: dict[str, str], schemas: list[str]) -> Engine:
    engine = create_engine(pg["schemas"])
    with engine.begin() as conn:
        for name in schemas:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {name}"))
    return engine


def build_engines(
    layout: str, backend: str, tmp: Path, pg: dict[str, str] | None
) -> tuple[dict[str, Engine], str | None]:
    """alias -> engine for ``layout`` on ``backend``, and the schema name the tables use."""
    if layout == "distinct_engine":
        if backend == "sqlite":
            # the peer's DistinctEngineShardTest: four files, the first on a SingletonThreadPool
            first = create_engine(f"sqlite:///{_sqlite_file(tmp, 'shard1')}", poolclass=SingletonThreadPool)
            rest = [create_engine(f"sqlite:///{_sqlite_file(tmp, f'shard{i}')}") for i in (2, 3, 4)]
            return dict(zip(SHARDS, [first, *rest], strict=True)), None
        assert pg is not None
        return {a: create_engine(pg[a]) for a in SHARDS}, None
    if layout == "attached_file":
        # the peer's AttachedFileShardTest: one engine, a schema per shard, schema_translate_map
        if backend == "sqlite":
            base = create_engine("sqlite://")
            with base.connect() as conn:
                for i in range(1, 5):
                    conn.exec_driver_sql(f'ATTACH DATABASE "{_sqlite_file(tmp, f"shard{i}")}" AS shard{i}')
        else:
            assert pg is not None
            base = _pg_schema_engine(pg, [f"shard{i}" for i in range(1, 5)])
        return {
            a: base.execution_options(schema_translate_map={"changeme": f"shard{i}"})
            for i, a in enumerate(SHARDS, start=1)
        }, "changeme"
    if layout == "table_name_convention":
        # the peer's TableNameConventionShardTest: one database, tables renamed per shard
        base = create_engine("sqlite://") if backend == "sqlite" else create_engine(pg["tnc"])  # type: ignore[index]

        @event.listens_for(base, "before_cursor_execute", retval=True)
        def _switch_shard(conn: Any, cursor: Any, stmt: str, params: Any, context: Any, executemany: bool) -> Any:
            shard_id = conn._execution_options.get("shard_id")
            if shard_id:
                stmt = re.sub(r"\"?changeme\"?\.", shard_id + "_", stmt)
            return stmt, params

        return {a: base.execution_options(shard_id=f"shard{i}") for i, a in enumerate(SHARDS, start=1)}, "changeme"
    if layout == "multiple_dialect":
        # the peer's MultipleDialectShardTest: shards 1 and 3 on SQLite, 2 and 4 on PostgreSQL
        lite = create_engine("sqlite://")
        with lite.connect() as conn:
            for i in (1, 3):
                conn.exec_driver_sql(f'ATTACH DATABASE "{_sqlite_file(tmp, f"shard{i}")}" AS shard{i}')
        assert pg is not None
        server = _pg_schema_engine(pg, ["shard2", "shard4"])
        return {
            a: (lite if i in (1, 3) else server).execution_options(schema_translate_map={"changeme": f"shard{i}"})
            for i, a in enumerate(SHARDS, start=1)
        }, "changeme"
    raise ValueError(layout)


def build_world(layout: str, backend: str, tmp: Path, pg: dict[str, str] | None) -> World:
    legacy = layout == "legacy_api"
    engines, schema = build_engines("distinct_engine" if legacy else layout, backend, tmp, pg)
    models = models_for(schema)
    databases = {"default": engines["north_america"], **engines}
    if legacy:
        # the peer's LegacyAPIShardTest runs the DistinctEngine tests with its older API; shardkit's
        # older form is Django's: a settings module with DATABASES and DATABASE_ROUTERS
        settings = types.ModuleType("weather_settings")
        settings.DATABASES = databases  # type: ignore[attr-defined]
        settings.DATABASE_ROUTERS = [ContinentRouter(models)]  # type: ignore[attr-defined]
        cluster = shardkit.Cluster.from_settings(settings)
    else:
        cluster = shardkit.Cluster(databases, routers=[ContinentRouter(models)])
    if layout == "table_name_convention":
        # the DDL's "changeme." becomes each shard's prefix: checkfirst would look for the
        # untranslated name, so drop by the real names and create without checking
        for i, engine in enumerate(engines.values(), start=1):
            with engine.begin() as conn:
                for name in ("weather_reports", "weather_locations"):
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS shard{i}_{name}")
            tables = [models.weather_locations, models.weather_reports]
            models.metadata.create_all(engine, tables=tables, checkfirst=False)
        models.ids.drop(engines["north_america"], checkfirst=True)
        models.ids.create(engines["north_america"])
    else:
        for engine in engines.values():
            models.metadata.drop_all(engine)
            models.metadata.create_all(engine)
    with engines["north_america"].begin() as conn:
        conn.execute(models.ids.insert(), {"nextid": 1})
    models.id_engine[:] = [engines["north_america"]]
    return World(layout, backend, cluster, models, engines)


def dispose(world: World) -> None:
    for sess in world.sessions:
        sess.close()
    world.cluster.dispose()
    for engine in {id(e): e for e in world.engines.values()}.values():
        engine.dispose()


__all__ = [
    "LAYOUTS",
    "SHARDS",
    "SHARD_OF",
    "ContinentRouter",
    "Models",
    "World",
    "build_world",
    "dispose",
    "models_for",
    "pg_databases",
]
