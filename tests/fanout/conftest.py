"""Fixtures of the fan-out tests: 4 shard databases + 1 holding every row.

The PostgreSQL server is ``tests.conftest.PG_URL``; ``require_server`` skips
loudly when it is unreachable, or fails under ``CI=true``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ..conftest import PG_URL, require_server
from .strategies import metadata, users

N_SHARDS = 4


class Layout:
    """Four shard engines plus one engine holding all rows, all with ``users``."""

    def __init__(self, dialect_name: str, shards: list[Engine], single: Engine) -> None:
        self.dialect_name = dialect_name
        self.shards = shards
        self.single = single
        self.aliases = [f"shard{i}" for i in range(len(shards))]

    def load(self, rows: list[dict[str, Any]], assignment: list[int]) -> None:
        parts: list[list[dict[str, Any]]] = [[] for _ in self.shards]
        for row, shard in zip(rows, assignment, strict=True):
            parts[shard].append(row)
        for engine, part in [*zip(self.shards, parts, strict=True), (self.single, rows)]:
            with engine.begin() as conn:
                conn.execute(users.delete())
                if part:
                    conn.execute(users.insert(), part)


@pytest.fixture(scope="session")
def sqlite_layout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layout]:
    base: Path = tmp_path_factory.mktemp("fanout_sqlite")
    engines = [
        sa.create_engine(f"sqlite:///{base / f'db{i}.sqlite'}", connect_args={"check_same_thread": False})
        for i in range(N_SHARDS + 1)
    ]
    for engine in engines:
        metadata.create_all(engine)
    yield Layout("sqlite", engines[:N_SHARDS], engines[N_SHARDS])
    for engine in engines:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_layout() -> Iterator[Layout]:
    require_server(PG_URL, "pg")
    url = make_url(PG_URL)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    names = [f"shardkit_t_{secrets.token_hex(4)}_{i}" for i in range(N_SHARDS + 1)]
    engines: list[Engine] = []
    try:
        with admin.connect() as conn:
            for name in names:
                # C collation: the database orders text by code point, as the merge does.
                conn.execute(
                    sa.text(
                        f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
                    )
                )
        for name in names:
            engine = sa.create_engine(url.set(database=name))
            metadata.create_all(engine)
            engines.append(engine)
        yield Layout("postgresql", engines[:N_SHARDS], engines[N_SHARDS])
    finally:
        for engine in engines:
            engine.dispose()
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
