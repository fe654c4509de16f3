"""The sync suite's own test functions, unchanged, on the async stack (see ``AsyncStack``).

The relations suite (``tests/test_relations.py``: relation checks at assignment and at
flush, co-location of many-to-many link rows and one-to-ones, the cross-shard write
setting) and the session fan-out suite (``tests/test_fanout_session.py``: merged ORDER BY,
LIMIT, aggregates, GROUP BY, DISTINCT, identity tokens, co-located joins, keyset pages,
explain(), routing by key) run on SQLite (aiosqlite) and PostgreSQL (asyncpg, psycopg 3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shardkit

from .. import test_fanout_session as fanout_session
from .. import test_relations as relations
from ..test_fanout_session import World, world
from ..test_relations import cluster, m2m_cluster, o2o_cluster
from .conftest import AsyncStack, run_unchanged

__all__ = ["cluster", "m2m_cluster", "o2o_cluster", "world"]  # fixtures, imported


def _tests(module: Any, names: list[str] | None = None) -> list[Any]:
    found = [getattr(module, n) for n in dir(module) if n.startswith("test_") and callable(getattr(module, n))]
    found.sort(key=lambda f: f.__code__.co_firstlineno)
    return [f for f in found if names is None or f.__name__ in names]


#: (backend, PostgreSQL async driver): SQLite runs on aiosqlite whatever the driver, so once
STACKS = pytest.mark.parametrize(
    ("backend", "driver"),
    [("sqlite", "asyncpg"), ("postgresql", "asyncpg"), ("postgresql", "psycopg")],
    ids=["aiosqlite", "asyncpg", "psycopg"],
)


@STACKS
@pytest.mark.parametrize("test", _tests(relations), ids=lambda f: f.__name__)
def test_relations_suite(
    test: Callable[..., Any], backend: str, driver: str, async_stack: AsyncStack, request: pytest.FixtureRequest
) -> None:
    run_unchanged(async_stack, request, test)


@pytest.fixture
def s(world: World) -> Iterator[shardkit.ShardSession]:
    # the suite's session fixture, made inside the test (its session() is the async stack's)
    yield world.cluster.session()


# the manager API uses the active cluster's autocommit session, not the async session's; the
# recorder counts the statements of the sync engines
_SKIP = {
    "test_manager_api_fans_out",
    "test_key_equality_goes_to_one_shard",
    "test_key_in_list_goes_to_owning_shards_only",
    "test_sql_in_explain_matches_what_runs",
}


@pytest.mark.parametrize(
    "test", [t for t in _tests(fanout_session) if t.__name__ not in _SKIP], ids=lambda f: f.__name__
)
def test_fanout_session_suite(
    test: Callable[..., Any], async_stack: AsyncStack, world: World, request: pytest.FixtureRequest
) -> None:
    if world.backend == "sqlite" and async_stack.driver != "asyncpg":
        pytest.skip("SQLite runs on aiosqlite whatever the PostgreSQL driver: once is enough")
    run_unchanged(async_stack, request, test)


@STACKS
def test_reshard_fence_refuses_async_writers(
    backend: str, driver: str, async_stack: AsyncStack, request: pytest.FixtureRequest
) -> None:
    """The database-side fence of a reshard holds for writers on the async engines: the
    reshard suite's fence test, its writers' sessions being async sessions' (the resharder's
    own work stays on the sync engines)."""
    from ..reshard import test_dbfence

    run_unchanged(async_stack, request, test_dbfence.test_the_databases_refuse_moving_keys_while_fenced)
