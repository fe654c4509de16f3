"""The listener API, the scatter guard and max_rows under an AsyncSession (the async engines)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter
from shardkit.errors import MaxRowsError, ScatterRefusedError
from shardkit.observe import FanoutEvent, StatementEvent

from ..conftest import DatabaseFactory

SHARDS = ["s0", "s1"]


class Base(DeclarativeBase):
    pass


class AUser(Base):
    __tablename__ = "obs_ausers"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Recorder:
    def __init__(self) -> None:
        self.statements: list[StatementEvent] = []
        self.fanouts: list[FanoutEvent] = []

    def on_statement(self, event: StatementEvent) -> None:
        if "obs_ausers" in event.sql:
            self.statements.append(event)

    def on_fanout(self, event: FanoutEvent) -> None:
        self.fanouts.append(event)


def test_async_session_is_observed_and_guarded(databases: DatabaseFactory, backend: str) -> None:
    urls = databases.urls(backend, "default", *SHARDS)
    cluster = shardkit.Cluster(urls, routers=[HashRingRouter(HashRing(SHARDS))])
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add_all(AUser(id=i, name=f"u{i}") for i in range(1, 21))
        s.commit()
    rec = Recorder()
    cluster.add_listener(rec)

    async def main() -> Any:
        async with cluster.async_session() as s:
            one = (await s.scalars(select(AUser).where(AUser.id == 3))).one()
            everyone = (await s.scalars(select(AUser))).all()
        async with cluster.async_session(scatter="refuse") as s:
            with pytest.raises(ScatterRefusedError):
                await s.scalars(select(AUser))
        async with cluster.async_session(max_rows=5) as s:
            with pytest.raises(MaxRowsError):
                (await s.scalars(select(AUser))).all()
        await cluster.adispose()
        return one, everyone

    one, everyone = asyncio.run(main())
    assert one.name == "u3" and len(everyone) == 20
    assert any(e.kind == "select" and not e.in_fanout for e in rec.statements)
    assert {e.alias for e in rec.statements if e.in_fanout} == set(SHARDS)
    assert rec.fanouts[0].width == 2 and rec.fanouts[0].rows == 20
    assert any(f.error is not None for f in rec.fanouts)  # the max_rows stop was told too
    cluster.dispose()
