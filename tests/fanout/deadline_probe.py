"""Child process of ``tests/fanout/test_deadlines.py``: one deadline scenario, measured.

Run as ``python -m tests.fanout.deadline_probe '<json config>'``; prints one JSON line.
The fan-out runs here, in a process of its own, because the fault it guards against
freezes the whole interpreter (a cancel that holds the GIL while it waits on a black
hole): the parent's timeout then turns a frozen process into a failure instead of a
hung test run.

Shard ``s2`` is reached through a :class:`~tests.faults.TcpProxy`.  Scenarios:

``statement``
    ``s2`` has a pooled connection; the proxy black-holes it: the statement is sent,
    nothing ever comes back.
``held``
    the same, on the connection the session already holds from an earlier read.
``connect``
    ``s2``'s pool is emptied, then the proxy black-holes: the new connection is accepted
    at TCP level and the server's greeting never comes.
``pool``
    ``s2``'s pool (size 1, no overflow) is exhausted by a connection held elsewhere.

Each attempt measures how long the fan-out took and the largest gap between the
wake-ups of a ticker thread sleeping 5 ms: first for :data:`BASELINE` seconds with
nothing running (the machine's own noise, in this process, just before), then from the
start of the fan-out until :data:`AFTER` seconds after it returned (the cancel helpers
it leaves behind must not stall anyone either).  Then it restores the shard and reports
what the pools hold and whether a full fan-out works again.

The probe raises its scheduling priority (``os.nice(-10)``, when allowed) before it
starts any thread, so that on a loaded machine the other processes' work stalls its
threads less; the parent judges the fan-out by the excess of its largest gap over the
baseline's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

from sqlalchemy import String, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter
from shardkit.errors import ShardQueryError

from ..faults import TcpProxy

RING_SHARDS = ["s0", "s1", "s2"]
PROXIED = "s2"
STALL = 0.05  # the contract: no other thread stalls longer than this
TICK = 0.005  # the ticker's sleep
BASELINE = 0.5  # seconds of ticking with nothing running, before each fan-out
AFTER = 0.5  # seconds of ticking after the fan-out returned
PRIORITY = -10  # os.nice() increment of the probe (needs the privilege; ignored without)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "deadline_users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Ticker:
    """A thread that sleeps :data:`TICK` at a time and records its largest gap between wake-ups.

    :meth:`take` returns the largest gap since the previous :meth:`take` (a gap still going on
    counts as far as it went) and starts a new window.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._max_gap = 0.0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            time.sleep(TICK)
            now = time.monotonic()
            with self._lock:
                self._max_gap = max(self._max_gap, now - self._last)
                self._last = now

    def take(self) -> float:
        with self._lock:
            gap = max(self._max_gap, time.monotonic() - self._last)
            self._max_gap = 0.0
            return gap

    def __enter__(self) -> Ticker:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _databases(urls: dict[str, str], proxy: TcpProxy, scenario: str) -> dict[str, Any]:
    databases: dict[str, Any] = dict(urls)
    url = make_url(urls[PROXIED])
    databases[PROXIED] = {
        "ENGINE": "postgresql",
        "NAME": url.database,
        "USER": url.username,
        "PASSWORD": url.password,
        "HOST": "127.0.0.1",
        "PORT": proxy.port,
        "ENGINE_OPTIONS": {"pool_size": 1, "max_overflow": 0, "pool_timeout": 3} if scenario == "pool" else {},
    }
    return databases


def _wait_until_returned(cluster: shardkit.Cluster, limit: float) -> float:
    """Seconds until no pool has a connection checked out (at most ``limit``)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if all(cluster.engine(a).pool.checkedout() == 0 for a in RING_SHARDS):  # type: ignore[attr-defined]
            break
        time.sleep(0.05)
    return time.monotonic() - started


def attempt(
    cluster: shardkit.Cluster, proxy: TcpProxy, scenario: str, deadline: float | None, partial: bool
) -> dict[str, Any]:
    invalidated = dict.fromkeys(RING_SHARDS, 0)
    hooks = []
    for alias in RING_SHARDS:

        def count(*_args: Any, alias: str = alias) -> None:
            invalidated[alias] += 1

        event.listen(cluster.engine(alias), "invalidate", count)
        hooks.append((cluster.engine(alias), count))

    proxy.restore()
    with cluster.session() as s:  # every shard has a pooled connection; the statement is compiled
        s.scalars(select(User).order_by(User.id)).all()
    hog = None
    if scenario == "statement":
        proxy.blackhole()
    elif scenario == "held":
        pass  # black-holed below, once the measured session holds its connections
    elif scenario == "connect":
        cluster.engine(PROXIED).dispose()
        proxy.blackhole()
    else:
        hog = cluster.engine(PROXIED).connect()
        hog.exec_driver_sql("SELECT 1")

    report: dict[str, Any] = {"partial": partial}
    stmt = select(User).order_by(User.id).execution_options(shardkit_deadline=deadline, shardkit_partial=partial)
    with cluster.session() as s:
        if scenario == "held":
            s.scalars(select(User).order_by(User.id)).all()  # the session holds every shard's connection
            proxy.blackhole()
        with Ticker() as ticker:
            time.sleep(BASELINE)  # nothing runs: the machine's own noise
            report["baseline_gap"] = ticker.take()
            started = time.monotonic()
            try:
                result = s.execute(stmt)
                report["rows"] = [u.id for u in result.scalars()]
                report["complete"] = result.complete  # type: ignore[attr-defined]
                report["errors"] = {a: [type(e).__name__, str(e)] for a, e in result.errors.items()}  # type: ignore[attr-defined]
            except ShardQueryError as exc:
                report["error"] = [type(exc).__name__, str(exc), list(exc.errors)]  # type: ignore[attr-defined]
            report["elapsed"] = time.monotonic() - started
            time.sleep(AFTER)  # what the fan-out left running (cancel helpers, abandoned workers)
            report["max_gap"] = ticker.take()
        s.rollback()

    proxy.restore()
    if hog is not None:
        hog.close()
    report["returned_after"] = _wait_until_returned(cluster, 5.0)
    report["checked_out"] = {a: cluster.engine(a).pool.checkedout() for a in RING_SHARDS}  # type: ignore[attr-defined]
    report["invalidated"] = dict(invalidated)
    with cluster.session() as s:  # the shard works again, in full
        result = s.execute(select(User).order_by(User.id))
        report["after_rows"] = [u.id for u in result.scalars()]
        report["after_complete"] = result.complete  # type: ignore[attr-defined]
    for engine, hook in hooks:
        event.remove(engine, "invalidate", hook)
    return report


def main(config: dict[str, Any]) -> dict[str, Any]:
    with contextlib.suppress(OSError):
        os.nice(PRIORITY)  # before any thread starts: on Linux each thread inherits it
    scenario = config["scenario"]
    deadline = config["deadline"]
    pg = make_url(config["urls"][PROXIED])
    proxy = TcpProxy((pg.host or "127.0.0.1", pg.port or 5432))
    try:
        cluster = shardkit.Cluster(
            _databases(config["urls"], proxy, scenario), routers=[HashRingRouter(HashRing(RING_SHARDS))]
        )
        attempts = [attempt(cluster, proxy, scenario, deadline, partial) for partial in (False, True)]
        cluster.dispose()
        return {"attempts": attempts, "nice": os.nice(0)}
    finally:
        proxy.close()


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
