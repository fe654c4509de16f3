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


def test_the_tree_in_the_docstring_names_every_error() -> None:
    tree = (errors.__doc__ or "").split("::", 1)[1].split("\n\n", 2)[1]
    drawn = {line.split("+--")[-1].split()[0] for line in tree.splitlines() if line.strip()}
    assert drawn == set(errors.__all__)


def test_no_error_class_outside_the_tree() -> None:
    """Every exception class of shardkit is defined in shardkit.errors (the one tree);
    the model errors of ``_manager`` are re-exported there under their old names."""
    import importlib
    import pkgutil

    from shardkit import _manager

    assert _manager.ObjectDoesNotExist is shardkit.ObjectDoesNotExist is errors.ObjectDoesNotExist
    assert _manager.FieldError is errors.FieldError
    assert _manager.MultipleObjectsReturned is errors.MultipleObjectsReturned
    outside = []
    for info in pkgutil.walk_packages(shardkit.__path__, "shardkit."):
        if info.name in ("shardkit.errors", "shardkit.__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            defined_here = inspect.isclass(obj) and obj.__module__ == info.name
            if defined_here and issubclass(obj, errors.ShardkitError):
                outside.append(f"{info.name}.{name}")
    assert outside == []
