"""The Session that routes: every read and write asks the cluster's router chain.

:class:`ShardSession` is a plain :class:`sqlalchemy.orm.Session` subclass.
It hooks three places, the same ones SQLAlchemy's own
``ext/horizontal_shard.py`` uses:

* ``do_orm_execute``: every statement run through the session is routed.
  In order of precedence: a :func:`using` option on the statement (the last
  one wins), the ``shardkit_using`` execution option, a session pinned with
  ``cluster.session(using=...)``, the object a lazy or refresh load comes
  from, and finally ``db_for_read`` / ``db_for_write`` of the router chain.
* ``get_bind`` / ``connection_callable``: each object is flushed to the alias
  ``save(using=...)`` asked for, else the one ``db_for_write(Model,
  instance=obj)`` names, else the one it was loaded from, else ``"default"``.
  All aliases of a flush are decided in ``before_flush``, before any SQL is
  sent, so a router error leaves every database untouched.
* identity tokens: a row loaded from alias ``a`` is keyed by ``a`` in the
  identity map, so the same primary key on two shards is two objects.

An object remembers the alias it was loaded from or saved to:
:func:`db_of` tells it.  A Core statement on a table a class maps is routed as
that class's statement; statements with no model (``text()``, Core tables that
no class maps) go to ``"default"`` unless placed with :func:`using` or
``shardkit_using`` (one alias, or several: a fan-out), or given a model with the
``shardkit_model`` execution option (the routers then pick the shards).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sqlalchemy import Engine, Identity, Join, Select, Table, TextClause, and_, event, select
from sqlalchemy.orm import (
    Mapper,
    Query,
    Session,
    make_transient,
    make_transient_to_detached,
)
from sqlalchemy.orm.attributes import flag_modified, get_state_history, instance_state, set_committed_value
from sqlalchemy.orm.base import PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.interfaces import MANYTOONE, ORMOption

from . import _events, _sqla, _writes
from . import observe as _observe
from ._placement import DB, USING, db_of, many_to_ones
from ._placement import db_of_or_none as _db_of_or_none
from ._placement import info_get as _info_get
from ._placement import set_db as _set_db
from ._relations import check_flush_relations
from ._replicas import replicas_of
from ._twophase import CommitOrder
from .errors import CommitError, InvalidRouteError, RoutingError, ShardkitError, brief
from .fanout._orm import execute_fanout, reads_rows
from .typing import ShardTargets

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Result
    from sqlalchemy.orm import ORMExecuteState
    from sqlalchemy.orm.state import InstanceState

    from ._cluster import Cluster

__all__ = ["ShardQuery", "ShardSession", "current_session", "db_of", "using"]

_T = TypeVar("_T")
_EMPTY: Mapping[str, Any] = {}  # no execution options

logger = logging.getLogger(__name__)

# the keys in InstanceState.info (kept under these names for the modules that import them)
_DB = DB
_USING = USING

_current_session: contextvars.ContextVar[ShardSession | None] = contextvars.ContextVar(
    "shardkit_current_session", default=None
)


def current_session() -> ShardSession | None:
    """The session of the innermost ``with cluster.session() as s:`` block, if any."""
    return _current_session.get()


class using(ORMOption):
    """Run a statement, and the loads it triggers, on one alias.

    The statement option form of Django's ``QuerySet.using()``::

        s.scalars(select(User).options(shardkit.using("credentials")))

    Chainable: ``.options(using("a")).options(using("b"))`` runs on ``"b"``.

    :param alias: a key of DATABASES.
    :param propagate_to_loaders: also route lazy loads of the loaded objects there.
    :param primary: read from ``alias`` itself, never from one of its replicas (see
        :mod:`shardkit._replicas`).
    """

    __slots__ = ("alias", "primary", "propagate_to_loaders")

    def __init__(self, alias: str, propagate_to_loaders: bool = True, *, primary: bool = False) -> None:
        if not isinstance(alias, str) or not alias:
            raise InvalidRouteError(f"using() needs an alias name, got {alias!r}", alias=alias)
        self.alias = alias
        self.propagate_to_loaders = propagate_to_loaders
        self.primary = primary

    def __repr__(self) -> str:
        return f"using({self.alias!r}, primary=True)" if self.primary else f"using({self.alias!r})"


_using_option = using


class ShardQuery(Query[_T]):
    """The legacy :class:`~sqlalchemy.orm.Query` of a :class:`ShardSession`, with Django's
    ``using()`` (also spelled ``set_shard()``, the name of SQLAlchemy's ``ShardedQuery``)::

        s.query(User).using("credentials").all()
    """

    def using(self, alias: str) -> Self:
        """This query, and the loads it triggers, on ``alias`` (see :class:`using`)."""
        return self.options(_using_option(alias))

    set_shard = using


def _statement_model(orm_context: ORMExecuteState) -> type[Any] | None:
    """The model a statement reads or writes: its ORM entity; for a Core statement, the class
    that maps its (first mapped) table; for any statement, ``shardkit_model`` if given."""
    mapper = orm_context.bind_mapper
    if mapper is not None:
        return mapper.class_
    model = orm_context.execution_options.get("shardkit_model")
    if model is not None:
        return model  # type: ignore[no-any-return]
    return _core_statement_model(orm_context.statement)


def _core_statement_model(statement: Any) -> type[Any] | None:
    """The class mapping a Core SELECT's, UPDATE's or DELETE's table (``users.select()``)."""
    table = getattr(statement, "table", None)  # UPDATE / DELETE
    if isinstance(table, Table):
        return _table_model(table)
    if not isinstance(statement, Select):
        return None
    for frm in (*_sqla.from_objects(statement), *statement.columns_clause_froms):
        while isinstance(frm, Join):
            frm = frm.left
        if isinstance(frm, Table):
            model = _table_model(frm)
            if model is not None:
                return model
    return None


_TABLE_MODELS: weakref.WeakKeyDictionary[Table, type[Any] | None] = weakref.WeakKeyDictionary()


def _table_model(table: Table) -> type[Any] | None:
    """The (base-most) class that maps ``table``, or ``None``; cached until a new mapper appears."""
    try:
        return _TABLE_MODELS[table]
    except KeyError:
        pass
    found: Mapper[Any] | None = None
    for reg in _sqla.all_registries():
        for mapper in reg.mappers:
            if mapper.local_table is table and (found is None or found.isa(mapper)):
                found = mapper
    model = found.class_ if found is not None else None
    _TABLE_MODELS[table] = model
    return model


@event.listens_for(Mapper, "after_mapper_constructed")
def _forget_table_models(mapper: Mapper[Any], class_: type[Any]) -> None:
    _TABLE_MODELS.clear()


class ShardSession(Session):
    """A :class:`~sqlalchemy.orm.Session` whose binds are chosen by the cluster's routers.

    Made by :meth:`Cluster.session`; accepts every ``Session`` keyword.

    :param cluster: the cluster whose aliases and routers this session uses.
    :param using: pin the whole session to one alias (the session-level form of ``using()``).
    """

    cluster: Cluster

    def __init__(
        self,
        cluster: Cluster,
        *,
        using: str | None = None,
        scatter: str | None = None,
        max_rows: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("query_cls", ShardQuery)
        super().__init__(**kwargs)
        self.cluster = cluster
        self.scatter = _observe.check_scatter_mode(scatter)  # None: the cluster's (shardkit.observe)
        self.max_rows = _observe.check_max_rows(max_rows)
        self.pinned = cluster.check_alias(using) if using is not None else None
        self._flush_aliases: dict[InstanceState[Any], str] = {}
        self._tx_write_aliases: set[str] = set()  # aliases written in the current transaction
        self._bulk_alias: str | None = None  # the alias of a bulk statement being run
        self._flush_conns: dict[str, Connection] = {}  # alias -> connection, for one flush
        # many-to-many link rows: (relationship, owner) -> alias, decided before a flush writes
        self._link_aliases: dict[tuple[Any, InstanceState[Any]], str] = {}
        self._link_alias: str | None = None  # set while the flush writes one alias's link rows
        self._collection_parents: dict[InstanceState[Any], InstanceState[Any]] = {}  # new member -> owner
        self._flush_writes: set[str] = set()  # aliases this flush writes to
        self._context_tokens: list[contextvars.Token[ShardSession | None]] = []
        self._bind_lock = threading.RLock()

    # -- context manager: makes the session "current" for the manager API --

    def __enter__(self) -> ShardSession:
        self._context_tokens.append(_current_session.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self._context_tokens:
                _current_session.reset(self._context_tokens.pop())

    _commit_order: CommitOrder | None = None  # set while commit() runs (not twophase)

    def commit(self) -> None:
        """Commit.  With ``cross_shard_writes="twophase"`` a commit that wrote to several
        aliases is made atomic by two-phase commit first; otherwise a transaction holding
        several connections commits them one by one in a known order (aliases only read
        from first, then the written ones, each in the order of DATABASES).

        A commit that ends differently on some aliases raises a
        :class:`~shardkit.errors.CommitError` that names them (see :mod:`shardkit._twophase`);
        that error and any two-phase failure leave the session rolled back, so a later
        ``rollback()`` does nothing."""
        # Takes over once every before_commit listener and the final flush have run; told of
        # the connections that flush opens.
        order = self._commit_order = CommitOrder(self) if self._transaction is not None else None
        try:
            super().commit()
        except CommitError as exc:  # the aliases may disagree now: say so where operators look
            logger.error("commit failed: %s", brief(exc))
            if order is not None and order.failed:
                self._rollback_quietly()
            raise
        except BaseException:
            if order is not None and order.failed:
                self._rollback_quietly()
            raise
        finally:
            self._commit_order = None

    def _rollback_quietly(self) -> None:
        """Roll back after a failed commit; connections that broke were invalidated, so they are skipped."""
        with contextlib.suppress(Exception):
            self.rollback()

    # -- binds ---------------------------------------------------------------

    def get_bind(
        self,
        mapper: Any = None,
        *,
        shard_id: str | None = None,
        instance: Any = None,
        clause: Any = None,
        **kw: Any,
    ) -> Engine:
        if shard_id is not None:
            return self.cluster.engine(shard_id)
        if self._link_alias is not None:  # the unit of work asks with the owner's mapper only
            return self.cluster.engine(self._link_alias)
        if self._bulk_alias is not None:  # SQLAlchemy's bulk paths ask with the mapper only
            return self.cluster.engine(self._bulk_alias)
        if instance is not None:
            return self.cluster.engine(self._write_alias(instance_state(instance)))
        if self.pinned is not None:
            return self.cluster.engine(self.pinned)
        model = _mapper_class(mapper)
        if model is not None:
            target = self.cluster.router.db_for_write(model)
            if isinstance(target, str):
                return self.cluster.engine(target)
        return self.cluster.engine(self.cluster.router.default)

    def _connection_for_bind(self, engine: Any, execution_options: Any = None, **kw: Any) -> Connection:
        # A fan-out's workers look up (and adopt) their shards' connections at the same time, and
        # SessionTransaction's state bookkeeping is not thread-safe: one at a time.
        with self._bind_lock:
            return super()._connection_for_bind(engine, execution_options, **kw)

    @property
    def connection_callable(self) -> Any:  # type: ignore[override]
        """Per-instance connections for the unit of work; off while one alias runs a bulk statement
        (SQLAlchemy's bulk paths refuse to run while it is set, and there the alias is known)."""
        return None if self._bulk_alias is not None else self._flush_connection

    def _flush_connection(self, mapper: Any = None, instance: Any = None, **kw: Any) -> Connection:
        """The connection the unit of work flushes ``instance`` with: its write alias."""
        alias = None
        if instance is not None:
            state = instance_state(instance)
            if state.key is not None and state not in self._flush_aliases and self.pinned is None:
                # a loaded object the flush reached on its own (a foreign key set by its parent's
                # collection, an object only touched): its row is where it lives
                db = _db_of_or_none(instance)
                if db is not None:
                    self._flush_aliases[state] = db
            alias = self._write_alias(state)
        if alias is None:
            alias = self.pinned or self.cluster.router.default
        conn = self._flush_conns.get(alias)
        if conn is None:
            trans = self.get_transaction() or self.begin()
            conn = self._flush_conns[alias] = trans.connection(mapper, shard_id=alias)
        return conn

    @property
    def tx_write_aliases(self) -> set[str]:
        """The aliases the current transaction has written to (statements and flushes)."""
        return self._tx_write_aliases

    @property
    def flush_aliases(self) -> Mapping[InstanceState[Any], str]:
        """The alias of each object of the flush being prepared (decided in ``before_flush``)."""
        return self._flush_aliases

    def _decide_write_alias(self, state: InstanceState[Any]) -> str:
        explicit = _info_get(state, _USING)
        if explicit is not None:
            return self.cluster.check_alias(explicit)
        if self.pinned is not None:
            return self.pinned
        obj = state.obj()
        # A new object with no router opinion follows the object it belongs to
        # (Django's related managers do the same with the instance's db).
        fallback = self._parent_alias(state) if state.key is None else None
        target = self.cluster.router.db_for_write(state.class_, instance=obj, fallback=fallback)
        if not isinstance(target, str):  # pragma: no cover - RouterChain refuses this
            raise RoutingError(f"db_for_write gave several aliases for one {state.class_.__name__}")
        return target

    def _parent_alias(self, state: InstanceState[Any], _seen: frozenset[int] = frozenset()) -> str | None:
        """The db of the first many-to-one parent of a new object (recursively, for new parents)."""
        for prop in many_to_ones(state.mapper):
            parent = state.dict.get(prop.key)
            if parent is None:
                continue
            pstate = instance_state(parent)
            alias = self._flush_aliases.get(pstate) or _info_get(pstate, _USING) or _db_of_or_none(parent)
            if alias is None and id(pstate) not in _seen:
                alias = self._parent_alias(pstate, _seen | {id(state)})
                if alias is None:
                    target = self.cluster.router.db_for_write(pstate.class_, instance=parent)
                    alias = target if isinstance(target, str) else None
            if alias is not None:
                return str(alias)
        owner = self._collection_parents.get(state)  # a new member of an owner's collection
        if owner is not None:
            alias = self._flush_aliases.get(owner) or _info_get(owner, _USING) or _db_of_or_none(owner.obj())
            if alias is None and id(owner) not in _seen and owner.key is None:
                alias = self._parent_alias(owner, _seen | {id(state)})
                if alias is None:
                    target = self.cluster.router.db_for_write(owner.class_, instance=owner.obj())
                    alias = target if isinstance(target, str) else None
            if alias is not None:
                return str(alias)
        return None

    def _note_collection_parents(self, states: Iterable[InstanceState[Any]]) -> None:
        """Remember, for each new object added to a collection (one-to-many, many-to-many), the
        object that owns the collection: with no router opinion it is written where its owner is,
        as Django's related managers create objects on the instance's database."""
        parents = self._collection_parents
        parents.clear()
        for state in states:
            for key in _collection_keys(state.mapper):
                if key not in state.dict or key not in state.committed_state:
                    continue  # never loaded, or unchanged: nothing was added
                for member in get_state_history(state, key, PASSIVE_NO_INITIALIZE).added or ():
                    mstate = instance_state(member)
                    if mstate.key is None:
                        parents.setdefault(mstate, state)

    def link_alias_of(self, prop: Any, state: InstanceState[Any]) -> str:
        """Where the many-to-many link rows of ``state``'s relationship ``prop`` are written.

        As Django does for the through model: ``db_for_write(<secondary table>, instance=owner)``;
        when every router passes, the owner's database (where it lives, or is being written).
        """
        key = (prop, state)
        alias = self._link_aliases.get(key)
        if alias is not None:
            return alias
        if self.pinned is not None:
            alias = self.pinned
        else:
            target = link_opinion(self.cluster.router, prop, state.obj())
            if target is None:
                alias = (
                    self._flush_aliases.get(state)
                    or _info_get(state, _USING)
                    or _db_of_or_none(state.obj())
                    or self.cluster.router.default
                )
            elif isinstance(target, str):
                alias = target
            else:
                raise RoutingError(
                    f"db_for_write gave several aliases for the link rows of one {state.class_.__name__}.{prop.key}",
                    model=state.class_,
                )
        self._link_aliases[key] = alias
        return alias

    def _route_links(self, states: Iterable[InstanceState[Any]], deleted: set[InstanceState[Any]]) -> None:
        """Decide, before a flush writes anything, where every changed many-to-many link row goes."""
        for state in states:
            for prop in _secondary_props(state.mapper):
                if state in deleted:
                    if state.key is not None:
                        # Django's Collector deletes the through rows with their owner, on the
                        # owner's database: never where db_for_write would add a new link.
                        alias = self._link_aliases[(prop, state)] = self._write_alias(state)
                        self._flush_writes.add(alias)
                    continue
                if prop.key not in state.dict or prop.key not in state.committed_state:
                    continue  # never loaded, or unchanged
                history = get_state_history(state, prop.key, PASSIVE_NO_INITIALIZE)
                if history.added or history.deleted:
                    self._flush_writes.add(self.link_alias_of(prop, state))

    def flush(self, objects: Any = None) -> None:
        try:
            super().flush(objects)
        except BaseException:
            # Nothing of a failed flush happened: a new object is not on the database it was
            # being routed to (db_of() must not say so), and the next flush decides afresh.
            for state in self._flush_aliases:
                if state.key is None:  # save(using=) did not happen either
                    info = state.__dict__.get("info")
                    if info is not None:
                        info.pop(_USING, None)
                    state.identity_token = _info_get(state, _DB)
            self._flush_aliases.clear()
            self._link_aliases.clear()
            self._flush_conns.clear()
            self.info.pop("shardkit.flush_events", None)
            raise

    def _write_alias(self, state: InstanceState[Any]) -> str:
        alias = self._flush_aliases.get(state)
        if alias is None:
            alias = self._decide_write_alias(state)
            self._flush_aliases[state] = alias
        if state.key is None:
            # a new row: its identity (and so where it is found again) is this alias
            state.identity_token = alias
        return alias

    def placement_of(self, obj: Any) -> str | None:
        """Where ``obj`` lives or is placed, without defaults: its db, ``save(using=)``, a pinned
        session, or a router's answer; ``None`` for a new object nothing has placed yet."""
        state = instance_state(obj)
        db = self._flush_aliases.get(state) or _db_of_or_none(obj) or _info_get(state, _USING) or self.pinned
        if db is not None:
            return str(db)
        target = self.cluster.router.write_opinion(state.class_, instance=obj)
        return target if isinstance(target, str) else None

    def _route_new_in_batches(self, new: list[InstanceState[Any]]) -> None:
        """Route the new objects of each class with one router question (when the routers can);
        objects placed explicitly (``save(using=)``, a pinned session) keep their placement."""
        if self.pinned is not None or not self.cluster.router.write_instances_complete:
            return
        by_class: dict[type[Any], list[InstanceState[Any]]] = {}
        for state in new:
            if _info_get(state, _USING) is None:
                by_class.setdefault(state.class_, []).append(state)
        for model, states in by_class.items():
            aliases = self.cluster.router.db_for_write_instances(model, [st.obj() for st in states], session=self)
            if aliases is None:
                continue
            for state, alias in zip(states, aliases, strict=True):
                self._flush_aliases[state] = alias
                state.identity_token = alias

    def write_alias_of(self, obj: Any) -> str:
        """Where ``obj`` would be written at the next flush (asks the routers; writes nothing)."""
        state = instance_state(obj)
        return self._flush_aliases.get(state) or self._decide_write_alias(state)

    # -- identity map ----------------------------------------------------------

    def _identity_lookup(  # type: ignore[override]
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any = None,
        lazy_loaded_from: InstanceState[Any] | None = None,
        execution_options: Any = None,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Any:
        if identity_token is None:
            opts = execution_options or {}
            using_opt = opts.get("shardkit_using")
            identity_token = (using_opt if isinstance(using_opt, str) else None) or self.pinned
        if identity_token is not None:
            return super()._identity_lookup(
                mapper, primary_key_identity, identity_token=identity_token,
                lazy_loaded_from=lazy_loaded_from, **kw,
            )  # fmt: skip
        if lazy_loaded_from is not None:
            parent_db = _db_of_or_none(lazy_loaded_from.obj())
            if parent_db is not None:  # a many-to-one from a loaded object: only its own database
                return super()._identity_lookup(
                    mapper, primary_key_identity, identity_token=parent_db, lazy_loaded_from=lazy_loaded_from, **kw
                )
        # Any alias may hold an object with this key: the first (in DATABASES order) that does.
        # Only aliases the identity map has the key for are looked up SQLAlchemy's way.
        identity_map = self.identity_map
        if not identity_map:
            return None
        cls, ident, _token = mapper.identity_key_from_primary_key(primary_key_identity)
        held = _sqla.identity_dict(identity_map)  # a dict lookup per alias, not a method call
        for alias in self.cluster.aliases:
            if (cls, ident, alias) not in held:
                continue
            obj = super()._identity_lookup(
                mapper, primary_key_identity, identity_token=alias, lazy_loaded_from=lazy_loaded_from, **kw
            )
            if obj is not None:
                return obj
        return None

    # -- the Django-style write API ----------------------------------------------

    def save(self, obj: Any, *, using: str | None = None, force_insert: bool = False) -> None:
        """Add ``obj`` to be written at the next flush, as Django's ``Model.save(using=...)``.

        * With ``using``, the object is written there: an UPDATE if that database has a row
          with its primary key, else an INSERT (for a new object with its primary key set as
          well), and the object's db becomes ``using``.
        * Without, ``db_for_write(Model, instance=obj)`` decides.  An object loaded from another
          database than the one the routers name is written whole to that one (UPDATE, else
          INSERT) and its db becomes that alias, as in Django.
        * A new object whose primary key was set by hand is, with or without ``using``, an
          UPDATE of the row with that key if there is one (every column: the object's value,
          else the column's Python-side default, else NULL; a column with only a server-side
          default or a sequence keeps what it has), else an INSERT.  When the primary key
          column has a default of its own (Python- or server-side, not a sequence or an
          identity), a new object is always an INSERT, as since Django 3.0.
        * ``force_insert=True`` (what ``Manager.create()`` passes, as Django's does): a new
          object is an INSERT, never an UPDATE, even when its key is set.
        """
        state = instance_state(obj)
        if force_insert and state.key is not None:
            raise ShardkitError(
                f"force_insert=True is for a new {state.class_.__name__}: this one was loaded or saved already",
                model=state.class_,
            )
        insert_only = force_insert or _pk_has_default(state.mapper)
        if using is None and state.key is not None and self.pinned is None:
            target = self.cluster.router.db_for_write(state.class_, instance=obj)
            if isinstance(target, str) and target != db_of(obj):
                using = target
        if using is not None:
            using = self.cluster.check_alias(using)
            current = db_of(obj) if state.key is not None else None
            if current is not None and current != using:
                self._move(obj, using)
            elif state.key is None and _has_primary_key(state) and not insert_only:
                self._move(obj, using)  # its key may already be there: UPDATE, else INSERT
            else:
                state.info[_USING] = using
                if state.key is None:
                    state.identity_token = using
        elif state.key is None and _has_primary_key(state) and not insert_only:
            if state.session_id in (None, self.hash_key):
                # a key set by hand, as Django's save(): UPDATE where it is written, else INSERT
                self._move(obj, self.write_alias_of(obj))
        elif state.key is not None and self.pinned is None and state.session_id in (None, self.hash_key):
            current = db_of(obj)
            if current is not None and not self._row_exists(obj, current):
                self._move(obj, current)  # its row is gone from there: INSERT it again, as Django does
        self.add(obj)

    def _row_exists(self, obj: Any, alias: str) -> bool:
        """Whether ``alias`` has a row with ``obj``'s primary key (read in this session's transaction)."""
        mapper = instance_state(obj).mapper
        pk = mapper.primary_key_from_instance(obj)
        stmt = select(*mapper.primary_key).where(
            and_(*[col == value for col, value in zip(mapper.primary_key, pk, strict=True)])
        )
        conn = self.connection(bind_arguments={"shard_id": alias})
        return conn.execute(stmt.select_from(mapper.local_table)).first() is not None

    def _move(self, obj: Any, alias: str) -> None:
        state = instance_state(obj)
        mapper = state.mapper
        if state.session_id is not None and state.session_id != self.hash_key:
            raise ShardkitError(f"{mapper.class_.__name__} instance belongs to another session", model=mapper.class_)
        new = state.key is None
        if not new:
            # Load everything now: a copy must not miss expired or deferred columns.
            # No autoflush: the object's pending changes belong to the copy, not to its old alias.
            with self.no_autoflush:
                for prop in mapper.column_attrs:
                    value = getattr(obj, prop.key)
                    if prop.key not in state.dict:
                        set_committed_value(obj, prop.key, value)
        pk = mapper.primary_key_from_instance(obj)
        table = mapper.local_table
        exists_stmt = select(*mapper.primary_key).where(
            and_(*[col == value for col, value in zip(mapper.primary_key, pk, strict=True)])
        )
        conn = self.connection(bind_arguments={"shard_id": alias})
        exists = conn.execute(exists_stmt.select_from(table)).first() is not None
        if obj in self:
            self.expunge(obj)
        make_transient(obj)
        state.identity_token = alias
        # Another object of this session may stand for that row (the same key on that
        # database): the row is about to become this object's, as in Django.
        other = self.identity_map.get(mapper.identity_key_from_primary_key(tuple(pk), identity_token=alias))
        if other is not None and other is not obj:
            self.expunge(other)
        if exists:
            # the whole row is written, as Django's UPDATE does; a new object's unset columns
            # get what Django's __init__ would have given them (an INSERT gets SQLAlchemy's)
            written = _fill_new_row(obj, mapper, conn) if new else None
            make_transient_to_detached(obj)
            self.add(obj)
            pk_keys = {mapper.get_property_by_column(c).key for c in mapper.primary_key}
            for prop in mapper.column_attrs:
                if prop.key not in pk_keys and (written is None or prop.key in written):
                    flag_modified(obj, prop.key)
            if new:
                for rel in mapper.relationships:  # book.editor = person: its key is written too
                    if rel.direction is MANYTOONE and rel.key in state.dict and not rel.viewonly:
                        flag_modified(obj, rel.key)
        state.info[_USING] = alias
        state.info.pop(_DB, None)

    def delete_from(self, obj: Any, using: str) -> None:
        """Delete ``obj``'s row from ``using`` (Django's ``delete(using=...)``).

        If ``using`` is where the object lives this is :meth:`Session.delete`;
        otherwise the row with the object's primary key is deleted there and
        the object is left as it is.
        """
        using = self.cluster.check_alias(using)
        state = instance_state(obj)
        if state.key is None:
            raise ShardkitError(f"cannot delete a {state.class_.__name__} that was never saved", model=state.class_)
        if db_of(obj) == using:
            state.info[_USING] = using  # the flush deletes it there, not where db_for_write says
            self.delete(obj)
            return
        mapper = state.mapper
        pk = mapper.primary_key_from_instance(obj)
        self._note_statement_write(using)  # counts toward cross_shard_writes like any write
        _events.fire("pre_delete", state.class_, instance=obj, using=using)
        conn = self.connection(bind_arguments={"shard_id": using})
        for prop in _secondary_props(mapper):  # its link rows there go with it, as in Django
            owner_cols = [(prop.parent.get_property_by_column(o).key, s) for o, s in prop.synchronize_pairs]
            conn.execute(prop.secondary.delete().where(and_(*[s == getattr(obj, key) for key, s in owner_cols])))
        for table in reversed(mapper.tables):
            cols = [table.c[c.key] if c.table is not table else c for c in mapper.primary_key]
            conn.execute(table.delete().where(and_(*[c == v for c, v in zip(cols, pk, strict=True)])))
        _events.fire("post_delete", state.class_, instance=obj, using=using)

    # -- statement routing -------------------------------------------------------

    def _named(
        self, options: Iterable[Any], execution_options: Mapping[str, Any], shard_id: Any
    ) -> str | ShardTargets | None:
        """The shard a statement names itself, in order of precedence: a :class:`using` option
        (the last one wins, like Django's chained ``using()``), the ``shardkit_using`` execution
        option, the ``shard_id`` bind argument, a pinned session; ``None`` when none does.
        The one statement of this order, for execution and for :meth:`route` alike."""
        chosen: str | None = None
        for opt in options:
            if isinstance(opt, using):
                chosen = opt.alias
        if chosen is not None:
            return self.cluster.check_alias(chosen)
        if (alias := execution_options.get("shardkit_using")) is not None:
            return self._using_targets(alias)
        if shard_id is not None:
            return self.cluster.check_alias(shard_id)
        return self.pinned

    def _named_by(self, orm_context: ORMExecuteState) -> str | ShardTargets | None:
        """:meth:`_named` for an execution (with the options earlier listeners set: SQLAlchemy 2.1's
        ``ORMExecuteState.execution_options`` does not show ``update_execution_options()``)."""
        return self._named(
            _sqla.orm_options(orm_context),
            _sqla.current_execution_options(orm_context),
            orm_context.bind_arguments.get("shard_id"),
        )

    def _route(self, orm_context: ORMExecuteState) -> str | ShardTargets:
        """Where an execution runs: the shard the statement names (:meth:`_named`), else the
        object a refresh or lazy load comes from, else the routers."""
        named = self._named_by(orm_context)
        return named if named is not None else self._route_unnamed(orm_context)

    def _route_unnamed(self, orm_context: ORMExecuteState) -> str | ShardTargets:
        """Where an execution that names no shard runs: the object a refresh or lazy load comes
        from, else what the routers say."""
        router = self.cluster.router
        is_select = orm_context.is_select
        if is_select:
            token = _sqla.refresh_identity_token(orm_context)
            if token is not None:  # a refresh / expired-attribute load of one object
                return self.cluster.check_alias(token)
        model = _statement_model(orm_context)
        if model is None:
            return router.default
        statement = orm_context.statement
        params = orm_context.parameters
        hints: dict[str, Any] = {"statement": statement, "session": self}
        if params and isinstance(params, Mapping):
            hints["parameters"] = params  # values bound only at execution (selectin loads)
        if is_select:
            parent_state = orm_context.lazy_loaded_from
            if parent_state is not None:
                return router.db_for_read(model, instance=parent_state.obj(), **hints)
            top = _sqla.top_level_orm_context(orm_context)
            if top is not None:  # a selectin / subquery load of the objects read from one alias
                return self._route_post_load(orm_context, model, top, hints)
            return router.db_for_read(model, **hints)
        if isinstance(statement, TextClause):  # text() given a shardkit_model: read like the model
            return router.db_for_read(model, **hints)
        if not (orm_context.is_update or orm_context.is_delete or orm_context.is_insert) and reads_rows(statement):
            # from_statement(text("SELECT ...")): SQLAlchemy's is_select is False
            return router.db_for_read(model, **hints)
        return router.db_for_write(model, **hints)

    def _using_targets(self, value: Any) -> str | ShardTargets:
        """The ``shardkit_using`` execution option: one alias, or a list / tuple / set of aliases
        the statement runs on, results merged as a fan-out's are."""
        if isinstance(value, str):
            return self.cluster.check_alias(value)
        if isinstance(value, ShardTargets):  # shardkit.lookups: per-shard statements (an IN list split)
            for alias in value.statements:
                self.cluster.check_alias(alias)
            return value
        aliases = [self.cluster.check_alias(a) for a in dict.fromkeys(value)]
        if not aliases:
            raise InvalidRouteError("shardkit_using names no alias", alias=value)
        if len(aliases) == 1:
            return aliases[0]
        return ShardTargets(dict.fromkeys(aliases), reason="shardkit_using")

    def _route_post_load(
        self, orm_context: ORMExecuteState, model: type[Any], top: Any, hints: dict[str, Any]
    ) -> str | ShardTargets:
        """A selectin load run while the rows of one alias become objects (a fan-out turns each
        shard's rows into objects on their own): routed as a lazy load from one of those objects
        is, the routers asked with it as ``instance``, and by default to that alias.  When no
        parent object is at hand (a many-to-one selectin reads by the children's keys), a router
        that names one alias for the model still wins; otherwise the parents' alias."""
        router = self.cluster.router
        token = top.identity_token
        if token is None:  # pragma: no cover - every statement shardkit runs carries its alias
            return router.db_for_read(model, **hints)
        parent = self._post_load_parent(orm_context, token)
        if parent is not None:
            return router.db_for_read(model, instance=parent, **hints)
        opinion = router.read_opinion(model, **hints)
        return opinion if isinstance(opinion, str) else self.cluster.check_alias(token)

    def _post_load_parent(self, orm_context: ORMExecuteState, token: str) -> Any:
        """One of the objects a selectin load fills (looked up by the first parent key it reads)."""
        prop = getattr(orm_context.loader_strategy_path, "prop", None)
        params = orm_context.parameters
        if prop is None or getattr(prop, "direction", None) is MANYTOONE or not isinstance(params, Mapping):
            return None
        keys = params.get("primary_keys")
        if not keys:
            return None
        first = keys[0]
        ident = tuple(first) if isinstance(first, tuple | list) else (first,)
        try:
            key = prop.parent.identity_key_from_primary_key(ident, identity_token=token)
        except Exception:  # a key shape this mapper does not take: no parent at hand
            return None
        return self.identity_map.get(key)

    # -- the fast path: a plain SELECT routed before SQLAlchemy's event machinery ----------------

    def _execute_internal(
        self,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Any = _EMPTY,
        bind_arguments: Any = None,
        _parent_execute_state: Any = None,
        _add_event: Any = None,
        _scalar_result: bool = False,
        **kw: Any,
    ) -> Any:
        """Every execution of the session (``execute``, ``scalars``, ``get``, lazy loads) comes
        here.  A SELECT that :meth:`_fast_route` can place is routed here, before SQLAlchemy
        builds an ``ORMExecuteState`` for the ``do_orm_execute`` listeners: it runs with the
        alias in its bind arguments and identity token, as :meth:`_execute_routed` would have
        set them, and only the listeners after shardkit's own still run (none: no
        ``ORMExecuteState`` is built).  Everything else takes the listeners' path."""
        if _parent_execute_state is None and _add_event is None and not kw and type(statement) is Select:
            fast = self._fast_route(statement, params, execution_options, bind_arguments)
            if fast is not None:
                target, events, is_orm, by_lookup = fast
                if isinstance(target, str):
                    bind_arguments = {"shard_id": self.read_on(target, statement=statement)}
                    if events or not is_orm:  # listeners see the options the listeners' path gives
                        execution_options = {**execution_options, "identity_token": target, "shardkit_alias": target}
                    else:  # the same identity token, given straight in the load options
                        load = _sqla.LOAD_OPTIONS
                        given = execution_options.get(load) or self.execution_options.get(load)
                        execution_options = {
                            **execution_options,
                            load: _sqla.load_options_with_token(given, target),
                            "shardkit_alias": target,
                        }
                else:  # a fan-out: routed once, here; run by the listener's own code
                    events = [lambda orm_context: self._fanout(orm_context, target), *events]
                    if by_lookup is not None:  # as shardkit.lookups' listener names the shards
                        execution_options = {**execution_options, "shardkit_using": by_lookup}
                return _sqla.execute_with_events(
                    super()._execute_internal,
                    statement,
                    params,
                    execution_options,
                    bind_arguments,
                    events,
                    _scalar_result,
                )
        return super()._execute_internal(
            statement,
            params,
            execution_options=execution_options,
            bind_arguments=bind_arguments,
            _parent_execute_state=_parent_execute_state,
            _add_event=_add_event,
            _scalar_result=_scalar_result,
            **kw,
        )

    def _fast_path_ok(self) -> bool:
        """Whether this session's plain SELECTs may take the fast path at all.  A feature that
        acts on routed reads in :meth:`_execute_routed` or in a ``do_orm_execute`` listener
        registered before shardkit's (replicas, lookups, metrics ...) and that the fast path does
        not do itself must say no here (or in :meth:`_fast_route`) when it is in use."""
        return self.pinned is None

    def _fast_route(
        self, statement: Select[Any], params: Any, execution_options: Any, bind_arguments: Any
    ) -> tuple[str | ShardTargets, list[Any], bool, Any] | None:
        """Where a SELECT runs, decided as :meth:`_route` would decide it, and the
        ``do_orm_execute`` listeners that would run after shardkit's, whether it is an ORM
        statement, and the ``shardkit_using`` a lookup names the shards with (else ``None``);
        ``None`` when the statement
        is not one the fast path takes: one that names its shard (:meth:`_named`: ``using()``,
        ``shardkit_*`` execution options, a ``shard_id`` bind argument, a pinned session), a
        refresh, lazy or post-load (the object it comes from decides), a statement given an
        identity token, bind arguments or a model; a session whose listeners before shardkit's
        are not only :mod:`shardkit.lookups`' router (a lookup column routes here as it would)."""
        if bind_arguments or not self._fast_path_ok():
            return None
        for opts in (execution_options, _sqla.statement_execution_options(statement), self.execution_options):
            if opts and not _routes_by_statement(opts):
                return None
        for opt in _sqla.statement_options(statement):
            if isinstance(opt, using):
                return None
        listeners = list(self.dispatch.do_orm_execute)
        try:
            mine = listeners.index(_on_execute)
        except ValueError:
            return None
        is_orm, subject = _sqla.orm_subject(statement)
        after = listeners[mine + 1 :]
        if mine:  # listeners before shardkit's: only shardkit.lookups' may be, and it routes here
            found = _lookup_route(self, listeners[:mine], subject, statement, params)
            if found is False:
                return None
            if isinstance(found, str):
                return self.cluster.check_alias(found), after, is_orm, None
            if found is not None:  # the listener names the shards with shardkit_using
                named = tuple(found.statements) if all(s is None for s in found.statements.values()) else found
                return self._using_targets(named), after, is_orm, named
        model = subject.mapper.class_ if subject else _core_statement_model(statement)
        router = self.cluster.router
        if model is None:
            return router.default, after, is_orm, None
        if params and isinstance(params, Mapping):  # values bound only at execution (get() does this)
            target = router.db_for_read(model, statement=statement, session=self, parameters=params)
        else:
            target = router.db_for_read(model, statement=statement, session=self)
        return target, after, is_orm, None

    def _execute_routed(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        """Route one execution.  A SELECT on one alias goes on as SQLAlchemy's own execution (the
        alias in its bind arguments); a read of several aliases is a fan-out
        (:mod:`shardkit.fanout`); a write runs through :mod:`shardkit._writes`."""
        if orm_context.is_select:
            target = self._route(orm_context)
            if isinstance(target, str):
                # One alias for a SELECT: name it in the bind arguments and let SQLAlchemy go
                # on with this same execution (no second pass through Session.execute); the
                # alias is kept in the execution options for the identity key and shards_of().
                orm_context.bind_arguments["shard_id"] = self.read_on(target, orm_context)
                orm_context.update_execution_options(identity_token=target, shardkit_alias=target)
                return None
            return self._fanout(orm_context, target)
        named = self._named_by(orm_context)
        if named is None:  # an INSERT, or a bulk UPDATE by primary key: placed row by row
            if orm_context.is_insert:
                model = _statement_model(orm_context)
                if model is not None:
                    return _writes.routed_insert(self, orm_context, model)
            elif orm_context.is_update and _writes.is_bulk_update_by_pk(orm_context):
                model = _statement_model(orm_context)
                if model is not None:
                    return _writes.bulk_update(self, orm_context, model)
        target = named if named is not None else self._route_unnamed(orm_context)
        if isinstance(target, str):
            return _writes.invoke_on(self, orm_context, target)
        return self._fanout(orm_context, target)

    def read_on(self, alias: str, orm_context: ORMExecuteState | None = None, statement: Any = None) -> str:
        """The alias a SELECT routed to ``alias`` runs on: one of its replicas by its policy
        (:mod:`shardkit._replicas`), or ``alias`` itself when it has none, when this transaction
        wrote to it (read your writes), when the session holds changes the autoflush is about to
        write, when the statement asks for the primary (``using(alias, primary=True)``, the
        ``shardkit_primary`` execution option) or locks rows (``FOR UPDATE``, which a standby
        refuses).  The identity token stays ``alias``."""
        replicas = replicas_of(self.cluster)
        if replicas is None or alias not in replicas.sets or alias in self._tx_write_aliases:
            return alias
        if self.autoflush and not _sqla.is_clean(self):
            return alias
        stmt = orm_context.statement if orm_context is not None else statement
        if isinstance(stmt, Select) and _sqla.for_update(stmt) is not None:
            return alias
        if orm_context is not None and (
            orm_context.execution_options.get("shardkit_primary")
            or any(isinstance(opt, using) and opt.primary for opt in _sqla.orm_options(orm_context))
        ):
            return alias
        return replicas.read_alias(alias)

    def check_writes(self, aliases: Iterable[str]) -> None:
        """A statement is about to write on each of ``aliases``: check the cross-shard setting for
        all of them before the first is written."""
        self.cluster.check_write_aliases(self._tx_write_aliases | set(aliases))

    def note_writes(self, aliases: Iterable[str]) -> None:
        """A write statement is about to run on each of ``aliases``: apply the cross-shard write
        setting to all of them (before the first is written), then count them as written."""
        written = self._tx_write_aliases
        new = [a for a in aliases if a not in written]
        if not new:
            return
        self.cluster.check_write_aliases(written | set(new))
        written.update(new)

    def _note_statement_write(self, alias: str) -> None:
        """Kept for callers of the earlier name: :meth:`note_writes` of one alias."""
        self.note_writes((alias,))

    @contextlib.contextmanager
    def writing_on(self, alias: str) -> Iterator[None]:
        """While a bulk statement runs on ``alias``: SQLAlchemy's bulk paths ask ``get_bind``
        with the mapper only, and must not see the per-instance ``connection_callable``."""
        previous, self._bulk_alias = self._bulk_alias, alias
        try:
            yield
        finally:
            self._bulk_alias = previous

    def _fanout(self, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
        _observe.check_scatter(self, orm_context.statement, orm_context.execution_options, targets)
        if _writes.is_write(orm_context):
            return _writes.run_on_targets(self, orm_context, targets)
        return execute_fanout(self, orm_context, targets)

    def route(self, statement: Any) -> str | ShardTargets:
        """Where ``statement`` would run: one alias, or the :class:`ShardTargets` of a fan-out."""
        from .lookups import lookups_of, plan_lookup_route

        named = self._named(_sqla.statement_options(statement), _sqla.statement_execution_options(statement), None)
        if named is not None:
            return named
        descriptions = getattr(statement, "column_descriptions", None) or [{}]
        model = descriptions[0].get("entity") if descriptions else None
        if model is None:
            model = _sqla.statement_execution_options(statement).get("shardkit_model") or _core_statement_model(
                statement
            )
        if model is None:
            return self.cluster.router.default
        target = self.cluster.router.db_for_read(model, statement=statement, session=self)
        if isinstance(target, ShardTargets) and target.all_shards and lookups_of(model):
            found = plan_lookup_route(self, model, statement)  # shardkit.lookups: a lookup column names the shards
            if found is not None:
                return found.target
        return target

    def explain(self, statement: Any, *, analyze: bool = False) -> str:
        """What ``statement`` would do: the alias it runs on, or the SQL each shard gets and the merge plan.

        With ``analyze=True`` it is run (every row read) and each shard's rows and time and the
        merge time follow (see :func:`shardkit.observe.format_analyze`)."""
        if analyze:
            return _observe.explain_analyze(self, statement, self.explain(statement))
        from .fanout import plan_select
        from .lookups import lookup_step

        if not isinstance(statement, Select):
            raise ShardkitError(f"explain() takes a SELECT, got {type(statement).__name__}")
        target = self.route(statement)
        step = lookup_step(self, statement)  # shardkit.lookups: the lookup read, as a first line
        if isinstance(target, str):
            dialect = self.cluster.engine(target).dialect
            return step + f"single shard: {target}\n  " + str(statement.compile(dialect=dialect)).replace("\n", "\n  ")
        lines = [step + f"fan-out over {len(target.statements)} shards ({target.reason or 'routers'})"]
        base = plan_select(statement, shard_key_columns=target.shard_key_columns)
        for alias, stmt in target.statements.items():
            plan = (
                base
                if stmt is None
                else plan_select(
                    stmt,  # type: ignore[arg-type]
                    shard_key_columns=target.shard_key_columns,
                )
            )
            dialect = self.cluster.engine(alias).dialect
            sql = str(plan.shard_statement.compile(dialect=dialect)).replace("\n", "\n    ")
            lines.append(f"  {alias}:\n    {sql}")
        lines.append(base.merge.describe())
        return "\n".join(lines)


_COLLECTION_CACHE: dict[Mapper[Any], tuple[str, ...]] = {}


def _collection_keys(mapper: Mapper[Any]) -> tuple[str, ...]:
    keys = _COLLECTION_CACHE.get(mapper)
    if keys is None:
        keys = tuple(r.key for r in mapper.relationships if r.uselist and not r.viewonly)
        _COLLECTION_CACHE[mapper] = keys
    return keys


_SECONDARY_CACHE: dict[Mapper[Any], tuple[Any, ...]] = {}


def _secondary_props(mapper: Mapper[Any]) -> tuple[Any, ...]:
    """The relationships of ``mapper`` that write link rows to a secondary table."""
    props = _SECONDARY_CACHE.get(mapper)
    if props is None:
        props = tuple(r for r in mapper.relationships if r.secondary is not None and not r.viewonly)
        _SECONDARY_CACHE[mapper] = props
    return props


def link_opinion(router: Any, prop: Any, owner: Any) -> Any:
    """What the routers say about the link rows of ``owner``'s many-to-many ``prop``:
    ``db_for_write(<link table>, instance=owner)``, as Django asks.  A router that shards the
    link table itself by the owner's key (``shard_keys={"links": "owner_id"}``) cannot read that
    key from the owner: it is then shown the link row's owner columns (``db_for_write_rows``);
    if that gives no answer either, the router's error stands."""
    try:
        return router.write_opinion(prop.secondary, instance=owner)
    except ShardkitError:
        owner_mapper = prop.parent
        row = {
            str(sec.key): getattr(owner, owner_mapper.get_property_by_column(col).key)
            for col, sec in prop.synchronize_pairs
        }
        if None in row.values():
            raise
        try:
            aliases = router.db_for_write_rows(prop.secondary, [row])
        except ShardkitError:
            aliases = None
        if not aliases:
            raise
        return aliases[0]


def _has_primary_key(state: InstanceState[Any]) -> bool:
    """Whether a new object has every primary-key attribute set."""
    mapper = state.mapper
    return all(state.dict.get(mapper.get_property_by_column(c).key) is not None for c in mapper.primary_key)


def _pk_has_default(mapper: Mapper[Any]) -> bool:
    """Whether a primary-key column makes its own value (a Python- or server-side default; a
    sequence or an identity column is an auto-increment, Django's AutoField): Django >= 3.0
    then saves a new object with an INSERT, never an UPDATE."""
    for col in mapper.primary_key:
        default = col.default
        if default is not None and not getattr(default, "is_sequence", False):
            return True
        server = col.server_default
        if server is not None and not isinstance(server, Identity) and col.identity is None:
            return True
    return False


class _DefaultContext:
    """What a column default callable receives (``default=lambda ctx: ...``) when a new
    object's row is written by an UPDATE: the values of the row, as at an INSERT."""

    def __init__(self, params: dict[str, Any], column: Any, connection: Connection) -> None:
        self.current_parameters = params
        self.current_column = column
        self.connection = connection
        self.engine = connection.engine

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters


def _fill_new_row(obj: Any, mapper: Mapper[Any], connection: Connection) -> set[str]:
    """Give a new object's unset columns what Django's ``Model()`` gives its fields: the
    column's Python-side default (a callable called once), else ``None``; a column whose only
    default is server-side (or a sequence) is left out.  Returns the attribute keys to write."""
    state = instance_state(obj)
    params: dict[str, Any] = {}
    pending: list[tuple[str, Any]] = []
    written: set[str] = set()
    for prop in mapper.column_attrs:
        col = prop.columns[0]
        if prop.key in state.dict:
            params[str(col.key)] = state.dict[prop.key]
            written.add(prop.key)
        else:
            pending.append((prop.key, col))
    for key, col in pending:
        default = getattr(col, "default", None)
        if default is None:
            if getattr(col, "server_default", None) is not None:
                continue  # the database's own default: the row keeps what it has
            value = None
        elif getattr(default, "is_sequence", False):
            continue
        elif getattr(default, "is_callable", False):
            value = default.arg(_DefaultContext(params, col, connection))
        else:  # is_scalar, or is_clause_element: a SQL expression, written as such
            value = default.arg
        set_committed_value(obj, key, value)
        params[str(col.key)] = value
        written.add(key)
    return written


def _mapper_class(mapper: Any) -> type[Any] | None:
    if mapper is None:
        return None
    if isinstance(mapper, Mapper):
        return mapper.class_
    if isinstance(mapper, type):
        return mapper
    return None


#: Execution options that name a shard or change how a SELECT is routed (and every
#: ``shardkit_*`` one): a statement carrying one is routed by the listeners' path.
_ROUTING_OPTIONS = frozenset({"identity_token", "sa_top_level_orm_context"})


def _routes_by_statement(options: Mapping[str, Any]) -> bool:
    """Whether execution options leave a SELECT's routing to its statement (see :meth:`ShardSession._fast_route`)."""
    for name, value in options.items():
        if name in _ROUTING_OPTIONS or name.startswith("shardkit_"):
            return False
        if name == "_sa_orm_load_options" and not _sqla.routes_by_statement(value):
            return False
    return True


_LOOKUP_ROUTE: list[Any] = []  # shardkit.lookups.fast_path_route, imported at first use


def _lookup_route(session: ShardSession, listeners: list[Any], subject: Any, statement: Any, params: Any) -> Any:
    """What :mod:`shardkit.lookups`' listener would do with a SELECT (see its ``fast_path_route``):
    ``False`` when another listener runs before shardkit's, ``None`` when no lookup applies,
    else where the lookup sends the statement."""
    if not _LOOKUP_ROUTE:
        from .lookups._route import fast_path_route

        _LOOKUP_ROUTE.append(fast_path_route)
    return _LOOKUP_ROUTE[0](session, listeners, subject, statement, params)


# -- events, registered once for every ShardSession ----------------------------


_sqla.install()  # many-to-many link rows are written where their owner's routers say


@event.listens_for(ShardSession, "do_orm_execute", retval=True)
def _on_execute(orm_context: ORMExecuteState) -> Result[Any] | None:
    session = orm_context.session
    if not isinstance(session, ShardSession):  # pragma: no cover
        return None
    return session._execute_routed(orm_context)


@event.listens_for(ShardSession, "before_flush")
def _before_flush(session: Session, flush_context: Any, instances: Iterable[Any] | None) -> None:
    # Decide every alias before the first statement is sent: a router that
    # raises, or answers an unknown alias, must leave all databases untouched.
    assert isinstance(session, ShardSession)
    session._flush_aliases.clear()
    session._flush_conns.clear()
    session._link_aliases.clear()
    # the session's pending objects, read once (each of session.new / dirty / deleted builds a set)
    new = [instance_state(obj) for obj in session.new]
    dirty = list(session.dirty)
    dirty_states = [instance_state(obj) for obj in dirty]
    deleted = [instance_state(obj) for obj in session.deleted]
    session._note_collection_parents((*new, *dirty_states))
    session._route_new_in_batches(new)
    changed: list[Any] = []
    kept: list[InstanceState[Any]] = []
    for obj in dirty:
        if session.is_modified(obj, include_collections=False):
            changed.append(obj)
        elif session.is_modified(obj):
            # only a collection changed: no row of its own is written, it stays where it is
            # (its link rows and its children's rows are placed on their own)
            kept.append(instance_state(obj))
    aliases = session._flush_aliases
    for state in new:
        if state not in aliases:  # not placed in a batch above
            session._write_alias(state)
    for state in (*(instance_state(obj) for obj in changed), *deleted):
        session._write_alias(state)
    session._flush_writes = set(aliases.values())
    for state in kept:
        aliases[state] = _db_of_or_none(state.obj()) or session._decide_write_alias(state)
    session._route_links((*new, *dirty_states, *deleted), set(deleted))
    # the checks made before anything is written: relations, then the cross-shard write setting
    check_flush_relations(session)
    session.cluster.check_write_aliases(session._tx_write_aliases | set(session._flush_aliases.values()))
    if _events.active():  # Django's pre_save / pre_delete, with the alias of each write
        aliases = session._flush_aliases
        sent: list[tuple[str, Any, str, bool]] = []
        for obj in (*session.new, *changed):
            state = instance_state(obj)
            sent.append(("save", obj, aliases[state], state.key is None))
            _events.fire("pre_save", state.class_, instance=obj, using=aliases[state], created=state.key is None)
        for obj in session.deleted:
            state = instance_state(obj)
            sent.append(("delete", obj, aliases[state], False))
            _events.fire("pre_delete", state.class_, instance=obj, using=aliases[state])
        session.info["shardkit.flush_events"] = sent
    _group_inserts_by_alias(session)


def _group_inserts_by_alias(session: ShardSession) -> None:
    """Order new objects by alias, keeping their order within each alias.

    The unit of work batches INSERTs (executemany / insertmanyvalues) only over
    consecutive rows of one connection; objects interleaved across shards would
    be sent a row or two at a time.  Rows of different shards never depend on
    each other, so grouping them changes nothing but the number of round trips.

    Except for Python-side defaults that run per row at INSERT time (``default=callable``: an
    id generator, ``datetime.now``): they run in the order the rows are sent, so the rows of
    a class (an inheritance hierarchy) where such a default will run keep the order they were
    added in, and are not grouped.
    """
    aliases = session._flush_aliases
    if len(set(aliases.values())) < 2:
        return
    rank = {alias: i for i, alias in enumerate(session.cluster.aliases)}
    new = [(state, alias, state.insert_order) for state, alias in aliases.items() if state.key is None]
    in_add_order: set[Mapper[Any]] = set()
    for state, _alias, _order in new:
        keys = _callable_default_keys(state.mapper)
        if keys and any(k is None or state.dict.get(k) is None for k in keys):
            in_add_order.add(state.mapper.base_mapper)
    for state, alias, order in new:
        if order is None or (in_add_order and state.mapper.base_mapper in in_add_order):
            continue
        state.insert_order = rank[alias] * 1_000_000_000_000 + order % 1_000_000_000_000


_CALLABLE_DEFAULTS: dict[Mapper[Any], tuple[str | None, ...]] = {}


def _callable_default_keys(mapper: Mapper[Any]) -> tuple[str | None, ...]:
    """Attribute keys of the columns whose Python-side default is a callable run at INSERT time
    (``None`` for such a column no attribute maps: its default always runs)."""
    keys = _CALLABLE_DEFAULTS.get(mapper)
    if keys is None:
        found: list[str | None] = []
        for table in mapper.tables:
            for col in table.columns:
                default = col.default
                if default is not None and getattr(default, "is_callable", False):
                    try:
                        found.append(mapper.get_property_by_column(col).key)
                    except Exception:  # a column of the table that no attribute maps
                        found.append(None)
        keys = _CALLABLE_DEFAULTS[mapper] = tuple(found)
    return keys


@event.listens_for(ShardSession, "after_flush_postexec")
def _after_flush(session: Session, flush_context: Any) -> None:
    assert isinstance(session, ShardSession)
    for state, alias in session._flush_aliases.items():
        info = state.__dict__.get("info")
        if info is not None:
            info.pop(_USING, None)
        key = state.key
        if key is not None and key[2] == alias:  # its identity already says where it lives
            if info is not None:
                info.pop(_DB, None)
        else:
            _set_db(state, alias)
    session._tx_write_aliases.update(session._flush_writes)  # objects only touched wrote nothing
    session._flush_aliases.clear()
    session._flush_conns.clear()
    session._link_aliases.clear()
    session._collection_parents.clear()
    for kind, obj, alias, created in session.info.pop("shardkit.flush_events", ()):
        if kind == "save":
            _events.fire("post_save", type(obj), instance=obj, using=alias, created=created)
        else:
            _events.fire("post_delete", type(obj), instance=obj, using=alias)


@event.listens_for(ShardSession, "after_begin")
def _after_begin(session: Session, transaction: Any, connection: Connection) -> None:
    order = getattr(session, "_commit_order", None)
    if order is not None:  # a connection opened by the final flush of a commit
        order.add(connection)


@event.listens_for(ShardSession, "after_transaction_end")
def _after_transaction(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the outermost transaction ended: a new one starts clean
        assert isinstance(session, ShardSession)
        session._tx_write_aliases.clear()
