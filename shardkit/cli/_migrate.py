"""``shardkit migrate``: create the schema on every alias where allow_migrate allows each table.

Two ways:

* from a MetaData or declarative base (``--metadata package.module:Base`` or
  ``SHARDKIT_METADATA``): :meth:`Cluster.create_all` alias by alias, telling
  which tables were created and which were already there;
* with Alembic (``--alembic alembic.ini``): ``alembic upgrade head`` with the
  settings handed to ``env.py`` in ``config.attributes`` (see docs/alembic.md and
  examples/alembic/: env.py iterates the aliases and records what it did).

Every alias is connected to, even one where no table goes: that checks a server is
reachable and creates a SQLite file, so ``shardkit check`` passes after a migrate.
A failing alias does not stop the others; the exit code is 1 if any failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy import inspect

from .._settings import Settings
from ._common import CliError, echo_json, json_option, load, one_line, progress, scrub, settings_option

__all__ = ["migrate"]


def _sqlite_file(settings: Settings, alias: str) -> Path | None:
    """The file of an on-disk SQLite alias, else ``None``."""
    spec = settings.cluster.spec(alias)
    database = spec.url.database
    if spec.dialect_name != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _create(settings: Settings, target: Any, aliases: list[str], plan: bool) -> list[dict[str, Any]]:
    cluster = settings.cluster
    results: list[dict[str, Any]] = []
    with progress(aliases, label="migrating") as bar:
        for alias in bar:
            tables = [t.name for t in cluster.tables_for(alias, target)]
            row: dict[str, Any] = {
                "alias": alias,
                "tables": tables,
                "created": [],
                "existing": [],
                "created_file": None,
                "error": None,
            }
            results.append(row)
            if plan:
                continue
            sqlite_file = _sqlite_file(settings, alias)
            new_file = sqlite_file is not None and not sqlite_file.exists()
            try:
                engine = cluster.engine(alias)
                with engine.connect():  # reachable (and, for SQLite, the file exists) even with no table
                    pass
                if new_file and sqlite_file is not None and sqlite_file.exists():
                    row["created_file"] = str(sqlite_file)
                if not tables:
                    continue
                present = set(inspect(engine).get_table_names())
                cluster.create_all(target, aliases=[alias])
            except Exception as exc:  # the alias's failure, reported; the others go on
                row["error"] = scrub(one_line(exc), settings)
                continue
            row["created"] = [t for t in tables if t not in present]
            row["existing"] = [t for t in tables if t in present]
    return results


def _alembic(settings: Settings, ini: Path, aliases: list[str] | None, metadata: str | None) -> list[dict[str, Any]]:
    try:
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError
    except ImportError:
        raise CliError("--alembic needs alembic: pip install 'shardkit[alembic]'") from None
    config = Config(str(ini))
    report: list[dict[str, Any]] = []
    config.attributes.update(
        shardkit_settings=settings, shardkit_aliases=aliases, shardkit_metadata=metadata, shardkit_report=report
    )
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        raise CliError(f"alembic: {scrub(str(exc), settings)}") from None
    return report


@click.command()
@settings_option
@click.option(
    "--metadata", metavar="MODULE:BASE", help="The MetaData or declarative base (default: SHARDKIT_METADATA)."
)
@click.option("--database", "-d", "databases", multiple=True, metavar="ALIAS", help="Only this alias (repeatable).")
@click.option(
    "--alembic",
    "alembic_ini",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run `alembic upgrade head` on every alias where allowed, with this alembic.ini.",
)
@click.option("--plan", is_flag=True, help="Only say which tables go where; connect to nothing.")
@json_option
def migrate(
    settings_path: str | None,
    metadata: str | None,
    databases: tuple[str, ...],
    alembic_ini: Path | None,
    plan: bool,
    as_json: bool,
) -> None:
    """Create the schema on every alias where allow_migrate allows each table."""
    settings = load(settings_path)
    cluster = settings.cluster
    selected = [cluster.check_alias(a) for a in databases]
    if alembic_ini is not None:
        if plan:
            raise click.UsageError("--plan works with --metadata, not --alembic (use `alembic upgrade head --sql`)")
        report = _alembic(settings, alembic_ini, selected or None, metadata)
        if as_json:
            echo_json({"alembic": str(alembic_ini), "aliases": report})
            return
        if not report:
            click.echo("alembic upgrade head ran (env.py reported nothing per alias)")
        for row in report:
            if row.get("skipped"):
                click.echo(f"{row['alias']}: skipped ({row['skipped']})")
            elif row.get("from") == row.get("to"):
                click.echo(f"{row['alias']}: already at {row.get('to')}")
            else:
                click.echo(f"{row['alias']}: upgraded {row.get('from') or '<base>'} -> {row.get('to')}")
        return
    target = settings.get_metadata(metadata)
    results = _create(settings, target, selected or list(cluster.aliases), plan)
    failed = [r["alias"] for r in results if r["error"]]
    if as_json:
        echo_json({"plan": plan, "aliases": results})
    else:
        for r in results:
            if r["error"]:
                click.echo(f"{r['alias']}: FAILED: {r['error']}")
            elif not r["tables"]:
                made = f"; created the empty SQLite file {r['created_file']}" if r["created_file"] else ""
                click.echo(f"{r['alias']}: nothing to migrate (allow_migrate allows no table here){made}")
            elif plan:
                click.echo(f"{r['alias']}: would have {', '.join(r['tables'])}")
            else:
                parts = []
                if r["created"]:
                    parts.append(f"created {', '.join(r['created'])}")
                if r["existing"]:
                    parts.append(f"already there: {', '.join(r['existing'])}")
                click.echo(f"{r['alias']}: {'; '.join(parts)}")
    if failed:
        raise CliError(f"migrate failed on {len(failed)} of {len(results)} aliases: {', '.join(failed)}", exit_code=1)
