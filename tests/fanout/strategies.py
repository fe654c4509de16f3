"""Hypothesis strategies for the fan-out property tests: data and statements.

Statements are drawn from the shapes the planner supports.  Every ORDER BY
that can matter is made total (``id`` appended, or every output / group key
column ordered) so that one database and the merge must agree row for row.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    desc,
    distinct,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.sql import Select

metadata = MetaData()
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(20), nullable=False),
    Column("score", Integer, nullable=True),
    Column("country", String(2), nullable=True),
    Column("balance", Float, nullable=True),
)
c = users.c

NAMES = ["a", "b", "Ab", "ab", "z", "b c", "Z9"]
COUNTRIES = ["DE", "FR", "US", "BR", None]
BALANCES = [0.5, 1.25, -2.0, 3.75, 10.0, None]


@st.composite
def user_rows(draw: st.DrawFn, max_size: int = 40) -> list[dict[str, Any]]:
    ids = draw(st.lists(st.integers(1, 500), max_size=max_size, unique=True))
    return [
        {
            "id": i,
            "name": draw(st.sampled_from(NAMES)),
            "score": draw(st.one_of(st.none(), st.integers(-5, 9))),
            "country": draw(st.sampled_from(COUNTRIES)),
            "balance": draw(st.sampled_from(BALANCES)),
        }
        for i in ids
    ]


def shard_assignment(n_rows: int, n_shards: int = 4) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n_shards - 1), min_size=n_rows, max_size=n_rows)


PROJECTABLE = ["id", "name", "score", "country", "balance"]


def _order_item(draw: st.DrawFn, expr: Any) -> Any:
    item = expr.desc() if draw(st.booleans()) else expr.asc()
    nulls = draw(st.sampled_from([None, "first", "last"]))
    if nulls == "first":
        item = item.nulls_first()
    elif nulls == "last":
        item = item.nulls_last()
    return item


@st.composite
def where_clause(draw: st.DrawFn) -> Any:
    choices = [
        c.score > draw(st.integers(-5, 9)),
        c.country == draw(st.sampled_from(["DE", "FR", "US"])),
        c.name.in_(draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))),
        c.score.is_(None),
        c.balance >= 0,
    ]
    picked = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=2))
    if len(picked) == 1:
        return picked[0]
    return draw(st.sampled_from([and_, or_]))(*picked)


@st.composite
def limit_offset(draw: st.DrawFn) -> tuple[int | None, int | None]:
    limit = draw(st.one_of(st.none(), st.integers(0, 12)))
    offset = draw(st.one_of(st.none(), st.integers(0, 8)))
    return limit, offset


def _apply_limit(stmt: Select[Any], lo: tuple[int | None, int | None]) -> Select[Any]:
    limit, offset = lo
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset is not None:
        stmt = stmt.offset(offset)
    return stmt


@st.composite
def row_statements(draw: st.DrawFn) -> tuple[Select[Any], bool]:
    """Plain row queries: projection, WHERE, ORDER BY, LIMIT/OFFSET, DISTINCT."""
    names = draw(st.lists(st.sampled_from(PROJECTABLE), min_size=1, max_size=4, unique=True))
    cols = [c[n] for n in names]
    use_distinct = draw(st.booleans()) and draw(st.booleans())
    stmt = select(*cols)
    if draw(st.booleans()):
        stmt = stmt.where(draw(where_clause()))
    lo = draw(limit_offset())
    ordered = draw(st.booleans()) or lo != (None, None)
    if ordered:
        if use_distinct:
            # every output column, in a drawn order: a total order over distinct rows
            perm = draw(st.permutations(cols))
            stmt = stmt.order_by(*[_order_item(draw, col) for col in perm])
        else:
            keys = draw(st.lists(st.sampled_from(["name", "score", "country", "balance"]), max_size=3, unique=True))
            items = [_order_item(draw, c[k]) for k in keys]
            if draw(st.booleans()) and keys and keys[0] in names:
                items[0] = desc(keys[0]) if draw(st.booleans()) else keys[0]  # label reference
            stmt = stmt.order_by(*items, c.id)
    if use_distinct:
        stmt = stmt.distinct()
    return _apply_limit(stmt, lo), ordered


AGGREGATES = {
    "count_star": lambda: func.count(),
    "count_score": lambda: func.count(c.score),
    "sum_score": lambda: func.sum(c.score),
    "min_name": lambda: func.min(c.name),
    "max_score": lambda: func.max(c.score),
    "avg_score": lambda: func.avg(c.score),
    "sum_balance": lambda: func.sum(c.balance),
    "avg_balance": lambda: func.avg(c.balance),
    "min_balance": lambda: func.min(c.balance),
    "count_distinct_country": lambda: func.count(distinct(c.country)),
    "count_distinct_score": lambda: func.count(c.score.distinct()),
    "sum_distinct_score": lambda: func.sum(distinct(c.score)),
    "avg_distinct_score": lambda: func.avg(distinct(c.score)),
    "ratio": lambda: func.sum(c.score) / func.count(),
    "coalesced": lambda: func.coalesce(func.sum(c.score), 0) + 1,
    "float_avg": lambda: func.max(c.balance) - func.min(c.balance),
}


@st.composite
def having_clause(draw: st.DrawFn) -> Any:
    choices = [
        func.count() > draw(st.integers(0, 3)),
        func.sum(c.score) >= draw(st.integers(-3, 10)),
        func.avg(c.score) < draw(st.integers(-2, 8)),
        func.max(c.score).is_(None),
        func.count(distinct(c.name)) >= 2,
        func.min(c.balance) != 0.5,
    ]
    picked = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=2))
    expr = picked[0] if len(picked) == 1 else draw(st.sampled_from([and_, or_]))(*picked)
    return not_(expr) if draw(st.booleans()) and draw(st.booleans()) else expr


@st.composite
def aggregate_statements(draw: st.DrawFn) -> tuple[Select[Any], bool]:
    """Aggregates with or without GROUP BY, HAVING, ORDER BY, LIMIT, DISTINCT."""
    agg_names = draw(st.lists(st.sampled_from(sorted(AGGREGATES)), min_size=1, max_size=4, unique=True))
    aggs = [AGGREGATES[n]().label(f"a_{n}") for n in agg_names]
    group_names = draw(
        st.lists(st.sampled_from(["country", "name", "score", "country", "id"]), max_size=2, unique=True)
    )
    group_cols = [c[n] for n in group_names]
    stmt = select(*group_cols, *aggs).select_from(users)
    if draw(st.booleans()):
        stmt = stmt.where(draw(where_clause()))
    if not group_cols:
        if draw(st.booleans()) and draw(st.booleans()):
            stmt = stmt.having(draw(having_clause()))
        return stmt, True
    stmt = stmt.group_by(*group_cols)
    if draw(st.booleans()):
        stmt = stmt.having(draw(having_clause()))
    lo = draw(limit_offset())
    ordered = draw(st.booleans()) or lo != (None, None)
    if ordered:
        items = []
        if draw(st.booleans()):
            agg_i = draw(st.integers(0, len(aggs) - 1))
            how = draw(st.sampled_from(["expr", "label", "labelname"]))
            target: Any = {"expr": AGGREGATES[agg_names[agg_i]](), "label": aggs[agg_i], "labelname": aggs[agg_i].name}[
                how
            ]
            if how == "labelname":
                items.append(desc(target) if draw(st.booleans()) else target)
            else:
                items.append(_order_item(draw, target))
        items.extend(_order_item(draw, g) for g in draw(st.permutations(group_cols)))
        stmt = stmt.order_by(*items)
    if draw(st.booleans()) and draw(st.booleans()):
        stmt = stmt.distinct()
    return _apply_limit(stmt, lo), ordered


def statements() -> st.SearchStrategy[tuple[Select[Any], bool]]:
    """(statement, ordered): ``ordered`` means the result order is fully fixed."""
    return st.one_of(row_statements(), aggregate_statements())
