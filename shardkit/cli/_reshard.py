"""``shardkit reshard plan|run``: move rows to the shards a new ring names.

``--settings dotted.module`` names a module with ``DATABASES``, ``DATABASE_ROUTERS``,
``SHARDKIT_RING`` (a HashRing or its ``to_dict()``) and ``SHARDKIT_METADATA`` (dotted path
to a declarative base).  The new ring is ``--add ALIAS`` / ``--remove ALIAS`` applied to the
current ring (the one stored by the last reshard, else ``SHARDKIT_RING``), or ``--new-ring``
(a JSON file of ``to_dict()``, or ``settings:NAME`` for a settings attribute).


"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError

__all__ = ["reshard"]


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"SHARDKIT_METADATA {path!r} does not import: {exc}") from exc


def _load(settings: str) -> tuple[Any, Any, Any]:
    """(cluster, ring router, declarative base) from a settings module."""
    from .._cluster import Cluster
    from ..reshard import load_current_ring
    from ..ring import HashRing, HashRingRouter

    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(settings)
    except ImportError as exc:
        raise ConfigError(f"settings module {settings!r} does not import: {exc}") from exc
    ring_setting = getattr(module, "SHARDKIT_RING", None)
    ring = (
        ring_setting if isinstance(ring_setting, HashRing) or ring_setting is None else HashRing.from_dict(ring_setting)
    )
    routers = list(getattr(module, "DATABASE_ROUTERS", ()))
    cluster = Cluster(module.DATABASES, routers)
    router = next((r for r in cluster.router.routers if isinstance(r, HashRingRouter)), None)
    if router is None:
        if ring is None:
            raise ConfigError(f"settings {settings!r}: no HashRingRouter in DATABASE_ROUTERS and no SHARDKIT_RING")
        router = HashRingRouter(ring)
        cluster = Cluster(module.DATABASES, [*routers, router])
    elif ring is not None:
        router.ring = ring
    current = load_current_ring(cluster)
    if current is not None:
        router.ring = current
    base_path = getattr(module, "SHARDKIT_METADATA", None)
    if base_path is None:
        raise ConfigError(f"settings {settings!r} defines no SHARDKIT_METADATA (dotted path to a declarative base)")
    base = _import(base_path) if isinstance(base_path, str) else base_path
    return cluster, router, (module, base)


def _new_ring(spec: str | None, module: Any) -> Any:
    if spec is None:
        return None
    from ..ring import HashRing

    if spec.startswith("settings:"):
        value = getattr(module, spec.split(":", 1)[1])
        return value if isinstance(value, HashRing) else HashRing.from_dict(value)
    return HashRing.from_dict(json.loads(Path(spec).read_text()))


def _resharder(settings: str, add: str | None, remove: str | None, new_ring: str | None, **kw: Any) -> Any:
    from ..reshard import Resharder

    cluster, router, (module, base) = _load(settings)
    return Resharder(cluster, router, _new_ring(new_ring, module), add=add, remove=remove, metadata=base, **kw)


_common = [
    click.option("--settings", required=True, help="Dotted path of the settings module."),
    click.option("--add", "add", metavar="ALIAS", help="Add this shard to the current ring."),
    click.option("--remove", "remove", metavar="ALIAS", help="Remove this shard from the current ring."),
    click.option("--new-ring", metavar="FILE|settings:NAME", help="The new ring: a to_dict() JSON file or a setting."),
]


def _options(f: Any) -> Any:
    for option in reversed(_common):
        f = option(f)
    return f


@click.group()
def reshard() -> None:
    """Move rows to the shards a new ring names: plan, then run (resumable)."""


@reshard.command()
@_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(settings: str, add: str | None, remove: str | None, new_ring: str | None, as_json: bool) -> None:
    """What moves, per table and per source/target shard, counted on the shards."""
    result = _resharder(settings, add, remove, new_ring).plan()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "old_ring": result.old_ring.to_dict(),
                    "new_ring": result.new_ring.to_dict(),
                    "movement": result.movement,
                    "rows": result.rows,
                    "moves": [m.__dict__ for m in result.moves],
                },
                indent=2,
            )
        )
    else:
        click.echo(result.render())


@reshard.command()
@_options
@click.option("--batch-size", default=10_000, show_default=True, help="Rows per keyset batch.")
@click.option("--dry-run", is_flag=True, help="Show each step (with measured counts) and write nothing.")
@click.option("--fence-grace", default=0.2, show_default=True, help="Seconds between fencing and the catch-up.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(
    settings: str,
    add: str | None,
    remove: str | None,
    new_ring: str | None,
    batch_size: int,
    dry_run: bool,
    fence_grace: float,
    quiet: bool,
) -> None:
    """Copy, verify, switch the ring, delete the old copies; resumes a killed run."""
    from ..reshard import ProgressEvent

    bars: dict[tuple[str, str, str], Any] = {}

    def show(ev: ProgressEvent) -> None:
        key = (ev.step, ev.table, ev.source)
        if ev.kind == "start":
            label = f"{ev.step} {ev.table} from {ev.source}"
            bar = click.progressbar(length=max(ev.total, 1), label=label, file=sys.stderr, show_pos=True)
            bar.__enter__()
            bars[key] = bar
        elif key in bars:
            bar = bars[key]
            bar.update(ev.scanned - bar.pos) if ev.total else None
            rate = ev.moved / ev.elapsed if ev.elapsed > 0 else 0.0
            bar.label = f"{ev.step} {ev.table} from {ev.source}: {ev.moved} rows ({rate:,.0f}/s)"
            if ev.kind == "end":
                bar.__exit__(None, None, None)
                del bars[key]

    resharder = _resharder(
        settings, add, remove, new_ring, batch_size=batch_size, fence_grace=fence_grace,
        progress=None if quiet or dry_run else show,
    )  # fmt: skip
    result = resharder.run(dry_run=dry_run)
    if dry_run:
        click.echo(f"dry run (nothing written): ring {result.old_ring.version} -> {result.new_ring.version}")
        for i, step in enumerate(result.steps, 1):
            click.echo(f"{i:3}. {step}")
        return
    for step in result.steps:
        click.echo(step)
    if result.resumed_from:
        click.echo(f"resumed a reshard stopped at phase {result.resumed_from}")
    if result.copied or result.phase == "done":
        click.echo(
            f"done: copied {sum(result.copied.values())} rows ({result.copy_rate:,.0f} rows/s), "
            f"repaired {result.repaired}, deleted {sum(result.deleted.values())}; "
            f"ring version {result.new_ring.version}"
        )
