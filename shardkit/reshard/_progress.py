"""Progress of a reshard's steps, and the scheduler that runs them as table/source tasks.

A step (copy, catch-up, verify, delete) is a list of :data:`Job`: one per table and source
shard (or per source shard).  :func:`run_jobs` runs them in worker threads and passes their
:class:`ProgressEvent` on from the calling thread, job after job, so a progress display sees
one table and source at a time whatever ran at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

__all__ = ["Emit", "Job", "ProgressEvent", "Stopped", "run_jobs"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of progress: ``kind`` is ``"start"``, ``"advance"`` or ``"end"``."""

    kind: str
    step: str  # "copy", "delete", "plan"
    table: str
    source: str
    scanned: int  # rows scanned so far on this source
    total: int  # rows on this source when the step started
    moved: int  # rows copied or deleted so far
    elapsed: float


Emit = Callable[[ProgressEvent], None]
"""What a job calls with each of its events (from its own thread)."""

Job = Callable[[Emit], Any]
"""One task of a step: called with an :data:`Emit`; its return value is collected in order."""


class Stopped(Exception):
    """A worker was told to stop (another one failed, or the run was interrupted)."""


def run_jobs(
    jobs: Sequence[Job], workers: int, publish: Emit, beat: Callable[[], None], *, poll: float = 0.25
) -> list[Any]:
    """Run ``jobs`` in up to ``workers`` threads; return their results in order.

    Each event a job emits is given to ``publish`` from this thread, job after job (a job's
    events wait until the jobs before it have ended).  ``beat`` (the lease's heartbeat) is
    called at least every ``poll`` seconds.  The first failure stops the other jobs (at their
    next event) and is raised.  With ``workers == 1`` the jobs run here, one after the other.
    """
    if not jobs:
        return []
    if workers == 1:

        def emit(event: ProgressEvent) -> None:
            publish(event)
            beat()

        return [job(emit) for job in jobs]
    events: queue.SimpleQueue[tuple[int, ProgressEvent]] = queue.SimpleQueue()
    stop = threading.Event()

    def start(i: int, job: Job) -> Any:
        def emit(event: ProgressEvent) -> None:
            if stop.is_set():
                raise Stopped
            events.put((i, event))

        return job(emit)

    pending: list[list[ProgressEvent]] = [[] for _ in jobs]
    current = 0

    def flush(ended: set[int]) -> None:
        nonlocal current
        while True:
            try:
                i, event = events.get_nowait()
            except queue.Empty:
                break
            pending[i].append(event)
        while current < len(jobs):
            for event in pending[current]:
                publish(event)
            pending[current] = []
            if current not in ended:
                return
            current += 1

    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="shardkit-reshard") as pool:
        futures: list[Future[Any]] = [pool.submit(start, i, job) for i, job in enumerate(jobs)]
        try:
            while True:
                _, running = wait(futures, timeout=poll, return_when=FIRST_EXCEPTION)
                ended = {i for i, f in enumerate(futures) if f.done()}  # before reading the events
                for f in futures:
                    if f.done() and f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                flush(ended)
                beat()
                if not running:
                    return [f.result() for f in futures]
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise
