"""The session side of a fan-out: route -> plan -> execute in parallel -> merge -> Result.

The planner, the executor and the merger live in :mod:`shardkit.fanout` and
know nothing of sessions; this module wires them to a :class:`ShardSession`:

* the autoflush and each shard's connection are done in the calling thread,
  so nothing in the session changes while workers run; then each shard's
  statement runs in a worker thread under one deadline (on PostgreSQL, the
  time left becomes ``SET LOCAL statement_timeout``).  The workers only read
  the session (the connection each found already open);
* ORM rows are turned into objects in the calling thread, as they are merged,
  each keyed by the identity token of its shard;
* the merged rows come back as a :class:`ShardedResult`, an ordinary
  SQLAlchemy ``Result`` that also says which shards answered.

Execution options (per statement, or per cluster as ``Cluster(deadline=, partial=)``):
``shardkit_deadline`` (seconds for the whole fan-out) and ``shardkit_partial``
(return the healthy shards' rows, marked incomplete, instead of raising).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, nulls_first, nulls_last
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import operators, selectable
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.lambdas import StatementLambdaElement

from .. import _sqla
from ..errors import ShardQueryError, UnsupportedQueryError, brief
from ..observe import fanout_probe
from ..typing import ShardTargets
from ._aio import on_event_loop, run_on_loop
from ._collation import effective, lookups, text_keys
from ._connect import ConnectionTask
from ._execute import pg_statement_timeout_sql, run_parallel
from ._merge import merge_rows, null_is_larger
from ._plan import FanoutPlan, cached_plan_select, plan_from_statement, plan_select
from ._prefetch import prefetch
from ._threads import calling_thread_executor, thread_bound

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Result
    from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

    from .._session import ShardSession

__all__ = ["ShardedResult", "execute_fanout", "reads_rows", "shards_of"]

logger = logging.getLogger(__name__)

#: First words of a textual statement that only reads (comments and parentheses skipped).
_READING_WORDS = frozenset({"select", "values", "table", "show", "explain", "describe", "pragma"})
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.S)
_WRITE_WORD = re.compile(r"\b(?:insert|update|delete|merge)\b", re.I)


def reads_rows(statement: Any) -> bool:
    """Whether a statement SQLAlchemy does not call a SELECT only reads: a ``from_statement()``
    over a SELECT or over a textual SELECT (``SELECT``, ``VALUES``, a ``WITH`` that writes
    nothing).  ``from_statement()`` over INSERT/UPDATE/DELETE ... RETURNING writes."""
    if not isinstance(statement, FromStatement):
        return False
    element = statement.element
    if isinstance(element, selectable.SelectBase):
        return True
    if isinstance(element, TextClause):
        sql = element.text
        lead = _LEADING.match(sql)
        sql = sql[lead.end() :] if lead else sql
        word = sql.split(None, 1)[0].lower() if sql else ""
        if word == "with":
            return _WRITE_WORD.search(sql) is None
        return word in _READING_WORDS
    return False


class ShardedResult(IteratorResult[Any]):
    """The merged result of a fan-out: a SQLAlchemy Result that knows its shards.

    :ivar shards: the aliases whose rows are in the result.
    :ivar complete: ``False`` in partial mode when some shard did not answer.
    :ivar errors: alias -> exception of each shard that did not answer (partial mode).
    :ivar plan: the :class:`~shardkit.fanout.FanoutPlan` used (``None`` for writes).
    """

    shards: tuple[str, ...] = ()
    complete: bool = True
    errors: Mapping[str, BaseException] = {}
    plan: FanoutPlan | None = None


def shards_of(result: Any) -> tuple[str, ...]:
    """The aliases a result came from (one for a routed statement, several for a fan-out).

    Also looks through the filtering wrappers of a result (``ScalarResult`` from
    ``session.scalars()``, ``MappingResult``, ``TupleResult``), which do not
    carry the ``shards`` attribute themselves.
    """
    seen = 0
    while result is not None and seen < 8:
        shards = getattr(result, "shards", None)
        if shards is not None:
            return tuple(shards)
        # a SELECT routed to one alias runs as SQLAlchemy's own execution: the alias is in
        # the execution options of its cursor result (an ORM result keeps that as ``raw``)
        for cursor_result in (result, getattr(result, "raw", None)):
            context = getattr(cursor_result, "context", None)
            alias = getattr(context, "execution_options", {}).get("shardkit_alias")
            if alias is not None:
                return (alias,)
        result = _sqla.wrapped_result(result)
        seen += 1
    return ()


_ADOPTED = "shardkit.fanout.adopted"  # session.info key: connections a fan-out worker checked out


def _adopt(session: ShardSession, adopted: list[Connection], conn: Connection) -> Connection:
    """Make ``conn`` (checked out by a fan-out worker, no transaction begun) the session's
    connection for its engine, as if the session had connected itself: it joins the session's
    transaction, and goes back to its pool when that transaction ends (``adopted`` is the
    session's list of such connections, made in the calling thread)."""
    adopted.append(conn)
    try:
        return session.connection(bind_arguments={"bind": conn})
    except BaseException as exc:
        with contextlib.suppress(ValueError):
            adopted.remove(conn)  # the task closes it
        # Two aliases on one engine: the other alias's worker adopted its connection first.
        held: Connection | None = (
            _sqla.held_connection(session, conn.engine) if isinstance(exc, sa_exc.InvalidRequestError) else None
        )
        if held is None:
            raise
        conn.close()
        return held


_listening = False


def _close_adopted_at_transaction_end() -> None:
    global _listening
    if _listening:
        return
    from .._session import ShardSession

    if not event.contains(ShardSession, "after_transaction_end", _close_adopted):
        event.listen(ShardSession, "after_transaction_end", _close_adopted)
    _listening = True


def _close_adopted(session: Session, transaction: SessionTransaction) -> None:
    # A connection handed to the session (bind=connection) is the giver's to close: SQLAlchemy
    # ends its transaction with the session's, and this returns it to its pool.
    if transaction.parent is None and _ADOPTED in session.info:
        for conn in session.info.pop(_ADOPTED):
            with contextlib.suppress(Exception):
                conn.close()


def _runner(
    orm_context: ORMExecuteState,
    alias: str,
    statement: Any,
    base_bind_args: dict[str, Any],
    deadline: float | None,
    before: Callable[[Connection], None] | None = None,
    on: str | None = None,
) -> Callable[[Connection, float | None], Result[Any]]:
    """The body of ``alias``'s task: run its statement on the session's connection of the shard
    (of ``on``, its replica, when one reads for it: rows keep ``alias`` as identity token)
    (on PostgreSQL with the time left as ``statement_timeout``); ``before`` first reads what the
    merge needs to know of the shard (its text collations), once per engine."""

    def run(conn: Connection, remaining: float | None) -> Result[Any]:
        pg = conn.dialect.name == "postgresql"
        started = time.monotonic()
        try:
            if remaining is not None and pg:
                conn.exec_driver_sql(pg_statement_timeout_sql(remaining))
            if before is not None:
                before(conn)
            result = orm_context.invoke_statement(
                statement=statement,
                execution_options={"identity_token": alias, "autoflush": False, "prebuffer_rows": False},
                # flushed by the caller; an AsyncSession's prebuffer is done on the merged rows (below)
                bind_arguments={**base_bind_args, "shard_id": on or alias},
            )
            if remaining is not None and pg:
                conn.exec_driver_sql("SET LOCAL statement_timeout = DEFAULT")
        except sa_exc.DBAPIError as exc:
            if remaining is not None and _is_timeout(exc, started + remaining):
                raise TimeoutError(
                    f"shard {alias!r} did not answer within {deadline}s (server cancelled the statement)"
                ) from exc
            raise
        return result

    return run


#: SQLSTATE of a statement cancelled by statement_timeout or a cancel request.
_PG_QUERY_CANCELED = "57014"


def _is_timeout(exc: sa_exc.DBAPIError, deadline_at: float) -> bool:
    """True when ``exc`` is the server (or our cancel) stopping a statement at the deadline."""
    if getattr(exc.orig, "pgcode", None) == _PG_QUERY_CANCELED:
        return True
    return time.monotonic() >= deadline_at - 0.01


def _deadline(session: ShardSession, options: Mapping[str, Any]) -> float | None:
    value = options.get("shardkit_deadline", session.cluster.deadline)
    return None if value is None else float(value)


def _pin_null_order(
    session: ShardSession, statements: dict[str, Any], plan: FanoutPlan, reference: str
) -> dict[str, Any]:
    """On a cluster whose dialects order NULLs differently (PostgreSQL: NULL is largest;
    SQLite and MySQL: smallest), spell the reference dialect's NULL placement out in every
    shard's ORDER BY, so every stream is sorted by the same rule the merge uses.  The
    reference is the first target alias (``"default"`` order in DATABASES)."""
    if not any(k.nulls_first is None for k in plan.merge.sort_keys):
        return statements
    dialects = {session.cluster.spec(alias).dialect_name for alias in statements}
    if len({null_is_larger(d) for d in dialects}) < 2:
        return statements
    if dialects & {"mysql", "mariadb"}:
        raise UnsupportedQueryError(
            "ORDER BY without NULLS FIRST/LAST on shards that order NULLs differently "
            f"({', '.join(sorted(dialects))}), and MySQL cannot be told where NULLs go",
            construct="ORDER BY on a mixed-dialect fan-out",
        )
    larger = null_is_larger(reference)
    out: dict[str, Any] = {}
    for alias, stmt in statements.items():
        clauses = []
        for clause in _sqla.order_by_clauses(stmt):
            modifier = getattr(clause, "modifier", None)
            if modifier in (operators.nulls_first_op, operators.nulls_last_op):
                clauses.append(clause)
                continue
            descending = modifier is operators.desc_op
            clauses.append(nulls_first(clause) if larger == descending else nulls_last(clause))
        out[alias] = stmt.order_by(None).order_by(*clauses)
    return out


def execute_fanout(session: ShardSession, orm_context: ORMExecuteState, targets: ShardTargets) -> Result[Any]:
    """Run ``orm_context``'s statement on every alias of ``targets`` and merge the results."""
    statement = orm_context.statement
    if isinstance(statement, FromStatement):
        # rows come back shard after shard (a textual statement has no merge plan)
        plan = plan_from_statement(statement, shard_key_columns=targets.shard_key_columns)
        shard_statements = {alias: plan.shard_statement for alias in targets.statements}
    else:
        statement = _resolved(statement)
        plan = cached_plan_select(statement, shard_key_columns=targets.shard_key_columns)
        shard_statements = {
            alias: plan.shard_statement
            if stmt is None or stmt is orm_context.statement or stmt is statement
            else plan_select(_resolved(stmt), shard_key_columns=targets.shard_key_columns).shard_statement
            for alias, stmt in targets.statements.items()
        }
    options = orm_context.execution_options
    dialect_name = session.cluster.spec(next(iter(shard_statements))).dialect_name
    shard_statements = _pin_null_order(session, shard_statements, plan, dialect_name)
    partial = bool(options.get("shardkit_partial", session.cluster.partial))
    deadline = _deadline(session, options)
    probe = fanout_probe(session, statement, options, targets)  # listeners, max_rows, explain(analyze=True)
    if probe is not None:
        partial = probe.partial(partial)
    # The session is not thread-safe: anything that changes it happens here, in the calling
    # thread, before the workers start: the autoflush the shard executions would each do, and
    # taking each shard's connection from the session's transaction.
    if _sqla.wants_autoflush(orm_context):
        _sqla.autoflush(session)
    # each shard is read where a routed read of it would be: a replica (shardkit._replicas) or itself
    on = {alias: session.read_on(alias, orm_context) for alias in shard_statements}
    # Getting each shard's connection counts against the deadline: a shard the session holds
    # no connection for yet is checked out (and maybe connected) in its worker, and the
    # connection adopted into the session's transaction there; a shard that hangs in its
    # checkout is abandoned at the deadline like a slow statement (shardkit.fanout._connect).
    base_bind_args = dict(orm_context.bind_arguments)
    _close_adopted_at_transaction_end()
    adopt = functools.partial(_adopt, session, session.info.setdefault(_ADOPTED, []))
    tasks: dict[str, ConnectionTask[Result[Any]]] = {}
    unreachable: dict[str, BaseException] = {}
    # Text the merge compares (ORDER BY, MIN/MAX, GROUP BY/DISTINCT keys): each shard's
    # collation of it, read once per engine by the shard's task when not yet known.
    compared = text_keys(plan.text_exprs) if plan.text_exprs else ()
    befores = {a: lookups(session.cluster.engine(on[a]), compared) for a in shard_statements} if compared else {}
    rules: dict[int, str] | None = None
    if compared and not any(befores.values()):  # all known (the usual case): decide before running
        rules = effective(compared, {a: session.cluster.engine(on[a]) for a in shard_statements})
    # Under an AsyncSession: the shards run as coroutines on the event loop (fanout._aio)
    on_loop = on_event_loop(session.cluster.engine(on[a]) for a in shard_statements)
    for alias in shard_statements:
        engine = session.cluster.engine(on[alias])
        body = _runner(
            orm_context, alias, shard_statements[alias], base_bind_args, deadline, befores.get(alias), on[alias]
        )
        if probe is not None:
            body = probe.shard(alias, body)
        if _sqla.held_connection(session, engine) is None and (on_loop or not thread_bound(engine)):
            tasks[alias] = ConnectionTask(alias, body, checkout=engine.connect, adopt=adopt)
            continue
        # Held already (no I/O), or a connection only the calling thread may use: as before.
        try:
            conn = session.connection(bind_arguments={"shard_id": on[alias]})
        except sa_exc.DBAPIError as exc:
            # A shard that cannot be reached is a shard failure like any other (named, or
            # skipped in partial mode), not a bare driver error.
            unreachable[alias] = exc
            if not partial:
                break
            continue
        tasks[alias] = ConnectionTask(alias, body, held=conn)
    if unreachable and (not partial or not tasks):
        detail = "; ".join(f"{a}: {brief(e)}" for a, e in unreachable.items())
        raise ShardQueryError(
            f"fan-out failed on shard(s) {', '.join(repr(a) for a in unreachable)}: cannot connect ({detail})",
            errors=unreachable,
            aliases=tuple(unreachable),
        )
    executor = calling_thread_executor((session.cluster.engine(on[a]) for a in tasks), deadline)
    try:
        if on_loop:
            outcome = run_on_loop(tasks, deadline=deadline, partial=partial, session=session)
        else:
            outcome = run_parallel(tasks, deadline=deadline, partial=partial, executor=executor)
    except BaseException as exc:
        if probe is not None:
            probe.failed(exc)  # tells the listeners; a max_rows stop is raised as MaxRowsError
        raise
    outcome.errors.update(unreachable)
    answered = tuple(a for a in shard_statements if a in outcome.results)
    if outcome.errors:
        logger.warning(
            "partial fan-out: %d of %d shards answered; no rows from %s",
            len(answered),
            len(shard_statements),
            "; ".join(f"{a!r} ({brief(e)})" for a, e in outcome.errors.items()),
        )
    # An ordered merge with a LIMIT keeps only offset+limit rows of all the shards'
    # offset+limit each: build ORM objects in small chunks, as the merge pulls rows,
    # so the rows it throws away are never turned into objects.
    merge = plan.merge
    if compared and rules is None:
        try:
            rules = effective(compared, {a: session.cluster.engine(on[a]) for a in answered})
        except UnsupportedQueryError:
            for part in outcome.results.values():
                part.close()
            raise
    if rules:  # a SQLite NOCASE/RTRIM key, or text values to refuse when met
        merge = dataclasses.replace(
            merge,
            sort_keys=tuple(
                dataclasses.replace(k, text_rule=rules[i]) if i in rules else k for i, k in enumerate(merge.sort_keys)
            ),
        )
    lazy_chunk = None
    if merge.sort_keys and merge.limit is not None and merge.aggregate is None and not merge.distinct:
        # what the merge reads of each shard at a time: its share of offset+limit
        lazy_chunk = max(1, -(-(merge.offset + merge.limit) // max(1, len(answered))))
    streams = []
    yield_per = options.get("yield_per")
    for alias in answered:
        shard_result = outcome.results[alias]
        if yield_per and len(answered) > 1:
            # streamed: each shard's next batch is read while the merge works on this one
            prefetch(shard_result, int(yield_per))
        if _sqla.needs_unique(shard_result):
            shard_result = shard_result.unique()  # joined eager loads of collections
        elif lazy_chunk is not None and "yield_per" not in options:
            shard_result = shard_result.yield_per(lazy_chunk)
        streams.append(shard_result)
    merged = streams if probe is None else probe.streams(answered, streams)  # rows per shard, max_rows
    rows = merge_rows(merge, merged, dialect_name=dialect_name, batch=yield_per)
    if probe is not None:
        rows = probe.merged(iter(rows), outcome.errors)
    if options.get("prebuffer_rows"):  # AsyncSession.execute(): the merged rows, read in its greenlet
        rows = iter(list(rows))
    result = ShardedResult(SimpleResultMetaData(plan.output_keys), rows)
    if streams:
        # What the ORM told the legacy Query about these rows ("is_single_entity": apply
        # .scalars(); "filtered": apply .unique()) is the same for every shard's result.
        attributes = _sqla.result_attributes(streams[0])
        if plan.merge.row_width != len(plan.merge.output_positions) and "is_single_entity" in attributes:
            # the shards also sent hidden sort columns: say what the statement itself selects
            single = plan.single_entity and not _sqla.only_return_tuples(orm_context)
            attributes = attributes.union({"is_single_entity": single})
        _sqla.set_result_attributes(result, attributes)
    result.shards = answered
    result.complete = outcome.complete
    result.errors = {a: outcome.errors[a] for a in shard_statements if a in outcome.errors}
    result.plan = plan
    return result


def _resolved(statement: Any) -> Any:
    """A ``lambda_stmt()``'s statement, with the values of this call; any other statement as is."""
    if isinstance(statement, StatementLambdaElement):
        return _sqla.lambda_statement(statement)
    return statement
