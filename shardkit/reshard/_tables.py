"""Which tables a reshard moves, in which order, and their hidden shadow copies.

A table moves when the ring router shards it (``__shard_key__`` or ``shard_keys=``).  A
*co-located child* is a sharded table whose shard-key column is a foreign key to another
sharded table's shard-key column (``orders.user_id -> users.id``): its rows hash exactly as
their parent's, so they move to the same shard.  Tables are copied and merged parents first
and deleted children first (the metadata's foreign-key order).

The copy writes into a *shadow table* on the target (``shardkit_reshard__<name>``: the same
columns, the same primary key, no other constraint, plus ``_shardkit_source``), invisible to
the application until the cut-over merges it into the real table; so reads that span every
shard never see a row twice while the copy runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, inspect
from sqlalchemy.exc import NoInspectionAvailable

from .._cluster import _tables_of
from ..errors import ConfigError
from ..ring import HashRingRouter

__all__ = ["SOURCE_COLUMN", "MovingTable", "discover", "shadow_of"]

SOURCE_COLUMN = "_shardkit_source"
SHADOW_PREFIX = "shardkit_reshard__"


@dataclass
class MovingTable:
    """One sharded table: its shard-key column, primary key and (for a child) its parent."""

    table: Table
    key: Column[Any]
    pk: tuple[Column[Any], ...]
    model: type[Any] | None = None
    parent: str | None = None
    shadow: Table = field(init=False)

    def __post_init__(self) -> None:
        self.shadow = shadow_of(self.table)

    @property
    def name(self) -> str:
        return self.table.fullname

    @property
    def scan_columns(self) -> list[Column[Any]]:
        """Primary key columns then the shard key (once, if it is part of the primary key)."""
        return list(dict.fromkeys([*self.pk, self.key]))

    @property
    def key_index(self) -> int:
        return self.scan_columns.index(self.key)


_SHADOW_MD = MetaData()


def shadow_of(table: Table) -> Table:
    """The shadow table of ``table`` (same columns and primary key, plus the source alias)."""
    name = SHADOW_PREFIX + table.name
    key = f"{table.schema}.{name}" if table.schema else name
    if key in _SHADOW_MD.tables:
        shadow = _SHADOW_MD.tables[key]
        if [c.name for c in shadow.columns][:-1] == [c.name for c in table.columns]:
            return shadow
        _SHADOW_MD.remove(shadow)
    cols: list[Column[Any]] = [
        Column(c.name, c.type, primary_key=c.primary_key, nullable=not c.primary_key, autoincrement=False)
        for c in table.columns
    ]
    cols.append(Column(SOURCE_COLUMN, String(255), nullable=False))
    return Table(name, _SHADOW_MD, *cols, schema=table.schema)


def _models_of(target: Any) -> tuple[list[Table], dict[Table, type[Any]]]:
    """Tables (in foreign-key order) and table -> mapped class of a base, registry or MetaData."""
    metadata, models = _tables_of(target)
    return list(metadata.sorted_tables), models


def _table_of(model: Any) -> tuple[Table, type[Any] | None]:
    if isinstance(model, Table):
        return model, None
    try:
        mapper: Any = inspect(model)
    except NoInspectionAvailable:
        raise ConfigError(f"{model!r} is not a mapped class or a Table") from None
    table = mapper.local_table
    if not isinstance(table, Table):
        raise ConfigError(f"{model!r} is not mapped to a Table")
    return table, mapper.class_


def _key_column(router: HashRingRouter, target: Any, table: Table) -> Column[Any] | None:
    if not router.is_sharded(target):
        return None
    spec = router._spec(target)  # the router's own knowledge of the shard key
    column = getattr(spec, "column", None)
    if column is None:
        attr = getattr(spec, "attr", None)
        column = table.c.get(attr) if attr else None
    if column is None:
        return None
    return table.c[column.name] if column.table is not table else column


def discover(router: HashRingRouter, models: Iterable[Any] | None = None, metadata: Any = None) -> list[MovingTable]:
    """The sharded tables to move, parents first.

    :param models: mapped classes or Tables; each one's co-located children in ``metadata``
        (or in the same MetaData) are added.
    :param metadata: a declarative base, registry or MetaData whose sharded tables all move.
    :raises ConfigError: a named model is not sharded, or nothing to move was found.
    """
    candidates: list[tuple[Table, type[Any] | None]] = []
    wanted: set[Table] | None = None
    if metadata is not None:
        tables, by_table = _models_of(metadata)
        candidates = [(t, by_table.get(t)) for t in tables]
    if models is not None:
        wanted = set()
        for model in models:
            table, cls = _table_of(model)
            wanted.add(table)
            if all(t is not table for t, _ in candidates):
                reg = inspect(cls).registry if cls is not None else None
                _, by_table = _models_of(reg if reg is not None else table.metadata)
                for t in table.metadata.sorted_tables:
                    if all(t is not c for c, _ in candidates):
                        candidates.append((t, cls if t is table else by_table.get(t)))
    if not candidates:
        raise ConfigError("nothing to reshard: pass models=[...] or metadata=<declarative base>")
    found: dict[Table, MovingTable] = {}
    for table, cls in candidates:
        key = _key_column(router, cls if cls is not None else table, table)
        if key is None:
            continue
        found[table] = MovingTable(table=table, key=key, pk=tuple(table.primary_key.columns), model=cls)
        if not found[table].pk:
            raise ConfigError(f"table {table.fullname} has no primary key: it cannot be moved in batches")
    for mt in found.values():  # co-location: the key column references another moving table's key
        for fk in mt.key.foreign_keys:
            parent = found.get(fk.column.table)
            if parent is not None and fk.column is parent.key:
                mt.parent = parent.name
    if wanted is not None:
        for table in wanted:
            if table not in found:
                raise ConfigError(f"table {table.fullname} is not sharded by the ring router", table=table.fullname)
        keep = set(wanted)
        changed = True
        while changed:  # parents named -> their children come along
            changed = False
            for t, mt in found.items():
                if t not in keep and mt.parent is not None and any(p.fullname == mt.parent for p in keep):
                    keep.add(t)
                    changed = True
        found = {t: mt for t, mt in found.items() if t in keep}
    ordered = _fk_order(list(found))
    if not ordered:
        raise ConfigError("nothing to reshard: no table is sharded by the ring router")
    return [found[t] for t in ordered]


def _fk_order(tables: Sequence[Table]) -> list[Table]:
    from sqlalchemy.sql.ddl import sort_tables

    return list(sort_tables(tables))
