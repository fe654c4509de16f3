"""Fixtures of the fan-out tests: 4 shard databases + 1 holding every row.

``pg_url_or_skip()`` is the reusable reachability check: an unreachable
PostgreSQL server skips the test loudly, or fails it when ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from .strategies import metadata, users

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
N_SHARDS = 4


def pg_url_or_skip(env: str = "SHARDKIT_PG_URL", default: str = DEFAULT_PG_URL) -> str:
    """The PostgreSQL server URL from ``env``, checked by connecting.

    Unreachable: ``pytest.skip`` with the reason, except with ``CI=true`` where
    the test fails (CI must never silently skip the PostgreSQL suite).
    """
    url = os.environ.get(env, default)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as err:
        shown = make_url(url).render_as_string(hide_password=True)
        reason = f"PostgreSQL NOT REACHABLE at {shown} ({type(err).__name__}); set {env}. Skipping PG tests!"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        engine.dispose()
    return url


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
    url = make_url(pg_url_or_skip())
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
