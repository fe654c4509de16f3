"""A caller that cancels its own fan-out (``asyncio.timeout()``, a client gone, a TaskGroup
cancelling its siblings) while one shard is still running.

It must see its own ``TimeoutError``, never a driver error from the cancelled shard's closed
connection, and every shard's connection must go back to its pool: found by review, the
session's close stopped at the cancelled shard's dead connection and left the healthy shards'
connections checked out, one more per shard per cancelled request.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from sqlalchemy import BigInteger, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit

from ..conftest import DatabaseFactory

SHARDS = ["s0", "s1", "s2", "s3"]


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_caller_cancel_releases_every_shard_connection(databases: DatabaseFactory, driver: str) -> None:
    urls = {"default": databases.url("postgresql", "default"), **databases.urls("postgresql", *SHARDS)}
    router = shardkit.HashRingRouter(shardkit.HashRing(SHARDS), shard_keys={"members": "id"})
    cluster = shardkit.Cluster(urls, routers=[router], async_driver=driver)
    try:
        cluster.create_all(Base)
        with cluster.session() as s:
            s.add_all([Member(id=i, name=f"m{i}") for i in range(1, 101)])
            s.commit()
        slow = create_engine(urls["s1"])
        with slow.begin() as conn:  # every read of s1 now takes 20 s
            conn.execute(text("ALTER TABLE members RENAME TO members_real"))
            conn.execute(text("CREATE VIEW members AS SELECT * FROM members_real WHERE pg_sleep(20) IS NOT NULL"))
        slow.dispose()

        async def main() -> list[str]:
            seen = []
            for _ in range(3):
                try:
                    async with asyncio.timeout(0.5):
                        async with cluster.async_session() as s:
                            await s.execute(select(Member).order_by(Member.id))
                    seen.append("no error")
                except BaseException as exc:
                    seen.append(type(exc).__name__)
                await asyncio.sleep(0.3)
                gc.collect()
                held = {a: cluster.async_engine(a).pool.checkedout() for a in SHARDS}
                assert held == dict.fromkeys(SHARDS, 0), held
            # the pools still work: a point read on a healthy shard answers
            ring = shardkit.HashRing(SHARDS)
            key = next(i for i in range(1, 101) if ring.get(i) != "s1")
            async with cluster.async_session() as s:
                assert (await s.get(Member, key)) is not None
            await cluster.adispose()
            return seen

        assert asyncio.run(main()) == ["TimeoutError"] * 3
    finally:
        cluster.dispose()
