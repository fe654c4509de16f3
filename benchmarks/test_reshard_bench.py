"""Reshard figures: rows moved per second by ``reshard run`` against a plain COPY of the same rows.

Run:  pytest benchmarks/test_reshard_bench.py -s -p no:cacheprovider   (needs the local PostgreSQL)
Size: SHARDKIT_RESHARD_BENCH_USERS (default 100000 users, 3 orders each), 4 shards -> 5.

The peer copies exactly the rows the reshard moves, table by table and shard by shard, with
psycopg2: ``COPY (SELECT * FROM t WHERE id = ANY(ids)) TO STDOUT`` into a buffer, then
``COPY t_copy FROM STDIN`` into an empty table on the new shard; its ids are given to it
(it does not hash anything), one table and source after the other.  Target: a copy phase at >= 0.5x its rate;
the ratio is printed, not asserted.

The headline figure is the copy phase of ``reshard run``: ``result.seconds["copy"]`` covers creating the missing
tables and shadow tables, scanning and hashing every row's shard key on every source, and copying the moving rows
into the shadow tables (with ``workers`` table/source tasks at once; the peer runs one at a time).  The whole run
(copy + the fenced catch-up and verify + merge and switch + delete) is printed next to it, as rows moved per
second of wall time, with each phase's seconds.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardkit import HashRing
from shardkit.reshard import Resharder
from tests.conftest import DatabaseFactory
from tests.reshard.helpers import build, load
from tests.reshard.models import Order, User

USERS = int(os.environ.get("SHARDKIT_RESHARD_BENCH_USERS", "100000"))
OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(tmp_path)
    yield factory
    factory.drop_all()


def _plain_copy(cluster: Any, new: HashRing) -> tuple[int, float]:
    """COPY out of each source and into the target, for exactly the moving rows; (rows, seconds)."""
    for model in (User, Order):  # the new shard's real tables (the reshard creates them too)
        model.__table__.create(cluster.engine("s4"), checkfirst=True)
    target = cluster.engine("s4").raw_connection()
    cur_t = target.cursor()
    for model in (User, Order):
        name = model.__table__.name
        cur_t.execute(f"CREATE TABLE bench_{name} (LIKE {name} INCLUDING ALL)")
    target.commit()
    moving: dict[tuple[str, str], list[int]] = {}
    for alias in OLD:
        raw = cluster.engine(alias).raw_connection()
        cur = raw.cursor()
        cur.execute("SELECT id, id FROM users")
        users = cur.fetchall()
        cur.execute("SELECT id, user_id FROM orders")
        orders = cur.fetchall()
        raw.close()
        for name, rows in (("users", users), ("orders", orders)):
            owners = new.get_many([k for _, k in rows])
            moving[(name, alias)] = [pk for (pk, _), o in zip(rows, owners, strict=True) if o != alias]
    rows_copied = 0
    t0 = time.perf_counter()
    for (name, alias), ids in moving.items():
        raw = cluster.engine(alias).raw_connection()
        cur = raw.cursor()
        buf = io.BytesIO()
        cur.copy_expert(cur.mogrify(f"COPY (SELECT * FROM {name} WHERE id = ANY(%s)) TO STDOUT", (ids,)), buf)
        raw.close()
        buf.seek(0)
        cur_t.copy_expert(f"COPY bench_{name} FROM STDIN", buf)
        target.commit()
        rows_copied += len(ids)
    seconds = time.perf_counter() - t0
    for name in ("orders", "users"):
        cur_t.execute(f"DROP TABLE bench_{name}")
    target.commit()
    target.close()
    return rows_copied, seconds


def test_reshard_rate_vs_plain_copy(benchmark: Any, pg: DatabaseFactory) -> None:
    urls = pg.urls("postgresql", "default", *ALL)
    cluster, router = build(urls, OLD)
    t0 = time.perf_counter()
    load(cluster, router, USERS)
    load_s = time.perf_counter() - t0
    new = HashRing(ALL)
    peer_rows, peer_s = _plain_copy(cluster, new)
    resharder = Resharder(cluster, router, add="s4", models=[User], batch_size=20_000, fence_grace=0)
    plan_t0 = time.perf_counter()
    plan = resharder.plan()
    plan_s = time.perf_counter() - plan_t0
    results: list[Any] = []
    run_t0 = time.perf_counter()
    benchmark.pedantic(lambda: results.append(resharder.run()), rounds=1, iterations=1)
    run_s = time.perf_counter() - run_t0
    result = results[0]
    moved = sum(result.copied.values())
    assert moved == peer_rows == sum(plan.moving_rows.values())
    peer_rate = peer_rows / peer_s
    ratio = result.copy_rate / peer_rate
    scanned = sum(plan.rows.values())
    lines = [
        f"data: {USERS} users + {3 * USERS} orders on 4 PostgreSQL shards (loaded in {load_s:.1f}s); add s4",
        f"plan (count on the shards): {scanned} rows hashed in {plan_s:.2f}s = {scanned / plan_s:,.0f} rows/s",
        f"plain COPY out+in of the {peer_rows} moving rows: {peer_s:.2f}s = {peer_rate:,.0f} rows/s",
        f"reshard copy phase (create missing tables + scan every key + copy the moving rows into the shadows; "
        f"{resharder.workers} workers): {moved} rows in {result.seconds['copy']:.2f}s = {result.copy_rate:,.0f} rows/s",
        f"ratio reshard copy phase / plain COPY: {ratio:.2f} (target >= 0.5{'' if ratio >= 0.5 else ': BELOW TARGET'})",
        f"whole run (copy, fence: catch-up + verify, merge+switch, delete, state): {run_s:.2f}s = "
        f"{moved / run_s:,.0f} rows/s ({moved / run_s / peer_rate:.2f}x the plain COPY); "
        + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()),
        f"writes to moving keys fenced for {result.seconds['fenced'] + result.seconds['merge+switch']:.2f}s "
        f"(catch-up {result.seconds['catch-up']:.2f}s, verify {result.seconds['verify']:.2f}s, "
        f"merge+switch {result.seconds['merge+switch']:.2f}s)",
    ]
    _LINES[:] = lines  # printed at the end of the run (pytest captures print())
    benchmark.extra_info.update(
        {
            "peer_rows_per_s": peer_rate,
            "copy_rows_per_s": result.copy_rate,
            "ratio": ratio,
            "run_rows_per_s": moved / run_s,
            "seconds": result.seconds,
        }
    )
    cluster.dispose()


_LINES: list[str] = []


class _Summary:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if _LINES:
            terminalreporter.section("shardkit reshard figures")
            for line in _LINES:
                terminalreporter.write_line(f"  {line}")


@pytest.fixture(scope="session", autouse=True)
def _reshard_summary_plugin(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("shardkit-reshard-summary"):
        manager.register(_Summary(), "shardkit-reshard-summary")
