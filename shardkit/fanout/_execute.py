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

Threads (``shardkit-fanout-*``, daemon): a task gets an idle worker thread, or a
new one when none is idle, so a fan-out never waits for a thread and nested
fan-outs cannot deadlock; idle workers are kept for reuse (at most
``max(32, 4 * cpus)`` of them, for :data:`IDLE_SECONDS`).  A task still
running once the fan-out has given up on it (a pool checkout, a connect or a
call its ``cancel()`` could not stop) is *abandoned*: it keeps its thread
until it returns, and it no longer counts against anything the other shards
use.  Tasks of one *lane* (a task's ``lane`` attribute: shardkit's connection
task uses the shard's engine; else the alias) may have at most
:data:`ABANDONED_PER_LANE` abandoned workers: while a lane has that many, its
new tasks wait without a thread until one of them returns or their own
deadline passes.  So a sick shard holds a bounded number of threads, and the
healthy shards never wait for one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from shardkit.errors import FanoutTimeoutError, ShardQueryError, brief

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
    failed shard was; and a ``lane`` (hashable: what the task waits on, such as
    its shard's engine) that bounds how many of its abandoned workers may pile
    up (:data:`ABANDONED_PER_LANE`; default: the alias).
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


#: Abandoned workers one lane (one shard's engine) may have; beyond it its new tasks wait,
#: without a thread, for one to return (or for their deadline).
ABANDONED_PER_LANE = 4
#: Seconds an idle worker thread waits for a new task before it ends.
IDLE_SECONDS = 60.0
_IDLE_KEPT = int(os.environ.get("SHARDKIT_FANOUT_THREADS", "0")) or max(32, 4 * (os.cpu_count() or 1))


class _Item:
    """One task handed to :class:`_Workers`: its callable, its future, its lane."""

    __slots__ = ("abandoned", "args", "finished", "fn", "future", "lane", "waited")

    def __init__(self, lane: Hashable, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.lane = lane
        self.fn = fn
        self.args = args
        self.future: Future[Any] = Future()
        self.finished = False  # under _Workers._lock
        self.abandoned = False
        self.waited = False  # queued behind the lane's abandoned workers


class _Lane:
    __slots__ = ("abandoned", "waiting")

    def __init__(self) -> None:
        self.abandoned = 0
        self.waiting: deque[_Item] = deque()


class _Workers:
    """Worker threads for fan-out tasks: reused when idle, started when none is, never queued
    behind each other -- except behind a lane's abandoned workers (see the module docstring)."""

    def __init__(self, idle_kept: int) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Item | None]] = []
        self._lanes: dict[Hashable, _Lane] = {}  # only lanes with abandoned or waiting tasks
        self._idle_kept = idle_kept
        self._names = itertools.count(1)

    def submit(self, lane: Hashable, fn: Callable[..., Any], *args: Any) -> _Item:
        item = _Item(lane, fn, args)
        with self._lock:
            state = self._lanes.get(lane) if self._lanes else None
            if state is not None and state.abandoned >= ABANDONED_PER_LANE:
                # Tasks given up on while waiting here (cancelled futures) go: the list stays
                # as long as the fan-outs waiting at this moment.
                live = [i for i in state.waiting if not i.future.cancelled()]
                state.waiting = deque(live)
                state.waiting.append(item)
                item.waited = True
                return item
        self._start(item)
        return item

    def abandoned(self, lane: Hashable) -> int:
        """How many workers of ``lane`` were given up on and are still running."""
        with self._lock:
            state = self._lanes.get(lane)
            return 0 if state is None else state.abandoned

    def abandon(self, item: _Item) -> None:
        """The fan-out gave up on ``item``: if it is still running, count it against its lane."""
        with self._lock:
            if item.finished or item.abandoned or not item.future.running():
                return
            item.abandoned = True
            self._lanes.setdefault(item.lane, _Lane()).abandoned += 1

    def _start(self, item: _Item) -> None:
        with self._lock:
            handoff = self._idle.pop() if self._idle else None
        if handoff is not None:
            handoff.put(item)
            return
        name = f"shardkit-fanout-{next(self._names)}"
        threading.Thread(target=self._work, args=(item,), name=name, daemon=True).start()

    def _work(self, item: _Item | None) -> None:
        handoff: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        while item is not None:
            follow = self._run(item)
            item = follow if follow is not None else self._next(handoff)

    def _run(self, item: _Item) -> _Item | None:
        """Run ``item``; returns a task of its lane that may start now, for this thread."""
        if item.future.set_running_or_notify_cancel():
            try:
                result = item.fn(*item.args)
            except BaseException as exc:  # the task's failure goes to its future, as in concurrent.futures
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)
        released: list[_Item] = []
        with self._lock:
            item.finished = True
            state = self._lanes.get(item.lane)
            if state is not None:
                if item.abandoned:
                    state.abandoned -= 1
                if state.abandoned < ABANDONED_PER_LANE:
                    released = [i for i in state.waiting if not i.future.cancelled()]
                    state.waiting.clear()
                if not state.abandoned and not state.waiting:
                    del self._lanes[item.lane]
        item.fn = item.args = None  # type: ignore[assignment]  # an abandoned task's session etc. can go
        for other in released[1:]:
            self._start(other)
        return released[0] if released else None

    def _next(self, handoff: queue.SimpleQueue[_Item | None]) -> _Item | None:
        """Wait idle for the next task; ``None``: this thread ends."""
        with self._lock:
            if len(self._idle) >= self._idle_kept:
                return None
            self._idle.append(handoff)
        try:
            return handoff.get(timeout=IDLE_SECONDS)
        except queue.Empty:
            with self._lock:
                if handoff in self._idle:
                    self._idle.remove(handoff)
                    return None
            return handoff.get()  # taken off the idle list just now: its task is on the way


_workers = _Workers(_IDLE_KEPT)


def _after_fork() -> None:
    global _workers
    _workers = _Workers(_IDLE_KEPT)  # the parent's threads do not exist in a child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def run_in_background(fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` in one of the fan-out's worker threads (an idle one, or a new one); its
    result or exception goes to the returned future.  Used for work that overlaps the
    caller's, such as reading a shard's next batch of a stream while the merge runs."""
    return _workers.submit(("background", fn), fn).future


def _lane(alias: str, task: ShardTask[Any]) -> Hashable:
    lane = getattr(task, "lane", None)
    return alias if lane is None else lane


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


def _names(aliases: Any) -> str:
    return ", ".join(repr(a) for a in aliases)


def outcome(
    tasks: Mapping[str, Any],
    results: Mapping[str, T],
    errors: Mapping[str, BaseException],
    late: Iterable[str],
    stages: Mapping[str, str],
    deadline: float | None,
    partial: bool,
    elapsed: float,
) -> FanoutOutcome[T]:
    """What a fan-out's shard answers add up to, for both executors (threads and the event loop):
    the answers in the order of ``tasks``, or the one error that says what failed.

    :param late: the shards still running at the deadline.
    :param stages: each shard's stage suffix (`` (connecting)`` ...) for the messages.
    :raises FanoutTimeoutError: every failure is a timeout.
    :raises ShardQueryError: a shard failed, and partial answers were not asked for (or none came).
    """
    late = set(late)
    if errors and (not partial or not results):
        ordered = {a: errors[a] for a in tasks if a in errors}
        # A task may itself report the deadline (a server-side statement timeout set from
        # ``remaining_seconds``, a pool checkout cut to the time left): that is a timeout too.
        slow = [a for a, e in ordered.items() if isinstance(e, TimeoutError)]
        if deadline is not None and slow and len(slow) == len(ordered):
            raise FanoutTimeoutError(
                f"fan-out deadline of {deadline}s passed; no answer from shard(s) "
                + ", ".join(f"{a!r}{stages.get(a, '')}" for a in slow),
                errors=ordered,
                aliases=tuple(slow),
            )
        failed = [a for a in ordered if a not in late]
        detail = "; ".join(f"{a}{'' if a in late else stages.get(a, '')}: {brief(e)}" for a, e in ordered.items())
        raise ShardQueryError(
            f"fan-out failed on shard(s) {_names(failed)}"
            + (f", no answer from {_names([a for a in tasks if a in late])}" if late else "")
            + f" ({detail})",
            errors=ordered,
            aliases=tuple(ordered),
        )
    ordered_results = {a: results[a] for a in tasks if a in results}
    ordered_errors = {a: errors[a] for a in tasks if a in errors}
    return FanoutOutcome(ordered_results, ordered_errors, elapsed)


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
    :param executor: where to run the tasks; default: shardkit's worker threads (see the
        module docstring).
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

    workers = _workers if executor is None else None
    futures: dict[Future[Any], str] = {}
    items: dict[str, _Item] = {}
    for alias, slot in slots.items():
        if workers is not None:
            item = workers.submit(_lane(alias, slot.task), slot.execute, deadline_at)
            items[alias] = item
            futures[item.future] = alias
        else:
            assert executor is not None
            futures[executor.submit(slot.execute, deadline_at)] = alias
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
    # Where each shard was when the fan-out stopped waiting (an abandoned task goes on and
    # may say something else later).
    stages = {alias: _stage(task) for alias, task in tasks.items()}
    late = [futures[f] for f in pending]
    for alias in late:
        queued = items.get(alias)
        if queued is not None and workers is not None and queued.waited and not queued.future.running():
            blocked = workers.abandoned(queued.lane)
            stages[alias] = (
                f" (not started: {blocked} worker(s) of earlier fan-outs still blocked on this shard)"
                if blocked
                else " (not started)"
            )
    if late:
        _cancel([slots[a] for a in late])
        for f in pending:
            f.cancel()
        if workers is not None:
            for alias in late:
                workers.abandon(items[alias])  # still running after the cancel: abandoned

    elapsed = time.monotonic() - start
    if timed_out:
        for alias in late:
            errors[alias] = TimeoutError(f"shard {alias!r} did not answer within {deadline}s{stages[alias]}")
    return outcome(tasks, results, errors, late if timed_out else (), stages, deadline, partial, elapsed)


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
