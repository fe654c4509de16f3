"""The ``shardkit`` command (also ``python -m shardkit``).

Built on click.  The CLI only calls shardkit's public Python API: anything
it does, a script can do.  User mistakes (a bad settings path, an unknown
alias, an unreachable shard) end with one clear line and a non-zero exit,
never a traceback.

Commands: ``demo``, ``check``, ``ring show|distribution|diff``, ``migrate``,
``reshard plan|run``, ``twophase recover``.  Every command that needs a cluster
reads it with ``--settings`` (a dotted module path or a TOML file), given to
the group or to the command, else ``SHARDKIT_SETTINGS``; see
:func:`shardkit.load_settings`.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from ..errors import ShardkitError
from ._check import check
from ._common import CliError, one_line, scrub
from ._demo import demo
from ._migrate import migrate
from ._reshard import reshard
from ._ring import ring
from ._twophase import twophase

__all__ = ["cli", "main"]


class _ShardkitGroup(click.Group):
    """The root group: a shardkit or database error in any command becomes one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ShardkitError as exc:
            raise CliError(scrub(str(exc), ctx.meta.get("shardkit.settings"))) from exc
        except SQLAlchemyError as exc:
            raise CliError(scrub(one_line(exc), ctx.meta.get("shardkit.settings"))) from exc


@click.group(cls=_ShardkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardkit")
@click.option(
    "--settings",
    "settings_path",
    metavar="MODULE_OR_TOML",
    default=None,
    help="Settings: a dotted module path or a .toml file (default: $SHARDKIT_SETTINGS).",
)
def cli(settings_path: str | None) -> None:
    """shardkit: Django's multiple-database model for SQLAlchemy, turned into sharding."""


cli.add_command(demo)
cli.add_command(check)
cli.add_command(ring)
cli.add_command(migrate)
cli.add_command(reshard)
cli.add_command(twophase)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script: shardkit errors become one line and exit code 2."""
    try:
        rv = cli.main(args=argv, prog_name="shardkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ShardkitError as exc:
        click.echo(f"shardkit: error: {exc}", err=True)
        sys.exit(2)
    if isinstance(rv, int) and rv:  # ctx.exit(n) in standalone_mode=False returns n
        sys.exit(rv)
    return rv
