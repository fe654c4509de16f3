"""Keyset cursor values are bound, never spliced as SQL (issue 10).

Before: ``keyset_page(stmt, after=[text("-1 OR TRUE"), 3])`` put ``-1 OR TRUE`` into the WHERE
clause, so a cursor taken from a request could read every row.  Run on SQLite files and on
real PostgreSQL databases (the fan-out layouts of ``tests/fanout/conftest.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardkit.errors import FanoutError, InvalidCursorError
from shardkit.fanout import CallableTask, keyset_page, merge_rows, plan_select, run_parallel

from .conftest import Layout
from .strategies import users

c = users.c
STMT = sa.select(c.id, c.name).order_by(c.name, c.id)
ROWS = [{"id": i, "name": f"n{i:02d}", "score": 1, "country": "DE", "balance": 1.0} for i in range(1, 21)]


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "cursor_rows"
    id: Mapped[int] = mapped_column(primary_key=True)


class Sneaky:
    """Not a ClauseElement, but SQLAlchemy would use what it returns as SQL."""

    def __clause_element__(self) -> Any:
        return sa.literal_column("1")


@pytest.fixture(params=["sqlite", "postgresql"])
def layout(request: pytest.FixtureRequest) -> Layout:
    chosen: Layout = request.getfixturevalue(f"{'sqlite' if request.param == 'sqlite' else 'pg'}_layout")
    chosen.load(ROWS, [i % len(chosen.shards) for i in range(len(ROWS))])
    return chosen


def _fanout(layout: Layout, stmt: Any) -> list[tuple[Any, ...]]:
    plan = plan_select(stmt)

    def fetch(engine: sa.Engine) -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(plan.shard_statement)]

    def task(engine: sa.Engine) -> CallableTask[list[tuple[Any, ...]]]:
        return CallableTask(lambda _token: fetch(engine))

    tasks = {a: task(e) for a, e in zip(layout.aliases, layout.shards, strict=True)}
    results = run_parallel(tasks, deadline=10).results
    return list(merge_rows(plan.merge, [results[a] for a in layout.aliases], dialect_name=layout.dialect_name))


@pytest.mark.parametrize(
    ("after", "position"),
    [
        ([sa.text("'' OR TRUE"), 3], 0),
        (["n05", sa.text("-1 OR TRUE")], 1),
        (["n05", sa.literal_column("-1")], 1),
        ([sa.bindparam("x", "n05"), 3], 0),
        ([users.c.name, 3], 0),
        (["n05", Row.id], 1),
        (["n05", Sneaky()], 1),
        ([("n05", sa.text("1")), 3], 0),
    ],
)
def test_sql_expressions_in_the_cursor_are_refused(layout: Layout, after: list[Any], position: int) -> None:
    with pytest.raises(InvalidCursorError, match=f"position {position}") as info:
        keyset_page(STMT, after=after, page_size=5)
    err = info.value
    assert isinstance(err, FanoutError) and isinstance(err, TypeError)
    assert err.position == position  # type: ignore[attr-defined]
    # what the attack would have read: a correct page still holds only the rows after the cursor
    page = _fanout(layout, keyset_page(STMT, after=["n05", 5], page_size=5))
    assert [r[0] for r in page] == [6, 7, 8, 9, 10]


def test_plain_values_that_look_like_sql_are_bound(layout: Layout) -> None:
    page = _fanout(layout, keyset_page(STMT, after=["n05' OR '1'='1", 5], page_size=50))
    assert [r[1] for r in page] == [f"n{i:02d}" for i in range(6, 21)]  # compared as text, nothing injected
    first = _fanout(layout, keyset_page(STMT, after=None, page_size=3))
    assert [r[0] for r in first] == [1, 2, 3]
