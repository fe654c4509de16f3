"""Listeners, traces, slow-statement and partial logs, scatter guards, max_rows and
explain(analyze=True) on a real ring-sharded cluster (SQLite files and PostgreSQL databases)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import String, create_engine, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
import shardkit.otel
from shardkit import HashRing, HashRingRouter, db_of
from shardkit.errors import MaxRowsError, ScatterRefusedError
from shardkit.observe import FanoutEvent, MetricsListener, StatementEvent

from ..conftest import DatabaseFactory, StatementLog

SHARDS = ["s0", "s1", "s2"]
N = 60


class Base(DeclarativeBase):
    pass


class ObsUser(Base):
    __tablename__ = "obs_users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Recorder:
    """Keeps the events on ``obs_users`` (shardkit's own reads, such as the reshard fence's
    look at its state table on ``default``, are left out)."""

    def __init__(self) -> None:
        self.statements: list[StatementEvent] = []
        self.fanouts: list[FanoutEvent] = []

    def on_statement(self, event: StatementEvent) -> None:
        if "obs_users" in event.sql or "no_such_table" in event.sql:
            self.statements.append(event)

    def on_fanout(self, event: FanoutEvent) -> None:
        self.fanouts.append(event)


@dataclass
class World:
    backend: str
    urls: dict[str, str]
    factory: DatabaseFactory

    def cluster(self, **kw: Any) -> shardkit.Cluster:
        return shardkit.Cluster(self.urls, routers=[HashRingRouter(HashRing(SHARDS))], **kw)


@pytest.fixture
def world(databases: DatabaseFactory, backend: str) -> Iterator[World]:
    urls = databases.urls(backend, "default", *SHARDS)
    w = World(backend, urls, databases)
    cluster = w.cluster()
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add_all(ObsUser(id=i, name=f"u{i}") for i in range(1, N + 1))
        s.commit()
    cluster.dispose()
    yield w


def test_listener_hears_routed_statements(world: World) -> None:
    cluster = world.cluster()
    rec, metrics = Recorder(), MetricsListener()
    cluster.add_listener(rec)
    cluster.add_listener(metrics)
    with cluster.session() as s:
        user = s.get(ObsUser, 7)
        assert user is not None
        alias = db_of(user)
        [ev] = rec.statements
        assert (ev.alias, ev.table, ev.kind, ev.error, ev.in_fanout) == (alias, "obs_users", "select", None, False)
        assert ev.seconds > 0 and "obs_users" in ev.sql
        if world.backend == "postgresql":
            assert ev.rows == 1
        s.execute(update(ObsUser).where(ObsUser.id == 7).values(name="seven"))
        writes = [e for e in rec.statements if e.kind == "update"]
        assert [(e.alias, e.table, e.rows) for e in writes] == [(alias, "obs_users", 1)]
        with pytest.raises(Exception):  # noqa: B017 - any driver error
            s.execute(text("SELECT * FROM no_such_table"), execution_options={"shardkit_using": alias})
        assert rec.statements[-1].error is not None and rec.statements[-1].alias == alias
    shard = metrics.shards[alias]
    assert shard.statements >= 3 and shard.errors == 1 and shard.by_kind["update"] == 1
    assert shard.latency.count == shard.statements
    cluster.remove_listener(rec)
    with cluster.session() as s:
        s.get(ObsUser, 8)
    assert all(e.sql != "" for e in rec.statements)
    assert len([e for e in rec.statements if e.kind == "select" and e.error is None]) == 1  # not told any more
    cluster.dispose()


def test_listener_added_before_engines_exist_hears_them(world: World) -> None:
    cluster = world.cluster()
    rec = Recorder()
    cluster.add_listener(rec)  # no engine created yet
    with cluster.session() as s:
        s.get(ObsUser, 3)
    assert len(rec.statements) == 1
    cluster.dispose()


def test_fanout_event_width_shards_merge_and_spans(world: World) -> None:
    cluster = world.cluster()
    rec = Recorder()
    cluster.add_listener(rec)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    shardkit.otel.instrument(cluster, tracer_provider=provider)
    with cluster.session() as s:
        users = s.scalars(select(ObsUser).order_by(ObsUser.id)).all()
    assert len(users) == N
    [fan] = rec.fanouts
    assert fan.width == len(SHARDS) and set(fan.shards) == set(SHARDS) and fan.scatter
    assert fan.rows == N and fan.merge_seconds >= 0 and fan.error is None and not fan.partial
    assert fan.slowest is not None and fan.slowest_seconds == max(t.seconds or 0 for t in fan.shards.values())
    assert fan.table == "obs_users"
    assert sum(t.rows or 0 for t in fan.shards.values()) == N  # told by the driver, or counted as merged
    shard_statements = [e for e in rec.statements if e.in_fanout]
    assert {e.alias for e in shard_statements} == set(SHARDS)
    spans = exporter.get_finished_spans()
    parent = next(sp for sp in spans if sp.name == "shardkit.fanout obs_users")
    children = [sp for sp in spans if sp.parent is not None and sp.parent.span_id == parent.context.span_id]
    assert sorted(dict(c.attributes or {})["shardkit.alias"] for c in children) == SHARDS
    assert dict(parent.attributes or {})["shardkit.fanout.rows"] == N
    # a point read is one CLIENT span with the alias, the table and the system
    exporter.clear()
    with cluster.session() as s:
        s.get(ObsUser, 5)
    [span] = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert span.name == "SELECT obs_users" and attrs["db.collection.name"] == "obs_users"
    assert attrs["db.system"] == world.backend and attrs["shardkit.alias"] in SHARDS
    shardkit.otel.uninstrument(cluster)
    cluster.dispose()


def test_slow_statement_logged_at_warning(world: World, caplog: pytest.LogCaptureFixture) -> None:
    cluster = world.cluster(slow_statement=0.0)
    with caplog.at_level(logging.WARNING, logger="shardkit.observe"), cluster.session() as s:
        s.get(ObsUser, 3)
    slow = [r for r in caplog.records if r.name == "shardkit.observe" and "slow statement" in r.getMessage()]
    assert slow and all(r.levelno == logging.WARNING for r in slow)
    assert any("obs_users" in r.getMessage() and "select" in r.getMessage() for r in slow)
    caplog.clear()
    quiet = world.cluster(slow_statement=60.0)
    with caplog.at_level(logging.WARNING, logger="shardkit.observe"), quiet.session() as s:
        s.get(ObsUser, 3)
    assert not [r for r in caplog.records if "slow statement" in r.getMessage()]
    cluster.dispose()
    quiet.dispose()


def test_partial_fanout_logged_at_warning_and_told(world: World, caplog: pytest.LogCaptureFixture) -> None:
    cluster = world.cluster(partial=True)
    rec = Recorder()
    cluster.add_listener(rec)
    with cluster.engine("s1").begin() as conn:
        conn.execute(text("DROP TABLE obs_users"))
    with caplog.at_level(logging.WARNING), cluster.session() as s:
        got = s.scalars(select(ObsUser)).all()
    assert 0 < len(got) < N
    assert any(r.levelno == logging.WARNING and "partial fan-out" in r.getMessage() for r in caplog.records)
    [fan] = rec.fanouts
    assert fan.partial and set(fan.errors) == {"s1"} and fan.shards["s1"].error is not None
    cluster.dispose()


# ------------------------------------------------------------------------------ scatter guards


def test_scatter_refuse_runs_nothing(world: World) -> None:
    cluster = world.cluster(scatter="refuse")
    log = StatementLog(cluster)
    with cluster.session() as s:
        with pytest.raises(ScatterRefusedError) as err:
            s.scalars(select(ObsUser).where(ObsUser.name == "u3")).all()
        assert "obs_users" in str(err.value) and "id" in str(err.value) and "every shard" in str(err.value)
        assert [a for a, _ in log.seen if a in SHARDS] == [] and log.aliases("obs_users") == []  # nothing ran
        # a shard key: one shard, allowed
        assert s.scalars(select(ObsUser).where(ObsUser.id == 3)).one().name == "u3"
        # some shards only (an IN of keys) is not a scatter
        assert len(s.scalars(select(ObsUser).where(ObsUser.id.in_([1, 2, 3, 4, 5]))).all()) == 5
        # shards the caller named are not a scatter
        named = s.scalars(select(ObsUser).execution_options(shardkit_using=SHARDS)).all()
        assert len(named) == N
        # the statement's option wins over the cluster's
        allowed = s.scalars(select(ObsUser).execution_options(shardkit_scatter="allow")).all()
        assert len(allowed) == N
        # a bulk UPDATE with no shard key is a scatter too
        log.seen.clear()
        with pytest.raises(ScatterRefusedError):
            s.execute(update(ObsUser).where(ObsUser.name == "u3").values(name="x"))
        assert [a for a, _ in log.seen if a in SHARDS] == [] and log.aliases("obs_users") == []
    cluster.dispose()


def test_scatter_per_session_and_statement(world: World, caplog: pytest.LogCaptureFixture) -> None:
    cluster = world.cluster()  # allow
    with cluster.session(scatter="refuse") as s, pytest.raises(ScatterRefusedError):
        s.scalars(select(ObsUser)).all()
    with cluster.session() as s:
        with pytest.raises(ScatterRefusedError):
            s.scalars(select(ObsUser).execution_options(shardkit_scatter="refuse")).all()
        with pytest.raises(ScatterRefusedError):
            s.execute(select(ObsUser), execution_options={"shardkit_scatter": "refuse"}).all()
        with caplog.at_level(logging.WARNING, logger="shardkit.observe"):
            assert len(s.scalars(select(ObsUser).execution_options(shardkit_scatter="warn")).all()) == N
        assert any("every shard" in r.getMessage() for r in caplog.records)
    with cluster.session(scatter="warn") as s, caplog.at_level(logging.WARNING, logger="shardkit.observe"):
        caplog.clear()
        s.scalars(select(ObsUser)).all()
        assert any("scatter" in r.getMessage() for r in caplog.records)
    cluster.dispose()


def test_scatter_setting_is_checked() -> None:
    with pytest.raises(shardkit.errors.ConfigError):
        shardkit.Cluster({"default": "sqlite://"}, scatter="sometimes")
    with pytest.raises(shardkit.errors.ConfigError):
        shardkit.Cluster({"default": "sqlite://"}, max_rows=0)


# ------------------------------------------------------------------------------ max_rows


def test_max_rows_stops_a_fanout(world: World) -> None:
    cluster = world.cluster(max_rows=N - 1)
    with cluster.session() as s:
        with pytest.raises(MaxRowsError) as err:
            s.scalars(select(ObsUser)).all()
        assert err.value.max_rows == N - 1  # type: ignore[attr-defined]
        s.rollback()
        assert len(s.scalars(select(ObsUser).execution_options(shardkit_max_rows=N)).all()) == N
    with cluster.session(max_rows=5) as s, pytest.raises(MaxRowsError):
        s.scalars(select(ObsUser)).all()
    with world.cluster().session() as s, pytest.raises(MaxRowsError):
        s.scalars(select(ObsUser).execution_options(shardkit_max_rows=10)).all()
    cluster.dispose()


def test_max_rows_cancels_the_other_shards_on_postgresql(world: World) -> None:
    if world.backend != "postgresql":
        pytest.skip("pg_stat_activity: PostgreSQL only")
    cluster = world.cluster()
    with cluster.session() as s:
        per_shard = {a: s.scalar(text("SELECT count(*) FROM obs_users"), execution_options={"shardkit_using": a})
                     for a in SHARDS}  # fmt: skip
    blocked = "s1"
    limit = min(n for a, n in per_shard.items() if a != blocked) - 1
    locker = create_engine(world.urls[blocked], isolation_level="AUTOCOMMIT")
    lock_conn = locker.connect()
    lock_conn.exec_driver_sql("BEGIN")
    lock_conn.exec_driver_sql("LOCK TABLE obs_users IN ACCESS EXCLUSIVE MODE")  # s1's SELECT waits
    try:
        started = time.monotonic()
        with cluster.session() as s:
            with pytest.raises(MaxRowsError):
                s.scalars(select(ObsUser).execution_options(shardkit_max_rows=limit)).all()
            s.rollback()
        assert time.monotonic() - started < 5
        db = locker.url.database
        deadline = time.monotonic() + 3
        waiting = -1
        while time.monotonic() < deadline:
            waiting = lock_conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %(db)s AND state = 'active' "
                "AND query LIKE '%%obs_users%%' AND pid <> pg_backend_pid()",
                {"db": db},
            ).scalar_one()
            if waiting == 0:
                break
            time.sleep(0.05)
        assert waiting == 0, "the blocked shard's SELECT was not cancelled on the server"
    finally:
        lock_conn.exec_driver_sql("ROLLBACK")
        lock_conn.close()
        locker.dispose()
    # the connections went back to their pools healthy: the same read now works everywhere
    for alias in SHARDS:
        assert cluster.engine(alias).pool.checkedout() == 0  # type: ignore[attr-defined]
    with cluster.session() as s:
        assert len(s.scalars(select(ObsUser)).all()) == N
    cluster.dispose()


# ------------------------------------------------------------------------------ explain(analyze=True)


def test_explain_analyze_shows_each_shard(world: World) -> None:
    cluster = world.cluster()
    with cluster.session() as s:
        stmt = select(ObsUser).order_by(ObsUser.id).limit(10)
        report = s.explain(stmt, analyze=True)
        assert report.startswith(s.explain(stmt))
        assert "analyze: rows=10 " in report
        for alias in SHARDS:
            assert any(line.startswith(f"  {alias}: rows=") and " ms" in line for line in report.splitlines())
        assert "rows=?" not in report
        assert "  merge: " in report
        one = s.explain(select(ObsUser).where(ObsUser.id == 4), analyze=True)
        assert one.startswith("single shard: ") and "analyze: rows=1 time=" in one
    cluster.dispose()


def test_listener_threads_do_not_share_events(world: World) -> None:
    cluster = world.cluster()
    metrics = MetricsListener()
    with cluster.session() as s:  # first connects (the dialects' own queries), before counting
        s.scalars(select(ObsUser)).all()
    cluster.add_listener(metrics)

    def reads() -> None:
        with cluster.session() as s:
            for i in range(1, 21):
                s.get(ObsUser, i)

    threads = [threading.Thread(target=reads) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(metrics.shards[a].statements for a in SHARDS if a in metrics.shards) == 80
    assert sum(metrics.shards[a].latency.count for a in SHARDS if a in metrics.shards) == 80
    cluster.dispose()


def test_a_failing_listener_is_logged_not_raised(world: World, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def on_statement(self, event: StatementEvent) -> None:
            raise RuntimeError("listener bug")

        def on_fanout(self, event: FanoutEvent) -> None:
            raise RuntimeError("listener bug")

    cluster = world.cluster()
    cluster.add_listener(Broken())
    with caplog.at_level(logging.ERROR, logger="shardkit.observe"), cluster.session() as s:
        assert s.get(ObsUser, 2) is not None
        assert len(s.scalars(select(ObsUser)).all()) == N
    assert any("listener" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    cluster.dispose()


def test_a_plain_callable_hears_every_event(world: World) -> None:
    cluster = world.cluster()
    seen: list[Any] = []
    cluster.add_listener(seen.append)
    with cluster.session() as s:
        s.get(ObsUser, 4)
        s.scalars(select(ObsUser)).all()
    assert any(isinstance(e, StatementEvent) and e.table == "obs_users" for e in seen)
    assert [e.width for e in seen if isinstance(e, FanoutEvent)] == [len(SHARDS)]
    cluster.remove_listener(seen.append)
    cluster.dispose()
