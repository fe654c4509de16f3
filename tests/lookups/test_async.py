"""Lookups through the async session (its sync session is a ShardSession: the same listeners)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

import shardkit
from shardkit.errors import UniqueLookupError

from .models import SHARDS, Base, User, make_cluster


@pytest.mark.parametrize("driver", ["aiosqlite", "asyncpg", "psycopg"])
def test_async_reads_and_unique_refusal(make_urls: Any, backend: str, driver: str) -> None:
    if (backend == "sqlite") != (driver == "aiosqlite"):
        pytest.skip(f"{driver} is not a {backend} driver")
    cluster: shardkit.Cluster = make_cluster(make_urls("default", *SHARDS))
    cluster.create_all(Base)
    cluster.async_driver = driver

    async def body() -> None:
        async with cluster.async_session() as s:
            s.add_all([User(email=f"as{i}@x.org", name=f"as{i}") for i in range(10)])
            await s.commit()
            found = (await s.scalars(select(User.name).where(User.email.in_(["as3@x.org", "as4@x.org"])))).all()
            assert sorted(found) == ["as3", "as4"]
            s.add(User(email="as3@x.org"))
            with pytest.raises(UniqueLookupError):
                await s.commit()
            await s.rollback()
        await cluster.adispose()

    try:
        asyncio.run(body())
    finally:
        cluster.dispose()
