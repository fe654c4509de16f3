"""Shards whose connections belong to the calling thread run there, one after another."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from shardkit.errors import FanoutTimeoutError
from shardkit.fanout import CallableTask, run_parallel
from shardkit.fanout._threads import CallingThreadExecutor, calling_thread_executor, thread_bound


def test_thread_bound_engines(tmp_path: Path) -> None:
    file_url = f"sqlite:///{tmp_path / 'a.db'}"
    assert not thread_bound(create_engine(file_url))  # QueuePool, check_same_thread=False
    assert thread_bound(create_engine(file_url, poolclass=SingletonThreadPool))
    assert thread_bound(create_engine("sqlite://"))
    assert thread_bound(create_engine("sqlite://", poolclass=StaticPool))
    assert thread_bound(create_engine("sqlite://").execution_options(schema_translate_map={None: "s1"}))
    assert not thread_bound(create_engine("postgresql+psycopg2://u@h/db"))
    assert calling_thread_executor([create_engine(file_url)], None) is None
    assert isinstance(calling_thread_executor([create_engine(file_url), create_engine("sqlite://")], 1.0),
                      CallingThreadExecutor)  # fmt: skip


def test_tasks_run_in_the_calling_thread_in_order() -> None:
    ran: list[tuple[str, int | None]] = []

    def task(alias: str) -> CallableTask[str]:
        return CallableTask(lambda remaining: ran.append((alias, threading.get_ident())) or alias)  # type: ignore[func-returns-value]

    outcome = run_parallel({a: task(a) for a in "abc"}, deadline=None, executor=CallingThreadExecutor())
    assert outcome.results == {"a": "a", "b": "b", "c": "c"}
    assert ran == [(a, threading.get_ident()) for a in "abc"]


def test_a_shard_whose_turn_comes_after_the_deadline_is_not_started() -> None:
    started: list[str] = []

    def slow(remaining: float | None) -> str:
        started.append("slow")
        time.sleep(0.2)
        return "slow"

    def never(remaining: float | None) -> str:
        started.append("late")
        return "late"

    tasks = {"a": CallableTask(slow), "b": CallableTask(never)}
    with pytest.raises(FanoutTimeoutError) as caught:
        run_parallel(tasks, deadline=0.1, executor=CallingThreadExecutor(0.1))
    assert started == ["slow"]
    assert caught.value.aliases == ("b",)  # type: ignore[attr-defined]
    partial = run_parallel(tasks, deadline=0.1, partial=True, executor=CallingThreadExecutor(0.1))
    assert partial.results == {"a": "slow"} and isinstance(partial.errors["b"], TimeoutError)
