"""Django's async manager methods (``aget``, ``acreate``, ``asave`` ...), routed as their sync twins.

Each ``a``-method runs its sync twin inside a SQLAlchemy greenlet (:func:`greenlet_spawn`, what
``AsyncSession.run_sync`` does), so the router chain, ``using()``, ``db_manager()`` and the
session code are the very ones of the sync API, not copies; only the I/O differs: it goes
through the async drivers (asyncpg, psycopg 3, aiosqlite, aiomysql) and awaits on the loop.

Which session an ``a``-method uses, as its sync twin would:

* an object that belongs to a session is saved, deleted and refreshed through it;
* else the task's current session (``async with cluster.async_session() as s:`` makes ``s``
  current for the task, as ``with cluster.session()`` does for a thread): the method only
  flushes and you ``await s.commit()``;
* else, as Django outside ``transaction.atomic()``, each evaluation gets a session of its own
  on the active cluster's *async* engines and commits at once.

Objects come back loaded (``expire_on_commit=False``).  Load relationships in the same call
(``select_related()`` / ``prefetch_related()``): reading one that was not loaded is a lazy load
outside any ``await``; on an object of an async session SQLAlchemy refuses it
(``MissingGreenlet``, as Django raises ``SynchronousOnlyOperation``), on one the manager returned
it runs on the sync engines of the active cluster and blocks the loop while it does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy.orm import object_session
from sqlalchemy.util import greenlet_spawn

from ._async import AsyncClusterView, cluster_view
from ._cluster import Cluster, get_active_cluster
from ._session import current_session
from .errors import ShardkitError

if TYPE_CHECKING:
    from ._manager import Manager, QuerySet

__all__ = [
    "AsyncManagerMixin",
    "AsyncModelMixin",
    "AsyncQuerySetMixin",
    "AsyncRelatedManagerMixin",
    "arun",
    "async_cluster",
]

M = TypeVar("M")
T = TypeVar("T")

# -- the cluster of the async engines ------------------------------------------------------------


def async_cluster(cluster: Cluster) -> Cluster:
    """The cluster the async methods make their sessions on: ``cluster`` itself when its engines
    are async already (DATABASES of async engines' ``sync_engine``), else its async view (the
    same routers and settings, read through; the engines of ``cluster.async_engine()``, closed
    by ``await cluster.adispose()``), which ``cluster.async_session()`` uses too."""
    if isinstance(cluster, AsyncClusterView):
        return cast(Cluster, cluster)
    specs = [cluster.spec(alias) for alias in cluster.aliases]
    if all(spec.engine is not None and spec.engine.dialect.is_async for spec in specs):
        return cluster
    return cast(Cluster, cluster_view(cluster))  # its class subclasses the cluster's


# -- running a sync twin on the loop --------------------------------------------------------------


def _in_greenlet(fn: Callable[..., T], obj: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> T:
    """Run ``fn`` where its sessions do async I/O: the task's current session as
    it is; else the active cluster is its async twin for the call, so the sessions the manager makes
    (and an object's call session, which follows the active cluster) do their I/O on the loop."""
    if current_session() is not None:
        return fn(*args, **kwargs)
    try:
        active = get_active_cluster()
    except ShardkitError:
        if obj is None or object_session(obj) is None:
            raise
        return fn(*args, **kwargs)  # no active cluster, but the object's session knows its own
    with async_cluster(active).activated():
        return fn(*args, **kwargs)


async def arun(fn: Callable[..., T], *args: Any, obj: Any = None, **kwargs: Any) -> T:
    """``await arun(fn, ...)``: run a sync manager call (``fn(*args, **kwargs)``) on the event loop,
    as its async twin does; ``obj`` is the model instance it works on, if any."""
    return await greenlet_spawn(_in_greenlet, fn, obj, args, kwargs)


# -- sync twins Django has that the sync API lacked --------------------------------------------------


def _in_bulk(qs: QuerySet[Any], id_list: Iterable[Any] | None, field_name: str) -> dict[Any, Any]:
    if id_list is not None:
        ids = list(id_list)
        if not ids:
            return {}
        qs = qs.filter(**{f"{field_name}__in": ids})
    return {getattr(obj, "pk" if field_name == "pk" else field_name): obj for obj in qs}


def _bulk_create(qs: QuerySet[Any], objs: Iterable[Any]) -> list[Any]:
    from ._manager import _session_scope

    objs = list(objs)
    for obj in objs:
        if not isinstance(obj, qs.model):
            raise ShardkitError(f"bulk_create() of {qs.model.__name__} got a {type(obj).__name__}", model=qs.model)
    if not objs:
        return objs
    with _session_scope() as session:
        for obj in objs:  # each goes where save(obj, using=...) puts it: one INSERT batch per shard
            session.save(obj, using=qs._db, force_insert=True)
        session.flush()
    return objs


def _update_or_create(
    qs: QuerySet[M], defaults: dict[str, Any] | None, create_defaults: dict[str, Any] | None, lookups: dict[str, Any]
) -> tuple[M, bool]:
    from ._manager import save

    update_defaults = defaults or {}
    obj, created = qs.get_or_create(update_defaults if create_defaults is None else create_defaults, **lookups)
    if created:
        return obj, True
    for key, value in update_defaults.items():
        setattr(obj, key, value() if callable(value) else value)
    save(obj, using=qs._db)
    return obj, False


# -- mixins --------------------------------------------------------------------------------------------


class AsyncQuerySetMixin(Generic[M]):
    """Django's async QuerySet methods; each awaits its sync twin run on the event loop."""

    def _qs(self) -> QuerySet[M]:
        return self  # type: ignore[return-value]

    # Django methods the sync API gained with their async twins
    def in_bulk(self, id_list: Iterable[Any] | None = None, *, field_name: str = "pk") -> dict[Any, M]:
        """``{value of field_name: object}`` for the objects whose ``field_name`` is in ``id_list``
        (every object when ``None``), as Django's ``in_bulk()``."""
        return _in_bulk(self._qs(), id_list, field_name)

    def bulk_create(self, objs: Iterable[M], batch_size: int | None = None) -> list[M]:
        """Insert every object, each on the database ``save(obj, using=...)`` would write it to
        (``using()``'s, else the routers' for the instance), one flush: one INSERT batch per
        database.  Always INSERTs, as Django's; returns ``objs``.  ``batch_size`` is accepted
        for Django's signature (SQLAlchemy batches by itself)."""
        return _bulk_create(self._qs(), objs)

    def update_or_create(
        self, defaults: dict[str, Any] | None = None, create_defaults: dict[str, Any] | None = None, **lookups: Any
    ) -> tuple[M, bool]:
        """As Django's: ``get_or_create()`` on the write database, then, when it existed, set
        ``defaults`` on it (a callable is called) and save it where it lives.  ``create_defaults``
        (else ``defaults``) are the values of a created object.  Unlike Django's, the row is not
        locked (no ``SELECT ... FOR UPDATE``) between the read and the save: inside a session
        block both are in its transaction, outside they are two calls."""
        return _update_or_create(self._qs(), defaults, create_defaults, lookups)

    # the async methods
    async def aget(self, *criteria: Any, **lookups: Any) -> M:
        return await arun(self._qs().get, *criteria, **lookups)

    async def acreate(self, **fields: Any) -> M:
        return await arun(self._qs().create, **fields)

    async def aget_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[M, bool]:
        return await arun(self._qs().get_or_create, defaults, **lookups)

    async def aupdate_or_create(
        self, defaults: dict[str, Any] | None = None, create_defaults: dict[str, Any] | None = None, **lookups: Any
    ) -> tuple[M, bool]:
        return await arun(self.update_or_create, defaults, create_defaults, **lookups)

    async def acount(self) -> int:
        return await arun(self._qs().count)

    async def aexists(self) -> bool:
        return await arun(self._qs().exists)

    async def afirst(self) -> M | None:
        return await arun(self._qs().first)

    async def alast(self) -> M | None:
        return await arun(self._qs().last)

    async def ain_bulk(self, id_list: Iterable[Any] | None = None, *, field_name: str = "pk") -> dict[Any, M]:
        return await arun(self.in_bulk, id_list, field_name=field_name)

    async def adelete(self) -> int:
        return await arun(self._qs().delete)

    async def aupdate(self, **values: Any) -> int:
        return await arun(self._qs().update, **values)

    async def abulk_create(self, objs: Iterable[M], batch_size: int | None = None) -> list[M]:
        return await arun(self.bulk_create, objs, batch_size)

    async def _afetch(self) -> list[M]:
        qs = self._qs()
        return await arun(qs._fetch)

    def __aiter__(self) -> AsyncIterator[M]:
        """``async for obj in qs``: the rows are read on the loop, then yielded (Django's ``__aiter__``)."""

        async def rows() -> AsyncIterator[M]:
            for obj in await self._afetch():
                yield obj

        return rows()

    def aiterator(self, chunk_size: int = 2000) -> AsyncIterator[M]:
        """Django's ``aiterator()``: ``async for obj in qs.aiterator()``.  The rows are read in one
        go, as ``async for obj in qs`` does; for a result bounded by a batch, stream it from an
        async session (``await s.stream(stmt.execution_options(yield_per=n))``)."""
        return self.__aiter__()


class AsyncManagerMixin(Generic[M]):
    """The async methods on ``Model.objects`` (and ``db_manager()``'s managers): each calls the
    manager's own sync method on the loop, so an overridden ``create()`` is honoured."""

    def _m(self) -> Manager[M]:
        return self  # type: ignore[return-value]

    def in_bulk(self, id_list: Iterable[Any] | None = None, *, field_name: str = "pk") -> dict[Any, M]:
        return self._m().get_queryset().in_bulk(id_list, field_name=field_name)

    def bulk_create(self, objs: Iterable[M], batch_size: int | None = None) -> list[M]:
        return self._m().get_queryset().bulk_create(objs, batch_size)

    def update_or_create(
        self, defaults: dict[str, Any] | None = None, create_defaults: dict[str, Any] | None = None, **lookups: Any
    ) -> tuple[M, bool]:
        return self._m().get_queryset().update_or_create(defaults, create_defaults, **lookups)

    async def aget(self, *criteria: Any, **lookups: Any) -> M:
        return await arun(self._m().get, *criteria, **lookups)

    async def acreate(self, **fields: Any) -> M:
        return await arun(self._m().create, **fields)

    async def aget_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[M, bool]:
        return await arun(self._m().get_or_create, defaults, **lookups)

    async def aupdate_or_create(
        self, defaults: dict[str, Any] | None = None, create_defaults: dict[str, Any] | None = None, **lookups: Any
    ) -> tuple[M, bool]:
        return await arun(self.update_or_create, defaults, create_defaults, **lookups)

    async def acount(self) -> int:
        return await arun(self._m().count)

    async def aexists(self) -> bool:
        return await arun(self._m().exists)

    async def afirst(self) -> M | None:
        return await arun(self._m().first)

    async def alast(self) -> M | None:
        return await arun(self._m().last)

    async def ain_bulk(self, id_list: Iterable[Any] | None = None, *, field_name: str = "pk") -> dict[Any, M]:
        return await arun(self.in_bulk, id_list, field_name=field_name)

    async def adelete(self) -> int:
        return await arun(self._m().delete)

    async def aupdate(self, **values: Any) -> int:
        return await arun(self._m().update, **values)

    async def abulk_create(self, objs: Iterable[M], batch_size: int | None = None) -> list[M]:
        return await arun(self.bulk_create, objs, batch_size)

    def __aiter__(self) -> AsyncIterator[M]:
        """``async for obj in Model.objects``: every object (Django needs ``.all()``; both work)."""
        return self._m().get_queryset().__aiter__()


class AsyncRelatedManagerMixin:
    """Django's async related-manager methods, on related managers and on the lists of
    ``ModelMixin`` relationships: ``await book.authors.aadd(person)`` ...; each runs the sync
    method (with its relation checks and routing) on the loop.  A list that was not loaded is
    loaded by the attribute access itself, before the call: load it with the object
    (``prefetch_related("authors")``) or use ``RelatedManager.of(book, "authors")``."""

    async def acreate(self, **fields: Any) -> Any:
        return await arun(self.create, **fields)  # type: ignore[attr-defined]

    async def aget_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[Any, bool]:
        return await arun(self.get_or_create, defaults, **lookups)  # type: ignore[attr-defined]

    async def aget(self, *criteria: Any, **lookups: Any) -> Any:
        return await arun(self.get, *criteria, **lookups)  # type: ignore[attr-defined]

    async def acount(self) -> int:
        count: int = await arun(self.count)  # type: ignore[attr-defined]
        return count

    async def aexists(self) -> bool:
        exists: bool = await arun(self.exists)  # type: ignore[attr-defined]
        return exists

    async def aadd(self, *objs: Any, bulk: bool = True) -> None:
        await arun(self.add, *objs, bulk=bulk)  # type: ignore[attr-defined]

    async def aremove(self, *objs: Any, bulk: bool = True) -> None:
        await arun(self.remove, *objs, bulk=bulk)  # type: ignore[attr-defined]

    async def aclear(self, bulk: bool = True) -> None:
        await arun(self.clear, bulk=bulk)  # type: ignore[attr-defined]

    async def aset(self, objs: Iterable[Any], bulk: bool = True, clear: bool = False) -> None:
        await arun(self.set, objs, bulk=bulk, clear=clear)  # type: ignore[attr-defined]


class AsyncModelMixin:
    """``await obj.asave(using=)``, ``await obj.adelete(using=)``, ``await obj.arefresh_from_db(using=)``."""

    async def asave(self, using: str | None = None, force_insert: bool = False) -> None:
        """``save()`` on the loop: to ``using`` if given, else where the routers say."""
        await arun(self.save, obj=self, using=using, force_insert=force_insert)  # type: ignore[attr-defined]

    async def adelete(self, using: str | None = None) -> None:
        """``delete()`` on the loop: from ``using`` if given, else from where the object lives."""
        await arun(self.delete, obj=self, using=using)  # type: ignore[attr-defined]

    async def arefresh_from_db(self, using: str | None = None) -> None:
        """``refresh_from_db()`` on the loop."""
        await arun(self.refresh_from_db, obj=self, using=using)  # type: ignore[attr-defined]
