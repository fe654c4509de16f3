"""The ``shardkit`` command (also ``python -m shardkit``).

Built on click.  The CLI only calls shardkit's public Python API: anything
it does, a script can do.  User mistakes (a bad settings path, an unknown
alias, an unreachable shard) end with one clear line and a non-zero exit,
never a traceback.

Commands: ``demo``, ``check``, ``ring show|distribution|diff``, ``migrate``,
``reshard plan|run``, ``twophase recover``, ``lookup list|backfill|verify``.  Every command that needs a cluster
reads it with ``--settings`` (a dotted module path or a TOML file), given to
the group or to the command, else ``SHARDKIT_SETTINGS``; see
:func:`shardkit.load_settings`.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from ..errors import ShardkitError
from ._check import check
from ._common import CliError, OneLineUsageError, one_line, scrub, unreachable, unreachable_error
from ._demo import demo
from ._lookup import lookup
from ._migrate import migrate
from ._reshard import reshard
from ._ring import ring
from ._twophase import twophase

__all__ = ["cli", "main"]


def _connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a driver's failure to reach or keep a connection."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OperationalError | InterfaceError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def _one_line_usage(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, OneLineUsageError | click.exceptions.NoArgsIsHelpError):
        return exc  # a group called alone still prints its help
    return OneLineUsageError(exc.format_message(), ctx=exc.ctx)


class _ShardkitGroup(click.Group):
    """The root group: every error of every command becomes one line on stderr.

    A shardkit or database error exits with 2 ("could not run"), except when a database
    alias cannot be reached: then each alias that is down is named, exit code 1 ("ran, found
    a problem"), as ``check`` and ``migrate`` do.  click's usage errors (a missing or bad
    option) are one line too, exit code 2.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from exc
        except click.ClickException as exc:
            if isinstance(exc, CliError):
                raise
            raise CliError(exc.format_message(), exit_code=exc.exit_code) from exc  # e.g. FileError: one line
        except (ShardkitError, SQLAlchemyError) as exc:
            settings = ctx.meta.get("shardkit.settings")
            if settings is not None and _connection_error(exc):
                down = unreachable(settings)
                if down:
                    raise unreachable_error(down) from exc
            message = str(exc) if isinstance(exc, ShardkitError) else one_line(exc)
            raise CliError(scrub(message, settings)) from exc


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
cli.add_command(lookup)


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
