"""Lookups of rows inserted by statement: ``session.execute(insert(User), [{...}, ...])``.

The rows' lookups are claimed (see :mod:`shardkit.lookups._write`) before the INSERT runs,
their missing integer shard keys generated first (the rows become copies holding them, as the
router itself does), so the INSERT and its lookups agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import ORMExecuteState

from .. import _sqla
from .._session import ShardSession
from . import _store
from ._declare import Lookup, lookups_of
from ._write import claim_rows

__all__ = ["claim_statement_rows"]


def claim_statement_rows(orm_context: ORMExecuteState) -> None:
    """Claim the lookups of the rows of an INSERT statement of a model with lookups."""
    session = orm_context.session
    mapper = orm_context.bind_mapper
    if not isinstance(session, ShardSession) or mapper is None:
        return
    lookups = lookups_of(mapper.class_)
    if not lookups:
        return
    params = orm_context.parameters
    rows: list[dict[str, Any]]
    single = False
    if isinstance(params, list) and params and all(isinstance(r, Mapping) for r in params):
        rows = [dict(r) for r in params]
    elif isinstance(params, Mapping) and params:
        rows, single = [dict(params)], True
    else:
        values = _sqla.insert_values(orm_context.statement)
        if not values:
            return
        row = {getattr(k, "key", k): getattr(v, "value", v) for k, v in values.items()}
        _claim(session, mapper.class_, lookups, [row], explicit=True)
        return
    pinned = orm_context.bind_arguments.get("shard_id") or session.pinned
    _claim(session, mapper.class_, lookups, rows, explicit=bool(pinned), pinned=pinned)
    orm_context.parameters = rows[0] if single else rows  # the rows with the keys just generated


def _claim(
    session: ShardSession,
    model: type[Any],
    lookups: dict[str, Lookup],
    rows: list[dict[str, Any]],
    *,
    explicit: bool,
    pinned: Any = None,
) -> None:
    router = _store.ring_router(session.cluster)  # (settles each lookup's shard key first)
    first = next(iter(lookups.values()))
    if pinned:
        aliases = [str(pinned)] * len(rows)
    elif explicit:
        aliases = [router.shard_for(model, r.get(first.key_attr)) for r in rows]
    else:
        aliases = router.db_for_write_rows(model, rows) or []  # fills missing keys in copies
    items: list[tuple[Lookup, Any, Any, str]] = []
    for row, alias in zip(rows, aliases, strict=True):
        key = row.get(first.key_attr)
        for lookup in lookups.values():
            value = row.get(lookup.attr)
            if value is not None and key is not None:
                items.append((lookup, value, key, alias))
    claim_rows(session, items)
