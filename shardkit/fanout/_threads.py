"""Shards whose connections belong to the calling thread: run them there, one after another.

A fan-out runs each shard's statement in a worker thread.  Some engines hand out
connections that only the thread (or event loop) that made them may use:

* SQLite with one connection per thread: an in-memory database (each connection is its
  own database), a ``SingletonThreadPool`` or a ``StaticPool`` -- the engines of
  SQLAlchemy's own sharding layouts (``ATTACH`` + ``schema_translate_map``, or one
  ``sqlite://`` engine shared by several aliases through ``execution_options()``).  Such a
  connection refuses other threads (``check_same_thread``), and aliases sharing it could
  not use it at the same time anyway;
* an async driver (``sqlite+aiosqlite``, ``postgresql+asyncpg``): its connection lives in
  the caller's event loop, reached only from the caller's greenlet.

When any shard of a fan-out uses such an engine, every shard of that fan-out runs in the
calling thread, one after another, through :class:`CallingThreadExecutor`; the merge is
the same.  The deadline still applies between shards (a shard whose turn comes after the
deadline is not started), but a statement already running is not interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from sqlalchemy.pool import SingletonThreadPool, StaticPool

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["CallingThreadExecutor", "calling_thread_executor", "thread_bound"]

P = ParamSpec("P")
T = TypeVar("T")


def thread_bound(engine: Engine) -> bool:
    """Whether ``engine``'s connections must be used in the thread that made them."""
    dialect = engine.dialect
    if dialect.is_async:
        return True
    if dialect.name != "sqlite":
        return False
    if isinstance(engine.pool, SingletonThreadPool | StaticPool):
        return True
    database = engine.url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database or engine.url.query.get("mode") == "memory"


class CallingThreadExecutor(Executor):
    """An executor that runs each task at once, in the thread that submits it.

    :param deadline: seconds from now; a task submitted later is not started and its
        future fails with :class:`TimeoutError`.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self._deadline_at = None if deadline is None else time.monotonic() + deadline
        self._deadline = deadline

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        if self._deadline_at is not None and time.monotonic() >= self._deadline_at:
            future.set_exception(
                TimeoutError(
                    f"the fan-out deadline of {self._deadline}s passed before this shard's turn "
                    "(its engine's connections belong to the calling thread: the shards ran one after another)"
                )
            )
            return future
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # the task's failure, reported as a worker thread's would be
            future.set_exception(exc)
        return future


def calling_thread_executor(engines: Iterable[Engine], deadline: float | None) -> Executor | None:
    """A :class:`CallingThreadExecutor` when any of ``engines`` is :func:`thread_bound`, else ``None``
    (the executor's shared thread pool)."""
    if any(thread_bound(engine) for engine in engines):
        return CallingThreadExecutor(deadline)
    return None
