"""Verify names every differing primary key, and then the cut-over does not happen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from shardkit import HashRing
from shardkit.reshard import Resharder, ReshardVerifyError, load_current_ring
from shardkit.reshard._state import StateStore

from .helpers import assert_placed, build, fingerprint, load, snapshot
from .models import User

OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]


def _moving(n: int) -> list[int]:
    new = HashRing(ALL)
    return [u for u in range(1, n + 1) if new.get(u) == "s4"]


def test_corrupted_copy_is_named_and_blocks_the_cutover(make_urls: Callable[..., dict[str, str]], backend: str) -> None:
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, 1000)
    before_snap = snapshot(cluster, ALL)
    moving = _moving(1000)
    bad_user, gone_order = moving[3], moving[5] * 10 + 1

    class Corrupting(Resharder):
        """Damages two copies right after the catch-up, just before the verify."""

        def _catch_up(self, *args: Any, **kwargs: Any) -> int:
            repaired = super()._catch_up(*args, **kwargs)
            with cluster.engine("s4").begin() as conn:
                conn.execute(text("UPDATE shardkit_reshard__users SET name = 'evil' WHERE id = :i"), {"i": bad_user})
                conn.execute(text("DELETE FROM shardkit_reshard__orders WHERE id = :i"), {"i": gone_order})
            return repaired

    resharder = Corrupting(cluster, router, add="s4", models=[User], batch_size=100)
    with pytest.raises(ReshardVerifyError) as info:
        resharder.run()
    report = info.value.report
    assert report.differing_keys == sorted([("orders", (gone_order,)), ("users", (bad_user,))], key=repr)
    assert [(t, pk) for t, _, _, pk in report.different] == [("users", (bad_user,))]
    assert [(t, tgt, pk) for t, _, tgt, pk in report.missing] == [("orders", "s4", (gone_order,))]
    assert not report.extra
    assert sum(not r.ok for r in report.ranges) == 2
    assert str(bad_user) in str(info.value) and str(gone_order) in str(info.value)
    # no cut-over: old ring everywhere, nothing deleted, real tables untouched, fence lifted
    assert router.ring == HashRing(OLD)
    assert load_current_ring(cluster) is None
    state = StateStore(cluster).active()
    assert state is not None and state.phase == "copying"
    assert snapshot(cluster, ALL) == before_snap
    assert cluster.router.routers[0].active == (False, False)
    # a second run repairs the copy during the catch-up and finishes
    result = Resharder(cluster, router, add="s4", models=[User], batch_size=100).run()
    assert result.phase == "done" and result.repaired == 2 and result.verify is not None and result.verify.ok
    assert fingerprint(snapshot(cluster, ALL)) == fingerprint(before_snap)
    assert_placed(cluster, HashRing(ALL), ALL)
    cluster.dispose()


def test_verify_as_a_separate_step(make_urls: Callable[..., dict[str, str]], backend: str) -> None:
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, 800)
    resharder = Resharder(cluster, router, add="s4", models=[User], batch_size=100)
    resharder.copy()
    report = resharder.verify()
    assert report.ok and report.rows == 4 * len(_moving(800))
    victim = _moving(800)[0]
    with cluster.engine("s4").begin() as conn:
        conn.execute(text("UPDATE shardkit_reshard__orders SET amount = amount + 1 WHERE user_id = :u"), {"u": victim})
    report = resharder.verify()
    assert report.differing_keys == [("orders", (victim * 10 + j,)) for j in range(3)]
    assert router.ring == HashRing(OLD)
    cluster.dispose()
