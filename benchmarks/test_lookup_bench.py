"""Lookup indexes (issue 15): what a lookup costs on reads and writes, as paired ratios.

Data: the fan-out benchmark's ``pg_world`` (4 PostgreSQL shards, ``SHARDKIT_BENCH_USERS``
users per shard on average, 100k by default), imported, not copied.  ``LookupUser`` maps the
same ``bench_users`` table with a unique lookup on ``name`` (``"user<id>"``, unique like an
e-mail), backfilled once; both the lookup read and the fan-out read get the same index on
``name`` on every shard, so the fan-out is today's best for that read.

Figures (targets from the issue), each the median of per-round ratios; in a round every
peer runs the same operations back to back, in a rotating order:

* read by the lookup column (one row) / read by the shard key: <= 1.3x
* fan-out read by ``name`` (no lookup) / read by the lookup column: >= 3x
* insert of one user with one unique lookup / without: <= 1.6x
* ``add_all`` of ``SHARDKIT_BENCH_ADD_ALL`` users (100k) with one lookup / without: <= 2.0x

Run: ``pytest benchmarks/test_lookup_bench.py -p no:cacheprovider -s`` (the table is printed at the end).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, delete, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_fanout_bench import SHARDS, BenchUser, PgWorld, pg_world

import shardkit.lookups

__all__ = ["pg_world"]

ROUNDS = int(os.environ.get("SHARDKIT_BENCH_ROUNDS", "15"))
OPS = int(os.environ.get("SHARDKIT_BENCH_OPS", "40"))  # operations of each peer per round
ADD_ALL = int(os.environ.get("SHARDKIT_BENCH_ADD_ALL", "100000"))

_FIGURES: list[tuple[str, float, float, str, bool]] = []  # (figure, paired ratio, ratio of medians, target, met)
_NOTES: list[str] = []


class LkBase(DeclarativeBase):
    pass


class LookupUser(LkBase):
    """``bench_users`` with a unique lookup on ``name``."""

    __tablename__ = "bench_users"
    __shard_key__ = "id"
    __lookups__ = {"name": {"unique": True}}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int]
    country: Mapped[str] = mapped_column(String(2))


class WriteWith(LkBase):
    __tablename__ = "lk_bench_with"
    __shard_key__ = "id"
    __lookups__ = {"email": {"unique": True}}

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    name: Mapped[str] = mapped_column(String(40))


class WriteWithout(LkBase):
    __tablename__ = "lk_bench_without"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    name: Mapped[str] = mapped_column(String(40))


NAME = shardkit.lookups.lookup_for("LookupUser.name")


@pytest.fixture(scope="module")
def world(pg_world: PgWorld, request: pytest.FixtureRequest) -> Iterator[PgWorld]:
    cluster = pg_world.cluster
    started = time.perf_counter()
    for alias in SHARDS:
        with cluster.engine(alias).begin() as conn:
            conn.execute(text("CREATE INDEX IF NOT EXISTS bench_users_name_idx ON bench_users (name)"))
    tables = [
        NAME.table,
        WriteWith.__table__,
        WriteWithout.__table__,
        shardkit.lookups.lookup_for("WriteWith.email").table,
    ]
    for alias in SHARDS:
        LkBase.metadata.create_all(cluster.engine(alias), tables=tables)
    shardkit.lookups.backfill(cluster, NAME, batch=10_000, restart=True)
    for alias in SHARDS:
        with cluster.engine(alias).connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"VACUUM ANALYZE {NAME.table.name}"))
    _NOTES.append(f"setup: name index + backfill of {NAME.label} in {time.perf_counter() - started:.1f}s")
    request.config.pluginmanager.register(_Summary(), "shardkit-lookup-figures")
    yield pg_world


class _Summary:
    """Prints the figures table at the end of the run (a plugin registered by ``world``)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        terminalreporter.section("lookup figures (median of per-round paired ratios)")
        write(f"{'figure':<60} {'paired':>8} {'medians':>8}  target  met")
        for name, ratio, of_medians, target, met in _FIGURES:
            write(f"{name:<60} {ratio:7.3f}x {of_medians:7.3f}x  {target:<6}  {'yes' if met else 'NO'}")
        for note in _NOTES:
            write(f"note: {note}")


def _paired(peers: dict[str, Callable[[int], Any]], rounds: int = ROUNDS, ops: int = OPS) -> dict[str, float]:
    """Per-round time of each peer (``ops`` calls each, back to back, rotating order): the medians of
    every peer's ratio to the first peer, plus each peer's median time per call."""
    names = list(peers)
    times: dict[str, list[float]] = {n: [] for n in names}
    counter = 0
    for _ in range(2):  # untimed warm-up
        for name in names:
            for _ in range(3):
                counter += 1
                peers[name](counter)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(ops):
                counter += 1
                peers[name](counter)
            times[name].append((time.perf_counter() - start) / ops)
    base = names[0]
    out = {f"ratio:{n}": statistics.median(t / b for t, b in zip(times[n], times[base], strict=True)) for n in names}
    out.update({f"median:{n}": statistics.median(times[n]) for n in names})
    return out


def _record(name: str, ratio: float, target: str, of_medians: float | None = None) -> None:
    """A figure: met or not by the paired ratio (the ratio of the two medians is shown beside it)."""
    op, bound = target[:2], float(target[2:].rstrip("x"))
    met = ratio <= bound if op == "<=" else ratio >= bound
    _FIGURES.append((name, ratio, ratio if of_medians is None else of_medians, target, met))


def test_read_by_lookup_column(world: PgWorld) -> None:
    cluster = world.cluster
    total = 4 * world.n
    rnd = random.Random(7)
    keys = [rnd.randint(1, total) for _ in range(ROUNDS * OPS * 4 + 200)]

    def by_key(i: int) -> Any:
        k = keys[i % len(keys)]
        with cluster.session() as s:
            return s.scalars(select(LookupUser).where(LookupUser.id == k)).one()

    def by_lookup(i: int) -> Any:
        k = keys[i % len(keys)]
        with cluster.session() as s:
            return s.scalars(select(LookupUser).where(LookupUser.name == f"user{k}")).one()

    def by_key_no_lookup(i: int) -> Any:  # the same table through a model with no lookup
        k = keys[i % len(keys)]
        with cluster.session() as s:
            return s.scalars(select(BenchUser).where(BenchUser.id == k)).one()

    def by_fanout(i: int) -> Any:
        k = keys[i % len(keys)]
        with cluster.session() as s:
            return s.scalars(select(BenchUser).where(BenchUser.name == f"user{k}")).one()

    with cluster.session() as s:  # the three give one and the same row
        k = keys[0]
        a = s.scalars(select(LookupUser).where(LookupUser.id == k)).one()
        b = s.scalars(select(LookupUser).where(LookupUser.name == f"user{k}")).one()
        assert a is b
        assert s.scalars(select(BenchUser).where(BenchUser.name == f"user{k}")).one().id == k
        assert "lookup step" in s.explain(select(LookupUser).where(LookupUser.name == f"user{k}"))
    got = _paired({"key": by_key, "lookup": by_lookup, "fanout": by_fanout, "key_plain": by_key_no_lookup})
    _record(
        "read one row: by lookup column / by shard key",
        got["ratio:lookup"],
        "<=1.3x",
        got["median:lookup"] / got["median:key"],
    )
    _record(
        "read one row: today's fan-out / by lookup column",
        got["ratio:fanout"] / got["ratio:lookup"],
        ">=3x",
        got["median:fanout"] / got["median:lookup"],
    )
    _record(
        "read one row: by lookup column / by shard key of a model without lookups",
        got["ratio:lookup"] / got["ratio:key_plain"],
        "<=1.3x",
        got["median:lookup"] / got["median:key_plain"],
    )
    _NOTES.append(
        "read medians per call: key {:.0f} us (model without lookups {:.0f} us), lookup {:.0f} us, "
        "fan-out {:.0f} us".format(
            got["median:key"] * 1e6,
            got["median:key_plain"] * 1e6,
            got["median:lookup"] * 1e6,
            got["median:fanout"] * 1e6,
        )
    )


def test_insert_one_user(world: PgWorld) -> None:
    cluster = world.cluster
    base = 10_000_000_000

    def without(i: int) -> None:
        with cluster.session() as s:
            s.add(WriteWithout(id=base + i, email=f"w{i}@x.org", name="n"))
            s.commit()

    def with_lookup(i: int) -> None:
        with cluster.session() as s:
            s.add(WriteWith(id=base + i, email=f"w{i}@x.org", name="n"))
            s.commit()

    got = _paired({"without": without, "with": with_lookup})
    _record(
        "insert one user: with one unique lookup / without",
        got["ratio:with"],
        "<=1.6x",
        got["median:with"] / got["median:without"],
    )
    _NOTES.append(
        "insert medians per call: without {:.0f} us, with {:.0f} us".format(
            got["median:without"] * 1e6, got["median:with"] * 1e6
        )
    )


def _clear(cluster: Any) -> None:
    email = shardkit.lookups.lookup_for("WriteWith.email").table
    for alias in SHARDS:
        with cluster.engine(alias).begin() as conn:
            for table in (WriteWith.__table__, WriteWithout.__table__, email):
                conn.execute(delete(table))


def test_add_all_users(world: PgWorld) -> None:
    cluster = world.cluster
    ratios = []
    timings: dict[str, list[float]] = {"without": [], "with": []}
    for r in range(int(os.environ.get("SHARDKIT_BENCH_ADD_ALL_PAIRS", "2"))):
        order = [WriteWithout, WriteWith] if r % 2 == 0 else [WriteWith, WriteWithout]
        took: dict[str, float] = {}
        for model in order:
            _clear(cluster)
            users = [model(id=20_000_000_000 + i, email=f"a{i}@x.org", name="n") for i in range(ADD_ALL)]
            start = time.perf_counter()
            with cluster.session() as s:
                s.add_all(users)
                s.commit()
            took["with" if model is WriteWith else "without"] = time.perf_counter() - start
        ratios.append(took["with"] / took["without"])
        for k, v in took.items():
            timings[k].append(v)
    _clear(cluster)
    _record(
        f"add_all {ADD_ALL} users: with one unique lookup / without",
        statistics.median(ratios),
        "<=2.0x",
        statistics.median(timings["with"]) / statistics.median(timings["without"]),
    )
    _NOTES.append(
        f"add_all {ADD_ALL}: without {statistics.median(timings['without']):.1f}s, "
        f"with {statistics.median(timings['with']):.1f}s (pairs: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
