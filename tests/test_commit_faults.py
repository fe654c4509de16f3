"""Commits over several shards when one of them fails, and two-phase recovery among strangers.

Each fault is reproduced the way it was found (issue 10): a loopback proxy in front of
one shard that is cut at the right moment, prepared transactions of another application
on the same server, a child process killed after the two-phase decision.  Real PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase

import shardkit
from shardkit import _twophase
from shardkit._twophase import make_gid, parse_gid
from shardkit.errors import (
    CommitError,
    PartialCommitError,
    ShardkitError,
    TwoPhaseCommitError,
    TwoPhaseRecoveryError,
)
from tests.conftest import PG_URL, DatabaseFactory, require_server
from tests.faults import TcpProxy, proxied_url, tcp_proxy
from tests.test_twophase import _prepared_transactions_enabled, crash_at

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True), Column("body", String(50)))


class Base(DeclarativeBase):
    pass


class Note(Base):
    __table__ = notes


def _literal(gid: str) -> str:
    return "'" + gid.replace("'", "''") + "'"


class Shards:
    """PostgreSQL databases with a ``notes`` table; every prepared transaction is rolled back at the end."""

    def __init__(self, databases: DatabaseFactory) -> None:
        self.databases = databases
        self.urls: dict[str, str] = {}  # alias -> direct URL (never through a proxy)

    def add(self, *aliases: str) -> dict[str, str]:
        for alias in aliases:
            url = self.databases.url("postgresql", alias)
            engine = create_engine(url)
            metadata.create_all(engine)
            engine.dispose()
            self.urls[alias] = url
        return dict(self.urls)

    def rows(self, alias: str) -> list[tuple[Any, ...]]:
        engine = create_engine(self.urls[alias])
        with engine.connect() as conn:
            found = [tuple(r) for r in conn.execute(text("SELECT id, body FROM notes ORDER BY id"))]
        engine.dispose()
        return found

    def prepared(self, alias: str) -> list[str]:
        engine = create_engine(self.urls[alias])
        with engine.connect() as conn:
            found = sorted(
                conn.execute(text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")).scalars()
            )
        engine.dispose()
        return found

    def prepare_foreign(self, alias: str, gid: str, row_id: int) -> None:
        """Another application's prepared transaction (it inserted a row) on ``alias``'s database."""
        engine = create_engine(self.urls[alias])
        with engine.connect() as conn:
            conn.execute(insert(notes).values(id=row_id, body="other app"))
            conn.exec_driver_sql(f"PREPARE TRANSACTION {_literal(gid)}")
        engine.dispose()

    def finish_all(self) -> None:
        for url in self.urls.values():
            engine = create_engine(url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                gids = conn.execute(
                    text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                ).scalars()
                for gid in list(gids):
                    conn.exec_driver_sql(f"ROLLBACK PREPARED {_literal(gid)}")
            engine.dispose()


@pytest.fixture
def shards(databases: DatabaseFactory) -> Iterator[Shards]:
    _prepared_transactions_enabled()
    found = Shards(databases)
    yield found
    found.finish_all()  # a prepared transaction would keep its database from being dropped


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    require_server(PG_URL, "pg")
    with tcp_proxy(PG_URL) as p:
        yield p


def write(session: shardkit.ShardSession, alias: str, row_id: int) -> None:
    session.execute(insert(notes).values(id=row_id, body=f"on {alias}").execution_options(shardkit_using=alias))


def log_rows(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        count = int(conn.execute(text("SELECT count(*) FROM shardkit_twophase_log")).scalar_one())
    engine.dispose()
    return count


# -- GIDs: shardkit's own, exactly --------------------------------------------------------------


def test_only_shardkit_gids_parse() -> None:
    txid = uuid.uuid4().hex
    assert parse_gid(make_gid(txid, 2, 1)) == txid
    for foreign in (
        "shardkitXotherapp_tx42",  # what LIKE 'shardkit_%' took for shardkit's
        f"shardkitX{txid}_2_0",
        f"shardkit_{txid}_2_2",  # index not below the count
        f"shardkit_{txid}_1_0",  # shardkit never prepares a single participant
        f"shardkit_{txid}_02_0",
        f"shardkit_{txid.upper()}_2_0",
        f"shardkit_{txid}_2_0_x",
        f"shardkit_{txid}_2_0'; DROP TABLE notes; --",
        "shardkit_o'brien",
        f"shardkit_{txid[:31]}_2_0",
    ):
        assert parse_gid(foreign) is None, foreign
    with pytest.raises(ShardkitError, match="not a shardkit two-phase GID"):
        make_gid("not-hex", 2, 0)


# -- recovery never touches another application's prepared transactions ------------------------


def test_recovery_leaves_another_applications_prepared_transactions_alone(shards: Shards) -> None:
    urls = shards.add("default", "a", "b")
    foreign = [
        "shardkitXotherapp_tx42",  # rolled back by the LIKE 'shardkit_%' of the first version
        "shardkit_o'brien",  # a quote: made the spliced ROLLBACK PREPARED fail for every shard
        f"shardkit_{uuid.uuid4().hex}_2_7",  # shardkit's shape, but not a GID shardkit writes
    ]
    for row_id, gid in enumerate(foreign, start=100):
        shards.prepare_foreign("a", gid, row_id)
    # a real in-doubt shardkit transaction on a and b: the child dies before the decision
    assert crash_at("after_prepare", urls) == -9
    ours = [gid for gid in shards.prepared("a") if gid not in foreign]
    assert len(ours) == 1 and parse_gid(ours[0]) is not None

    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    try:
        resolved = cluster.recover_twophase(min_age=0)
    finally:
        cluster.dispose()
    assert [(d.alias, d.gid, d.action) for d in resolved] == [("a", ours[0], "rollback")]
    assert shards.prepared("a") == sorted(foreign)  # every foreign one is still prepared
    shards.finish_all()
    assert shards.rows("a") == shards.rows("b") == []  # theirs rolled back by us here, ours by recovery


# -- one unreachable alias does not stop recovery of the others ---------------------------------


def test_recovery_goes_on_past_an_unreachable_alias_and_names_it(
    shards: Shards, proxy: TcpProxy, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from shardkit.cli import cli

    direct = shards.add("default", "a", "b")
    urls = {**direct, "a": proxied_url(direct["a"], proxy)}  # a first: the one that fails
    assert crash_at("after_decision", urls) == -9  # decided, nothing committed yet
    assert len(shards.prepared("a")) == len(shards.prepared("b")) == 1
    shards.prepare_foreign("b", "shardkit_it's_theirs", 100)
    proxy.cut()

    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with pytest.raises(TwoPhaseRecoveryError, match=r"could not finish on 'a'") as caught:
        cluster.recover_twophase(min_age=3600)  # decided: resolved at once, whatever min_age
    cluster.dispose()
    assert list(caught.value.errors) == ["a"]
    assert isinstance(caught.value.errors["a"], OperationalError)
    assert [(d.alias, d.action) for d in caught.value.resolved] == [("b", "commit")]
    assert shards.rows("b") == [(2, "on b")]  # resolved although a is down
    assert shards.prepared("b") == ["shardkit_it's_theirs"]
    assert len(shards.prepared("a")) == 1
    assert log_rows(direct["default"]) == 1  # kept: a still needs the decision

    (tmp_path / "tpc_down_settings.py").write_text(f"DATABASES = {urls!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    args = ["twophase", "recover", "--settings", "tpc_down_settings", "--min-age", "0"]
    down = runner.invoke(cli, args)
    assert down.exit_code == 1, down.output
    assert "'a'" in down.output and "run it again" in down.output
    assert "Traceback" not in down.output

    proxy.restore()
    done = runner.invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    assert [(d["alias"], d["action"]) for d in json.loads(done.output)] == [("a", "commit")]
    assert shards.rows("a") == [(1, "on a")]
    assert shards.prepared("a") == [] and shards.prepared("b") == ["shardkit_it's_theirs"]
    assert log_rows(direct["default"]) == 0


# -- two-phase commit, one shard failing at COMMIT PREPARED -------------------------------------


def test_twophase_commits_every_reachable_shard_when_one_fails_at_commit_prepared(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = shards.add("default", "a", "b")
    urls = {**direct, "a": proxied_url(direct["a"], proxy)}  # "a" sorts first: it used to stop the loop
    log_decision = _twophase._log_decision

    def log_then_cut(*args: Any) -> None:  # a is prepared, the decision logged: now a's link dies
        log_decision(*args)
        proxy.cut()

    monkeypatch.setattr(_twophase, "_log_decision", log_then_cut)
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        with pytest.raises(TwoPhaseCommitError) as caught:
            s.commit()
        s.rollback()  # harmless: the session was already rolled back
        error = caught.value
        assert isinstance(error, CommitError)
        assert (error.decision, error.committed, error.not_committed) == ("commit", ["b"], ["a"])
        assert isinstance(error.__cause__, DBAPIError) and list(error.errors) == ["a"]
        assert "decision is COMMIT" in str(error) and "recover" in str(error)
        assert parse_gid(shards.prepared("a")[0]) == error.txid
        # the healthy shard is committed and holds no lock; the session goes on working
        assert shards.rows("b") == [(2, "on b")] and shards.prepared("b") == []
        assert s.execute(select(notes.c.body).execution_options(shardkit_using="b")).scalars().all() == ["on b"]
    monkeypatch.undo()
    cluster.dispose()

    proxy.restore()
    recovering = shardkit.Cluster(urls, cross_shard_writes="twophase")
    resolved = recovering.recover_twophase(min_age=3600)  # the decision is logged: no waiting for min_age
    assert [(d.alias, d.action) for d in resolved] == [("a", "commit")]
    assert shards.rows("a") == [(1, "on a")] and shards.prepared("a") == []
    assert log_rows(direct["default"]) == 1  # a young decision row is left to a later run
    assert recovering.recover_twophase(min_age=0) == []
    assert log_rows(direct["default"]) == 0
    recovering.dispose()


def test_twophase_failure_at_prepare_rolls_back_everywhere_and_rollback_is_harmless(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = shards.add("default", "a", "b")
    urls = {**direct, "b": proxied_url(direct["b"], proxy)}
    prepare = _twophase._prepare
    calls: list[str] = []

    def cut_before_second(conn: Any, gid: str) -> None:
        calls.append(gid)
        if len(calls) == 2:
            proxy.cut()  # a is prepared; b's link dies before its PREPARE
        prepare(conn, gid)

    monkeypatch.setattr(_twophase, "_prepare", cut_before_second)
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        with pytest.raises(OperationalError):
            s.commit()
        s.rollback()
    cluster.dispose()
    assert shards.prepared("a") == shards.prepared("b") == []
    assert shards.rows("a") == shards.rows("b") == []


def _commit_with_decision_step(urls: dict[str, str], step: Any, monkeypatch: pytest.MonkeyPatch) -> BaseException:
    log_decision = _twophase._log_decision
    monkeypatch.setattr(_twophase, "_log_decision", lambda *args: step(log_decision, *args))
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    try:
        with cluster.session() as s:
            write(s, "a", 1)
            write(s, "b", 2)
            with pytest.raises(Exception) as caught:
                s.commit()
            s.rollback()
    finally:
        monkeypatch.undo()
        cluster.dispose()
    return caught.value


def test_a_blip_on_default_at_the_decision_rolls_back_everywhere(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = shards.add("default", "a", "b")
    urls = {**direct, "default": proxied_url(direct["default"], proxy)}

    def blip(log_decision: Any, *args: Any) -> None:
        proxy.cut()
        try:
            log_decision(*args)  # refused: nothing was written
        finally:
            proxy.restore()  # back at once: its absence can be checked

    error = _commit_with_decision_step(urls, blip, monkeypatch)
    assert isinstance(error, OperationalError)
    assert shards.prepared("a") == shards.prepared("b") == []
    assert shards.rows("a") == shards.rows("b") == []


def test_a_decision_that_may_have_been_written_leaves_every_shard_prepared(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = shards.add("default", "a", "b")
    urls = {**direct, "default": proxied_url(direct["default"], proxy)}

    def written_then_lost(log_decision: Any, cluster: shardkit.Cluster, *args: Any) -> None:
        log_decision(cluster, *args)  # the decision is written...
        proxy.cut()  # ...and 'default' is gone before the committer learns it
        with cluster.engine().connect() as conn:
            conn.execute(text("SELECT 1"))  # fails for real: the link is cut

    error = _commit_with_decision_step(urls, written_then_lost, monkeypatch)
    assert isinstance(error, TwoPhaseCommitError) and error.decision == "unknown"
    assert error.not_committed == ["a", "b"] and isinstance(error.__cause__, OperationalError)
    # rolling back some of them could leave the others to be committed by recovery: none is touched
    assert len(shards.prepared("a")) == len(shards.prepared("b")) == 1
    proxy.restore()
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    resolved = cluster.recover_twophase(min_age=3600)  # the decision was written: committed at once
    cluster.dispose()
    assert sorted((d.alias, d.action) for d in resolved) == [("a", "commit"), ("b", "commit")]
    assert shards.rows("a") == [(1, "on a")] and shards.rows("b") == [(2, "on b")]


def test_a_decision_never_written_while_default_is_down_is_rolled_back_by_recovery(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = shards.add("default", "a", "b")
    urls = {**direct, "default": proxied_url(direct["default"], proxy)}

    def down(log_decision: Any, *args: Any) -> None:
        proxy.cut()
        log_decision(*args)

    error = _commit_with_decision_step(urls, down, monkeypatch)
    assert isinstance(error, TwoPhaseCommitError) and error.decision == "unknown"
    assert len(shards.prepared("a")) == len(shards.prepared("b")) == 1
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with pytest.raises(TwoPhaseRecoveryError, match="'default'"):
        cluster.recover_twophase(min_age=0)  # without the decisions nothing is resolved
    assert len(shards.prepared("a")) == 1
    proxy.restore()
    assert cluster.recover_twophase(min_age=3600) == []  # undecided and young: may still be running
    resolved = cluster.recover_twophase(min_age=0)
    cluster.dispose()
    assert sorted((d.alias, d.action) for d in resolved) == [("a", "rollback"), ("b", "rollback")]
    assert shards.rows("a") == shards.rows("b") == []


# -- cross_shard_writes="allow", one shard failing at commit ------------------------------------


def test_allow_mode_names_the_shards_that_committed_and_those_that_did_not(shards: Shards, proxy: TcpProxy) -> None:
    direct = shards.add("default", "a", "b", "c")
    urls = {**direct, "b": proxied_url(direct["b"], proxy)}  # committed in DATABASES order: a, b, c
    cluster = shardkit.Cluster(urls)
    with cluster.session() as s:
        for row_id, alias in enumerate(("c", "b", "a"), start=1):
            write(s, alias, row_id)
        proxy.cut()
        with pytest.raises(PartialCommitError) as caught:
            s.commit()
        s.rollback()  # harmless
        error = caught.value
        assert (error.alias, error.committed, error.not_committed, error.rolled_back) == ("b", ["a"], ["b", "c"], ["c"])
        assert isinstance(error.__cause__, DBAPIError)  # the driver's error, as SQLAlchemy wraps it
        assert "'b'" in str(error) and "a had committed" in str(error) and "rolled back on c" in str(error)
        assert s.execute(select(notes.c.id).execution_options(shardkit_using="c")).scalars().all() == []
    cluster.dispose()
    assert shards.rows("a") == [(3, "on a")]
    assert shards.rows("b") == shards.rows("c") == []


def test_allow_mode_orm_objects_flushed_by_the_commit_itself(shards: Shards, proxy: TcpProxy) -> None:
    from sqlalchemy import event

    direct = shards.add("default", "a", "b", "c")
    urls = {**direct, "b": proxied_url(direct["b"], proxy)}
    cluster = shardkit.Cluster(urls)
    with cluster.session() as s:  # no connection is open before commit(): its flush opens them
        for row_id, alias in enumerate(("c", "b", "a"), start=1):
            s.save(Note(id=row_id, body=f"on {alias}"), using=alias)
        event.listen(s, "after_flush_postexec", lambda *args: proxy.cut())  # flushed: now b's link dies
        with pytest.raises(PartialCommitError) as caught:
            s.commit()
        s.rollback()
    cluster.dispose()
    assert (caught.value.committed, caught.value.not_committed) == (["a"], ["b", "c"])
    assert shards.rows("a") == [(3, "on a")]
    assert shards.rows("b") == shards.rows("c") == []


def test_allow_mode_failure_of_the_first_shard_commits_nothing(shards: Shards, proxy: TcpProxy) -> None:
    direct = shards.add("default", "a", "b")
    urls = {**direct, "a": proxied_url(direct["a"], proxy)}
    cluster = shardkit.Cluster(urls)
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        proxy.cut()
        with pytest.raises(OperationalError) as caught:  # as SQLAlchemy raises a failed commit
            s.commit()
        assert not isinstance(caught.value, CommitError)
        s.rollback()
    cluster.dispose()
    assert shards.rows("a") == shards.rows("b") == []


def test_allow_mode_commits_a_shard_only_read_from_first(shards: Shards, proxy: TcpProxy) -> None:
    direct = shards.add("default", "a", "b", "c")
    urls = {**direct, "c": proxied_url(direct["c"], proxy)}  # last in DATABASES, only read from
    cluster = shardkit.Cluster(urls)
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        assert s.execute(select(notes.c.id).execution_options(shardkit_using="c")).all() == []
        proxy.cut()
        with pytest.raises(OperationalError):  # c failed first: nothing was committed anywhere
            s.commit()
        s.rollback()
    cluster.dispose()
    assert shards.rows("a") == shards.rows("b") == []


@pytest.mark.parametrize("mode", ["allow", "twophase"])
def test_before_commit_listeners_run_before_any_shard_commits(shards: Shards, mode: str) -> None:
    from sqlalchemy import event

    urls = shards.add("default", "a", "b")
    cluster = shardkit.Cluster(urls, cross_shard_writes=mode)

    def veto(session: Any) -> None:
        raise RuntimeError("vetoed by a before_commit listener")

    with cluster.session() as s:
        event.listen(s, "before_commit", veto)
        write(s, "b", 2)
        write(s, "a", 1)
        with pytest.raises(RuntimeError, match="vetoed"):
            s.commit()
        s.rollback()
        event.remove(s, "before_commit", veto)
        write(s, "a", 3)
        write(s, "b", 4)
        s.commit()
    cluster.dispose()
    assert shards.rows("a") == [(3, "on a")] and shards.rows("b") == [(4, "on b")]
    assert shards.prepared("a") == shards.prepared("b") == []


def test_twophase_covers_writes_made_by_the_commits_own_flush(shards: Shards, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import event

    urls = shards.add("default", "a", "b", "c")
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    prepared: list[str] = []
    prepare = _twophase._prepare
    monkeypatch.setattr(_twophase, "_prepare", lambda conn, gid: (prepared.append(gid), prepare(conn, gid)))
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        # an audit row added by a before_commit listener, flushed by commit() itself, on a third shard
        event.listen(s, "before_commit", lambda session: session.save(Note(id=3, body="audit"), using="c"))
        s.commit()
    cluster.dispose()
    assert len(prepared) == 3  # a, b and c are all participants of the one atomic commit
    assert shards.rows("c") == [(3, "audit")]


# -- two-phase recovery racing a commit that stalls (issue 10 review) -----------------------------


def log_decisions(url: str) -> list[tuple[str, str]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        found = [tuple(r) for r in conn.execute(text("SELECT txid, decision FROM shardkit_twophase_log"))]
    engine.dispose()
    return found  # type: ignore[return-value]


def test_recovery_during_a_stalled_decision_aborts_it_and_the_commit_raises(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'default' stalls while the COMMIT decision is being logged, longer than recovery's min_age;
    recovery presumes abort meanwhile.  The commit must not report success: it used to log COMMIT
    when 'default' came back, take 42704 at COMMIT PREPARED for done, and return with no row anywhere."""
    import threading
    import time

    direct = shards.add("default", "a", "b")
    urls = {**direct, "default": proxied_url(direct["default"], proxy)}
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:  # the log exists, 'default' has a pooled connection through the proxy
        write(s, "a", 100)
        write(s, "b", 101)
        s.commit()
    stalled = threading.Event()
    log_decision = _twophase._log_decision

    def stall_then_log(*args: Any) -> None:
        proxy.blackhole()  # from now on 'default' holds every byte until restored
        stalled.set()
        log_decision(*args)

    monkeypatch.setattr(_twophase, "_log_decision", stall_then_log)
    outcome: dict[str, BaseException] = {}

    def committer() -> None:
        try:
            with cluster.session() as s:
                write(s, "a", 1)
                write(s, "b", 2)
                s.commit()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=committer, daemon=True)
    thread.start()
    try:
        assert stalled.wait(20), "the commit never reached its decision"
        assert len(shards.prepared("a")) == len(shards.prepared("b")) == 1
        time.sleep(0.6)  # both prepared for longer than min_age
        recovering = shardkit.Cluster(direct, cross_shard_writes="twophase")  # recovery does reach 'default'
        resolved = recovering.recover_twophase(min_age=0.3)
        assert sorted((d.alias, d.action) for d in resolved) == [("a", "rollback"), ("b", "rollback")]
        txid = resolved[0].txid
        assert log_decisions(direct["default"]) == [(txid, "abort")]  # logged before anything was rolled back
    finally:
        proxy.restore()  # the stalled INSERT of COMMIT arrives now
        thread.join(30)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, TwoPhaseCommitError), repr(error)
    assert (error.decision, error.committed, error.not_committed) == ("abort", [], ["a", "b"])
    assert error.txid == txid and "nothing was committed" in str(error)
    assert shards.rows("a") == [(100, "on a")] and shards.rows("b") == [(101, "on b")]  # only the warm-up rows
    assert shards.prepared("a") == shards.prepared("b") == []
    # the abort decision outlives its transaction, for a committer stalled even longer; then it goes
    assert recovering.recover_twophase(min_age=0) == []
    assert log_decisions(direct["default"]) == [(txid, "abort")]
    engine = create_engine(direct["default"])
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE shardkit_twophase_log SET decided_at = decided_at - make_interval(secs => :s)"),
            {"s": _twophase.ABORT_RETENTION + 1},
        )
    engine.dispose()
    assert recovering.recover_twophase(min_age=0) == []
    assert log_decisions(direct["default"]) == []
    recovering.dispose()
    monkeypatch.undo()
    cluster.dispose()


def test_recovery_after_the_decision_commits_and_the_commit_succeeds(
    shards: Shards, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reverse race: COMMIT is logged, then recovery runs before the committer's COMMIT PREPARED,
    which finds the GIDs gone (42704): it asks each shard what became of its transaction."""
    urls = shards.add("default", "a", "b")
    recovering = shardkit.Cluster(urls, cross_shard_writes="twophase")
    log_decision = _twophase._log_decision
    resolved: list[Any] = []

    def log_then_recover(*args: Any) -> None:
        log_decision(*args)
        resolved.extend(recovering.recover_twophase(min_age=0))

    monkeypatch.setattr(_twophase, "_log_decision", log_then_recover)
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        s.commit()  # no error: every shard is committed, by recovery
    monkeypatch.undo()
    cluster.dispose()
    recovering.dispose()
    assert sorted((d.alias, d.action) for d in resolved) == [("a", "commit"), ("b", "commit")]
    assert shards.rows("a") == [(1, "on a")] and shards.rows("b") == [(2, "on b")]
    assert shards.prepared("a") == shards.prepared("b") == []
    assert log_decisions(urls["default"]) == []


def test_a_vanished_prepared_transaction_is_never_counted_as_committed(
    shards: Shards, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT PREPARED answers 42704 (no such GID) because someone else rolled it back: not done."""
    urls = shards.add("default", "a", "b")
    log_decision = _twophase._log_decision

    def log_then_lose_b(cluster: shardkit.Cluster, txid: str, aliases: list[str]) -> None:
        log_decision(cluster, txid, aliases)
        engine = create_engine(urls["b"], isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:  # an operator's ROLLBACK PREPARED, by hand
            conn.exec_driver_sql(f"ROLLBACK PREPARED {_literal(make_gid(txid, 2, 1))}")
        engine.dispose()

    monkeypatch.setattr(_twophase, "_log_decision", log_then_lose_b)
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        with pytest.raises(TwoPhaseCommitError) as caught:
            s.commit()
        s.rollback()
    monkeypatch.undo()
    cluster.dispose()
    error = caught.value
    assert (error.decision, error.committed, error.not_committed) == ("commit", ["a"], ["b"])
    assert "rolled back by someone else" in str(error)
    assert shards.rows("a") == [(1, "on a")] and shards.rows("b") == []


def test_recovery_that_read_no_decision_rechecks_under_the_key_before_rolling_back(
    shards: Shards, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COMMIT logged after recovery read the log: recovery's ABORT meets the key and commits instead."""
    urls = shards.add("default", "a", "b")
    assert crash_at("after_decision", urls) == -9  # prepared on both, COMMIT logged
    monkeypatch.setattr(_twophase, "_read_log", lambda cluster, upgrade: {})  # a read from just before
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    resolved = cluster.recover_twophase(min_age=0)
    cluster.dispose()
    assert sorted((d.alias, d.action) for d in resolved) == [("a", "commit"), ("b", "commit")]
    assert shards.rows("a") == [(1, "on a")] and shards.rows("b") == [(2, "on b")]
    assert log_decisions(urls["default"]) == []  # committed everywhere: the decision is no longer needed


def test_a_decision_log_written_by_an_older_shardkit_is_upgraded(shards: Shards) -> None:
    urls = shards.add("default", "a", "b")
    engine = create_engine(urls["default"])
    with engine.begin() as conn:  # the log as it was: no decision column, every row a COMMIT
        conn.exec_driver_sql(
            "CREATE TABLE shardkit_twophase_log (txid VARCHAR(32) PRIMARY KEY, aliases VARCHAR(2000) NOT NULL, "
            "decided_at TIMESTAMP WITH TIME ZONE DEFAULT now())"
        )
        conn.exec_driver_sql("INSERT INTO shardkit_twophase_log (txid, aliases) VALUES ('0' || repeat('f', 31), 'a,b')")
    engine.dispose()
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    assert cluster.recover_twophase(min_age=0, dry_run=True) == []  # a dry run reads it as it is
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        s.commit()
    assert cluster.recover_twophase(min_age=3600) == []
    cluster.dispose()
    assert log_decisions(urls["default"]) == [("0" + "f" * 31, "commit")]
    assert shards.rows("a") == [(1, "on a")] and shards.rows("b") == [(2, "on b")]


# -- writes shardkit does not route itself: text(), a shard's connection ------------------------


def _text_write(session: shardkit.ShardSession, alias: str, row_id: int) -> None:
    session.execute(
        text("INSERT INTO notes (id, body) VALUES (:id, :body)").execution_options(shardkit_using=alias),
        {"id": row_id, "body": f"on {alias}"},
    )


def _connection_write(session: shardkit.ShardSession, alias: str, row_id: int) -> None:
    conn = session.connection(bind_arguments={"shard_id": alias})
    conn.execute(insert(notes).values(id=row_id, body=f"on {alias}"))


WRITERS = {"text": _text_write, "connection": _connection_write}


@pytest.mark.parametrize("how", sorted(WRITERS))
def test_twophase_covers_writes_shardkit_did_not_route(
    shards: Shards, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from sqlalchemy import event

    direct = shards.add("default", "a", "b")
    urls = {**direct, "b": proxied_url(direct["b"], proxy)}
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    writer = WRITERS[how]
    # b's link dies as the commit starts: nothing may be committed anywhere
    with cluster.session() as s:
        writer(s, "a", 1)
        writer(s, "b", 2)
        event.listen(s, "before_commit", lambda session: proxy.cut())
        with pytest.raises(OperationalError) as caught:
            s.commit()
        s.rollback()
    assert any("'b'" in note for note in getattr(caught.value, "__notes__", []))
    assert shards.rows("a") == [] and shards.prepared("a") == []
    proxy.restore()
    # b's link dies once the decision is logged: a is committed, b is left to recovery, which commits it
    prepared: list[str] = []
    prepare = _twophase._prepare
    log_decision = _twophase._log_decision
    monkeypatch.setattr(_twophase, "_prepare", lambda conn, gid: (prepared.append(gid), prepare(conn, gid)))
    monkeypatch.setattr(_twophase, "_log_decision", lambda *args: (log_decision(*args), proxy.cut()))
    with cluster.session() as s:
        writer(s, "a", 3)
        writer(s, "b", 4)
        with pytest.raises(TwoPhaseCommitError) as failed:
            s.commit()
        s.rollback()
    monkeypatch.undo()
    cluster.dispose()
    assert len(prepared) == 2  # both shards took part in the two-phase commit
    assert (failed.value.committed, failed.value.not_committed) == (["a"], ["b"])
    proxy.restore()
    recovering = shardkit.Cluster(direct, cross_shard_writes="twophase")
    assert [(d.alias, d.action) for d in recovering.recover_twophase(min_age=3600)] == [("b", "commit")]
    recovering.dispose()
    assert shards.rows("a") == [(3, "on a")] and shards.rows("b") == [(4, "on b")]


@pytest.mark.parametrize("how", sorted(WRITERS))
def test_allow_mode_names_the_shards_for_writes_shardkit_did_not_route(
    shards: Shards, proxy: TcpProxy, how: str
) -> None:
    from sqlalchemy import event

    direct = shards.add("default", "a", "b")
    urls = {**direct, "b": proxied_url(direct["b"], proxy)}
    cluster = shardkit.Cluster(urls)
    with cluster.session() as s:
        WRITERS[how](s, "b", 2)
        WRITERS[how](s, "a", 1)
        event.listen(s, "before_commit", lambda session: proxy.cut())
        with pytest.raises(PartialCommitError) as caught:
            s.commit()
        s.rollback()
    cluster.dispose()
    assert (caught.value.committed, caught.value.not_committed) == (["a"], ["b"])
    assert shards.rows("a") == [(1, "on a")]


def test_twophase_does_not_prepare_a_shard_only_read_from(shards: Shards, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = shards.add("default", "a", "b", "c")
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    prepared: list[str] = []
    prepare = _twophase._prepare
    monkeypatch.setattr(_twophase, "_prepare", lambda conn, gid: (prepared.append(gid), prepare(conn, gid)))
    with cluster.session() as s:
        _text_write(s, "a", 1)
        assert s.execute(text("SELECT count(*) FROM notes").execution_options(shardkit_using="c")).scalar() == 0
        s.commit()  # one writer: a plain COMMIT
        _text_write(s, "a", 2)
        _text_write(s, "b", 3)
        s.execute(select(notes.c.id).execution_options(shardkit_using="c")).all()
        s.commit()
    cluster.dispose()
    assert len(prepared) == 2 and {gid.rsplit("_", 2)[1] for gid in prepared} == {"2"}  # a and b, not c
    assert shards.rows("a") == [(1, "on a"), (2, "on a")] and shards.rows("b") == [(3, "on b")]


@pytest.mark.parametrize("mode", ["allow", "twophase"])
def test_commit_over_engines_made_by_execution_options(
    shards: Shards, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """DATABASES given as ``engine.execution_options(...)`` engines: the commit hook is placed on their
    connections too (SQLAlchemy 2.0.30 refused ``event.listen(conn, "commit")`` on them: every commit
    over two of them failed)."""
    urls = shards.add("default", "a", "b")
    engines = {alias: create_engine(url).execution_options(shardkit_test=alias) for alias, url in urls.items()}
    cluster = shardkit.Cluster(engines, cross_shard_writes=mode)
    taken_over: list[int] = []
    commit_each = _twophase._commit_each
    two_phase_commit = _twophase.two_phase_commit
    monkeypatch.setattr(_twophase, "_commit_each", lambda conns: (taken_over.append(len(conns)), commit_each(conns)))
    monkeypatch.setattr(
        _twophase, "two_phase_commit", lambda *args: (taken_over.append(len(args[1])), two_phase_commit(*args))
    )
    with cluster.session() as s:
        write(s, "a", 1)
        write(s, "b", 2)
        s.commit()
    for engine in engines.values():
        engine.dispose()
    assert taken_over == [2]  # shardkit's ordered (or two-phase) commit ran, over both connections
    assert shards.rows("a") == [(1, "on a")] and shards.rows("b") == [(2, "on b")]
    assert shards.prepared("a") == shards.prepared("b") == []
