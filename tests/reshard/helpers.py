"""Building a sharded cluster of users and orders, and checking where every row is."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, inspect, select

from shardkit import Cluster, HashRing, HashRingRouter
from shardkit.reshard import FencingRouter

from .models import Base, Order, User

SIZE = int(os.environ.get("SHARDKIT_RESHARD_USERS", "10000"))  # orders: 3 per user


def build(urls: dict[str, str], shards: Sequence[str], *, mode: str = "ring") -> tuple[Cluster, HashRingRouter]:
    ring = HashRing(list(shards), mode=mode, buckets=4096) if mode == "buckets" else HashRing(list(shards))
    router = HashRingRouter(ring)
    cluster = Cluster(urls, routers=[FencingRouter(), router])
    cluster.create_all(Base)
    return cluster, router


def load(cluster: Cluster, router: HashRingRouter, users: int, orders_per_user: int = 3) -> None:
    """``users`` users (ids 1..n) and ``orders_per_user`` orders each, each on its shard."""
    ring = router.ring
    ids = list(range(1, users + 1))
    owners = ring.get_many(ids)
    by_shard: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {a: ([], []) for a in ring}
    for uid, alias in zip(ids, owners, strict=True):
        u, o = by_shard[alias]
        u.append({"id": uid, "name": f"user{uid}", "score": uid % 97})
        for j in range(orders_per_user):
            o.append({"id": uid * 10 + j, "user_id": uid, "amount": (uid * 7 + j) % 1000})
    for alias, (u, o) in by_shard.items():
        with cluster.engine(alias).begin() as conn:
            if u:
                conn.execute(insert(User.__table__), u)
            if o:
                conn.execute(insert(Order.__table__), o)


def snapshot(cluster: Cluster, aliases: Sequence[str]) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
    """table -> alias -> sorted rows."""
    out: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    for model in (User, Order):
        table = model.__table__
        out[table.name] = {}
        for alias in aliases:
            with cluster.engine(alias).connect() as conn:
                if not inspect(conn).has_table(table.name):  # a new shard before the reshard
                    out[table.name][alias] = []
                    continue
                rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name][alias] = [tuple(r) for r in rows]
    return out


def fingerprint(snap: dict[str, dict[str, list[tuple[Any, ...]]]]) -> dict[str, tuple[int, str]]:
    """table -> (row count, checksum of every row, wherever it is)."""
    out = {}
    for table, per_alias in snap.items():
        rows = sorted(r for rs in per_alias.values() for r in rs)
        out[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
    return out


def assert_placed(cluster: Cluster, ring: HashRing, aliases: Sequence[str]) -> None:
    """Every row is on the shard ``ring`` names, exactly once, and no shadow table is left."""
    snap = snapshot(cluster, aliases)
    for table, key_at in (("users", 0), ("orders", 1)):
        seen: set[Any] = set()
        for alias, rows in snap[table].items():
            owners = ring.get_many([r[key_at] for r in rows])
            wrong = [r for r, o in zip(rows, owners, strict=True) if o != alias]
            assert not wrong, f"{len(wrong)} {table} rows on {alias} belong elsewhere, e.g. {wrong[:3]}"
            pks = {r[0] for r in rows}
            assert not (pks & seen), f"{table}: duplicated primary keys {sorted(pks & seen)[:5]}"
            seen |= pks
    for alias in aliases:
        with cluster.engine(alias).connect() as conn:
            left = [t for t in inspect(conn).get_table_names() if t.startswith("shardkit_reshard__")]
        assert not left, f"shadow tables left on {alias}: {left}"
