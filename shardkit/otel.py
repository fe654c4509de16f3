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
``db.system`` (``postgresql``, ``sqlite``, ``mysql``, ``mariadb``; one attribute per span costs
about a microsecond and a half, so the newer duplicate name ``db.system.name`` is left out),
``db.namespace`` (the database name), ``db.operation.name`` (``SELECT`` ...), ``db.collection.name``
(the table), ``db.query.text`` (the SQL with its placeholders, never the values; off with
``statement_text=False``), ``db.response.returned_rows``, ``error.type`` on failure;
``shardkit.alias``; on a fan-out ``shardkit.fanout.width``, ``shardkit.fanout.rows``,
``shardkit.fanout.merge_ms``, ``shardkit.fanout.slowest_ms``, ``shardkit.fanout.partial``,
``shardkit.fanout.scatter``, ``shardkit.fanout.failed_shards``.

This module imports ``opentelemetry`` only when it is imported itself; shardkit never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .observe import FanoutEvent, Listener, StatementEvent, add_listener, listeners_of, remove_listener

if TYPE_CHECKING:
    from ._cluster import Cluster

__all__ = ["TracingListener", "instrument", "uninstrument"]

_SYSTEMS = {"postgresql": "postgresql", "sqlite": "sqlite", "mysql": "mysql", "mariadb": "mariadb"}


class TracingListener(Listener):
    """The :mod:`shardkit.observe` listener that turns events into OpenTelemetry spans."""

    def __init__(self, cluster: Cluster, tracer_provider: Any = None, *, statement_text: bool = True) -> None:
        from . import __version__

        self.tracer = trace.get_tracer("shardkit", __version__, tracer_provider=tracer_provider)
        self.statement_text = statement_text
        self._base: dict[str, dict[str, Any]] = {}
        self._cache: dict[tuple[str, str, str | None], dict[str, Any]] = {}
        for alias in cluster.aliases:
            spec = cluster.spec(alias)
            system = _SYSTEMS.get(spec.dialect_name, spec.dialect_name)
            attrs: dict[str, Any] = {"db.system": system, "shardkit.alias": alias}
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

    def flush(self, timeout: float | None = None) -> bool:
        """Spans are made and ended in the thread that ran the statement: nothing to wait for
        here (a ``BatchSpanProcessor`` has its own ``force_flush``)."""
        return True

    def on_statement(self, event: StatementEvent) -> None:
        if event.in_fanout:  # the fan-out's shard spans stand for these
            return
        attrs = self._attributes(event.alias, event.kind, event.table)
        if (self.statement_text and event.sql) or event.rows is not None:
            attrs = attrs.copy()
            if self.statement_text and event.sql:
                attrs["db.query.text"] = event.sql
            if event.rows is not None:
                attrs["db.response.returned_rows"] = event.rows
        span = self.tracer.start_span(
            _name(event.kind, event.table),
            kind=SpanKind.CLIENT,
            attributes=attrs,
            start_time=event.start_ns,
            record_exception=False,
            set_status_on_exception=False,
        )
        if event.error is not None:
            _failed(span, event.error)
        span.end(end_time=event.start_ns + int(event.seconds * 1e9))

    def on_fanout(self, event: FanoutEvent) -> None:
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
            kind=SpanKind.INTERNAL,
            attributes=attrs,
            start_time=event.start_ns,
        )
        context = trace.set_span_in_context(parent)
        for alias, timing in event.shards.items():
            child_attrs = dict(self._attributes(alias, "select", event.table))
            if timing.rows is not None:
                child_attrs["db.response.returned_rows"] = timing.rows
            start = timing.start_ns or event.start_ns
            child = self.tracer.start_span(
                _name("select", event.table),
                context=context,
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


_NAMES: dict[tuple[str, str | None], str] = {}


def _name(kind: str, table: str | None) -> str:
    """``SELECT users``: the span name the database semantic conventions give."""
    name = _NAMES.get((kind, table))
    if name is None:
        op = kind.upper()
        name = f"{op} {table}" if table else op
        if len(_NAMES) < 4096:
            _NAMES[(kind, table)] = name
    return name


def _failed(span: Any, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, str(error).splitlines()[0] if str(error) else type(error).__name__))
    span.set_attribute("error.type", type(error).__qualname__)
    span.record_exception(error)


def instrument(cluster: Cluster, tracer_provider: Any = None, *, statement_text: bool = True) -> TracingListener:
    """Trace ``cluster``'s statements and fan-outs (see the module docstring); returns the
    listener (also a normal :mod:`shardkit.observe` listener).  Instrumenting twice replaces
    the first."""
    uninstrument(cluster)
    listener = TracingListener(cluster, tracer_provider, statement_text=statement_text)
    add_listener(cluster, listener)
    return listener


def uninstrument(cluster: Cluster) -> None:
    """Stop tracing ``cluster`` (nothing happens if it was not traced)."""
    for listener in listeners_of(cluster):
        if isinstance(listener, TracingListener):
            remove_listener(cluster, listener)
