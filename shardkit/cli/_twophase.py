"""``shardkit twophase recover``: resolve two-phase commits left in doubt by a crash.

A transaction whose decision was logged on ``default`` is committed on every
shard at once; any other is rolled back on every shard (presumed abort) once
it was prepared at least ``--min-age`` seconds ago, so a commit still in
progress is never raced and no write is left half applied.  Prepared
transactions that shardkit did not write are never touched.

An alias that cannot be reached does not stop the others: they are resolved
and printed, then the command names the alias on stderr and exits with 1.
"""

from __future__ import annotations

import click

from ..errors import TwoPhaseRecoveryError
from ._common import CliError, echo_json, json_option, load, scrub, settings_option

__all__ = ["twophase"]


@click.group()
def twophase() -> None:
    """Two-phase commit across PostgreSQL shards (cross_shard_writes='twophase')."""


@twophase.command()
@settings_option
@json_option
@click.option(
    "--min-age",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Roll back an undecided transaction only once prepared this long (a decided one is committed at once).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
def recover(settings_path: str | None, as_json: bool, min_age: float, dry_run: bool) -> None:
    """Commit or roll back prepared transactions left in doubt after a crash."""
    settings = load(settings_path)
    failed: TwoPhaseRecoveryError | None = None
    try:
        found = settings.cluster.recover_twophase(min_age=min_age, dry_run=dry_run)
    except TwoPhaseRecoveryError as exc:  # the other aliases were resolved: show them, then fail
        failed, found = exc, list(exc.resolved)
    if as_json:
        echo_json([{"alias": d.alias, "gid": d.gid, "txid": d.txid, "action": d.action} for d in found])
    elif not found and failed is None:
        click.echo("no prepared transactions in doubt")
    else:
        verb = "would" if dry_run else "did"
        for d in found:
            click.echo(f"  {d.alias:<12} {d.gid}  {verb} {d.action}")
    if failed is not None:
        raise CliError(scrub(str(failed), settings), exit_code=1) from failed
