"""``shardkit reshard plan|run``: move rows to the shards a new ring names.

The cluster comes from ``--settings`` like every other command (a dotted module or a TOML
file, else ``$SHARDKIT_SETTINGS``): ``DATABASES``, ``DATABASE_ROUTERS``, the ring
(``SHARDKIT_RING``) and ``SHARDKIT_METADATA`` (``"package.module:Base"``).  The current ring is
the one stored by the last reshard, else the settings' ring.  The new ring is ``--add ALIAS`` /
``--remove ALIAS`` applied to it, or ``--new-ring`` (a JSON file of ``to_dict()``, or
``package.module:NAME`` naming a HashRing or its ``to_dict()``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .._settings import import_object
from ..errors import ConfigError
from ._common import OneLineUsageError, load, not_in_ring, stderr_is_terminal

__all__ = ["reshard"]


def _new_ring(spec: str | None) -> Any:
    if spec is None:
        return None
    from ..ring import HashRing

    try:
        if ":" in spec and not Path(spec).exists():
            value = import_object(spec)
            return value if isinstance(value, HashRing) else HashRing.from_dict(value)
        return HashRing.from_dict(json.loads(Path(spec).read_text()))
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"--new-ring {spec!r} is not a ring: {type(exc).__name__}: {exc}") from exc


def _resharder(settings_path: str | None, add: str | None, remove: str | None, new_ring: str | None, **kw: Any) -> Any:
    """The :class:`~shardkit.reshard.Resharder` the options describe, for the cluster of the settings."""
    from ..reshard import Resharder

    if sum(x is not None for x in (add, remove, new_ring)) != 1:
        raise OneLineUsageError(
            "say what the new ring is: exactly one of --new-ring, --add or --remove", ctx=click.get_current_context()
        )
    settings = load(settings_path)
    settings.require_ring()
    resharder = Resharder(
        settings.cluster, new_ring=_new_ring(new_ring), add=add, remove=remove, metadata=settings.get_metadata(), **kw
    )
    current, _, active = resharder.rings()  # the stored ring; a stopped reshard resumes from its old ring
    if remove is not None and remove not in current:
        raise not_in_ring(remove, current)
    if active is None and add is not None and add in current:  # not resuming: say so, there is nothing to do
        click.echo(f"note: {add!r} is already in the ring: nothing moves (a finished reshard?)", err=True)
    return resharder


_common = [
    click.option(
        "--settings",
        "settings",
        default=None,
        metavar="MODULE_OR_TOML",
        help="Settings: a dotted module path or a .toml file (default: the group's, then $SHARDKIT_SETTINGS).",
    ),
    click.option("--add", "add", metavar="ALIAS", help="Add this shard to the current ring."),
    click.option("--remove", "remove", metavar="ALIAS", help="Remove this shard from the current ring."),
    click.option(
        "--new-ring", metavar="FILE|module:NAME", help="The new ring: a to_dict() JSON file, or an importable object."
    ),
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
def plan(settings: str | None, add: str | None, remove: str | None, new_ring: str | None, as_json: bool) -> None:
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
@click.option(
    "--fence-grace",
    default=1.2,
    show_default=True,
    help="Seconds moving keys stay fenced after the switch, while the other processes read the new ring: "
    "at least their poll interval (1 s by default) plus the longest transaction.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(
    settings: str | None,
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
        progress=None if quiet or dry_run or not stderr_is_terminal() else show,
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
