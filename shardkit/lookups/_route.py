"""Routing a statement by a lookup column: one lookup read, then the owning shard(s) only.

A ``do_orm_execute`` listener placed before shardkit's own routing: a SELECT, UPDATE or
DELETE of a model with lookups whose WHERE names no shard (no ``using()``, no shard key)
but has ``col == value`` or ``col.in_([...])`` on a lookup column in its top-level AND chain
reads the lookup rows of those values, turns their shard keys into aliases on the ring, and
names those aliases for the statement (an IN list keeps, per shard, the values whose rows are
there).  A lookup whose row is missing only sends the statement to a shard that returns nothing
for it, so reads stay right.  Values with no lookup row have no row (a row is never written
without its lookup): such a read goes to one shard, which answers nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, Grouping
from sqlalchemy.sql.visitors import replacement_traverse

from .. import _sqla
from .._session import ShardSession, using
from ..typing import ShardTargets
from . import _store
from ._declare import Lookup, any_declared, lookups_of
from ._write import tx_state

__all__ = ["LookupRoute", "fast_path_route", "lookup_step", "plan_lookup_route"]


@dataclass
class LookupRoute:
    """What a lookup decided for one statement (also what ``explain()`` prints)."""

    lookup: Lookup
    values: list[Any]
    keys: dict[Any, list[Any]]  # value -> shard keys found
    target: str | ShardTargets

    def describe(self) -> str:
        found = sum(len(k) for k in self.keys.values())
        aliases = [self.target] if isinstance(self.target, str) else list(self.target.statements)
        return (
            f"lookup step: {self.lookup.label} ({len(self.values)} value(s)) read from "
            f"{self.lookup.table.name} -> {found} shard key(s) -> {', '.join(aliases)}"
        )


def _conditions(statement: Any, columns: Mapping[Any, Lookup]) -> list[tuple[Lookup, bool, BindParameter[Any]]]:
    out: list[tuple[Lookup, bool, BindParameter[Any]]] = []
    for criterion in _sqla.where_of(statement):
        _collect(criterion, columns, out)
    return out


def _lookup_of(element: Any, columns: Mapping[Any, Lookup]) -> Lookup | None:
    proxy_set = getattr(element, "proxy_set", None)
    if not proxy_set:
        return None
    for column, lookup in columns.items():
        if column in proxy_set:
            return lookup
    return None


def _collect(clause: Any, columns: Mapping[Any, Lookup], out: list[tuple[Lookup, bool, BindParameter[Any]]]) -> None:
    if isinstance(clause, BooleanClauseList):
        if clause.operator is operators.and_:
            for sub in clause.clauses:
                _collect(sub, columns, out)
        return
    if isinstance(clause, Grouping):
        _collect(clause.element, columns, out)
        return
    if not isinstance(clause, BinaryExpression):
        return
    left, right = clause.left, clause.right
    if clause.operator is operators.eq:
        if isinstance(left, BindParameter) and not isinstance(right, BindParameter):
            left, right = right, left
        lookup = _lookup_of(left, columns)
        if lookup is not None and isinstance(right, BindParameter):
            out.append((lookup, False, right))
    elif clause.operator is operators.in_op and isinstance(right, BindParameter):
        lookup = _lookup_of(left, columns)
        if lookup is not None:
            out.append((lookup, True, right))


def _value_of(bind: BindParameter[Any], params: Mapping[str, Any] | None) -> Any:
    if params is not None and bind.key in params:
        return params[bind.key]
    if bind.callable is None and bind.value is None:
        return None
    return bind.effective_value


_COLUMNS: dict[type[Any], dict[Any, Lookup]] = {}


def _columns_of(model: type[Any]) -> dict[Any, Lookup]:
    found = _COLUMNS.get(model)
    if found is None:
        found = _COLUMNS[model] = {lk.column: lk for lk in lookups_of(model).values()}
    return found


def plan_lookup_route(session: ShardSession, model: Any, statement: Any, params: Any = None) -> LookupRoute | None:
    """Where ``statement`` (on ``model``) goes by a lookup column, or ``None`` when no lookup applies
    (no lookup condition, or the statement's shard key already routes it)."""
    if not isinstance(model, type):
        return None
    columns = _columns_of(model)
    if not columns:
        return None
    found = _conditions(statement, columns)
    if not found:
        return None
    _store.ring_router(session.cluster)  # settles each lookup's shard key with the router's
    mapping = params if isinstance(params, Mapping) else None
    first = found[0][0]
    keyed: list[tuple[Lookup, bool, BindParameter[Any]]] = []
    for criterion in _sqla.where_of(statement):
        _collect(criterion, {first.key_column: first}, keyed)
    if any(_value_of(bind, mapping) is not None for _lk, _is_in, bind in keyed):
        return None  # the shard key says where (the ring router reads it)
    if _other_routers(session):
        opinion = session.cluster.router.read_opinion(
            model, statement=statement, session=session, **({"parameters": mapping} if mapping else {})
        )
        if isinstance(opinion, str) or (isinstance(opinion, ShardTargets) and not opinion.all_shards):
            return None  # another router already says where
    # the first lookup condition whose values are known decides
    for lookup, is_in, bind in found:
        value = _value_of(bind, mapping)
        if value is None:
            continue
        if is_in:
            many = isinstance(value, Iterable) and not isinstance(value, str | bytes)
            values = [v for v in (value if many else [value]) if v is not None]
        else:
            values = [value]
        return _route_values(session, model, statement, lookup, values, bind if is_in and bind.expanding else None)
    return None


def _other_routers(session: ShardSession) -> bool:
    """Whether routers other than the ring router (a reshard's fence, the application's) may place reads."""
    chain = session.cluster.router
    try:
        return _OTHERS[chain]
    except (KeyError, TypeError):
        pass
    ring = _store.ring_router(session.cluster)
    others = any(r is not ring for r in chain.routers)
    with contextlib.suppress(TypeError):
        _OTHERS[chain] = others
    return others


_OTHERS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _read(session: ShardSession, lookup: Lookup, values: list[Any]) -> dict[Any, list[Any]]:
    router = _store.ring_router(session.cluster)
    by_alias: dict[str, list[Any]] = {}
    for value in values:
        by_alias.setdefault(_store.alias_of(router, lookup, value), []).append(value)
    state = tx_state(session, create=False)
    mine = state.inline_aliases if state is not None else set()
    keys: dict[Any, list[Any]] = {}
    for alias, part in by_alias.items():
        if alias in mine:  # this transaction wrote lookups there: read them in it
            conn = session.connection(bind_arguments={"shard_id": alias})
            got = _store.read_keys(conn, lookup, part)
        else:
            engine = session.cluster.engine(alias)
            if len(part) == 1 and lookup.plain_types and _store.raw_ok(engine):
                got = {part[0]: _store.read_one(engine, lookup, part[0])}
            else:
                with _store.reader(engine).connect() as conn:
                    got = _store.read_keys(conn, lookup, part)
        for value, rows in got.items():
            keys[value] = [k for k, _ms in rows]
    return keys


def _route_values(
    session: ShardSession, model: type[Any], statement: Any, lookup: Lookup, values: list[Any], bind: Any
) -> LookupRoute:
    router = _store.ring_router(session.cluster)
    keys = _read(session, lookup, values)
    owners: dict[str, list[Any]] = {}
    for value in values:
        for key in keys.get(value, ()):
            alias = _store.key_alias(router, lookup, key)
            owned = owners.setdefault(alias, [])
            if value not in owned:
                owned.append(value)
    ring_aliases = list(router.ring)
    ordered = [a for a in ring_aliases if a in owners]
    target: str | ShardTargets
    if not ordered:  # no lookup, so no row: one shard answers (nothing)
        target = ring_aliases[0]
    elif len(ordered) == 1:
        target = ordered[0]
    else:
        statements: dict[str, Any] = {}
        for alias in ordered:
            if bind is None:
                statements[alias] = None
            else:
                new_bind = _sqla.bind_with_value(bind, owners[alias])

                def swap(element: Any, _old: Any = bind, _new: Any = new_bind, **kw: Any) -> Any:
                    return _new if element is _old else None

                statements[alias] = _sqla.with_where_criteria(
                    statement, tuple(replacement_traverse(c, {}, swap) for c in _sqla.where_of(statement))
                )
        target = ShardTargets(
            statements=statements,
            reason=f"lookup {lookup.label}: values on {len(ordered)} shards",
            shard_key_columns=(),
        )
    return LookupRoute(lookup=lookup, values=values, keys=keys, target=target)


def _named(orm_context: ORMExecuteState, session: ShardSession) -> bool:
    if session.pinned is not None or orm_context.bind_arguments.get("shard_id") is not None:
        return True
    if orm_context.execution_options.get("shardkit_using") is not None:
        return True
    return any(isinstance(opt, using) for opt in _sqla.orm_options(orm_context))


@event.listens_for(ShardSession, "do_orm_execute", retval=True, insert=True)
def _route_by_lookup(orm_context: ORMExecuteState) -> Any:
    if not any_declared():
        return None
    if not (orm_context.is_select or orm_context.is_update or orm_context.is_delete):
        if orm_context.is_insert:
            from ._bulk import claim_statement_rows

            claim_statement_rows(orm_context)
        return None
    session = orm_context.session
    if not isinstance(session, ShardSession):
        return None
    mapper = orm_context.bind_mapper
    if mapper is None or not _columns_of(mapper.class_):
        return None
    if orm_context.is_select and (
        orm_context.lazy_loaded_from is not None
        or _sqla.refresh_identity_token(orm_context) is not None
        or _sqla.top_level_orm_context(orm_context) is not None
    ):
        return None
    if _named(orm_context, session):
        return None
    if orm_context.is_update:
        _refuse_lookup_update(orm_context, mapper.class_)
    route = plan_lookup_route(session, mapper.class_, orm_context.statement, orm_context.parameters)
    if route is None:
        return None
    if orm_context.is_delete:  # the rows it deletes lose their lookup after the commit
        state = tx_state(session)
        assert state is not None
        state.maybe_gone.extend((route.lookup, v, k) for v, keys in route.keys.items() for k in keys)
    target = route.target
    if isinstance(target, str):
        orm_context.bind_arguments["shard_id"] = target
    elif all(s is None for s in target.statements.values()):
        orm_context.update_execution_options(shardkit_using=tuple(target.statements))
    else:
        orm_context.update_execution_options(shardkit_using=target)
    return None


def _refuse_lookup_update(orm_context: ORMExecuteState, model: type[Any]) -> None:
    """An UPDATE statement that sets a lookup column would leave its lookups behind: refused."""
    from ..errors import ShardkitError

    statement = orm_context.statement
    values = _sqla.insert_values(statement)  # an UPDATE keeps its SET values the same way
    names = {getattr(k, "key", k) for k in values}
    params = orm_context.parameters
    if isinstance(params, Mapping):
        names |= set(params)
    for lookup in lookups_of(model).values():
        if lookup.attr in names or lookup.column.key in names:
            raise ShardkitError(
                f"an UPDATE statement may not set the lookup column {lookup.label}: load the objects and "
                "change them through the session (the lookup is kept right), or use "
                "shardkit.lookups.backfill afterwards",
                model=model,
                column=lookup.attr,
            )


def lookup_step(session: ShardSession, statement: Any) -> str:
    """The lookup step of ``explain()``: one line (ending in a newline), or ``""`` when none applies."""
    if not any_declared():
        return ""
    descriptions = getattr(statement, "column_descriptions", None) or [{}]
    model = descriptions[0].get("entity") if descriptions else None
    if _named_statement(session, statement):
        return ""
    found = plan_lookup_route(session, model, statement)
    return "" if found is None else found.describe() + "\n"


def _named_statement(session: ShardSession, statement: Any) -> bool:
    if session.pinned is not None:
        return True
    if _sqla.statement_execution_options(statement).get("shardkit_using") is not None:
        return True
    return any(isinstance(opt, using) for opt in _sqla.statement_options(statement))


def fast_path_route(
    session: ShardSession, listeners: list[Any], subject: Any, statement: Any, params: Any
) -> str | ShardTargets | bool | None:
    """For ``ShardSession``'s fast path of plain SELECTs (which builds no ``ORMExecuteState``):
    ``False`` when a ``do_orm_execute`` listener before shardkit's is not this module's (the
    listeners' path must run), ``None`` when no lookup applies (route as usual: by the shard key,
    or every shard), else where the lookup sends the statement."""
    for fn in listeners:
        if fn is not _route_by_lookup:
            return False
    if not any_declared() or subject is None:
        return None
    mapper = getattr(subject, "mapper", None)
    if mapper is None or not _columns_of(mapper.class_):
        return None
    route = plan_lookup_route(session, mapper.class_, statement, params)
    return None if route is None else route.target
