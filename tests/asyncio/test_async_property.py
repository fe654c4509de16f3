"""The fan-out equivalence proof, through the session, on both APIs.

The statements, data sets and shard assignments are the sync property test's
(``tests/fanout/test_fanout_property.py``), as are its 4 shard databases + 1 holding every
row.  Here each statement runs through a cluster's session over those databases
(``shardkit_using=`` the 4 shards: a fan-out) -- the sync session, and the async one on
aiosqlite, asyncpg and psycopg 3, where the shards run as coroutines on the loop -- and
must equal the statement run on the one database.  Fewer examples than the sync test: the
merge is the same code; what differs is how the shards run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings

import shardkit

from ..fanout.conftest import Layout, pg_layout, sqlite_layout
from ..fanout.test_fanout_property import _fetch, _same_multiset, _same_row, cases
from .conftest import Api, make_api

__all__ = ["pg_layout", "sqlite_layout"]  # fixtures, imported

_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def _cluster(layout: Layout) -> shardkit.Cluster:
    urls = {"default": layout.single.url.render_as_string(hide_password=False)}
    urls.update(
        (alias, engine.url.render_as_string(hide_password=False))
        for alias, engine in zip(layout.aliases, layout.shards, strict=True)
    )
    return shardkit.Cluster(urls)


class World:
    def __init__(self, layout: Layout, api: Api) -> None:
        self.layout = layout
        self.api = api
        self.cluster = api.prepare(_cluster(layout))


def _world(layout: Layout, name: str) -> Iterator[World]:
    api = make_api(name)
    world = World(layout, api)
    try:
        yield world
    finally:
        api.close()
        world.cluster.dispose()


@pytest.fixture(scope="module", params=["sync", "aiosqlite"])
def sqlite_world(request: pytest.FixtureRequest, sqlite_layout: Layout) -> Iterator[World]:
    yield from _world(sqlite_layout, request.param)


@pytest.fixture(scope="module", params=["sync", "asyncpg", "psycopg"])
def pg_world(request: pytest.FixtureRequest, pg_layout: Layout) -> Iterator[World]:
    yield from _world(pg_layout, request.param)


def check(world: World, case: Any) -> None:
    rows, assignment, stmt, ordered = case
    layout = world.layout
    layout.load(rows, assignment)
    note(str(stmt.compile(dialect=layout.single.dialect, compile_kwargs={"literal_binds": True})))
    expected = _fetch(layout.single, stmt)
    fanned = stmt.execution_options(shardkit_using=list(layout.aliases))

    def body(s: shardkit.ShardSession) -> tuple[list[tuple[Any, ...]], tuple[str, ...]]:
        result = s.execute(fanned)
        return [tuple(r) for r in result], tuple(shardkit.shards_of(result))

    got, shards = world.api.run(world.cluster, body)
    note(f"expected={expected}\ngot     ={got}")
    assert shards == tuple(layout.aliases)
    if ordered:
        assert len(got) == len(expected) and all(_same_row(e, g) for e, g in zip(expected, got, strict=True)), (
            "rows differ (ordered)"
        )
    else:
        assert _same_multiset(expected, got), "rows differ (as multisets)"


@_SETTINGS
@given(case=cases())
def test_session_fanout_equals_one_database_sqlite(sqlite_world: World, case: Any) -> None:
    check(sqlite_world, case)


@pytest.mark.postgres
@_SETTINGS
@given(case=cases())
def test_session_fanout_equals_one_database_postgresql(pg_world: World, case: Any) -> None:
    check(pg_world, case)
