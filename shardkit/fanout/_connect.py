"""A shard's connection under the fan-out deadline: get it, run on it, interrupt it.

A fan-out must answer by its deadline whatever one shard does: refuse
connections, accept TCP and never answer (a black hole), hang while
connecting, or have no free connection in its pool.  :class:`ConnectionTask`
is the executor's task for one shard, in three stages:

``waiting for a pooled connection`` / ``connecting``
    the pool checkout (and the connect it may need) runs in the worker
    thread, never in the caller's, so it counts against the deadline.  The
    wait for a free connection in a ``QueuePool`` never lasts longer than the
    time left (the engine's pool class is given a ``_timeout`` that is the
    smaller of ``pool_timeout`` and the time left, plus
    :data:`CHECKOUT_MARGIN`, of the fan-out task checking out in that
    thread; other checkouts keep ``pool_timeout``), so an exhausted pool
    frees the worker at the deadline.  On PostgreSQL the
    connect itself is cut to the time left (``connect_timeout``, which libpq
    rounds up to 2 s).  At the deadline the task is *abandoned*: when the
    checkout ends later, the connection goes straight back to the pool, and
    nothing reaches the caller's session.  A connect that hangs keeps its
    worker until it gives up; the executor caps how many such workers one
    engine may have (``ABANDONED_PER_LANE``: the task's ``lane`` is its
    engine), so a shard that hangs cannot take the threads the others need.
``running the statement``
    the statement runs on the connection; at the deadline (or when another
    shard failed) ``cancel()`` first gives a statement that the server stops
    by itself (PostgreSQL's ``statement_timeout``) :data:`SETTLE` seconds,
    then shuts the connection's socket down (``shutdown(2)`` on a duplicate
    of its descriptor).  The driver, blocked in ``recv``/``poll`` without the
    GIL, returns at once with "server closed the connection"; the connection
    is invalidated, so its pool replaces it.

Why not the driver's cancel: psycopg2's ``connection.cancel()`` (libpq's
``PQcancel``) opens a connection to the server, sends the cancel key and
waits for the server to close it, *holding the GIL* all along: against a
host that accepts TCP and never answers, every thread of the process stopped
until the TCP connection died.  A ``shutdown()`` is one system call that
cannot block, and the server side is stopped by ``statement_timeout`` (set
to the time left, see :func:`~shardkit.fanout.pg_statement_timeout_sql`).

:func:`bound_sockets` also gives every new psycopg2 connection of an engine
socket-level bounds (TCP keepalives, ``tcp_user_timeout``, ``connect_timeout``)
derived from the cluster's deadline, for the work that runs outside a
fan-out's deadline: a peer that vanished is noticed within seconds instead
of the system's two hours.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from .. import _sqla

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = [
    "CHECKOUT_MARGIN",
    "RELEASE",
    "SETTLE",
    "STAGE_CONNECT",
    "STAGE_POOL",
    "STAGE_RUN",
    "ConnectionTask",
    "bound_checkout_wait",
    "bound_sockets",
    "pg_socket_options",
]

T = TypeVar("T")

#: After the deadline, seconds a running statement is given to end by itself (the server's
#: statement_timeout fires at about the deadline) before its socket is shut down.
SETTLE = 0.15
#: After the socket is shut down, seconds the worker is given to let go of the connection.
RELEASE = 0.2

#: How long past the deadline a fan-out task's wait for a free pooled connection may last.
CHECKOUT_MARGIN = 0.05

STAGE_POOL = "waiting for a pooled connection"
STAGE_CONNECT = "connecting"
STAGE_RUN = "running the statement"

_current = threading.local()  # .task: the ConnectionTask whose checkout this thread is doing


def _checkout_wait(configured: float) -> float:
    """How long a checkout in the calling thread waits for a free connection: ``pool_timeout``
    (``configured``) unless the thread is a fan-out task's checkout with less time left."""
    task: ConnectionTask[Any] | None = getattr(_current, "task", None)
    left = None if task is None else task.remaining()
    if left is None or left + CHECKOUT_MARGIN >= configured:
        return configured
    # a little past the deadline: the fan-out, which stops waiting at the deadline, says so
    return left + CHECKOUT_MARGIN


_bounded_classes: dict[type[Any], type[Any]] = {}
_bounded_lock = threading.Lock()


def bound_checkout_wait(engine: Engine) -> bool:
    """Make a fan-out task's checkout from ``engine``'s pool wait at most the time left.

    Applies to a ``QueuePool`` (the default pool of PostgreSQL and MySQL engines, kept by
    ``engine.dispose()``): its class becomes a subclass whose wait reads the deadline of the
    task checking out in the calling thread (:func:`_checkout_wait`); every other checkout
    waits as long as it did.  Other pools do not wait for a free connection.
    Returns whether the engine's checkouts are bounded.
    """
    pool = engine.pool
    if not _sqla.waits_for_checkout(pool):
        return False
    cls = type(pool)
    if cls in _bounded_classes.values():
        return True
    with _bounded_lock:
        bounded = _bounded_classes.get(cls)
        if bounded is None:
            bounded = _sqla.pool_with_checkout_wait(cls, _checkout_wait)
            _bounded_classes[cls] = bounded
        if type(pool) is cls:
            pool.__class__ = bounded
    return True


class _Interrupter:
    """Stops a call blocked on one DBAPI connection, from another thread, without blocking.

    For a driver whose connection has ``fileno()`` (psycopg2, psycopg) or a Python socket
    (PyMySQL's ``_sock``): a duplicate of the socket's descriptor, taken while the connection
    is known to be open, so a shutdown can never reach another socket that reused the number.
    sqlite3: ``interrupt()``.  Other drivers: nothing (``possible`` is False).
    """

    __slots__ = ("_dbapi", "_sock")

    def __init__(self, dbapi: Any) -> None:
        self._dbapi = dbapi
        self._sock: socket.socket | None = None
        if hasattr(dbapi, "interrupt"):
            return
        fileno = getattr(dbapi, "fileno", None)
        if not callable(fileno):
            sock = getattr(dbapi, "_sock", None)  # PyMySQL
            fileno = sock.fileno if isinstance(sock, socket.socket) else None
        if fileno is not None:
            with contextlib.suppress(Exception):
                fd = os.dup(fileno())
                try:
                    self._sock = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)

    @property
    def possible(self) -> bool:
        return self._sock is not None or hasattr(self._dbapi, "interrupt")

    def interrupt(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        elif hasattr(self._dbapi, "interrupt"):  # sqlite3: aborts the running statement
            with contextlib.suppress(Exception):
                self._dbapi.interrupt()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()  # our duplicate only; the driver's descriptor stays open
            self._sock = None


class ConnectionTask(Generic[T]):
    """One shard's work on a connection, under the fan-out deadline (a ``ShardTask``).

    :param alias: the shard, for messages.
    :param body: ``body(connection, seconds_left)`` does the work.
    :param held: the connection the caller already holds for the shard (no checkout), or
        ``None`` to get one with ``checkout``.
    :param checkout: gets a connection (pool checkout, maybe a connect).  It may block; it runs
        in the worker and is abandoned at the deadline.
    :param adopt: hands a checked-out connection to its owner (the session) and returns the
        connection to run on.  Called with the task's lock held, so it never runs once
        ``cancel()`` has returned; a connection that arrives later is closed (back to its pool).

    ``checkout`` is usually an engine's ``connect``: that engine's pool then waits at most the
    time left (:func:`bound_checkout_wait`), and the task's ``lane`` is the engine.

    :ivar stage: what the task is doing (``STAGE_POOL``, ``STAGE_CONNECT``, ``STAGE_RUN``) or,
        after a failed checkout, ``"cannot connect"`` / ``"no connection from the pool"``.
    """

    def __init__(
        self,
        alias: str,
        body: Callable[[Connection, float | None], T],
        *,
        held: Connection | None = None,
        checkout: Callable[[], Connection] | None = None,
        adopt: Callable[[Connection], Connection] | None = None,
    ) -> None:
        if held is None and checkout is None:
            raise ValueError("ConnectionTask needs a held connection or a checkout")
        self.alias = alias
        self.stage: str | None = None
        engine = held.engine if held is not None else getattr(checkout, "__self__", None)
        self._engine = engine if isinstance(engine, Engine) else None
        #: What the executor counts this task's abandoned workers against: its engine.
        self.lane: Any = self._engine if self._engine is not None else alias
        self._body = body
        self._held = held
        self._checkout = checkout
        self._adopt = adopt
        self._lock = threading.Lock()
        self._cancelled = False
        self._interrupted = False
        self._interrupter: _Interrupter | None = None
        self._done = threading.Event()
        self._deadline_at: float | None = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (``None``: no deadline)."""
        return None if self._deadline_at is None else max(0.0, self._deadline_at - time.monotonic())

    def run(self, remaining_seconds: float | None) -> T:
        if remaining_seconds is not None:
            self._deadline_at = time.monotonic() + remaining_seconds
        try:
            conn = self._held if self._held is not None else self._connect()
            with self._lock:
                if self._cancelled:
                    raise TimeoutError(f"shard {self.alias!r} was cancelled before its statement ran")
                self.stage = STAGE_RUN
                with contextlib.suppress(Exception):  # an invalidated connection: body says so
                    self._interrupter = _Interrupter(_sqla.dbapi_connection(conn))
            try:
                return self._body(conn, self.remaining())
            finally:
                with self._lock:
                    interrupted = self._interrupted
                    if self._interrupter is not None:
                        self._interrupter.close()
                        self._interrupter = None
                if interrupted and not conn.invalidated:
                    # Its socket was shut down, even if the statement got through first: the
                    # connection is dead, and its pool must not get it back.
                    with contextlib.suppress(Exception):
                        conn.invalidate()
        finally:
            self._done.set()

    def _connect(self) -> Connection:
        assert self._checkout is not None
        with self._lock:
            if self._cancelled:
                raise TimeoutError(f"shard {self.alias!r} was cancelled before it connected")
            self.stage = STAGE_POOL
        if self._engine is not None:
            bound_checkout_wait(self._engine)
        _current.task = self
        try:
            raw = self._checkout()
        except sa_exc.TimeoutError as exc:
            if self._deadline_at is not None and time.monotonic() >= self._deadline_at:
                # the wait was cut to the time left: the deadline passed, not pool_timeout
                raise TimeoutError(
                    f"shard {self.alias!r} did not answer within the deadline ({STAGE_POOL}: none was free in time)"
                ) from exc
            self.stage = "no connection from the pool"
            raise
        except BaseException:
            self.stage = "cannot connect"
            raise
        finally:
            _current.task = None
        with self._lock:
            if not self._cancelled:
                try:
                    return raw if self._adopt is None else self._adopt(raw)
                except BaseException:
                    with contextlib.suppress(Exception):
                        raw.close()
                    raise
        with contextlib.suppress(Exception):
            raw.close()  # the caller stopped waiting: back to the pool, unused
        raise TimeoutError(f"shard {self.alias!r}: connected after the fan-out gave up; connection returned")

    def cancel(self) -> None:
        """Stop the task; returns once it no longer touches the caller's session (bounded:
        at most :data:`SETTLE` + :data:`RELEASE` seconds, never blocking on the network).

        A running statement is first given :data:`SETTLE` seconds to end by itself (at the
        deadline PostgreSQL's ``statement_timeout`` stops it; after another shard failed, a
        quick statement finishes) -- its connection then stays usable; only then is the socket
        shut down, and the connection invalidated.
        """
        with self._lock:
            self._cancelled = True
            interrupter = self._interrupter if self.stage == STAGE_RUN else None
            possible = interrupter is not None and interrupter.possible
        if not possible:
            return  # not started, abandoned in its checkout, done, or a driver we cannot stop
        if self._done.wait(SETTLE):
            return  # ended by itself: at the deadline the server stopped it (statement_timeout)
        with self._lock:
            if self._interrupter is None:
                return  # finished meanwhile
            self._interrupted = True
            self._interrupter.interrupt()
        self._done.wait(RELEASE)


# ----------------------------------------------------------------------------- socket bounds


def pg_socket_options(deadline: float | None) -> dict[str, int]:
    """libpq connection settings that bound a socket, derived from a deadline.

    ``span`` is twice the deadline, at least 10 s: a connect gives up after ``span``, a
    connection whose peer stops acknowledging data is dropped after ``span``
    (``tcp_user_timeout``), and an idle one whose peer vanished after about ``span`` (TCP
    keepalives).  These bound work outside a fan-out; a fan-out's own deadline is held by
    :class:`ConnectionTask`, far sooner.

    >>> pg_socket_options(None)["tcp_user_timeout"], pg_socket_options(30)["connect_timeout"]
    (10000, 60)
    """
    span = 10.0 if deadline is None else max(10.0, 2.0 * deadline)
    return {
        "connect_timeout": math.ceil(span),
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(span / 2)),
        "keepalives_interval": max(1, math.ceil(span / 10)),
        "keepalives_count": 3,
        "tcp_user_timeout": math.ceil(span * 1000),
    }


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _on_connect(
    default_deadline: Callable[[], float | None] | None,
    user_timeout_ok: bool,
    cargs: Any,
    cparams: dict[str, Any],
) -> None:
    task = getattr(_current, "task", None)
    if task is not None:  # a fan-out's worker: its checkout had to connect
        task.stage = STAGE_CONNECT
    if default_deadline is None:  # not psycopg2
        return
    if "dsn" not in cparams and not cargs:  # settings the user gave (URL query, OPTIONS) win
        for key, value in pg_socket_options(default_deadline()).items():
            if key != "tcp_user_timeout" or user_timeout_ok:
                cparams.setdefault(key, value)
    left = task.remaining() if task is not None else None
    if left is not None:  # the connect counts against the fan-out's deadline
        bound = max(2, math.ceil(left))  # libpq's minimum is 2 s
        configured = _as_int(cparams.get("connect_timeout"))
        if configured <= 0 or bound < configured:
            cparams["connect_timeout"] = bound


def bound_sockets(engine: Engine, default_deadline: Callable[[], float | None]) -> None:
    """Give the new psycopg2 connections of ``engine`` bounded sockets (see :func:`pg_socket_options`).

    Keys already set (in the URL's query or the alias's ``OPTIONS``) are kept.  Inside a
    fan-out, ``connect_timeout`` is also cut to the time left.  Every driver: a fan-out task
    whose checkout has to connect says so (``stage``).

    :param default_deadline: returns the cluster's default deadline when a connection is made.
    """
    psycopg2 = engine.dialect.driver == "psycopg2"
    user_timeout_ok = False
    if psycopg2:
        with contextlib.suppress(Exception):  # a psycopg2 without libpq_version(): no tcp_user_timeout
            user_timeout_ok = engine.dialect.loaded_dbapi.extensions.libpq_version() >= 120000
    deadline_of = default_deadline if psycopg2 else None

    def on_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        _on_connect(deadline_of, user_timeout_ok, cargs, cparams)

    event.listen(engine, "do_connect", on_connect)
