"""The router chain: order, None passes on, defaults, old names, bad answers."""

from __future__ import annotations

from typing import Any

import pytest

import shardkit
from shardkit.errors import InvalidRouteError, RouterImportError
from shardkit.typing import ShardTargets

DBS = {"default": "sqlite://", "a": "sqlite://", "b": "sqlite://"}


class Model:
    pass


class Passes:
    def db_for_read(self, model: Any, **hints: Any) -> None:
        return None

    def db_for_write(self, model: Any, **hints: Any) -> None:
        return None


class ToA:
    calls: list[str] = []

    def db_for_read(self, model: Any, **hints: Any) -> str:
        ToA.calls.append("read")
        return "a"


class ToB:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "b"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "b"


def test_first_answer_wins_and_none_passes() -> None:
    chain = shardkit.Cluster(DBS, [Passes(), ToA, ToB()]).router
    assert chain.db_for_read(Model) == "a"
    assert chain.db_for_write(Model) == "b"  # ToA has no db_for_write: not asked


def test_defaults_when_all_pass() -> None:
    chain = shardkit.Cluster(DBS, [Passes()]).router
    assert chain.db_for_read(Model) == "default"
    assert chain.db_for_write(Model) == "default"
    assert chain.allow_migrate("a", Model) is True
    assert chain.allow_relation(object(), object()) is True


def test_dotted_paths_and_classes() -> None:
    cluster = shardkit.Cluster(DBS, ["tests.app.routers.AuthRouter", "tests.app.routers.PrimaryReplicaRouter"])
    names = [type(r).__name__ for r in cluster.router.routers]
    assert names == ["AuthRouter", "PrimaryReplicaRouter"]


@pytest.mark.parametrize("path", ["tests.app.nope.Router", "tests.app.routers.NoSuchRouter", "NoDots"])
def test_router_that_does_not_import(path: str) -> None:
    with pytest.raises(RouterImportError, match=path.replace(".", r"\.")) as info:
        shardkit.Cluster(DBS, [path])
    assert isinstance(info.value, ImportError)


def test_router_returning_unknown_alias() -> None:
    class Typo:
        def db_for_read(self, model: Any, **hints: Any) -> str:
            return "shard_nine"

    chain = shardkit.Cluster(DBS, [Typo()]).router
    with pytest.raises(InvalidRouteError, match=r"Typo\.db_for_read.*'shard_nine'.*Model") as info:
        chain.db_for_read(Model)
    assert info.value.alias == "shard_nine"


def test_several_aliases_become_targets() -> None:
    class Both:
        def db_for_read(self, model: Any, **hints: Any) -> list[str]:
            return ["a", "b", "a"]

    target = shardkit.Cluster(DBS, [Both()]).router.db_for_read(Model)
    assert isinstance(target, ShardTargets)
    assert target.aliases == ("a", "b")


def test_write_of_an_instance_must_be_one_alias() -> None:
    class Both:
        def db_for_write(self, model: Any, **hints: Any) -> list[str]:
            return ["a", "b"]

    chain = shardkit.Cluster(DBS, [Both()]).router
    with pytest.raises(InvalidRouteError, match="several aliases"):
        chain.db_for_write(Model, instance=Model())


def test_instance_db_is_the_fallback() -> None:
    cluster = shardkit.Cluster(DBS, [Passes()])
    chain = shardkit.RouterChain([Passes()], cluster.aliases, db_of=lambda obj: "b")
    assert chain.db_for_write(Model, instance=Model()) == "b"
    assert chain.db_for_read(Model, instance=Model()) == "b"
    assert chain.db_for_read(Model) == "default"


def test_allow_syncdb_is_the_old_name_of_allow_migrate() -> None:
    class Blog:
        app_label = "blog"

    chain = shardkit.Cluster(DBS, ["tests.app.routers.LegacySyncdbRouter"]).router
    assert chain.allow_migrate("default", Blog) is True
    assert chain.allow_migrate("a", Blog) is False
    assert chain.allow_migrate("a", Model) is True


def test_allow_relation_default_compares_dbs() -> None:
    dbs = {"x": "a", "y": "a", "z": "b"}
    objs = {name: type(name, (), {})() for name in dbs}
    lookup = {id(o): dbs[n] for n, o in objs.items()}
    chain = shardkit.RouterChain([], DBS, db_of=lambda o: lookup[id(o)])
    assert chain.allow_relation(objs["x"], objs["y"]) is True
    assert chain.allow_relation(objs["x"], objs["z"]) is False
