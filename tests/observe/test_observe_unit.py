"""The observe data model on its own: metrics, the scatter decision, the analyze report, OTel spans."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import Column, Integer, MetaData, Table, select

import shardkit
from shardkit import observe
from shardkit.errors import ConfigError, MaxRowsError, ScatterRefusedError, ShardkitError
from shardkit.observe import FanoutEvent, MetricsListener, ShardTiming, StatementEvent
from shardkit.typing import ShardTargets

meta = MetaData()
things = Table("things", meta, Column("id", Integer, primary_key=True), Column("owner_id", Integer))


def test_metrics_listener_counts_per_alias_and_per_fanout() -> None:
    m = MetricsListener()
    m.on_statement(StatementEvent("s0", "things", "select", 1, 0.002))
    m.on_statement(StatementEvent("s0", "things", "insert", 3, 0.004))
    m.on_statement(StatementEvent("s1", "things", "select", None, 0.010, error=RuntimeError("x")))
    assert m.shards["s0"].statements == 2 and m.shards["s0"].rows == 4 and m.shards["s0"].errors == 0
    assert m.shards["s0"].by_kind == {"select": 1, "insert": 1}
    assert m.shards["s1"].errors == 1
    assert m.shards["s0"].latency.max == pytest.approx(0.004)
    assert m.shards["s0"].latency.mean == pytest.approx(0.003)
    ev = FanoutEvent(
        shards={"s0": ShardTiming("s0", 0.01, 5), "s1": ShardTiming("s1", 0.03, 7), "s2": ShardTiming("s2", None)},
        table="things",
        seconds=0.05,
        merge_seconds=0.001,
        rows=12,
        errors={"s2": TimeoutError("late")},
        scatter=True,
    )
    assert ev.width == 3 and ev.partial and ev.slowest is not None and ev.slowest.alias == "s1"
    m.on_fanout(ev)
    snap = m.snapshot()
    assert snap["fanouts"]["count"] == 1 and snap["fanouts"]["partial"] == 1 and snap["fanouts"]["scatter"] == 1
    assert snap["fanouts"]["slowest_shard"]["max"] == pytest.approx(0.03)
    assert snap["fanouts"]["rows"] == 12
    assert snap["shards"]["s1"]["latency"]["count"] == 1
    m.reset()
    assert m.snapshot() == {"shards": {}, "fanouts": MetricsListener().fanouts.as_dict()}


def test_summary_quantiles() -> None:
    s = observe.Summary(window=100)
    for i in range(1, 1001):
        s.add(i / 1000)
    assert s.count == 1000 and s.min == pytest.approx(0.001) and s.max == pytest.approx(1.0)
    assert 0.9 < s.quantile(0.5) <= 1.0  # over the recent window only


def _targets(all_shards: bool, reason: str = "no shard key in the WHERE clause") -> ShardTargets:
    return ShardTargets(
        dict.fromkeys(["s0", "s1", "s2"]),
        reason=reason,
        all_shards=all_shards,
        shard_key_columns=(things.c.owner_id,),
    )


class _Cluster:
    scatter = "allow"
    max_rows = None


class _Session:
    def __init__(self, scatter: str | None = None) -> None:
        self.cluster = _Cluster()
        self.scatter = scatter
        self.max_rows = None


def test_scatter_decision_and_precedence(caplog: pytest.LogCaptureFixture) -> None:
    stmt = select(things).where(things.c.id == 3)
    observe.check_scatter(_Session(), stmt, {}, _targets(True))  # allow: nothing
    with pytest.raises(ScatterRefusedError) as err:
        observe.check_scatter(_Session("refuse"), stmt, {}, _targets(True))
    assert "owner_id" in str(err.value) and "things" in str(err.value) and "SELECT" in str(err.value)
    assert err.value.shard_key == "owner_id" and err.value.aliases == ("s0", "s1", "s2")  # type: ignore[attr-defined]
    assert isinstance(err.value, ShardkitError)
    # the statement's option wins over the session's
    observe.check_scatter(_Session("refuse"), stmt, {"shardkit_scatter": "allow"}, _targets(True))
    with caplog.at_level(logging.WARNING, logger="shardkit.observe"):
        observe.check_scatter(_Session(), stmt, {"shardkit_scatter": "warn"}, _targets(True))
    assert any("every shard" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # not a scatter: some shards only, or shards the caller named
    observe.check_scatter(_Session("refuse"), stmt, {}, _targets(False))
    observe.check_scatter(_Session("refuse"), stmt, {}, _targets(True, reason="shardkit_using"))
    with pytest.raises(ConfigError):
        observe.check_scatter(_Session("never"), stmt, {}, _targets(True))


def test_max_rows_and_scatter_settings_are_checked() -> None:
    assert observe.check_max_rows(None) is None and observe.check_max_rows(5) == 5
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ConfigError):
            observe.check_max_rows(bad)
    assert issubclass(MaxRowsError, shardkit.errors.FanoutError)


def test_analyze_report_format() -> None:
    ev = FanoutEvent(
        shards={"s0": ShardTiming("s0", 0.001, 2), "s1": ShardTiming("s1", 0.004, None)},
        merge_seconds=0.0002,
        rows=5,
    )
    text = observe.format_analyze("fan-out over 2 shards (routers)\n  s0:\n    SELECT 1", ev, 5, 0.006)
    lines = text.splitlines()
    assert lines[0] == "fan-out over 2 shards (routers)"
    assert "analyze: rows=5 time=6.000 ms shards=2" in lines
    assert "  s0: rows=2 time=1.000 ms" in lines
    assert "  s1: rows=? time=4.000 ms (slowest)" in lines
    assert "  merge: 0.200 ms" in lines
    single = observe.format_analyze("single shard: s0\n  SELECT 1", None, 1, 0.0015)
    assert single.endswith("analyze: rows=1 time=1.500 ms")


def test_a_listener_needs_a_method() -> None:
    cluster = shardkit.Cluster({"default": "sqlite://"})
    with pytest.raises(ConfigError):
        observe.add_listener(cluster, object())
    with pytest.raises(ConfigError):
        observe.remove_listener(cluster, MetricsListener())


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_otel_spans_from_events(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    from shardkit import otel

    provider, exporter = spans
    cluster = shardkit.Cluster({"default": "sqlite:///x.db", "s0": "postgresql://u@h/shard0"})
    listener = otel.instrument(cluster, tracer_provider=provider)
    assert observe.listeners_of(cluster) == (listener,)
    listener.on_statement(StatementEvent("s0", "things", "select", 1, 0.002, sql="SELECT ...", start_ns=10**18))
    listener.on_statement(StatementEvent("s0", "things", "select", 1, 0.002, in_fanout=True))  # not a span
    listener.on_statement(StatementEvent("default", "things", "update", None, 0.001, error=ValueError("bad")))
    assert listener.flush(5)
    got = exporter.get_finished_spans()
    assert [s.name for s in got] == ["SELECT things", "UPDATE things"]
    first = got[0]
    assert first.kind is SpanKind.CLIENT
    attrs = dict(first.attributes or {})
    assert attrs["db.system"] == "postgresql" and attrs["db.namespace"] == "shard0"
    assert attrs["shardkit.alias"] == "s0" and attrs["db.collection.name"] == "things"
    assert attrs["db.response.returned_rows"] == 1 and attrs["db.operation.name"] == "SELECT"
    assert first.start_time == 10**18 and first.end_time == 10**18 + 2_000_000
    assert got[1].status.status_code is StatusCode.ERROR and dict(got[1].attributes or {})["error.type"] == "ValueError"
    exporter.clear()
    listener.on_fanout(
        FanoutEvent(
            shards={"default": ShardTiming("default", 0.001, 2, start_ns=5), "s0": ShardTiming("s0", None)},
            table="things",
            seconds=0.01,
            rows=2,
            errors={"s0": TimeoutError("late")},
            start_ns=1,
        )
    )
    assert listener.flush(5)
    got = exporter.get_finished_spans()
    parent = next(s for s in got if s.name == "shardkit.fanout things")
    children = [s for s in got if s is not parent]
    assert len(children) == 2
    assert all(c.parent is not None and c.parent.span_id == parent.context.span_id for c in children)
    pattrs = dict(parent.attributes or {})
    assert pattrs["shardkit.fanout.width"] == 2 and pattrs["shardkit.fanout.partial"] is True
    assert pattrs["shardkit.fanout.failed_shards"] == ("s0",)
    late = next(c for c in children if dict(c.attributes or {})["shardkit.alias"] == "s0")
    assert late.status.status_code is StatusCode.ERROR
    otel.uninstrument(cluster)
    assert observe.listeners_of(cluster) == ()


def test_shardkit_does_not_import_opentelemetry() -> None:
    code = "import sys, shardkit, shardkit.observe; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_otel_span_parent_is_the_callers_span(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    from shardkit import otel

    provider, exporter = spans
    cluster = shardkit.Cluster({"default": "sqlite://"})
    listener = otel.instrument(cluster, tracer_provider=provider)
    with provider.get_tracer("app").start_as_current_span("request") as request:
        listener.on_statement(StatementEvent("default", "things", "select", 1, 0.001, sql="SELECT 1"))
    listener.on_statement(StatementEvent("default", "things", "select", 1, 0.001))  # no parent: a root
    assert listener.flush(5)
    got = {s.name: s for s in exporter.get_finished_spans() if s.name != "request"}
    inner = [s for s in exporter.get_finished_spans() if s.name == "SELECT things"]
    assert len(inner) == 2 and len(got) == 1
    under = [s for s in inner if s.parent is not None]
    assert len(under) == 1 and under[0].parent is not None
    assert under[0].parent.span_id == request.get_span_context().span_id
    assert under[0].context.trace_id == request.get_span_context().trace_id
    otel.uninstrument(cluster)
