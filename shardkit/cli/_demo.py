"""``shardkit demo``: the README's embedded default, on SQLite shard files, no server needed.

Creates a cluster of SQLite shard files (``shard0.db`` ...) in a local folder, shards a
``users`` table by id on a consistent-hash ring, loads users, shows where they went, and runs
fan-out analytics across every shard.  ``default`` is an in-memory database: the demo keeps
nothing there.

The demo only ever deletes files it created itself.  It records them in a manifest
(:data:`MANIFEST`) in the folder before creating them; a re-run deletes what the manifest
lists and nothing else.  A folder that holds any other file is refused unless ``--force``
is given, and even then a file of the demo's name that the demo did not create (a
``shard0.db`` of your own) is never overwritten.  The data is drawn from ``--seed`` alone,
ids included, so the same seed places the same keys on the same shards on every run.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import click
from sqlalchemy import BigInteger, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .._cluster import Cluster
from .._session import db_of
from ..ring import HashRing, HashRingRouter
from ._common import CliError

__all__ = ["MANIFEST", "build_cluster", "demo"]

COUNTRIES = ["de", "fr", "jp", "br", "us", "in", "ng", "se"]

MANIFEST = ".shardkit-demo.json"
"""The file in the demo's folder that lists the files the demo created (and may delete)."""

_OWNED = re.compile(r"shard\d+\.db")  # the only names the demo creates, so the only ones it deletes
_SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")
_MAX_IDS = 1 << 40


class DemoBase(DeclarativeBase):
    pass


class DemoUser(DemoBase):
    """A user, sharded by its id (ids drawn from ``--seed``, so placement repeats run after run)."""

    __tablename__ = "users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    country: Mapped[str] = mapped_column(String(2))
    score: Mapped[int]


def shard_files(shards: int) -> list[str]:
    """The names of the files the demo creates for ``shards`` shards."""
    return [f"shard{i}.db" for i in range(shards)]


def build_cluster(folder: Path, shards: int) -> tuple[Cluster, HashRing]:
    """The demo's cluster: ``default`` in memory plus ``shard0..N-1``, each a SQLite file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    aliases = [f"shard{i}" for i in range(shards)]
    databases = {"default": "sqlite://"}
    databases.update({a: f"sqlite:///{folder / f'{a}.db'}" for a in aliases})
    ring = HashRing(aliases)
    return Cluster(databases, routers=[HashRingRouter(ring)]), ring


# ---------------------------------------------------------------------------- the folder
def _read_manifest(folder: Path) -> set[str]:
    """The file names a previous run recorded as its own (only names the demo creates)."""
    path = folder / MANIFEST
    if not path.exists():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = data["files"]
        if data.get("created_by") != "shardkit demo" or not isinstance(names, list):
            raise ValueError("not a demo manifest")
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(
            f"{path} is not a shardkit demo manifest: the demo will not touch this folder (choose another --dir)"
        ) from None
    return {n for n in names if isinstance(n, str) and _OWNED.fullmatch(n)}


def _owned(name: str, owned: set[str]) -> bool:
    if name in (MANIFEST, f"{MANIFEST}.tmp") or name in owned:
        return True
    return any(name.endswith(side) and name[: -len(side)] in owned for side in _SQLITE_SIDE_FILES)


def _prepare_folder(folder: Path, shards: int, force: bool) -> list[str]:
    """Check the folder, delete the files of a previous demo run, record the files of this one.

    :returns: the names of foreign files left in place (with ``--force``).
    :raises CliError: the folder holds files the demo did not create (without ``--force``), or
        one of them has a name the demo needs.
    """
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    owned = _read_manifest(folder) if folder.exists() else set()
    entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    foreign = [name for name in entries if not _owned(name, owned)]
    planned = shard_files(shards)
    clash = [name for name in planned if name in foreign]
    if clash:
        raise CliError(
            f"{folder / clash[0]} exists and was not created by the demo: it is left alone "
            "(choose an empty or new --dir)"
        )
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CliError(
            f"{folder} holds files the demo did not create ({shown}): choose an empty or new --dir, "
            "or pass --force to use it anyway (the demo never deletes a file it did not create)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(owned):
        for side in ("", *_SQLITE_SIDE_FILES):
            (folder / f"{name}{side}").unlink(missing_ok=True)
    # recorded before the files exist, so a run killed half-way is still cleaned up by the next one
    manifest = folder / MANIFEST
    scratch = folder / f"{MANIFEST}.tmp"
    scratch.write_text(json.dumps({"created_by": "shardkit demo", "files": planned}, indent=2) + "\n")
    os.replace(scratch, manifest)
    return foreign


# ------------------------------------------------------------------------------ the demo
@click.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default="shardkit-demo",
    show_default=True,
    help="Folder for the SQLite shard files (new, empty, or one the demo made before).",
)
@click.option(
    "--users", type=click.IntRange(1, 1_000_000), default=2000, show_default=True, help="How many users to load."
)
@click.option("--shards", type=click.IntRange(1, 64), default=4, show_default=True, help="How many shards.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed for the data (ids included).")
@click.option(
    "--force",
    is_flag=True,
    help="Use a folder that holds other files too (they are never deleted or overwritten).",
)
def demo(folder: Path, users: int, shards: int, seed: int, force: bool) -> None:
    """Create SQLite shards, load users, show where they went, run a fan-out query.

    Only files the demo created are ever deleted (a re-run replaces them); they are
    listed in .shardkit-demo.json in the folder.
    """
    _prepare_folder(folder, shards, force)
    cluster, ring = build_cluster(folder, shards)
    try:
        _run(cluster, ring, folder, users, seed)
    finally:
        cluster.dispose()
    click.secho("\nWhat to try next:", bold=True)
    tips = [
        (
            f"shardkit demo --dir {folder} --shards {shards * 2}{' --force' if force else ''}",
            "the same users, spread over more shards",
        ),
        (f"sqlite3 {folder / 'shard0.db'} 'select count(*) from users'", "look at one shard yourself"),
        ("shardkit --help", "check, ring, migrate, reshard: the operator's commands"),
    ]
    width = max(len(command) for command, _ in tips)
    for command, why in tips:
        click.echo(f"  {command:<{width}}  {why}")
    click.echo("  The tutorial, docs/index.md in shardkit's source (its README links every guide), walks the API.")


def _run(cluster: Cluster, ring: HashRing, folder: Path, users: int, seed: int) -> None:
    created = cluster.create_all(DemoBase)
    click.secho(f"Created {len(ring)} shards in {folder}/ (ring version {ring.to_dict()['version']})", bold=True)
    for alias, tables in created.items():
        if alias in ring:
            click.echo(f"  {alias:<8} {cluster.spec(alias).safe_url:<40} tables: {', '.join(tables) or '-'}")

    rng = random.Random(seed)
    ids = rng.sample(range(1, _MAX_IDS), users)
    started = time.perf_counter()
    with cluster.session() as s:
        loaded = [
            DemoUser(id=ids[i], name=f"user{i}", country=rng.choice(COUNTRIES), score=rng.randint(0, 1000))
            for i in range(users)
        ]
        s.add_all(loaded)
        s.commit()
        first_id = loaded[0].id
    elapsed = time.perf_counter() - started
    click.secho(f"\nLoaded {users} users in {elapsed:.2f}s; where they went (counted on each shard):", bold=True)
    for alias in ring:
        with cluster.engine(alias).connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM users")).scalar_one()
        bar = "#" * round(40 * n / users)
        click.echo(f"  {alias:<8} {n:>7}  {bar}")

    with cluster.session() as s:
        some = s.scalars(select(DemoUser).where(DemoUser.id == first_id)).one()
        click.secho("\nOne user, read back by its key (only its shard is asked):", bold=True)
        click.echo(f"  id={some.id} name={some.name} -> {db_of(some)}")

        click.secho("\nUsers by country, across every shard (COUNT and AVG merged):", bold=True)
        stmt = (
            select(DemoUser.country, func.count().label("users"), func.avg(DemoUser.score).label("avg_score"))
            .group_by(DemoUser.country)
            .order_by(DemoUser.country)
        )
        for country, n, avg in s.execute(stmt):
            click.echo(f"  {country}  {n:>6}  avg score {float(avg):7.1f}")

        click.secho("\nTop 5 scorers, across every shard (ORDER BY ... LIMIT merged):", bold=True)
        top = select(DemoUser).order_by(DemoUser.score.desc(), DemoUser.id).limit(5)
        for user in s.scalars(top):
            click.echo(f"  {user.name:<10} {user.score:>5}  on {ring.get(user.id)}")
