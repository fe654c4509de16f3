"""The public face: what ``import shardkit`` promises."""

from __future__ import annotations

import inspect

import shardkit
from shardkit import errors


def test_all_is_unique_and_importable() -> None:
    # its order is kept by ruff (RUF022: isort-style, constants first)
    assert len(set(shardkit.__all__)) == len(shardkit.__all__)
    for name in shardkit.__all__:
        assert hasattr(shardkit, name), name


def test_contract_names() -> None:
    for name in ("Cluster", "using", "db_of", "HashRing", "HashRingRouter", "ModelMixin", "Manager"):
        assert name in shardkit.__all__
    assert issubclass(shardkit.ShardSession, __import__("sqlalchemy.orm").orm.Session)


def test_every_error_derives_from_the_base() -> None:
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__]
    assert classes
    for cls in classes:
        assert issubclass(cls, errors.ShardkitError), cls
    assert sorted(errors.__all__) == sorted(c.__name__ for c in classes)


def test_errors_keep_their_context() -> None:
    err = errors.UnknownAliasError("unknown database alias 'x'", alias="x")
    assert err.alias == "x"
    assert str(err) == "unknown database alias 'x'"
    failed = errors.ShardQueryError("shard s1 failed", errors={"s1": RuntimeError("boom")})
    assert list(failed.errors) == ["s1"]
