"""The core proof: a fan-out over 4 shards returns what one database returns.

For each drawn data set and statement: plan it, run the shard statement on
the 4 shards in parallel, merge, and compare with the original statement run
on one database holding every row.  Order is compared when the statement
fixes it fully; floats and Decimals with a relative tolerance of 1e-9.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from shardkit.errors import UnsupportedQueryError
from shardkit.fanout import CallableTask, merge_rows, plan_select, run_parallel

from .conftest import Layout
from .strategies import shard_assignment, statements, user_rows, users

REL_TOL = 1e-9


def _same_value(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (float, Decimal)) or isinstance(b, (float, Decimal)):
        if type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)):
            return False  # the merge must keep the database's type (Decimal vs float)
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=REL_TOL)
    return type(a) is type(b) and bool(a == b)


def _same_row(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))


def _same_multiset(expected: list[tuple[Any, ...]], got: list[tuple[Any, ...]]) -> bool:
    if len(expected) != len(got):
        return False
    remaining = list(got)
    for row in expected:
        for i, cand in enumerate(remaining):
            if _same_row(row, cand):
                del remaining[i]
                break
        else:
            return False
    return True


def _fetch(engine: Engine, stmt: Select[Any]) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(stmt)]


def check_fanout(layout: Layout, stmt: Select[Any], ordered: bool) -> None:
    note(str(stmt.compile(dialect=layout.single.dialect, compile_kwargs={"literal_binds": True})))
    expected = _fetch(layout.single, stmt)
    try:
        plan = plan_select(stmt, shard_key_columns=[users.c.id])
    except UnsupportedQueryError as err:  # pragma: no cover - the strategies draw supported shapes
        pytest.fail(f"supported shape refused: {err}")
    event(f"mode={plan.mode}")
    note(plan.explain(layout.single.dialect))
    tasks = {
        alias: CallableTask(lambda _t, e=engine: _fetch(e, plan.shard_statement))
        for alias, engine in zip(layout.aliases, layout.shards, strict=True)
    }
    outcome = run_parallel(tasks, deadline=30.0)
    got = list(merge_rows(plan.merge, [outcome.results[a] for a in layout.aliases], dialect_name=layout.dialect_name))
    note(f"expected={expected}\ngot     ={got}")
    if ordered:
        assert len(got) == len(expected) and all(_same_row(e, g) for e, g in zip(expected, got, strict=True)), (
            "rows differ (ordered)"
        )
    else:
        assert _same_multiset(expected, got), "rows differ (as multisets)"


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[int], Select[Any], bool]:
    rows = draw(user_rows())
    assignment = draw(shard_assignment(len(rows)))
    stmt, ordered = draw(statements())
    return rows, assignment, stmt, ordered


_SETTINGS = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_SETTINGS
@given(case=cases())
def test_fanout_equals_one_database_sqlite(sqlite_layout: Layout, case: Any) -> None:
    rows, assignment, stmt, ordered = case
    sqlite_layout.load(rows, assignment)
    check_fanout(sqlite_layout, stmt, ordered)


@pytest.mark.postgres
@_SETTINGS
@given(case=cases())
def test_fanout_equals_one_database_postgresql(pg_layout: Layout, case: Any) -> None:
    rows, assignment, stmt, ordered = case
    pg_layout.load(rows, assignment)
    check_fanout(pg_layout, stmt, ordered)
