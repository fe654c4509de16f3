"""The session side of a fan-out: route -> plan -> execute in parallel -> merge -> Result.

The planner, the executor and the merger live in :mod:`shardkit.fanout` and
know nothing of sessions; this module wires them to a :class:`ShardSession`:

* each shard's connection is taken from the session's transaction in the
  calling thread (so the session's bookkeeping is never touched by two
  threads), then each shard's statement runs in a worker thread under one
  deadline (on PostgreSQL, the time left becomes ``SET LOCAL statement_timeout``);
* ORM rows are turned into objects in the calling thread, as they are merged,
  each keyed by the identity token of its shard;
* the merged rows come back as a :class:`ShardedResult`, an ordinary
  SQLAlchemy ``Result`` that also says which shards answered.

Execution options (per statement, or per cluster as ``Cluster(deadline=, partial=)``):
``shardkit_deadline`` (seconds for the whole fan-out) and ``shardkit_partial``
(return the healthy shards' rows, marked incomplete, instead of raising).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData

from .fanout import CallableTask, FanoutPlan, merge_rows, pg_statement_timeout_sql, plan_select, run_parallel
from .typing import ShardTargets

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Result
    from sqlalchemy.orm import ORMExecuteState

    from ._session import ShardSession

__all__ = ["ShardedResult", "execute_fanout", "shards_of"]


class ShardedResult(IteratorResult[Any]):
    """The merged result of a fan-out: a SQLAlchemy Result that knows its shards.

    :ivar shards: the aliases whose rows are in the result.
    :ivar complete: ``False`` in partial mode when some shard did not answer.
    :ivar errors: alias -> exception of each shard that did not answer (partial mode).
    :ivar plan: the :class:`~shardkit.fanout.FanoutPlan` used (``None`` for writes).
    """

    shards: tuple[str, ...] = ()
    complete: bool = True
    errors: Mapping[str, BaseException] = {}  # noqa: RUF012 - replaced per instance
    plan: FanoutPlan | None = None


def shards_of(result: Any) -> tuple[str, ...]:
    """The aliases a result came from (one for a routed statement, several for a fan-out)."""
    return tuple(getattr(result, "shards", ()))


def _mark(result: Result[Any], aliases: tuple[str, ...]) -> Result[Any]:
    try:
        result.shards = aliases  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - a Result class with __slots__
        pass
    return result


def _cancel(conn: Connection) -> None:
    dbapi = conn.connection.dbapi_connection
    if dbapi is None:
        return
    if hasattr(dbapi, "cancel"):  # psycopg2
        dbapi.cancel()
    elif hasattr(dbapi, "interrupt"):  # sqlite3
        dbapi.interrupt()


def _deadline(session: ShardSession, options: Mapping[str, Any]) -> float | None:
    value = options.get("shardkit_deadline", session.cluster.deadline)
    return None if value is None else float(value)


def execute_fanout(session: ShardSession, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
    """Run ``orm_context``'s statement on every alias of ``targets`` and merge the results."""
    if not orm_context.is_select:
        return _write_fanout(session, orm_context, targets)
    statement = orm_context.statement
    options = orm_context.execution_options
    plan = plan_select(statement, shard_key_columns=targets.shard_key_columns)  # type: ignore[arg-type]
    shard_statements = {
        alias: plan.shard_statement
        if stmt is None or stmt is statement
        else plan_select(stmt, shard_key_columns=targets.shard_key_columns).shard_statement  # type: ignore[arg-type]
        for alias, stmt in targets.statements.items()
    }
    # Connections are taken here, in the calling thread: the session is not thread-safe.
    conns = {alias: session.connection(bind_arguments={"shard_id": alias}) for alias in shard_statements}
    base_bind_args = dict(orm_context.bind_arguments)

    def task(alias: str) -> CallableTask[Result[Any]]:
        conn = conns[alias]

        def run(remaining: float | None) -> Result[Any]:
            if remaining is not None and conn.dialect.name == "postgresql":
                conn.exec_driver_sql(pg_statement_timeout_sql(remaining))
            result = orm_context.invoke_statement(
                statement=shard_statements[alias],
                execution_options={"identity_token": alias},
                bind_arguments={**base_bind_args, "shard_id": alias},
            )
            if remaining is not None and conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL statement_timeout = DEFAULT")
            return result

        return CallableTask(run, lambda: _cancel(conn))

    outcome = run_parallel(
        {alias: task(alias) for alias in shard_statements},
        deadline=_deadline(session, options),
        partial=bool(options.get("shardkit_partial", session.cluster.partial)),
    )
    answered = tuple(a for a in shard_statements if a in outcome.results)
    streams = []
    for alias in answered:
        shard_result = outcome.results[alias]
        if getattr(shard_result, "_unique_filter_state", None) is not None:
            shard_result = shard_result.unique()  # joined eager loads of collections
        streams.append(shard_result)
    dialect_name = conns[answered[0]].dialect.name
    rows = merge_rows(plan.merge, streams, dialect_name=dialect_name)
    result = ShardedResult(SimpleResultMetaData(plan.output_keys), rows)
    result.shards = answered
    result.complete = outcome.complete
    result.errors = dict(outcome.errors)
    result.plan = plan
    return result


def _write_fanout(session: ShardSession, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
    """UPDATE / DELETE on several shards: each in the session's transaction, row counts summed."""
    total = 0
    for alias, stmt in targets.statements.items():
        shard_result = session._invoke_on(orm_context, alias, stmt)
        total += int(getattr(shard_result, "rowcount", 0) or 0)
    result = ShardedResult(SimpleResultMetaData([]), iter(()))
    result.shards = tuple(targets.statements)
    result.rowcount = total  # type: ignore[attr-defined]
    return result
