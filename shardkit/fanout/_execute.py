"""Run per-shard work in parallel under one deadline.

The executor knows nothing of SQL or merges: it takes :class:`ShardTask`
objects (a ``run(remaining_seconds)`` and a best-effort ``cancel()``), runs
them in threads and waits until all finish, one fails, or the deadline
passes.  Still-running tasks are then cancelled: each ``cancel()`` is called
in a helper thread of its own and all of them are given :data:`CANCEL_GRACE`
seconds together, so a hanging cancel cannot hold the caller; the caller gets
its answer without waiting any longer for the cancelled threads.

A task's ``cancel()`` should return once the task no longer touches anything
the caller shares with it (shardkit's own connection task: see
:mod:`shardkit.fanout._connect`), and must never hold the GIL while it waits
on the network: it runs while the rest of the process goes on.

Threads: a module-level pool (``shardkit-fanout-*`` threads) is used by
default.  A fan-out started from inside one of its own worker threads, or
with more tasks than the pool has workers, runs on dedicated threads instead,
so nested fan-outs cannot deadlock the pool.  A task whose ``cancel()`` does
not stop it keeps its thread busy until it returns.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from shardkit.errors import FanoutTimeoutError, ShardQueryError

__all__ = [
    "CallableTask",
    "FanoutOutcome",
    "ShardTask",
    "mysql_statement_timeout_sql",
    "pg_statement_timeout_sql",
    "run_parallel",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Seconds given to the cancel() calls (together) before the caller is answered anyway.
#: shardkit's connection task needs at most 0.35 s of it (see ``shardkit.fanout._connect``).
CANCEL_GRACE = 0.4


class ShardTask(Protocol[T_co]):
    """One shard's work: ``run`` executes it, ``cancel`` interrupts it (best effort).

    ``run`` gets the seconds left before the deadline (``None``: no deadline)
    so it can set a statement timeout on its connection.  ``cancel`` is called
    from another thread while ``run`` may be executing; it must not block on the
    network while holding the GIL (psycopg2's ``connection.cancel()`` does: see
    :class:`shardkit.fanout._connect.ConnectionTask`, which shuts the socket down).

    A task may also have a ``stage`` attribute (a few words: ``"connecting"``,
    ``"running the statement"`` ...): error messages then say where a late or
    failed shard was.
    """

    def run(self, remaining_seconds: float | None) -> T_co: ...

    def cancel(self) -> None: ...


@dataclass
class CallableTask(Generic[T]):
    """A :class:`ShardTask` made of two callables."""

    run_fn: Callable[[float | None], T]
    cancel_fn: Callable[[], None] | None = None

    def run(self, remaining_seconds: float | None) -> T:
        return self.run_fn(remaining_seconds)

    def cancel(self) -> None:
        if self.cancel_fn is not None:
            self.cancel_fn()


@dataclass
class FanoutOutcome(Generic[T]):
    """What :func:`run_parallel` returns.

    :param results: alias -> the value its task returned.
    :param errors: alias -> the exception of each shard that failed or did
        not answer in time (only non-empty in partial mode).
    """

    results: dict[str, T] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.errors

    @property
    def missing(self) -> dict[str, BaseException]:
        """The shards that gave no result (same as ``errors``)."""
        return self.errors


_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_POOL_SIZE = int(os.environ.get("SHARDKIT_FANOUT_THREADS", "0")) or max(32, 4 * (os.cpu_count() or 1))


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=_POOL_SIZE,
                thread_name_prefix="shardkit-fanout",
                initializer=_mark_worker,
            )
        return _pool


def _mark_worker() -> None:
    _local.in_pool = True


class _Slot:
    """The life of one task: pending -> running -> done, or cancelled."""

    __slots__ = ("alias", "lock", "state", "task")

    def __init__(self, alias: str, task: ShardTask[Any]) -> None:
        self.alias = alias
        self.task = task
        self.lock = threading.Lock()
        self.state = "pending"

    def execute(self, deadline_at: float | None) -> Any:
        with self.lock:
            if self.state == "cancelled":
                raise TimeoutError(f"shard {self.alias!r} was cancelled before it started")
            self.state = "running"
        try:
            remaining = None if deadline_at is None else max(0.0, deadline_at - time.monotonic())
            return self.task.run(remaining)
        finally:
            with self.lock:
                self.state = "done"

    def cancel(self) -> bool:
        """Mark cancelled; True when the task is running and needs ``task.cancel()``."""
        with self.lock:
            was = self.state
            if was == "pending":
                self.state = "cancelled"
            return was == "running"


def _cancel(slots: list[_Slot]) -> None:
    """Cancel the running tasks in parallel; wait at most CANCEL_GRACE for all of them."""
    running = [s for s in slots if s.cancel()]
    helpers = []
    for s in running:

        def call(task: ShardTask[Any] = s.task) -> None:
            with contextlib.suppress(Exception):
                task.cancel()

        t = threading.Thread(target=call, name="shardkit-fanout-cancel", daemon=True)
        t.start()
        helpers.append(t)
    give_up = time.monotonic() + CANCEL_GRACE
    for t in helpers:
        t.join(max(0.0, give_up - time.monotonic()))


def _stage(task: ShardTask[Any]) -> str:
    stage = getattr(task, "stage", None)
    return f" ({stage})" if isinstance(stage, str) and stage else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _names(aliases: Any) -> str:
    return ", ".join(repr(a) for a in aliases)


def run_parallel(
    tasks: Mapping[str, ShardTask[T]],
    *,
    deadline: float | None,
    partial: bool = False,
    executor: Executor | None = None,
) -> FanoutOutcome[T]:
    """Run one task per shard in parallel and wait under one deadline.

    :param tasks: alias -> task.
    :param deadline: seconds from now that the whole fan-out may take, or
        ``None`` for no limit.
    :param partial: return the shards that answered and list the others in
        ``errors`` instead of raising (still raises if no shard answered).
    :param executor: where to run the tasks; default: the shared pool.
    :raises ShardQueryError: a shard failed (``.errors`` maps alias -> exception).
    :raises FanoutTimeoutError: the deadline passed (names the shards that did not answer).

    Example::

        outcome = run_parallel({"a": CallableTask(lambda t: 1), "b": CallableTask(lambda t: 2)},
                               deadline=5.0)
        outcome.results  # {'a': 1, 'b': 2}
    """
    start = time.monotonic()
    deadline_at = None if deadline is None else start + deadline
    slots = {alias: _Slot(alias, task) for alias, task in tasks.items()}
    if not slots:
        return FanoutOutcome()

    own: ThreadPoolExecutor | None = None
    if executor is None:
        if getattr(_local, "in_pool", False) or len(slots) > _POOL_SIZE:
            own = executor = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="shardkit-fanout-x")
        else:
            executor = _shared_pool()
    try:
        futures: dict[Future[Any], str] = {
            executor.submit(slot.execute, deadline_at): alias for alias, slot in slots.items()
        }
        pending = set(futures)
        results: dict[str, T] = {}
        errors: dict[str, BaseException] = {}
        timed_out = False
        while pending:
            timeout = None if deadline_at is None else max(0.0, deadline_at - time.monotonic())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_EXCEPTION)
            for fut in done:
                alias = futures[fut]
                exc = fut.exception()
                if exc is None:
                    results[alias] = fut.result()
                else:
                    errors[alias] = exc
            if errors and not partial:
                break
            if pending and deadline_at is not None and time.monotonic() >= deadline_at:
                timed_out = True
                break
        late = [futures[f] for f in pending]
        if late:
            _cancel([slots[a] for a in late])
            for f in pending:
                f.cancel()
    finally:
        if own is not None:
            own.shutdown(wait=False)

    elapsed = time.monotonic() - start
    if timed_out:
        for alias in late:
            errors[alias] = TimeoutError(f"shard {alias!r} did not answer within {deadline}s{_stage(tasks[alias])}")
    if errors and (not partial or not results):
        ordered = {a: errors[a] for a in tasks if a in errors}
        # A task may itself report the deadline (a server-side statement
        # timeout set from ``remaining_seconds``): that is a timeout too.
        slow = [a for a, e in ordered.items() if isinstance(e, TimeoutError)]
        if deadline is not None and slow and len(slow) == len(ordered):
            raise FanoutTimeoutError(
                f"fan-out deadline of {deadline}s passed; no answer from shard(s) "
                + ", ".join(f"{a!r}{_stage(tasks[a]) if a in late else ''}" for a in slow),
                errors=ordered,
                aliases=tuple(slow),
            )
        failed = [a for a in ordered if a not in late] if timed_out else list(ordered)
        detail = "; ".join(
            f"{a}{'' if a in late else _stage(tasks[a])}: {type(e).__name__}: {_first_line(e)}"
            for a, e in ordered.items()
        )
        raise ShardQueryError(
            f"fan-out failed on shard(s) {_names(failed)}"
            + (f", no answer from {_names(late)}" if timed_out and late else "")
            + f" ({detail})",
            errors=ordered,
            aliases=tuple(ordered),
        )
    ordered_results = {a: results[a] for a in tasks if a in results}
    ordered_errors = {a: errors[a] for a in tasks if a in errors}
    return FanoutOutcome(ordered_results, ordered_errors, elapsed)


def pg_statement_timeout_sql(remaining_seconds: float | None) -> str:
    """``SET LOCAL statement_timeout`` for the time left (PostgreSQL, in a transaction).

    :param remaining_seconds: seconds left; ``None`` disables the timeout (0).

    >>> pg_statement_timeout_sql(1.5)
    'SET LOCAL statement_timeout = 1500'
    """
    return f"SET LOCAL statement_timeout = {_millis(remaining_seconds)}"


def mysql_statement_timeout_sql(remaining_seconds: float | None) -> str:
    """``SET SESSION max_execution_time`` (MySQL, SELECT only; milliseconds)."""
    return f"SET SESSION max_execution_time = {_millis(remaining_seconds)}"


def _millis(remaining_seconds: float | None) -> int:
    if remaining_seconds is None:
        return 0
    # At least 1 ms: 0 would mean "no timeout" to the server.
    return max(1, math.ceil(remaining_seconds * 1000))
