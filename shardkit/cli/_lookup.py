"""``shardkit lookup``: build, check and repair lookup indexes (see docs/lookups.md).

* ``shardkit lookup list``: the declared lookups and where their tables are;
* ``shardkit lookup backfill MODEL.COLUMN``: write the lookup rows of existing rows, in batches,
  resumable (``--restart`` starts over), with a progress bar on a terminal; safe while the
  application writes;
* ``shardkit lookup verify [MODEL.COLUMN ...]``: rows without a lookup and lookups without a row
  (``--repair`` fixes both); exit code 1 when something is wrong (and not repaired).

The models are found by importing ``--metadata package.module:Base`` (or the settings'
``SHARDKIT_METADATA``): importing them declares their ``__lookups__``.
"""

from __future__ import annotations

from typing import Any

import click

from .. import lookups as lk
from .._settings import Settings
from ._common import echo_json, json_option, load, progress, settings_option

__all__ = ["lookup"]


def _metadata_option(fn: Any) -> Any:
    return click.option(
        "--metadata",
        metavar="MODULE:BASE",
        default=None,
        help="The declarative base whose models declare lookups (default: SHARDKIT_METADATA).",
    )(fn)


def _prepare(settings_path: str | None, metadata: str | None) -> Settings:
    settings = load(settings_path)
    if metadata is not None or settings.metadata is not None:
        settings.get_metadata(metadata)  # importing the models declares their lookups
    return settings


def _selected(names: tuple[str, ...]) -> list[lk.Lookup]:
    if names:
        return [lk.lookup_for(name) for name in names]
    found = lk.registered()
    if not found:
        raise click.UsageError("no lookup is declared: pass --metadata package.module:Base (or SHARDKIT_METADATA)")
    return found


@click.group()
def lookup() -> None:
    """Lookup indexes: find rows by a column that is not the shard key."""


@lookup.command("list")
@settings_option
@_metadata_option
@json_option
def list_(settings_path: str | None, metadata: str | None, as_json: bool) -> None:
    """The declared lookups."""
    _prepare(settings_path, metadata)
    rows = [
        {"lookup": x.label, "unique": x.unique, "table": x.table.name, "shard_key": x.key_attr, "grace": x.grace}
        for x in lk.registered()
    ]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['lookup']:<30} {'unique' if row['unique'] else '      '}  table {row['table']}")


@lookup.command()
@click.argument("name", metavar="MODEL.COLUMN")
@click.option("--batch", default=1000, show_default=True, help="Rows read (and lookups written) at a time.")
@click.option("--restart", is_flag=True, help="Start over instead of going on from where a backfill stopped.")
@settings_option
@_metadata_option
@json_option
def backfill(
    name: str, batch: int, restart: bool, settings_path: str | None, metadata: str | None, as_json: bool
) -> None:
    """Write the lookup rows of the rows that exist (resumable, batched, safe while writes go on)."""
    settings = _prepare(settings_path, metadata)
    target = lk.lookup_for(name)
    total = lk.count_rows(settings.cluster, target)
    with progress(length=max(total, 1), label=f"backfill {target.label}") as bar:
        shown: dict[str, int] = {}

        def tick(state: lk.BackfillProgress) -> None:
            step = state.done - shown.get(state.alias, 0)
            shown[state.alias] = state.done
            if step > 0:
                bar.update(step)

        states = lk.backfill(settings.cluster, target, batch=batch, restart=restart, progress=tick)
    conflicts: list[list[str]] = [[str(v), str(k), str(h)] for s in states for v, k, h in s.conflicts[:100]]
    shards = [{"alias": s.alias, "rows": s.done, "written": s.written, "conflicts": len(s.conflicts)} for s in states]
    result = {
        "lookup": target.label,
        "shards": shards,
        "written": sum(s.written for s in states),
        "conflicts": conflicts,
    }
    if as_json:
        echo_json(result)
    else:
        for s in shards:
            click.echo(f"{s['alias']:<12} rows {s['rows']:>10}  lookups written {s['written']:>10}")
        click.echo(f"{target.label}: {result['written']} lookup rows written")
        for value, key, holder in conflicts:
            click.echo(f"conflict: {value!r} of key {key} is held by key {holder}", err=True)
    if conflicts:
        raise click.exceptions.Exit(1)


@lookup.command()
@click.argument("names", metavar="[MODEL.COLUMN]...", nargs=-1)
@click.option("--repair", is_flag=True, help="Write missing lookups and remove lookups whose row is gone.")
@click.option("--batch", default=1000, show_default=True)
@settings_option
@_metadata_option
@json_option
def verify(
    names: tuple[str, ...], repair: bool, batch: int, settings_path: str | None, metadata: str | None, as_json: bool
) -> None:
    """Report rows without a lookup and lookups without a row (exit code 1 if any)."""
    settings = _prepare(settings_path, metadata)
    reports = [lk.verify(settings.cluster, x, batch=batch, repair=repair) for x in _selected(names)]
    if as_json:
        echo_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            state = "ok" if r.ok else "PROBLEMS"
            click.echo(
                f"{r.lookup}: {state} ({r.rows_checked} rows, {r.lookups_checked} lookups checked; "
                f"{r.missing_count} rows without lookup, {r.stale_count} lookups without row, "
                f"{len(r.young)} recent, {len(r.conflicts)} unique conflicts)"
            )
            if repair:
                click.echo(f"  repaired: {r.repaired_missing} lookups written, {r.repaired_stale} removed")
            for value, key in r.missing[:10]:
                click.echo(f"  row without lookup: {value!r} (key {key})")
            for value, key in r.stale[:10]:
                click.echo(f"  lookup without row: {value!r} -> key {key}")
    fixed = all(r.repaired_missing >= r.missing_count and r.repaired_stale >= r.stale_count for r in reports)
    if any(not r.ok for r in reports) and not (repair and fixed):
        raise click.exceptions.Exit(1)
