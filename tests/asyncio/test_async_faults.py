"""Shard failures on both APIs: a cut, a black hole, a slow shard, a slow link (PostgreSQL).

The databases, the proxied shard ``s2`` and the slow ``shard_delay()`` come from the sync
suite's fixture (``tests/fanout/test_shard_failure.py``); each body here runs on the sync
session and on the async one over asyncpg and psycopg 3 (``pg_api``).  On the async API,
the fan-out's shards run as coroutines on the loop: the deadline must hold within
``deadline + 0.5 s``, the loop must never stall more than 50 ms, a cancelled statement
must be stopped on the server (``pg_stat_activity``), and the pools must hand out healthy
connections afterwards.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import func, select, text

import shardkit
from shardkit.errors import FanoutTimeoutError, ShardQueryError

from ..fanout.test_shard_failure import (  # the sync suite's databases and helpers
    N_USERS,
    PROXIED,
    SHARDS,
    Setup,
    User,
    cut_after,
    setup,
    slow_statement,
)
from .conftest import MAX_STALL, Api

pytestmark = pytest.mark.postgres

__all__ = ["setup"]  # the fixture, imported

#: the deadline holds within this (the brief's bound for the async API)
DEADLINE_SLACK = 0.5


def _wait_no_delays(setup: Setup, alias: str, within: float = 2.0) -> int:
    give_up = time.monotonic() + within
    while setup.active_delays(alias) and time.monotonic() < give_up:
        time.sleep(0.05)
    return setup.active_delays(alias)


def _healthy(s: shardkit.ShardSession, alias: str) -> None:
    """The pool's next connection of ``alias`` works and is in no failed transaction."""
    engine = s.cluster.engine(alias)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(User)).scalar_one() >= 0


def _check_loop(api: Api) -> None:
    if api.is_async:
        assert api.max_stall < MAX_STALL, f"the event loop stalled {api.max_stall * 1000:.0f} ms"


def test_shard_dies_mid_fanout(setup: Setup, pg_api: Api) -> None:
    pg_api.prepare(setup.cluster)
    setup.set_delay(PROXIED, 3)

    def body(s: shardkit.ShardSession) -> None:
        thread, cut_at = cut_after(setup.proxy, 0.4)
        started = time.monotonic()
        with pytest.raises(ShardQueryError) as info:
            s.scalars(slow_statement().execution_options(shardkit_deadline=10)).all()
        raised = time.monotonic()
        with pg_api.unwatched():
            thread.join(timeout=5)
        assert cut_at, "the proxy was not cut"
        assert not isinstance(info.value, FanoutTimeoutError)
        assert set(info.value.errors) == {PROXIED}  # type: ignore[attr-defined]
        assert raised - cut_at[0] < DEADLINE_SLACK, f"error came {raised - cut_at[0]:.3f}s after the cut"
        assert raised - started < 3  # long before the slow shard would have answered
        s.rollback()
        with pg_api.unwatched():
            setup.set_delay(PROXIED, 0)
        setup.proxy.restore()
        assert [u.id for u in s.scalars(slow_statement())] == list(range(1, N_USERS + 1))

    pg_api.run(setup.cluster, body)
    assert pg_api.run(setup.cluster, lambda s: s.scalar(select(func.count()).select_from(User))) == N_USERS
    _check_loop(pg_api)


def test_partial_mode_returns_the_healthy_shards(setup: Setup, pg_api: Api) -> None:
    pg_api.prepare(setup.cluster)
    setup.set_delay(PROXIED, 3)

    def body(s: shardkit.ShardSession) -> None:
        thread, cut_at = cut_after(setup.proxy, 0.4)
        result = s.execute(slow_statement().execution_options(shardkit_partial=True, shardkit_deadline=10))
        answered_at = time.monotonic()
        with pg_api.unwatched():
            thread.join(timeout=5)
        assert answered_at - cut_at[0] < DEADLINE_SLACK
        assert [u.id for u in result.scalars()] == setup.ids_on("s0", "s1", "s3")
        assert result.complete is False  # type: ignore[attr-defined]
        assert set(result.errors) == {PROXIED}  # type: ignore[attr-defined]
        assert result.shards == ("s0", "s1", "s3")  # type: ignore[attr-defined]
        s.rollback()

    pg_api.run(setup.cluster, body)
    setup.set_delay(PROXIED, 0)
    setup.proxy.restore()

    def again(s: shardkit.ShardSession) -> None:
        result = s.execute(slow_statement())
        assert len(result.scalars().all()) == N_USERS
        assert result.complete is True  # type: ignore[attr-defined]

    pg_api.run(setup.cluster, again)
    _check_loop(pg_api)


def test_refused_connection_is_a_shard_error(setup: Setup, pg_api: Api) -> None:
    pg_api.prepare(setup.cluster)
    setup.proxy.cut()
    stmt = select(User).order_by(User.id)

    def body(s: shardkit.ShardSession) -> None:
        s.cluster.engine(PROXIED).dispose()  # no pooled connection left: the next one must connect
        started = time.monotonic()
        with pytest.raises(ShardQueryError, match=r"'s2'") as info:
            s.scalars(stmt).all()
        assert time.monotonic() - started < 2.5
        assert set(info.value.errors) == {PROXIED}  # type: ignore[attr-defined]
        s.rollback()
        result = s.execute(stmt.execution_options(shardkit_partial=True))
        assert [u.id for u in result.scalars()] == setup.ids_on("s0", "s1", "s3")
        assert list(result.errors) == [PROXIED]  # type: ignore[attr-defined]

    pg_api.run(setup.cluster, body)
    setup.proxy.restore()
    assert pg_api.run(setup.cluster, lambda s: len(s.scalars(stmt).all())) == N_USERS
    _check_loop(pg_api)


def test_deadline_cancels_the_slow_shard_on_the_server(setup: Setup, pg_api: Api) -> None:
    pg_api.prepare(setup.cluster)
    slow = "s1"
    setup.set_delay(slow, 5)

    def body(s: shardkit.ShardSession) -> float:
        started = time.monotonic()
        with pytest.raises(FanoutTimeoutError) as info:
            s.scalars(slow_statement().execution_options(shardkit_deadline=0.5)).all()
        elapsed = time.monotonic() - started
        assert info.value.aliases == (slow,)  # type: ignore[attr-defined]
        s.rollback()
        return elapsed

    elapsed = pg_api.run(setup.cluster, body)
    assert elapsed < 0.5 + DEADLINE_SLACK, f"FanoutTimeoutError after {elapsed:.3f}s"
    assert _wait_no_delays(setup, slow) == 0  # stopped on the server
    setup.set_delay(slow, 0)
    pg_api.run(setup.cluster, lambda s: [_healthy(s, a) for a in SHARDS])
    _check_loop(pg_api)


def test_deadline_from_the_cluster_and_partial_timeout(setup: Setup, pg_api: Api) -> None:
    pg_api.prepare(setup.cluster)
    setup.set_delay("s3", 5)
    cluster = setup.cluster
    cluster.deadline, cluster.partial = 0.5, True

    def body(s: shardkit.ShardSession) -> None:
        started = time.monotonic()
        result = s.execute(slow_statement())
        assert time.monotonic() - started < 0.5 + DEADLINE_SLACK
        assert [u.id for u in result.scalars()] == setup.ids_on("s0", "s1", "s2")
        assert result.complete is False  # type: ignore[attr-defined]
        assert isinstance(result.errors["s3"], TimeoutError)  # type: ignore[attr-defined]
        s.rollback()

    try:
        pg_api.run(cluster, body)
    finally:
        cluster.deadline, cluster.partial = None, False
    setup.set_delay("s3", 0)
    _check_loop(pg_api)


def test_a_failure_elsewhere_cancels_the_slow_shard_on_the_server(setup: Setup, pg_api: Api) -> None:
    """s2 refuses at once while s1's statement runs: the caller hears of s2 at once, s1's
    statement is cancelled on the server, its connection goes back to its pool and the next
    checkout is healthy."""
    pg_api.prepare(setup.cluster)
    setup.set_delay("s1", 3)
    setup.proxy.cut()

    def body(s: shardkit.ShardSession) -> None:
        s.cluster.engine(PROXIED).dispose()
        started = time.monotonic()
        with pytest.raises(ShardQueryError, match=r"'s2'") as info:
            s.scalars(slow_statement()).all()
        assert time.monotonic() - started < DEADLINE_SLACK + 0.25  # not after s1's 3 s
        assert set(info.value.errors) == {PROXIED}  # type: ignore[attr-defined]
        s.rollback()  # must not raise

    pg_api.run(setup.cluster, body)
    if pg_api.is_async:  # the sync API shuts the socket down after SETTLE; the server stops it itself later
        assert _wait_no_delays(setup, "s1", within=1.0) == 0, "s1's statement still runs on the server"
    setup.set_delay("s1", 0)
    setup.proxy.restore()

    def after(s: shardkit.ShardSession) -> None:
        assert all(s.cluster.engine(a).pool.checkedout() == 0 for a in SHARDS)  # type: ignore[attr-defined]
        for alias in SHARDS:
            _healthy(s, alias)
        assert [u.id for u in s.scalars(slow_statement())] == list(range(1, N_USERS + 1))

    pg_api.run(setup.cluster, after)
    _check_loop(pg_api)


def test_black_hole_shard_holds_the_deadline(setup: Setup, pg_api: Api) -> None:
    """s2 accepts TCP and never answers (its statement, then its new connections): the
    fan-out gives up at its deadline, partial mode answers with the others."""
    pg_api.prepare(setup.cluster)

    def warm(s: shardkit.ShardSession) -> None:
        assert len(s.scalars(select(User)).all()) == N_USERS  # every shard has a pooled connection

    pg_api.run(setup.cluster, warm)
    setup.proxy.blackhole()

    def body(s: shardkit.ShardSession) -> None:
        started = time.monotonic()
        with pytest.raises(FanoutTimeoutError) as info:
            s.scalars(select(User).execution_options(shardkit_deadline=0.6)).all()
        elapsed = time.monotonic() - started
        assert elapsed < 0.6 + DEADLINE_SLACK, f"FanoutTimeoutError after {elapsed:.3f}s"
        assert PROXIED in info.value.aliases  # type: ignore[attr-defined]
        s.rollback()

    pg_api.run(setup.cluster, body)

    def new_connections(s: shardkit.ShardSession) -> None:
        s.cluster.engine(PROXIED).dispose()  # the next connect hangs in the black hole
        started = time.monotonic()
        result = s.execute(select(User).execution_options(shardkit_deadline=0.6, shardkit_partial=True))
        assert time.monotonic() - started < 0.6 + DEADLINE_SLACK
        assert sorted(u.id for u in result.scalars()) == setup.ids_on("s0", "s1", "s3")
        assert result.complete is False  # type: ignore[attr-defined]
        s.rollback()

    pg_api.run(setup.cluster, new_connections)
    _check_loop(pg_api)
    setup.proxy.restore()


def test_slow_link_holds_the_deadline(setup: Setup, pg_api: Api) -> None:
    """Every chunk to and from s2 is delayed 1.5 s: the deadline (0.5 s) holds."""
    pg_api.prepare(setup.cluster)
    pg_api.run(setup.cluster, lambda s: s.scalars(select(User)).all())  # pooled connections
    setup.proxy.slow(1.5)

    def body(s: shardkit.ShardSession) -> Any:
        started = time.monotonic()
        result = s.execute(select(User).execution_options(shardkit_deadline=0.5, shardkit_partial=True))
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + DEADLINE_SLACK, f"answered after {elapsed:.3f}s"
        assert sorted(u.id for u in result.scalars()) == setup.ids_on("s0", "s1", "s3")
        assert set(result.errors) == {PROXIED}  # type: ignore[attr-defined]
        s.rollback()

    pg_api.run(setup.cluster, body)
    _check_loop(pg_api)
    setup.proxy.restore()
