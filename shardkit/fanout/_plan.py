"""Plan a SELECT that runs on several shards: per-shard rewrite + merge plan.

:func:`plan_select` is pure (no database).  It turns a :class:`~sqlalchemy.sql.Select`
(Core or ORM-enabled) into a :class:`FanoutPlan`:

* ``shard_statement``, what every shard runs.  ORDER BY values that are not
  selected are appended as hidden labeled columns (``_sk_0`` ...); LIMIT
  becomes ``LIMIT offset+limit`` without OFFSET; aggregates become partial
  aggregates (AVG -> SUM and COUNT; COUNT(DISTINCT x) -> x added to the GROUP
  BY); HAVING moves to the merge.
* ``merge``, a :class:`~shardkit.fanout._merge.MergePlan`: plain data read by
  :func:`~shardkit.fanout._merge.merge_rows`.

Row positions
-------------
Positions in a shard row are the elements of the row *as SQLAlchemy returns
it*: for an ORM-enabled statement run through a ``Session``, an entity
(``select(User)``) is one element; for a Core statement run through a
``Connection``, ``select(users)`` is one element per column.

What is refused
---------------
Anything whose merge would not be exact raises
:class:`~shardkit.errors.UnsupportedQueryError` with ``construct`` naming it:
window functions, set operations, LIMIT/OFFSET, aggregates, GROUP BY or
DISTINCT inside a subquery or CTE, FOR UPDATE, FETCH FIRST, ORDER BY random(),
ROLLUP/CUBE/GROUPING SETS, aggregate FILTER / WITHIN GROUP, any aggregate other
than COUNT/SUM/MIN/MAX/AVG (string_agg, array_agg, percentile ...), DISTINCT ON
that does not include a shard key column, SELECT without FROM, LIMIT/OFFSET
given as an expression, aggregates inside expressions the merge cannot compute
(the merge computes ``+ - * /``, comparisons, AND/OR/NOT, IS NULL, IN (literal
list), coalesce() and CAST(... AS FLOAT) in Python), and columns that are
neither grouped nor aggregated.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.sql import elements, functions, operators, selectable, sqltypes, visitors

from shardkit import _sqla
from shardkit.errors import UnsupportedQueryError
from shardkit.fanout._merge import (
    AggregatePlan,
    AggregateSpec,
    BinOp,
    BoolOp,
    Coalesce,
    Const,
    InList,
    IsNull,
    MergePlan,
    Neg,
    Not,
    PyExpr,
    Reduce,
    Ref,
    SortKey,
    ToFloat,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.sql import Select
    from sqlalchemy.sql.elements import ColumnElement

__all__ = ["FanoutPlan", "plan_from_statement", "plan_select"]

SUPPORTED_AGGREGATES = frozenset({"count", "sum", "min", "max", "avg"})

#: Aggregate (and ordered-set / hypothetical-set) functions the merge cannot
#: recombine exactly.  Unknown user-defined aggregates cannot be detected.
REFUSED_AGGREGATES = frozenset(
    {
        "array_agg", "string_agg", "group_concat", "listagg", "json_agg", "jsonb_agg",
        "json_object_agg", "jsonb_object_agg", "json_arrayagg", "json_objectagg", "xmlagg",
        "aggregate_strings", "percentile_cont", "percentile_disc", "mode", "median",
        "every", "bool_and", "bool_or", "bit_and", "bit_or", "bit_xor", "any_value",
        "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp",
        "corr", "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count",
        "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy",
        "rank", "dense_rank", "percent_rank", "cume_dist", "row_number", "ntile",
        "lag", "lead", "first_value", "last_value", "nth_value", "total", "grouping",
        "range_agg", "range_intersect_agg", "std", "approx_count_distinct",
    }
)  # fmt: skip

_GROUPING_CONSTRUCTS = frozenset({"rollup", "cube", "grouping sets", "grouping_sets"})

_CMP_OPS: dict[Any, str] = {
    operators.eq: "=",
    operators.ne: "!=",
    operators.lt: "<",
    operators.le: "<=",
    operators.gt: ">",
    operators.ge: ">=",
    operators.add: "+",
    operators.sub: "-",
    operators.mul: "*",
    operators.truediv: "/",
}


def _refuse(construct: str, detail: str = "") -> UnsupportedQueryError:
    msg = f"cannot run across shards: {construct}"
    if detail:
        msg += f" ({detail})"
    return UnsupportedQueryError(msg, construct=construct)


# --------------------------------------------------------------------------- helpers


_LABEL_REFERENCE, _TEXTUAL_LABEL_REFERENCE = _sqla.label_reference_classes()


def _unwrap(expr: Any) -> Any:
    """Strip labels, label references and parentheses."""
    while True:
        if isinstance(expr, (_LABEL_REFERENCE, elements.Label, elements.Grouping)):
            expr = expr.element
        else:
            return expr


def _same(a: Any, b: Any) -> bool:
    a, b = _unwrap(a), _unwrap(b)
    if a is b:
        return True
    try:
        return bool(a.compare(b))
    except Exception:  # pragma: no cover - compare() of exotic elements
        return False


def _func_name(expr: Any) -> str | None:
    if isinstance(expr, functions.FunctionElement):
        name = getattr(expr, "name", None)
        if isinstance(name, str):
            return name.lower()
    return None


def _is_aggregate(expr: Any) -> bool:
    return _func_name(expr) in SUPPORTED_AGGREGATES


def _contains_aggregate(expr: Any) -> bool:
    return any(_is_aggregate(el) for el in visitors.iterate(expr))


def _columns_in(expr: Any) -> list[Any]:
    return [el for el in visitors.iterate(expr) if isinstance(el, elements.ColumnClause)]


def _simple_int(stmt: Select[Any], what: str) -> int | None:
    clause = _sqla.limit_clause(stmt) if what == "limit" else _sqla.offset_clause(stmt)
    if clause is None:
        return None
    try:
        value = _sqla.simple_limit(stmt) if what == "limit" else _sqla.simple_offset(stmt)
    except sa_exc.CompileError as err:
        # a bound value SQLAlchemy does not mark as a simple LIMIT (a lambda_stmt()'s
        # closure variable): its value is the number
        bound = clause.effective_value if isinstance(clause, elements.BindParameter) else None
        if isinstance(bound, int) and not isinstance(bound, bool):
            return bound
        raise _refuse(f"{what.upper()} given as an expression", "use a literal integer") from err
    return value


@dataclass(frozen=True)
class _Element:
    """One element of the statement's row: a column expression or an ORM entity."""

    expr: Any  # ColumnElement, or None for an entity
    name: str | None
    entity: Any = None


def _row_elements(stmt: Select[Any]) -> list[_Element]:
    out: list[_Element] = []
    for raw in _sqla.raw_columns(stmt):
        annotations = _sqla.annotations_of(raw)
        if isinstance(raw, selectable.FromClause):
            if "parententity" in annotations:
                out.append(_Element(None, None, annotations["parententity"]))
            else:
                out.extend(_Element(c, c.key) for c in raw.c)
        elif isinstance(raw, elements.ColumnElement):
            name: str | None
            if isinstance(raw, elements.Label):
                name = raw.name
            elif isinstance(raw, elements.ColumnClause):
                name = raw.key
            else:
                name = None
            out.append(_Element(raw, name))
        else:
            raise _refuse(f"select list element {type(raw).__name__}", "only columns and entities")
    return out


def _orm_enabled(stmt: Select[Any]) -> bool:
    return _sqla.is_orm_statement(stmt)


def _output_keys(stmt: Select[Any]) -> tuple[str, ...]:
    if _orm_enabled(stmt):
        return tuple(str(d["name"]) for d in stmt.column_descriptions)
    compiled = stmt.compile()
    return _sqla.result_column_names(compiled)


# --------------------------------------------------------------------------- refusals


def _check_nested(sub: Any, where: str) -> None:
    if isinstance(sub, selectable.CompoundSelect):
        raise _refuse("set operation (UNION / INTERSECT / EXCEPT)", f"in {where}")
    if not isinstance(sub, selectable.Select):
        return
    if any(c is not None for c in (_sqla.limit_clause(sub), _sqla.offset_clause(sub), _sqla.fetch_clause(sub))):
        raise _refuse("LIMIT/OFFSET in a subquery", f"in {where}")
    if _sqla.group_by_clauses(sub) or _sqla.having_criteria(sub):
        raise _refuse("GROUP BY in a subquery", f"in {where}")
    if _sqla.is_distinct(sub):
        raise _refuse("DISTINCT in a subquery", f"in {where}")
    for col in _sqla.raw_columns(sub):
        if _contains_aggregate(col):
            raise _refuse("aggregate in a subquery", f"in {where}")


def _check_tree(stmt: Select[Any]) -> None:
    for el in visitors.iterate(stmt):
        if el is stmt:
            continue
        if isinstance(el, elements.Over):
            raise _refuse("window function", "an OVER() clause")
        if isinstance(el, elements.WithinGroup):
            raise _refuse("WITHIN GROUP aggregate")
        if isinstance(el, elements.FunctionFilter):
            raise _refuse("aggregate FILTER")
        name = _func_name(el)
        if name in REFUSED_AGGREGATES:
            raise _refuse(f"aggregate function {name}()", "only COUNT, SUM, MIN, MAX, AVG are merged")
        if name in _GROUPING_CONSTRUCTS:
            raise _refuse("GROUP BY ROLLUP/CUBE/GROUPING SETS")
        if name in ("min", "max") and len(list(el.clauses)) != 1:  # type: ignore[attr-defined]
            raise _refuse(f"{name}() with several arguments")
        if isinstance(el, selectable.CompoundSelect):
            raise _refuse("set operation (UNION / INTERSECT / EXCEPT)")
        if isinstance(el, selectable.ScalarSelect):
            _check_nested(el.element, "a scalar subquery")
        elif isinstance(el, (selectable.Subquery, selectable.CTE)):
            _check_nested(el.element, "a subquery or CTE in FROM")
        elif isinstance(el, elements.ClauseElement) and isinstance(el, selectable.Select):
            _check_nested(el, "a subquery")


def _distinct_on(stmt: Select[Any]) -> tuple[Any, ...]:
    exprs = _sqla.distinct_on(stmt)
    for clause in _sqla.syntax_extensions(stmt):
        found = False
        for el in visitors.iterate(clause):
            if getattr(el, "__visit_name__", "") == "postgresql_distinct_on":
                exprs += _sqla.distinct_on(el)
                found = True
        if not found:
            raise _refuse("SELECT syntax extension", type(clause).__name__)
    return exprs


# --------------------------------------------------------------------------- ORDER BY


@dataclass(frozen=True)
class _Order:
    expr: Any  # the resolved expression (label references resolved)
    descending: bool
    nulls_first: bool | None
    position: int | None  # position of a selected element with the same value


def _by_items(clauses: Sequence[Any]) -> list[Any]:
    """GROUP BY / ORDER BY items as written.  SQLAlchemy keeps a function given there (it is
    also a FROM clause) as a list of its one labeled column: ``group_by(func.length(x))`` is
    stored as ``ClauseList(Label(anon, length(x)))``; that is the function itself."""
    out: list[Any] = []
    for clause in clauses:
        if type(clause) is elements.ClauseList:
            out.extend(
                c.element if isinstance(c, elements.Label) and isinstance(c.element, functions.FunctionElement) else c
                for c in clause.clauses
            )
        else:
            out.append(clause)
    return out


def _resolve_name(name: str, elems: Sequence[_Element], stmt: Select[Any]) -> tuple[Any, int | None]:
    for i, e in enumerate(elems):
        if e.name == name and e.expr is not None:
            return e.expr, i
    for frm in stmt.get_final_froms():
        if name in frm.c:
            return frm.c[name], None
    raise _refuse(f"label reference {name!r}", "it names no selected column")


def _resolve(expr: Any, elems: Sequence[_Element], stmt: Select[Any]) -> tuple[Any, int | None]:
    """Resolve an ORDER BY / GROUP BY item to (expression, selected position or None)."""
    if isinstance(expr, _TEXTUAL_LABEL_REFERENCE):
        return _resolve_name(expr.element, elems, stmt)
    if isinstance(expr, _LABEL_REFERENCE):
        inner = expr.element
        if isinstance(inner, _TEXTUAL_LABEL_REFERENCE):
            return _resolve_name(inner.element, elems, stmt)
        expr = inner
    bare = _unwrap(expr)
    if isinstance(bare, elements.TextClause) or (
        isinstance(bare, elements.ColumnClause) and bare.is_literal and bare.name.strip().isdigit()
    ):
        # raw SQL (text("n desc"), literal_column("2")): the shards would read it as SQL -- a
        # position, a direction -- that the merge cannot see; refuse rather than merge wrongly
        raise _refuse(
            "raw SQL in ORDER BY / GROUP BY",
            f"{_short(bare)!s}: use a column, a label name (order_by('name')) or desc('name')",
        )
    for i, e in enumerate(elems):
        if e.expr is not None and (e.expr is expr or _same(e.expr, expr)):
            return e.expr, i
    return expr, None


def _parse_order(stmt: Select[Any], elems: Sequence[_Element]) -> list[_Order]:
    out: list[_Order] = []
    for clause in _by_items(_sqla.order_by_clauses(stmt)):
        expr = clause
        descending = False
        nulls_first: bool | None = None
        while True:
            if isinstance(expr, _LABEL_REFERENCE) and not isinstance(expr.element, _TEXTUAL_LABEL_REFERENCE):
                expr = expr.element
                continue
            if not (
                isinstance(expr, elements.UnaryExpression)
                and expr.modifier
                in (operators.desc_op, operators.asc_op, operators.nulls_first_op, operators.nulls_last_op)
            ):
                break
            if expr.modifier is operators.desc_op:
                descending = True
            elif expr.modifier is operators.nulls_first_op:
                nulls_first = True
            elif expr.modifier is operators.nulls_last_op:
                nulls_first = False
            expr = expr.element
        if any(_func_name(el) in ("random", "rand") for el in visitors.iterate(expr)):
            raise _refuse("ORDER BY random()")
        resolved, position = _resolve(expr, elems, stmt)
        out.append(_Order(resolved, descending, nulls_first, position))
    return out


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class FanoutPlan:
    """The result of :func:`plan_select`.

    :param shard_statement: what every shard runs.
    :param merge: how the shard rows are merged (pure data).
    :param output_keys: the column keys of the original statement.
    :param statement: the original statement.
    :param mode: ``"concat"``, ``"ordered"``, ``"pushdown-groups"`` or ``"re-aggregate"``.
    :param single_entity: the statement selects one ORM entity and nothing else (the legacy
        ``Query`` then returns objects, not rows; hidden sort columns do not change that).
    """

    shard_statement: Select[Any]
    merge: MergePlan
    output_keys: tuple[str, ...]
    statement: Select[Any] = field(repr=False)
    mode: str = "concat"
    single_entity: bool = False
    text_exprs: tuple[tuple[str, int, Any, str], ...] = ()
    """``(role, index, expression, label)`` of what the merge compares: ``"order"`` (the
    ``index``-th sort key), ``"minmax"`` (a MIN/MAX argument), ``"equal"`` (a GROUP BY key, a
    DISTINCT column); the session checks the text ones' collations
    (:mod:`shardkit.fanout._collation`)."""

    def explain(self, dialect: Dialect | str | None = None) -> str:
        """The rewritten shard SQL and the merge plan, readable.

        :param dialect: a Dialect or a dialect name (``"postgresql"``); the
            SQL is rendered with literal values where possible.
        """
        sql = _render(self.shard_statement, dialect)
        return (
            f"fan-out plan ({self.mode})\nshard SQL:\n  " + sql.replace("\n", "\n  ") + ("\n" + self.merge.describe())
        )

    def __str__(self) -> str:
        return self.explain()


def _render(stmt: Select[Any], dialect_or_name: Dialect | str | None) -> str:
    dialect: Dialect | None
    if isinstance(dialect_or_name, str):
        from sqlalchemy.dialects import registry

        dialect = registry.load(dialect_or_name)()
    else:
        dialect = dialect_or_name
    try:
        return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    except Exception:
        return str(stmt.compile(dialect=dialect))


#: Plans of the statements planned last (a statement is immutable: its plan never changes).
_PLANS: OrderedDict[int, tuple[weakref.ref[Any], tuple[Any, ...], FanoutPlan]] = OrderedDict()
_PLANS_KEPT = 256


def cached_plan_select(stmt: Select[Any], *, shard_key_columns: Collection[ColumnElement[Any]] = ()) -> FanoutPlan:
    """:func:`plan_select`, remembered for the last :data:`_PLANS_KEPT` statement objects: a
    statement run again (a module-level ``select()``, a cached query) is planned once.  A
    refused statement is not remembered (it raises every time)."""
    keys = tuple(shard_key_columns)
    entry = _PLANS.get(id(stmt))
    if (
        entry is not None
        and entry[0]() is stmt
        and len(entry[1]) == len(keys)
        and all(a is b for a, b in zip(entry[1], keys, strict=True))
    ):
        return entry[2]
    plan = plan_select(stmt, shard_key_columns=keys)
    try:
        ref = weakref.ref(stmt)
    except TypeError:  # pragma: no cover - every ClauseElement takes weak references
        return plan
    _PLANS[id(stmt)] = (ref, keys, plan)
    while len(_PLANS) > _PLANS_KEPT:
        with contextlib.suppress(KeyError):
            _PLANS.popitem(last=False)
    return plan


def plan_select(stmt: Select[Any], *, shard_key_columns: Collection[ColumnElement[Any]] = ()) -> FanoutPlan:
    """Plan a SELECT for a fan-out over several shards.

    :param stmt: a Core or ORM-enabled :class:`~sqlalchemy.sql.Select`.
    :param shard_key_columns: the columns rows are sharded by; a GROUP BY (or
        DISTINCT ON) that includes one keeps every group on one shard, so
        HAVING and LIMIT can run on the shards.
    :raises UnsupportedQueryError: for a shape whose merge would not be exact.

    Example::

        plan = plan_select(select(users.c.country, func.avg(users.c.score))
                           .group_by(users.c.country).order_by(users.c.country))
        rows = merge_rows(plan.merge, [run(plan.shard_statement) for run in shards],
                          dialect_name="postgresql")
    """
    if isinstance(stmt, selectable.CompoundSelect):
        raise _refuse("set operation (UNION / INTERSECT / EXCEPT)")
    if not isinstance(stmt, selectable.Select):
        raise _refuse(f"statement of type {type(stmt).__name__}", "only SELECT fans out")
    if _sqla.for_update(stmt) is not None:
        raise _refuse("FOR UPDATE", "locking rows on several shards")
    if _sqla.fetch_clause(stmt) is not None:
        raise _refuse("FETCH FIRST", "use LIMIT")
    if len(_sqla.raw_columns(stmt)) == 1:  # count(*) over a subquery, EXISTS: one row from every shard's one row
        wrapped = _plan_wrapped(stmt, shard_key_columns)
        if wrapped is not None:
            return wrapped
    if not (_sqla.from_objects(stmt) or stmt.columns_clause_froms or _sqla.where_criteria(stmt)):
        # (get_final_froms() would say the same, but compiles the statement to do it)
        raise _refuse("SELECT without FROM", "it would return one row per shard")
    _check_tree(stmt)

    limit = _simple_int(stmt, "limit")
    offset = _simple_int(stmt, "offset") or 0
    elems = _row_elements(stmt)
    orders = _parse_order(stmt, elems)
    keys = _output_keys(stmt)
    distinct_on = _distinct_on(stmt)
    if distinct_on and not any(_same(d, k) for d in distinct_on for k in shard_key_columns):
        raise _refuse("DISTINCT ON", "only when it includes a shard key column")

    group_by = [_resolve(g, elems, stmt)[0] for g in _by_items(_sqla.group_by_clauses(stmt))]
    aggregated = (
        bool(group_by)
        or bool(_sqla.having_criteria(stmt))
        or any(e.expr is not None and _contains_aggregate(e.expr) for e in elems)
        or any(_contains_aggregate(o.expr) for o in orders)
    )
    pushdown = bool(group_by) and any(_same(g, k) for g in group_by for k in shard_key_columns)
    if aggregated and not pushdown:
        return _plan_aggregate(stmt, elems, orders, group_by, keys, limit, offset)
    return _plan_rows(stmt, elems, orders, keys, limit, offset, distinct_on, pushdown)


# --------------------------------------------------------------------------- from_statement()


def plan_from_statement(stmt: Any, *, shard_key_columns: Collection[ColumnElement[Any]] = ()) -> FanoutPlan:
    """Plan ``select(User).from_statement(...)`` / ``Query.from_statement(...)`` that reads.

    Every shard runs the statement as it is and its rows come back shard after shard (in the
    order of the target aliases): a textual statement cannot be parsed for a merge, so its
    ``ORDER BY``/``LIMIT`` stay per shard.  Over a SELECT, a shape whose rows would need a merge
    (ORDER BY, LIMIT/OFFSET, DISTINCT, GROUP BY, aggregates) is refused: select the entity
    itself (``select(User).order_by(...)``) to get it merged.

    :raises UnsupportedQueryError: a SELECT whose rows cannot simply be concatenated.
    """
    element = stmt.element
    if isinstance(element, selectable.CompoundSelect):
        raise _refuse("set operation (UNION / INTERSECT / EXCEPT)", "in from_statement()")
    if isinstance(element, selectable.Select):
        inner = plan_select(element, shard_key_columns=shard_key_columns)
        if not inner.merge.is_concat:
            raise _refuse(
                f"from_statement() over a SELECT that needs a merge ({inner.mode})",
                "its rows would only be concatenated; use select(Model) with the same "
                "ORDER BY / LIMIT / DISTINCT / GROUP BY instead",
            )
    descriptions = stmt.column_descriptions
    width = len(descriptions)
    keys = tuple(str(d.get("name")) for d in descriptions)
    merge = MergePlan(row_width=width, output_positions=tuple(range(width)))
    first = descriptions[0] if descriptions else {}
    single = width == 1 and first.get("entity") is not None and first.get("expr") is first.get("entity")
    return FanoutPlan(stmt, merge, keys, stmt, "concat", single)


# --------------------------------------------------------------------------- count(*) over a subquery, EXISTS


def _bare_outer(stmt: Select[Any]) -> bool:
    """No WHERE, GROUP BY, HAVING, DISTINCT, LIMIT/OFFSET, join or extension around the one column."""
    return not (
        _sqla.where_criteria(stmt)
        or _sqla.group_by_clauses(stmt)
        or _sqla.having_criteria(stmt)
        or _sqla.is_distinct(stmt)
        or _sqla.limit_clause(stmt) is not None
        or _sqla.offset_clause(stmt) is not None
        or _sqla.fetch_clause(stmt) is not None
        or _sqla.for_update(stmt) is not None
        or _sqla.setup_joins(stmt)
        or _sqla.distinct_on(stmt)
    )


def _is_count_star(expr: Any) -> bool:
    expr = _unwrap(expr)
    if _func_name(expr) != "count":
        return False
    args = [_unwrap(a) for a in expr.clauses]
    return len(args) == 1 and (
        isinstance(args[0], elements.ColumnClause) and args[0].is_literal and args[0].name.strip() in ("*", "1")
    )


def _subquery_select(frm: Any) -> Select[Any] | None:
    """The SELECT of a subquery in FROM (``Query.count()`` wraps it in an alias), or ``None``."""
    for _ in range(8):
        if isinstance(frm, selectable.CTE):
            return None
        if isinstance(frm, selectable.AliasedReturnsRows):
            frm = frm.element
            continue
        break
    return frm if isinstance(frm, selectable.Select) else None


def _plan_wrapped(stmt: Select[Any], shard_key_columns: Collection[ColumnElement[Any]]) -> FanoutPlan | None:
    """``SELECT count(*) FROM (subquery)`` and ``SELECT [NOT] EXISTS (...)``, or ``None`` for any
    other statement.  Each shard answers for its rows; the merge folds the answers (Reduce)."""
    column = _unwrap(_sqla.raw_columns(stmt)[0])
    if not isinstance(column, (elements.UnaryExpression, functions.FunctionElement)) or not _bare_outer(stmt):
        return None  # (an entity, a column: the common case, answered at once)
    kind = None
    if isinstance(column, selectable.Exists):
        kind = "any"
    elif (
        isinstance(column, elements.UnaryExpression)
        and column.operator is operators.inv
        and isinstance(_unwrap(column.element), selectable.Exists)
    ):
        kind = "all"
    if kind is not None:
        if _sqla.from_objects(stmt) or stmt.columns_clause_froms:
            return None
        _check_tree(stmt)
        merge = MergePlan(row_width=1, output_positions=(0,), reduce=Reduce(kind))
        return FanoutPlan(stmt, merge, _output_keys(stmt), stmt, "exists")
    if len(_sqla.from_objects(stmt)) != 1 or stmt.columns_clause_froms or not _is_count_star(column):
        return None
    inner = _subquery_select(_sqla.from_objects(stmt)[0])
    if inner is None:
        return None
    return _plan_count(stmt, inner, _output_keys(stmt), shard_key_columns)


def _plan_count(
    stmt: Select[Any], inner: Select[Any], keys: tuple[str, ...], shard_key_columns: Collection[ColumnElement[Any]]
) -> FanoutPlan:
    """``count(*)`` over a subquery (``Query.count()``).  The subquery's LIMIT/OFFSET only cut the
    count: ``max(0, min(limit, total - offset))``.  A plain subquery is counted on each shard and
    the counts summed; a GROUP BY, aggregate or DISTINCT subquery is merged as a fan-out of its
    own (its groups / distinct rows, held in memory) and its merged rows counted."""
    if _sqla.fetch_clause(inner) is not None:
        raise _refuse("FETCH FIRST", "in a counted subquery: use LIMIT")
    if _distinct_on(inner):
        raise _refuse("DISTINCT ON in a counted subquery")
    limit = _simple_int(inner, "limit")
    offset = _simple_int(inner, "offset") or 0
    stripped = inner.order_by(None).limit(None).offset(None)
    elems = _row_elements(inner)
    group_by = _by_items(_sqla.group_by_clauses(inner))
    grouped = (
        bool(group_by)
        or bool(_sqla.having_criteria(inner))
        or any(e.expr is not None and _contains_aggregate(e.expr) for e in elems)
    )
    reduce = Reduce("count", offset, limit)
    if grouped:
        if _sqla.is_distinct(inner):
            raise _refuse("DISTINCT with GROUP BY or aggregates in a counted subquery")
        if group_by:  # one row per group: only the group keys are needed
            group_keys = [_resolve(g, elems, inner)[0] for g in group_by]
            stripped = stripped.with_only_columns(
                *(_unwrap(g).label(f"_sk_k{i}") for i, g in enumerate(group_keys)), maintain_column_froms=True
            )
        inner_plan = plan_select(stripped, shard_key_columns=shard_key_columns)
    elif _sqla.is_distinct(inner):  # the distinct rows of every shard, deduplicated
        # SELECT DISTINCT x FROM (SELECT x ...): the DISTINCT moves out
        plain = _sqla.with_clauses_replaced(stripped, distinct=False)
        sub = plain.subquery()
        inner_plan = plan_select(select(*sub.c).distinct(), shard_key_columns=shard_key_columns)
    else:  # every shard counts its rows
        plan_select(stripped, shard_key_columns=shard_key_columns)  # what it refuses, counted or not
        shard = select(func.count().label("_sk_n")).select_from(stripped.subquery())
        merge = MergePlan(row_width=1, output_positions=(0,), reduce=Reduce("sum", offset, limit))
        return FanoutPlan(shard, merge, keys, stmt, "count")
    merge = inner_plan.merge
    merge = MergePlan(
        row_width=merge.row_width,
        output_positions=merge.output_positions,
        sort_keys=(),
        distinct=merge.distinct,
        offset=0,
        limit=None,
        aggregate=merge.aggregate,
        notes=merge.notes,
        reduce=reduce,
    )
    return FanoutPlan(inner_plan.shard_statement, merge, keys, stmt, "count", text_exprs=inner_plan.text_exprs)


def _plan_rows(
    stmt: Select[Any],
    elems: Sequence[_Element],
    orders: Sequence[_Order],
    keys: tuple[str, ...],
    limit: int | None,
    offset: int,
    distinct_on: tuple[Any, ...],
    pushdown: bool,
) -> FanoutPlan:
    width = len(elems)
    hidden: list[Any] = []
    sort_keys: list[SortKey] = []
    distinct = bool(_sqla.is_distinct(stmt)) and not distinct_on
    for o in orders:
        position = o.position
        attribute = None
        if position is None and not distinct:
            position, attribute = _entity_attribute(o.expr, elems)
        if position is None:
            if distinct:
                raise _refuse(
                    "ORDER BY expression not in the select list of a DISTINCT query",
                    str(o.expr),
                )
            position = width + len(hidden)
            hidden.append(o.expr.label(f"_sk_{len(hidden)}"))
        sort_keys.append(SortKey(position, o.descending, o.nulls_first, _short(o.expr), attribute))

    shard = stmt
    if hidden:
        shard = shard.add_columns(*hidden)
    if limit is not None or offset:
        shard = shard.limit(None if limit is None else offset + limit).offset(None)
    merge = MergePlan(
        row_width=width + len(hidden),
        output_positions=tuple(range(width)),
        sort_keys=tuple(sort_keys),
        distinct=distinct,
        offset=offset,
        limit=limit,
    )
    if pushdown:
        mode = "pushdown-groups"
    elif merge.is_concat:
        mode = "concat"
    else:
        mode = "ordered" if sort_keys else "rows"
    single_entity = len(elems) == 1 and elems[0].entity is not None
    compared = [("order", i, o.expr, k.label) for i, (o, k) in enumerate(zip(orders, sort_keys, strict=True))]
    if distinct:
        compared.extend(("equal", i, e.expr, e.name or "") for i, e in enumerate(elems) if e.expr is not None)
    return FanoutPlan(shard, merge, keys, stmt, mode, single_entity, tuple(compared))


def _entity_attribute(expr: Any, elems: Sequence[_Element]) -> tuple[int | None, str | None]:
    """(position, attribute) when ``expr`` is a loaded column of an ORM entity in the row."""
    column = _unwrap(expr)
    entity = _sqla.annotations_of(column).get("parententity")
    if entity is None or not isinstance(column, elements.ColumnClause):
        return None, None
    for position, elem in enumerate(elems):
        if elem.entity is not entity:
            continue
        try:
            prop = entity.get_property_by_column(column)
        except Exception:  # not a column of this mapper (an expression over it, say)
            return None, None
        if getattr(prop, "deferred", False) or len(getattr(prop, "columns", ())) != 1:
            return None, None  # reading it would load it row by row
        return position, prop.key
    return None, None


def _short(expr: Any) -> str:
    """A short readable name for ``expr`` (for explain() and errors), without compiling it
    for the common shapes: planning runs on every fan-out, compiling costs ~50 us a call."""
    try:
        return _render_short(expr)[:60]
    except Exception:  # pragma: no cover - a shape the fast path does not know
        try:
            return str(expr)[:60]
        except Exception:
            return type(expr).__name__


def _render_short(expr: Any) -> str:
    if isinstance(expr, elements.Label):
        return _render_short(expr.element)
    if isinstance(expr, elements.ColumnClause):
        table = getattr(expr, "table", None)
        name = getattr(table, "name", None)
        return f"{name}.{expr.name}" if name else str(expr.name)
    if isinstance(expr, functions.FunctionElement):
        args = [_render_short(c) for c in expr.clauses]
        if isinstance(expr, functions.count) and not args:
            args = ["*"]
        return f"{getattr(expr, 'name', type(expr).__name__)}({', '.join(args)})"
    if isinstance(expr, elements.BindParameter):
        return repr(expr.effective_value)
    return str(expr)


class _AggCompiler:
    """Collects group keys, per-group constants and aggregates; compiles PyExpr."""

    def __init__(self, group_by: Sequence[Any]) -> None:
        self.group_by = list(group_by)
        self.group_columns = [g for g in (_unwrap(x) for x in group_by) if isinstance(g, elements.ColumnClause)]
        self.constants: list[Any] = []
        self.aggregates: list[tuple[str, Any, Any]] = []  # (kind, argument or None, original)

    def _covered(self, expr: Any) -> bool:
        if not self.group_by:
            return False
        return all(any(_same(c, g) for g in self.group_columns) for c in _columns_in(expr))

    def compile(self, expr: Any) -> PyExpr:
        expr = _unwrap(expr)
        for i, g in enumerate(self.group_by):
            if _same(g, expr):
                return Ref(0, i, _short(expr))
        if _is_aggregate(expr):
            return self._aggregate(expr)
        if isinstance(expr, elements.BindParameter):
            if expr.expanding:
                raise _refuse("expanding parameter outside IN")
            return Const(expr.effective_value)
        if isinstance(expr, elements.Null):
            return Const(None)
        if isinstance(expr, elements.True_):
            return Const(True)
        if isinstance(expr, elements.False_):
            return Const(False)
        if not _contains_aggregate(expr) and self._covered(expr) and _columns_in(expr):
            for i, c in enumerate(self.constants):
                if _same(c, expr):
                    return Ref(1, i, _short(expr))
            self.constants.append(expr)
            return Ref(1, len(self.constants) - 1, _short(expr))
        if isinstance(expr, elements.BinaryExpression):
            op = expr.operator
            if op in (operators.is_, operators.is_not) and isinstance(_unwrap(expr.right), elements.Null):
                return IsNull(self.compile(expr.left), negate=op is operators.is_not)
            if op in (operators.in_op, operators.not_in_op):
                right = _unwrap(expr.right)
                if isinstance(right, elements.BindParameter) and right.expanding:
                    values = right.effective_value
                    return InList(self.compile(expr.left), tuple(values or ()), op is operators.not_in_op)
                raise _refuse("IN over a non-literal list in an aggregate expression")
            if op in _CMP_OPS:
                return BinOp(_CMP_OPS[op], self.compile(expr.left), self.compile(expr.right))
            raise _refuse(f"operator {getattr(op, '__name__', op)} over aggregates or in HAVING")
        if isinstance(expr, elements.BooleanClauseList):
            name = "AND" if expr.operator is operators.and_ else "OR" if expr.operator is operators.or_ else None
            if name is None:
                raise _refuse(f"boolean operator {expr.operator}")
            return BoolOp(name, tuple(self.compile(c) for c in expr.clauses))
        if isinstance(expr, elements.UnaryExpression):
            if expr.operator is operators.inv:
                return Not(self.compile(expr.element))
            if expr.operator is operators.neg:
                return Neg(self.compile(expr.element))
        if isinstance(expr, elements.Cast) and isinstance(expr.type, sqltypes.Float):
            return ToFloat(self.compile(expr.clause))
        if _func_name(expr) == "coalesce":
            return Coalesce(tuple(self.compile(c) for c in expr.clauses))
        if isinstance(expr, elements.ColumnClause):
            raise _refuse(
                "column neither grouped nor aggregated" if self.group_by else "column outside an aggregate",
                _short(expr),
            )
        if _contains_aggregate(expr):
            raise _refuse(f"aggregate inside {type(expr).__name__}", _short(expr))
        raise _refuse(f"expression {type(expr).__name__} in an aggregate query", _short(expr))

    def _aggregate(self, fn: Any) -> PyExpr:
        name = _func_name(fn)
        args = list(fn.clauses)
        distinct = (
            len(args) == 1
            and isinstance(args[0], elements.UnaryExpression)
            and args[0].operator is operators.distinct_op
        )
        arg = args[0].element if distinct else (args[0] if args else None)
        if arg is not None and _contains_aggregate(arg):
            raise _refuse("nested aggregate", _short(fn))
        kind = str(name)
        if distinct:
            if kind in ("min", "max"):
                distinct = False
                fn = getattr(func, kind)(arg)
            else:
                kind += "_distinct"
        for i, (k, _a, original) in enumerate(self.aggregates):
            if k == kind and _same(original, fn):
                return Ref(2, i, _short(fn))
        self.aggregates.append((kind, arg, fn))
        return Ref(2, len(self.aggregates) - 1, _short(fn))


def _decimal_scale(expr: Any) -> int | None:
    t = getattr(expr, "type", None)
    if isinstance(t, sqltypes.Numeric) and not isinstance(t, sqltypes.Float) and t.asdecimal:
        scale = _sqla.decimal_return_scale(t)
        return int(scale) if scale is not None else 10
    return None


def _plan_aggregate(
    stmt: Select[Any],
    elems: Sequence[_Element],
    orders: Sequence[_Order],
    group_by: Sequence[Any],
    keys: tuple[str, ...],
    limit: int | None,
    offset: int,
) -> FanoutPlan:
    if any(e.expr is None for e in elems):
        raise _refuse("ORM entity in an aggregate query", "select columns, not entities")
    comp = _AggCompiler(group_by)
    outputs = [comp.compile(e.expr) for e in elems]
    having: PyExpr | None = None
    if _sqla.having_criteria(stmt):
        parts = [comp.compile(h) for h in _sqla.having_criteria(stmt)]
        having = parts[0] if len(parts) == 1 else BoolOp("AND", tuple(parts))
    sort_keys: list[SortKey] = []
    distinct = bool(_sqla.is_distinct(stmt))
    for o in orders:
        if o.position is not None:
            position = o.position
        else:
            if distinct:
                raise _refuse("ORDER BY expression not in the select list of a DISTINCT query", _short(o.expr))
            position = len(outputs)
            outputs.append(comp.compile(o.expr))
        sort_keys.append(SortKey(position, o.descending, o.nulls_first, _short(o.expr)))

    # The shard row: group keys, constants, partial aggregates, distinct values.
    cols: list[Any] = []
    for g in comp.group_by:
        cols.append(_unwrap(g).label(f"_sk_g{len(cols)}"))
    constant_positions = []
    for c in comp.constants:
        constant_positions.append(len(cols))
        cols.append(c.label(f"_sk_c{len(cols)}"))
    specs: list[AggregateSpec] = []
    distinct_args: list[Any] = []
    distinct_positions: list[int] = []
    for kind, arg, fn in comp.aggregates:
        label = _short(fn)
        if kind.endswith("_distinct"):
            for i, d in enumerate(distinct_args):
                if _same(d, arg):
                    position = distinct_positions[i]
                    break
            else:
                position = len(cols)
                distinct_args.append(arg)
                distinct_positions.append(position)
                cols.append(arg.label(f"_sk_d{position}"))
            specs.append(AggregateSpec(kind, (position,), label))
        elif kind == "avg":
            p = len(cols)
            cols.append(func.sum(arg).label(f"_sk_a{p}"))
            cols.append(func.count(arg).label(f"_sk_a{p + 1}"))
            specs.append(AggregateSpec("avg", (p, p + 1), label))
        else:
            p = len(cols)
            cols.append(fn.label(f"_sk_a{p}"))
            specs.append(AggregateSpec(kind, (p,), label))

    shard = stmt.with_only_columns(*cols, maintain_column_froms=True)
    shard = shard.group_by(None)
    shard_group = [_unwrap(g) for g in comp.group_by] + distinct_args
    if shard_group:
        shard = shard.group_by(*shard_group)
    shard = shard.order_by(None).limit(None).offset(None)
    shard = _sqla.with_clauses_replaced(shard, having=(), distinct=False)

    merge = MergePlan(
        row_width=len(cols),
        output_positions=tuple(range(len(elems))),
        sort_keys=tuple(sort_keys),
        distinct=distinct,
        offset=offset,
        limit=limit,
        aggregate=AggregatePlan(
            group_positions=tuple(range(len(comp.group_by))),
            constant_positions=tuple(constant_positions),
            aggregates=tuple(specs),
            having=having,
            outputs=tuple(outputs),
            scalar=not comp.group_by,
            decimal_scales=tuple(_decimal_scale(e.expr) for e in elems),
        ),
    )
    compared = [("order", i, o.expr, k.label) for i, (o, k) in enumerate(zip(orders, sort_keys, strict=True))]
    compared.extend(("equal", i, g, "") for i, g in enumerate(comp.group_by))  # label: when refused
    for i, (kind, arg, _fn) in enumerate(comp.aggregates):
        if kind in ("min", "max"):
            compared.append(("minmax", i, arg, ""))
        elif kind.endswith("_distinct"):
            compared.append(("equal", i, arg, ""))
    if distinct:
        compared.extend(("equal", i, e.expr, e.name or "") for i, e in enumerate(elems))
    return FanoutPlan(shard, merge, keys, stmt, "re-aggregate", text_exprs=tuple(compared))
