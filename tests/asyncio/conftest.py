"""One test body, both APIs: the sync session, and the async session on each async driver.

A test body is a plain function of a :class:`~shardkit.ShardSession` ``s``.  The ``api``
fixture runs it:

* ``sync``: in ``with cluster.session() as s``;
* ``asyncpg`` / ``psycopg`` / ``aiosqlite``: in ``async with cluster.async_session() as a``,
  as ``await a.run_sync(body)`` -- the body's session is then the async session's own
  ``sync_session``, in SQLAlchemy's greenlet, on async engines of that driver: every
  statement is awaited on the loop, and a fan-out runs its shards as coroutines on it
  (``shardkit.fanout._aio``).  While the body runs, a ticker task measures the longest
  time the loop did not run it (:attr:`Api.max_stall`): nothing may block the loop.  Time
  the thread spent runnable but waiting for a CPU (the machine busy with other processes,
  Linux ``schedstat``) is not counted: that is not the loop blocked.

Each test gets its own event loop (``asyncio.Runner``); the async engines made on it are
disposed (``await cluster.adispose()``) before it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import shardkit

from ..conftest import PG_URL, require_server

T = TypeVar("T")

#: async API name -> (backend, Cluster.async_driver)
ASYNC_APIS: dict[str, tuple[str, str]] = {
    "asyncpg": ("postgresql", "asyncpg"),
    "psycopg": ("postgresql", "psycopg"),
    "aiosqlite": ("sqlite", "aiosqlite"),
}
#: the longest the loop may go without running a ready task (a fan-out must never block it)
MAX_STALL = 0.05


def _runqueue_wait() -> float:
    """Seconds this thread has waited for a CPU while runnable (Linux ``schedstat``; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class Api:
    """Runs a session body through one API (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = name != "sync"
        self.driver = ASYNC_APIS[name][1] if self.is_async else None
        self.runner: asyncio.Runner | None = asyncio.Runner() if self.is_async else None
        self.max_stall = 0.0
        self._unwatched = 0  # sections of test code that block on purpose (see unwatched())
        self._clusters: list[shardkit.Cluster] = []

    def __repr__(self) -> str:
        return f"Api({self.name})"

    def prepare(self, cluster: shardkit.Cluster) -> shardkit.Cluster:
        """Make ``cluster``'s async engines use this API's driver (before any is made)."""
        if self.is_async:
            cluster.async_driver = self.driver
            if cluster not in self._clusters:
                self._clusters.append(cluster)
                for alias in cluster.aliases:  # made (and the driver imported) before the loop is watched
                    cluster.async_engine(alias)
        return cluster

    def run(self, cluster: shardkit.Cluster, body: Callable[[shardkit.ShardSession], T], **kw: Any) -> T:
        """``body(s)`` in a session of ``cluster`` through this API."""
        if not self.is_async:
            with cluster.session(**kw) as s:
                return body(s)
        self.prepare(cluster)

        async def go() -> T:
            async with cluster.async_session(**kw) as a:
                return await a.run_sync(body)

        return self.arun(go())

    def arun(self, coro: Any) -> Any:
        """Run a coroutine on this API's loop while a ticker measures the loop's stalls."""
        assert self.runner is not None, "the sync API has no loop"

        async def watched() -> Any:
            stop = asyncio.Event()

            async def tick() -> None:
                last, seen, queued = time.monotonic(), self._unwatched, _runqueue_wait()
                while not stop.is_set():
                    await asyncio.sleep(0.005)
                    now, waited = time.monotonic(), _runqueue_wait()
                    if seen == self._unwatched:
                        # time the loop's thread was runnable but the machine ran something else
                        # (other processes on a busy machine) is not a stall of the loop
                        self.max_stall = max(self.max_stall, now - last - 0.005 - (waited - queued))
                    last, seen, queued = now, self._unwatched, waited

            gc.collect()  # a full collection the body did not cause is not its stall
            ticker = asyncio.ensure_future(tick())
            try:
                return await coro
            finally:
                stop.set()
                await ticker

        return self.runner.run(watched())

    @contextlib.contextmanager
    def unwatched(self) -> Iterator[None]:
        """Test code in a body that blocks on purpose (a sync engine setting a shard up):
        not counted as a stall of the loop."""
        self._unwatched += 1
        try:
            yield
        finally:
            self._unwatched += 1

    def close(self) -> None:
        if self.runner is not None:
            for cluster in self._clusters:
                self.runner.run(cluster.adispose())
            self.runner.close()


def make_api(name: str) -> Api:
    if name in ASYNC_APIS and ASYNC_APIS[name][0] == "postgresql":
        require_server(PG_URL, "pg")
    return Api(name)


@pytest.fixture
def api_factory() -> Iterator[Callable[[str], Api]]:
    made: list[Api] = []

    def make(name: str) -> Api:
        api = make_api(name)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


@pytest.fixture(params=["sync", "asyncpg", "psycopg"])
def pg_api(request: pytest.FixtureRequest, api_factory: Callable[[str], Api]) -> Api:
    """The sync API and the async one on PostgreSQL's two async drivers."""
    return api_factory(request.param)


@pytest.fixture(params=["sync", "asyncpg", "psycopg", "aiosqlite"])
def api(request: pytest.FixtureRequest, api_factory: Callable[[str], Api]) -> Api:
    """Every API: sync, and async on asyncpg, psycopg (PostgreSQL) and aiosqlite (SQLite)."""
    return api_factory(request.param)


def backend_of(api: Api, default: str = "postgresql") -> str:
    """The backend a test on ``api`` uses: SQLite for aiosqlite, else ``default``."""
    return ASYNC_APIS[api.name][0] if api.is_async else default


# ---------------------------------------------------------------- a sync test, on the async stack


class AsyncStack:
    """Runs an existing sync test function unchanged on the async stack.

    While the test runs, ``Cluster.session()`` gives the ``sync_session`` of
    ``cluster.async_session()`` -- the very session an ``AsyncSession`` drives, over the
    cluster's async engines -- and the test runs inside SQLAlchemy's greenlet on an event
    loop (``greenlet_spawn``), so each of its statements is awaited on the loop and its
    fan-outs run as coroutines, as under ``await async_session.execute(...)``.  SQL the test
    itself sends on ``cluster.engine(alias)`` (its checks) stays on the sync engines.

    :param driver: the PostgreSQL async driver; SQLite aliases get aiosqlite.
    """

    def __init__(self, driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.driver = driver
        self.runner = asyncio.Runner()
        self.clusters: list[shardkit.Cluster] = []
        stack = self

        def session(cluster: shardkit.Cluster, **kw: Any) -> shardkit.ShardSession:
            base = getattr(cluster, "cluster", cluster)  # a view's own session(): its cluster's
            if base not in stack.clusters:
                base.async_driver = {"postgresql": stack.driver}
                stack.clusters.append(base)
            made = base.async_session(**kw).sync_session
            stack.sessions.append(made)
            return made

        monkeypatch.setattr(shardkit.Cluster, "session", session)
        self.sessions: list[shardkit.ShardSession] = []

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from sqlalchemy.util import greenlet_spawn

        def run() -> T:
            try:
                return fn(*args, **kwargs)
            finally:  # a session the test left open: its connections back to their pools here
                while self.sessions:
                    self.sessions.pop().close()

        try:
            return self.runner.run(greenlet_spawn(run))
        finally:
            for cluster in self.clusters:  # engines of this loop: gone with it
                self.runner.run(cluster.adispose())

    def close(self) -> None:
        self.runner.close()


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    """The PostgreSQL async driver of :func:`async_stack`."""
    return str(request.param)


@pytest.fixture
def async_stack(driver: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[AsyncStack]:
    stack = AsyncStack(driver, monkeypatch)
    yield stack
    stack.close()


def run_unchanged(stack: AsyncStack, request: pytest.FixtureRequest, test: Callable[..., Any]) -> None:
    """Call ``test`` (a sync test function) with its fixtures, on ``stack``."""
    import inspect

    kwargs = {name: request.getfixturevalue(name) for name in inspect.signature(test).parameters}
    stack.call(test, **kwargs)
