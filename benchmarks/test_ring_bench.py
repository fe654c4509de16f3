"""Ring figures: lookup speed against peers, add/remove cost, balance, movement, memory.

Run:  pytest benchmarks/test_ring_bench.py -p no:cacheprovider
Peers in the same groups: a bare ``mmh3.hash(str)`` call and uhashring's
``HashRing.get_node``.  The medians and their ratios are printed as one table
at the end of the run ("shardkit ring figures").  Structural figures
(balance, movement, memory) are exact and asserted; speed ratios are printed.
On a shared machine read the "paired" ratios (``test_paired_ratios``: every peer timed back to
back in each round, median of the per-round ratios); the separate groups are timed seconds
apart and a neighbour's load between them moves their ratios.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter, deque
from typing import Any

import mmh3
import pytest
import uhashring

from shardkit.ring import IMPLEMENTATION, HashRing

N_KEYS = 1_000_000
KEY = "user:1234567"


def _calls(benchmark: Any, fn: Any, arg: Any, iterations: int = 20_000) -> None:
    """Same fixed calibration for every peer: many calls per round, so timer overhead vanishes."""
    benchmark.pedantic(fn, args=(arg,), iterations=iterations, rounds=40, warmup_rounds=2)


def _median(benchmark: Any) -> float:
    return float(benchmark.stats.stats.median)


def _ratios(figs: dict[str, Any], label: str) -> None:
    base = figs.get(f"median get[{label}] mmh3.hash(str)")
    ours = figs.get(f"median get[{label}] ring.get(str)")
    peer = figs.get(f"median get[{label}] uhashring.get_node(str)")
    if base and ours:
        figs[f"ratio get[{label}]: ring.get / mmh3.hash (<=0.8)"] = ours / base
    if peer and ours:
        figs[f"ratio get[{label}]: uhashring / ring.get (>=50)"] = peer / ours


GET_KEYS_STR = [f"user:{i}" for i in range(1_000_000, 1_001_000)]
GET_KEYS_INT = list(range(10**9, 10**9 + 1000))


def _per_call(fn: Any, keys: list[Any]) -> Any:
    """One round = ``fn`` called on 1000 different keys through ``map`` (a C loop): every peer pays
    the same harness cost, and it is a small part of each call, as in a real loop over keys."""

    def run() -> None:
        deque(map(fn, keys), 0)

    return run


MODES = ["ring", "buckets"]
SHARDS = [10, 100, 1000]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("who", ["mmh3.hash(str)", "uhashring.get_node(str)", "ring.get(str)", "ring.get(int)"])
def test_get(benchmark: Any, ring_figures: dict[str, Any], shards: int, mode: str, who: str) -> None:
    label = f"{mode} {shards}"
    benchmark.group = f"ring get, {mode} mode, {shards} shards, per 1000 keys"
    aliases = [f"s{i}" for i in range(shards)]
    fn: Any
    keys: list[Any] = GET_KEYS_STR
    if who == "mmh3.hash(str)":
        fn = mmh3.hash
    elif who.startswith("uhashring"):
        if mode == "buckets":
            pytest.skip("uhashring is timed once per shard count, in the ring-mode group")
        fn = uhashring.HashRing(nodes=aliases).get_node
    else:
        fn = HashRing(aliases, mode=mode).get
        keys = GET_KEYS_INT if who.endswith("(int)") else GET_KEYS_STR
    rounds_each = 2 if who.startswith("uhashring") else 40
    benchmark.pedantic(_per_call(fn, keys), iterations=rounds_each, rounds=30, warmup_rounds=2)
    ring_figures[f"median get[{label}] {who}"] = _median(benchmark) / len(keys)
    if who.startswith("uhashring"):  # the same peer figure serves both modes
        ring_figures[f"median get[buckets {shards}] {who}"] = ring_figures[f"median get[{label}] {who}"]
    _ratios(ring_figures, label)
    _ratios(ring_figures, f"buckets {shards}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("who", ["mmh3.hash(str)", "get_many(1000 ints)", "get_many(1000 strs)"])
def test_get_many(benchmark: Any, ring_figures: dict[str, Any], shards: int, mode: str, who: str) -> None:
    label = f"{mode} {shards}"
    benchmark.group = f"ring get_many, {mode} mode, {shards} shards, per call"
    if who == "mmh3.hash(str)":  # per key, in the same map-over-1000-keys harness as test_get
        benchmark.pedantic(_per_call(mmh3.hash, GET_KEYS_STR), iterations=40, rounds=30, warmup_rounds=2)
        ring_figures[f"median get_many[{label}] peer mmh3.hash(str)"] = _median(benchmark) / len(GET_KEYS_STR)
        return
    ring = HashRing([f"s{i}" for i in range(shards)], mode=mode)
    keys: list[Any] = list(GET_KEYS_INT)
    if "strs" in who:
        keys = GET_KEYS_STR
    _calls(benchmark, ring.get_many, keys, 50)
    per_key = _median(benchmark) / len(keys)
    ring_figures[f"median get_many[{label}] per key {who}"] = per_key
    base = ring_figures.get(f"median get_many[{label}] peer mmh3.hash(str)")
    if base:
        ring_figures[f"ratio get_many[{label}] per key {who} / mmh3.hash (<=0.4)"] = per_key / base


def _paired_medians(runs: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Time each callable once per round, rotating the order every round, so each ratio compares
    passes made a few hundred microseconds apart: a noisy neighbour slows both sides of a pair.
    Every timed call follows an untimed one of the same callable, so each peer is timed with its
    own data in the caches, as in the groups above (the others' passes would otherwise evict it)."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name]()
            start = time.perf_counter_ns()
            runs[name]()
            times[name].append(float(time.perf_counter_ns() - start))
    return times


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shards", SHARDS)
def test_paired_ratios(benchmark: Any, ring_figures: dict[str, Any], shards: int, mode: str) -> None:
    """The same ratios as above, each the median of per-round ratios of interleaved passes.

    On a shared machine the separate groups above are timed seconds apart, and a neighbour's
    load between them moves their ratio; here every round times each peer over the same 1000
    keys back to back (10 passes each; uhashring one pass, scaled), in a rotating order."""
    benchmark.group = "ring paired ratios (one round of every peer, interleaved)"
    aliases = [f"s{i}" for i in range(shards)]
    ring = HashRing(aliases, mode=mode)
    peer = uhashring.HashRing(nodes=aliases).get_node
    passes = 10

    def repeat(fn: Any, keys: list[Any], times: int) -> Any:
        one = _per_call(fn, keys)

        def run() -> None:
            for _ in range(times):
                one()

        return run

    runs = {
        "mmh3": repeat(mmh3.hash, GET_KEYS_STR, passes),
        "get": repeat(ring.get, GET_KEYS_STR, passes),
        "uhashring": repeat(peer, GET_KEYS_STR, 1),
        "get_many strs": repeat(ring.get_many, [GET_KEYS_STR], passes),
        "get_many ints": repeat(ring.get_many, [GET_KEYS_INT], passes),
    }
    times = benchmark.pedantic(_paired_medians, args=(runs, 31), rounds=1, iterations=1)
    label = f"{mode} {shards}"
    scaled_peer = [t * passes for t in times["uhashring"]]
    ring_figures[f"paired get[{label}]: ring.get / mmh3.hash (<=0.8)"] = _median_ratio(times["get"], times["mmh3"])
    ring_figures[f"paired get[{label}]: uhashring / ring.get (>=50)"] = _median_ratio(scaled_peer, times["get"])
    for kind in ("strs", "ints"):
        ring_figures[f"paired get_many[{label}] {kind} per key / mmh3.hash (<=0.4)"] = _median_ratio(
            times[f"get_many {kind}"], times["mmh3"]
        )


@pytest.fixture(scope="module")
def big_ring() -> HashRing:
    return HashRing([f"s{i}" for i in range(1000)], vnodes=160)


@pytest.mark.parametrize("op", ["add", "remove"])
def test_add_remove_1000_shards(benchmark: Any, ring_figures: dict[str, Any], big_ring: HashRing, op: str) -> None:
    benchmark.group = "ring add/remove, 1000 shards x 160 vnodes"
    if op == "add":

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (big_ring.copy(), "new-shard"), {}

        benchmark.pedantic(lambda ring, alias: ring.add(alias), setup=setup, rounds=60)
    else:

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (big_ring.copy(), "s500"), {}

        benchmark.pedantic(lambda ring, alias: ring.remove(alias), setup=setup, rounds=60)
    ring_figures[f"median {op} one shard (1000 x 160 points; <=1 ms)"] = _median(benchmark)
    assert _median(benchmark) < 5e-3  # generous: the target is 1 ms, machines vary


# --------------------------------------------------------------- measured figures
@pytest.fixture(scope="module")
def million_keys() -> list[int]:
    rnd = random.Random(1)
    return [rnd.getrandbits(63) for _ in range(N_KEYS)]


def _peak_over_mean(owners: list[str], shards: int) -> float:
    return max(Counter(owners).values()) / (len(owners) / shards)


def test_balance(ring_figures: dict[str, Any], million_keys: list[int]) -> None:
    ring_figures["implementation"] = IMPLEMENTATION
    classic = HashRing([f"s{i}" for i in range(10)])
    value = _peak_over_mean(classic.get_many(million_keys), 10)
    ring_figures["balance classic 10 shards, 1M keys (<=1.10)"] = value
    assert value <= 1.10
    for shards in (10, 100, 1000):
        ring = HashRing([f"s{i}" for i in range(shards)], mode="buckets")
        exact = max(Counter(ring._owners).values()) / (ring.buckets / shards)
        ring_figures[f"balance buckets {shards} shards, hash-space share (<=1.01)"] = exact
        ring_figures[f"balance buckets {shards} shards, 1M keys"] = _peak_over_mean(ring.get_many(million_keys), shards)
        assert exact <= 1.01


@pytest.mark.parametrize("mode", ["ring", "buckets"])
def test_movement(ring_figures: dict[str, Any], million_keys: list[int], mode: str) -> None:
    ring = HashRing([f"s{i}" for i in range(10)], mode=mode)
    before = ring.get_many(million_keys)
    ring.add("s10")
    after = ring.get_many(million_keys)
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(b == "s10" for _, b in moved), "a key moved between two old shards"
    ratio_add = len(moved) / N_KEYS * 11
    ring.remove("s7")
    final = ring.get_many(million_keys)
    moved = [(a, b) for a, b in zip(after, final, strict=True) if a != b]
    assert all(a == "s7" for a, _ in moved)
    ratio_remove = len(moved) / N_KEYS * 11
    ring_figures[f"movement {mode}: 10 -> 11, x ideal 1/11 (<=1.05)"] = ratio_add
    ring_figures[f"movement {mode}: 11 -> 10, x ideal 1/11 (<=1.10)"] = ratio_remove
    assert ratio_add <= 1.05 and ratio_remove <= 1.10


def test_memory(ring_figures: dict[str, Any]) -> None:
    ring = HashRing([f"s{i}" for i in range(1000)], vnodes=160)
    ring_figures["memory bytes per ring point (<=8)"] = ring.memory_per_point()
    ring_figures["memory 1000 x 160 ring, bytes"] = ring.nbytes
    ring_figures["memory bytes per bucket (65536 buckets)"] = HashRing(["a", "b"], mode="buckets").memory_per_point()
    assert ring.memory_per_point() <= 8
