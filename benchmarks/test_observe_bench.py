"""Metrics and traces on (issue 16): what the listener API and OpenTelemetry cost a routed point read.

Two clusters over the same 4 local PostgreSQL shards (``SHARDKIT_BENCH_OBSERVE_USERS`` users,
default 5_000), one with nothing watching, one with a :class:`shardkit.observe.MetricsListener`
and :func:`shardkit.otel.instrument` both on.  The tracer provider is a real OpenTelemetry SDK
``TracerProvider`` with a ``SimpleSpanProcessor`` over an ``InMemorySpanExporter`` (every span
is ended, processed and exported in the thread that ran the statement: the most a span costs
in-process; a ``BatchSpanProcessor`` moves only the export to its thread), cleared after each
round.

A round is ``OPS`` routed point reads (``session.scalars(select(U).where(U.id == k)).one()``,
one fresh session per round); the sides alternate, the one that goes first alternating too,
and the figure is the median of the per-round ratios (on / off).  The same is shown on SQLite
files (no target: a SQLite read costs a few tens of microseconds, so the same absolute cost is
a larger share).

Target: routed point read with metrics + OTel on / off <= 1.10.

Run: ``pytest benchmarks/test_observe_bench.py -p no:cacheprovider -s --benchmark-disable``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import BigInteger, String, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
import shardkit.otel
from shardkit.observe import MetricsListener
from tests.conftest import PG_URL, DatabaseFactory, require_server

N = int(os.environ.get("SHARDKIT_BENCH_OBSERVE_USERS", "5000"))
ROUNDS = int(os.environ.get("SHARDKIT_BENCH_ROUNDS", "21"))
OPS = int(os.environ.get("SHARDKIT_BENCH_OPS", "200"))
SHARDS = ["o0", "o1", "o2", "o3"]
KEYS = list(range(1, N + 1, max(1, N // OPS)))[:OPS]
_FIGURES: list[tuple[str, float, float, float, str]] = []  # (figure, median ratio, off ms, on ms, target)


class Base(DeclarativeBase):
    pass


class OUser(Base):
    __tablename__ = "obs_bench_users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


def _clusters(backend: str, factory: DatabaseFactory) -> tuple[shardkit.Cluster, shardkit.Cluster, Any]:
    urls = factory.urls(backend, "default", *SHARDS)
    ring = shardkit.HashRing(SHARDS)
    off = shardkit.Cluster(urls, routers=[shardkit.HashRingRouter(ring)])
    off.create_all(Base)
    with off.session() as s:
        s.execute(insert(OUser), [{"id": i, "name": f"user{i}"} for i in range(1, N + 1)])
        s.commit()
    on = shardkit.Cluster(urls, routers=[shardkit.HashRingRouter(ring)])
    for alias in on.aliases:
        on.engine(alias)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    on.add_listener(MetricsListener())
    tracing = shardkit.otel.instrument(on, tracer_provider=provider)
    return off, on, (exporter, tracing)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, shardkit.Cluster, shardkit.Cluster, Any]]:
    backend: str = request.param
    if backend == "postgresql":
        require_server(PG_URL, "pg")
    factory = DatabaseFactory(Path(tmp_path_factory.mktemp(f"observe_{backend}")))
    off = on = None
    try:
        off, on, exporter = _clusters(backend, factory)
        yield backend, off, on, exporter
    finally:
        for c in (off, on):
            if c is not None:
                c.dispose()
        factory.drop_all()


def _reads(cluster: shardkit.Cluster, tracing: Any = None) -> Callable[[], None]:
    def run() -> None:
        with cluster.session() as s:
            for k in KEYS:
                s.scalars(select(OUser).where(OUser.id == k)).one()
        if tracing is not None:
            tracing.flush()  # nothing to wait for: the spans were made in this thread

    return run


def test_point_read_with_metrics_and_otel(benchmark: Any, setup: Any) -> None:
    backend, off, on, (exporter, tracing) = setup
    benchmark.group = f"routed point read, metrics + OTel on vs off ({backend})"
    off_run, on_run = _reads(off), _reads(on, tracing)
    off_times: list[float] = []
    on_times: list[float] = []

    def rounds() -> None:
        off_run()
        on_run()  # warm-up: pools, compiled statements
        exporter.clear()
        for i in range(ROUNDS):
            order = (off_run, on_run) if i % 2 == 0 else (on_run, off_run)
            for side in order:
                t0 = time.perf_counter()
                side()
                (on_times if side is on_run else off_times).append(time.perf_counter() - t0)
            assert len(exporter.get_finished_spans()) >= OPS  # a span per read, really made
            exporter.clear()

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    ratio = statistics.median(o / f for o, f in zip(on_times, off_times, strict=True))
    per_op = 1000 / OPS
    _FIGURES.append(
        (
            f"point read, metrics+OTel on / off ({backend})",
            ratio,
            statistics.median(off_times) * per_op,
            statistics.median(on_times) * per_op,
            "<= 1.10" if backend == "postgresql" else "(info)",
        )
    )
    if backend == "postgresql":
        assert ratio <= 1.10 * 1.5, f"far above the target: {ratio:.3f}"  # the figure itself is reported


def teardown_module() -> None:
    if not _FIGURES:
        return
    print("\n\nshardkit observe figures (median of paired per-round ratios)")
    print(f"{'figure':<48} {'ratio':>7} {'off ms/read':>12} {'on ms/read':>12}  target")
    for name, ratio, off_ms, on_ms, target in _FIGURES:
        print(f"{name:<48} {ratio:7.3f} {off_ms:12.4f} {on_ms:12.4f}  {target}")
