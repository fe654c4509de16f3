"""run_parallel: parallelism, failures, deadline, cancellation, partial mode."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from shardkit.errors import FanoutTimeoutError, ShardQueryError
from shardkit.fanout import CallableTask, pg_statement_timeout_sql, run_parallel


class Sleeper:
    def __init__(self, seconds: float, value: Any = None, fail: BaseException | None = None) -> None:
        self.seconds = seconds
        self.value = value
        self.fail = fail
        self.cancelled = threading.Event()
        self.remaining: float | None = -1.0

    def run(self, remaining_seconds: float | None) -> Any:
        self.remaining = remaining_seconds
        self.cancelled.wait(self.seconds)
        if self.fail is not None:
            raise self.fail
        return self.value

    def cancel(self) -> None:
        self.cancelled.set()


class Stubborn(Sleeper):
    """A task whose cancel() does not stop it."""

    def cancel(self) -> None:
        self.was_cancelled = True


def test_runs_in_parallel() -> None:
    tasks = {f"s{i}": Sleeper(0.5, i) for i in range(4)}
    start = time.monotonic()
    outcome = run_parallel(tasks, deadline=5.0)
    assert time.monotonic() - start < 0.8
    assert outcome.results == {"s0": 0, "s1": 1, "s2": 2, "s3": 3}
    assert outcome.complete and outcome.errors == {}
    assert all(t.remaining is not None and 4.0 < t.remaining <= 5.0 for t in tasks.values())


def test_failure_names_the_alias_and_cancels_the_others() -> None:
    slow = Sleeper(5.0, 1)
    tasks = {"ok": slow, "bad": Sleeper(0.05, fail=ValueError("boom"))}
    start = time.monotonic()
    with pytest.raises(ShardQueryError) as info:
        run_parallel(tasks, deadline=None)
    assert time.monotonic() - start < 1.0
    assert "'bad'" in str(info.value) and "boom" in str(info.value)
    assert set(info.value.errors) == {"bad"}  # type: ignore[attr-defined]
    assert isinstance(info.value.errors["bad"], ValueError)  # type: ignore[attr-defined]
    assert slow.cancelled.wait(1.0)


def test_deadline_raises_in_time_and_cancels() -> None:
    slow = Stubborn(5.0)
    tasks = {"fast": Sleeper(0.01, 1), "slow": slow}
    start = time.monotonic()
    with pytest.raises(FanoutTimeoutError) as info:
        run_parallel(tasks, deadline=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 0.7
    assert "'slow'" in str(info.value) and "'fast'" not in str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert getattr(slow, "was_cancelled", False)
    slow.cancelled.set()


def test_partial_mode_returns_what_answered() -> None:
    tasks = {"a": Sleeper(0.01, "A"), "b": Sleeper(0.01, fail=RuntimeError("down")), "c": Sleeper(3.0, "C")}
    start = time.monotonic()
    outcome = run_parallel(tasks, deadline=0.3, partial=True)
    assert time.monotonic() - start < 0.6
    assert outcome.results == {"a": "A"}
    assert set(outcome.missing) == {"b", "c"} and not outcome.complete
    assert isinstance(outcome.errors["c"], TimeoutError)


def test_partial_mode_all_failed_raises() -> None:
    tasks = {"a": Sleeper(0.01, fail=RuntimeError("x")), "b": Sleeper(0.01, fail=RuntimeError("y"))}
    with pytest.raises(ShardQueryError) as info:
        run_parallel(tasks, deadline=1.0, partial=True)
    assert set(info.value.errors) == {"a", "b"}  # type: ignore[attr-defined]


def test_nested_fanout_from_a_worker_does_not_deadlock() -> None:
    def outer(_remaining: float | None) -> int:
        inner = {f"i{j}": CallableTask(lambda _t, j=j: j) for j in range(50)}
        return sum(run_parallel(inner, deadline=5.0).results.values())

    tasks = {f"o{i}": CallableTask(outer) for i in range(40)}
    outcome = run_parallel(tasks, deadline=10.0)
    assert set(outcome.results.values()) == {sum(range(50))}


def test_empty_and_statement_timeout_sql() -> None:
    assert run_parallel({}, deadline=1.0).results == {}
    assert pg_statement_timeout_sql(0.25) == "SET LOCAL statement_timeout = 250"
    assert pg_statement_timeout_sql(0.0) == "SET LOCAL statement_timeout = 1"
    assert pg_statement_timeout_sql(None) == "SET LOCAL statement_timeout = 0"
