"""shardkit.ids: unique, time-ordered, positive 64-bit ids."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from shardkit import ids
from shardkit.errors import ConfigError
from shardkit.ids import MAX_WORKER_ID, IdGenerator, next_id, parse_id


def test_ids_are_positive_int64_and_increase() -> None:
    gen = IdGenerator(worker_id=5)
    values = [gen() for _ in range(20_000)]  # > 1024 per ms: exercises sequence roll-over
    assert values == sorted(values) and len(set(values)) == len(values)
    assert all(0 < v < 2**63 for v in values)
    assert {parse_id(v).worker_id for v in values} == {5}


def test_next_id_and_default_generator() -> None:
    a, b = next_id(), next_id()
    assert 0 < a < b < 2**63
    assert parse_id(a).worker_id == ids.default_generator.worker_id


def test_two_generators_with_one_worker_id_never_collide() -> None:
    a, b = IdGenerator(worker_id=9), IdGenerator(worker_id=9)
    values = [g() for _ in range(3000) for g in (a, b)]
    assert len(set(values)) == len(values)


def test_clock_going_backwards_never_repeats() -> None:
    now = [ids.EPOCH_MS + 10_000]
    gen = IdGenerator(worker_id=1, clock=lambda: now[0])
    first = [gen() for _ in range(5)]
    now[0] -= 5_000  # NTP step back
    later = [gen() for _ in range(3000)]
    values = first + later
    assert values == sorted(values) and len(set(values)) == len(values)
    now[0] += 10_000
    caught_up = gen()
    assert parse_id(caught_up).timestamp_ms == now[0]


def test_bad_worker_ids_and_clock() -> None:
    for bad in (-1, MAX_WORKER_ID + 1, True, "3"):
        with pytest.raises(ConfigError):
            IdGenerator(worker_id=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="epoch"):
        IdGenerator(worker_id=1, clock=lambda: 0)()


def test_worker_id_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDKIT_WORKER_ID", "77")
    assert IdGenerator().worker_id == 77
    monkeypatch.setenv("SHARDKIT_WORKER_ID", "lots")
    with pytest.raises(ConfigError):
        IdGenerator()


def test_threads_never_collide() -> None:
    gen = IdGenerator()
    results: list[list[int]] = [[] for _ in range(8)]

    def work(out: list[int]) -> None:
        out.extend(gen() for _ in range(5000))

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [v for r in results for v in r]
    assert len(set(everything)) == len(everything)
    assert all(r == sorted(r) for r in results)


def _child_ids(n: int) -> list[int]:
    return [next_id() for _ in range(n)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_never_collide(method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(4) as pool:
        chunks = pool.map(_child_ids, [3000] * 4)
    everything = [v for chunk in chunks for v in chunk] + _child_ids(3000)
    assert len(set(everything)) == len(everything)


def test_fork_reseeds_derived_and_blocks_explicit() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    explicit = IdGenerator(worker_id=3)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            derived_ok = ids.default_generator.worker_id == ids._derived_worker_id()[0]
            try:
                explicit()
                blocked = False
            except ConfigError:
                blocked = True
            explicit.reseed(worker_id=4)
            reseeded = parse_id(explicit()).worker_id == 4
            os.write(write, b"%d%d%d" % (derived_ok, blocked, reseeded))
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.waitpid(pid, 0)
    assert answer == b"111"
    explicit()  # the parent is unaffected
