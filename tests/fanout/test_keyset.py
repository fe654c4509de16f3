"""keyset_page / cursor_of: paging a fan-out reads page_size rows per shard."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from shardkit.errors import FanoutTimeoutError, UnsupportedQueryError
from shardkit.fanout import CallableTask, cursor_of, keyset_page, merge_rows, plan_select, run_parallel

from .conftest import Layout
from .strategies import users

c = users.c


def _fanout(layout: Layout, stmt: Any) -> list[tuple[Any, ...]]:
    plan = plan_select(stmt)

    def fetch(engine: sa.Engine) -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(plan.shard_statement)]

    tasks = {a: CallableTask(lambda _t, e=e: fetch(e)) for a, e in zip(layout.aliases, layout.shards, strict=True)}
    results = run_parallel(tasks, deadline=10).results
    return list(merge_rows(plan.merge, [results[a] for a in layout.aliases], dialect_name=layout.dialect_name))


def test_keyset_pages_equal_the_full_order(sqlite_layout: Layout) -> None:
    rows = [{"id": i, "name": f"n{i % 7}", "score": i % 5, "country": "DE", "balance": 1.0} for i in range(1, 60)]
    sqlite_layout.load(rows, [i % 4 for i in range(len(rows))])
    stmt = sa.select(c.id, c.name).order_by(c.name.desc(), c.id)
    with sqlite_layout.single.connect() as conn:
        expected = [tuple(r) for r in conn.execute(stmt)]
    got: list[tuple[Any, ...]] = []
    after = None
    while True:
        page = _fanout(sqlite_layout, keyset_page(stmt, after=after, page_size=7))
        if not page:
            break
        assert len(page) <= 7
        got.extend(page)
        after = cursor_of(stmt, page[-1])
    assert got == expected


def test_keyset_refusals() -> None:
    with pytest.raises(UnsupportedQueryError, match="unique"):
        keyset_page(sa.select(users).order_by(c.name), after=None, page_size=5)
    with pytest.raises(UnsupportedQueryError, match="nullable"):
        keyset_page(sa.select(users).order_by(c.score, c.id), after=None, page_size=5)
    with pytest.raises(UnsupportedQueryError, match="NULL"):
        keyset_page(sa.select(users).order_by(sa.func.coalesce(c.score, 0), c.id), after=[None, 3], page_size=5)
    with pytest.raises(UnsupportedQueryError, match="ORDER BY"):
        keyset_page(sa.select(users), after=None, page_size=5)


def test_keyset_sql_expands_row_comparison() -> None:
    stmt = keyset_page(sa.select(users).order_by(c.name.desc(), c.id), after=["b", 3], page_size=2)
    text = " ".join(str(stmt.compile(compile_kwargs={"literal_binds": True})).split())
    assert "WHERE users.name < 'b' OR users.name = 'b' AND users.id > 3" in text
    assert "LIMIT 2" in text


@pytest.mark.postgres
def test_pg_deadline_cancels_the_running_query(pg_layout: Layout) -> None:
    """A real psycopg2 cancel(): the timed-out statement stops on the server."""
    engine = pg_layout.shards[0]
    conns: list[Any] = []

    def run(remaining: float | None) -> Any:
        with engine.connect() as conn:
            conns.append(conn.connection.dbapi_connection)
            return conn.execute(sa.text("SELECT pg_sleep(5)")).scalar()

    def cancel() -> None:
        conns[0].cancel()

    start = time.monotonic()
    with pytest.raises(FanoutTimeoutError):
        run_parallel({"shard0": CallableTask(run, cancel)}, deadline=0.4)
    assert time.monotonic() - start < 0.7
    # the server side was cancelled: a fresh connection sees no pg_sleep running shortly after
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            busy = conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'")
            ).scalar()
        if not busy:
            break
        time.sleep(0.05)
    assert not busy
