"""Keyset pagination across shards: the page after a cursor, and the cursor of a row.

:func:`keyset_page` turns an ordered SELECT into the page that follows a cursor (a row-value
comparison written as an OR/AND chain, then ``LIMIT page_size``); run across shards, every
shard reads at most ``page_size`` rows whatever the depth of the page, and the fan-out's
ordered merge keeps the first ``page_size``.  :func:`cursor_of` reads a row's cursor: its
values of the ORDER BY expressions.  Cursor values are always bound as parameters
(:class:`~shardkit.errors.InvalidCursorError` refuses a SQL expression).

Pure, like the planner whose ORDER BY reading it shares: no database, no session.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, inspect, or_
from sqlalchemy.sql import elements

from shardkit import _sqla
from shardkit.errors import InvalidCursorError, InvalidPageError, UnsupportedQueryError
from shardkit.fanout._plan import FanoutPlan, _Element, _Order, _parse_order, _row_elements, _short, _unwrap

if TYPE_CHECKING:
    from sqlalchemy.sql import Select

__all__ = ["cursor_of", "keyset_page"]


def _keyset_orders(stmt: Select[Any]) -> tuple[list[_Element], list[_Order]]:
    elems = _row_elements(stmt)
    orders = _parse_order(stmt, elems)
    if not orders:
        raise UnsupportedQueryError(
            "keyset pagination needs an ORDER BY that ends with a unique key", construct="keyset without ORDER BY"
        )
    return elems, orders


def _check_cursor_value(value: Any, position: int, depth: int = 0) -> None:
    """Refuse a cursor value that SQLAlchemy would splice into the SQL instead of binding it:
    a clause (``text("-1 OR TRUE")``, ``literal_column(...)``), or anything that turns into one
    (an ORM attribute, any object with ``__clause_element__``), also inside a list or tuple."""
    if isinstance(value, elements.ClauseElement) or hasattr(value, "__clause_element__"):
        raise InvalidCursorError(
            f"keyset cursor value at position {position} is a SQL expression ({type(value).__name__}), "
            "not a plain value: a cursor holds the sort values of a row (see cursor_of())",
            position=position,
            value_type=type(value),
        )
    if isinstance(value, list | tuple | set | frozenset) and depth < 8:
        for item in value:
            _check_cursor_value(item, position, depth + 1)


def keyset_page(stmt: Select[Any], *, after: Sequence[Any] | None, page_size: int) -> Select[Any]:
    """The page of ``stmt`` that follows the cursor ``after``.

    ``stmt`` must be ordered by expressions ending with a unique key
    (``order_by(users.c.score.desc(), users.c.id)``).  The row-value
    comparison "after the cursor" is written as an OR/AND chain, so it works
    on SQLite, MySQL and PostgreSQL and respects each column's direction.
    With a fan-out, each shard then reads only ``page_size`` rows whatever
    the depth of the page.

    :param stmt: the ordered SELECT (without LIMIT/OFFSET).
    :param after: the cursor (the sort values of the last row of the previous
        page, see :func:`cursor_of`), or ``None`` for the first page.
    :param page_size: rows per page.
    :raises UnsupportedQueryError: no ORDER BY, a last sort key that is not a
        primary key or unique column, a nullable sort column, a NULL in the
        cursor, or a cursor of the wrong length.
    :raises InvalidCursorError: a cursor value that is a SQL expression
        (``text(...)``, a column, anything with ``__clause_element__``): cursor
        values are always bound as parameters, never spliced into the SQL.

    Example::

        page = keyset_page(stmt, after=None, page_size=50)
        ...
        nxt = keyset_page(stmt, after=cursor_of(stmt, rows[-1]), page_size=50)
    """
    if page_size < 1:
        raise InvalidPageError(f"page_size must be at least 1, got {page_size!r}", page_size=page_size)
    if _sqla.limit_clause(stmt) is not None or _sqla.offset_clause(stmt) is not None:
        raise UnsupportedQueryError(
            "keyset_page() sets LIMIT itself; pass the statement without LIMIT/OFFSET",
            construct="keyset with LIMIT/OFFSET",
        )
    _elems, orders = _keyset_orders(stmt)
    last = _unwrap(orders[-1].expr)
    if not (
        isinstance(last, elements.ColumnClause)
        and (getattr(last, "primary_key", False) or getattr(last, "unique", False))
    ):
        raise UnsupportedQueryError(
            f"keyset pagination needs the last ORDER BY item to be a primary key or unique column, got {_short(last)}",
            construct="keyset without a unique last key",
        )
    for o in orders:
        col = _unwrap(o.expr)
        if (
            isinstance(col, elements.ColumnClause)
            and getattr(col, "nullable", False)
            and not getattr(col, "primary_key", False)
        ):
            raise UnsupportedQueryError(
                f"keyset pagination over the nullable column {_short(col)}: NULLs would be skipped; "
                "order by coalesce(col, <sentinel>) or a NOT NULL column",
                construct="keyset over a nullable column",
            )
    page = stmt
    if after is not None:
        after = list(after)
        if len(after) != len(orders):
            raise UnsupportedQueryError(
                f"the cursor has {len(after)} values, the ORDER BY {len(orders)}", construct="keyset cursor"
            )
        if any(v is None for v in after):
            raise UnsupportedQueryError(
                "a NULL in the keyset cursor: NULL sort keys cannot be paged with keyset pagination",
                construct="NULL in keyset cursor",
            )
        for position, value in enumerate(after):
            _check_cursor_value(value, position)
        terms = []
        for i, o in enumerate(orders):
            eqs = [orders[j].expr == after[j] for j in range(i)]
            step = o.expr < after[i] if o.descending else o.expr > after[i]
            terms.append(and_(*eqs, step) if eqs else step)
        page = page.where(or_(*terms))
    return page.limit(page_size)


def cursor_of(plan_or_stmt: FanoutPlan | Select[Any], row: Sequence[Any]) -> tuple[Any, ...]:
    """The keyset cursor of ``row``: its values of the ORDER BY expressions.

    :param plan_or_stmt: the statement (or its fan-out plan) ``row`` came from.
    :param row: a result row of that statement (a ``Row`` or a tuple).
    :raises UnsupportedQueryError: an ORDER BY expression that is not in the row
        (neither selected nor an attribute of a selected ORM entity).
    """
    stmt = plan_or_stmt.statement if isinstance(plan_or_stmt, FanoutPlan) else plan_or_stmt
    elems, orders = _keyset_orders(stmt)
    values: list[Any] = []
    for o in orders:
        if o.position is not None:
            values.append(row[o.position])
            continue
        col = _unwrap(o.expr)
        found = False
        for i, e in enumerate(elems):
            if e.entity is None or not isinstance(col, elements.ColumnClause):
                continue
            mapper = inspect(e.entity).mapper
            try:
                prop = mapper.get_property_by_column(_sqla.deannotate(col))
            except Exception:
                continue
            values.append(getattr(row[i], prop.key))
            found = True
            break
        if not found:
            raise UnsupportedQueryError(
                f"the ORDER BY expression {_short(col)} is not in the selected row; select it to page by it",
                construct="keyset cursor",
            )
    return tuple(values)
