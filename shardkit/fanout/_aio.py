"""A fan-out on the event loop: the shard statements of an async session run as coroutines.

Under an ``AsyncSession`` the sync session runs in a greenlet (SQLAlchemy's
``greenlet_spawn``), and every driver call is awaited on the running loop through
``await_only``.  Worker threads cannot use those connections, so a fan-out there does not go
to :func:`~shardkit.fanout._execute.run_parallel`: :func:`run_on_loop` runs each shard's task
(the same :class:`~shardkit.fanout._connect.ConnectionTask`: pool checkout, connect, statement)
in a greenlet of its own, as an asyncio task on the caller's loop, all at once, and waits for
them from the caller's greenlet (``await_only``), under the one deadline:

* all answered: their results, as from the thread executor;
* a shard failed (not partial mode): the others are cancelled at once.  Cancelling the task
  cancels the driver's await: asyncpg sends the server a cancel request, psycopg 3 too
  (``cancel_safe``) and waits for the statement to end; SQLAlchemy then invalidates the
  connection (a cancelled call is an exit exception), so its pool replaces it;
* the deadline passed: a PostgreSQL statement is stopped by the server itself
  (``SET LOCAL statement_timeout``, set to the time left by the shard's task), leaving its
  connection usable; the tasks are given :data:`SETTLE` seconds for that, then cancelled
  as above.

A cancelled task that has not ended :data:`RELEASE` seconds later (a server that never
answers, a link that crawls: the driver's cancel waits for the server, psycopg up to 5 s,
asyncpg's close up to 2 s) is left to end on the loop by itself, and is never cancelled a
second time; the caller is answered at most ``deadline + SETTLE + RELEASE`` seconds after
it started.  A psycopg connection left so is invalidated in the caller's session at once
(psycopg would close it under the session after its cancel wait); an asyncpg one ends by
itself within its close timeout.  Nothing here
blocks the loop: the waits are the loop's own.

Engines whose connections cannot be used by two shards at a time (an in-memory SQLite,
a ``StaticPool``) keep the serial path (:mod:`shardkit.fanout._threads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.util import await_only, greenlet_spawn

from ._execute import FanoutOutcome, outcome

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ._execute import ShardTask

__all__ = ["RELEASE", "SETTLE", "DollarCursor", "in_greenlet", "on_event_loop", "run_on_loop"]


def in_greenlet() -> bool:
    """Whether the caller runs inside SQLAlchemy's ``greenlet_spawn`` (so may ``await_only``)."""
    try:
        from sqlalchemy.util.concurrency import in_greenlet as sa_in_greenlet
    except ImportError:  # pragma: no cover - an older 2.0 names it only in _concurrency_py3k
        import greenlet  # type: ignore[import-untyped]

        return bool(getattr(greenlet.getcurrent(), "__sqlalchemy_greenlet_provider__", False))
    return sa_in_greenlet()


T = TypeVar("T")

#: After the deadline, seconds given to statements the server stops itself (statement_timeout).
SETTLE = 0.15
#: After cancelling, seconds given to a shard's task to end before the caller is answered anyway.
RELEASE = 0.2


def on_event_loop(engines: Iterable[Engine]) -> bool:
    """Whether a fan-out over ``engines`` runs on the event loop: the caller is in SQLAlchemy's
    greenlet (an ``AsyncSession``), every engine is an async one's sync facade, and each may
    hand out several connections at once."""
    engines = list(engines)
    if not engines or not in_greenlet():
        return False
    return all(
        engine.dialect.is_async and not isinstance(engine.pool, SingletonThreadPool | StaticPool) for engine in engines
    )


def _stage(task: Any) -> str:
    stage = getattr(task, "stage", None)
    return f" ({stage})" if isinstance(stage, str) and stage else ""


def _names(aliases: Iterable[str]) -> str:
    return ", ".join(repr(a) for a in aliases)


async def _gather(
    tasks: Mapping[str, ShardTask[T]], deadline: float | None, partial: bool, start: float, unfinished: list[str]
) -> tuple[dict[str, T], dict[str, BaseException], list[str], dict[str, str], list[str]]:
    deadline_at = None if deadline is None else start + deadline
    running: dict[asyncio.Task[Any], str] = {}
    for alias, task in tasks.items():
        left = None if deadline_at is None else max(0.0, deadline_at - time.monotonic())
        running[asyncio.ensure_future(greenlet_spawn(task.run, left))] = alias
    pending: set[asyncio.Task[Any]] = set(running)
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}
    late: list[str] = []
    stages: dict[str, str] = {}
    abandoned: list[str] = []

    def collect(done: Iterable[asyncio.Task[Any]]) -> None:
        for fut in done:
            alias = running[fut]
            if fut.cancelled():
                errors.setdefault(alias, TimeoutError(f"shard {alias!r} was cancelled"))
                continue
            exc = fut.exception()
            if exc is None:
                results[alias] = fut.result()
            else:
                errors[alias] = exc

    try:
        timed_out = False
        while pending:
            timeout = None if deadline_at is None else max(0.0, deadline_at - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            collect(done)
            if errors and not partial:
                break
            if pending and deadline_at is not None and time.monotonic() >= deadline_at:
                timed_out = True
                break
        if timed_out:
            # PostgreSQL's statement_timeout stops a running statement at about the deadline,
            # leaving its connection usable: give it that moment before cancelling anything.
            stages.update({running[f]: _stage(tasks[running[f]]) for f in pending})
            done, pending = await asyncio.wait(pending, timeout=SETTLE)
            collect(done)
        late = [running[f] for f in pending]
        stages.update({a: _stage(tasks[a]) for a in late if a not in stages})
        if pending:
            for fut in pending:
                fut.cancel()  # the driver's await is cancelled: a cancel request to the server
            done, pending = await asyncio.wait(pending, timeout=RELEASE)
            for fut in done:  # it ended: nothing of it reaches the caller but the failure
                if not fut.cancelled():
                    fut.exception()  # retrieved, so asyncio does not log it
            for fut in pending:  # still ending (a server that never answers): left to the loop
                fut.add_done_callback(_retrieve)
                abandoned.append(running[fut])
        if timed_out:
            for alias in late:
                errors[alias] = TimeoutError(f"shard {alias!r} did not answer within {deadline}s{stages[alias]}")
        # else: another shard failed and these were cancelled; the failure is what is reported
        return results, errors, late if timed_out else [], stages, abandoned
    except BaseException:
        # the caller itself was cancelled (its own timeout, a client gone): so are its shards
        for fut in running:
            if not fut.done():
                unfinished.append(running[fut])
                fut.cancel()
                fut.add_done_callback(_retrieve)
        raise


def _let_go(session: Any, task: Any, *, any_driver: bool = False) -> None:
    """A shard whose query was cancelled before it ended is invalidated in the caller's
    session, so the session's rollback skips it (and still returns every other shard's
    connection to its pool) instead of meeting a closed or busy connection.

    psycopg waits up to 5 s for a cancel, holding the connection's lock, then closes the
    connection: always let go of it.  asyncpg's cancelled call ends by itself when the
    fan-out waits for it (``close(timeout=2)`` in the task); when the caller itself was
    cancelled nothing waits, and its connection is closed under the session (``any_driver``)."""
    from .._sqla import held_connection

    engine = getattr(task, "lane", None)  # a ConnectionTask's lane is its engine
    driver = getattr(getattr(engine, "dialect", None), "driver", None)
    if not any_driver and driver not in ("psycopg", "psycopg_async"):
        return
    conn = held_connection(session, engine)
    if conn is not None and not conn.invalidated:
        with contextlib.suppress(Exception):
            conn.invalidate()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def run_on_loop(
    tasks: Mapping[str, ShardTask[T]], *, deadline: float | None, partial: bool = False, session: Any = None
) -> FanoutOutcome[T]:
    """:func:`~shardkit.fanout._execute.run_parallel` for a caller inside SQLAlchemy's greenlet:
    the tasks run concurrently on the running event loop (see the module docstring); same
    results, same errors (:class:`~shardkit.errors.ShardQueryError`,
    :class:`~shardkit.errors.FanoutTimeoutError`), same partial mode."""
    start = time.monotonic()
    if not tasks:
        return FanoutOutcome()
    unfinished: list[str] = []
    try:
        results, errors, late, stages, abandoned = await_only(_gather(tasks, deadline, partial, start, unfinished))
    except BaseException:
        if session is not None:  # the caller was cancelled: its shards' queries were too
            for alias in unfinished:
                _let_go(session, tasks[alias], any_driver=True)
        raise
    if session is not None:
        for alias in abandoned:
            _let_go(session, tasks[alias])
    elapsed = time.monotonic() - start
    stage_of = {a: stages.get(a) or _stage(task) for a, task in tasks.items()}
    return outcome(tasks, results, errors, late, stage_of, deadline, partial, elapsed)


class DollarCursor:
    """A DBAPI cursor taking ``%s`` placeholders over one whose paramstyle is ``$1, $2 ...``
    (SQLAlchemy's asyncpg adapter): for the few raw queries shardkit writes in ``%s`` style."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, operation: str, parameters: Any = None) -> Any:
        if parameters:
            parts = operation.split("%s")
            operation = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        return self._cursor.execute(operation, parameters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)
