"""Routed writes: INSERT / UPDATE / DELETE statements, their bulk forms, and broadcast writes.

The session routes a statement (:mod:`shardkit._session`); when the statement writes, this
module runs it on its alias or aliases and merges what comes back:

* :func:`invoke_on` runs a statement on one alias, in the session's transaction, after the
  cross-shard write setting has been applied;
* :func:`run_on_targets` runs a write (or a ``text()`` statement shardkit cannot classify)
  on several aliases, one after another;
* :func:`merged` is the one place RETURNING rows (or row counts) of several shards become one
  result.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql.elements import TextClause

from . import _sqla
from .fanout._orm import ShardedResult, reads_rows

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState

    from ._session import ShardSession
    from .typing import ShardTargets

__all__ = ["invoke_on", "is_write", "merged", "run_on_targets"]

logger = logging.getLogger(__name__)


def is_write(orm_context: ORMExecuteState) -> bool:
    """Whether a statement routed to several aliases runs as writes (one alias after another,
    results concatenated or row counts summed) rather than as a planned fan-out read."""
    statement = orm_context.statement
    if isinstance(statement, TextClause):
        return True
    if isinstance(statement, FromStatement):
        return not reads_rows(statement)
    return not orm_context.is_select


def invoke_on(session: ShardSession, orm_context: ORMExecuteState, alias: str, statement: Any = None) -> Result[Any]:
    """Run ``orm_context``'s statement (or ``statement``) on ``alias``, marked with its shard."""
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = alias
    orm_context.update_execution_options(identity_token=alias)
    kwargs: dict[str, Any] = {"bind_arguments": bind_arguments}
    if statement is not None:
        kwargs["statement"] = statement
    if not (orm_context.is_insert or orm_context.is_update or orm_context.is_delete):
        result = orm_context.invoke_statement(**kwargs)  # a SELECT, or text() we cannot classify
    else:  # a bulk INSERT/UPDATE/DELETE on one known alias
        session.note_writes((alias,))
        with session.writing_on(alias):
            result = orm_context.invoke_statement(**kwargs)
    _mark(result, (alias,))
    return result


def _mark(result: Any, shards: tuple[str, ...]) -> None:
    with contextlib.suppress(AttributeError):  # a Result class with __slots__
        result.shards = shards


def merged(parts: list[Result[Any]], shards: tuple[str, ...], rowcount: int = 0) -> Result[Any]:
    """The RETURNING rows of every shard, shard after shard; without parts, an empty result
    that carries the summed row count."""
    if parts:
        result = parts[0].merge(*parts[1:]) if len(parts) > 1 else parts[0]
        _mark(result, shards)
        return result
    empty = ShardedResult(SimpleResultMetaData([]), iter(()))
    empty.shards = shards
    empty.rowcount = rowcount  # type: ignore[attr-defined]
    return empty


def run_on_targets(session: ShardSession, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
    """A write, or a ``text()`` statement, on several aliases, one after another, each in the
    session's transaction.  shardkit does not parse SQL, so there is no merge plan: rows that
    come back (RETURNING, a textual SELECT) are concatenated in alias order, and row counts of
    writes are summed."""
    statement = orm_context.statement
    parts = [invoke_on(session, orm_context, alias, stmt) for alias, stmt in targets.statements.items()]
    if isinstance(statement, TextClause):
        returning = all(getattr(part, "returns_rows", True) for part in parts)
    else:  # UPDATE/DELETE ... RETURNING, and from_statement() of any write (its rows are objects)
        returning = bool(_sqla.returning_of(statement)) or isinstance(statement, FromStatement)
    aliases = tuple(targets.statements)
    if returning:
        return merged(parts, aliases)
    total = 0
    for part in parts:
        total += int(getattr(part, "rowcount", 0) or 0)
        part.close()
    return merged([], aliases, total)
