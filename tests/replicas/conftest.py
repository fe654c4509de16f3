"""Fixtures for the replica tests: one real PostgreSQL streaming replica per test session.

When the replica cannot be started (no server, no binaries, no permission) every test that uses it
is skipped with a loud reason -- and under ``CI=true`` that is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI, PG_URL, require_server
from tests.replicas.pgreplica import PgReplica


@pytest.fixture(scope="session")
def pg_replica() -> Iterator[PgReplica]:
    require_server(PG_URL, "pg")
    replica = PgReplica(PG_URL)
    try:
        replica.start()
    except Exception as exc:  # any reason the replica cannot run: skip loudly (fail under CI)
        replica.stop()
        message = f"!!! cannot start a PostgreSQL streaming replica of {PG_URL.split('@')[-1]}: {exc}"
        if IN_CI:
            pytest.fail(f"{message} -- under CI=true this is a failure, not a skip", pytrace=False)
        pytest.skip(message)
    try:
        yield replica
    finally:
        replica.stop()


@pytest.fixture
def replica(pg_replica: PgReplica) -> Iterator[PgReplica]:
    """The session's replica, replaying again after each test (a test may pause it)."""
    yield pg_replica
    with contextlib.suppress(Exception):  # the replica may be gone; the session's teardown removes it
        pg_replica.resume()
