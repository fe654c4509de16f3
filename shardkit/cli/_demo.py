"""``shardkit demo``: the README's embedded default, on SQLite shard files, no server needed.

Creates a cluster of four SQLite shards (plus ``default``) in a local folder,
shards a ``users`` table by id on a consistent-hash ring, loads users,
shows where they went, and runs fan-out analytics across every shard.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import click
from sqlalchemy import BigInteger, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .._cluster import Cluster
from .._session import db_of
from ..ring import HashRing, HashRingRouter

COUNTRIES = ["de", "fr", "jp", "br", "us", "in", "ng", "se"]


class DemoBase(DeclarativeBase):
    pass


class DemoUser(DemoBase):
    """A user, sharded by its id (ids come from shardkit's cluster-wide generator)."""

    __tablename__ = "users"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    country: Mapped[str] = mapped_column(String(2))
    score: Mapped[int]


def build_cluster(folder: Path, shards: int) -> tuple[Cluster, HashRing]:
    """The demo's cluster: ``default`` plus ``shard0..N-1``, each a SQLite file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    aliases = [f"shard{i}" for i in range(shards)]
    databases = {"default": f"sqlite:///{folder / 'default.db'}"}
    databases.update({a: f"sqlite:///{folder / f'{a}.db'}" for a in aliases})
    ring = HashRing(aliases)
    return Cluster(databases, routers=[HashRingRouter(ring)]), ring


@click.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default="shardkit-demo",
    show_default=True,
    help="Folder for the SQLite shard files.",
)
@click.option(
    "--users", type=click.IntRange(1, 1_000_000), default=2000, show_default=True, help="How many users to load."
)
@click.option("--shards", type=click.IntRange(1, 64), default=4, show_default=True, help="How many shards.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed for the data.")
def demo(folder: Path, users: int, shards: int, seed: int) -> None:
    """Create SQLite shards, load users, show where they went, run a fan-out query."""
    for old in folder.glob("*.db"):  # a re-run starts clean
        old.unlink()
    cluster, ring = build_cluster(folder, shards)
    created = cluster.create_all(DemoBase)
    click.secho(f"Created {len(ring)} shards in {folder}/ (ring version {ring.to_dict()['version']})", bold=True)
    for alias, tables in created.items():
        click.echo(f"  {alias:<8} {cluster.spec(alias).safe_url:<40} tables: {', '.join(tables) or '-'}")

    rng = random.Random(seed)
    started = time.perf_counter()
    with cluster.session() as s:
        loaded = [
            DemoUser(name=f"user{i}", country=rng.choice(COUNTRIES), score=rng.randint(0, 1000)) for i in range(users)
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
    cluster.dispose()

    click.secho("\nWhat to try next:", bold=True)
    click.echo("  pytest                      run the whole test suite (README's second command)")
    click.echo(f"  sqlite3 {folder}/shard0.db 'select count(*) from users'")
    click.echo("  docs/index.md               the tutorial: DATABASES, using(), routers, the ring")
