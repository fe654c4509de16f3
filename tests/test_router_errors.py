"""An exception inside a router's method reaches the caller as RouterError (issue 10).

Before, a bug in a user's router surfaced as a bare ``ZeroDivisionError`` from deep inside a
flush, naming neither the router nor the model.  Now it is a ``RouterError`` naming the router,
the method and the model, with the router's exception as ``__cause__``; shardkit's own errors
that a router raises on purpose (``ShardMovingError``, ``InvalidKeyError``) pass unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit.errors import InvalidKeyError, RouterError, RoutingError
from shardkit.reshard import ShardMovingError

DBS = {"default": "sqlite://", "a": "sqlite://", "b": "sqlite://"}


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(40), default="")


class Buggy:
    """Every method raises, as a router with a bug would."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return {"x": "a"}["missing"]

    def db_for_write(self, model: Any, **hints: Any) -> str:
        raise ZeroDivisionError("division by zero in my router")

    def db_for_write_rows(self, model: Any, rows: list[dict[str, Any]], **hints: Any) -> list[str]:
        raise ValueError("bad rows")

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        raise AttributeError("no such thing")

    def allow_migrate(self, db: str, model: Any, **hints: Any) -> bool:
        raise RuntimeError("cannot decide")


class Moving:
    """A router that refuses on purpose with shardkit's own errors."""

    def db_for_write(self, model: Any, **hints: Any) -> str:
        raise ShardMovingError("key 5 is moving; retry shortly", key=5, table="notes")

    def db_for_read(self, model: Any, **hints: Any) -> str:
        raise InvalidKeyError("bad key", key="x")


def test_each_method_wraps_with_router_method_and_model() -> None:
    chain = shardkit.Cluster(DBS, [Buggy()]).router
    calls: list[tuple[str, Callable[[], object], type[BaseException]]] = [
        ("db_for_read", lambda: chain.db_for_read(Note), KeyError),
        ("db_for_write", lambda: chain.db_for_write(Note, instance=Note(id=1)), ZeroDivisionError),
        ("db_for_write_rows", lambda: chain.db_for_write_rows(Note, [{"id": 1}]), ValueError),
        ("allow_relation", lambda: chain.allow_relation(Note(id=1), Note(id=2)), AttributeError),
        ("allow_migrate", lambda: chain.allow_migrate("a", Note), RuntimeError),
    ]
    for method, call, cause in calls:
        with pytest.raises(RouterError) as info:
            call()
        err = info.value
        assert isinstance(err, RoutingError)
        assert isinstance(err.__cause__, cause), method
        assert err.method == method and err.model is Note  # type: ignore[attr-defined]
        assert isinstance(err.router, Buggy)  # type: ignore[attr-defined]
        assert f"Buggy.{method}" in str(err) and "Note" in str(err) and cause.__name__ in str(err)


def test_shardkit_errors_raised_on_purpose_pass_unchanged() -> None:
    chain = shardkit.Cluster(DBS, [Moving()]).router
    with pytest.raises(ShardMovingError) as moving:
        chain.db_for_write(Note, instance=Note(id=5))
    assert moving.value.key == 5 and moving.value.__cause__ is None  # type: ignore[attr-defined]
    with pytest.raises(InvalidKeyError) as bad:
        chain.db_for_read(Note)
    assert not isinstance(bad.value, RouterError)


def test_a_router_class_that_fails_to_build() -> None:
    class Broken:
        def __init__(self) -> None:
            raise OSError("config file missing")

    with pytest.raises(RouterError, match=r"Broken\(\) raised OSError") as info:
        shardkit.Cluster(DBS, [Broken])
    assert isinstance(info.value.__cause__, OSError)


def test_through_a_session_nothing_is_written(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "a"), routers=[Buggy()])
    try:
        with pytest.raises(RouterError, match="allow_migrate"):
            cluster.create_all(Base)
        plain = shardkit.Cluster({alias: cluster.spec(alias).url for alias in cluster.aliases})
        plain.create_all(Base)
        plain.dispose()
        with cluster.session() as s:
            s.add(Note(id=1, body="x"))
            with pytest.raises(RouterError, match=r"Buggy\.db_for_write") as info:
                s.commit()
            assert isinstance(info.value.__cause__, ZeroDivisionError)
            s.rollback()
            with pytest.raises(RouterError, match=r"Buggy\.db_for_read"):
                s.scalars(select(Note)).all()
            with pytest.raises(RouterError, match=r"Buggy\.db_for_write"):  # the statement, or its rows
                s.execute(insert(Note), [{"id": 2, "body": "y"}])
        for alias in ("default", "a"):
            with cluster.engine(alias).connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM notes")).scalar() == 0
    finally:
        cluster.dispose()
