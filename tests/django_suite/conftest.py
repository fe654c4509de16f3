"""Fixtures of the Django port: two databases, "default" and "other", on SQLite files and on
PostgreSQL; the cluster is active (Django's settings) and its routers can be swapped for a
block, as Django's ``override_settings(DATABASE_ROUTERS=[...])`` does."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select

import shardkit
from shardkit.errors import ShardkitError

from .models import Base, book_authors


def _db_of(obj: Any) -> str | None:
    try:
        return shardkit.db_of(obj)
    except ShardkitError:
        return None


@contextmanager
def override_routers(
    cluster: shardkit.Cluster, routers: Sequence[Any], aliases: Sequence[str] | None = None
) -> Iterator[shardkit.RouterChain]:
    """``override_settings(DATABASE_ROUTERS=routers)`` for ``cluster``."""
    previous = cluster.router
    cluster.router = shardkit.RouterChain(routers, aliases or cluster.aliases, db_of=_db_of)
    try:
        yield cluster.router
    finally:
        cluster.router = previous


@pytest.fixture
def multidb(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(Base)  # every table on both databases, as Django's test databases
    with cluster.activate():
        yield cluster
    cluster.dispose()


def through_count(cluster: shardkit.Cluster, alias: str) -> int:
    """``Book.authors.through.objects.using(alias).count()``."""
    with cluster.engine(alias).connect() as conn:
        return int(conn.execute(select(func.count()).select_from(book_authors)).scalar_one())


def through_delete(cluster: shardkit.Cluster, alias: str) -> None:
    """``Book.authors.through.objects.using(alias).delete()``."""
    with cluster.engine(alias).begin() as conn:
        conn.execute(book_authors.delete())
