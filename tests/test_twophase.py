"""Two-phase commit across PostgreSQL shards, and recovery after a crash between the phases."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, text
from sqlalchemy.orm import DeclarativeBase

import shardkit
from shardkit.errors import CrossShardWriteError
from tests.conftest import IN_CI, PG_URL, DatabaseFactory, require_server


class Base(DeclarativeBase):
    pass


class Note(Base):
    __table__ = Table("notes", Base.metadata, Column("id", Integer, primary_key=True), Column("body", String(50)))


metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True), Column("body", String(50)))


def _prepared_transactions_enabled() -> None:
    require_server(PG_URL, "pg")
    engine = create_engine(PG_URL)
    with engine.connect() as conn:
        enabled = int(conn.execute(text("SHOW max_prepared_transactions")).scalar_one())
    engine.dispose()
    if not enabled:
        message = "!!! PostgreSQL has max_prepared_transactions = 0: two-phase commit cannot run (.ci/run sets it)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def urls(databases: DatabaseFactory) -> Iterator[dict[str, str]]:
    _prepared_transactions_enabled()
    found = {alias: databases.url("postgresql", alias) for alias in ("default", "a", "b")}
    for url in found.values():
        engine = create_engine(url)
        metadata.create_all(engine)
        engine.dispose()
    yield found
    for url in found.values():  # a failed test must not leave prepared transactions holding the DB
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for (gid,) in conn.execute(text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")):
                conn.exec_driver_sql("ROLLBACK PREPARED '{}'".format(gid.replace("'", "''")))
        engine.dispose()


def rows(url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        found = [tuple(r) for r in conn.execute(text("SELECT id, body FROM notes ORDER BY id"))]
    engine.dispose()
    return found


def prepared(url: str) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        found = list(
            conn.execute(text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")).scalars()
        )
    engine.dispose()
    return found


def write_both(session: shardkit.ShardSession) -> None:
    session.execute(insert(notes).values(id=1, body="on a").execution_options(shardkit_using="a"))
    session.execute(insert(notes).values(id=2, body="on b").execution_options(shardkit_using="b"))


def test_two_phase_commit_is_atomic_and_leaves_nothing_prepared(urls: dict[str, str]) -> None:
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:
        write_both(s)
        s.commit()
    assert rows(urls["a"]) == [(1, "on a")] and rows(urls["b"]) == [(2, "on b")]
    assert prepared(urls["a"]) == prepared(urls["b"]) == []
    assert cluster.recover_twophase(min_age=0) == []
    cluster.dispose()


def test_twophase_refuses_a_non_postgresql_alias_before_writing(urls: dict[str, str], tmp_path: Any) -> None:
    lite = f"sqlite:///{tmp_path / 'lite.db'}"
    cluster = shardkit.Cluster({**urls, "lite": lite}, cross_shard_writes="twophase")
    cluster.create_all(Base, aliases=["lite"])
    with cluster.session() as s:
        s.save(Note(id=5, body="pg"), using="a")
        s.save(Note(id=6, body="lite"), using="lite")
        with pytest.raises(CrossShardWriteError, match=r"two-phase commit needs PostgreSQL.*lite"):
            s.commit()
        s.rollback()
    assert rows(urls["a"]) == []
    cluster.dispose()


CRASHING_WRITER = textwrap.dedent(
    """
    import json, os, signal, sys
    from sqlalchemy import Column, Integer, MetaData, String, Table, insert
    import shardkit
    from shardkit import _twophase

    urls, point = json.loads(sys.argv[1]), sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    # reach the moment from outside: wrap one step of the commit, then kill this process
    if point == "after_prepare":  # the first PREPARE TRANSACTION has run, no decision yet
        prepare = _twophase._prepare
        _twophase._prepare = lambda conn, gid: (prepare(conn, gid), die())
    elif point == "after_decision":  # the decision is logged, no COMMIT PREPARED has run
        log_decision = _twophase._log_decision
        _twophase._log_decision = lambda *args: (log_decision(*args), die())
    else:
        raise SystemExit(f"unknown crash point {point!r}")

    notes = Table("notes", MetaData(), Column("id", Integer, primary_key=True), Column("body", String(50)))
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    with cluster.session() as s:
        s.execute(insert(notes).values(id=1, body="on a").execution_options(shardkit_using="a"))
        s.execute(insert(notes).values(id=2, body="on b").execution_options(shardkit_using="b"))
        s.commit()
    print("committed")
    """
)


def crash_at(point: str, urls: dict[str, str]) -> int:
    """Run a two-phase commit in a child process that SIGKILLs itself at ``point``."""
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, json.dumps(urls), point], capture_output=True, timeout=60
    )
    assert b"committed" not in proc.stdout, proc.stderr.decode(errors="replace")
    return proc.returncode


def test_crash_after_prepare_is_rolled_back_everywhere(urls: dict[str, str]) -> None:
    assert crash_at("after_prepare", urls) == -9  # killed between PREPARE and the decision
    assert len(prepared(urls["a"])) == 1  # the first participant is in doubt, holding its locks
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    assert cluster.recover_twophase(min_age=3600) == []  # too young to touch
    resolved = cluster.recover_twophase(min_age=0)
    assert [(d.alias, d.action) for d in resolved] == [("a", "rollback")]
    assert rows(urls["a"]) == rows(urls["b"]) == []  # nothing half written
    assert prepared(urls["a"]) == prepared(urls["b"]) == []
    cluster.dispose()


def test_crash_after_the_decision_is_committed_everywhere(urls: dict[str, str]) -> None:
    assert crash_at("after_decision", urls) == -9  # killed after the decision, before COMMIT PREPARED
    assert len(prepared(urls["a"])) == len(prepared(urls["b"])) == 1
    cluster = shardkit.Cluster(urls, cross_shard_writes="twophase")
    planned = cluster.recover_twophase(min_age=0, dry_run=True)
    assert sorted((d.alias, d.action) for d in planned) == [("a", "commit"), ("b", "commit")]
    assert len(prepared(urls["a"])) == 1  # a dry run changes nothing
    cluster.recover_twophase(min_age=0)
    assert rows(urls["a"]) == [(1, "on a")] and rows(urls["b"]) == [(2, "on b")]
    assert prepared(urls["a"]) == prepared(urls["b"]) == []
    with create_engine(urls["default"]).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM shardkit_twophase_log")).scalar() == 0


def test_cli_recover(urls: dict[str, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from shardkit.cli import cli

    assert crash_at("after_decision", urls) == -9
    (tmp_path / "tpc_settings.py").write_text(f"DATABASES = {urls!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    planned = runner.invoke(cli, ["twophase", "recover", "--settings", "tpc_settings", "--min-age", "0", "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert planned.output.count("would commit") == 2
    done = runner.invoke(cli, ["twophase", "recover", "--settings", "tpc_settings", "--min-age", "0", "--json"])
    assert done.exit_code == 0, done.output
    assert sorted((d["alias"], d["action"]) for d in json.loads(done.output)) == [("a", "commit"), ("b", "commit")]
    assert rows(urls["a"]) == [(1, "on a")] and rows(urls["b"]) == [(2, "on b")]
    again = runner.invoke(cli, ["twophase", "recover", "--settings", "tpc_settings", "--min-age", "0"])
    assert "no prepared transactions in doubt" in again.output
