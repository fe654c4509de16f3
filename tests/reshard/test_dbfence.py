"""The database side of the fence: every shard refuses, by itself, the writes that would break a
reshard, whoever sends them; a resumed run raises it again; a stale ring is never an empty answer."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import mmh3
import pytest
from sqlalchemy import create_engine, exc, insert, select, text, update

from shardkit import Cluster, HashRing, HashRingRouter
from shardkit.reshard import Resharder, ShardMovingError
from shardkit.reshard._dbfence import _PG_MURMUR, _sqlite_hash, fenced_arcs
from shardkit.reshard._fence import fences_of
from shardkit.reshard._state import StateStore
from shardkit.ring._keys import encode_key, hash_key

from ..conftest import PG_URL, DatabaseFactory, require_server
from ..faults import proxied_url, tcp_proxy
from .helpers import assert_placed, build, fingerprint, load, snapshot
from .models import Order, User

OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]


def _refused(arcs: list[tuple[int, int]], h: int) -> bool:
    return any(lo <= h <= hi for lo, hi in arcs)


@pytest.mark.parametrize("mode", ["ring", "buckets"])
def test_fenced_arcs_are_the_keys_the_rings_say(mode: str) -> None:
    make = (lambda s: HashRing(s, mode="buckets", buckets=512)) if mode == "buckets" else HashRing
    old, new = make(OLD), make(ALL)
    keys: list[Any] = list(range(-50, 3000)) + [f"user:{i}" for i in range(500)] + [uuid.uuid4() for _ in range(200)]
    for alias in ALL:
        fence, switched = fenced_arcs(old, new, alias, "fence"), fenced_arcs(old, new, alias, "switched")
        for key in keys:
            h = hash_key(key)
            assert _refused(fence, h) == (not (old.get(key) == alias and new.get(key) == alias)), (alias, key)
            assert _refused(switched, h) == (new.get(key) != alias), (alias, key)


def test_the_sql_hash_is_the_ring_hash(databases: DatabaseFactory) -> None:
    url = databases.url("postgresql", "hash")
    engine = create_engine(url)
    rng = random.Random(3)
    with engine.begin() as conn:
        conn.exec_driver_sql(_PG_MURMUR)
        for n in range(0, 23):
            data = bytes(rng.randrange(256) for _ in range(n))
            got = conn.execute(text("SELECT shardkit_murmur3(:d)"), {"d": data}).scalar()
            assert got == mmh3.hash(data, 0, signed=False), data
        for key, sql in [
            (-(2**63), "'\\x01'::bytea || int8send(CAST(:k AS bigint))"),
            (740001, "'\\x01'::bytea || int8send(CAST(:k AS bigint))"),
            ("é-user:1", "'\\x02'::bytea || convert_to(CAST(:k AS text), 'UTF8')"),
            (b"\x00\xff", "'\\x03'::bytea || CAST(:k AS bytea)"),
        ]:
            assert conn.execute(text(f"SELECT shardkit_murmur3({sql})"), {"k": key}).scalar() == hash_key(key)
        u = uuid.uuid4()
        got = conn.execute(text("SELECT shardkit_murmur3('\\x04'::bytea || uuid_send(CAST(:k AS uuid)))"), {"k": u})
        assert got.scalar() == mmh3.hash(encode_key(u), 0, signed=False)
    engine.dispose()
    assert _sqlite_hash(u.hex, "uuid") == hash_key(u) and _sqlite_hash(7, "int") == hash_key(7)


def _pick(old: HashRing, new: HashRing, start: int) -> tuple[int, int]:
    """A new id that moves (to s4) and a new id that stays, both >= ``start``."""
    moving = next(i for i in range(start, start + 10_000) if old.get(i) != new.get(i))
    staying = next(i for i in range(start, start + 10_000) if old.get(i) == new.get(i))
    return moving, staying


def test_the_databases_refuse_moving_keys_while_fenced(databases: DatabaseFactory, backend: str) -> None:
    urls = databases.urls(backend, "default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, 600)
    before = fingerprint(snapshot(cluster, ALL))
    old, new = HashRing(OLD), HashRing(ALL)
    moved = next(u for u in range(1, 601) if old.get(u) != new.get(u))
    fresh_moving, fresh_staying = _pick(old, new, 9_000_000)
    seen: dict[str, Any] = {}

    class Observed(Resharder):
        """Looks at the shards from outside right after the fence is up."""

        def _catch_up(self, *args: Any, **kwargs: Any) -> int:
            src = old.get(moved)
            plain = create_engine(urls[src])  # not shardkit: no router, no fence, no hash function
            try:
                with plain.begin() as conn:
                    conn.execute(update(User.__table__).where(User.id == moved).values(score=12345))
            except exc.DBAPIError as error:
                seen["plain"] = error
            finally:
                plain.dispose()
            # a shardkit engine, going straight to the old owner (no routing): a retryable error
            with pytest.raises(ShardMovingError) as info, cluster.engine(src).begin() as conn:
                conn.execute(insert(User.__table__).values(id=fresh_moving, name="x", score=0))
            seen["engine"] = info.value
            with pytest.raises(ShardMovingError), cluster.engine("s4").begin() as conn:  # nor on the new owner
                conn.execute(insert(User.__table__).values(id=fresh_moving, name="x", score=0))
            with pytest.raises(ShardMovingError), cluster.session(using=src) as s:  # a session pinned to the old owner
                s.add(User(id=fresh_moving, name="pinned"))
                s.commit()
            with pytest.raises(ShardMovingError) as routed, cluster.session() as s:  # routed: the router's fence
                s.add(User(id=str(fresh_moving), name="a digit string"))  # the key as the column has it
                s.commit()
            seen["routed"] = routed.value
            with cluster.engine(old.get(fresh_staying)).begin() as conn:  # a key that stays: written
                conn.execute(insert(User.__table__).values(id=fresh_staying, name="stays", score=0))
            return super()._catch_up(*args, **kwargs)

    result = Observed(cluster, router, add="s4", models=[User], batch_size=200, fence_grace=0.05).run()
    assert result.phase == "done" and result.verify is not None and result.verify.ok
    error = seen["plain"]
    if backend == "postgresql":
        assert error.orig.pgcode == "40SK1" and f"key {moved} of table users is moving" in str(error)
    else:  # a connection that cannot compute the hash cannot write a fenced table: it fails closed
        assert "shardkit_hash" in str(error)
    assert seen["engine"].retryable and seen["engine"].table == "users"
    assert seen["routed"].key == fresh_moving and "refused by the database" not in str(seen["routed"])
    # the fence is gone with the reshard: triggers removed, every key writable again
    for alias in ALL:
        with cluster.engine(alias).connect() as conn:
            sql = (
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_fence'"
                if backend == "postgresql"
                else "SELECT count(*) FROM sqlite_master WHERE name LIKE 'shardkit_fence%'"
            )
            assert conn.execute(text(sql)).scalar() == 0, alias
            if backend == "postgresql":  # nor any of its functions
                assert conn.execute(text("SELECT count(*) FROM pg_proc WHERE proname LIKE 'shardkit%'")).scalar() == 0
    with cluster.session() as s:
        assert s.get(User, moved).score != 12345
        assert s.get(User, fresh_staying).name == "stays"
        s.add(User(id=fresh_moving, name="after"))
        s.commit()
    after = snapshot(cluster, ALL)
    assert_placed(cluster, new, ALL)
    users = sorted(r[0] for rows in after["users"].values() for r in rows)
    assert users == sorted([*range(1, 601), fresh_staying, fresh_moving])
    assert fingerprint(after)["orders"] == before["orders"]
    cluster.dispose()


def test_resumed_in_merging_fences_and_catches_up_again(databases: DatabaseFactory, backend: str) -> None:
    shards = [*ALL, "s5"]
    urls = databases.urls(backend, "default", *shards)
    cluster, router = build(urls, OLD)
    load(cluster, router, 800)
    before = fingerprint(snapshot(cluster, shards))
    new = HashRing(shards)

    class Crashing(Resharder):
        """Dies (as far as the stored state goes) after merging s4, before merging s5."""

        def _merge(self, backend: Any, target: str) -> None:
            if target == "s5":
                raise RuntimeError("crash in the merge")
            super()._merge(backend, target)

    with pytest.raises(RuntimeError, match="crash in the merge"):
        Crashing(cluster, router, new, models=[User], batch_size=300, fence_grace=0.05).run()
    state = StateStore(cluster).active()
    assert state is not None and state.phase == "merging"
    assert router.ring == HashRing(OLD)
    # while no reshard runs, the databases keep the fence: a write of a moving key is refused
    moving = next(u for u in range(1, 801) if HashRing(OLD).get(u) != new.get(u))
    with pytest.raises(ShardMovingError), cluster.engine(HashRing(OLD).get(moving)).begin() as conn:
        conn.execute(update(User.__table__).where(User.id == moving).values(score=-1))
    # a copy not merged yet, damaged meanwhile: the resumed run catches it up before merging
    assert not _has_shadow(cluster, "s4") and _has_shadow(cluster, "s5")
    with cluster.engine("s5").begin() as conn:
        conn.execute(text("UPDATE shardkit_reshard__orders SET amount = amount + 1"))
    result = Resharder(cluster, router, new, models=[User], batch_size=300, fence_grace=0.05).run()
    assert result.resumed_from == "merging" and result.phase == "done"
    assert result.repaired > 0 and result.verify is not None and result.verify.ok
    assert fingerprint(snapshot(cluster, shards)) == before
    assert_placed(cluster, new, shards)
    cluster.dispose()


def _has_shadow(cluster: Cluster, alias: str) -> bool:
    from sqlalchemy import inspect

    with cluster.engine(alias).connect() as conn:
        return bool(inspect(conn).has_table("shardkit_reshard__users"))


def test_a_stale_ring_is_an_error_never_an_empty_answer(databases: DatabaseFactory) -> None:
    require_server(PG_URL, "pg")
    urls = databases.urls("postgresql", "default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, 400)
    old, new = HashRing(OLD), HashRing(ALL)
    moved = [u for u in range(1, 401) if old.get(u) != new.get(u)]
    with tcp_proxy(urls["default"]) as proxy:
        # two other processes' view: plain ring routers, nobody calls watch(); one reaches
        # default through a link that breaks during the reshard
        other = Cluster(urls, routers=[HashRingRouter(HashRing(OLD))])
        cut_off = Cluster({**urls, "default": proxied_url(urls["default"], proxy)}, [HashRingRouter(HashRing(OLD))])
        fenced, release = threading.Event(), threading.Event()

        class Paused(Resharder):
            def _catch_up(self, *args: Any, **kwargs: Any) -> int:
                fenced.set()
                assert release.wait(30)
                return super()._catch_up(*args, **kwargs)

        def read(c: Cluster, uid: int) -> User | None:
            with c.session() as s:
                return s.get(User, uid)

        errors: list[BaseException] = []

        def run() -> None:
            try:
                Paused(cluster, router, add="s4", models=[User], batch_size=200, fence_grace=1.5).run()
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert fenced.wait(60)
            time.sleep(1.1)  # both followers read the state: a reshard is under way
            assert read(other, moved[0]) is not None and read(cut_off, moved[0]) is not None
            assert fences_of(cut_off)[0].active == (True, False)
            proxy.cut()
            release.set()
            thread.join(120)
            assert not errors, errors
            time.sleep(1.1)
            # the follower that reads default saw the switch: every moved row is found
            assert all(read(other, uid) is not None for uid in moved)
            assert other.router.routers[0].ring == new
            # the one cut off cannot know its ring is current: a retryable error, not "no row"
            with pytest.raises(ShardMovingError) as info:
                read(cut_off, moved[1])
            assert info.value.retryable and "may be stale" in str(info.value)
            proxy.restore()
            time.sleep(1.1)
            assert all(read(cut_off, uid) is not None for uid in moved[:20])
            assert cut_off.router.routers[0].ring == new
        finally:
            release.set()
            thread.join(120)
            other.dispose()
            cut_off.dispose()
    cluster.dispose()


def test_orders_written_by_followers_land_with_their_users(make_urls: Callable[..., dict[str, str]],
                                                            backend: str) -> None:  # fmt: skip
    """A cluster with no FencingRouter in its chain is fenced all the same (the hidden one)."""
    urls = make_urls("default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, 300)
    plain = Cluster(urls, routers=[HashRingRouter(HashRing(OLD))])
    fence = fences_of(plain)
    assert len(fence) == 1 and plain.router.routers == [plain.router.routers[0]]  # hidden, not listed
    result = Resharder(cluster, router, add="s4", models=[User], batch_size=100, fence_grace=1.2).run()
    assert result.phase == "done"
    time.sleep(1.05)
    with plain.session() as s:  # the plain cluster follows the stored ring
        s.add(User(id=777_777, name="late"))
        s.flush()
        s.add(Order(id=7_777_770, user_id=777_777, amount=1))
        s.commit()
    assert plain.router.routers[0].ring == HashRing(ALL)
    with cluster.session() as s:
        assert s.scalar(select(Order.user_id).where(Order.id == 7_777_770)) == 777_777
    assert_placed(cluster, HashRing(ALL), ALL)
    plain.dispose()
    cluster.dispose()
