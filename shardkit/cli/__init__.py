"""The ``shardkit`` command (also ``python -m shardkit``).

Built on click.  The CLI only calls shardkit's public Python API: anything
it does, a script can do.  User mistakes (a bad settings path, an unknown
alias, an unreachable shard) end with one clear line and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import ShardkitError
from ._demo import demo

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardkit")
def cli() -> None:
    """shardkit: Django's multiple-database model for SQLAlchemy, turned into sharding."""


cli.add_command(demo)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script: shardkit errors become one line and exit code 2."""
    try:
        return cli.main(args=argv, prog_name="shardkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ShardkitError as exc:
        click.echo(f"shardkit: error: {exc}", err=True)
        sys.exit(2)
