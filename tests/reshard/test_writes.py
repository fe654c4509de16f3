"""Writes keep going during a reshard: every acknowledged write is there exactly once."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from shardkit import HashRing
from shardkit.reshard import Resharder, ShardMovingError

from .helpers import assert_placed, build, load, snapshot
from .models import Order, User

OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]


def test_writes_during_reshard(make_urls: Callable[..., dict[str, str]], backend: str) -> None:
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    users = 3000
    load(cluster, router, users)
    inserted: list[int] = []
    increments: Counter[int] = Counter()
    refused = Counter[str]()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(7)
        next_id = 10_000_000
        ops = 0
        while ops < 20_000 and not (stop.is_set() and ops > 200):
            ops += 1
            insert = rng.random() < 0.5
            uid = next_id if insert else rng.randint(1, users)
            while True:
                try:
                    with cluster.session() as s:
                        if insert:
                            s.add(User(id=uid, name=f"new{uid}"))
                            s.flush()  # no relationship(): the user first, for the foreign key
                            s.add(Order(id=uid * 10, user_id=uid, amount=1))
                        else:
                            user = s.get(User, uid)
                            assert user is not None, uid
                            user.score += 1
                        s.commit()
                    break
                except ShardMovingError:
                    refused["insert" if insert else "update"] += 1
                    time.sleep(0.005)
                except BaseException as exc:
                    errors.append(exc)
                    return
            if insert:
                inserted.append(uid)
                next_id += 1
            else:
                increments[uid] += 1

    scores_before = {r[0]: r[2] for rows in snapshot(cluster, OLD)["users"].values() for r in rows}
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        result = Resharder(cluster, router, add="s4", models=[User], batch_size=500, fence_grace=0.05).run()
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    print(f"\n{backend}: {len(inserted)} inserts, {sum(increments.values())} updates acknowledged; "
          f"refused and retried: {dict(refused)}; repaired in catch-up: {result.repaired}")  # fmt: skip
    new = HashRing(ALL)
    assert result.phase == "done"
    assert_placed(cluster, new, ALL)  # includes: no primary key twice
    snap = snapshot(cluster, ALL)
    found_users = {r[0]: r for rows in snap["users"].values() for r in rows}
    found_orders = {r[0] for rows in snap["orders"].values() for r in rows}
    for uid in inserted:
        assert uid in found_users and uid * 10 in found_orders, uid
    assert len(found_users) == users + len(inserted)
    for uid, before in scores_before.items():
        assert found_users[uid][2] == before + increments[uid], (uid, before, increments[uid])
    assert inserted and increments
    cluster.dispose()
