"""Cluster: the aliases, their engines, the router chain, and sessions over them.

A cluster is what Django's settings are to Django: the DATABASES and
DATABASE_ROUTERS of one application.  Engines are created on first use (so
building a cluster never connects) and closed by :meth:`Cluster.dispose`.

The manager API (``User.objects``) needs to know which cluster to use without
being told each time; that is the *active* cluster, set explicitly with
:meth:`Cluster.activate` (process-wide, like Django's settings) or for a block
with ``with cluster.activate():``.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, MetaData, Table
from sqlalchemy.orm import DeclarativeBase, registry

from . import _sqla
from . import observe as _observe
from ._config import DEFAULT_DB_ALIAS, AliasSpec, parse_databases
from ._placement import db_of_or_none
from ._session import ShardSession
from ._twophase import InDoubt, check_twophase_aliases, recover
from .errors import ConfigError, CrossShardWriteError, UnknownAliasError

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._async import ShardAsyncSession

__all__ = ["Cluster", "get_active_cluster"]

_active_global: Cluster | None = None
_active_local: contextvars.ContextVar[Cluster | None] = contextvars.ContextVar("shardkit_active_cluster", default=None)


def get_active_cluster() -> Cluster:
    """The cluster the manager API uses: the innermost ``with cluster.activate()``, else
    the last ``cluster.activate()``.

    :raises ConfigError: no cluster was activated.
    """
    cluster = _active_local.get() or _active_global
    if cluster is None:
        raise ConfigError(
            "no active shardkit cluster: call cluster.activate() once at start-up "
            "(or use `with cluster.activate():`) before using Model.objects"
        )
    return cluster


class _Activation:
    """Returned by :meth:`Cluster.activate`; as a context manager, it also restores the cluster
    that was active before when the block ends (if nothing activated another one meanwhile)."""

    def __init__(self, cluster: Cluster) -> None:
        global _active_global
        self.cluster = cluster
        self._previous_global = _active_global
        _active_global = cluster

    def __enter__(self) -> Cluster:
        return self.cluster

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _active_global
        if _active_global is self.cluster:
            _active_global = self._previous_global


class _LocalActivation:
    """Returned by :meth:`Cluster.activated`: active for this thread / task only, within the block."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._tokens: list[contextvars.Token[Cluster | None]] = []

    def __enter__(self) -> Cluster:
        self._tokens.append(_active_local.set(self.cluster))
        return self.cluster

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _active_local.reset(self._tokens.pop())


def _tables_of(target: Any) -> tuple[MetaData, dict[Table, type[Any]]]:
    """MetaData and table -> mapped class for a MetaData, a declarative base or a registry."""
    models: dict[Table, type[Any]] = {}
    reg: registry | None = None
    if isinstance(target, MetaData):
        metadata = target
    elif isinstance(target, registry):
        reg, metadata = target, target.metadata
    elif isinstance(target, type) and issubclass(target, DeclarativeBase):
        reg, metadata = target.registry, target.metadata
    elif hasattr(target, "metadata") and isinstance(target.metadata, MetaData):
        metadata = target.metadata
        reg = getattr(target, "registry", None)
    else:
        raise ConfigError(f"expected a MetaData or a declarative base, got {target!r}")
    registries: Iterable[registry] = [reg] if reg is not None else _all_registries()
    for r in registries:
        # base-most first: with single-table inheritance the base class is the table's model
        for mapper in sorted(r.mappers, key=_depth):
            if mapper.local_table is not None and isinstance(mapper.local_table, Table):
                models.setdefault(mapper.local_table, mapper.class_)
    return metadata, models


def _depth(mapper: Any) -> int:
    depth = 0
    while mapper.inherits is not None:
        mapper, depth = mapper.inherits, depth + 1
    return depth


def _all_registries() -> Iterable[registry]:
    return _sqla.all_registries()


class Cluster:
    """A set of databases (aliases), the routers that choose between them, and sessions.

    :param databases: Django's ``DATABASES``: alias -> URL string or dict
        (``ENGINE``, ``NAME``, ``USER``, ``PASSWORD``, ``HOST``, ``PORT``, ``OPTIONS``).
        ``"default"`` is required.
    :param routers: Django's ``DATABASE_ROUTERS``: dotted paths, classes or instances.
    :param engine_options: keyword arguments for every ``create_engine()`` call.
    :param deadline: default deadline in seconds for a read that spans shards.
    :param partial: by default, return the healthy shards' rows of a failed fan-out (marked incomplete).
    :param cross_shard_writes: what a transaction that writes to several aliases does:
        ``"allow"`` commits on each, one after the other, as SQLAlchemy does with several binds
        (a crash in between can leave some committed and some not); ``"refuse"`` refuses such a
        flush with :class:`~shardkit.errors.CrossShardWriteError` before anything is written;
        ``"twophase"`` commits atomically with PostgreSQL's two-phase commit (see
        :mod:`shardkit._twophase` and :meth:`recover_twophase`).
    :param async_driver: the async driver of :meth:`async_session`'s engines, for every alias
        (``"psycopg"``) or per alias or backend (``{"postgresql": "psycopg"}``); default: the
        URL's own when async, else asyncpg, aiosqlite, aiomysql (see :mod:`shardkit._async`).
    :param scatter: ``"allow"``, ``"warn"`` or ``"refuse"`` a statement the routers send to every
        shard (no shard key): see :mod:`shardkit.observe` (sessions and statements may override it).
    :param max_rows: a fan-out read that gets more rows raises
        :class:`~shardkit.errors.MaxRowsError`, the other shards cancelled (``None``: no limit).
    :param slow_statement: seconds; a statement that takes longer is logged at WARNING.

    >>> cluster = Cluster({"default": "sqlite://"})
    >>> cluster.aliases
    ('default',)
    """

    def __init__(
        self,
        databases: Mapping[str, Any],
        routers: Sequence[Any] | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        deadline: float | None = None,
        partial: bool = False,
        cross_shard_writes: str = "allow",
        async_driver: str | Mapping[str, str] | None = None,
        scatter: str = "allow",
        max_rows: int | None = None,
        slow_statement: float | None = None,
    ) -> None:
        self._specs: dict[str, AliasSpec] = parse_databases(databases)
        self._engine_options = dict(engine_options or {})
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        from .reshard._fence import attach_fencing, ensure_fencing  # here: shardkit.reshard imports this module

        # a chain with a ring router is asked a FencingRouter first: every process follows reshards
        self.router = ensure_fencing(routers or (), self._specs, db_of=db_of_or_none, default=DEFAULT_DB_ALIAS)
        attach_fencing(self)
        self.deadline = deadline
        self.partial = partial
        if cross_shard_writes not in ("allow", "refuse", "twophase"):
            raise ConfigError(
                f"cross_shard_writes must be 'allow', 'refuse' or 'twophase', got {cross_shard_writes!r}",
                setting="cross_shard_writes",
            )
        self.cross_shard_writes = cross_shard_writes
        self._autocommit = threading.local()
        self.async_driver = async_driver  # see shardkit._async
        # shardkit.observe: scatter guard, fan-out row limit, slow-statement WARNING threshold
        self.scatter = _observe.check_scatter_mode(scatter) or "allow"
        self.max_rows = _observe.check_max_rows(max_rows)
        self.slow_statement = None if slow_statement is None else float(slow_statement)

    @classmethod
    def from_settings(cls, settings: str | os.PathLike[str] | ModuleType | None = None, **kwargs: Any) -> Cluster:
        """Build a cluster from settings: ``DATABASES``, ``DATABASE_ROUTERS`` and ``SHARDKIT_RING``.

        The cluster of :func:`shardkit.load_settings` (the one loader, see ``shardkit._settings``):
        a ring the settings define gets its :class:`~shardkit.HashRingRouter` in the chain.

        :param settings: a dotted module path (``"myproject.settings"``), the module itself, the
            path of a ``settings.py`` or of a TOML file; ``None`` reads ``SHARDKIT_SETTINGS``.
        :param kwargs: keyword arguments of :class:`Cluster` (``engine_options``, ``deadline`` ...).
        :raises ConfigError: the settings cannot be found, read or validated.
        """
        from ._settings import load_settings  # here: the settings module builds Cluster objects

        return load_settings(settings, cluster_class=cls, **kwargs).cluster

    # -- aliases and engines -----------------------------------------------------

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every alias, in the order DATABASES gave them."""
        return tuple(self._specs)

    def spec(self, alias: str) -> AliasSpec:
        """The validated DATABASES entry of ``alias``."""
        return self._specs[self.check_alias(alias)]

    def check_alias(self, alias: Any) -> str:
        """Return ``alias`` if the cluster has it, else raise :class:`UnknownAliasError`."""
        if isinstance(alias, str) and alias in self._specs:
            return alias
        raise UnknownAliasError(f"unknown database alias {alias!r} (aliases: {', '.join(self._specs)})", alias=alias)

    def engine(self, alias: str = DEFAULT_DB_ALIAS) -> Engine:
        """The engine of ``alias``, created on first use."""
        engine = self._engines.get(alias)
        if engine is not None:
            return engine
        spec = self.spec(alias)
        from .fanout._connect import bound_sockets
        from .reshard._dbfence import instrument

        with self._lock:
            engine = self._engines.get(alias)
            if engine is None:
                engine = spec.create_engine(**self._engine_options)
                if spec.engine is None:  # one shardkit made: bounded sockets (psycopg2; see fanout._connect)
                    bound_sockets(engine, lambda: self.deadline)
                instrument(engine)  # a reshard's database-side fence refusal -> ShardMovingError
                _observe.engine_created(self, alias, engine)  # listeners, slow statements
                self._engines[alias] = engine
        return engine

    def add_listener(self, listener: Any) -> None:
        """Call ``listener.on_statement(event)`` after every statement an alias runs and
        ``listener.on_fanout(event)`` once per fan-out read (see :mod:`shardkit.observe`;
        :class:`~shardkit.observe.MetricsListener` is a ready-made one)."""
        _observe.add_listener(self, listener)

    def remove_listener(self, listener: Any) -> None:
        """Stop calling ``listener``."""
        _observe.remove_listener(self, listener)

    def created_engine(self, alias: str) -> Engine | None:
        """The engine of ``alias`` if one was created already, else ``None`` (creates nothing)."""
        return self._engines.get(alias)

    def dispose(self) -> None:
        """Close every pooled connection of every engine created so far."""
        with self._lock:
            engines, self._engines = self._engines, {}
        for engine in engines.values():
            engine.dispose()

    def async_engine(self, alias: str = DEFAULT_DB_ALIAS) -> AsyncEngine:
        """The :class:`~sqlalchemy.ext.asyncio.AsyncEngine` of ``alias``, created on first use."""
        from ._async import async_engine

        return async_engine(self, alias)

    async def adispose(self) -> None:
        """Close every pooled connection of every async engine created so far."""
        from ._async import adispose

        await adispose(self)

    def __repr__(self) -> str:
        inner = ", ".join(f"{a}={s.safe_url!r}" for a, s in self._specs.items())
        return f"Cluster({inner}, router={self.router!r})"

    # -- sessions ----------------------------------------------------------------

    def session(self, *, using: str | None = None, **kwargs: Any) -> ShardSession:
        """A new :class:`ShardSession` (a ``sqlalchemy.orm.Session``) routed by this cluster.

        :param using: pin every statement and flush of the session to one alias.
        :param kwargs: any :class:`~sqlalchemy.orm.Session` argument (``expire_on_commit`` ...),
            and ``scatter=`` / ``max_rows=`` for this session's statements (see :mod:`shardkit.observe`).

        Used as a context manager, it is also the session ``Model.objects`` uses
        inside the block.
        """
        return ShardSession(self, using=using, **kwargs)

    def async_session(self, *, using: str | None = None, **kwargs: Any) -> ShardAsyncSession:
        """A new :class:`~sqlalchemy.ext.asyncio.AsyncSession` whose sync session is a
        :class:`ShardSession` over this cluster's async engines (``async with
        cluster.async_session() as s:``); same arguments as :meth:`session`."""
        from ._async import async_session

        return async_session(self, using=using, **kwargs)

    def autocommit_session(self) -> ShardSession:
        """The per-thread session the manager API uses outside any ``with session`` block.

        Every manager call made through it commits at once, as Django does by default;
        objects stay attached (``expire_on_commit=False``) so lazy loads keep working.
        """
        session: ShardSession | None = getattr(self._autocommit, "session", None)
        if session is None:
            session = ShardSession(self, expire_on_commit=False)
            session._shardkit_autocommit = True  # type: ignore[attr-defined]
            self._autocommit.session = session
        return session

    def activate(self) -> _Activation:
        """Make this the cluster that ``Model.objects`` uses, process-wide (as Django's settings are).

        ``with cluster.activate(): ...`` puts the previously active cluster back when the block
        ends; for a cluster active in one thread or task only, use :meth:`activated`.
        """
        return _Activation(self)

    def activated(self) -> _LocalActivation:
        """``with cluster.activated(): ...``: the cluster ``Model.objects`` uses inside the block,
        in this thread or asyncio task only (a context variable); other threads are unaffected."""
        return _LocalActivation(self)

    # -- schema ------------------------------------------------------------------

    def tables_for(self, alias: str, target: Any) -> list[Table]:
        """The tables of ``target`` (MetaData or declarative base) that allow_migrate puts on ``alias``."""
        alias = self.check_alias(alias)
        metadata, models = _tables_of(target)
        if self._specs[alias].replica_of is not None:  # read-only: it gets its primary's tables by replication
            return []
        return [
            table
            for table in metadata.sorted_tables
            if self.router.allow_migrate(
                alias, models.get(table), table=table, table_name=table.name, model_name=table.name
            )
        ]

    def create_all(
        self, target: Any, *, aliases: Iterable[str] | None = None, checkfirst: bool = True
    ) -> dict[str, list[str]]:
        """Create each table on every alias where ``allow_migrate`` allows it.

        :param target: a :class:`~sqlalchemy.MetaData` or a declarative base class.
        :param aliases: only these aliases (default: all).
        :returns: alias -> names of the tables created there (or already present).
        """
        done: dict[str, list[str]] = {}
        for alias in list(aliases) if aliases is not None else self.aliases:
            tables = self.tables_for(alias, target)
            metadata, _ = _tables_of(target)
            if tables:
                metadata.create_all(self.engine(alias), tables=tables, checkfirst=checkfirst)
            done[alias] = [t.name for t in tables]
        return done

    def drop_all(
        self, target: Any, *, aliases: Iterable[str] | None = None, checkfirst: bool = True
    ) -> dict[str, list[str]]:
        """Drop each table from every alias where ``allow_migrate`` puts it."""
        done: dict[str, list[str]] = {}
        for alias in list(aliases) if aliases is not None else self.aliases:
            tables = self.tables_for(alias, target)
            metadata, _ = _tables_of(target)
            if tables:
                metadata.drop_all(self.engine(alias), tables=tables, checkfirst=checkfirst)
            done[alias] = [t.name for t in tables]
        return done

    def recover_twophase(self, *, min_age: float = 60.0, dry_run: bool = False) -> list[InDoubt]:
        """Resolve two-phase transactions left in doubt by a crash: committed everywhere at once if
        their decision was logged, else rolled back everywhere once older than ``min_age`` seconds
        (see :func:`shardkit._twophase.recover`).  Only GIDs shardkit wrote are touched.  An alias
        that cannot be reached does not stop the others: it is named afterwards by
        :class:`~shardkit.errors.TwoPhaseRecoveryError`."""
        return recover(self, min_age=min_age, dry_run=dry_run)

    def reshard(self, new_ring: Any = None, **kwargs: Any) -> Any:
        """Move rows to the shards a new ring names: see :func:`shardkit.reshard.reshard`.

        :param new_ring: the target :class:`~shardkit.HashRing` (or pass ``add=``/``remove=``).
        """
        from .reshard import reshard

        return reshard(self, new_ring, **kwargs)

    # -- the cross-shard write setting, asked by the session before it writes -------------

    def check_write_aliases(self, aliases: set[str]) -> None:
        """Refuse, before anything is written, a transaction the cross-shard setting forbids."""
        if self.cross_shard_writes == "twophase":
            check_twophase_aliases(self, aliases)
        if self.cross_shard_writes == "refuse" and len(aliases) > 1:
            raise CrossShardWriteError(
                f"this transaction would write to {len(aliases)} databases ({', '.join(sorted(aliases))}) "
                "and the cluster refuses cross-shard writes (cross_shard_writes='refuse'); nothing was written",
                aliases=sorted(aliases),
            )

    _check_write_aliases = check_write_aliases  # the earlier name
