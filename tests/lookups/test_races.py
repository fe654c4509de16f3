"""Writers racing for one unique value, and a writer killed between its lookup and its row."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import shardkit
from shardkit.errors import UniqueLookupError
from shardkit.lookups import lookup_for, verify

from .models import SHARDS, User

ROOT = Path(__file__).resolve().parents[2]
EMAIL = lookup_for("lk_users.email")


def ids_on_distinct_shards(cluster: shardkit.Cluster, n: int, email: str, start: int = 1) -> list[int]:
    """``n`` ids whose rows live on different shards, none on the email's lookup shard when possible."""
    router = cluster.router.routers[0]
    lookup_alias = router.shard_for(EMAIL.cls, email)
    chosen: dict[str, int] = {}
    for uid in range(start, start + 10_000):
        alias = router.shard_for(User, uid)
        if alias not in chosen and (alias != lookup_alias or n >= len(SHARDS)):
            chosen[alias] = uid
        if len(chosen) == n:
            break
    return list(chosen.values())


def holders(cluster: shardkit.Cluster, email: str) -> list[int]:
    out = []
    for alias in SHARDS:
        with cluster.engine(alias).connect() as conn:
            out += conn.execute(select(User.__table__.c.id).where(User.__table__.c.email == email)).scalars().all()
    return out


@pytest.mark.parametrize("rounds", [3])
def test_threads_race_for_one_email_exactly_one_wins(cluster: shardkit.Cluster, rounds: int) -> None:
    for r in range(rounds):
        email = f"race{r}@x.org"
        ids = ids_on_distinct_shards(cluster, len(SHARDS), email, start=1 + r * 10_000)
        barrier = threading.Barrier(len(ids))
        outcome: dict[int, str] = {}

        def write(
            uid: int, email: str = email, barrier: threading.Barrier = barrier, outcome: dict[int, str] = outcome
        ) -> None:
            with cluster.session() as s:
                s.add(User(id=uid, email=email))
                barrier.wait()
                try:
                    s.commit()
                    outcome[uid] = "won"
                except UniqueLookupError:
                    outcome[uid] = "refused"

        threads = [threading.Thread(target=write, args=(uid,)) for uid in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcome.values()) == ["refused"] * (len(ids) - 1) + ["won"], outcome
        winner = next(uid for uid, o in outcome.items() if o == "won")
        assert holders(cluster, email) == [winner]
        with cluster.session() as s:
            assert s.scalars(select(User.id).where(User.email == email)).all() == [winner]
    assert verify(cluster, EMAIL).ok


def _urls(cluster: shardkit.Cluster) -> str:
    return json.dumps({a: cluster.spec(a).url.render_as_string(hide_password=False) for a in cluster.aliases})


def test_processes_race_for_one_email_exactly_one_wins(cluster: shardkit.Cluster) -> None:
    email = "procrace@x.org"
    ids = ids_on_distinct_shards(cluster, len(SHARDS), email)
    start_at = time.time() + 4.0  # every process is connected and flushing by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.lookups._worker", "race", _urls(cluster), email, str(uid), str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for uid in ids
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(out.strip().splitlines()[-1])
    assert sorted(results) == ["refused"] * (len(ids) - 1) + ["won"], results
    assert len(holders(cluster, email)) == 1
    assert verify(cluster, EMAIL).ok


def test_writer_killed_between_lookup_and_row(cluster: shardkit.Cluster, monkeypatch: Any) -> None:
    email = "killed@x.org"
    router = cluster.router.routers[0]
    lookup_alias = router.shard_for(EMAIL.cls, email)
    uid = next(i for i in range(1, 1000) if router.shard_for(User, i) != lookup_alias)  # lookup committed on its own
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lookups._worker", "crash", _urls(cluster), email, str(uid)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9 and "claimed" in proc.stdout, proc.stderr
    assert holders(cluster, email) == []
    # the lookup is there, its row is not
    with cluster.engine(lookup_alias).connect() as conn:
        assert conn.execute(select(EMAIL.table.c.shard_key).where(EMAIL.table.c.value == email)).scalars().all() == [
            uid
        ]
    with cluster.session() as s:  # reads are still right
        assert s.scalars(select(User).where(User.email == email)).all() == []
        assert s.scalars(select(User).where(User.email.in_([email, "other@x.org"]))).all() == []
    report = verify(cluster, EMAIL)
    assert not report.stale_count and report.young == [(email, uid)]  # within the grace period
    with cluster.session() as s:  # nobody takes a value a writer may still be writing
        s.add(User(id=uid + 1, email=email))
        with pytest.raises(UniqueLookupError, match="in progress"):
            s.commit()
        s.rollback()
    monkeypatch.setattr(EMAIL, "grace", 0.0)
    report = verify(cluster, EMAIL)
    assert report.stale_count == 1 and report.stale == [(email, uid)] and not report.ok
    assert verify(cluster, EMAIL, repair=True).repaired_stale == 1
    assert verify(cluster, EMAIL).ok
    with cluster.session() as s:
        s.add(User(id=uid + 1, email=email))
        s.commit()
    assert holders(cluster, email) == [uid + 1]


def test_stale_unique_lookup_is_taken_over_only_when_its_writer_is_gone(
    cluster: shardkit.Cluster, monkeypatch: Any
) -> None:
    """A writer whose row is still uncommitted (its transaction open, its lookup committed long ago)
    keeps the value even past the grace period: the in-flight mark tells the other writer."""
    monkeypatch.setattr(EMAIL, "grace", 0.0)
    email = "slow@x.org"
    router = cluster.router.routers[0]
    lookup_alias = router.shard_for(EMAIL.cls, email)
    a, b = [i for i in range(1, 1000) if router.shard_for(User, i) != lookup_alias][:2]
    slow = cluster.session()
    slow.add(User(id=a, email=email))
    slow.flush()  # lookup committed on its own connection; the row waits in an open transaction
    try:
        time.sleep(0.05)
        with cluster.session() as s:
            s.add(User(id=b, email=email))
            with pytest.raises(UniqueLookupError):
                s.commit()
            s.rollback()
        slow.commit()
    finally:
        slow.close()
    assert holders(cluster, email) == [a]
