"""The places where shardkit reaches into SQLAlchemy's internals, kept in one module.

* **``Model.relationship.through``.**  Django names a many-to-many's through model
  ``Book.authors.through``; the class-level relationship attribute gets the same name, giving
  the link table (``None`` for a relationship without one), which is what routers receive.
* **Many-to-many link rows.**  The unit of work writes the rows of a ``secondary`` table
  for every owner of one relationship at once, on the connection of
  ``session.get_bind(owner_mapper)``: with no instance, so a router cannot place them.
  Django writes link rows where ``db_for_write(<through model>, instance=owner)`` says.
  :func:`install` wraps the many-to-many dependency processor so that, in a
  :class:`~shardkit.ShardSession`, the owners are grouped by the alias of their link rows
  (:meth:`ShardSession.link_alias_of`) and each group is written on its own alias.
  Other sessions are left exactly as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Delete, Select, Update
from sqlalchemy.orm import configure_mappers, dependency
from sqlalchemy.orm.base import INCLUDE_PENDING_MUTATIONS, PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.relationships import RelationshipProperty

__all__ = ["install", "returning_of"]

_installed = False


def _grouped(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def process(self: Any, uowcommit: Any, states: Any) -> None:
        from ._session import ShardSession

        session = uowcommit.session
        states = list(states)
        if not isinstance(session, ShardSession) or not states:
            original(self, uowcommit, states)
            return
        groups: dict[str, list[Any]] = {}
        for state in states:
            if (self.prop, state) in session._link_aliases or _has_link_changes(self, uowcommit, state):
                alias = session.link_alias_of(self.prop, state)
            else:  # no link row to write: no router question, no new connection
                alias = session._flush_aliases.get(state) or session.link_alias_of(self.prop, state)
            groups.setdefault(alias, []).append(state)
        previous = session._link_alias
        try:
            for alias, group in groups.items():
                session._link_alias = alias
                original(self, uowcommit, group)
        finally:
            session._link_alias = previous

    return process


def _has_link_changes(processor: Any, uowcommit: Any, state: Any) -> bool:
    history = uowcommit.get_attribute_history(state, processor.key, PASSIVE_NO_INITIALIZE | INCLUDE_PENDING_MUTATIONS)
    return bool(history and (history.added or history.deleted))


def _through(comparator: Any) -> Any:
    """``Book.authors.through``: the link table of a relationship (``None`` without one)."""
    configure_mappers()  # ``secondary`` is resolved when the mappers are configured
    return comparator.prop.secondary


def install() -> None:
    """Wrap the many-to-many processor once, add ``.through`` (idempotent)."""
    global _installed
    if _installed:
        return
    comparator: Any = RelationshipProperty.Comparator
    if not hasattr(comparator, "through"):
        comparator.through = property(_through)
    processor: Any = getattr(dependency, "_ManyToManyDP", None) or dependency.ManyToManyDP  # type: ignore[attr-defined]
    processor.process_saves = _grouped(processor.process_saves)
    processor.process_deletes = _grouped(processor.process_deletes)
    _installed = True


# -- statement internals ------------------------------------------------------


def returning_of(statement: Any) -> tuple[Any, ...]:
    """The RETURNING columns of an INSERT / UPDATE / DELETE (``()`` for anything else)."""
    return getattr(statement, "_returning", ()) or ()


# -- a SELECT's parts, as the fan-out planner reads them ------------------------------------
# ``Select`` keeps its clauses in private attributes; these are the only reads of them.


def raw_columns(stmt: Any) -> tuple[Any, ...]:
    """The columns clause of ``stmt`` as written (an ORM entity is one element)."""
    return tuple(stmt._raw_columns)


def where_criteria(stmt: Any) -> tuple[Any, ...]:
    return tuple(stmt._where_criteria)


def having_criteria(stmt: Any) -> tuple[Any, ...]:
    return tuple(stmt._having_criteria)


def order_by_clauses(stmt: Any) -> tuple[Any, ...]:
    return tuple(stmt._order_by_clauses)


def group_by_clauses(stmt: Any) -> tuple[Any, ...]:
    return tuple(stmt._group_by_clauses)


def from_objects(stmt: Any) -> tuple[Any, ...]:
    """The explicit FROM list of ``stmt`` (``select_from()``), not the implied froms."""
    return tuple(stmt._from_obj)


def setup_joins(stmt: Any) -> tuple[Any, ...]:
    """The ``join()`` / ``join_from()`` calls of ``stmt``."""
    return tuple(stmt._setup_joins)


def is_distinct(stmt: Any) -> bool:
    return bool(stmt._distinct)


def distinct_on(stmt: Any) -> tuple[Any, ...]:
    """The DISTINCT ON expressions of ``stmt`` as SQLAlchemy 2.0 keeps them (2.1 keeps them as a
    ``postgresql_distinct_on`` element of the columns clause as well: see :func:`raw_columns`)."""
    return tuple(getattr(stmt, "_distinct_on", ()))


def syntax_extensions(stmt: Any) -> list[Any]:
    """The dialect syntax extensions of ``stmt`` (``ext=``: PostgreSQL's DISTINCT ON in 2.1 ...),
    each one clause element; empty on SQLAlchemy 2.0."""
    names = ("_pre_columns_clause", "_post_select_clause", "_post_criteria_clause", "_post_body_clause")
    return [clause for clause in (getattr(stmt, name, None) for name in names) if clause is not None]


def limit_clause(stmt: Any) -> Any:
    return stmt._limit_clause


def offset_clause(stmt: Any) -> Any:
    return stmt._offset_clause


def fetch_clause(stmt: Any) -> Any:
    """FETCH FIRST (``Select.fetch()``), or ``None``."""
    return stmt._fetch_clause


def simple_limit(stmt: Any) -> int | None:
    """The LIMIT as an integer (raises when it is an expression)."""
    value: int | None = stmt._limit
    return value


def simple_offset(stmt: Any) -> int | None:
    value: int | None = stmt._offset
    return value


def for_update(stmt: Any) -> Any:
    """The FOR UPDATE clause of ``stmt``, or ``None``."""
    return stmt._for_update_arg


def is_orm_statement(stmt: Any) -> bool:
    """Whether ``stmt`` is ORM-enabled (selects an entity or a mapped attribute)."""
    return bool(stmt._propagate_attrs.get("compile_state_plugin") == "orm")


def annotations_of(element: Any) -> Any:
    """The annotations of a clause element (``parententity`` of an ORM attribute ...)."""
    return getattr(element, "_annotations", {})


def deannotate(element: Any) -> Any:
    """``element`` without its ORM annotations (the plain table column)."""
    return element._deannotate()


def result_column_names(compiled: Any) -> tuple[str, ...]:
    """The names of the result columns of a compiled SELECT, in order."""
    return tuple(str(rc[0]) for rc in compiled._result_columns)


def decimal_return_scale(type_: Any) -> int | None:
    """The scale a ``Numeric`` result type gives its ``Decimal`` values."""
    scale: int | None = type_._effective_decimal_return_scale
    return scale


def label_reference_classes() -> tuple[type[Any], type[Any]]:
    """(ORDER BY / GROUP BY by label name, by textual name): ``order_by("name")``."""
    from sqlalchemy.sql import elements

    return elements._label_reference, elements._textual_label_reference


def with_clauses_replaced(stmt: Any, **clauses: Any) -> Any:
    """A copy of ``stmt`` with some of its clauses replaced, as the generative methods would
    leave them but without their checks: ``having=()``, ``distinct=False``."""
    names = {"having": "_having_criteria", "distinct": "_distinct"}
    copy = stmt._generate()
    for key, value in clauses.items():
        setattr(copy, names[key], value)
    return copy


def lambda_statement(stmt: Any) -> Any:
    """A ``lambda_stmt()``'s statement, with the bound values of this call."""
    return stmt._resolved


# -- an ORM execution and its results -------------------------------------------------------


def load_options(orm_context: Any) -> Any:
    """The ORM load options of an execution (SQLAlchemy gives them only for what it calls a
    SELECT; a ``from_statement()`` over ``text()`` reads too)."""
    if orm_context.is_select:
        return orm_context.load_options
    from sqlalchemy.orm.context import QueryContext

    return orm_context.execution_options.get("_sa_orm_load_options", QueryContext.default_load_options)


def wants_autoflush(orm_context: Any) -> bool:
    """Whether the execution autoflushes first (``autoflush`` execution option, session default)."""
    return bool(load_options(orm_context)._autoflush)


def autoflush(session: Any) -> None:
    """Flush as SQLAlchemy does before a query (no-op unless the session autoflushes)."""
    session._autoflush()


def only_return_tuples(orm_context: Any) -> bool:
    """``Query.tuples()`` / ``only_return_tuples(True)``: rows, even for one entity."""
    return bool(load_options(orm_context)._only_return_tuples)


def result_attributes(result: Any) -> Any:
    """What the ORM tells a legacy Query about a result (``is_single_entity``, ``filtered``)."""
    return result._attributes


def set_result_attributes(result: Any, attributes: Any) -> None:
    result._attributes = attributes


def needs_unique(result: Any) -> bool:
    """Whether an ORM result must be uniqued (joined eager loads of collections)."""
    return getattr(result, "_unique_filter_state", None) is not None


def wrapped_result(result: Any) -> Any:
    """The result a filtering wrapper (``ScalarResult``, ``MappingResult`` ...) reads from."""
    return getattr(result, "_real_result", None)


def held_connection(session: Any, engine: Any) -> Any:
    """The connection the session's outermost transaction holds for ``engine``, or ``None``.

    SQLAlchemy has no public way to ask without connecting (``session.connection()`` would
    check one out): this reads the transaction's connection map.
    """
    trans = session.get_transaction()
    while trans is not None and trans.parent is not None:
        trans = trans.parent
    entry = trans._connections.get(engine) if trans is not None else None
    return None if entry is None else entry[0]


# -- pools and DBAPI connections ------------------------------------------------------------


def waits_for_checkout(pool: Any) -> bool:
    """Whether ``pool`` is a thread ``QueuePool`` whose checkout waits ``pool_timeout`` seconds."""
    from sqlalchemy.pool import QueuePool

    return isinstance(pool, QueuePool) and not pool._is_asyncio and "_timeout" in vars(pool)


def pool_with_checkout_wait(pool_class: type[Any], wait: Callable[[float], float]) -> type[Any]:
    """A subclass of ``pool_class`` (a ``QueuePool``) whose checkout waits ``wait(pool_timeout)``
    seconds for a free connection.  ``QueuePool._do_get`` reads ``self._timeout``: only that read
    changes; the pool still stores ``pool_timeout``."""

    def _get(self: Any) -> float:
        return wait(self.__dict__["_timeout"])

    def _set(self: Any, value: float) -> None:
        self.__dict__["_timeout"] = value

    namespace = {"__module__": pool_class.__module__, "__slots__": (), "_timeout": property(_get, _set)}
    return type(pool_class.__name__, (pool_class,), namespace)


def dbapi_connection(conn: Any) -> Any:
    """The driver's connection under a SQLAlchemy ``Connection``."""
    return conn.connection.dbapi_connection


# -- routing: where a statement's shard key sits ----------------------------------------------

#: Statement classes whose WHERE is ``_where_criteria`` (a lambda statement is not one of them).
WHERE_STATEMENTS: frozenset[type[Any]] = frozenset({Select, Update, Delete})


def cache_key(statement: Any) -> tuple[Any, list[Any]] | None:
    """``(shape, bound parameters)`` of a statement: SQLAlchemy's cache key, which it memoizes on
    the statement and uses for its compiled cache, so asking first costs nothing more; ``None``
    when the statement cannot be cached.  Statements of one shape list their parameters in the
    same order."""
    found = statement._generate_cache_key()
    return None if found is None else (found.key, found.bindparams)


def where_of(statement: Any) -> tuple[Any, ...]:
    """The top-level WHERE conditions of a SELECT / UPDATE / DELETE (``()`` for anything else)."""
    return getattr(statement, "_where_criteria", ()) or ()


def with_where_criteria(statement: Any, criteria: tuple[Any, ...]) -> Any:
    """A copy of ``statement`` whose WHERE conditions are ``criteria``."""
    new = statement._generate()
    new._where_criteria = criteria
    return new


def bind_with_value(bind: Any, value: Any) -> Any:
    """A copy of a bound parameter holding ``value``, under the same key."""
    return bind._with_value(value, maintain_key=True)


def orm_options(orm_context: Any) -> tuple[Any, ...]:
    """The ORM options of an execution that do not take part in compiling (``using()`` is one)."""
    return orm_context._non_compile_orm_options  # type: ignore[no-any-return]


def statement_options(statement: Any) -> tuple[Any, ...]:
    """The ``.options()`` of a statement (``()`` for one without)."""
    return getattr(statement, "_with_options", ()) or ()


def statement_execution_options(statement: Any) -> Any:
    """The execution options set on a statement itself (``.execution_options()``)."""
    return getattr(statement, "_execution_options", None) or {}


def refresh_identity_token(orm_context: Any) -> Any:
    """The identity token of the one object a refresh / expired-attribute load is for, or ``None``."""
    return orm_context.load_options._identity_token


def top_level_orm_context(orm_context: Any) -> Any:
    """The load whose rows a selectin / subquery load runs for (``None`` for a top-level one)."""
    return orm_context.load_options._sa_top_level_orm_context


# -- streamed results -----------------------------------------------------------------------


def cursor_result_of(result: Any) -> Any:
    """The ``CursorResult`` a result reads from: itself, or the one under an ORM result
    (``raw``); ``None`` when there is none."""
    from sqlalchemy.engine import CursorResult

    for candidate in (result, getattr(result, "raw", None)):
        if isinstance(candidate, CursorResult):
            return candidate
    return None


def is_server_side(cursor_result: Any) -> bool:
    """Whether ``cursor_result`` streams from a server-side cursor (``stream_results`` /
    ``yield_per``) and is still open."""
    return bool(cursor_result.context._is_server_side) and not cursor_result._soft_closed


def wrap_dbapi_cursor(cursor_result: Any, wrap: Callable[[Any], Any]) -> bool:
    """Put ``wrap(driver cursor)`` in place of the driver cursor ``cursor_result`` fetches from
    (and closes).  SQLAlchemy reads ``CursorResult.cursor`` on every fetch."""
    cursor = cursor_result.cursor
    if cursor is None:
        return False
    cursor_result.cursor = wrap(cursor)
    return True


def ensure_configured(mapper: Any) -> None:
    """Configure the mappers if ``mapper`` is not configured yet (cheap when it is)."""
    mapper._check_configure()


# -- an INSERT's VALUES ----------------------------------------------------------------------


def insert_values(statement: Any) -> Mapping[Any, Any]:
    """The single-row ``values(...)`` of an INSERT (column -> value or bound parameter), or ``{}``."""
    return getattr(statement, "_values", None) or {}


def multi_values(statement: Any) -> tuple[Any, ...]:
    """The groups of rows of a multi-row ``values([...])``, or ``()``."""
    return getattr(statement, "_multi_values", ()) or ()


def with_multi_values(statement: Any, rows: list[Any]) -> Any:
    """A copy of a multi-row INSERT whose VALUES are ``rows``."""
    new = statement._generate()
    new._multi_values = (rows,)
    return new


def post_values_clause(statement: Any) -> Any:
    """What follows an INSERT's VALUES (``ON CONFLICT ...``, ``ON DUPLICATE KEY ...``), or ``None``."""
    return getattr(statement, "_post_values_clause", None)


def committed_connections(transaction: Any) -> list[Any]:
    """Every connection a session transaction opened itself and will commit (a connection the
    session was given, joined with a savepoint or rollback-only, is left out).

    SQLAlchemy keeps them in ``SessionTransaction._connections`` as ``(conn, trans,
    should_commit, autoclose)``, under two keys each (the connection and its engine)."""
    conns = {id(entry[0]): entry[0] for entry in transaction._connections.values() if entry[2] and entry[3]}
    return list(conns.values())


# -- mappers, relationships, events ------------------------------------------------------------


def all_registries() -> list[Any]:
    """Every ORM registry (each declarative base has one), for finding the class of a table."""
    from sqlalchemy.orm import mapperlib

    return list(mapperlib._all_registries())


def reverse_properties(prop: Any) -> Any:
    """The relationships on the other side of ``prop`` (its ``back_populates`` / backref)."""
    return prop._reverse_property


def listen_on_connection(conn: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
    """Put a listener on one connection's own events, as ``event.listen`` itself would (for the
    SQLAlchemy 2.0 releases whose ``event.listen`` refuses a connection of an engine made by
    ``engine.execution_options()``); ``kw``: ``retval=True`` ..."""
    from sqlalchemy.engine.events import ConnectionEvents
    from sqlalchemy.event.registry import _EventKey

    ConnectionEvents._listen(_EventKey(conn, name, fn, conn), **kw)


def session_by_hash_key(hash_key: Any) -> Any:
    """The live Session whose ``hash_key`` an instance state's ``session_id`` names, or ``None``
    (SQLAlchemy's private registry of sessions, ``orm.session._sessions``)."""
    from sqlalchemy.orm.session import _sessions

    return _sessions.get(hash_key)


# -- the routed fast path (ShardSession._execute_internal) -------------------------------------


def orm_subject(statement: Any) -> tuple[bool, Any]:
    """``(is an ORM statement, its plugin subject)``: the entity SQLAlchemy names the statement's
    ``bind_arguments["mapper"]`` after (``None`` when it has none, and for a Core statement)."""
    attrs = statement._propagate_attrs
    if attrs.get("compile_state_plugin") != "orm":
        return False, None
    return True, attrs.get("plugin_subject")


def routes_by_statement(load_options: Any) -> bool:
    """Whether ORM load options leave routing to the statement alone: not a refresh or an
    expired-attribute load, a lazy load, a selectin / subquery load of other objects' rows,
    or a load given an identity token."""
    return (
        load_options._identity_token is None
        and load_options._lazy_loaded_from is None
        and load_options._refresh_state is None
        and load_options._sa_top_level_orm_context is None
    )


def identity_dict(identity_map: Any) -> Mapping[Any, Any]:
    """The plain dict behind a session's identity map: identity key -> instance state (a state
    whose object is gone may still be there; the map's own lookups skip it)."""
    return identity_map._dict  # type: ignore[no-any-return]


def current_execution_options(orm_context: Any) -> Mapping[str, Any]:
    """An execution's options as they are now: the statement's, then the execution's own with
    what listeners added (``ORMExecuteState.execution_options`` is computed once, at its start,
    on SQLAlchemy 2.1)."""
    own = orm_context.statement._execution_options
    local = orm_context.local_execution_options
    return own.union(local) if own else local  # type: ignore[no-any-return]


_TOKEN_LOAD_OPTIONS: dict[Any, Any] = {}  # identity token -> the default load options with it


def load_options_with_token(load_options: Any, token: Any) -> Any:
    """ORM load options (SQLAlchemy's defaults when ``None``) under which the objects a SELECT
    loads are keyed by ``token`` in the identity map: what the ``identity_token`` execution
    option gives, without SQLAlchemy merging it into the options on every execution."""
    if load_options is None:
        found = _TOKEN_LOAD_OPTIONS.get(token)
        if found is None:
            from sqlalchemy.orm.context import QueryContext

            found = _TOKEN_LOAD_OPTIONS[token] = QueryContext.default_load_options + {"_identity_token": token}
        return found
    return load_options + {"_identity_token": token}


#: the execution option SQLAlchemy reads ORM load options from
LOAD_OPTIONS = "_sa_orm_load_options"


class _EventsLeft:
    """What ``Session._execute_internal`` takes as ``_parent_execute_state``: it only asks it for
    the ``do_orm_execute`` listeners still to run (none: SQLAlchemy builds no ORMExecuteState)."""

    __slots__ = ("events",)

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def _remaining_events(self) -> list[Any]:
        return self.events


def execute_with_events(
    execute_internal: Callable[..., Any],
    statement: Any,
    params: Any,
    execution_options: Any,
    bind_arguments: Any,
    events: list[Any],
    scalar_result: bool,
) -> Any:
    """Run ``Session._execute_internal`` (``execute_internal``, bound) with only ``events`` as the
    ``do_orm_execute`` listeners of this execution, in this order."""
    return execute_internal(
        statement,
        params,
        execution_options=execution_options,
        bind_arguments=bind_arguments,
        _parent_execute_state=_EventsLeft(events),
        _scalar_result=scalar_result,
    )


def is_clean(session: Any) -> bool:
    """Whether ``session`` holds no new, deleted or modified object (nothing an autoflush would write)."""
    return bool(session._is_clean())
