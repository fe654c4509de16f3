"""Native asyncio: a cluster's aliases on async engines, and an ``AsyncSession`` routed by it.

``cluster.async_session()`` is SQLAlchemy's own :class:`~sqlalchemy.ext.asyncio.AsyncSession`
whose sync session is a :class:`~shardkit.ShardSession`: every statement runs through the
same routing, relation checks, bulk writes, cross-shard write modes (two-phase included) as
the sync API; only the engines differ.  The sync session runs inside a greenlet, and each
alias's engine is the sync facade (``AsyncEngine.sync_engine``) of an async engine made from
the same ``DATABASES`` entry, so every driver call it makes is awaited on the running loop.

The session does not see the cluster itself but an :class:`AsyncClusterView` of it: the same
aliases, routers and settings (read through to the cluster, so later changes show), whose
:meth:`~AsyncClusterView.engine` gives the async engine's sync facade.

A fan-out under an async session runs its shard statements concurrently as coroutines on the
running loop (see :mod:`shardkit.fanout._aio`).

Drivers
-------
An alias whose URL (or ``ENGINE``) names an async driver (``postgresql+asyncpg``,
``postgresql+psycopg``, ``sqlite+aiosqlite``, ``mysql+aiomysql``) keeps it.  One that names
no driver, or a sync one (psycopg2, pg8000, pysqlite, PyMySQL, mysqlclient), gets the async
driver shardkit installs with its ``async`` extra: asyncpg for PostgreSQL, aiosqlite for
SQLite, aiomysql for MySQL/MariaDB.  ``Cluster(..., async_driver=...)`` chooses otherwise:
a driver name for every alias (``"psycopg"``), or a mapping whose keys are aliases or
backend names (``{"postgresql": "psycopg", "shard_3": "asyncpg"}``); an alias's entry wins
over its backend's.

The alias's ``OPTIONS`` are the sync driver's ``connect()`` arguments; for asyncpg the
libpq names with an asyncpg equivalent are translated (``connect_timeout`` -> ``timeout``,
``options='-c name=value'`` and ``application_name`` -> ``server_settings``), others are
passed as they are.
"""

from __future__ import annotations

import functools
import shlex
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import URL
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from ._config import DEFAULT_DB_ALIAS, AliasSpec
from ._session import ShardSession, _current_session
from .errors import ConfigError

if TYPE_CHECKING:
    from ._cluster import Cluster

__all__ = ["ASYNC_DRIVERS", "AsyncClusterView", "ShardAsyncSession", "async_url"]

#: The async driver an alias gets when its URL names none (or a sync one), per backend.
ASYNC_DRIVERS: Mapping[str, str] = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}
# Drivers SQLAlchemy runs under asyncio, per backend (psycopg 3 is both: its async dialect
# is picked by create_async_engine).
_ASYNC_CAPABLE: Mapping[str, frozenset[str]] = {
    "postgresql": frozenset({"asyncpg", "psycopg", "psycopg_async"}),
    "sqlite": frozenset({"aiosqlite"}),
    "mysql": frozenset({"aiomysql", "asyncmy"}),
    "mariadb": frozenset({"aiomysql", "asyncmy"}),
}


def _chosen_driver(spec: AliasSpec, choice: str | Mapping[str, str] | None) -> str | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return choice
    return choice.get(spec.alias) or choice.get(spec.dialect_name)


def async_url(spec: AliasSpec, choice: str | Mapping[str, str] | None = None) -> URL:
    """The URL of ``spec``'s async engine (see the module docstring for the rules).

    >>> from shardkit._config import parse_databases
    >>> specs = parse_databases({"default": "postgresql://u@h/app", "b": "sqlite:///b.db"})
    >>> async_url(specs["default"]).drivername, async_url(specs["b"]).drivername
    ('postgresql+asyncpg', 'sqlite+aiosqlite')
    >>> async_url(specs["default"], "psycopg").drivername
    'postgresql+psycopg'
    """
    backend = spec.dialect_name
    capable = _ASYNC_CAPABLE.get(backend, frozenset())
    driver = _chosen_driver(spec, choice)
    if driver is None:
        current = spec.url.get_driver_name() if "+" in spec.url.drivername else ""
        if current in capable:
            return spec.url
        driver = ASYNC_DRIVERS.get(backend)
        if driver is None:
            raise ConfigError(
                f"DATABASES[{spec.alias!r}]: no async driver known for {backend!r} "
                "(name one in its URL, or with Cluster(async_driver=...))",
                alias=spec.alias,
            )
    elif capable and driver not in capable:
        raise ConfigError(
            f"DATABASES[{spec.alias!r}]: {driver!r} is not an async driver for {backend!r} "
            f"(async drivers: {', '.join(sorted(capable))})",
            alias=spec.alias,
            setting="async_driver",
        )
    return spec.url.set(drivername=f"{backend}+{driver}")


_LIBPQ_QUERY = frozenset(
    {
        "connect_timeout", "application_name", "options", "sslmode",
        "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    }
)  # fmt: skip


def _asyncpg_connect_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """libpq-style ``OPTIONS`` -> asyncpg ``connect()`` arguments (what has an equivalent)."""
    out = dict(args)
    settings: dict[str, str] = dict(out.pop("server_settings", None) or {})
    if "connect_timeout" in out:
        out.setdefault("timeout", float(out.pop("connect_timeout")))
    if "application_name" in out:
        settings.setdefault("application_name", str(out.pop("application_name")))
    options = out.pop("options", None)
    if isinstance(options, str):
        words = shlex.split(options)
        for i, word in enumerate(words):
            pair = word[2:] if word.startswith("-c") and len(word) > 2 else None
            if word == "-c" and i + 1 < len(words):
                pair = words[i + 1]
            if pair and "=" in pair:
                name, value = pair.split("=", 1)
                settings.setdefault(name.strip(), value.strip())
    if "sslmode" in out:
        out.setdefault("ssl", out.pop("sslmode"))
    for key in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"):
        out.pop(key, None)  # libpq socket settings asyncpg has no word for
    if settings:
        out["server_settings"] = settings
    return out


def create_async_engine_for(
    spec: AliasSpec, defaults: Mapping[str, Any], choice: str | Mapping[str, str] | None
) -> AsyncEngine:
    """The async engine of one alias: its async URL, the cluster's ``engine_options`` and the
    alias's ``ENGINE_OPTIONS`` and ``OPTIONS`` (``OPTIONS`` translated for asyncpg)."""
    url = async_url(spec, choice)
    options: dict[str, Any] = dict(defaults)
    options.update(spec.engine_options)
    connect_args = {**dict(options.pop("connect_args", None) or {}), **dict(spec.connect_args)}
    if spec.dialect_name == "sqlite":
        connect_args.pop("check_same_thread", None)  # aiosqlite's own thread runs every call
    if url.get_driver_name() == "asyncpg":
        # libpq words in the URL's query (?connect_timeout=2) are not asyncpg's: translated too
        libpq = {k: v for k, v in url.query.items() if k in _LIBPQ_QUERY}
        if libpq:
            url = url.difference_update_query(libpq)
            connect_args = {**libpq, **connect_args}
        if connect_args:
            connect_args = _asyncpg_connect_args(connect_args)
    if connect_args:
        options["connect_args"] = connect_args
    try:
        return create_async_engine(url, **options)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(
            f"DATABASES[{spec.alias!r}]: cannot create its async engine ({url.get_driver_name()}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            alias=spec.alias,
        ) from exc


class _AsyncEngines:
    """A cluster's async engines, made on first use (kept in the cluster's ``__dict__``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engines: dict[str, AsyncEngine] = {}
        self.view: AsyncClusterView | None = None


def _state(cluster: Cluster) -> _AsyncEngines:
    state = cluster.__dict__.get("_shardkit_async")
    if state is None:
        state = cluster.__dict__.setdefault("_shardkit_async", _AsyncEngines())
    return state  # type: ignore[no-any-return]


def async_engine(cluster: Cluster, alias: str = DEFAULT_DB_ALIAS) -> AsyncEngine:
    """The async engine of ``alias``, created on first use (see :meth:`Cluster.async_engine`)."""
    state = _state(cluster)
    engine = state.engines.get(alias)
    if engine is not None:
        return engine
    spec = cluster.spec(alias)
    from .observe import engine_created
    from .reshard._dbfence import instrument

    with state.lock:
        engine = state.engines.get(alias)
        if engine is None:
            if spec.engine is not None and spec.engine.dialect.is_async:  # an async engine's sync_engine
                engine = AsyncEngine(spec.engine)
            else:
                if spec.engine is not None:  # DATABASES gave a sync Engine: the same URL, async
                    spec = AliasSpec(spec.alias, spec.engine.url)
                choice = getattr(cluster, "async_driver", None)
                engine = create_async_engine_for(spec, getattr(cluster, "_engine_options", {}), choice)
            instrument(engine.sync_engine)  # a reshard's database-side fence refusal -> ShardMovingError
            engine_created(cluster, alias, engine.sync_engine)  # shardkit.observe: listeners, slow statements
            state.engines[alias] = engine
    return engine


async def adispose(cluster: Cluster) -> None:
    """Close every pooled connection of every async engine made so far (see :meth:`Cluster.adispose`)."""
    state = _state(cluster)
    with state.lock:
        engines, state.engines = state.engines, {}
        if state.view is not None:
            state.view._engines.clear()
    for engine in engines.values():
        await engine.dispose()


class AsyncClusterView:
    """The cluster as an async session's :class:`ShardSession` sees it.

    Everything is the cluster's (read through, so it follows changes), except the engines:
    :meth:`engine` gives the sync facade of the alias's async engine.  ``isinstance(view,
    Cluster)`` holds (the view's class is made a subclass of the cluster's), so the cluster's
    methods run on the view with the view's engines.
    """

    _cluster: Cluster
    _engines: dict[str, Engine]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_cluster"], name)

    def engine(self, alias: str = DEFAULT_DB_ALIAS) -> Engine:
        """The sync facade (``AsyncEngine.sync_engine``) of ``alias``'s async engine."""
        engine = self._engines.get(alias)
        if engine is None:
            engine = self._engines[alias] = async_engine(self._cluster, alias).sync_engine
        return engine

    def async_engine(self, alias: str = DEFAULT_DB_ALIAS) -> AsyncEngine:
        return async_engine(self._cluster, alias)

    def dispose(self) -> None:
        """Nothing: the async engines are closed by ``await cluster.adispose()``."""

    @property
    def cluster(self) -> Cluster:
        """The cluster this is a view of."""
        return self._cluster

    def __repr__(self) -> str:
        return f"AsyncClusterView({self._cluster!r})"


_view_classes: dict[type[Any], type[Any]] = {}


def cluster_view(cluster: Cluster) -> AsyncClusterView:
    """The (one, cached) :class:`AsyncClusterView` of ``cluster``."""
    if isinstance(cluster, AsyncClusterView):
        return cluster
    state = _state(cluster)
    view = state.view
    if view is None:
        cls = type(cluster)
        view_cls = _view_classes.get(cls)
        if view_cls is None:
            view_cls = _view_classes.setdefault(
                cls, type(f"Async{cls.__name__}View", (AsyncClusterView, cls), {"__module__": __name__})
            )
        view = object.__new__(view_cls)
        view.__dict__["_cluster"] = cluster
        view.__dict__["_engines"] = {}
        state.view = view
    return view


class ShardAsyncSession(AsyncSession):
    """An :class:`~sqlalchemy.ext.asyncio.AsyncSession` whose ``sync_session`` is a
    :class:`~shardkit.ShardSession` over a cluster's async engines.  Made by
    :meth:`Cluster.async_session`.

    Besides every ``AsyncSession`` method, it has awaitable forms of the ``ShardSession``
    methods that may do I/O (:meth:`save`, :meth:`delete_from`) and the plain ones that do
    not (:meth:`route`, :meth:`explain`, :meth:`placement_of`, :meth:`write_alias_of`).
    """

    sync_session: ShardSession

    def __init__(self, cluster: Cluster, *, using: str | None = None, **kw: Any) -> None:
        view = cast("Cluster", cluster_view(cluster))  # a Cluster subclass at run time
        sync_class = cast("type[Session]", functools.partial(ShardSession, view, using=using))
        super().__init__(sync_session_class=sync_class, **kw)

    async def __aenter__(self) -> ShardAsyncSession:
        # the task's current session, as ``with cluster.session()`` makes it the thread's (the
        # manager API's a-methods use it); a greenlet SQLAlchemy spawns sees the task's context
        self.__dict__.setdefault("_shardkit_tokens", []).append(_current_session.set(self.sync_session))
        await super().__aenter__()
        return self

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        try:
            await super().__aexit__(type_, value, traceback)
        finally:
            tokens = self.__dict__.get("_shardkit_tokens")
            if tokens:
                _current_session.reset(tokens.pop())

    @property
    def cluster(self) -> Cluster:
        """The cluster (not its view)."""
        return self.sync_session.cluster.cluster  # type: ignore[attr-defined,no-any-return]

    @property
    def pinned(self) -> str | None:
        return self.sync_session.pinned

    async def save(self, obj: Any, *, using: str | None = None, force_insert: bool = False) -> None:
        """:meth:`ShardSession.save`, awaited."""
        await self.run_sync(lambda s: cast(ShardSession, s).save(obj, using=using, force_insert=force_insert))

    async def delete_from(self, obj: Any, using: str) -> None:
        """:meth:`ShardSession.delete_from`, awaited."""
        await self.run_sync(lambda s: cast(ShardSession, s).delete_from(obj, using))

    def route(self, statement: Any) -> Any:
        """:meth:`ShardSession.route` (no I/O)."""
        return self.sync_session.route(statement)

    def explain(self, statement: Any) -> str:
        """:meth:`ShardSession.explain` (no I/O)."""
        return self.sync_session.explain(statement)

    def placement_of(self, obj: Any) -> str | None:
        return self.sync_session.placement_of(obj)

    def write_alias_of(self, obj: Any) -> str:
        return self.sync_session.write_alias_of(obj)


def async_session(cluster: Cluster, *, using: str | None = None, **kw: Any) -> ShardAsyncSession:
    """A new :class:`ShardAsyncSession` on ``cluster`` (see :meth:`Cluster.async_session`)."""
    return ShardAsyncSession(cluster, using=using, **kw)
