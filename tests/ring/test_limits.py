"""A hostile ring layout fails at once with ConfigError, before anything is allocated (issue 10).

Before: a 3.7 KB buckets layout allocated ~6 GB, and a 2.3 KB ring layout (300 shards x 65536
vnodes) ran 23 s into MemoryError.  Every path that loads a layout goes through
``HashRing.from_dict`` (settings, ``--ring``/``--new-ring``, the stored ring, pickling).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardkit import load_settings
from shardkit.errors import ConfigError
from shardkit.ring import HashRing, _ring
from shardkit.ring._ring import MAX_ALIAS_LENGTH, MAX_BUCKETS, MAX_POINTS, MAX_SHARDS

FAST = 1.0  # seconds: generous for a shared machine; the checks take well under a millisecond
PEAK = 64 * 2**20  # bytes a refused layout may allocate while it is refused

HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "buckets runs far past the bucket count": (
        {
            "mode": "buckets",
            "buckets": MAX_BUCKETS,
            "shards": [f"s{i}" for i in range(300)],
            "table": [[f"s{i}", MAX_BUCKETS] for i in range(300)],
        },
        "covers more than",
    ),
    "300 shards x 65536 vnodes": ({"shards": {f"s{i}": 1 for i in range(300)}, "vnodes": 65536}, "points"),
    # 63 bytes: accepted by the old limit of 2**21 points, it cost ~2 s and 220 MB in every process
    "two shards of weight 16 at 65536 vnodes": (
        {"mode": "ring", "vnodes": 65536, "shards": {"a": 16, "b": 16}},
        "points",
    ),
    "32 shards x 65536 vnodes": ({"mode": "ring", "vnodes": 65536, "shards": [f"s{i}" for i in range(32)]}, "points"),
    "2**24 buckets (the old limit)": ({"mode": "buckets", "buckets": 1 << 24, "shards": ["a", "b"]}, "buckets"),
    "one shard with a huge weight": ({"shards": {"s0": 1e12}, "vnodes": 1024}, "ring points"),
    "too many shards": ({"shards": [f"s{i}" for i in range(MAX_SHARDS + 1)], "vnodes": 1}, "shards"),
    "too many buckets": ({"mode": "buckets", "buckets": 2**40, "shards": ["a"]}, "buckets"),
    "a very long alias": ({"shards": ["x" * 10_000_000]}, "characters"),
    "more runs than buckets": (
        {"mode": "buckets", "buckets": 4, "shards": ["a", "b"], "table": [["a", 1]] * 5},
        "runs",
    ),
}


def refused_fast(load: Callable[[], object], match: str) -> ConfigError:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=match) as info:
            load()
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < FAST, f"refusing took {took:.2f} s"
    assert peak < PEAK, f"refusing allocated {peak / 2**20:.0f} MiB"
    return info.value


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_layouts_are_refused_at_once(name: str) -> None:
    layout, match = HOSTILE[name]
    if name != "a very long alias":
        assert len(json.dumps(layout)) < 2_500_000  # small inputs (the first two: a few KB)
    err = refused_fast(lambda: HashRing.from_dict(layout), match)
    assert "limit" in str(err) or "more than" in str(err) or "buckets" in str(err)


def test_the_issue_layouts_were_a_few_kilobytes() -> None:
    for name in ("buckets runs far past the bucket count", "300 shards x 65536 vnodes"):
        assert len(json.dumps(HOSTILE[name][0])) < 10_000


def test_the_constructor_and_add_check_totals_too(monkeypatch: pytest.MonkeyPatch) -> None:
    refused_fast(lambda: HashRing([f"s{i}" for i in range(300)], vnodes=65536), "points")
    assert MAX_POINTS >= 1000 * 1024  # 1000 shards at the default vnodes fit
    monkeypatch.setattr(_ring, "MAX_SHARDS", 100)  # an iterator has no length: counted as it goes
    refused_fast(lambda: HashRing(iter([f"s{i}" for i in range(101)]), vnodes=1), "101 shards")
    monkeypatch.setattr(_ring, "MAX_POINTS", 64 * 16)  # a full ring, small enough to build quickly
    ring = HashRing([f"s{i}" for i in range(64)], vnodes=16)
    assert ring.npoints == _ring.MAX_POINTS
    before = ring.version
    refused_fast(lambda: ring.add("one-too-many"), "points")
    assert ring.version == before and "one-too-many" not in ring  # nothing changed
    with pytest.raises(ConfigError, match="characters"):
        HashRing(["ok"]).add("y" * (MAX_ALIAS_LENGTH + 1))


def test_small_layouts_past_the_limits_are_refused_in_milliseconds() -> None:
    """Issue 10 (review): a layout of a few dozen bytes may not cost more than a few milliseconds to refuse."""
    for name in (
        "two shards of weight 16 at 65536 vnodes",
        "32 shards x 65536 vnodes",
        "2**24 buckets (the old limit)",
    ):
        layout, match = HOSTILE[name]
        assert len(json.dumps(layout)) < 300
        took = []
        for _ in range(3):  # the best of three: a check that allocates nothing, timed on a shared machine
            start = time.perf_counter()
            with pytest.raises(ConfigError, match=match):
                HashRing.from_dict(layout)
            took.append(time.perf_counter() - start)
        assert min(took) < 0.02, f"{name}: refusing took {min(took) * 1000:.1f} ms"


_AT_THE_LIMIT = """
import json, resource, sys, time
from shardkit.ring import HashRing
layout = json.loads(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ring = HashRing.from_dict(layout)
took = time.perf_counter() - start
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"took": took, "grew": grew, "npoints": ring.npoints}))
"""


def cost_of(layout: dict[str, Any]) -> dict[str, float]:
    """Time and memory growth of loading ``layout`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _AT_THE_LIMIT, json.dumps(layout)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_the_costliest_small_layouts_that_load_are_bounded() -> None:
    """The most a tiny accepted layout can cost: a ring of MAX_POINTS points, a table of MAX_BUCKETS buckets."""
    ring = cost_of({"mode": "ring", "vnodes": 65536, "shards": {"a": 8, "b": 8}})  # 61 bytes, exactly MAX_POINTS
    assert ring["npoints"] == MAX_POINTS
    assert ring["took"] < 10, ring  # about 1 s on an idle machine (it was 2.5 s and 220 MB)
    assert ring["grew"] < 80 * 2**20, ring  # about 40 MB (it was 216 MB for twice the points)
    # a real large cluster: 1000 shards at the default 1024 vnodes ("weight" multiplies the vnodes)
    cluster = cost_of({"mode": "ring", "shards": {f"shard-{i:04d}": 1 for i in range(1000)}})
    assert cluster["npoints"] == 1000 * 1024 and cluster["took"] < 10, cluster
    buckets = cost_of({"mode": "buckets", "buckets": MAX_BUCKETS, "shards": ["a", "b"]})
    assert buckets["npoints"] == MAX_BUCKETS
    assert buckets["took"] < 1, buckets  # tens of milliseconds
    assert buckets["grew"] < 40 * 2**20, buckets


def test_layouts_at_the_limits_still_load() -> None:
    HashRing.from_dict({"shards": ["a" * MAX_ALIAS_LENGTH, "b"], "vnodes": 8})
    table = [["a", MAX_BUCKETS // 2], ["b", MAX_BUCKETS // 2]]
    ring = HashRing.from_dict({"mode": "buckets", "buckets": MAX_BUCKETS, "shards": ["a", "b"], "table": table})
    assert ring.npoints == MAX_BUCKETS


def test_a_table_that_covers_too_few_buckets_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="covers 3 buckets, not 4"):
        HashRing.from_dict({"mode": "buckets", "buckets": 4, "shards": ["a", "b"], "table": [["a", 1], ["b", 2]]})
    with pytest.raises(ConfigError, match="bad run"):
        HashRing.from_dict({"mode": "buckets", "buckets": 4, "shards": ["a"], "table": ["ab"]})


def test_pickles_and_settings_and_cli_go_through_the_same_checks(tmp_path: Path) -> None:
    layout = HOSTILE["300 shards x 65536 vnodes"][0]
    # a pickle is a layout too: a forged one is refused the same way
    refused_fast(lambda: pickle.loads(pickle.dumps(_Forged(layout))), "points")
    toml = tmp_path / "settings.toml"
    toml.write_text(
        f'[databases]\ndefault = "sqlite://"\n[ring]\nvnodes = 65536\nshards = {json.dumps(list(layout["shards"]))}\n'
    )
    err = refused_fast(lambda: load_settings(str(toml)), "points")
    assert "[ring]" in str(err)
    ring_file = tmp_path / "ring.json"
    ring_file.write_text(json.dumps(layout))
    cli = subprocess.run(
        [sys.executable, "-m", "shardkit", "ring", "show", "--ring", str(ring_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode != 0 and "points" in cli.stderr and "Traceback" not in cli.stderr


class _Forged:
    def __init__(self, layout: dict[str, Any]) -> None:
        self.layout = layout

    def __reduce__(self) -> tuple[Any, ...]:
        return (HashRing.from_dict, (self.layout,))


@pytest.fixture(autouse=True)
def _no_leftover_tracing() -> Iterator[None]:
    yield
    if tracemalloc.is_tracing():
        tracemalloc.stop()
