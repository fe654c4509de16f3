"""Distribution from real data: bytes per shard and per table, the heaviest shard keys, and
``shardkit ring compare`` (balance, movement and memory of layouts side by side, one PNG)."""

from __future__ import annotations

import json
import sqlite3
import struct
import sys
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, create_engine, insert, text

from shardkit.cli import _ring
from shardkit.ring import HashRing
from shardkit.ring import _layout as layout

from ..conftest import IN_CI
from ..faults import proxied_url, tcp_proxy
from .conftest import assert_one_line_error, parse

TENANT_SETTINGS = """
from shardkit import HashRing
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASES = {urls!r}
SHARDKIT_RING = HashRing(["s0", "s1", "s2"], vnodes=64)
SHARDKIT_METADATA = "{name}:Base"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __shard_key__ = "tenant"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[int] = mapped_column("tenant_id", BigInteger, index=True)
    name: Mapped[str] = mapped_column(String(200))


class Order(Base):
    __tablename__ = "orders"
    __shard_key__ = "tenant_id"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(String(200))
"""

RING = HashRing(["s0", "s1", "s2"], vnodes=64)
TOP = 5


def _tenant_cluster(workdir: Path, run: Callable[..., Any], urls: dict[str, str]) -> tuple[str, Counter[int], dict]:
    """Migrate the two co-located tables and load skewed tenants, each on its ring shard.
    Returns (settings module, rows per tenant over both tables, rows per table per tenant)."""
    name = f"sk_settings_data{abs(hash(str(workdir))) % 10**6}"
    (workdir / f"{name}.py").write_text(TENANT_SETTINGS.format(urls=urls, name=name))
    assert run("migrate", "--settings", name).exit_code == 0
    users: dict[str, list[dict[str, Any]]] = {a: [] for a in RING}
    orders: dict[str, list[dict[str, Any]]] = {a: [] for a in RING}
    per_table: dict[str, Counter[int]] = {"users": Counter(), "orders": Counter()}
    for tenant in range(1, 61):
        alias = RING.get(tenant)
        # hot tenants 1..8 have distinct totals; the tail is flat
        n_users = 3 + max(0, 9 - tenant) * 7
        n_orders = 2 + max(0, 9 - tenant) * 3 + (tenant % 2)
        for _ in range(n_users):
            users[alias].append({"tenant_id": tenant, "name": "u" * 40})
        for _ in range(n_orders):
            orders[alias].append({"tenant_id": tenant, "note": "n" * 120})
        per_table["users"][tenant] += n_users
        per_table["orders"][tenant] += n_orders
    meta = MetaData()
    users_t = Table(
        "users", meta, Column("id", Integer, primary_key=True), Column("tenant_id", BigInteger), Column("name", String)
    )
    orders_t = Table(
        "orders", meta, Column("id", Integer, primary_key=True), Column("tenant_id", BigInteger), Column("note", String)
    )
    for alias in RING:
        engine = create_engine(urls[alias])
        with engine.begin() as conn:
            conn.execute(insert(users_t), users[alias])
            conn.execute(insert(orders_t), orders[alias])
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
        engine.dispose()
    return name, per_table["users"] + per_table["orders"], per_table


def _direct_bytes(url: str, table: str) -> int:
    """The figure the database gives for one table, asked directly."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                return int(
                    conn.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": table}).scalar_one()
                )
            return int(
                conn.execute(
                    text(
                        "SELECT SUM(pgsize) FROM dbstat WHERE name IN "
                        "(SELECT name FROM sqlite_master WHERE tbl_name = :t)"
                    ),
                    {"t": table},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_bytes_and_top_keys(make_urls, run, workdir: Path) -> None:
    urls = make_urls("default", "s0", "s1", "s2")
    name, totals, per_table = _tenant_cluster(workdir, run, urls)
    result = run(
        "ring", "distribution", "--settings", name, "--from-table", f"{name}:User",
        "--top", str(TOP), "--colocated", "orders", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = parse(result)
    # the JSON schema: the distribution's keys, then bytes and top_keys
    assert {"bytes", "top_keys", "rows_per_shard", "misplaced", "null_keys", "keys", "shards"} <= set(data)
    assert set(data["bytes"]) == {"method", "shards", "tables", "total"}
    assert data["misplaced"] == 0
    assert data["keys"] == sum(per_table["users"].values())

    # bytes: > 0 everywhere, per-table figures add up to the shard, the shards to the total,
    # and each table's figure is the database's own
    sizes = data["bytes"]
    method = "pg_total_relation_size" if urls["s0"].startswith("postgresql") else "dbstat"
    assert sizes["method"] == {a: method for a in RING}
    assert set(sizes["tables"]) == {"users", "orders"}
    for alias in RING:
        shard_total = sizes["shards"][alias]
        assert shard_total > 0
        assert sum(sizes["tables"][t][alias] for t in sizes["tables"]) == shard_total
        for table in ("users", "orders"):
            assert sizes["tables"][table][alias] > 0
            assert sizes["tables"][table][alias] == _direct_bytes(urls[alias], table)
    assert sizes["total"] == sum(sizes["shards"].values())
    if method == "dbstat":  # every page of the file but page 1 and free pages belongs to a table
        for alias in RING:
            with sqlite3.connect(urls[alias].removeprefix("sqlite:///")) as db:
                page = db.execute("PRAGMA page_size").fetchone()[0]
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                free = db.execute("PRAGMA freelist_count").fetchone()[0]
            assert sizes["shards"][alias] == (pages - 1 - free) * page

    # top keys: a brute-force count over both tables
    top = data["top_keys"]
    assert top["tables"] == [f"{name}:User", "orders"] and top["top"] == TOP
    expected = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    assert [(k["key"], k["rows"]) for k in top["keys"]] == expected
    for entry in top["keys"]:
        assert set(entry) == {"key", "rows", "shards", "owner", "tables"}
        assert entry["shards"] == [RING.get(entry["key"])] and entry["owner"] == RING.get(entry["key"])
        assert entry["tables"] == {
            f"{name}:User": per_table["users"][entry["key"]],
            "orders": per_table["orders"][entry["key"]],
        }

    # a column given by name (reflected), one table only
    args = ["--from-table", "orders", "--column", "tenant_id", "--top", "3", "--no-bytes", "--json"]
    alone = parse(run("ring", "distribution", "--settings", name, *args))
    assert "bytes" not in alone
    assert [(k["key"], k["rows"]) for k in alone["top_keys"]["keys"]] == sorted(
        per_table["orders"].items(), key=lambda kv: (-kv[1], kv[0])
    )[:3]

    text_out = run("ring", "distribution", "--settings", name, "--from-table", "users", "--top", "3")
    assert text_out.exit_code == 0, text_out.output
    assert "bytes (tables with their indexes)" in text_out.stdout
    assert "top 3 shard keys by rows over users" in text_out.stdout
    assert_one_line_error(
        run("ring", "distribution", "--settings", name, "--keys", "10", "--top", "3"), contains="--from-table"
    )
    assert_one_line_error(
        run("ring", "distribution", "--settings", name, "--from-table", "users", "--top", "3", "--colocated", "nosuch"),
        contains="no table 'nosuch'",
    )


def test_bytes_unknown_without_dbstat(write_settings, run, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SQLite build without the dbstat table: bytes are "unknown" (None), not an error."""
    urls = {a: f"sqlite:///{workdir / a}.db" for a in ("default", "s0", "s1", "s2")}
    name, _, _ = _tenant_cluster(workdir, run, urls)
    monkeypatch.setitem(_ring._SIZE_SQL, "sqlite", ("dbstat", "SELECT name, pgsize FROM no_such_dbstat_vtab"))
    data = parse(run("ring", "distribution", "--settings", name, "--from-table", "users", "--json"))
    assert data["bytes"] == {
        "method": {a: None for a in RING},
        "shards": {a: None for a in RING},
        "tables": {},
        "total": None,
    }
    out = run("ring", "distribution", "--settings", name, "--from-table", "users")
    assert out.exit_code == 0 and "unknown" in out.stdout


def test_bytes_mariadb(databases, run, workdir: Path) -> None:
    """MariaDB/MySQL: data_length + index_length of information_schema.tables."""
    urls = {"default": databases.url("mysql", "default"), **databases.urls("mysql", "s0", "s1", "s2")}
    name, _, _ = _tenant_cluster(workdir, run, urls)
    data = parse(run("ring", "distribution", "--settings", name, "--from-table", "users", "--top", "2", "--json"))
    sizes = data["bytes"]
    assert sizes["method"] == {a: "information_schema" for a in RING}
    for alias in RING:
        assert sizes["shards"][alias] > 0
        assert sum(sizes["tables"][t][alias] for t in sizes["tables"]) == sizes["shards"][alias]
    assert [k["key"] for k in data["top_keys"]["keys"]] == [1, 2]


def test_shard_down_while_sizing_or_counting(databases, run, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard cut (a real proxy in front of PostgreSQL) after the row count, before the bytes or
    the top keys: one line naming the alias, exit code 1, no password; compare names it too."""
    urls = {a: databases.url("postgresql", a) for a in ("default", "s0", "s1", "s2")}
    with tcp_proxy(urls["s1"]) as proxy:
        urls["s1"] = proxied_url(urls["s1"], proxy)
        name, _, _ = _tenant_cluster(workdir, run, urls)
        counted = _ring._table_keys

        def count_then_cut(*args: Any) -> Any:
            out = counted(*args)
            proxy.cut()
            return out

        monkeypatch.setattr(_ring, "_table_keys", count_then_cut)
        for extra in ([], ["--no-bytes", "--top", "3"]):
            proxy.restore()
            result = run("ring", "distribution", "--settings", name, "--from-table", "users", *extra)
            assert_one_line_error(result, code=1, contains="alias 's1' is unreachable")
        proxy.cut()
        result = run("ring", "compare", "--settings", name, "--from-table", "users", "--layout", "vnodes=8")
        assert_one_line_error(result, code=1, contains="alias 's1' is unreachable")


# --------------------------------------------------------------------------- compare
LAYOUTS = ["vnodes=160", "vnodes=1024", "buckets=4096", "weights=s0:2,s1:1,s2:1,s3:1"]
LAYOUT_KEYS = {"label", "mode", "shards", "weights", "version", "balance", "keys_per_shard", "add", "remove", "memory"}
MOVE_KEYS = {"alias", "ideal", "exact", "exact_ratio", "keys_moved", "keys_fraction", "keys_ratio"}


def _expected_ring(spec: str) -> HashRing:
    """The layouts of LAYOUTS over --shards 4, built by hand."""
    shards = [f"s{i}" for i in range(4)]
    if spec == "vnodes=160":
        return HashRing(shards, vnodes=160)
    if spec == "vnodes=1024":
        return HashRing(shards, vnodes=1024)
    if spec == "buckets=4096":
        return HashRing(shards, mode="buckets", buckets=4096)
    return HashRing({"s0": 2, "s1": 1, "s2": 1, "s3": 1})


def _check_against_layout(entry: dict[str, Any], hr: HashRing, keys: list[Any]) -> None:
    """Every figure of one compare entry equals what ``_layout`` (and the ring) give directly."""
    assert set(entry) == LAYOUT_KEYS | {"vnodes" if hr.mode == "ring" else "buckets"}
    assert entry["version"] == hr.version and entry["weights"] == hr.weights
    counts = Counter(hr.get_many(keys))
    assert entry["keys_per_shard"] == {a: counts.get(a, 0) for a in hr}
    pm, cv = layout.balance(layout.exact_shares(hr), hr.weights)
    kpm, kcv = layout.balance(entry["keys_per_shard"], hr.weights)
    assert entry["balance"] == {"exact_peak_mean": pm, "exact_cv": cv, "keys_peak_mean": kpm, "keys_cv": kcv}
    for what, (alias, (after, moved, ideal)) in (
        ("add", ("s4", layout.movement_on_add(hr, "s4"))),
        ("remove", ("s3", layout.movement_on_remove(hr, "s3"))),
    ):
        got = entry[what]
        assert set(got) == MOVE_KEYS and got["alias"] == alias
        assert got["exact"] == float(moved) and got["ideal"] == float(ideal)
        assert got["exact_ratio"] == pytest.approx(float(moved / ideal))
        brute = sum(a != b for a, b in zip(hr.get_many(keys), after.get_many(keys), strict=True))
        assert got["keys_moved"] == brute
        assert got["keys_fraction"] == brute / len(keys)
        assert got["keys_ratio"] == pytest.approx(brute / len(keys) / float(ideal))
    assert entry["memory"] == layout.memory(hr)
    assert entry["memory"]["bytes"] == hr.nbytes > 0


def test_compare_matches_layout(run, workdir: Path) -> None:
    args = ["ring", "compare", "--shards", "4", "--keys", "20000", "--kind", "str", "--json"]
    for spec in LAYOUTS:
        args += ["--layout", spec]
    result = run(*args)
    assert result.exit_code == 0, result.output
    data = parse(result)
    assert set(data) == {"source", "keys", "layouts"}
    assert data["keys"] == 20000 and data["source"] == "20000 synthetic str keys"
    keys = [f"user:{i}" for i in range(1, 20001)]
    assert [e["label"] for e in data["layouts"]] == LAYOUTS
    for entry, spec in zip(data["layouts"], LAYOUTS, strict=True):
        _check_against_layout(entry, _expected_ring(spec), keys)
    # what the figures say: buckets balance best, more vnodes balance better
    by = {e["label"]: e for e in data["layouts"]}
    assert by["buckets=4096"]["balance"]["exact_peak_mean"] < by["vnodes=1024"]["balance"]["exact_peak_mean"]
    assert by["vnodes=1024"]["balance"]["exact_cv"] < by["vnodes=160"]["balance"]["exact_cv"]
    assert by["buckets=4096"]["add"]["ideal"] == 0.2

    text_out = run(*[a for a in args if a != "--json"])
    assert text_out.exit_code == 0, text_out.output
    assert "exact p/m" in text_out.stdout and all(spec in text_out.stdout for spec in LAYOUTS)


def test_compare_ring_file_and_errors(run, workdir: Path) -> None:
    base = HashRing(["a", "b", "c"], vnodes=100)
    (workdir / "base.json").write_text(json.dumps(base.to_dict()))
    other = HashRing(["a", "b", "c"], mode="buckets", buckets=300)
    (workdir / "other.json").write_text(json.dumps(other.to_dict()))
    result = run(
        "ring", "compare", "--ring", "base.json", "--layout", "vnodes=100", "--layout", "other.json",
        "--remove", "b", "--add", "z", "--keys", "3000", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = parse(result)
    first, second = data["layouts"]
    assert first["version"] == base.version and second["version"] == other.version
    assert first["remove"]["alias"] == "b" and second["add"]["alias"] == "z"
    assert first["remove"]["exact"] == float(layout.movement_on_remove(base, "b")[1])
    assert second["add"]["exact"] == float(layout.movement_on_add(other, "z")[1])
    for bad, contains in (
        (["--layout", "vnodes=abc"], "--layout 'vnodes=abc'"),
        (["--layout", "colour=red"], "unknown item 'colour'"),
        (["--layout", "s0"], "is not ALIAS:WEIGHT"),
        (["--layout", "vnodes=0"], "--layout 'vnodes=0'"),
        (["--layout", "missing.json"], "not a JSON ring description"),
        (["--layout", "vnodes=8", "--remove", "nope"], "shard 'nope' is not in the ring"),
        (["--layout", "vnodes=8", "--add", "a"], "--add 'a': already a shard"),
    ):
        assert_one_line_error(run("ring", "compare", "--ring", "base.json", "--keys", "10", *bad), contains=contains)
    assert_one_line_error(
        run("ring", "compare", "--layout", "vnodes=8", "--keys", "10"), contains="or give --shards N"
    )  # no settings at all
    assert_one_line_error(run("ring", "compare", "--shards", "1", "--layout", "vnodes=8"), contains="nothing to remove")


def test_compare_from_table(make_urls, run, workdir: Path) -> None:
    urls = make_urls("default", "s0", "s1", "s2")
    name, _, per_table = _tenant_cluster(workdir, run, urls)
    result = run(
        "ring", "compare", "--settings", name, "--from-table", "users",
        "--layout", "vnodes=64", "--layout", "buckets=1024", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = parse(result)
    keys = [tenant for tenant, n in sorted(per_table["users"].items()) for _ in range(n)]  # one key per row
    assert data["keys"] == len(keys) and data["source"] == "table users"
    _vnodes, _buckets = data["layouts"]
    assert _vnodes["version"] == RING.version  # the settings' own ring, as it is
    hr = HashRing(["s0", "s1", "s2"], vnodes=64)
    counts = Counter(hr.get_many(keys))
    assert _vnodes["keys_per_shard"] == {a: counts[a] for a in hr}
    assert _vnodes["balance"]["keys_peak_mean"] == layout.balance(_vnodes["keys_per_shard"], hr.weights)[0]
    after = layout.movement_on_add(hr, "s3")[0]
    assert _vnodes["add"]["keys_moved"] == sum(
        a != b for a, b in zip(hr.get_many(keys), after.get_many(keys), strict=True)
    )
    assert _buckets["mode"] == "buckets" and _buckets["buckets"] == 1024


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_compare_png(run, workdir: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover - matplotlib is in the test extra
        message = "matplotlib is not installed (it is in shardkit[test]): the compare PNG is NOT tested"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    png = workdir / "compare.png"
    result = run(
        "ring", "compare", "--shards", "5", "--keys", "5000", "--layout", "vnodes=64", "--layout", "buckets=2048",
        "--layout", "weights=s0:3", "--png", str(png), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert parse(result)["png"] == str(png)
    assert png.stat().st_size > 5000
    assert _png_size(png) == (1200, 450)
    text_out = run("ring", "compare", "--shards", "3", "--keys", "100", "--layout", "vnodes=8", "--plot", "b.png")
    assert text_out.exit_code == 0 and "chart written to b.png" in text_out.stdout
    assert (workdir / "b.png").stat().st_size > 1000


def test_compare_png_without_matplotlib(run, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = run("ring", "compare", "--shards", "3", "--keys", "10", "--layout", "vnodes=8", "--png", "x.png")
    assert_one_line_error(result, contains="--png needs matplotlib: pip install 'shardkit[plot]'")
    assert not (workdir / "x.png").exists()


def test_layout_balance_and_movement_by_hand() -> None:
    """The ``_layout`` figures compare reports, on cases whose answer is known."""
    assert layout.balance({"a": 10, "b": 10}) == (1.0, 0.0)
    pm, cv = layout.balance({"a": 30, "b": 10})
    assert pm == 1.5 and cv == pytest.approx(0.5)
    # weighted: a weight-3 shard with 3x the keys is balanced
    assert layout.balance({"a": 30, "b": 10}, {"a": 3, "b": 1}) == (1.0, 0.0)
    assert layout.balance({}) == (0.0, 0.0) and layout.balance({"a": 0, "b": 0}) == (0.0, 0.0)
    buckets = HashRing([f"s{i}" for i in range(4)], mode="buckets", buckets=4096)
    after, moved, ideal = layout.movement_on_add(buckets, "s4")
    assert "s4" in after and "s4" not in buckets  # the ring given is left alone
    assert ideal == Fraction(1, 5) and moved == Fraction(round(4096 / 5), 4096)
    _, gone, share = layout.movement_on_remove(buckets, "s2")
    assert share == Fraction(1, 4) and gone == layout.exact_shares(buckets)["s2"]
    ring = HashRing({"a": 1, "b": 2}, vnodes=50)
    after, moved, ideal = layout.movement_on_add(ring, "c", 2)
    assert ideal == Fraction(2, 5) and moved == layout.exact_shares(after)["c"]
    assert layout.memory(ring) == {"entries": 150, "bytes": ring.nbytes, "bytes_per_entry": ring.nbytes / 150}


def test_progress_on_stderr_only_on_a_terminal(run, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long scans draw a progress bar on stderr when it is a terminal; stdout stays pure JSON."""
    args = ["ring", "compare", "--shards", "3", "--keys", "120000", "--layout", "vnodes=8", "--json"]
    quiet = run(*args)
    assert quiet.exit_code == 0 and quiet.stderr == ""
    monkeypatch.setattr("shardkit.cli._common.stderr_is_terminal", lambda: True)
    drawn = run(*args)
    assert drawn.exit_code == 0, drawn.output
    assert "hashing keys" in drawn.stderr
    assert parse(drawn) == parse(quiet)
