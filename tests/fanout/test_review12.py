"""Regressions of the review of issue 12: answers a fan-out gave wrong, or refused, that one
database gives.

* ``from_statement()`` reads were routed and run as writes (``[]``, ``IndexError``);
* text ORDER BY under a non-binary collation was merged by code point (wrong order/LIMIT);
* ``Query.count()`` over LIMIT / GROUP BY / DISTINCT and ``query(q.exists())`` were refused;
* GROUP BY ``date_trunc`` end to end on PostgreSQL.

Every answer is compared with the same statement run on one database holding every row
(alias ``one``, read through a session pinned to it).
"""

from __future__ import annotations

import datetime
import functools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import DateTime, String, Table, create_engine, func, insert, inspect, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit.errors import UnsupportedQueryError

from ..conftest import MYSQL_URL, PG_URL, DatabaseFactory, require_server

SHARDS = ["s0", "s1", "s2"]
NAMES = ["amsterdam", "Boston", "brasilia", "Zhuhai", "dublin", "London", "quito", "Tokyo", "oslo", "Berlin"]
CONTINENTS = ["Europe", "North America", "South America", "Asia", "Europe", "Europe", "South America", "Asia"]


class Base(DeclarativeBase):
    pass


class City(Base):
    __tablename__ = "r12_cities"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    continent: Mapped[str] = mapped_column(String(40))
    seen: Mapped[datetime.datetime] = mapped_column(DateTime)


class Router:
    """Cities by ``id % 3``; a read or a bulk write without an instance: every shard."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def db_for_read(self, model: Any, *, instance: Any = None, **hints: Any) -> Any:
        self.calls.append("read")
        return None if instance is not None else list(SHARDS)

    def db_for_write(self, model: Any, *, instance: Any = None, **hints: Any) -> Any:
        self.calls.append("write")
        if instance is not None:
            return SHARDS[instance.id % len(SHARDS)]
        return list(SHARDS)


def _rows() -> list[dict[str, Any]]:
    start = datetime.datetime(2024, 3, 1, 8, 0)
    return [
        {
            "id": i,
            "name": NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i}"),
            "continent": CONTINENTS[i % len(CONTINENTS)],
            "seen": start + datetime.timedelta(hours=7 * i),
        }
        for i in range(1, 31)
    ]


def _build(urls: dict[str, str], metadata: Any = None) -> tuple[shardkit.Cluster, Router]:
    router = Router()
    cluster = shardkit.Cluster(urls, routers=[router])
    md = metadata if metadata is not None else Base.metadata
    rows = _rows()
    for alias in [*SHARDS, "one"]:
        md.create_all(cluster.engine(alias))
        mine = rows if alias == "one" else [r for r in rows if SHARDS[r["id"] % len(SHARDS)] == alias]
        with cluster.engine(alias).begin() as conn:
            conn.execute(insert(md.tables["r12_cities"]), mine)
    return cluster, router


@pytest.fixture
def world(make_urls: Callable[..., dict[str, str]]) -> Iterator[tuple[shardkit.Cluster, Router]]:
    cluster, router = _build(make_urls("default", *SHARDS, "one"))
    yield cluster, router
    cluster.dispose()


# --------------------------------------------------------------------------- 1. from_statement()


def test_from_statement_over_text_is_a_read_of_every_shard(world: tuple[shardkit.Cluster, Router]) -> None:
    cluster, router = world
    raw = text("SELECT id, name, continent, seen FROM r12_cities")
    with cluster.session() as s:
        router.calls.clear()
        got = s.query(City).from_statement(raw).all()
        assert router.calls == ["read"]
        assert all(isinstance(c, City) for c in got)
        assert sorted(c.id for c in got) == list(range(1, 31))
        assert all(inspect(c).identity_token == SHARDS[c.id % 3] for c in got)
        order = [SHARDS.index(str(inspect(c).identity_token)) for c in got]
        assert order == sorted(order)  # concatenated in alias order
    with cluster.session() as s:
        got2 = s.scalars(select(City).from_statement(raw)).all()
        assert sorted(c.id for c in got2) == list(range(1, 31))
        commented = text("/* all */ -- every city\n SELECT id, name, continent, seen FROM r12_cities WHERE id > :n")
        assert len(s.scalars(select(City).from_statement(commented), {"n": 20}).all()) == 10


def test_from_statement_over_a_select(world: tuple[shardkit.Cluster, Router]) -> None:
    cluster, _ = world
    t = City.__table__
    with cluster.session() as s:
        got = s.scalars(select(City).from_statement(select(t).where(t.c.id > 25))).all()
        assert sorted(c.id for c in got) == [26, 27, 28, 29, 30]
        with pytest.raises(UnsupportedQueryError, match="from_statement"):
            s.scalars(select(City).from_statement(select(t).order_by(t.c.id).limit(3))).all()


def test_from_statement_over_update_returning_stays_a_write(
    world: tuple[shardkit.Cluster, Router], backend: str
) -> None:
    cluster, router = world
    t = City.__table__
    assert isinstance(t, Table)
    with cluster.session() as s:
        router.calls.clear()
        stmt = update(t).where(t.c.id <= 6).values(continent="Mars").returning(t.c.id, t.c.name, t.c.continent)
        got = s.scalars(select(City).from_statement(stmt)).all()
        assert router.calls == ["write"]
        assert sorted((c.id, c.continent) for c in got) == [(i, "Mars") for i in range(1, 7)]
        s.commit()
    with cluster.session() as s:
        assert s.query(City).filter(City.continent == "Mars").count() == 6


# --------------------------------------------------------------------------- 3. count() / exists()


def _all_rows(stmt: Any, session: Any) -> list[Any]:
    return list(session.execute(stmt).all())


def _both(cluster: shardkit.Cluster, question: Callable[[Any], Any]) -> tuple[Any, Any]:
    with cluster.session() as s, cluster.session(using="one") as one:
        return question(s), question(one)


@pytest.mark.parametrize(
    "question",
    [
        lambda s: s.query(City).order_by(City.name).limit(3).count(),
        lambda s: s.query(City).limit(7).offset(5).count(),
        lambda s: s.query(City).order_by(City.id).offset(28).limit(5).count(),
        lambda s: s.query(City).offset(40).count(),
        lambda s: s.query(City).filter(City.id > 10).limit(100).count(),
        lambda s: s.query(City.continent).group_by(City.continent).count(),
        lambda s: s.query(City.continent, func.count()).group_by(City.continent).count(),
        lambda s: s.query(City.continent).group_by(City.continent).having(func.count() > 4).count(),
        lambda s: s.query(City.continent).group_by(City.continent).limit(2).count(),
        lambda s: s.query(City.continent).distinct().count(),
        lambda s: s.query(City.continent, City.id > 15).distinct().count(),
        lambda s: s.query(City).distinct().count(),
        lambda s: s.query(func.count(City.id)).count(),
        lambda s: s.scalar(select(func.count()).select_from(select(City.id).limit(4).subquery())),
        lambda s: s.query(s.query(City).filter(City.name == "quito").exists()).scalar(),
        lambda s: s.query(s.query(City).filter(City.name == "mars").exists()).scalar(),
        lambda s: s.scalar(select(~select(City.id).where(City.id > 29).exists())),
        lambda s: s.scalar(select(~select(City.id).where(City.id > 30).exists())),
    ],
)
def test_count_and_exists_give_the_one_database_answer(
    world: tuple[shardkit.Cluster, Router], question: Callable[[Any], Any]
) -> None:
    fanned, one = _both(world[0], question)
    assert fanned == one
    assert type(fanned) is type(one)


def test_count_shapes_expected_values(world: tuple[shardkit.Cluster, Router]) -> None:
    # the review's numbers, on this data: 3, 4 continents, 4 continents, True
    with world[0].session() as s:
        assert s.query(City).order_by(City.name).limit(3).count() == 3
        assert s.query(City.continent).group_by(City.continent).count() == 4
        assert s.query(City.continent).distinct().count() == 4
        assert s.query(s.query(City).filter(City.name == "quito").exists()).scalar() is True


def test_count_still_refused_shapes_say_why(world: tuple[shardkit.Cluster, Router]) -> None:
    with world[0].session() as s, pytest.raises(UnsupportedQueryError, match="DISTINCT with GROUP BY"):
        s.query(City.continent).group_by(City.continent).distinct().count()


# --------------------------------------------------------------------------- 4. date_trunc on PostgreSQL


def test_group_by_date_trunc_end_to_end_on_postgresql(databases: DatabaseFactory) -> None:
    cluster, _ = _build(databases.urls("postgresql", "default", *SHARDS, "one"))
    day = func.date_trunc("day", City.seen)
    stmt = (
        select(day.label("day"), func.count().label("n"), func.min(City.id))
        .group_by(day)
        .having(func.count() > 1)
        .order_by(day.desc())
        .limit(4)
    )
    try:
        fanned, one = _both(cluster, lambda s: s.execute(stmt).all())
        assert fanned == one and len(fanned) == 4
        everything = select(day, func.count()).group_by(day).order_by(day)
        fanned, one = _both(cluster, lambda s: s.execute(everything).all())
        assert fanned == one and sum(n for _, n in fanned) == 30
    finally:
        cluster.dispose()


# --------------------------------------------------------------------------- 2. text collations


def _server_db(databases: DatabaseFactory, backend: str, create: str) -> str:
    """A database made with ``create`` (``{name}`` in it), dropped with the test's others."""
    name = f"shardkit_t_{uuid.uuid4().hex[:10]}_coll"
    admin = PG_URL if backend == "postgresql" else MYSQL_URL
    require_server(admin, "pg" if backend == "postgresql" else "mysql")
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(create.format(name=name)))
    finally:
        engine.dispose()
    databases._server_dbs.append((backend, name))
    from sqlalchemy import make_url

    return make_url(admin).set(database=name).render_as_string(hide_password=False)


def _pg_icu(databases: DatabaseFactory) -> dict[str, str]:
    require_server(PG_URL, "pg")
    engine = create_engine(PG_URL)
    with engine.connect() as conn:
        icu = conn.execute(text("SELECT count(*) FROM pg_collation WHERE collname = 'en-US-x-icu'")).scalar()
        version = conn.dialect.server_version_info or (0,)
    engine.dispose()
    if not icu or version < (15,):
        pytest.skip("this PostgreSQL has no ICU collations (or no ICU databases before 15)")
    create = (
        "CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
        "LOCALE 'C.UTF-8'"
    )
    return {alias: _server_db(databases, "postgresql", create) for alias in ["default", *SHARDS, "one"]}


def test_explicit_icu_collation_is_refused_and_c_is_merged(databases: DatabaseFactory) -> None:
    cluster, _ = _build(databases.urls("postgresql", "default", *SHARDS, "one"))  # LC_COLLATE 'C'
    try:
        with cluster.session() as s:
            with pytest.raises(UnsupportedQueryError, match="en-US-x-icu") as info:
                s.scalars(select(City.name).order_by(City.name.collate("en-US-x-icu")).limit(3)).all()
            assert "r12_cities.name" in str(info.value) and 'collate("C")' in str(info.value)
            assert info.value.construct == "text collation"  # type: ignore[attr-defined]
        stmt = select(City.name).order_by(City.name.collate("C").desc()).limit(5)
        fanned, one = _both(cluster, lambda s: s.scalars(stmt).all())
        assert fanned == one
        plain = select(City.name, City.id).order_by(City.name, City.id).offset(3).limit(9)  # a C database
        fanned, one = _both(cluster, lambda s: s.execute(plain).all())
        assert fanned == one
    finally:
        cluster.dispose()


def test_database_with_an_icu_default_collation(databases: DatabaseFactory) -> None:
    cluster, _ = _build(_pg_icu(databases))
    try:
        with cluster.session() as s:
            refused: list[Any] = [
                select(City.name).order_by(City.name).limit(3),
                select(City).order_by(City.continent.desc(), City.id),
                select(func.min(City.name)).select_from(City),
            ]
            for stmt in refused:
                with pytest.raises(UnsupportedQueryError, match=r"C\.UTF-8|en-US"):
                    s.execute(stmt).all()
                s.rollback()
            with pytest.raises(UnsupportedQueryError, match="en-US"):  # no declared type: on the values
                s.execute(select(City.id).order_by(func.lower(City.name))).all()
            s.rollback()
        # what the merge does not compare as text, or compares under "C", is answered
        answered: list[Any] = [
            select(City.name).order_by(City.name.collate("C")).limit(7),
            select(City.id).order_by(func.length(City.name), City.id).limit(6),
            select(City.continent, func.count())
            .group_by(City.continent)
            .order_by(func.count(), City.continent.collate("C")),
            select(City.id).order_by(City.id.desc()).limit(4),
        ]
        for stmt in answered:
            fanned, one = _both(cluster, functools.partial(_all_rows, stmt))
            assert fanned == one
    finally:
        cluster.dispose()


def test_column_collation_declared_in_the_model(databases: DatabaseFactory) -> None:
    from sqlalchemy import Column, Integer, MetaData, Table

    md = MetaData()
    t = Table(
        "r12_cities",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(40, collation="en-US-x-icu")),
        Column("continent", String(40)),
        Column("seen", DateTime),
    )
    require_server(PG_URL, "pg")
    cluster, _ = _build(databases.urls("postgresql", "default", *SHARDS, "one"), md)
    try:
        with cluster.session() as s:
            stmt = select(t.c.name).order_by(t.c.name).execution_options(shardkit_using=SHARDS)
            with pytest.raises(UnsupportedQueryError, match="en-US-x-icu"):
                s.execute(stmt).all()
    finally:
        cluster.dispose()


def test_sqlite_nocase_and_rtrim_merge_like_sqlite(tmp_path: Path) -> None:
    from sqlalchemy import Column, Integer, MetaData, Table

    md = MetaData()
    t = Table(
        "r12_cities",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(40, collation="NOCASE")),
        Column("continent", String(40, collation="RTRIM")),
        Column("seen", DateTime),
    )
    factory = DatabaseFactory(tmp_path)
    cluster, _ = _build(factory.urls("sqlite", "default", *SHARDS, "one"), md)
    try:
        on = {"shardkit_using": SHARDS}
        for stmt in (
            select(t.c.name, t.c.id).order_by(t.c.name, t.c.id).limit(8),
            select(t.c.name, t.c.id).order_by(t.c.name.desc(), t.c.id).offset(2).limit(8),
            select(t.c.id).order_by(t.c.name.collate("BINARY"), t.c.id).limit(8),
            select(t.c.continent, t.c.id).order_by(t.c.continent, t.c.id.desc()).limit(12),
        ):
            with cluster.session() as s, cluster.session(using="one") as one:
                assert s.execute(stmt.execution_options(**on)).all() == one.execute(stmt).all()
        with cluster.session() as s:
            for refused in (
                select(t.c.name).group_by(t.c.name).execution_options(**on),  # 'a' = 'A' under NOCASE
                select(t.c.name).distinct().execution_options(**on),
                select(t.c.id).order_by(t.c.name.collate("my_collation")).execution_options(**on),
            ):
                with pytest.raises(UnsupportedQueryError, match=r"NOCASE|my_collation"):
                    s.execute(refused).all()
    finally:
        cluster.dispose()


def test_mariadb_default_general_ci_collation(databases: DatabaseFactory) -> None:
    create = "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
    urls = {alias: _server_db(databases, "mysql", create) for alias in ["default", *SHARDS, "one"]}
    cluster, _ = _build(urls)
    try:
        with cluster.session() as s:
            refused: list[Any] = [
                select(City.name).order_by(City.name).limit(3),
                select(City.continent).group_by(City.continent),
                select(City.continent).distinct(),
            ]
            for stmt in refused:
                with pytest.raises(UnsupportedQueryError, match="utf8mb4_general_ci"):
                    s.execute(stmt).all()
                s.rollback()
        answered: list[Any] = [
            select(City.name).order_by(City.name.collate("utf8mb4_bin")).limit(6),
            select(City.id).order_by(City.id.desc()).limit(5),
        ]
        for stmt in answered:
            fanned, one = _both(cluster, functools.partial(_all_rows, stmt))
            assert fanned == one
    finally:
        cluster.dispose()


def test_mariadb_table_with_its_own_binary_collation(databases: DatabaseFactory) -> None:
    # the database default is utf8mb4_general_ci, the table's utf8mb4_bin: the column decides
    create = "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
    urls = {alias: _server_db(databases, "mysql", create) for alias in ["default", *SHARDS, "one"]}
    from sqlalchemy import Column, Integer, MetaData, Table

    md = MetaData()
    Table(
        "r12_cities",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(40)),
        Column("continent", String(40)),
        Column("seen", DateTime),
        mysql_collate="utf8mb4_bin",
    )
    cluster, _ = _build(urls, md)
    t = md.tables["r12_cities"]
    try:
        stmt = select(t.c.name, t.c.id).order_by(t.c.name, t.c.id).limit(9)
        counted = select(func.count()).select_from(select(t.c.continent).distinct().subquery())
        with cluster.session() as s, cluster.session(using="one") as one:
            assert s.execute(stmt.execution_options(shardkit_using=SHARDS)).all() == one.execute(stmt).all()
            assert s.execute(counted.execution_options(shardkit_using=SHARDS)).scalar() == 4
            assert one.execute(counted).scalar() == 4
    finally:
        cluster.dispose()


def test_native_enum_order_is_refused_on_postgresql(databases: DatabaseFactory) -> None:
    # PostgreSQL orders a native ENUM by its declaration, the merge would by name
    from sqlalchemy import Column, Enum, Integer, MetaData, Table, cast

    md = MetaData()
    t = Table(
        "r12_levels",
        md,
        Column("id", Integer, primary_key=True),
        Column("lvl", Enum("low", "mid", "high", name="r12_lvl")),
    )
    cluster = shardkit.Cluster(databases.urls("postgresql", "default", *SHARDS))
    try:
        for alias in SHARDS:
            md.create_all(cluster.engine(alias))
            with cluster.engine(alias).begin() as conn:
                conn.execute(insert(t), [{"id": i, "lvl": ["low", "mid", "high"][i % 3]} for i in range(4)])
        on = {"shardkit_using": SHARDS}
        with cluster.session() as s:
            with pytest.raises(UnsupportedQueryError, match="native ENUM"):
                s.execute(select(t.c.lvl).order_by(t.c.lvl).execution_options(**on)).all()
            by_name = s.execute(select(t.c.lvl).order_by(cast(t.c.lvl, String)).execution_options(**on)).scalars().all()
            assert by_name == ["high"] * 3 + ["low"] * 6 + ["mid"] * 3
            assert sorted(s.execute(select(t.c.lvl).distinct().execution_options(**on)).scalars()) == [
                "high",
                "low",
                "mid",
            ]
    finally:
        cluster.dispose()


def test_nondeterministic_postgresql_collation_is_refused_for_groups(databases: DatabaseFactory) -> None:
    # equality under a collation made "deterministic = false" is not byte equality: 'a' = 'A'
    urls = databases.urls("postgresql", "default", *SHARDS, "one")
    engine = create_engine(urls["one"])
    with engine.connect() as conn:
        icu = conn.execute(text("SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'")).scalar()
    engine.dispose()
    if not icu:
        pytest.skip("this PostgreSQL has no ICU collations")
    cluster, _ = _build(urls)
    try:
        for alias in [*SHARDS, "one"]:
            with cluster.engine(alias).begin() as conn:
                conn.execute(
                    text("CREATE COLLATION r12_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
                )
                conn.execute(text("ALTER TABLE r12_cities ALTER COLUMN name TYPE varchar(40) COLLATE r12_ci"))
        with cluster.session() as s:
            for refused in (
                select(City.name).group_by(City.name),
                select(City.name).distinct(),
                select(City.continent.collate("r12_ci")).distinct(),
                select(City.name).order_by(City.name).limit(3),
            ):
                with pytest.raises(UnsupportedQueryError, match="r12_ci"):
                    s.execute(refused).all()
                s.rollback()
        grouped = select(City.continent, func.count()).group_by(City.continent).order_by(City.continent)
        fanned, one = _both(cluster, functools.partial(_all_rows, grouped))
        assert fanned == one and len(fanned) == 4
    finally:
        cluster.dispose()
