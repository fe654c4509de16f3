"""OpenTelemetry traces for a cluster (``pip install shardkit[otel]``)::

    import shardkit.otel
    shardkit.otel.instrument(cluster)                       # the global tracer provider
    shardkit.otel.instrument(cluster, tracer_provider=tp)   # or this one
    shardkit.otel.uninstrument(cluster)

A span per routed statement (``SELECT users``: kind CLIENT, as OpenTelemetry's database
semantic conventions name them) and per fan-out read (``shardkit.fanout users``) with a child
span per shard (``SELECT users`` on that shard).  Spans are made from
:mod:`shardkit.observe`'s events with the times they measured, under the span current when
the statement ran (a fan-out: when the caller finished reading its rows).

Attributes (OpenTelemetry semantic conventions for databases, v1.26+ names, plus shardkit's):
``db.system.name`` and the older ``db.system`` (``postgresql``, ``sqlite``, ``mysql``, ``mariadb``),
``db.namespace`` (the database name), ``db.operation.name`` (``SELECT`` ...), ``db.collection.name``
(the table), ``db.query.text`` (the SQL with its placeholders, never the values; off with
``statement_text=False``), ``db.response.returned_rows``, ``error.type`` on failure;
``shardkit.alias``; on a fan-out ``shardkit.fanout.width``, ``shardkit.fanout.rows``,
``shardkit.fanout.merge_ms``, ``shardkit.fanout.slowest_ms``, ``shardkit.fanout.partial``,
``shardkit.fanout.scatter``, ``shardkit.fanout.failed_shards``.

This module imports ``opentelemetry`` only when it is imported itself; shardkit never imports it.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanKind, Status, StatusCode

from .observe import FanoutEvent, Listener, StatementEvent, add_listener, listeners_of, remove_listener

if TYPE_CHECKING:
    from ._cluster import Cluster

__all__ = ["TracingListener", "instrument", "uninstrument"]

logger = logging.getLogger(__name__)

_SYSTEMS = {"postgresql": "postgresql", "sqlite": "sqlite", "mysql": "mysql", "mariadb": "mariadb"}


class TracingListener(Listener):
    """The :mod:`shardkit.observe` listener that turns events into OpenTelemetry spans."""

    def __init__(
        self,
        cluster: Cluster,
        tracer_provider: Any = None,
        *,
        statement_text: bool = True,
        background: bool = True,
    ) -> None:
        from . import __version__

        self._queue: queue.SimpleQueue[tuple[Any, Any, Any]] | None = queue.SimpleQueue() if background else None
        self._cond = threading.Condition()
        self._pending = 0
        self._worker: threading.Thread | None = None

        self.tracer = trace.get_tracer("shardkit", __version__, tracer_provider=tracer_provider)
        self.statement_text = statement_text
        self._base: dict[str, dict[str, Any]] = {}
        self._cache: dict[tuple[str, str, str | None], dict[str, Any]] = {}
        for alias in cluster.aliases:
            spec = cluster.spec(alias)
            system = _SYSTEMS.get(spec.dialect_name, spec.dialect_name)
            attrs: dict[str, Any] = {"db.system.name": system, "db.system": system, "shardkit.alias": alias}
            if spec.url.database:
                attrs["db.namespace"] = spec.url.database
            self._base[alias] = attrs

    def _attributes(self, alias: str, kind: str, table: str | None) -> dict[str, Any]:
        """The attributes every span of ``kind`` on ``table`` at ``alias`` has (made once)."""
        key = (alias, kind, table)
        attrs = self._cache.get(key)
        if attrs is None:
            attrs = dict(self._base.get(alias) or {"shardkit.alias": alias})
            attrs["db.operation.name"] = kind.upper()
            if table:
                attrs["db.collection.name"] = table
            if len(self._cache) < 4096:
                self._cache[key] = attrs
        return attrs

    # -- the listener: capture the parent span now, build the spans now or in the background --

    def on_statement(self, event: StatementEvent) -> None:
        if event.in_fanout:  # the fan-out's shard spans stand for these
            return
        if self._queue is None:
            self._statement_span(event, None)
        else:
            self._submit(self._statement_span, event)

    def on_fanout(self, event: FanoutEvent) -> None:
        if self._queue is None:
            self._fanout_spans(event, None)
        else:
            self._submit(self._fanout_spans, event)

    def _submit(self, build: Callable[[Any, Any], None], event: Any) -> None:
        parent = trace.get_current_span().get_span_context()
        queue = self._queue
        assert queue is not None
        with self._cond:
            self._pending += 1
        queue.put((build, event, parent if parent.is_valid else None))
        if self._worker is None or not self._worker.is_alive():
            self._start_worker()

    def _start_worker(self) -> None:
        with self._cond:
            if self._worker is not None and self._worker.is_alive():
                return
            self._worker = threading.Thread(target=self._work, name="shardkit-otel", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            build, event, parent = queue.get()
            try:
                build(event, trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None)
            except Exception:
                logger.exception("shardkit.otel could not make a span")
            finally:
                with self._cond:
                    self._pending -= 1
                    if not self._pending:
                        self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the spans of every event so far were made and ended (handed to the span
        processors); ``False`` if ``timeout`` seconds passed first.  Nothing to wait for with
        ``background=False``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    # -- the spans ------------------------------------------------------------------------------

    def _statement_span(self, event: StatementEvent, context: Any) -> None:
        attrs = self._attributes(event.alias, event.kind, event.table)
        if (self.statement_text and event.sql) or event.rows is not None:
            attrs = dict(attrs)
            if self.statement_text and event.sql:
                attrs["db.query.text"] = event.sql
            if event.rows is not None:
                attrs["db.response.returned_rows"] = event.rows
        span = self.tracer.start_span(
            _name(event.kind, event.table),
            context=context,
            kind=SpanKind.CLIENT,
            attributes=attrs,
            start_time=event.start_ns,
        )
        if event.error is not None:
            _failed(span, event.error)
        span.end(end_time=event.start_ns + int(event.seconds * 1e9))

    def _fanout_spans(self, event: FanoutEvent, context: Any) -> None:
        attrs: dict[str, Any] = {
            "shardkit.fanout.width": event.width,
            "shardkit.fanout.rows": event.rows,
            "shardkit.fanout.merge_ms": event.merge_seconds * 1000,
            "shardkit.fanout.partial": event.partial,
            "shardkit.fanout.scatter": event.scatter,
            "db.operation.name": "SELECT",
        }
        if event.table:
            attrs["db.collection.name"] = event.table
        slowest = event.slowest_seconds
        if slowest is not None:
            attrs["shardkit.fanout.slowest_ms"] = slowest * 1000
        if event.errors:
            attrs["shardkit.fanout.failed_shards"] = list(event.errors)
        parent = self.tracer.start_span(
            f"shardkit.fanout {event.table}" if event.table else "shardkit.fanout",
            context=context,
            kind=SpanKind.INTERNAL,
            attributes=attrs,
            start_time=event.start_ns,
        )
        inner = trace.set_span_in_context(parent)
        for alias, timing in event.shards.items():
            child_attrs = dict(self._attributes(alias, "select", event.table))
            if timing.rows is not None:
                child_attrs["db.response.returned_rows"] = timing.rows
            start = timing.start_ns or event.start_ns
            child = self.tracer.start_span(
                _name("select", event.table),
                context=inner,
                kind=SpanKind.CLIENT,
                attributes=child_attrs,
                start_time=start,
            )
            if timing.error is not None:
                _failed(child, timing.error)
            elif timing.seconds is None:
                child.set_status(Status(StatusCode.ERROR, "no answer"))
            child.end(end_time=start + int((timing.seconds or 0.0) * 1e9))
        if event.error is not None:
            _failed(parent, event.error)
        parent.end(end_time=event.start_ns + int(event.seconds * 1e9))


def _name(kind: str, table: str | None) -> str:
    op = kind.upper()
    return f"{op} {table}" if table else op


def _failed(span: Any, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, str(error).splitlines()[0] if str(error) else type(error).__name__))
    span.set_attribute("error.type", type(error).__qualname__)
    span.record_exception(error)


def instrument(
    cluster: Cluster, tracer_provider: Any = None, *, statement_text: bool = True, background: bool = True
) -> TracingListener:
    """Trace ``cluster``'s statements and fan-outs (see the module docstring); returns the
    listener (also a normal :mod:`shardkit.observe` listener).  Instrumenting twice replaces
    the first.

    :param background: make the spans in a background thread (the parent span is taken in
        the caller's thread, the times are the measured ones); ``False``: in the caller's
        thread, before the statement returns.  ``listener.flush()`` waits for the background.
    """
    uninstrument(cluster)
    listener = TracingListener(cluster, tracer_provider, statement_text=statement_text, background=background)
    add_listener(cluster, listener)
    _LIVE.add(listener)
    return listener


def uninstrument(cluster: Cluster) -> None:
    """Stop tracing ``cluster`` (nothing happens if it was not traced); the spans of what ran
    before are made first."""
    for listener in listeners_of(cluster):
        if isinstance(listener, TracingListener):
            remove_listener(cluster, listener)
            listener.flush(5.0)


_LIVE: weakref.WeakSet[TracingListener] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:  # the background spans of the last statements are not lost
    for listener in list(_LIVE):
        listener.flush(2.0)
