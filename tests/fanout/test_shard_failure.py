"""A shard that dies, refuses connections or is too slow, in the middle of a fan-out (PostgreSQL).

Shard ``s2`` is reached through :class:`TcpProxy`, a small threaded TCP
forwarder on 127.0.0.1 (ephemeral port) in front of the PostgreSQL server:
``cut()`` resets every forwarded connection and refuses new ones,
``restore()`` forwards again.  Each shard database has a ``shard_delay()``
function (``pg_sleep`` then 1) so one shard can be made slow by the
statement itself.

What a caller must do after a failed fan-out: roll the session back
(``s.rollback()``) or use a new session -- the session's transaction holds
the connections of the shards, and the broken one is invalidated by
SQLAlchemy (the pool is refreshed on the disconnect).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter
from shardkit.errors import FanoutTimeoutError, ShardQueryError

from ..conftest import PG_URL, DatabaseFactory, require_server
from ..faults import TcpProxy

pytestmark = pytest.mark.postgres

SHARDS = ["s0", "s1", "s2", "s3"]
PROXIED = "s2"
N_USERS = 60
#: slack allowed between "the shard died / the deadline passed" and the caller getting the error
MARGIN = 0.75


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "failing_users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int]
    country: Mapped[str] = mapped_column(String(2))


# ------------------------------------------------------------------------- fixtures


class Setup:
    def __init__(self, cluster: shardkit.Cluster, ring: HashRing, proxy: TcpProxy, direct: dict[str, str]) -> None:
        self.cluster = cluster
        self.ring = ring
        self.proxy = proxy
        self.direct = direct  # alias -> URL without the proxy

    def set_delay(self, alias: str, seconds: float) -> None:
        engine = create_engine(self.direct[alias])
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "CREATE OR REPLACE FUNCTION shard_delay() RETURNS int LANGUAGE plpgsql VOLATILE AS "
                        f"$$ BEGIN PERFORM pg_sleep({float(seconds)}); RETURN 1; END $$"
                    )
                )
        finally:
            engine.dispose()

    def ids_on(self, *aliases: str) -> list[int]:
        return [i for i in range(1, N_USERS + 1) if self.ring.get(i) in aliases]

    def active_delays(self, alias: str) -> int:
        """Statements running ``shard_delay()`` in ``alias``'s database right now."""
        db = make_url(self.direct[alias]).database
        engine = create_engine(PG_URL)
        try:
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND state = 'active' "
                            "AND query LIKE '%shard_delay%' AND pid <> pg_backend_pid()"
                        ),
                        {"db": db},
                    ).scalar_one()
                )
        finally:
            engine.dispose()


@pytest.fixture
def setup(databases: DatabaseFactory) -> Iterator[Setup]:
    require_server(PG_URL, "pg")
    pg = make_url(PG_URL)
    proxy = TcpProxy((pg.host or "127.0.0.1", pg.port or 5432))
    try:
        direct = databases.urls("postgresql", "default", *SHARDS)
        urls = dict(direct)
        urls[PROXIED] = (
            make_url(direct[PROXIED])
            .set(host="127.0.0.1", port=proxy.port, query={"connect_timeout": "2"})
            .render_as_string(hide_password=False)
        )
        ring = HashRing(SHARDS)
        cluster = shardkit.Cluster(urls, routers=[HashRingRouter(ring)])
        cluster.create_all(Base)
        with cluster.session() as s:
            s.add_all(
                User(id=i, name=f"u{i}", score=i % 17, country=("de", "fr", "jp")[i % 3]) for i in range(1, N_USERS + 1)
            )
            s.commit()
        st = Setup(cluster, ring, proxy, direct)
        for alias in SHARDS:
            st.set_delay(alias, 0)
        assert st.ids_on(PROXIED) and st.ids_on("s0", "s1", "s3")
        yield st
        cluster.dispose()
    finally:
        proxy.close()


def slow_statement() -> Any:
    """Every user, after ``shard_delay()`` (an InitPlan: evaluated once per shard)."""
    return select(User).where(select(func.shard_delay()).scalar_subquery() == 1).order_by(User.id)


def cut_after(proxy: TcpProxy, seconds: float) -> tuple[threading.Thread, list[float]]:
    when: list[float] = []

    def go() -> None:
        time.sleep(seconds)
        when.append(time.monotonic())
        proxy.cut()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, when


# ---------------------------------------------------------------------------- tests


def test_shard_dies_mid_fanout(setup: Setup) -> None:
    setup.set_delay(PROXIED, 3)
    with setup.cluster.session() as s:
        thread, cut_at = cut_after(setup.proxy, 0.4)
        started = time.monotonic()
        with pytest.raises(ShardQueryError) as info:
            s.scalars(slow_statement().execution_options(shardkit_deadline=10)).all()
        raised = time.monotonic()
        thread.join(timeout=5)
        assert cut_at, "the proxy was not cut"
        assert not isinstance(info.value, FanoutTimeoutError)
        assert PROXIED in str(info.value)
        assert set(info.value.errors) == {PROXIED}  # type: ignore[attr-defined]
        assert raised - cut_at[0] < MARGIN, f"error came {raised - cut_at[0]:.3f}s after the cut"
        assert raised - started < 3  # long before the slow shard would have answered
        s.rollback()  # the failed fan-out leaves the transaction to roll back

        setup.set_delay(PROXIED, 0)
        setup.proxy.restore()
        # the same session, rolled back, works again (the dead connection was invalidated)
        assert [u.id for u in s.scalars(slow_statement())] == list(range(1, N_USERS + 1))
    with setup.cluster.session() as s2:  # and so does a new one
        assert s2.scalar(select(func.count()).select_from(User)) == N_USERS


def test_partial_mode_returns_the_healthy_shards(setup: Setup) -> None:
    setup.set_delay(PROXIED, 3)
    with setup.cluster.session() as s:
        thread, cut_at = cut_after(setup.proxy, 0.4)
        stmt = slow_statement().execution_options(shardkit_partial=True, shardkit_deadline=10)
        result = s.execute(stmt)
        answered_at = time.monotonic()
        thread.join(timeout=5)
        users = result.scalars().all()
        assert answered_at - cut_at[0] < MARGIN
        assert [u.id for u in users] == setup.ids_on("s0", "s1", "s3")
        assert result.complete is False  # type: ignore[attr-defined]
        assert set(result.errors) == {PROXIED}  # type: ignore[attr-defined]
        assert result.shards == ("s0", "s1", "s3")  # type: ignore[attr-defined]
        s.rollback()
    setup.set_delay(PROXIED, 0)
    setup.proxy.restore()
    with setup.cluster.session() as s:
        result = s.execute(slow_statement())
        assert len(result.scalars().all()) == N_USERS
        assert result.complete is True  # type: ignore[attr-defined]


def test_refused_connection_is_a_shard_error(setup: Setup) -> None:
    setup.proxy.cut()
    setup.cluster.engine(PROXIED).dispose()  # no pooled connection left: the next one must connect
    stmt = select(User).order_by(User.id)
    with setup.cluster.session() as s:
        started = time.monotonic()
        with pytest.raises(ShardQueryError, match=r"'s2'.*cannot connect") as info:
            s.scalars(stmt).all()
        assert time.monotonic() - started < 2.5  # connect_timeout=2 is the upper bound; refusal is instant
        assert set(info.value.errors) == {PROXIED}  # type: ignore[attr-defined]
        s.rollback()
        result = s.execute(stmt.execution_options(shardkit_partial=True))
        assert [u.id for u in result.scalars()] == setup.ids_on("s0", "s1", "s3")
        assert result.complete is False  # type: ignore[attr-defined]
        assert list(result.errors) == [PROXIED]  # type: ignore[attr-defined]
    setup.proxy.restore()
    with setup.cluster.session() as s:
        assert len(s.scalars(stmt).all()) == N_USERS


def test_deadline_cancels_the_slow_shard_on_the_server(setup: Setup) -> None:
    slow = "s1"
    setup.set_delay(slow, 5)
    with setup.cluster.session() as s:
        started = time.monotonic()
        with pytest.raises(FanoutTimeoutError) as info:
            s.scalars(slow_statement().execution_options(shardkit_deadline=0.5)).all()
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + MARGIN, f"FanoutTimeoutError after {elapsed:.3f}s"
        assert slow in str(info.value)
        assert info.value.aliases == (slow,)  # type: ignore[attr-defined]
        s.rollback()
    # PostgreSQL stopped the statement (statement_timeout, and a cancel request)
    give_up = time.monotonic() + 2
    while setup.active_delays(slow) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert setup.active_delays(slow) == 0
    setup.set_delay(slow, 0)


def test_deadline_from_the_cluster_and_partial_timeout(setup: Setup) -> None:
    setup.set_delay("s3", 5)
    cluster = setup.cluster
    cluster.deadline, cluster.partial = 0.5, True
    try:
        with cluster.session() as s:
            started = time.monotonic()
            result = s.execute(slow_statement())
            assert time.monotonic() - started < 0.5 + MARGIN
            assert [u.id for u in result.scalars()] == setup.ids_on("s0", "s1", "s2")
            assert result.complete is False  # type: ignore[attr-defined]
            assert isinstance(result.errors["s3"], TimeoutError)  # type: ignore[attr-defined]
            s.rollback()
    finally:
        cluster.deadline, cluster.partial = None, False
    setup.set_delay("s3", 0)


def test_a_failure_elsewhere_stops_a_slow_shard_cleanly(setup: Setup) -> None:
    """s2 refuses at once while s1's statement runs: the caller hears of s2 quickly, s1's
    statement is given a moment and then its connection is cut, and the session rolls back
    without an error (no shut-down connection is left looking healthy)."""
    setup.set_delay("s1", 3)
    setup.proxy.cut()
    setup.cluster.engine(PROXIED).dispose()  # the next s2 connection must connect: refused
    with setup.cluster.session() as s:
        started = time.monotonic()
        with pytest.raises(ShardQueryError, match=r"'s2'.*cannot connect") as info:
            s.scalars(slow_statement()).all()
        assert time.monotonic() - started < MARGIN  # not after s1's 3 s
        assert set(info.value.errors) == {PROXIED}  # type: ignore[attr-defined]
        s.rollback()  # must not raise
    assert all(setup.cluster.engine(a).pool.checkedout() == 0 for a in SHARDS)  # type: ignore[attr-defined]
    setup.set_delay("s1", 0)
    setup.proxy.restore()
    with setup.cluster.session() as s:
        assert [u.id for u in s.scalars(slow_statement())] == list(range(1, N_USERS + 1))
