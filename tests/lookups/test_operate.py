"""Operating lookups: backfill (resumable), verify and repair, the CLI, create_all and resharding."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select

import shardkit
from shardkit.cli import cli
from shardkit.lookups import _ops, backfill, lookup_for, verify

from .models import SHARDS, Base, User

EMAIL = lookup_for("lk_users.email")
EXT = lookup_for("lk_users.external_id")


def insert_without_lookups(cluster: shardkit.Cluster, n: int, start: int = 1) -> None:
    """Rows written behind shardkit's back (as they were before the lookup was declared)."""
    router = cluster.router.routers[0]
    by_alias: dict[str, list[dict[str, Any]]] = {}
    for uid in range(start, start + n):
        row = {"id": uid, "email": f"old{uid}@x.org", "external_id": f"x{uid % 4}", "name": f"old{uid}"}
        by_alias.setdefault(router.shard_for(User, uid), []).append(row)
    for alias, rows in by_alias.items():
        with cluster.engine(alias).begin() as conn:
            conn.execute(insert(User.__table__), rows)


def settings_module(workdir: Path, cluster: shardkit.Cluster) -> str:
    urls = {a: cluster.spec(a).url.render_as_string(hide_password=False) for a in cluster.aliases}
    name = f"sk_settings_lookups_{abs(hash(str(workdir))) % 10**8}"
    (workdir / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from shardkit import HashRing, HashRingRouter
            from tests.lookups.models import Account

            DATABASES = {urls!r}
            DATABASE_ROUTERS = [HashRingRouter(HashRing({list(SHARDS)!r}), shard_keys={{Account: "tenant"}})]
            SHARDKIT_METADATA = "tests.lookups.models:Base"
            """
        )
    )
    return name


def test_backfill_then_verify_then_repair(cluster: shardkit.Cluster, monkeypatch: Any) -> None:
    insert_without_lookups(cluster, 57)
    report = verify(cluster, EMAIL)
    assert report.missing_count == 57 and not report.ok
    with cluster.session() as s:  # a row without its lookup cannot be found by it: that is what backfill fixes
        assert s.scalars(select(User).where(User.email == "old3@x.org")).all() == []
    # a backfill that stops part way goes on from where it was
    calls = {"n": 0}
    real = _ops._write_lookups

    def failing(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("stopped")
        return real(*args, **kw)

    monkeypatch.setattr(_ops, "_write_lookups", failing)
    with pytest.raises(RuntimeError):
        backfill(cluster, "lk_users.email", batch=5)
    monkeypatch.setattr(_ops, "_write_lookups", real)
    seen: list[int] = []
    states = backfill(cluster, "lk_users.email", batch=5, progress=lambda st: seen.append(st.done))
    assert sum(s.done for s in states) < 57  # the rows done before the stop were not read again
    assert verify(cluster, EMAIL).ok
    with cluster.session() as s:
        assert s.scalars(select(User.name).where(User.email == "old3@x.org")).one() == "old3"
    # lookups without a row: reported, and removed by repair once older than the grace period
    with cluster.engine(cluster.router.routers[0].shard_for(EMAIL.cls, "ghost@x.org")).begin() as conn:
        conn.execute(insert(EMAIL.table).values(value="ghost@x.org", shard_key=999_999, created_ms=1))
    report = verify(cluster, EMAIL)
    assert report.stale == [("ghost@x.org", 999_999)] and not report.ok
    assert verify(cluster, EMAIL, repair=True).repaired_stale == 1
    assert verify(cluster, EMAIL).ok


def test_cli_lookup_commands(cluster: shardkit.Cluster, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    name = settings_module(tmp_path, cluster)
    insert_without_lookups(cluster, 23)
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(cli, ["--settings", name, *args], catch_exceptions=True)

    listed = run("lookup", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert {"User.email", "User.external_id"} <= {row["lookup"] for row in json.loads(listed.stdout)}
    bad = run("lookup", "verify", "lk_users.email", "--json")
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)[0]["rows_without_lookup"] == 23
    done = run("lookup", "backfill", "lk_users.email", "--batch", "7", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["written"] == 23
    assert run("lookup", "backfill", "lk_users.external_id").exit_code == 0
    good = run("lookup", "verify", "lk_users.email", "lk_users.external_id")
    assert good.exit_code == 0, good.output
    assert "User.email: ok" in good.stdout
    with cluster.engine(cluster.router.routers[0].shard_for(EMAIL.cls, "gone@x.org")).begin() as conn:
        conn.execute(insert(EMAIL.table).values(value="gone@x.org", shard_key=424242, created_ms=1))
    assert run("lookup", "verify", "lk_users.email").exit_code == 1
    fixed = run("lookup", "verify", "lk_users.email", "--repair", "--json")
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(fixed.stdout)[0]["repaired_lookups_without_row"] == 1
    plan = run("migrate", "--plan", "--json")  # shardkit migrate puts lookup tables on the ring's shards
    assert plan.exit_code == 0, plan.output
    placed = {row["alias"]: row["tables"] for row in json.loads(plan.stdout)["aliases"]}
    assert all(EMAIL.table.name in placed[alias] for alias in SHARDS)
    assert EMAIL.table.name not in placed["default"]
    unknown = run("lookup", "verify", "lk_users.nope")
    assert unknown.exit_code == 2 and "no lookup named" in unknown.output


def test_reshard_moves_lookup_rows(cluster: shardkit.Cluster) -> None:
    from shardkit.reshard._tables import discover

    moving = {mt.name: mt for mt in discover(cluster.router.routers[0], metadata=Base)}
    assert EMAIL.table.name in moving and moving[EMAIL.table.name].key.name == "value"
    assert EXT.table.name in moving


def test_a_reshard_moves_lookup_rows_and_reads_follow(make_urls: Any, backend: str) -> None:
    from shardkit import Cluster, HashRing, HashRingRouter
    from shardkit.reshard import FencingRouter, reshard

    from .models import Account

    old = list(SHARDS)
    urls = make_urls("default", *old, "s4")
    router = HashRingRouter(HashRing(old), shard_keys={Account: "tenant"})
    cluster = Cluster(urls, routers=[FencingRouter(), router])
    try:
        cluster.create_all(Base)
        with cluster.session() as s:
            s.add_all([User(id=i, email=f"m{i}@x.org", external_id=f"k{i % 7}") for i in range(1, 301)])
            s.commit()
        result = reshard(cluster, router=router, add="s4", metadata=Base, batch_size=100)
        assert result.phase == "done"
        assert EMAIL.table.name in result.copied and result.copied[EMAIL.table.name] > 0
        new = HashRing([*old, "s4"])
        with cluster.engine("s4").connect() as conn:  # lookup rows now on s4 are those whose value hashes there
            for value, _key in conn.execute(select(EMAIL.table.c.value, EMAIL.table.c.shard_key)):
                assert router.shard_for(EMAIL.cls, value) == "s4" == new.get(value)
        assert verify(cluster, EMAIL).ok and verify(cluster, EXT).ok
        with cluster.session() as s:
            for uid in (1, 77, 300):
                assert s.scalars(select(User.id).where(User.email == f"m{uid}@x.org")).one() == uid
            assert len(s.scalars(select(User).where(User.external_id == "k3")).all()) == len(
                [i for i in range(1, 301) if i % 7 == 3]
            )
            s.add(User(id=1000, email="m77@x.org"))
            with pytest.raises(shardkit.errors.UniqueLookupError):
                s.commit()
            s.rollback()
    finally:
        cluster.dispose()


def test_backfill_while_the_application_writes(cluster: shardkit.Cluster) -> None:
    """Rows inserted, changed and deleted during a backfill: afterwards no row lacks its lookup
    (a lookup of a row deleted meanwhile may be left stale: reads ignore it, repair removes it)."""
    import threading

    insert_without_lookups(cluster, 400)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set() and i < 200:
                i += 1
                with cluster.session() as s:
                    s.add(User(id=100_000 + i, email=f"live{i}@x.org"))
                    if i % 3 == 0:
                        gone = s.get(User, i)
                        if gone is not None:
                            s.delete(gone)
                    if i % 5 == 0:
                        moved = s.get(User, 200 + i)
                        if moved is not None:
                            moved.email = f"moved{i}@x.org"
                    s.commit()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        backfill(cluster, "lk_users.email", batch=25)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    report = verify(cluster, EMAIL)
    assert report.missing_count == 0, report.missing
    with cluster.session() as s:
        assert s.scalars(select(User.id).where(User.email == "old399@x.org")).all() in ([399], [])
