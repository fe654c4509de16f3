"""Routed writes: INSERT / UPDATE / DELETE statements, their bulk forms, and broadcast writes.

The session routes a statement (:mod:`shardkit._session`); when the statement writes, this
module runs it on its alias or aliases and merges what comes back:

* :func:`invoke_on` runs a statement on one alias, in the session's transaction, after the
  cross-shard write setting has been applied;
* :func:`run_on_targets` runs a write (or a ``text()`` statement shardkit cannot classify)
  on several aliases, one after another;
* :func:`routed_insert` places an INSERT (one row, ``values([...])`` or an executemany of
  rows) row by row, each shown to the routers as a stand-in instance, one batch per alias;
  :func:`bulk_update` does the same for SQLAlchemy's bulk UPDATE by primary key;
* :func:`merged` is the one place RETURNING rows (or row counts) of several shards become one
  result.

The session calls these only for a statement that does not name its shard itself (``using()``,
``shardkit_using``, ``shard_id``, a pinned session): those run where they say, by
:func:`invoke_on`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import BindParameter, inspect
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql.elements import TextClause

from . import _sqla
from ._placement import column_attr_keys, stand_in
from .errors import RoutingError
from .fanout._orm import ShardedResult, reads_rows
from .typing import ShardTargets

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import Mapper, ORMExecuteState

    from ._session import ShardSession

__all__ = [
    "bulk_update",
    "invoke_on",
    "is_bulk_update_by_pk",
    "is_write",
    "merged",
    "route_row",
    "routed_insert",
    "run_on_targets",
]

logger = logging.getLogger(__name__)


def is_write(orm_context: ORMExecuteState) -> bool:
    """Whether a statement routed to several aliases runs as writes (one alias after another,
    results concatenated or row counts summed) rather than as a planned fan-out read."""
    statement = orm_context.statement
    if isinstance(statement, TextClause):
        return True
    if isinstance(statement, FromStatement):
        return not reads_rows(statement)
    return not orm_context.is_select


def invoke_on(session: ShardSession, orm_context: ORMExecuteState, alias: str, statement: Any = None) -> Result[Any]:
    """Run ``orm_context``'s statement (or ``statement``) on ``alias``, marked with its shard."""
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = alias
    orm_context.update_execution_options(identity_token=alias)
    kwargs: dict[str, Any] = {"bind_arguments": bind_arguments}
    if statement is not None:
        kwargs["statement"] = statement
    if not (orm_context.is_insert or orm_context.is_update or orm_context.is_delete):
        result = orm_context.invoke_statement(**kwargs)  # a SELECT, or text() we cannot classify
    else:  # a bulk INSERT/UPDATE/DELETE on one known alias
        session.note_writes((alias,))
        with session.writing_on(alias):
            result = orm_context.invoke_statement(**kwargs)
    _mark(result, (alias,))
    return result


def _mark(result: Any, shards: tuple[str, ...]) -> None:
    with contextlib.suppress(AttributeError):  # a Result class with __slots__
        result.shards = shards


def merged(parts: list[Result[Any]], shards: tuple[str, ...], rowcount: int = 0) -> Result[Any]:
    """The RETURNING rows of every shard, shard after shard; without parts, an empty result
    that carries the summed row count."""
    if parts:
        result = parts[0].merge(*parts[1:]) if len(parts) > 1 else parts[0]
        _mark(result, shards)
        return result
    empty = ShardedResult(SimpleResultMetaData([]), iter(()))
    empty.shards = shards
    empty.rowcount = rowcount  # type: ignore[attr-defined]
    return empty


def run_on_targets(session: ShardSession, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
    """A write, or a ``text()`` statement, on several aliases, one after another, each in the
    session's transaction.  shardkit does not parse SQL, so there is no merge plan: rows that
    come back (RETURNING, a textual SELECT) are concatenated in alias order, and row counts of
    writes are summed."""
    statement = orm_context.statement
    logger.debug("%s on %d aliases (%s)", type(statement).__name__, len(targets.statements), targets.reason)
    parts = [invoke_on(session, orm_context, alias, stmt) for alias, stmt in targets.statements.items()]
    if isinstance(statement, TextClause):
        returning = all(getattr(part, "returns_rows", True) for part in parts)
    else:  # UPDATE/DELETE ... RETURNING, and from_statement() of any write (its rows are objects)
        returning = bool(_sqla.returning_of(statement)) or isinstance(statement, FromStatement)
    aliases = tuple(targets.statements)
    if returning:
        return merged(parts, aliases)
    total = 0
    for part in parts:
        total += int(getattr(part, "rowcount", 0) or 0)
        part.close()
    return merged([], aliases, total)


# -- INSERT / UPDATE statements routed row by row ----------------------------------------------


def routed_insert(session: ShardSession, orm_context: ORMExecuteState, model: type[Any]) -> Result[Any]:
    """An INSERT statement: to where the routers send the statement, else row by row."""
    opinion = session.cluster.router.write_opinion(model, statement=orm_context.statement, session=session)
    if isinstance(opinion, str):
        return invoke_on(session, orm_context, opinion)
    params = orm_context.parameters
    if isinstance(opinion, ShardTargets):  # e.g. a reference table: the same rows on every alias
        return _broadcast(session, orm_context, opinion)
    if isinstance(params, list):
        return _bulk_insert(session, orm_context, model, params)
    multi = _sqla.multi_values(orm_context.statement)
    if multi and not params:  # insert(User).values([{...}, {...}]): each row to its own shard
        return _multi_values_insert(session, orm_context, model, [ps for group in multi for ps in group])
    single: dict[str, Any] = dict(params or {})  # type: ignore[arg-type]
    row = dict(single)
    for col, bind in _sqla.insert_values(orm_context.statement).items():
        key = getattr(col, "key", col)
        row.setdefault(str(key), getattr(bind, "value", bind))
    alias, filled = route_row(session, model, row)
    extra = {k: v for k, v in filled.items() if row.get(k) is None}  # a key the routers generated
    if extra:
        return _invoke_with_key(session, orm_context, alias, {**single, **extra}, extra)
    return invoke_on(session, orm_context, alias)


def _invoke_with_key(
    session: ShardSession, orm_context: ORMExecuteState, alias: str, params: dict[str, Any], extra: dict[str, Any]
) -> Result[Any]:
    """Run a one-row INSERT on ``alias`` with the key a router filled in (``extra``)."""
    session.note_writes((alias,))
    bind_arguments = {**orm_context.bind_arguments, "shard_id": alias}
    with session.writing_on(alias):
        if orm_context.parameters is None:  # insert(...).values(...): add the key to the VALUES
            statement = orm_context.statement.values(**extra)  # type: ignore[attr-defined]
            result = orm_context.invoke_statement(statement=statement, bind_arguments=bind_arguments)
        else:
            result = orm_context.invoke_statement(params=params, bind_arguments=bind_arguments)
    return result


def _broadcast(session: ShardSession, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
    returning = bool(_sqla.returning_of(orm_context.statement))
    first: Result[Any] | None = None
    for alias in targets.statements:
        part = invoke_on(session, orm_context, alias)
        if returning and first is None:
            first = part  # the same rows went to every shard: return them once
        else:
            part.close()
    return merged([first] if first is not None else [], tuple(targets.statements))


def route_row(session: ShardSession, model: type[Any], row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The alias of one row to write, shown to the routers as a stand-in instance; the row is
    returned with any key a router filled in (a generated id) or converted (``"5"`` -> ``5``)."""
    mapper = _mapper_of(model)
    keys = column_attr_keys(mapper)
    obj = stand_in(mapper, {keys.get(k, k): v for k, v in row.items()})
    st = instance_state(obj)
    alias = session.cluster.router.db_for_write(model, instance=obj)
    if not isinstance(alias, str):  # pragma: no cover - RouterChain refuses this
        raise RoutingError(f"db_for_write gave several aliases for one {model.__name__} row")
    for col_key, attr in keys.items():
        value = st.dict.get(attr)
        name = attr if attr in row and col_key not in row else col_key  # as the row names it
        if value is not None and _changed_value(row.get(name), value):
            row = {**row, name: value}  # a key the routers filled in (or converted: "5" -> 5)
    return alias, row


def _bulk_insert(session: ShardSession, orm_context: ORMExecuteState, model: type[Any], rows: list[Any]) -> Result[Any]:
    """``session.execute(insert(User), rows)``: each row routed as its object would be, one batch per alias.

    Each row is shown to the routers as a stand-in instance (so a ring router reads its shard
    key, and may assign an id); rows are grouped per alias and each alias gets one executemany.
    """
    groups: dict[str, list[Any]] = {}
    batch_rows = list(rows)  # a router may replace a row with a copy holding a generated key
    aliases = session.cluster.router.db_for_write_rows(model, batch_rows, session=session)
    if aliases is not None:  # every router answered for the whole batch at once
        for alias, row in zip(aliases, batch_rows, strict=True):
            groups.setdefault(alias, []).append(row)
    else:
        for row in rows:
            alias, filled = route_row(session, model, row)
            groups.setdefault(alias, []).append(filled)
    session.check_writes(groups)  # a batch the cross-shard setting refuses writes nothing
    logger.debug("INSERT of %d %s rows on %s", len(rows), model.__name__, ", ".join(groups))
    total = 0
    returning = bool(_sqla.returning_of(orm_context.statement))
    parts: list[Result[Any]] = []
    core_table = _plain_core_table(orm_context, model, rows)
    for alias, batch in groups.items():
        if core_table is not None:  # the same INSERT, without the ORM's per-row bookkeeping
            session.note_writes((alias,))
            conn = session.connection(bind_arguments={"shard_id": alias})
            conn.execute(core_table.insert(), batch).close()
            total += len(batch)
            continue
        with session.writing_on(alias):
            part = session.execute(
                orm_context.statement,
                batch,
                execution_options=orm_context.local_execution_options,
                bind_arguments={**orm_context.bind_arguments, "shard_id": alias},
            )
        if returning:
            parts.append(part)
        else:
            part.close()
        total += len(batch)  # every row was sent, or execute() raised
    return merged(parts, tuple(groups), total)  # INSERT ... RETURNING: shard after shard


def _route_rows(
    session: ShardSession, model: type[Any], rows: list[dict[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """Each row's alias, and the row as routed (with any key a router filled in or converted)."""
    routed = list(rows)  # a router may replace a row with a copy holding its (new) key
    aliases = session.cluster.router.db_for_write_rows(model, routed, session=session)
    if aliases is not None:  # every router answered for the whole batch at once
        return list(zip(aliases, routed, strict=True))
    return [route_row(session, model, row) for row in rows]


def _multi_values_insert(
    session: ShardSession, orm_context: ORMExecuteState, model: type[Any], rows: list[Any]
) -> Result[Any]:
    """``insert(User).values([{...}, {...}])``: the rows grouped per alias as the routers place
    each one, and one multi-row INSERT per alias (its RETURNING rows shard after shard)."""
    statement = orm_context.statement
    table = statement.table  # type: ignore[attr-defined]
    plain = [_values_row(table, ps) for ps in rows]
    groups: dict[str, list[Any]] = {}
    for ps, row, (alias, routed) in zip(rows, plain, _route_rows(session, model, plain), strict=True):
        changed = {k: v for k, v in routed.items() if k not in row or _changed_value(row[k], v)}
        groups.setdefault(alias, []).append(_with_values(table, ps, changed) if changed else ps)
    session.check_writes(groups)
    returning = bool(_sqla.returning_of(statement))
    parts: list[Result[Any]] = []
    total = 0
    for alias, group in groups.items():
        part_statement = _sqla.with_multi_values(statement, group)
        part = invoke_on(session, orm_context, alias, part_statement)
        if returning:
            parts.append(part)
        else:
            total += max(getattr(part, "rowcount", 0) or 0, 0)
            part.close()
    return merged(parts, tuple(groups), total)


def bulk_update(session: ShardSession, orm_context: ORMExecuteState, model: type[Any]) -> Result[Any]:
    """``session.execute(update(User), rows)``, SQLAlchemy's bulk UPDATE by primary key.

    Where the routers place the statement as a whole on one alias, it runs there.  Where they
    would spread it over several (a sharded model), each row goes to the shard its own key
    names, one executemany per shard: a row must name its shard key (a router cannot fill
    one in for a row that already exists) or nothing is written.  A model whose rows are on
    every target (a reference table) still gets the whole batch on every one.
    """
    router = session.cluster.router
    statement = orm_context.statement
    opinion = router.write_opinion(model, statement=statement, session=session)
    if opinion is None:
        opinion = router.db_for_write(model, statement=statement, session=session)
    if isinstance(opinion, str):
        return invoke_on(session, orm_context, opinion)
    rows: list[dict[str, Any]] = list(orm_context.parameters)  # type: ignore[arg-type]
    routed_rows = list(rows)  # a router may replace a row with a copy holding its converted key
    aliases = router.db_for_write_rows(model, routed_rows, session=session)
    if aliases is not None:
        placed = list(zip(aliases, routed_rows, strict=True))
    elif router.write_rows_complete:  # no router places rows of this model (a reference table)
        return run_on_targets(session, orm_context, opinion)
    else:
        placed = [route_row(session, model, row) for row in rows]
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, (row, (alias, routed)) in enumerate(zip(rows, placed, strict=True)):
        filled = sorted(k for k, v in routed.items() if row.get(k) is None and v is not None)
        if filled:
            raise RoutingError(
                f"cannot route row {i} of a bulk UPDATE of {model.__name__}: it does not give its shard key "
                f"({', '.join(filled)}); give the key in every row, or update with a WHERE clause; "
                "nothing was written",
                model=model,
                attribute=filled[0],
            )
        groups.setdefault(alias, []).append(routed)
    session.check_writes(groups)
    total = 0
    for alias, batch in groups.items():
        with session.writing_on(alias):
            part = session.execute(
                statement,
                batch,
                execution_options=orm_context.local_execution_options,
                bind_arguments={**orm_context.bind_arguments, "shard_id": alias},
            )
        count = getattr(part, "rowcount", None)
        total += count if isinstance(count, int) and count >= 0 else len(batch)
        part.close()
    return merged([], tuple(groups), total)


def _mapper_of(model: type[Any]) -> Mapper[Any]:
    return inspect(model)  # type: ignore[no-any-return]


def _plain_core_table(orm_context: ORMExecuteState, model: type[Any], rows: list[Any]) -> Any:
    """The table, when an ORM bulk INSERT of ``rows`` is exactly a Core executemany on it.

    That is: one table (no inheritance), attribute names equal to column names, a bare
    ``insert(Model)`` (no ``values()``, no RETURNING, no extra options) and rows that all
    name the same columns.  The ORM path stays for everything else.
    """
    stmt = orm_context.statement
    if (
        _sqla.returning_of(stmt)
        or _sqla.insert_values(stmt)
        or _sqla.multi_values(stmt)
        or _sqla.post_values_clause(stmt) is not None
        or _sqla.statement_options(stmt)
        or {k for k in orm_context.local_execution_options if not k.startswith("_")} - {"shardkit_using"}
        or not rows
    ):
        return None
    mapper = _mapper_of(model)
    if len(mapper.tables) != 1 or mapper.inherits is not None or mapper.polymorphic_on is not None:
        return None
    keys = column_attr_keys(mapper)
    if any(col_key != attr for col_key, attr in keys.items()):
        return None
    first = rows[0].keys()
    if not first <= keys.keys() or any(row.keys() != first for row in rows):
        return None
    return mapper.local_table


def is_bulk_update_by_pk(orm_context: ORMExecuteState) -> bool:
    """Whether an UPDATE is SQLAlchemy's ORM bulk UPDATE by primary key: an ``update(Model)`` with
    no WHERE of its own, run with a list of parameter rows (each row's primary key picks its row,
    and SQLAlchemy checks that each one matched)."""
    statement = orm_context.statement
    table = getattr(statement, "table", None)
    return (
        isinstance(orm_context.parameters, list)
        and not _sqla.where_of(statement)
        and "parententity" in _sqla.annotations_of(table)
        and orm_context.execution_options.get("dml_strategy", "auto") in ("auto", "bulk")
    )


def _changed_value(old: Any, new: Any) -> bool:
    """Whether a router changed a row's value (filled it in, or converted it: ``"5"`` -> ``5``)."""
    if new is old:
        return False
    try:
        return type(new) is not type(old) or bool(new != old)
    except Exception:  # a value that does not compare (an SQL expression): it was replaced
        return True


def _plain_value(value: Any) -> Any:
    """A VALUES entry as the routers should see it: a bound parameter's own value."""
    if isinstance(value, BindParameter) and value.callable is None:
        return value.value
    return value


def _values_row(table: Any, parameter_set: Any) -> dict[str, Any]:
    """One row of a multi-row VALUES (a dict keyed by column or name, or a tuple in column order)
    as ``{column key: value}``."""
    if isinstance(parameter_set, Mapping):
        return {str(getattr(k, "key", k)): _plain_value(v) for k, v in parameter_set.items()}
    return {c.key: _plain_value(v) for c, v in zip(table.c, parameter_set, strict=False)}


def _with_values(table: Any, parameter_set: Any, changed: Mapping[str, Any]) -> dict[Any, Any]:
    """``parameter_set`` (a VALUES row) with the values of ``changed`` (column key -> value) set."""
    if isinstance(parameter_set, Mapping):
        out: dict[Any, Any] = dict(parameter_set)
    else:
        out = dict(zip(table.c, parameter_set, strict=False))
    by_key = {str(getattr(k, "key", k)): k for k in out}
    for col_key, value in changed.items():
        key = by_key.get(col_key)
        if key is None:
            key = table.c.get(col_key, col_key)
        out[key] = value
    return out
