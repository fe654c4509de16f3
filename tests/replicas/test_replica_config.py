"""Replicas declared in DATABASES: validation, policies, health -- on SQLite files (no server needed).

A SQLite "replica" here is just another alias the policy may pick; which alias ran a statement is
read from each engine's own statement log.  The lag check is PostgreSQL's (``test_replicas_pg.py``);
on other backends a replica is healthy when it answers.
"""

from __future__ import annotations

import logging
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit import HashRing, HashRingRouter
from shardkit._replicas import replicas_of
from shardkit.errors import ConfigError


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "replica_items"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str]


def sqlite(tmp_path: Path, name: str) -> dict[str, Any]:
    return {"ENGINE": "sqlite", "NAME": str(tmp_path / f"{name}.db")}


def test_replicas_are_aliases_of_databases(tmp_path: Path) -> None:
    cluster = shardkit.Cluster(
        {
            "default": sqlite(tmp_path, "default"),
            "s0": {**sqlite(tmp_path, "s0"), "REPLICAS": ["s0_r1", "s0_r2"], "MAX_REPLICA_LAG": 2},
            "s0_r1": sqlite(tmp_path, "s0"),
            "s0_r2": sqlite(tmp_path, "s0"),
        }
    )
    spec = cluster.spec("s0")
    assert spec.replicas == ("s0_r1", "s0_r2")
    assert spec.replica_policy == "round_robin" and spec.max_replica_lag == 2.0
    assert cluster.spec("s0_r1").replica_of == "s0" and spec.replica_of is None
    assert cluster.spec("default").replicas == ()


@pytest.mark.parametrize(
    ("databases", "alias", "words"),
    [
        ({"s0": {"REPLICAS": ["nope"]}}, "s0", "'nope' is not an alias"),
        ({"s0": {"REPLICAS": ["r1"]}, "r1": {"REPLICAS": ["r2"]}, "r2": {}}, "r1", "a replica of a replica"),
        ({"s0": {"REPLICAS": ["r1"]}, "r1": {"REPLICAS": ["s0"]}}, "r1", "a cycle"),
        ({"s0": {"REPLICAS": ["s0"]}}, "s0", "its own replica"),
        ({"s0": {"REPLICAS": ["r1"]}, "s1": {"REPLICAS": ["r1"]}, "r1": {}}, "r1", "already a replica of 's0'"),
        ({"s0": {"REPLICAS": "r1"}, "r1": {}}, "s0", "REPLICAS must be a list"),
        ({"s0": {"REPLICAS": {"r1": 0}}, "r1": {}}, "s0", "positive number"),
        ({"s0": {"REPLICAS": ["r1"], "REPLICA_POLICY": "fastest"}, "r1": {}}, "s0", "REPLICA_POLICY must be"),
        ({"s0": {"REPLICAS": ["r1"], "MAX_REPLICA_LAG": "5s"}, "r1": {}}, "s0", "MAX_REPLICA_LAG must be"),
        ({"s0": {"MAX_REPLICA_LAG": 5}}, "s0", "without REPLICAS"),
        (
            {"r0": {"REPLICAS": ["default"]}},
            "default",
            "cannot be a replica",
        ),
    ],
)
def test_bad_replica_settings_name_the_alias(
    tmp_path: Path, databases: dict[str, dict[str, Any]], alias: str, words: str
) -> None:
    full: dict[str, Any] = {"default": sqlite(tmp_path, "default")}
    for name, extra in databases.items():
        full[name] = {**sqlite(tmp_path, name), **extra}
    with pytest.raises(ConfigError, match=words) as caught:
        shardkit.Cluster(full)
    assert caught.value.alias == alias  # type: ignore[attr-defined]
    assert f"'{alias}'" in str(caught.value)


def test_a_ring_cannot_name_a_replica(tmp_path: Path) -> None:
    settings = tmp_path / "replica_settings.py"
    settings.write_text(
        textwrap.dedent(
            f"""
            from shardkit import HashRing
            DATABASES = {{
                "default": "sqlite:///{tmp_path}/d.db",
                "s0": {{"ENGINE": "sqlite", "NAME": "{tmp_path}/s0.db", "REPLICAS": ["s0_r1"]}},
                "s0_r1": "sqlite:///{tmp_path}/s0.db",
            }}
            SHARDKIT_RING = HashRing(["s0", "s0_r1"])
            """
        )
    )
    with pytest.raises(ConfigError, match="s0_r1 are replicas"):
        shardkit.load_settings(str(settings))


def spread_cluster(tmp_path: Path, **options: Any) -> tuple[shardkit.Cluster, list[str]]:
    databases: dict[str, Any] = {
        "default": sqlite(tmp_path, "default"),
        "s0": {**sqlite(tmp_path, "s0"), **options},
        "s0_r1": sqlite(tmp_path, "s0"),
        "s0_r2": sqlite(tmp_path, "s0"),
        "s0_r3": sqlite(tmp_path, "s0"),
    }
    cluster = shardkit.Cluster(databases, routers=[HashRingRouter(HashRing(["s0"]))])
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add(Item(id=1, name="one"))
        s.commit()
    used: list[str] = []
    for alias in cluster.aliases:
        event.listen(
            cluster.engine(alias),
            "before_cursor_execute",
            lambda conn, cur, sql, *a, _alias=alias: used.append(_alias) if "replica_items" in sql else None,
        )
    return cluster, used


def read(cluster: shardkit.Cluster, times: int, **execution_options: Any) -> None:
    with cluster.session() as s:
        for _ in range(times):
            assert s.scalars(select(Item).where(Item.id == 1), execution_options=execution_options).one().name == "one"


def test_create_all_skips_replicas(tmp_path: Path) -> None:
    cluster, _ = spread_cluster(tmp_path, REPLICAS=["s0_r1", "s0_r2", "s0_r3"])
    created = cluster.create_all(Base)
    assert created["s0"] == ["replica_items"]
    assert created["s0_r1"] == created["s0_r2"] == created["s0_r3"] == []
    cluster.dispose()


def test_round_robin(tmp_path: Path) -> None:
    cluster, used = spread_cluster(tmp_path, REPLICAS=["s0_r1", "s0_r2", "s0_r3"])
    read(cluster, 6)
    assert sorted(used[:3]) == ["s0_r1", "s0_r2", "s0_r3"] and used[3:] == used[:3]
    cluster.dispose()


def test_random(tmp_path: Path) -> None:
    cluster, used = spread_cluster(tmp_path, REPLICAS=["s0_r1", "s0_r2", "s0_r3"], REPLICA_POLICY="random")
    read(cluster, 300)
    counts = Counter(used)
    assert set(counts) == {"s0_r1", "s0_r2", "s0_r3"} and min(counts.values()) > 50, counts
    cluster.dispose()


def test_weighted(tmp_path: Path) -> None:
    cluster, used = spread_cluster(tmp_path, REPLICAS={"s0_r1": 8, "s0_r2": 1, "s0_r3": 1})
    assert cluster.spec("s0").replica_policy == "weighted"
    read(cluster, 500)
    counts = Counter(used)
    assert counts["s0_r1"] > 3 * max(counts["s0_r2"], counts["s0_r3"]) > 0, counts
    cluster.dispose()


def test_writes_and_primary_reads_go_to_the_primary(tmp_path: Path) -> None:
    cluster, used = spread_cluster(tmp_path, REPLICAS=["s0_r1"])
    read(cluster, 1, shardkit_primary=True)
    assert used == ["s0"]
    used.clear()
    with cluster.session() as s:
        s.scalars(select(Item).options(shardkit.using("s0", primary=True))).one()
        item = s.scalars(select(Item).where(Item.id == 1)).one()  # the replica
        item.name = "uno"
        s.commit()  # the write: the primary
    assert used[0] == "s0" and used[1] == "s0_r1" and used[2:] == ["s0"], used
    assert repr(shardkit.using("s0", primary=True)) == "using('s0', primary=True)"
    cluster.dispose()


def test_unreachable_replica_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster, used = spread_cluster(tmp_path, REPLICAS=["s0_r1", "s0_r2"])
    replicas = replicas_of(cluster)
    assert replicas is not None

    def broken(alias: str) -> Any:
        raise OSError(f"{alias} is down")

    replicas._measure = broken  # type: ignore[method-assign]  # the check's step, reached from outside
    with caplog.at_level(logging.WARNING, logger="shardkit._replicas"):
        read(cluster, 2)
    assert used == ["s0", "s0"]
    messages = [r.getMessage() for r in caplog.records if r.name == "shardkit._replicas"]
    assert any("replica s0_r1 of s0 skipped: unreachable (OSError: s0_r1 is down)" in m for m in messages), messages
    assert len(messages) == 2  # once per replica, not once per read
    cluster.dispose()


def test_locking_reads_go_to_the_primary(tmp_path: Path) -> None:
    cluster, used = spread_cluster(tmp_path, REPLICAS=["s0_r1"])
    with cluster.session() as s:
        s.scalars(select(Item).where(Item.id == 1).with_for_update()).one()  # the fast path
        s.scalars(select(Item).where(Item.id == 1).with_for_update().options(shardkit.using("s0"))).one()
        s.scalars(select(Item).where(Item.id == 1)).one()
    assert used == ["s0", "s0", "s0_r1"], used
    cluster.dispose()


def test_replicas_in_a_toml_settings_file(tmp_path: Path) -> None:
    settings = tmp_path / "shardkit.toml"
    settings.write_text(
        textwrap.dedent(
            f"""
            ring = {{shards = ["s0"]}}
            [databases.default]
            ENGINE = "sqlite"
            NAME = "{tmp_path}/d.db"
            [databases.s0]
            ENGINE = "sqlite"
            NAME = "{tmp_path}/s0.db"
            REPLICAS = {{s0_r1 = 3, s0_r2 = 1}}
            MAX_REPLICA_LAG = 2.5
            [databases.s0_r1]
            ENGINE = "sqlite"
            NAME = "{tmp_path}/s0.db"
            [databases.s0_r2]
            ENGINE = "sqlite"
            NAME = "{tmp_path}/s0.db"
            """
        )
    )
    cluster = shardkit.load_settings(str(settings)).cluster
    spec = cluster.spec("s0")
    assert spec.replicas == ("s0_r1", "s0_r2") and spec.replica_weights == (3.0, 1.0)
    assert spec.replica_policy == "weighted" and spec.max_replica_lag == 2.5
    assert cluster.spec("s0_r2").replica_of == "s0"
