"""Read the next batch of a streamed shard result while the merge works on this one.

A fan-out with ``yield_per`` streams every shard through a server-side cursor; the merge
asks each stream for a batch when it has used up the last one.  Reading that batch is a
round trip (on the first one, the shard also sorts its rows), and in the calling thread the
merge would wait for it.  :func:`prefetch` puts a :class:`PrefetchingCursor` between the
result and its driver cursor: as soon as a batch is handed over, the next one is fetched in
one of the fan-out's worker threads (:func:`~shardkit.fanout._execute.run_in_background`),
so the shards' work and the network overlap the merge's Python.

The driver cursor is only ever used by one thread at a time: a fetch in the background is
started after the previous one ended and before the caller waits for it, and ``close()``
waits for a fetch still running before it closes the cursor.  Only for drivers whose
connection may be used from another thread (psycopg2: :data:`THREAD_SAFE_DRIVERS`).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from typing import Any

from .. import _sqla
from ._execute import run_in_background

__all__ = ["THREAD_SAFE_DRIVERS", "PrefetchingCursor", "prefetch"]

#: Drivers whose connections may be used by another thread, one thread at a time.
THREAD_SAFE_DRIVERS = frozenset({"psycopg2"})


class PrefetchingCursor:
    """A DBAPI cursor that serves rows from batches fetched one ahead, in the background.

    :param cursor: the driver's cursor (a server-side cursor, positioned after the rows the
        result has already buffered).
    :param batch: rows per background fetch (the statement's ``yield_per``).
    """

    def __init__(self, cursor: Any, batch: int) -> None:
        self._cursor = cursor
        self._batch = max(1, batch)
        self._rows: list[Any] = []
        self._at = 0
        self._pending: Future[list[Any]] | None = None
        self._done = False
        self._ahead()

    def __getattr__(self, name: str) -> Any:  # description, rowcount, arraysize ...
        return getattr(self._cursor, name)

    def _ahead(self) -> None:
        if not self._done and self._pending is None:
            cursor, batch = self._cursor, self._batch
            self._pending = run_in_background(lambda: list(cursor.fetchmany(batch)))

    def _take(self) -> bool:
        """Wait for the batch being fetched; False at the end of the rows."""
        pending = self._pending
        if pending is None:
            return False
        self._pending = None
        rows = pending.result()  # the driver's error, if any, is raised here
        if len(rows) < self._batch:
            self._done = True
        else:
            self._ahead()
        self._rows = rows
        self._at = 0
        return bool(rows)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        size = self._batch if size is None else size
        out: list[Any] = []
        while len(out) < size:
            left = len(self._rows) - self._at
            if not left:
                if not self._take():
                    break
                continue
            n = min(left, size - len(out))
            if not out and n == len(self._rows) and self._at == 0:
                out = self._rows  # the whole batch, as fetched
            else:
                out.extend(self._rows[self._at : self._at + n])
            self._at += n
        return out

    def fetchone(self) -> Any:
        rows = self.fetchmany(1)
        return rows[0] if rows else None

    def fetchall(self) -> list[Any]:
        out: list[Any] = []
        while True:
            rows = self.fetchmany(self._batch)
            if not rows:
                return out
            out.extend(rows)

    def close(self) -> None:
        pending, self._pending = self._pending, None
        self._done = True
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.result()  # the cursor is the caller's again
        self._cursor.close()


def prefetch(result: Any, batch: int) -> bool:
    """Make the streamed ``result`` (a ``CursorResult``, or an ORM result over one) read its
    driver cursor one batch ahead.  Returns whether it does (an unknown result, a driver not in
    :data:`THREAD_SAFE_DRIVERS`, a result not streamed: no)."""
    cursor_result = _sqla.cursor_result_of(result)
    if cursor_result is None or not _sqla.is_server_side(cursor_result):
        return False
    if cursor_result.dialect.driver not in THREAD_SAFE_DRIVERS:
        return False
    return _sqla.wrap_dbapi_cursor(cursor_result, lambda cursor: PrefetchingCursor(cursor, batch))
