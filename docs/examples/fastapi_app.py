"""A FastAPI service over a sharded user table (docs/async.md; run by tests/asyncio/test_docs_async.py).

One ``AsyncSession`` per request, given to each endpoint by a dependency with ``yield``; users
are placed on four shards by a consistent-hash ring on their id.  ``create_app(DATABASES)``
builds the app; ``uvicorn "fastapi_app:create_app" --factory`` serves it with the default
DATABASES below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import BigInteger, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit

SHARDS = ["shard0", "shard1", "shard2", "shard3"]
FANOUTS = 4  # fan-outs at a time (see docs/async.md, "Under load: pools and fan-outs")
DATABASES: dict[str, Any] = {"default": "sqlite:///default.db", **{a: f"sqlite:///{a}.db" for a in SHARDS}}


class Base(shardkit.ModelMixin, DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __shard_key__ = "id"  # the ring places each user by its id

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # 64-bit ids
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int] = mapped_column(default=0)


class UserIn(BaseModel):
    name: str
    score: int = 0


class UserOut(BaseModel):
    id: int
    name: str
    score: int
    shard: str | None


def out(user: User) -> UserOut:
    return UserOut(id=user.id, name=user.name, score=user.score, shard=shardkit.db_of(user))


# -- dependencies ---------------------------------------------------------------------------------


def get_cluster(request: Request) -> shardkit.Cluster:
    cluster: shardkit.Cluster = request.app.state.cluster
    return cluster


async def get_session(cluster: Annotated[shardkit.Cluster, Depends(get_cluster)]) -> AsyncIterator[AsyncSession]:
    """One session per request: closed (its connections back in their pools) when the response is sent.
    ``expire_on_commit=False``: an object read after ``commit()`` keeps its values (an expired one
    would have to load them again, and attribute access cannot await)."""
    async with cluster.async_session(expire_on_commit=False) as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


async def fanout_slot(request: Request) -> AsyncIterator[None]:
    """Held for the request by the endpoints that fan out: at most FANOUTS of them at a time, so
    that waiting fan-outs cannot hold every connection of the shards' pools."""
    async with request.app.state.fanouts:
        yield


FanoutSlot = Depends(fanout_slot)


# -- the app --------------------------------------------------------------------------------------


def create_app(databases: Mapping[str, Any] = DATABASES, **cluster_options: Any) -> FastAPI:
    router = shardkit.HashRingRouter(shardkit.HashRing(SHARDS))
    cluster = shardkit.Cluster(databases, routers=[router], **cluster_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cluster.create_all(Base)  # at start-up, before serving (sync engines; a migration tool's job in production)
        app.state.cluster = cluster
        app.state.fanouts = asyncio.Semaphore(FANOUTS)
        with cluster.activate():  # the cluster User.objects uses
            yield
        await cluster.adispose()  # the async engines' pooled connections
        cluster.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/users", status_code=201)
    async def create_user(data: UserIn, session: Session) -> UserOut:
        user = User(name=data.name, score=data.score)  # the router gives it an id, then a shard
        session.add(user)
        await session.commit()
        return out(user)

    @app.get("/users/top", dependencies=[FanoutSlot])
    async def top_users(session: Session, limit: int = 10) -> list[UserOut]:
        # a fan-out: every shard answers at once, on the event loop, under one deadline
        stmt = select(User).order_by(User.score.desc(), User.id).limit(limit)
        result = await session.execute(stmt.execution_options(shardkit_deadline=2.0))
        return [out(user) for user in result.scalars()]

    @app.get("/users/{user_id}")
    async def read_user(user_id: int, session: Session) -> UserOut:
        user = await session.get(User, user_id)  # one shard: the ring's for user_id
        if user is None:
            raise HTTPException(404, f"no user {user_id}")
        return out(user)

    @app.post("/users/{user_id}/points")
    async def add_points(user_id: int, points: int, session: Session) -> UserOut:
        user = await session.get(User, user_id, with_for_update=True)
        if user is None:
            raise HTTPException(404, f"no user {user_id}")
        user.score += points
        await session.commit()
        return out(user)

    # Django's async manager methods: no session to pass, each call commits at once
    @app.get("/by-name/{name}", dependencies=[FanoutSlot])
    async def by_name(name: str) -> UserOut:
        try:
            return out(await User.objects.aget(name=name))  # a fan-out: the name is no shard key
        except User.DoesNotExist:
            raise HTTPException(404, f"no user named {name!r}") from None

    @app.delete("/users/{user_id}", status_code=204)
    async def delete_user(user_id: int) -> None:
        if await User.objects.filter(id=user_id).adelete() == 0:
            raise HTTPException(404, f"no user {user_id}")

    @app.get("/stats", dependencies=[FanoutSlot])
    async def stats() -> dict[str, int]:
        return {"users": await User.objects.acount()}

    return app
