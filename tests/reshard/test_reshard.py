"""End to end: add a shard, remove one, buckets mode; plan counts; dry-run; the lock."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from shardkit import HashRing
from shardkit.reshard import (
    Resharder,
    ReshardLockedError,
    load_current_ring,
    reshard,
)
from shardkit.reshard._state import Lease, StateStore

from .helpers import SIZE, assert_placed, build, fingerprint, load, snapshot
from .models import Base, Order, User

OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]


def _sizes(backend: str) -> int:
    return SIZE if backend == "postgresql" else max(SIZE // 5, 500)


def test_add_a_fifth_shard(make_urls: Callable[..., dict[str, str]], backend: str) -> None:
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    users = _sizes(backend)
    load(cluster, router, users)
    before = fingerprint(snapshot(cluster, ALL))
    assert before["users"][0] == users and before["orders"][0] == 3 * users

    resharder = Resharder(cluster, router, add="s4", models=[User], batch_size=2000)
    assert [t.name for t in resharder.tables] == ["users", "orders"]  # orders: the co-located child
    plan = resharder.plan()
    new = HashRing(ALL)
    expected = Counter(new.get_many(list(range(1, users + 1))))["s4"]
    assert plan.moving_rows == {"users": expected, "orders": 3 * expected}
    assert {m.target for m in plan.moves} == {"s4"}

    t0 = time.perf_counter()
    result = resharder.run()
    elapsed = time.perf_counter() - t0
    print(f"\n{backend}: {users} users + {3 * users} orders, moved {result.copied} in {elapsed:.2f}s {result.seconds}")
    assert result.phase == "done"
    assert result.copied == {"users": expected, "orders": 3 * expected}
    assert result.deleted == result.copied
    assert result.verify is not None and result.verify.ok and result.verify.rows == 4 * expected
    assert router.ring == new
    assert load_current_ring(cluster) == new
    assert fingerprint(snapshot(cluster, ALL)) == before
    assert_placed(cluster, new, ALL)
    # reads through the session find every user on its new shard
    with cluster.session() as s:
        for uid in (1, 2, 3, users):
            assert s.get(User, uid) is not None
        assert s.scalar(select(func.count()).select_from(Order)) == 3 * users
    # again: nothing to do
    again = Resharder(cluster, router, add="s4", models=[User]).run()
    assert again.steps == ["nothing to do: the ring is already the target ring"]
    cluster.dispose()


@pytest.mark.parametrize("mode", ["ring", "buckets"])
def test_remove_a_shard(make_urls: Callable[..., dict[str, str]], backend: str, mode: str) -> None:
    urls = make_urls("default", *OLD)
    cluster, router = build(urls, OLD, mode=mode)
    load(cluster, router, 1500)
    before = fingerprint(snapshot(cluster, OLD))
    new = router.ring.copy()
    new.remove("s2")
    result = reshard(cluster, router=router, remove="s2", metadata=Base, batch_size=400)
    assert result.phase == "done"
    assert fingerprint(snapshot(cluster, OLD)) == before
    assert_placed(cluster, new, OLD)
    assert snapshot(cluster, ["s2"])["users"]["s2"] == []
    cluster.dispose()


def test_dry_run_writes_nothing(make_urls: Callable[..., dict[str, str]], backend: str) -> None:
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, 500)
    before = snapshot(cluster, ALL)
    result = Resharder(cluster, router, add="s4", models=[User]).run(dry_run=True)
    text = "\n".join(result.steps)
    assert "copy" in text and "rows of users from s0 to s4" in text and "switch the ring" in text
    assert snapshot(cluster, ALL) == before
    assert not StateStore(cluster).exists()
    assert router.ring == HashRing(OLD)
    cluster.dispose()


def test_two_runs_are_refused(make_urls: Callable[..., dict[str, str]], backend: str) -> None:
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    store = StateStore(cluster)
    store.ensure()
    other = Lease(store)
    other.owner = "elsewhere:4242"
    other.acquire()
    try:
        with pytest.raises(ReshardLockedError, match="held by elsewhere:4242") as info:
            Resharder(cluster, router, add="s4", models=[User]).run()
        assert info.value.owner == "elsewhere:4242"
    finally:
        other.release()
    cluster.dispose()
