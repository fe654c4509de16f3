"""docs/async.md's FastAPI example (docs/examples/fastapi_app.py) runs: driven over ASGI by
httpx's ``AsyncClient`` with the app's lifespan, on SQLite shards (aiosqlite) and PostgreSQL
shards (asyncpg); and the page shows the file as it is."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

import shardkit
from tests.conftest import DatabaseFactory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "fastapi_app.py"
PAGE = ROOT / "docs" / "async.md"


def _example() -> ModuleType:
    """The example, imported once (a real module: SQLAlchemy resolves ``Mapped[...]`` through it)."""
    module = sys.modules.get("fastapi_app")
    if module is None or getattr(module, "__file__", None) != str(EXAMPLE):
        spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastapi_app"] = module
        spec.loader.exec_module(module)
    return module


def test_page_shows_the_example_as_it_is() -> None:
    blocks = re.findall(r"^```py\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    assert EXAMPLE.read_text() in blocks, "docs/async.md must show docs/examples/fastapi_app.py verbatim"


async def _drive(app: Any, cluster_of: Any) -> None:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        cluster: shardkit.Cluster = cluster_of(app)
        ring = shardkit.HashRing(_example().SHARDS)

        # 60 users created by concurrent requests, each its own session
        responses = await asyncio.gather(
            *(client.post("/users", json={"name": f"user{i}", "score": i * 7 % 100}) for i in range(60))
        )
        assert [r.status_code for r in responses] == [201] * 60, [r.text for r in responses if r.status_code != 201]
        users = [r.json() for r in responses]
        assert len({u["id"] for u in users}) == 60
        for user in users:  # each on its ring shard
            assert user["shard"] == ring.get(user["id"])
        assert {u["shard"] for u in users} == set(_example().SHARDS)

        # point reads by key, concurrently
        reads = await asyncio.gather(*(client.get(f"/users/{u['id']}") for u in users))
        assert [r.json() for r in reads] == users
        assert (await client.get("/users/1")).status_code == 404

        # the fan-out, merged on the loop
        top = (await client.get("/users/top", params={"limit": 5})).json()
        expected = sorted(users, key=lambda u: (-u["score"], u["id"]))[:5]
        assert top == expected
        tops = await asyncio.gather(*(client.get("/users/top", params={"limit": 5}) for _ in range(20)))
        assert [r.json() for r in tops] == [expected] * 20  # 20 at once, 4 at a time (fanout_slot)

        # a write in a session (SELECT ... FOR UPDATE on PostgreSQL), committed
        first = users[0]
        bumped = (await client.post(f"/users/{first['id']}/points", params={"points": 1000})).json()
        assert bumped == {**first, "score": first["score"] + 1000}
        assert (await client.get("/users/top", params={"limit": 1})).json() == [bumped]

        # the manager's async methods
        assert (await client.get("/by-name/user5")).json()["id"] == users[5]["id"]
        assert (await client.get("/by-name/nobody")).status_code == 404
        assert (await client.get("/stats")).json() == {"users": 60}
        assert (await client.delete(f"/users/{users[1]['id']}")).status_code == 204
        assert (await client.delete(f"/users/{users[1]['id']}")).status_code == 404
        assert (await client.get("/stats")).json() == {"users": 59}

        # every request's session gave its connections back
        for alias in cluster.aliases:
            pool: Any = cluster.async_engine(alias).pool
            assert pool.checkedout() == 0, f"{alias}: {pool.status()}"


@pytest.fixture
def example() -> ModuleType:
    return _example()


def test_fastapi_example(example: ModuleType, databases: DatabaseFactory, backend: str) -> None:
    from shardkit import _cluster

    before = _cluster._active_global
    urls = databases.urls(backend, "default", *example.SHARDS)
    app = example.create_app(urls)
    asyncio.run(_drive(app, lambda a: a.state.cluster))
    assert _cluster._active_global is before  # the lifespan put back the cluster that was active before
