"""Fixtures of the port of SQLAlchemy's horizontal_shard suite: one test body, every layout.

``world`` runs a test once per layout of the peer's suite, on SQLite (DistinctEngine,
LegacyAPI, AttachedFile, TableNameConvention) and on PostgreSQL (the same three, plus MultipleDialect,
which the peer also runs only with PostgreSQL: two shards on SQLite, two on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import PG_URL, DatabaseFactory, require_server
from .weather import World, build_world, dispose, pg_databases

WORLDS = [
    ("sqlite", "distinct_engine"),
    ("sqlite", "legacy_api"),
    ("sqlite", "attached_file"),
    ("sqlite", "table_name_convention"),
    ("postgresql", "distinct_engine"),
    ("postgresql", "attached_file"),
    ("postgresql", "table_name_convention"),
    ("postgresql", "multiple_dialect"),
]


@pytest.fixture(scope="session")
def pg_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The PostgreSQL databases of the layouts, made once (each test recreates the tables)."""
    require_server(PG_URL, "pg")
    factory = DatabaseFactory(Path(tmp_path_factory.mktemp("sa_suite_pg")))
    try:
        yield pg_databases(factory)
    finally:
        factory.drop_all()


def _world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    backend, layout = request.param
    pg = request.getfixturevalue("pg_urls") if backend == "postgresql" else None
    w = build_world(layout, backend, tmp_path, pg)
    try:
        yield w
    finally:
        dispose(w)


@pytest.fixture(params=WORLDS, ids=[f"{b}-{layout}" for b, layout in WORLDS])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    yield from _world(request, tmp_path)


DISTINCT = [w for w in WORLDS if w[1] in ("distinct_engine", "legacy_api")]


@pytest.fixture(params=DISTINCT, ids=[f"{b}-{layout}" for b, layout in DISTINCT])
def distinct_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The DistinctEngine layout only (the peer's textual-SQL tests name tables as they are)."""
    yield from _world(request, tmp_path)
