"""shardkit._settings.load_settings: modules, TOML files, the environment variable, and every mistake."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardkit import HashRing, HashRingRouter
from shardkit._settings import Settings, import_object, load_settings, ring_router_of
from shardkit.errors import ConfigError


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SHARDKIT_SETTINGS", raising=False)
    names: list[str] = []

    def write(body: str) -> str:
        name = f"sk_settings_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_module_with_ring_instance(module) -> None:
    name = module(
        """
        from shardkit import HashRing
        DATABASES = {"default": "sqlite://", "s0": "sqlite://", "s1": {"ENGINE": "sqlite", "NAME": ":memory:"}}
        SHARDKIT_RING = HashRing(["s0", "s1"], vnodes=8)
        SHARDKIT_SHARD_KEYS = {"orders": "user_id"}
        SHARDKIT_METADATA = "shardkit.ids:IdGenerator"
        """
    )
    settings = load_settings(name)
    assert isinstance(settings, Settings)
    assert settings.cluster.aliases == ("default", "s0", "s1")
    assert settings.ring == HashRing(["s0", "s1"], vnodes=8)
    routers = settings.cluster.router.routers
    assert isinstance(routers[-1], HashRingRouter) and routers[-1].ring is settings.ring
    assert routers[-1].is_sharded("orders")
    assert settings.get_metadata().__name__ == "IdGenerator"
    assert settings.source == name


def test_module_ring_as_dict_json_or_router(module) -> None:
    ring = HashRing(["s0", "s1"], mode="buckets", buckets=64)
    as_dict = module(f"DATABASES = {{'default': 'sqlite://', 's0': 'sqlite://', 's1': 'sqlite://'}}\n"
                     f"SHARDKIT_RING = {ring.to_dict()!r}\n")  # fmt: skip
    assert load_settings(as_dict).ring == ring
    as_json = module(f"DATABASES = {{'default': 'sqlite://', 's0': 'sqlite://', 's1': 'sqlite://'}}\n"
                     f"SHARDKIT_RING = {json.dumps(ring.to_dict())!r}\n")  # fmt: skip
    assert load_settings(as_json).ring == ring
    by_router = module(
        """
        from shardkit import HashRing, HashRingRouter
        RING = HashRing(["s0"], vnodes=4)
        DATABASES = {"default": "sqlite://", "s0": "sqlite://"}
        DATABASE_ROUTERS = [HashRingRouter(RING)]
        """
    )
    settings = load_settings(by_router)
    assert settings.ring == HashRing(["s0"], vnodes=4)
    assert len(settings.cluster.router.routers) == 1  # no second ring router
    no_ring = module("DATABASES = {'default': 'sqlite://'}\n")
    settings = load_settings(no_ring)
    assert settings.ring is None
    with pytest.raises(ConfigError, match="define no hash ring"):
        settings.require_ring()
    with pytest.raises(ConfigError, match="no metadata"):
        settings.get_metadata()


def test_toml_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "shardkit.toml"
    path.write_text(
        textwrap.dedent(
            """
            routers = ["tests.app.routers.AuthRouter"]
            metadata = "tests.app.models:Base"

            [databases]
            default = "sqlite://"
            credentials = { engine = "sqlite", name = ":memory:" }

            [databases.s0]
            ENGINE = "postgresql"
            NAME = "s0"
            USER = "mario"
            PASSWORD = "princess_peach"
            HOST = "127.0.0.1"
            PORT = 5432

            [ring]
            shards = { s0 = 2 }
            vnodes = 16
            shard_keys = { orders = "user_id" }
            """
        )
    )
    settings = load_settings(path)
    assert settings.cluster.aliases == ("default", "credentials", "s0")
    assert "princess_peach" not in repr(settings.cluster)
    assert settings.cluster.spec("s0").url.password == "princess_peach"
    assert settings.ring == HashRing({"s0": 2}, vnodes=16)
    routers = settings.cluster.router.routers
    assert type(routers[0]).__name__ == "AuthRouter" and isinstance(routers[1], HashRingRouter)
    assert settings.metadata == "tests.app.models:Base"
    monkeypatch.setenv("SHARDKIT_SETTINGS", str(path))
    assert load_settings().cluster.aliases == settings.cluster.aliases
    monkeypatch.chdir(tmp_path)
    assert load_settings("shardkit.toml").ring == settings.ring  # relative path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[databases\n", "not valid TOML"),
        ("colour = 1\n[databases]\ndefault = 'sqlite://'\n", "unknown key(s) colour"),
        ("routers = []\n", "a [databases] table is required"),
        ("[databases]\ns0 = 'sqlite://'\n", "no 'default'"),
        ("[databases]\ndefault = 3\n", "databases.default must be"),
        ("routers = 'x'\n[databases]\ndefault = 'sqlite://'\n", "'routers' must be a list"),
        ("[databases]\ndefault = 'sqlite://'\n[ring]\nshards = ['s9']\n", "ring shard(s) s9 not in DATABASES"),
        ("[databases]\ndefault = 'sqlite://'\n[ring]\nshard = ['s9']\n", "unknown key(s) shard"),
        ("[databases]\ndefault = 'sqlite://'\n[ring]\nshards = ['default']\nmode = 'x'\n", "mode must be"),
        ("metadata = 3\n[databases]\ndefault = 'sqlite://'\n", "'metadata' must be"),
    ],
)
def test_toml_mistakes(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value).strip() or "TOML" in str(info.value)


def test_source_mistakes(module, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="settings module 'no_such_mod_xyz' not found"):
        load_settings("no_such_mod_xyz")
    with pytest.raises(ConfigError, match="SHARDKIT_SETTINGS"):
        load_settings()
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        load_settings(module("DATABASES = {'default': 'sqlite://'}\n1 / 0\n"))
    with pytest.raises(ConfigError, match="No module named 'not_there_either'"):
        load_settings(module("import not_there_either\n"))
    with pytest.raises(ConfigError, match="defines no DATABASES"):
        load_settings(module("X = 1\n"))
    with pytest.raises(ConfigError, match="differ"):
        load_settings(
            module(
                """
                from shardkit import HashRing, HashRingRouter
                DATABASES = {"default": "sqlite://", "s0": "sqlite://", "s1": "sqlite://"}
                DATABASE_ROUTERS = [HashRingRouter(HashRing(["s0"]))]
                SHARDKIT_RING = HashRing(["s1"])
                """
            )
        )
    with pytest.raises(ConfigError, match="must be a HashRing"):
        load_settings(module("DATABASES = {'default': 'sqlite://'}\nSHARDKIT_RING = 3\n"))
    with pytest.raises(ConfigError, match="does not match its layout"):
        load_settings(
            module("DATABASES = {'default': 'sqlite://'}\nSHARDKIT_RING = {'shards': ['default'], 'version': 1}\n")
        )
    monkeypatch.setenv("SHARDKIT_SETTINGS", "no_such_mod_xyz")
    with pytest.raises(ConfigError, match="no_such_mod_xyz"):
        load_settings()


def test_load_settings_takes_a_module_object(module) -> None:
    import importlib

    mod = importlib.import_module(module("DATABASES = {'default': 'sqlite://'}\n"))
    assert load_settings(mod).cluster.aliases == ("default",)
    assert load_settings(mod, deadline=3.0).cluster.deadline == 3.0


def test_import_object() -> None:
    assert import_object("shardkit:HashRing") is HashRing
    assert import_object("shardkit.HashRing") is HashRing
    assert import_object("shardkit.ring:HashRing.from_dict") == HashRing.from_dict
    for bad, message in (("nodots", "not a path"), ("shardkit:Nope", "no attribute"), ("nope_mod:X", "nope_mod")):
        with pytest.raises(ConfigError, match=message):
            import_object(bad)


RING_MODULE = """
DATABASES = {"default": "sqlite://", "s0": "sqlite://", "s1": "sqlite://"}
DATABASE_ROUTERS = ["tests.app.routers.AuthRouter"]
SHARDKIT_RING = {"shards": ["s0", "s1"], "vnodes": 16}
SHARDKIT_SHARD_KEYS = {"orders": "user_id"}
"""

RING_TOML = """
routers = ["tests.app.routers.AuthRouter"]

[databases]
default = "sqlite://"
s0 = "sqlite://"
s1 = "sqlite://"

[ring]
shards = ["s0", "s1"]
vnodes = 16
shard_keys = { orders = "user_id" }
"""


def test_every_way_in_gives_the_same_cluster(module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One loader: a module name, the module, a settings.py path, a TOML file and SHARDKIT_SETTINGS,
    through load_settings and through Cluster.from_settings, give the same aliases, chain and ring."""
    import importlib

    from shardkit import Cluster

    name = module(RING_MODULE)
    toml = tmp_path / "ring.toml"
    toml.write_text(RING_TOML)
    sources: list[Any] = [name, importlib.import_module(name), f"{tmp_path}/{name}.py", tmp_path / f"{name}.py"]
    sources += [toml, str(toml), None]
    expected = HashRing(["s0", "s1"], vnodes=16)
    for source in sources:
        if source is None:
            monkeypatch.setenv("SHARDKIT_SETTINGS", name)
        clusters = [load_settings(source).cluster, Cluster.from_settings(source)]
        for cluster in clusters:
            routers = cluster.router.routers
            assert cluster.aliases == ("default", "s0", "s1"), source
            assert [type(r).__name__ for r in routers] == ["AuthRouter", "HashRingRouter"], source
            assert ring_router_of(cluster) is routers[1] and routers[1].ring == expected, source
            assert routers[1].is_sharded("orders") and not routers[1].is_sharded("users"), source
    monkeypatch.setenv("SHARDKIT_SETTINGS", str(toml))
    assert ring_router_of(Cluster.from_settings()) is not None


def test_ring_router_of() -> None:
    from shardkit import Cluster, RouterChain

    router = HashRingRouter(HashRing(["s0"]))
    cluster = Cluster({"default": "sqlite://", "s0": "sqlite://"}, [object(), router])
    assert ring_router_of(cluster) is router
    assert ring_router_of(cluster.router) is router
    assert ring_router_of([object(), router]) is router
    assert ring_router_of(RouterChain([], ["default"])) is None
    assert ring_router_of(Cluster({"default": "sqlite://"})) is None


def test_a_cluster_subclass_gets_its_own_class(module) -> None:
    from shardkit import Cluster

    class MyCluster(Cluster):
        pass

    cluster = MyCluster.from_settings(module(RING_MODULE), deadline=4.0)
    assert type(cluster) is MyCluster and cluster.deadline == 4.0
    assert ring_router_of(cluster) is not None
