"""Alembic env.py: one migration history, run on every alias of a shardkit cluster.

In the spirit of Alembic's ``multidb`` template, with the aliases taken from
the cluster instead of a list in alembic.ini:

* the settings come from ``shardkit migrate --alembic`` (``config.attributes``),
  else ``SHARDKIT_SETTINGS``, else ``shardkit_settings`` in alembic.ini;
* each alias (or only ``-x database=ALIAS``) is migrated on its own connection and
  keeps its own ``alembic_version`` table, so shards can be upgraded one by one;
* an alias where allow_migrate allows no table of the metadata is skipped;
* ``include_object`` keeps autogenerate to the tables allow_migrate puts on the
  alias, and the migrations ask ``op.get_context().opts["shardkit_allows"](table)``
  before touching a table: an ``upgrade`` runs every operation it contains, so
  this guard is what honours allow_migrate at upgrade time.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import MetaData

from shardkit._settings import load_settings

config = context.config
if config.config_file_name is not None and "shardkit_settings" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

settings = config.attributes.get("shardkit_settings") or load_settings(
    os.environ.get("SHARDKIT_SETTINGS") or config.get_main_option("shardkit_settings")
)
cluster = settings.cluster
target = settings.get_metadata(config.attributes.get("shardkit_metadata"))
target_metadata: MetaData = target if isinstance(target, MetaData) else target.metadata
report: list[dict[str, Any]] = config.attributes.get("shardkit_report", [])

requested = config.attributes.get("shardkit_aliases") or context.get_x_argument(as_dictionary=True).get("database")
aliases = [requested] if isinstance(requested, str) else list(requested or cluster.aliases)
for alias in aliases:
    cluster.check_alias(alias)  # an unknown alias is one clear error


def allows_on(alias: str) -> Any:
    """table name -> does allow_migrate put that table on ``alias``?"""
    allowed = {t.name for t in cluster.tables_for(alias, target)}

    def allows(table_name: str) -> bool:
        if table_name in target_metadata.tables:
            return table_name in allowed
        # a table the models no longer have (dropped, renamed): ask the routers by name
        return cluster.router.allow_migrate(alias, None, table_name=table_name, model_name=table_name)

    return allows, allowed


def include_object_on(allows: Any) -> Any:
    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table":
            return bool(allows(name))
        table = getattr(obj, "table", None)
        return table is None or bool(allows(table.name))

    return include_object


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: the SQL of each alias, one after the other."""
    for alias in aliases:
        allows, allowed = allows_on(alias)
        if not allowed:
            continue
        context.configure(
            url=cluster.spec(alias).url,
            target_metadata=target_metadata,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
            include_object=include_object_on(allows),
            shardkit_alias=alias,
            shardkit_allows=allows,
        )
        context.get_context().impl.static_output(f"-- shardkit alias {alias}")
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_online() -> None:
    for alias in aliases:
        allows, allowed = allows_on(alias)
        if not allowed:
            report.append({"alias": alias, "skipped": "allow_migrate allows no table here"})
            continue
        with cluster.engine(alias).connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                include_object=include_object_on(allows),
                render_as_batch=connection.dialect.name == "sqlite",
                shardkit_alias=alias,
                shardkit_allows=allows,
            )
            before = context.get_context().get_current_revision()
            with context.begin_transaction():
                context.run_migrations()
            after = context.get_context().get_current_revision()
            report.append({"alias": alias, "from": before, "to": after})


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
