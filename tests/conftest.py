"""Shared fixtures: real databases for the behaviour suites.

PostgreSQL is taken from ``SHARDKIT_PG_URL`` (default: the local trust-auth
server) and MariaDB/MySQL from ``SHARDKIT_MYSQL_URL``.  Each test that needs
a server creates its own databases with unique names and drops them after.
When a server cannot be reached the test is skipped with a loud reason, except
under ``CI=true``, where that is a failure: CI must never go green by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import URL

PG_URL = os.environ.get("SHARDKIT_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
MYSQL_URL = os.environ.get("SHARDKIT_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
IN_CI = os.environ.get("CI", "").lower() == "true"

BACKENDS = ["sqlite", "postgresql"]

_reachable: dict[str, str | None] = {}


def server_problem(url: str) -> str | None:
    """None if the server at ``url`` answers, else why not (cached per run)."""
    if url not in _reachable:
        try:
            engine = create_engine(url, connect_args=_connect_timeout(url))
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _reachable[url] = None
        except Exception as exc:  # any failure to connect means "not reachable"
            _reachable[url] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return _reachable[url]


def _connect_timeout(url: str) -> dict[str, int]:
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        return {"connect_timeout": 3}
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": 3}
    return {}


def require_server(url: str, what: str) -> None:
    problem = server_problem(url)
    if problem is None:
        return
    safe = make_url(url).render_as_string(hide_password=True)
    message = f"!!! {what} at {safe} is NOT REACHABLE ({problem}); set SHARDKIT_{what.upper()}_URL"
    if IN_CI:
        pytest.fail(f"{message} -- under CI=true this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


class DatabaseFactory:
    """Creates databases (SQLite files or server databases) and drops them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._server_dbs: list[tuple[str, str]] = []

    def url(self, backend: str, label: str = "db") -> str:
        if backend == "sqlite":
            return f"sqlite:///{self.tmp_path / f'{label}-{uuid.uuid4().hex[:6]}.db'}"
        name = f"shardkit_t_{uuid.uuid4().hex[:10]}_{label}".lower()
        if backend == "postgresql":
            require_server(PG_URL, "pg")
            admin_url = PG_URL
            create = f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        elif backend == "mysql":
            require_server(MYSQL_URL, "mysql")
            admin_url = MYSQL_URL
            create = f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        else:  # pragma: no cover
            raise ValueError(backend)
        engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(create))
        engine.dispose()
        self._server_dbs.append((backend, name))
        return make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def urls(self, backend: str, *labels: str) -> dict[str, str]:
        return {label: self.url(backend, label) for label in labels}

    def drop_all(self) -> None:
        for backend, name in self._server_dbs:
            if backend == "postgresql":
                engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
                drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            else:
                engine = create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
                drop = f"DROP DATABASE IF EXISTS `{name}`"
            with engine.connect() as conn:
                conn.execute(text(drop))
            engine.dispose()
        self._server_dbs.clear()


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[DatabaseFactory]:
    """Make databases for a test: ``databases.url("postgresql", "shard1")``."""
    factory = DatabaseFactory(tmp_path)
    yield factory
    factory.drop_all()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Runs a test once on SQLite files and once on PostgreSQL databases."""
    name: str = request.param
    if name == "postgresql":
        require_server(PG_URL, "pg")
    return name


@pytest.fixture
def make_urls(databases: DatabaseFactory, backend: str) -> Callable[..., dict[str, str]]:
    """``make_urls("default", "shard1")`` -> alias -> URL on this test's backend."""

    def make(*labels: str) -> dict[str, str]:
        return databases.urls(backend, *labels)

    return make


class StatementLog:
    """Records the statements each alias's engine runs (a listener on every engine)."""

    def __init__(self, cluster: Any) -> None:
        self.seen: list[tuple[str, str]] = []
        for alias in cluster.aliases:
            event.listen(cluster.engine(alias), "before_cursor_execute", self._hook(alias))

    def _hook(self, alias: str) -> Callable[..., None]:
        def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.seen.append((alias, statement))

        return hook

    def aliases(self, contains: str = "") -> list[str]:
        """Aliases of the statements whose SQL contains ``contains``, in order."""
        return [a for a, s in self.seen if contains in s]

    def touching(self, table: str) -> list[str]:
        """Aliases of the statements that read from or insert into ``table``."""
        return [a for a, s in self.seen if f"FROM {table}" in s or f"INTO {table}" in s]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    try:
        from shardkit import ring

        lines.append(f"shardkit ring implementation: {ring.IMPLEMENTATION}")
    except Exception as exc:  # the header must never break the run
        lines.append(f"shardkit ring implementation: unavailable ({exc})")
    for what, url in (("PostgreSQL", PG_URL), ("MariaDB", MYSQL_URL)):
        problem = server_problem(url)
        safe: URL | str = make_url(url).render_as_string(hide_password=True)
        lines.append(f"{what}: {safe} " + ("reachable" if problem is None else f"NOT REACHABLE ({problem})"))
    return lines
