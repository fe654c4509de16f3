"""The in-flight barrier and the database fence never deadlock with ordinary writers (PostgreSQL).

The fault: ``LOCK TABLE users IN SHARE MODE; LOCK TABLE orders IN SHARE MODE`` taken one after
the other, while a writer transaction inserted an order (holding ``orders``) and then updated
its user (wanting ``users``): a deadlock, and PostgreSQL picked the reshard as the victim.
Here writers do exactly that, in both orders, over and over, while the barrier and the fence
installation run again and again; neither side may fail.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine, text

from shardkit.reshard._dbfence import barrier, fenced_arcs, install, remove
from shardkit.reshard._tables import discover

from .helpers import build, load
from .models import Order, User

SHARDS = ["s0", "s1"]


def _writers(engine: Engine, users: list[int], stop: threading.Event, errors: list[BaseException]) -> list[int]:
    """Threads writing parent and child in both orders; returns the per-thread commit counts."""
    ids = itertools.count(50_000_000)
    done = [0] * 4

    def work(n: int) -> None:
        child_first = n % 2 == 0
        i = 0
        while not stop.is_set():
            uid = users[(n * 7 + i) % len(users)]
            i += 1
            try:
                with engine.begin() as conn:
                    child = ("INSERT INTO orders (id, user_id, amount) VALUES (:i, :u, 1)", {"i": next(ids), "u": uid})
                    parent = ("UPDATE users SET score = score + 1 WHERE id = :u", {"u": uid})
                    for sql, params in (child, parent) if child_first else (parent, child):
                        conn.execute(text(sql), params)
                        conn.execute(text("SELECT pg_sleep(0.003)"))  # hold the first lock a moment
                done[n] += 1
            except BaseException as exc:  # a writer must never fail because of the reshard
                errors.append(exc)
                return

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    stop.threads = threads  # type: ignore[attr-defined]
    return done


def _run_while_writing(engine: Engine, users: list[int], action: Callable[[], None], seconds: float) -> tuple[int, int]:
    stop = threading.Event()
    errors: list[BaseException] = []
    done = _writers(engine, users, stop, errors)
    runs = 0
    try:
        time.sleep(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not errors:
            action()
            runs += 1
    finally:
        stop.set()
        for t in stop.threads:  # type: ignore[attr-defined]
            t.join(10)
    assert not errors, errors
    return runs, sum(done)


def test_barrier_does_not_deadlock_with_writers(databases: object) -> None:
    from tests.conftest import DatabaseFactory

    assert isinstance(databases, DatabaseFactory)
    cluster, router = build(databases.urls("postgresql", "default", *SHARDS), SHARDS)
    load(cluster, router, 200, orders_per_user=1)
    engine = cluster.engine("s0")
    users = [u for u in range(1, 201) if router.ring.get(u) == "s0"]
    tables = [User.__table__, Order.__table__]
    runs, commits = _run_while_writing(engine, users, lambda: barrier(engine, tables, timeout=30), 4.0)
    print(f"\nbarrier: {runs} barriers, {commits} writer commits, no deadlock")
    assert runs >= 5 and commits >= 20
    cluster.dispose()


def test_fence_install_does_not_deadlock_with_writers(databases: object) -> None:
    from shardkit import HashRing
    from tests.conftest import DatabaseFactory

    assert isinstance(databases, DatabaseFactory)
    cluster, router = build(databases.urls("postgresql", "default", *SHARDS, "s2"), SHARDS)
    load(cluster, router, 200, orders_per_user=1)
    engine = cluster.engine("s0")
    old, new = router.ring, HashRing([*SHARDS, "s2"])
    # the writers write keys that stay on s0, so the fence lets them through
    users = [u for u in range(1, 201) if old.get(u) == "s0" and new.get(u) == "s0"]
    moving = discover(router, [User])
    arcs = fenced_arcs(old, new, "s0", "fence")

    def cycle() -> None:
        install(engine, moving, arcs, 1, alias="s0", timeout=30)
        remove(engine, moving, alias="s0", timeout=30)

    runs, commits = _run_while_writing(engine, users, cycle, 4.0)
    print(f"\nfence: {runs} install/remove cycles, {commits} writer commits, no deadlock")
    assert runs >= 3 and commits >= 20
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_fence'")).scalar() == 0
    cluster.dispose()


def test_a_table_held_too_long_is_a_retryable_error(databases: object) -> None:
    import pytest

    from shardkit.errors import ReshardError
    from tests.conftest import DatabaseFactory

    assert isinstance(databases, DatabaseFactory)
    cluster, _ = build(databases.urls("postgresql", "default", *SHARDS), SHARDS)
    engine = cluster.engine("s0")
    blocker = engine.connect()
    blocker.execute(text("INSERT INTO users (id, name, score) VALUES (-1, 'held', 0)"))  # open, uncommitted
    try:
        t0 = time.monotonic()
        with pytest.raises(ReshardError, match="could not lock users on s0") as info:
            barrier(engine, [User.__table__, Order.__table__], timeout=1.0, alias="s0")
        assert info.value.retryable and time.monotonic() - t0 < 5
    finally:
        blocker.commit()
        blocker.close()
    barrier(engine, [User.__table__, Order.__table__], timeout=5.0, alias="s0")  # free again: passes
    cluster.dispose()
