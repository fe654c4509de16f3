"""Django's async manager methods (``aget``, ``acreate``, ``asave`` ...) route as their sync twins.

The same test bodies serve both APIs: each operation is written once against ``call(target,
"get", ...)``, which is ``target.get(...)`` for the sync run and ``await target.aget(...)`` for the
async one.  Both runs start from the same rows and must make the same router calls, run the same
statements on the same aliases and give the same results; the async run must do its I/O on the
async engines only (aiosqlite, asyncpg, psycopg 3, aiomysql), never on the sync ones.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import MissingGreenlet, StatementError

import shardkit
from shardkit._amanager import arun, async_cluster
from shardkit.errors import RouterError, ShardkitError
from tests.conftest import MYSQL_URL, PG_URL, DatabaseFactory, require_server
from tests.django_suite.conftest import override_routers
from tests.django_suite.models import Base, Book, Person, User
from tests.django_suite.routers import AuthRouter, TestRouter

Call = Callable[..., Awaitable[Any]]


# -- harness -------------------------------------------------------------------------------------


def run(cluster: shardkit.Cluster, main: Callable[[], Awaitable[Any]]) -> Any:
    """``asyncio.run(main())``, the cluster's async engines closed before the loop ends."""

    async def wrapper() -> Any:
        try:
            return await main()
        finally:
            await cluster.adispose()

    return asyncio.run(wrapper())


async def sync_call(target: Any, method: str, /, *args: Any, **kwargs: Any) -> Any:
    if method == "iter":
        return list(target)
    return getattr(target, method)(*args, **kwargs)


async def async_call(target: Any, method: str, /, *args: Any, **kwargs: Any) -> Any:
    if method == "iter":
        return [obj async for obj in target]
    return await getattr(target, f"a{method}")(*args, **kwargs)


class Recorder:
    """A router that records every question asked of it and lets ``inner`` answer."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[Any, ...]] = []

    def _record(self, method: str, model: Any, hints: dict[str, Any]) -> None:
        instance = hints.get("instance")
        where = shardkit.db_of(instance) if instance is not None else None
        self.calls.append((method, getattr(model, "__name__", model), tuple(sorted(hints)), where))

    def db_for_read(self, model: Any, **hints: Any) -> Any:
        self._record("db_for_read", model, hints)
        method = getattr(self.inner, "db_for_read", None)
        return method(model, **hints) if method else None

    def db_for_write(self, model: Any, **hints: Any) -> Any:
        self._record("db_for_write", model, hints)
        method = getattr(self.inner, "db_for_write", None)
        return method(model, **hints) if method else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> Any:
        method = getattr(self.inner, "allow_relation", None)
        return method(obj1, obj2, **hints) if method else None


class Statements:
    """(alias, first SQL word) of every statement the engines of ``cluster`` run."""

    def __init__(self, cluster: shardkit.Cluster) -> None:
        self.seen: list[tuple[str, str]] = []
        self._hooks: list[tuple[Any, Any]] = []
        for alias in cluster.aliases:
            engine = cluster.engine(alias)
            hook = self._hook(alias)
            event.listen(engine, "before_cursor_execute", hook)
            self._hooks.append((engine, hook))

    def _hook(self, alias: str) -> Callable[..., None]:
        def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            word = statement.split(None, 1)[0].upper()
            if word not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"):
                self.seen.append((alias, word))

        return hook

    def remove(self) -> None:
        for engine, hook in self._hooks:
            event.remove(engine, "before_cursor_execute", hook)


def _plain(value: Any) -> Any:
    """A result, comparable between runs: objects as (class, name, db); primary keys are not compared
    (a PostgreSQL sequence is not reset between the runs)."""
    if isinstance(value, Person | Book):
        return (type(value).__name__, value.name if isinstance(value, Person) else value.title, shardkit.db_of(value))
    if isinstance(value, User):
        return ("User", value.username, shardkit.db_of(value))
    if isinstance(value, dict):
        return sorted((k, _plain(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _seed(cluster: shardkit.Cluster) -> None:
    """The same rows before each run: Marty (id 101) on default, Mark (id 102) on other, and a
    user alice on both."""
    for alias in cluster.aliases:
        with cluster.engine(alias).begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
            name, pk = ("Marty", 101) if alias == "default" else ("Mark", 102)
            conn.execute(Person.__table__.insert().values(id=pk, name=name))
            conn.execute(User.__table__.insert().values(id=201, username="alice", email=alias))


@pytest.fixture(params=["aiosqlite", "asyncpg", "psycopg", "aiomysql"])
def driver(request: pytest.FixtureRequest) -> str:
    """The async driver: SQLite files on aiosqlite, PostgreSQL databases on asyncpg and on psycopg 3,
    MariaDB/MySQL databases on aiomysql."""
    name: str = request.param
    return name


@pytest.fixture
def backend(driver: str) -> str:
    if driver == "aiosqlite":
        return "sqlite"
    if driver == "aiomysql":
        require_server(MYSQL_URL, "mysql")
        return "mysql"
    require_server(PG_URL, "pg")
    return "postgresql"


@pytest.fixture
def multidb(databases: DatabaseFactory, backend: str, driver: str) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(databases.urls(backend, "default", "other"), async_driver=driver)
    cluster.create_all(Base)
    with cluster.activate():
        yield cluster
    cluster.dispose()


# -- every async method routes as its sync twin -----------------------------------------------------

Op = Callable[[Call], Awaitable[Any]]


async def op_get(call: Call) -> Any:
    return await call(Person.objects, "get", name="Mark")


async def op_get_missing(call: Call) -> Any:
    try:
        await call(Person.objects, "get", name="Nobody")
    except Person.DoesNotExist as exc:
        return type(exc).__name__
    raise AssertionError("no DoesNotExist")


async def op_create(call: Call) -> Any:
    return await call(Person.objects, "create", name="New")


async def op_get_or_create_existing(call: Call) -> Any:
    return await call(Person.objects, "get_or_create", name="Marty")


async def op_get_or_create_new(call: Call) -> Any:
    return await call(Person.objects, "get_or_create", name="Mark")  # reads the write db: not there


async def op_update_or_create(call: Call) -> Any:
    first = await call(Person.objects, "update_or_create", defaults={"name": "Marty II"}, name="Marty")
    second = await call(Person.objects, "update_or_create", defaults={"name": "x"}, name="Zed")
    return first, second, await call(Person.objects.using("default"), "iter")


async def op_count_exists(call: Call) -> Any:
    return (
        await call(Person.objects, "count"),
        await call(Person.objects.using("default"), "count"),
        await call(Person.objects.filter(name="Marty"), "exists"),
        await call(Person.objects.filter(name="Mark"), "exists"),
    )


async def op_first_last(call: Call) -> Any:
    return (
        await call(Person.objects, "first"),
        await call(Person.objects.using("default"), "last"),
        await call(Person.objects.filter(name="x"), "first"),
    )


async def op_in_bulk(call: Call) -> Any:
    return (
        await call(Person.objects, "in_bulk", [101, 102]),
        await call(Person.objects.using("default"), "in_bulk", [101, 102]),
        await call(Person.objects, "in_bulk", ["Mark"], field_name="name"),
        await call(Person.objects, "in_bulk", []),
    )


async def op_update(call: Call) -> Any:
    changed = await call(Person.objects.filter(name="Marty"), "update", name="Marty B")
    return changed, await call(Person.objects.using("default"), "iter")


async def op_delete(call: Call) -> Any:
    deleted = await call(Person.objects.filter(name="Marty"), "delete")  # read and deleted on the write db
    return deleted, await call(Person.objects.using("default"), "count"), await call(Person.objects, "count")


async def op_bulk_create(call: Call) -> Any:
    made = await call(Person.objects, "bulk_create", [Person(name="b1"), Person(name="b2")])
    there = await call(Person.objects.using("other").filter(name__startswith="b"), "iter")
    return made, there, await call(Person.objects.using("default").order_by("name"), "iter")


async def op_iterate(call: Call) -> Any:
    return await call(Person.objects.all(), "iter"), await call(Person.objects.using("default"), "iter")


async def op_db_manager(call: Call) -> Any:
    made = await call(Person.objects.db_manager("other"), "create", name="Elsewhere")
    read = await call(Person.objects.db_manager("default"), "get", name="Marty")
    return made, read, await call(Person.objects, "count")  # the routers again: other


async def op_save_using(call: Call) -> Any:
    marty = await call(Person.objects.using("default"), "get", name="Marty")
    marty.name = "Marty Moved"
    await call(marty, "save", using="other")
    await call(marty, "save")  # now routed: db_for_write(instance=marty) says default
    return marty, await call(Person.objects.using("other"), "iter"), await call(Person.objects.all(), "iter")


async def op_save_routed(call: Call) -> Any:
    person = Person(name="Routed")
    await call(person, "save")
    person.name = "Routed again"
    await call(person, "save")
    return person, await call(Person.objects.using("default"), "iter")


async def op_delete_using(call: Call) -> Any:
    marty = await call(Person.objects.using("default"), "get", name="Marty")
    await call(marty, "delete", using="default")
    return await call(Person.objects.using("default"), "count")


async def op_refresh(call: Call) -> Any:
    mark = await call(Person.objects.using("other"), "get", name="Mark")
    await call(Person.objects.using("other").filter(name="Mark"), "update", name="Mark 2")
    await call(mark, "refresh_from_db")
    first = mark.name, shardkit.db_of(mark)
    try:
        await call(mark, "refresh_from_db", using="default")  # no row with its key there
    except Exception as exc:
        return first, type(exc).__name__
    return first


async def op_auth_router(call: Call) -> Any:
    made = await call(User.objects, "create", username="bob")  # auth writes go to other
    read = await call(User.objects, "get", username="alice")  # auth reads go to default
    return made, read, read.email, await call(User.objects.using("other"), "count")


OPS: list[tuple[Op, list[Any]]] = [
    (op_get, [TestRouter()]),
    (op_get_missing, [TestRouter()]),
    (op_create, [TestRouter()]),
    (op_get_or_create_existing, [TestRouter()]),
    (op_get_or_create_new, [TestRouter()]),
    (op_update_or_create, [TestRouter()]),
    (op_count_exists, [TestRouter()]),
    (op_first_last, [TestRouter()]),
    (op_in_bulk, [TestRouter()]),
    (op_update, [TestRouter()]),
    (op_delete, [TestRouter()]),
    (op_bulk_create, [AuthRouter()]),
    (op_iterate, [TestRouter()]),
    (op_db_manager, [TestRouter()]),
    (op_save_using, [TestRouter()]),
    (op_save_routed, [TestRouter()]),
    (op_delete_using, [TestRouter()]),
    (op_refresh, [TestRouter()]),
    (op_auth_router, [AuthRouter()]),
]


def _run_once(cluster: shardkit.Cluster, op: Op, routers: list[Any], call: Call) -> tuple[Any, ...]:
    _seed(cluster)
    recorder = Recorder(routers[0])
    sync_log = Statements(cluster)
    async_log = Statements(async_cluster(cluster)) if call is async_call else None
    try:
        with override_routers(cluster, [recorder, *routers[1:]]):

            async def main() -> Any:
                try:
                    return ("ok", _plain(await op(call)))
                except RouterError:
                    raise
                except ShardkitError as exc:
                    return ("error", type(exc).__name__)

            result = run(cluster, main) if call is async_call else asyncio.run(main())
    finally:
        sync_log.remove()
        if async_log is not None:
            async_log.remove()
    if async_log is not None:
        assert sync_log.seen == [], f"the async run used the sync engines: {sync_log.seen}"
        return result, recorder.calls, async_log.seen
    return result, recorder.calls, sync_log.seen


@pytest.mark.parametrize("op, routers", OPS, ids=[op.__name__[3:] for op, _ in OPS])
def test_async_method_routes_as_sync_twin(multidb: shardkit.Cluster, op: Op, routers: list[Any]) -> None:
    sync_result, sync_calls, sync_statements = _run_once(multidb, op, routers, sync_call)
    async_result, async_calls, async_statements = _run_once(multidb, op, routers, async_call)
    assert async_result == sync_result
    assert async_calls == sync_calls  # the same router questions, with the same hints
    assert async_statements == sync_statements  # the same statements on the same aliases
    assert sync_calls, "the operation asked the routers nothing: it proves nothing"


def test_async_io_goes_through_async_driver(multidb: shardkit.Cluster, driver: str) -> None:
    twin = async_cluster(multidb)
    drivers = {twin.engine(alias).dialect.driver for alias in multidb.aliases}
    assert drivers == {driver}
    assert all(twin.engine(alias).dialect.is_async for alias in multidb.aliases)


# -- behaviour ------------------------------------------------------------------------------------------


def test_asave_using_other_and_back(multidb: shardkit.Cluster) -> None:
    async def main() -> None:
        person = await Person.objects.acreate(name="Traveller")
        assert shardkit.db_of(person) == "default"
        person.name = "Traveller 2"
        await person.asave(using="other")
        assert shardkit.db_of(person) == "other"
        assert await Person.objects.using("other").filter(name="Traveller 2").acount() == 1
        assert await Person.objects.using("default").filter(name="Traveller").acount() == 1  # Django: a copy
        await person.adelete(using="default")  # the row with its key on default
        assert await Person.objects.using("default").filter(name="Traveller").aexists() is False
        assert await Person.objects.using("other").filter(name="Traveller 2").aexists() is True
        await person.adelete()  # from where it lives now
        assert await Person.objects.using("other").filter(name="Traveller 2").aexists() is False

    run(multidb, main)


def test_router_raising_propagates_and_next_call_works(multidb: shardkit.Cluster) -> None:
    class Broken(Exception):
        pass

    class RaisingRouter:
        fail = True

        def db_for_write(self, model: Any, **hints: Any) -> Any:
            if self.fail:
                raise Broken("the lookup table is down")
            return None

    router = RaisingRouter()
    with override_routers(multidb, [router]):

        async def main() -> None:
            with pytest.raises(Broken):  # as the sync create() raises it: not wrapped, not swallowed
                await Person.objects.acreate(name="Nope")
            person = Person(name="Nope 2")
            with pytest.raises(Broken):
                await person.asave()
            assert shardkit.db_of(person) is None  # a failed save leaves the object as it was
            router.fail = False
            made = await Person.objects.acreate(name="Yes")  # the failed call rolled back
            assert shardkit.db_of(made) == "default"
            assert await Person.objects.filter(name__startswith="Nope").acount() == 0

        run(multidb, main)

    with override_routers(multidb, [RaisingRouter()]), pytest.raises(Broken):
        Person.objects.create(name="sync twin raises the same")


def test_unknown_alias_raises_shardkit_error(multidb: shardkit.Cluster) -> None:
    async def main() -> None:
        with pytest.raises(ShardkitError, match="nowhere"):
            await Person.objects.using("nowhere").acount()
        with pytest.raises(ShardkitError, match="nowhere"):
            await Person(name="x").asave(using="nowhere")

    run(multidb, main)


def test_concurrent_tasks_each_get_their_own_session(multidb: shardkit.Cluster) -> None:
    async def one(i: int) -> tuple[str | None, str | None]:
        made = await Person.objects.db_manager("other" if i % 2 else "default").acreate(name=f"p{i}")
        again = await Person.objects.using(shardkit.db_of(made) or "default").aget(name=f"p{i}")
        return shardkit.db_of(made), shardkit.db_of(again)

    async def main() -> list[tuple[str | None, str | None]]:
        return list(await asyncio.gather(*(one(i) for i in range(40))))

    results = run(multidb, main)
    assert results == [(("other", "other") if i % 2 else ("default", "default")) for i in range(40)]
    assert Person.objects.using("default").filter(name__startswith="p").count() == 20
    assert Person.objects.using("other").filter(name__startswith="p").count() == 20


def test_objects_stay_loaded_and_sync_code_can_use_them(multidb: shardkit.Cluster) -> None:
    async def main() -> Any:
        return await Person.objects.using("other").acreate(name="Loaded")

    person = run(multidb, main)
    assert person.name == "Loaded" and shardkit.db_of(person) == "other"
    person.name = "Loaded, saved by sync code"
    person.save()  # outside the loop: the sync engines, as any object of the active cluster
    assert Person.objects.using("other").get(pk=person.pk).name == "Loaded, saved by sync code"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # asyncpg's unawaited cursor()
def test_relationships_load_with_select_related(multidb: shardkit.Cluster) -> None:
    """A relationship read in the same query comes back loaded; inside a greenlet (``arun``) a lazy
    load is async I/O; outside, on a task's own session, it is refused (``MissingGreenlet``)."""

    async def main() -> None:
        marty = await Person.objects.acreate(name="Marty")
        await Book.objects.acreate(title="Dive", published=datetime.date(2009, 5, 4), editor=marty)
        loaded = await Book.objects.using("default").select_related("editor").aget(title="Dive")
        assert loaded.editor is not None and loaded.editor.name == "Marty"
        book = await Book.objects.using("default").aget(title="Dive")
        editor = await arun(lambda: book.editor)
        assert editor is not None and editor.name == "Marty"
        async with multidb.async_session() as session:
            other = (await session.scalars(select(Book))).one()
            with pytest.raises((MissingGreenlet, StatementError), match="greenlet_spawn has not been called"):
                _ = other.editor
        gc.collect()  # the driver's unawaited coroutine is reported here, not in the next test

    run(multidb, main)


def test_values_and_aiterator(multidb: shardkit.Cluster) -> None:
    async def main() -> None:
        await Person.objects.abulk_create([Person(name=n) for n in ("c", "a", "b")])
        names = [row async for row in Person.objects.using("default").values_list("name", flat=True)]
        assert names == ["a", "b", "c"]  # Meta.ordering
        assert [p.name async for p in Person.objects.using("default").aiterator()] == ["a", "b", "c"]
        assert [p.name async for p in Person.objects] == ["a", "b", "c"]

    run(multidb, main)


def test_async_engines_given_in_databases(databases: DatabaseFactory, backend: str, driver: str) -> None:
    """A cluster made of async engines' ``sync_engine`` needs no twin: the manager uses it as it is."""
    from sqlalchemy.ext.asyncio import create_async_engine

    sync_urls = databases.urls(backend, "default", "other")
    setup = shardkit.Cluster(sync_urls)
    setup.create_all(Base)
    setup.dispose()
    drivername = f"{backend}+{driver}"
    from sqlalchemy import make_url

    async def main() -> None:
        engines = {a: create_async_engine(make_url(u).set(drivername=drivername)) for a, u in sync_urls.items()}
        cluster = shardkit.Cluster({a: e.sync_engine for a, e in engines.items()}, [TestRouter()])
        assert async_cluster(cluster) is cluster
        try:
            with cluster.activated():
                made = await Person.objects.acreate(name="Direct")
                assert shardkit.db_of(made) == "default"
                assert await Person.objects.using("default").acount() == 1
                assert await Person.objects.acount() == 0  # TestRouter reads other
        finally:
            for engine in engines.values():
                await engine.dispose()

    asyncio.run(main())


def test_no_active_cluster_is_a_config_error() -> None:
    from shardkit import _cluster
    from shardkit.errors import ConfigError

    previous = _cluster._active_global
    _cluster._active_global = None
    try:
        with pytest.raises(ConfigError, match="no active shardkit cluster"):
            asyncio.run(Person.objects.acount())
    finally:
        _cluster._active_global = previous


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_cancelled_call_returns_connection(multidb: shardkit.Cluster) -> None:
    """A task cancelled while its query runs: the call's session rolls back, its connection goes
    back to the pool, and the next call works."""

    async def main() -> None:
        await Person.objects.using("default").acreate(name="one row for pg_sleep to run on")
        slow = Person.objects.using("default").filter(text("pg_sleep(5) IS NOT NULL"))
        task = asyncio.ensure_future(slow.acount())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = asyncio.get_running_loop().time()
        assert await Person.objects.using("default").acount() == 1
        assert asyncio.get_running_loop().time() - started < 2  # the connection is not stuck in pg_sleep
        pool = async_cluster(multidb).engine("default").pool
        assert pool.checkedout() == 0  # type: ignore[attr-defined]

    run(multidb, main)


def test_related_managers(multidb: shardkit.Cluster) -> None:
    """``aadd``/``aremove``/``aclear``/``aset``/``acreate`` on a related manager and on a loaded list,
    routed as the sync ones: the link rows on the owner's database, a cross-database add refused."""
    from shardkit._manager import RelatedManager
    from shardkit.errors import RelationError

    async def main() -> None:
        book = await Book.objects.using("other").acreate(title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = await Person.objects.using("other").acreate(name="Marty")
        authors = RelatedManager.of(book, "authors")
        await authors.aadd(marty)
        assert [p.name async for p in authors.all()] == ["Marty"]
        assert await authors.acount() == 1 and await authors.aexists()
        george = await authors.acreate(name="George")  # on the book's database, linked
        assert shardkit.db_of(george) == "other"
        loaded = await Book.objects.using("other").prefetch_related("authors").aget(title="Pro Django")
        assert sorted(p.name for p in loaded.authors) == ["George", "Marty"]
        await loaded.authors.aremove(george)
        assert (await loaded.authors.aget(name="Marty")).name == "Marty"
        await authors.aset([george])
        assert [p.name async for p in authors.all()] == ["George"]
        await authors.aclear()
        assert await authors.acount() == 0
        elsewhere = await Person.objects.using("default").acreate(name="Default person")
        with pytest.raises(RelationError):  # as the sync add(): another database
            await authors.aadd(elsewhere)

    run(multidb, main)


def test_objects_of_an_async_session_are_saved_through_it(multidb: shardkit.Cluster) -> None:
    """Inside ``async with cluster.async_session() as s`` the manager uses ``s`` (the task's current
    session, as ``with cluster.session()`` is the thread's): ``asave()``/``adelete()``/``acount()``
    flush and read in its transaction; its commit makes them stick, its rollback undoes them."""

    async def main() -> None:
        await Person.objects.using("default").acreate(name="Kept")
        async with multidb.async_session(expire_on_commit=False) as session:
            kept = (await session.scalars(select(Person).where(Person.name == "Kept"))).one()
            kept.name = "Kept, moved"
            await kept.asave(using="other")
            assert shardkit.db_of(kept) == "other"
            assert await Person.objects.using("other").acount() == 1  # in the session's transaction
            await session.commit()
        assert [p.name async for p in Person.objects.using("other").all()] == ["Kept, moved"]
        async with multidb.async_session() as session:
            stmt = select(Person).where(Person.name == "Kept, moved").options(shardkit.using("other"))
            gone = (await session.scalars(stmt)).one()
            await gone.adelete(using="other")
            assert await Person.objects.using("other").acount() == 0
            made = await Person.objects.using("other").acreate(name="Never committed")
            assert shardkit.db_of(made) == "other"
            await session.rollback()  # the delete and the create were only flushed: rolled back
        assert [p.name async for p in Person.objects.using("other").all()] == ["Kept, moved"]

    run(multidb, main)
