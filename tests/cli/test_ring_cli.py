"""shardkit ring show / distribution / diff, and the exact layout arithmetic behind them."""

from __future__ import annotations

import json
import random
import struct
import sys
import uuid
from fractions import Fraction
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, Column, MetaData, Table, create_engine, insert

from shardkit.cli import _ringstats
from shardkit.ring import HashRing, hash_key

from .conftest import assert_one_line_error, parse

RING_SETTINGS = """
from shardkit import HashRing
DATABASES = {urls!r}
SHARDKIT_RING = {ring!r}
"""


def _ring_module(write_settings, ring: HashRing, urls: dict[str, str] | None = None) -> str:
    urls = urls or {"default": "sqlite://", **{a: "sqlite://" for a in ring}}
    return write_settings(RING_SETTINGS.format(urls=urls, ring=ring.to_dict()))


@pytest.mark.parametrize(
    "ring",
    [
        HashRing(["s0", "s1", "s2"], vnodes=40),
        HashRing({"a": 1, "b": 2.5, "c": 0.5}, vnodes=16),
        HashRing(["s0", "s1", "s2"], mode="buckets", buckets=97),
    ],
    ids=["ring", "weighted", "buckets"],
)
def test_exact_layout_matches_lookups(ring: HashRing) -> None:
    """The arc/bucket arithmetic is the ring's own answer, key by key."""
    rng = random.Random(7)
    keys = [rng.getrandbits(63) for _ in range(3000)] + [f"k{i}" for i in range(3000)]
    if ring.mode == "buckets":
        table = _ringstats.bucket_table(ring)
        assert [table[hash_key(k) * ring.buckets >> 32] for k in keys] == ring.get_many(keys)
    else:
        points, owners = _ringstats.layout_points(ring)
        assert [_ringstats.owner_of_hash(points, owners, hash_key(k)) for k in keys] == ring.get_many(keys)
    shares = _ringstats.exact_shares(ring)
    assert sum(shares.values()) == 1
    # the shares are what a large sample sees
    sample = [rng.getrandbits(63) for _ in range(60_000)]
    counts = {a: 0 for a in ring}
    for a in ring.get_many(sample):
        counts[a] += 1
    for alias, share in shares.items():
        assert abs(counts[alias] / len(sample) - float(share)) < 0.01


def test_exact_movement_is_the_truth() -> None:
    old = HashRing(["s0", "s1", "s2"], vnodes=30)
    new = old.copy()
    new.add("s3")
    moves, _ = _ringstats.exact_movement(old, new)
    assert {b for _, b in moves} == {"s3"}  # only towards the new shard
    assert sum(moves.values()) == _ringstats.exact_shares(new)["s3"]
    removed = old.copy()
    removed.remove("s1")
    back, _ = _ringstats.exact_movement(old, removed)
    assert {a for a, _ in back} == {"s1"}
    assert sum(back.values()) == _ringstats.exact_shares(old)["s1"]
    assert _ringstats.bucket_ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]


def test_ring_show(write_settings, run) -> None:
    ring = HashRing({"s0": 1, "s1": 1, "s2": 2}, vnodes=64)
    name = _ring_module(write_settings, ring)
    result = run("ring", "show", "--settings", name, "--json")
    assert result.exit_code == 0, result.output
    data = parse(result)
    assert data["mode"] == "ring" and data["version"] == ring.version and data["vnodes"] == 64
    assert [(s["alias"], s["weight"], s["points"]) for s in data["shards"]] == [
        ("s0", 1, 64),
        ("s1", 1, 64),
        ("s2", 2, 128),
    ]
    assert abs(sum(s["share"] for s in data["shards"]) - 1) < 1e-12
    exact = _ringstats.exact_shares(ring)
    assert [s["share"] for s in data["shards"]] == [float(exact[a]) for a in ring]
    assert data["shards"][2]["ideal"] == 0.5
    text = run("--settings", name, "ring", "show")
    assert text.exit_code == 0 and "share/ideal" in text.stdout and "s2" in text.stdout


def test_ring_show_buckets_from_toml_and_json_file(run, workdir: Path) -> None:
    toml = workdir / "shardkit.toml"
    toml.write_text(
        '[databases]\ndefault = "sqlite://"\ns0 = "sqlite://"\ns1 = "sqlite://"\ns2 = "sqlite://"\n'
        '[ring]\nshards = ["s0", "s1", "s2"]\nmode = "buckets"\nbuckets = 1000\n'
    )
    data = parse(run("ring", "show", "--settings", str(toml), "--json"))
    assert data["buckets"] == 1000
    assert [s["buckets"] for s in data["shards"]] == [334, 333, 333]
    assert [s["share"] for s in data["shards"]] == [0.334, 0.333, 0.333]
    layout = workdir / "ring.json"
    layout.write_text(json.dumps(HashRing(["x", "y"], vnodes=8).to_dict()))
    data = parse(run("ring", "show", "--ring", str(layout), "--json"))
    assert [s["alias"] for s in data["shards"]] == ["x", "y"]


def test_ring_errors(write_settings, run, workdir: Path) -> None:
    no_ring = write_settings("DATABASES = {'default': 'sqlite://'}\n")
    assert_one_line_error(run("ring", "show", "--settings", no_ring), contains="no hash ring")
    name = _ring_module(write_settings, HashRing(["s0", "s1"], vnodes=8))
    assert_one_line_error(run("ring", "diff", "--settings", name, "--remove", "s9"), contains="'s9'")
    assert_one_line_error(run("ring", "diff", "--settings", name, "--add", "s1"), contains="already in the ring")
    usage = run("ring", "diff", "--settings", name)
    assert usage.exit_code == 2 and "exactly one of" in usage.output
    bad = workdir / "bad.json"
    bad.write_text("{nope")
    assert_one_line_error(run("ring", "show", "--ring", str(bad)), contains="not a JSON ring")


@pytest.mark.parametrize("kind", ["int", "uuid", "str"])
def test_distribution_synthetic(write_settings, run, kind: str) -> None:
    ring = HashRing([f"s{i}" for i in range(4)], vnodes=256)
    name = _ring_module(write_settings, ring)
    result = run("ring", "distribution", "--settings", name, "--keys", "20000", "--kind", kind, "--json")
    assert result.exit_code == 0, result.output
    data = parse(result)
    assert data["keys"] == 20000 and sum(s["keys"] for s in data["shards"]) == 20000
    counts = [s["keys"] for s in data["shards"]]
    mean = 20000 / 4
    assert data["peak"] == max(counts) and data["peak_mean"] == pytest.approx(max(counts) / mean)
    assert data["stddev"] == pytest.approx((sum((c - mean) ** 2 for c in counts) / 4) ** 0.5)
    if kind == "int":  # ints 1..N: what the ring says, key by key
        owners = ring.get_many(list(range(1, 20001)))
        assert counts == [owners.count(a) for a in ring]
    text = run("ring", "distribution", "--settings", name, "--keys", "1000")
    assert text.exit_code == 0 and "peak/mean" in text.stdout and "#" in text.stdout


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_distribution_from_file_with_plot(write_settings, run, workdir: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is part of the test extra")
    ring = HashRing(["s0", "s1", "s2"], vnodes=128)
    name = _ring_module(write_settings, ring)
    keys = [str(uuid.UUID(int=i)) for i in range(1, 3001)]
    (workdir / "keys.txt").write_text("\n".join(keys) + "\n")
    png = workdir / "out" / "hist.png"
    png.parent.mkdir()
    result = run(
        "ring", "distribution", "--settings", name, "--from-file", "keys.txt", "--kind", "uuid",
        "--plot", str(png), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = parse(result)
    expected = ring.get_many([uuid.UUID(k) for k in keys])
    assert [s["keys"] for s in data["shards"]] == [expected.count(a) for a in ring]
    assert png.stat().st_size > 1000
    assert _png_size(png) == (800, 450)
    as_str = parse(run("ring", "distribution", "--settings", name, "--from-file", "keys.txt", "--json"))
    assert [s["keys"] for s in as_str["shards"]] == [ring.get_many(keys).count(a) for a in ring]
    (workdir / "bad.txt").write_text("12\nnot-a-number\n")
    assert_one_line_error(
        run("ring", "distribution", "--settings", name, "--from-file", "bad.txt", "--kind", "int"),
        contains="bad.txt:2",
    )
    assert_one_line_error(
        run("ring", "distribution", "--settings", name, "--keys", "10", "--plot", str(workdir / "no" / "x.png")),
        contains="cannot write",
    )


def test_plot_without_matplotlib(write_settings, run, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    name = _ring_module(write_settings, HashRing(["s0"], vnodes=8))
    result = run("ring", "distribution", "--settings", name, "--keys", "10", "--plot", "x.png")
    assert_one_line_error(result, contains="pip install 'shardkit[plot]'")


USERS_SETTINGS = """
from shardkit import HashRing
from sqlalchemy import BigInteger
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASES = {urls!r}
SHARDKIT_RING = HashRing(["s0", "s1", "s2"], vnodes=64)
SHARDKIT_METADATA = "{name}:Base"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __shard_key__ = "owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[int] = mapped_column("owner_id", BigInteger)
"""


def test_distribution_from_table(write_settings, make_urls, run, workdir: Path) -> None:
    urls = make_urls("default", "s0", "s1", "s2")
    name = f"sk_settings_tbl{abs(hash(str(workdir))) % 10**6}"
    (workdir / f"{name}.py").write_text(USERS_SETTINGS.format(urls=urls, name=name))
    assert run("migrate", "--settings", name).exit_code == 0
    ring = HashRing(["s0", "s1", "s2"], vnodes=64)
    accounts = Table("accounts", MetaData(), Column("id", BigInteger, primary_key=True), Column("owner_id", BigInteger))
    placed = {a: 0 for a in ring}
    for i, alias in enumerate(["s0", "s1", "s2"]):
        rows = [{"id": j, "owner_id": j * 7 + i} for j in range(1, 401)]
        engine = create_engine(urls[alias])
        with engine.begin() as conn:
            conn.execute(insert(accounts), rows)
        engine.dispose()
        for a in ring.get_many([r["owner_id"] for r in rows]):
            placed[a] += 1
    for target in (f"{name}:Account", "accounts", f"{name}.Account"):
        result = run("ring", "distribution", "--settings", name, "--from-table", target, "--json")
        assert result.exit_code == 0, (target, result.output)
        data = parse(result)
        assert data["keys"] == 1200
        assert {s["alias"]: s["keys"] for s in data["shards"]} == placed
        assert data["rows_per_shard"] == {"s0": 400, "s1": 400, "s2": 400}
        assert data["misplaced"] == 1200 - sum(
            sum(1 for a in ring.get_many([j * 7 + i for j in range(1, 401)]) if a == alias)
            for i, alias in enumerate(["s0", "s1", "s2"])
        )
    reflected = run("ring", "distribution", "--settings", name, "--from-table", "accounts", "--column", "owner_id")
    assert reflected.exit_code == 0, reflected.output
    assert_one_line_error(
        run("ring", "distribution", "--settings", name, "--from-table", "nosuch", "--column", "x"),
        contains="no table 'nosuch'",
    )


@pytest.mark.parametrize("mode", ["ring", "buckets"])
def test_diff_add_and_remove(write_settings, run, mode: str) -> None:
    ring = HashRing([f"s{i}" for i in range(4)], mode=mode, vnodes=128, buckets=4096)
    name = _ring_module(write_settings, ring, {"default": "sqlite://", **{f"s{i}": "sqlite://" for i in range(5)}})
    result = run("ring", "diff", "--settings", name, "--add", "s4", "--keys", "20000", "--json")
    assert result.exit_code == 0, result.output
    data = parse(result)
    assert data["operation"] == "add" and data["ideal"] == pytest.approx(1 / 5)
    assert data["exact"]["between_staying"] == 0 and data["sampled"]["between_staying"] == 0
    assert {m["to"] for m in data["moves"]} == {"s4"}
    after = ring.copy()
    after.add("s4")
    assert data["to_version"] == after.version
    assert data["exact"]["moved"] == pytest.approx(float(_ringstats.exact_shares(after)["s4"]))
    assert abs(data["sampled"]["fraction"] - data["exact"]["moved"]) < 0.02
    keys = list(range(1, 20001))
    assert data["sampled"]["moved"] == sum(
        a != b for a, b in zip(ring.get_many(keys), after.get_many(keys), strict=True)
    )
    if mode == "buckets":
        assert data["exact"]["buckets"] == round(4096 / 5)  # exactly the ideal
        moved = [b for m in data["moves"] for lo, hi in m["bucket_ranges"] for b in range(lo, hi + 1)]
        before_table, after_table = _ringstats.bucket_table(ring), _ringstats.bucket_table(after)
        assert sorted(moved) == [i for i in range(4096) if before_table[i] != after_table[i]]
    removed = parse(run("ring", "diff", "--settings", name, "--remove", "s1", "--json", "--keys", "5000"))
    assert {m["from"] for m in removed["moves"]} == {"s1"}
    assert removed["ideal"] == 0.25
    assert removed["exact"]["moved"] == pytest.approx(float(_ringstats.exact_shares(ring)["s1"]))
    weighted = parse(run("ring", "diff", "--settings", name, "--add", "s4", "--weight", "2", "--json", "--keys", "10"))
    assert weighted["ideal"] == pytest.approx(2 / 6) and weighted["weight"] == 2
    text = run("ring", "diff", "--settings", name, "--add", "s4", "--keys", "1000")
    assert text.exit_code == 0 and "ideal" in text.stdout and "moved between shards that stay" in text.stdout
    assert Fraction(1, 5) == Fraction(data["ideal"]).limit_denominator(100)
