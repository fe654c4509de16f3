"""Metrics, traces and guards for a cluster in production.

Listeners
---------
``cluster.add_listener(listener)`` / ``cluster.remove_listener(listener)``: a listener is any
object with one or both of these methods (each is optional)::

    class Mine:
        def on_statement(self, event: StatementEvent) -> None: ...   # every statement sent to an alias
        def on_fanout(self, event: FanoutEvent) -> None: ...         # every fan-out read, once merged

A plain callable ``fn(event)`` is called with both kinds of event.
``on_statement`` is called for every statement a cluster engine runs (routed reads and writes,
flushes, each shard's statement of a fan-out: ``event.in_fanout`` tells), right after the
database answered or failed, in the thread that ran it.  ``on_fanout`` is called once per
fan-out read, in the calling thread, when its merged rows were all read (or the result was
closed), or when it failed.  A listener must be quick and must not raise: an exception it
raises is logged and dropped.  :class:`MetricsListener` is a ready-made one (counters and
latency summaries per alias); :func:`shardkit.otel.instrument` adds OpenTelemetry spans.

Slow statements
---------------
``Cluster(slow_statement=0.5)``: a statement that took longer is logged at WARNING by the
``shardkit.observe`` logger (its alias, table, time and SQL, never its parameters).

Scatter guards
--------------
``scatter="allow" | "warn" | "refuse"`` (Vitess's ``no_scatter``), per cluster
(``Cluster(scatter=)``), session (``cluster.session(scatter=)``) and statement
(``.execution_options(shardkit_scatter=)``); the innermost wins.  A *scatter* is a statement
the routers send to every shard because it names no shard key (``ShardTargets.all_shards``):
"warn" logs it at WARNING, "refuse" raises :class:`~shardkit.errors.ScatterRefusedError` before
anything runs.  A statement whose shards the caller named (``shardkit_using=[...]``, a
``text()`` fan-out placed with ``shardkit_using``) is not a scatter: the caller chose them;
a fan-out over some shards only (an ``IN`` of shard keys, a lookup) is not one either.

``max_rows`` (Vitess's ``max_memory_rows``), per cluster, session and statement
(``shardkit_max_rows``): a fan-out read whose shards return more rows than that together stops,
cancels the shards still running and raises :class:`~shardkit.errors.MaxRowsError`.  A shard's
rows are counted when its statement returns on drivers that report it (PostgreSQL, MySQL);
on the others (SQLite) the merged rows are counted as they are read.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event
from sqlalchemy.sql import Join, Select

from .errors import ConfigError, MaxRowsError, ScatterRefusedError, ShardQueryError, brief

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ._cluster import Cluster
    from .typing import ShardTargets

__all__ = [
    "SCATTER_MODES",
    "FanoutEvent",
    "Listener",
    "MetricsListener",
    "ShardTiming",
    "StatementEvent",
    "add_listener",
    "remove_listener",
]

logger = logging.getLogger(__name__)

SCATTER_MODES = ("allow", "warn", "refuse")


# -- events ------------------------------------------------------------------------------------


@dataclass(slots=True)
class StatementEvent:
    """One statement an alias ran.

    :ivar alias: the alias (database) it ran on.
    :ivar table: the (first) table it reads or writes, ``None`` when unknown (``text()``).
    :ivar kind: ``"select"``, ``"insert"``, ``"update"``, ``"delete"`` or ``"other"``.
    :ivar rows: rows written, or returned by a SELECT as the driver reports them
        (PostgreSQL, MySQL); ``None`` when the driver does not tell (SQLite SELECT).
    :ivar seconds: time from sending it to the database's answer.
    :ivar error: the exception it raised, else ``None``.
    :ivar sql: the SQL text (never the parameters).
    :ivar in_fanout: one shard's statement of a fan-out read.
    :ivar start_ns: wall-clock start (``time.time_ns()``), for traces.
    """

    alias: str
    table: str | None
    kind: str
    rows: int | None
    seconds: float
    error: BaseException | None = None
    sql: str = ""
    in_fanout: bool = False
    start_ns: int = 0


@dataclass(slots=True)
class ShardTiming:
    """One shard of a fan-out: its time (``None``: it never answered), rows, error, SQL."""

    alias: str
    seconds: float | None
    rows: int | None = None
    error: BaseException | None = None
    start_ns: int = 0


@dataclass(frozen=True)
class FanoutEvent:
    """One fan-out read.

    :ivar shards: alias -> :class:`ShardTiming`, in DATABASES order.
    :ivar table: the (first) table it reads.
    :ivar seconds: from the start to the last merged row (or the failure).
    :ivar merge_seconds: time spent merging (while the caller read the rows).
    :ivar rows: merged rows handed to the caller.
    :ivar errors: alias -> exception of each shard that gave no rows (a partial result, or
        the failure).
    :ivar error: the exception that ended the fan-out, ``None`` when it returned rows.
    :ivar scatter: the routers sent it to every shard (no shard key).
    """

    shards: Mapping[str, ShardTiming]
    table: str | None = None
    seconds: float = 0.0
    merge_seconds: float = 0.0
    rows: int = 0
    errors: Mapping[str, BaseException] = field(default_factory=dict)
    error: BaseException | None = None
    scatter: bool = False
    start_ns: int = 0

    @property
    def width(self) -> int:
        """How many shards it was sent to."""
        return len(self.shards)

    @property
    def partial(self) -> bool:
        """Rows were returned without some shards' rows."""
        return bool(self.errors) and self.error is None

    @property
    def slowest(self) -> ShardTiming | None:
        """The shard that answered last (``None`` if none answered)."""
        timed = [t for t in self.shards.values() if t.seconds is not None]
        return max(timed, key=lambda t: t.seconds or 0.0) if timed else None

    @property
    def slowest_seconds(self) -> float | None:
        slowest = self.slowest
        return None if slowest is None else slowest.seconds


class Listener:
    """A base class for listeners (optional: any object with either method will do)."""

    def on_statement(self, event: StatementEvent) -> None:
        """Called after each statement an alias ran."""

    def on_fanout(self, event: FanoutEvent) -> None:
        """Called once per fan-out read."""


# -- the ready-made in-memory metrics ------------------------------------------------------------


class Summary:
    """Count, sum, min, max and quantiles of a latency, over the last ``window`` values."""

    __slots__ = ("_recent", "_window", "count", "max", "min", "total")

    def __init__(self, window: int = 1024) -> None:
        self.count = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = 0.0
        self._window = window
        self._recent: list[float] = []

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        recent = self._recent
        if len(recent) >= self._window:
            del recent[: self._window // 2]
        recent.append(value)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the recent values (0.0 when there is none)."""
        if not self._recent:
            return 0.0
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "sum": self.total,
            "min": self.min if self.count else 0.0,
            "max": self.max,
            "mean": self.mean,
            "p50": self.quantile(0.5),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
        }


@dataclass
class ShardMetrics:
    """What :class:`MetricsListener` counts for one alias."""

    statements: int = 0
    rows: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    latency: Summary = field(default_factory=Summary)

    def as_dict(self) -> dict[str, Any]:
        return {
            "statements": self.statements,
            "rows": self.rows,
            "errors": self.errors,
            "by_kind": dict(self.by_kind),
            "latency": self.latency.as_dict(),
        }


@dataclass
class FanoutMetrics:
    """What :class:`MetricsListener` counts over every fan-out read."""

    count: int = 0
    partial: int = 0
    failed: int = 0
    scatter: int = 0
    rows: int = 0
    width: Summary = field(default_factory=Summary)
    seconds: Summary = field(default_factory=Summary)
    slowest_shard: Summary = field(default_factory=Summary)
    merge: Summary = field(default_factory=Summary)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "partial": self.partial,
            "failed": self.failed,
            "scatter": self.scatter,
            "rows": self.rows,
            "width": self.width.as_dict(),
            "seconds": self.seconds.as_dict(),
            "slowest_shard": self.slowest_shard.as_dict(),
            "merge": self.merge.as_dict(),
        }


class MetricsListener(Listener):
    """In-memory counters and latency summaries, per alias and over fan-outs::

        metrics = shardkit.observe.MetricsListener()
        cluster.add_listener(metrics)
        ...
        metrics.shards["s0"].statements, metrics.shards["s0"].latency.quantile(0.99)
        metrics.fanouts.count, metrics.fanouts.slowest_shard.max
        metrics.snapshot()   # all of it as plain dicts (for a /metrics endpoint)

    Thread-safe (one lock); :meth:`reset` starts again from zero.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.shards: dict[str, ShardMetrics] = {}
        self.fanouts = FanoutMetrics()

    def on_statement(self, event: StatementEvent) -> None:
        with self._lock:
            m = self.shards.get(event.alias)
            if m is None:
                m = self.shards[event.alias] = ShardMetrics()
            m.statements += 1
            m.by_kind[event.kind] = m.by_kind.get(event.kind, 0) + 1
            if event.rows is not None and event.rows > 0:
                m.rows += event.rows
            if event.error is not None:
                m.errors += 1
            m.latency.add(event.seconds)

    def on_fanout(self, event: FanoutEvent) -> None:
        with self._lock:
            f = self.fanouts
            f.count += 1
            f.partial += event.partial
            f.failed += event.error is not None
            f.scatter += event.scatter
            f.rows += event.rows
            f.width.add(event.width)
            f.seconds.add(event.seconds)
            f.merge.add(event.merge_seconds)
            slowest = event.slowest_seconds
            if slowest is not None:
                f.slowest_shard.add(slowest)

    def reset(self) -> None:
        with self._lock:
            self.shards = {}
            self.fanouts = FanoutMetrics()

    def snapshot(self) -> dict[str, Any]:
        """``{"shards": {alias: {...}}, "fanouts": {...}}``: plain numbers."""
        with self._lock:
            return {
                "shards": {a: m.as_dict() for a, m in self.shards.items()},
                "fanouts": self.fanouts.as_dict(),
            }


# -- the per-cluster observer --------------------------------------------------------------------


class Observer:
    """A cluster's listeners, its slow-statement threshold and the engines it watches."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster_ref = weakref.ref(cluster)
        self.listeners: list[Any] = []
        self.statement_fns: tuple[Callable[[StatementEvent], Any], ...] = ()
        self.fanout_fns: tuple[Callable[[FanoutEvent], Any], ...] = ()
        self.watched: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()

    @property
    def slow_statement(self) -> float | None:
        cluster = self.cluster_ref()
        value = getattr(cluster, "slow_statement", None)
        return None if value is None else float(value)

    def refresh(self) -> None:
        self.statement_fns = tuple(fn for fn in (_method(x, "on_statement") for x in self.listeners) if fn)
        self.fanout_fns = tuple(fn for fn in (_method(x, "on_fanout") for x in self.listeners) if fn)

    @property
    def watching_statements(self) -> bool:
        return bool(self.statement_fns) or self.slow_statement is not None

    def fanout(self, ev: FanoutEvent) -> None:
        for fn in self.fanout_fns:
            try:
                fn(ev)
            except Exception:
                logger.exception("shardkit fan-out listener %r failed", fn)


_OBSERVER = "_shardkit_observer"


def _real(cluster: Any) -> Any:
    """The cluster itself for an async session's view of it (``shardkit._async``)."""
    return cluster.__dict__.get("_cluster", cluster)


def observer_of(cluster: Any) -> Observer | None:
    """The cluster's :class:`Observer`, ``None`` when nothing was ever set up."""
    return _real(cluster).__dict__.get(_OBSERVER)  # type: ignore[no-any-return]


def _observer(cluster: Cluster) -> Observer:
    cluster = _real(cluster)
    obs = observer_of(cluster)
    if obs is None:
        obs = Observer(cluster)
        cluster.__dict__[_OBSERVER] = obs
    return obs


def _method(listener: Any, name: str) -> Callable[[Any], Any] | None:
    """``listener.<name>``; a plain callable (no such methods) is called with every event."""
    fn = getattr(listener, name, None)
    if callable(fn):
        return fn  # type: ignore[no-any-return]
    if callable(listener) and not any(callable(getattr(listener, n, None)) for n in ("on_statement", "on_fanout")):
        return listener  # type: ignore[no-any-return]
    return None


def add_listener(cluster: Cluster, listener: Any) -> None:
    """Call ``listener.on_statement`` / ``listener.on_fanout`` for this cluster's statements and
    fan-outs (see the module docstring); what :meth:`Cluster.add_listener` does.  A plain
    callable is called with every event (a :class:`StatementEvent` or a :class:`FanoutEvent`)."""
    if _method(listener, "on_statement") is None and _method(listener, "on_fanout") is None:
        raise ConfigError(
            f"a shardkit listener is a callable or has an on_statement or on_fanout method, got {listener!r}"
        )
    obs = _observer(cluster)
    obs.listeners.append(listener)
    obs.refresh()
    for alias in cluster.aliases:
        engine = cluster.created_engine(alias)
        if engine is not None:
            watch_engine(cluster, alias, engine)
    made_async = _real(cluster).__dict__.get("_shardkit_async")  # shardkit._async's engines so far
    for alias, async_engine in dict(getattr(made_async, "engines", None) or {}).items():
        watch_engine(cluster, alias, async_engine.sync_engine)


def remove_listener(cluster: Cluster, listener: Any) -> None:
    """Stop calling ``listener``; one that was not added is an error, as in SQLAlchemy."""
    obs = observer_of(cluster)
    if obs is None or listener not in obs.listeners:
        raise ConfigError(f"{listener!r} is not a listener of this cluster")
    obs.listeners.remove(listener)
    obs.refresh()


def listeners_of(cluster: Cluster) -> tuple[Any, ...]:
    obs = observer_of(cluster)
    return tuple(obs.listeners) if obs is not None else ()


def engine_created(cluster: Cluster, alias: str, engine: Engine) -> None:
    """A cluster made the engine of ``alias``: watch its statements if anything listens (or a
    slow-statement threshold is set)."""
    if getattr(cluster, "slow_statement", None) is not None or observer_of(cluster) is not None:
        watch_engine(cluster, alias, engine)


# -- statements, from the engines' events --------------------------------------------------------

# the alias while a fan-out's shard statement runs: a context variable, not a thread-local, since
# under an AsyncSession the shards' bodies run interleaved in greenlets of one thread (each has
# its own context)
_fanout_shard: contextvars.ContextVar[str | None] = contextvars.ContextVar("shardkit_fanout_shard", default=None)


def watch_engine(cluster: Cluster, alias: str, engine: Engine) -> None:
    """Time every statement of ``engine`` (once per engine) and tell the cluster's observer.

    Listens to the dialect's ``do_execute`` / ``do_executemany`` / ``do_execute_no_params``
    events and runs the dialect's own method inside them: one call around the DBAPI's
    ``execute``, and no engine-level event (those make every connection step dispatch)."""
    obs = _observer(cluster)
    if engine in obs.watched:
        return
    obs.watched[engine] = alias
    dialect = engine.dialect
    perf = time.perf_counter
    wall = time.time_ns
    in_fanout = _fanout_shard.get

    cluster_ref = weakref.ref(cluster)

    def tell(cursor: Any, statement: str, context: Any, start: float, start_ns: int, error: Any) -> None:
        seconds = perf() - start
        fns = obs.statement_fns
        owner = cluster_ref()
        threshold = getattr(owner, "slow_statement", None)
        if not fns and threshold is None:
            return
        compiled = getattr(context, "compiled", None)
        found = getattr(compiled, "shardkit_kind", None) if compiled is not None else None
        if found is None:
            found = _kind_and_table(context, compiled)
        rowcount = -1 if error is not None else getattr(cursor, "rowcount", -1)
        ev = StatementEvent(
            alias,
            found[1],
            found[0],
            rowcount if type(rowcount) is int and rowcount >= 0 else None,
            seconds,
            error,
            statement,
            in_fanout() is not None,
            start_ns,
        )
        if threshold is not None and seconds >= threshold:
            _log_slow(ev, threshold)
        for fn in fns:
            try:
                fn(ev)
            except Exception:
                logger.exception("shardkit statement listener %r failed", fn)

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        start, start_ns = perf(), wall()
        try:
            dialect.do_execute(cursor, statement, parameters, context)
        except BaseException as exc:
            tell(cursor, statement, context, start, start_ns, exc)
            raise
        tell(cursor, statement, context, start, start_ns, None)
        return True

    def do_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        start, start_ns = perf(), wall()
        try:
            dialect.do_executemany(cursor, statement, parameters, context)
        except BaseException as exc:
            tell(cursor, statement, context, start, start_ns, exc)
            raise
        tell(cursor, statement, context, start, start_ns, None)
        return True

    def do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        start, start_ns = perf(), wall()
        try:
            dialect.do_execute_no_params(cursor, statement, context)
        except BaseException as exc:
            tell(cursor, statement, context, start, start_ns, exc)
            raise
        tell(cursor, statement, context, start, start_ns, None)
        return True

    event.listen(engine, "do_execute", do_execute)
    event.listen(engine, "do_executemany", do_executemany)
    event.listen(engine, "do_execute_no_params", do_execute_no_params)


def _log_slow(ev: StatementEvent, threshold: float) -> None:
    logger.warning(
        "slow statement on %r: %.3fs (threshold %ss), %s %s: %s",
        ev.alias,
        ev.seconds,
        threshold,
        ev.kind,
        ev.table or "-",
        _short(ev.sql),
    )


def _kind_and_table(context: Any, compiled: Any) -> tuple[str, str | None]:
    """The statement kind and table of an execution; kept on the compiled statement (which
    SQLAlchemy caches) as ``shardkit_kind``, so it is worked out once per statement shape."""
    if compiled is None:
        return _kind_of_sql(getattr(context, "statement", "") or ""), None
    found = _kind_of_compiled(context, compiled)
    with contextlib.suppress(AttributeError):  # a compiled class with __slots__: work it out each time
        compiled.shardkit_kind = found
    return found


def _kind_of_compiled(context: Any, compiled: Any) -> tuple[str, str | None]:
    statement = getattr(compiled, "statement", None)
    if getattr(context, "isinsert", False):
        kind = "insert"
    elif getattr(context, "isupdate", False):
        kind = "update"
    elif getattr(context, "isdelete", False):
        kind = "delete"
    elif getattr(statement, "is_select", False):
        kind = "select"
    else:
        kind = _kind_of_sql(str(getattr(context, "statement", "") or ""))
    return kind, table_name(statement)


def table_name(statement: Any) -> str | None:
    """The (first) table a statement reads or writes, ``None`` when it has none."""
    table = getattr(statement, "table", None)
    if isinstance(table, Table):
        return table.name
    froms: Any = ()
    if isinstance(statement, Select):
        froms = statement.get_final_froms()
    else:
        inner = getattr(statement, "element", None)  # from_statement(select(...))
        if isinstance(inner, Select):
            froms = inner.get_final_froms()
    for frm in froms:
        while isinstance(frm, Join):
            frm = frm.left
        if isinstance(frm, Table):
            return frm.name
    return None


def _kind_of_sql(sql: str) -> str:
    word = sql.lstrip(" (\n\t").split(None, 1)[0].lower() if sql.strip() else ""
    if word in ("select", "with", "values"):
        return "select"
    return word if word in ("insert", "update", "delete") else "other"


def _short(sql: str, limit: int = 300) -> str:
    one = " ".join(sql.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


# -- scatter guards -------------------------------------------------------------------------------


def check_scatter_mode(value: Any, setting: str = "scatter") -> str | None:
    """``value`` if it is a scatter mode (or ``None``), else :class:`ConfigError`."""
    if value is None or value in SCATTER_MODES:
        return value  # type: ignore[no-any-return]
    raise ConfigError(f"{setting} must be 'allow', 'warn' or 'refuse', got {value!r}", setting=setting)


def check_max_rows(value: Any, setting: str = "max_rows") -> int | None:
    """``value`` as a positive int (or ``None``), else :class:`ConfigError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{setting} must be a positive int or None, got {value!r}", setting=setting)
    return value


def scatter_mode(session: Any, options: Mapping[str, Any]) -> str:
    """The scatter mode of one statement: its ``shardkit_scatter`` execution option, else the
    session's ``scatter``, else the cluster's (default ``"allow"``)."""
    mode = options.get("shardkit_scatter")
    if mode is None:
        mode = getattr(session, "scatter", None)
    if mode is None:
        mode = getattr(session.cluster, "scatter", None)
    return check_scatter_mode(mode, "shardkit_scatter") or "allow"


def max_rows_of(session: Any, options: Mapping[str, Any]) -> int | None:
    """The ``max_rows`` of one fan-out: ``shardkit_max_rows``, else the session's, else the cluster's."""
    value = options.get("shardkit_max_rows")
    if value is None:
        value = getattr(session, "max_rows", None)
    if value is None:
        value = getattr(session.cluster, "max_rows", None)
    return check_max_rows(value, "shardkit_max_rows")


def is_scatter(targets: ShardTargets) -> bool:
    """Whether the routers sent a statement to every shard (it names no shard key).  Shards a
    caller named (``shardkit_using``) are not a scatter."""
    return bool(targets.all_shards) and targets.reason != "shardkit_using"


def check_scatter(session: Any, statement: Any, options: Mapping[str, Any], targets: ShardTargets) -> None:
    """Apply the scatter guard to a statement routed to ``targets``, before anything runs:
    ``"refuse"`` raises :class:`ScatterRefusedError`, ``"warn"`` logs at WARNING."""
    if not is_scatter(targets):
        return
    mode = scatter_mode(session, options)
    if mode == "allow":
        return
    keys = _missing_key(statement, targets)
    sql = _short(str(statement))
    table = table_name(statement)
    what = f"{table!r}" if table else "the statement"
    message = (
        f"this statement on {what} would run on every shard ({', '.join(targets.aliases)}): "
        f"it gives no value for the shard key {keys or '(unknown)'}: {sql}"
    )
    if mode == "warn":
        logger.warning("scatter: %s", message)
        return
    raise ScatterRefusedError(
        message + " (scatter='refuse'; nothing was run)",
        statement=sql,
        model=table,
        shard_key=keys,
        aliases=targets.aliases,
    )


def _missing_key(statement: Any, targets: ShardTargets) -> str:
    cols = [getattr(c, "name", None) or str(c) for c in targets.shard_key_columns]
    if not cols:
        entity = None
        descriptions = getattr(statement, "column_descriptions", None)
        if descriptions:
            entity = descriptions[0].get("entity")
        key = getattr(entity, "__shard_key__", None)
        if isinstance(key, str):
            cols = [key]
    return ", ".join(cols)


# -- fan-outs ---------------------------------------------------------------------------------------

_capture: contextvars.ContextVar[list[FanoutEvent] | None] = contextvars.ContextVar(
    "shardkit_observe_capture", default=None
)


class FanoutProbe:
    """Times one fan-out read: each shard's statement (in its worker), the merge (as the caller
    reads the rows); counts rows against ``max_rows``; tells the listeners once at the end."""

    def __init__(
        self,
        obs: Observer | None,
        capture: list[FanoutEvent] | None,
        aliases: tuple[str, ...],
        table: str | None,
        max_rows: int | None,
        scatter: bool,
    ) -> None:
        self.obs = obs
        self.capture = capture
        self.aliases = aliases
        self.table = table
        self.max_rows = max_rows
        self.scatter = scatter
        self.start = time.perf_counter()
        self.start_ns = time.time_ns()
        self.timings: dict[str, ShardTiming] = {}
        self.rows_seen = 0
        self._lock = threading.Lock()
        self.over: MaxRowsError | None = None
        self.done = False
        self._running: dict[str, tuple[Any, str]] = {}  # alias -> (connection, its cancel SQL)
        self._counted: dict[str, _Counted] = {}  # shards whose rows the merge counts

    def partial(self, partial: bool) -> bool:
        """A fan-out with ``max_rows`` is never partial: crossing it stops everything."""
        return partial and self.max_rows is None

    def shard(self, alias: str, body: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap one shard's task body ``body(connection, remaining_seconds)``: time it, count its
        rows, stop at ``max_rows`` (cancelling the other shards' statements on the server)."""

        def run(conn: Any, *args: Any) -> Any:
            start = time.perf_counter()
            start_ns = time.time_ns()
            if self.max_rows is not None:
                cancel_sql = _cancel_sql(conn)
                with self._lock:
                    if self.over is not None:  # another shard crossed max_rows already: do not start
                        raise self.over
                    if cancel_sql is not None:
                        self._running[alias] = (conn, cancel_sql)
            token = _fanout_shard.set(alias)
            try:
                result = body(conn, *args)
            except BaseException as exc:
                self.timings[alias] = ShardTiming(alias, time.perf_counter() - start, None, exc, start_ns)
                raise
            finally:
                _fanout_shard.reset(token)
                if self._running:
                    with self._lock:
                        self._running.pop(alias, None)
            seconds = time.perf_counter() - start
            rows = _rowcount(result)
            self.timings[alias] = ShardTiming(alias, seconds, rows, None, start_ns)
            if rows is not None and self.max_rows is not None:
                with self._lock:
                    self.rows_seen += rows
                    total = self.rows_seen
                    err = self._over(total, alias) if total > self.max_rows and self.over is None else None
                if err is not None:
                    result.close()
                    self._cancel_others()
                    raise err
                if total > self.max_rows:  # another shard stopped the fan-out first
                    result.close()
                    raise self.over or self._over(total, alias)
            return result

        return run

    def _cancel_others(self) -> None:
        """Ask each shard still running its statement to cancel it (PostgreSQL:
        ``pg_cancel_backend``, MySQL: ``KILL QUERY``), so its connection comes back usable and the
        server stops working for rows nobody will read."""
        with self._lock:
            running = list(self._running.items())
        for alias, (conn, sql) in running:
            try:
                with conn.engine.connect() as other:
                    other.exec_driver_sql(sql)
            except Exception as exc:  # the fan-out's own cancel (the socket) still stops it
                logger.debug("could not cancel shard %r's statement on the server: %s", alias, brief(exc))

    def _over(self, rows: int, alias: str | None) -> MaxRowsError:
        where = f" (shard {alias!r} crossed it)" if alias else ""
        err = MaxRowsError(
            f"fan-out over {len(self.aliases)} shards read {rows} rows, more than max_rows={self.max_rows}"
            f"{where}; the other shards were cancelled",
            max_rows=self.max_rows,
            rows=rows,
            alias=alias,
        )
        self.over = err
        return err

    def failed(self, exc: BaseException) -> None:
        """The fan-out raised ``exc``: tell the listeners; a ``max_rows`` stop is raised as
        :class:`MaxRowsError` itself (not as the shard failure that carried it)."""
        over = self.over
        if over is None and isinstance(exc, ShardQueryError):
            shard_errors: Mapping[str, BaseException] = getattr(exc, "errors", {})
            over = next((e for e in shard_errors.values() if isinstance(e, MaxRowsError)), None)
        errors = dict(getattr(exc, "errors", {}) or {})
        self._finish(0, 0.0, errors, over or exc)
        if over is not None and over is not exc:
            raise over from None

    def streams(self, aliases: Sequence[str], streams: list[Any]) -> list[Any]:
        """The shard streams the merge reads (in ``aliases`` order): those whose rows the driver
        did not count (SQLite) are counted as the merge reads them, against ``max_rows`` too."""
        out: list[Any] = []
        for alias, stream in zip(aliases, streams, strict=True):
            timing = self.timings.get(alias)
            if timing is not None and timing.rows is None:
                counted = self._counted[alias] = _Counted(self, alias, stream)
                out.append(counted)
            else:
                out.append(stream)
        return out

    def merged(self, rows: Iterator[Any], errors: Mapping[str, BaseException]) -> Iterator[Any]:
        """Pass the merged rows through: time the merge, count them, tell the listeners at the end."""
        limit = self.max_rows
        count_here = limit is not None and any(t.rows is None for t in self.timings.values())
        count = 0
        spent = 0.0
        perf = time.perf_counter
        error: BaseException | None = None
        try:
            while True:
                t0 = perf()
                try:
                    row = next(rows)
                except StopIteration:
                    spent += perf() - t0
                    break
                spent += perf() - t0
                count += 1
                if count_here and limit is not None and count > limit:
                    error = self._over(count, None)
                    raise error
                yield row
        except BaseException as exc:
            if error is None and not isinstance(exc, GeneratorExit):
                error = exc
            raise
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
            self._finish(count, spent, errors, error)

    def _finish(
        self, rows: int, merge_seconds: float, errors: Mapping[str, BaseException], error: BaseException | None
    ) -> None:
        if self.done:
            return
        self.done = True
        shards = {a: self.timings.get(a) or ShardTiming(a, None, None, errors.get(a)) for a in self.aliases}
        for alias, counted in self._counted.items():
            t = shards[alias]
            shards[alias] = ShardTiming(alias, t.seconds, counted.rows, t.error, t.start_ns)
        ev = FanoutEvent(
            shards=shards,
            table=self.table,
            seconds=time.perf_counter() - self.start,
            merge_seconds=merge_seconds,
            rows=rows,
            errors=dict(errors),
            error=error,
            scatter=self.scatter,
            start_ns=self.start_ns,
        )
        if self.capture is not None:
            self.capture.append(ev)
        if self.obs is not None:
            self.obs.fanout(ev)


class _Counted:
    """A shard's rows as the merge reads them, counted (and held to ``max_rows``)."""

    __slots__ = ("_it", "alias", "probe", "rows", "stream")

    def __init__(self, probe: FanoutProbe, alias: str, stream: Any) -> None:
        self.probe = probe
        self.alias = alias
        self.stream = stream
        self.rows = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        it = self._it
        if it is None:
            it = self._it = iter(self.stream)
        row = next(it)
        self.rows += 1
        probe = self.probe
        if probe.max_rows is not None:
            probe.rows_seen += 1  # the merge runs in the calling thread, after every worker
            if probe.rows_seen > probe.max_rows and probe.over is None:
                raise probe._over(probe.rows_seen, self.alias)
        return row

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


def _cancel_sql(conn: Any) -> str | None:
    """The SQL that cancels what ``conn`` runs, sent on another connection (``None``: unknown)."""
    try:
        dialect = conn.dialect.name
        dbapi = conn.connection.dbapi_connection
        if dialect == "postgresql":
            pid = dbapi.get_backend_pid() if hasattr(dbapi, "get_backend_pid") else dbapi.info.backend_pid
            return f"SELECT pg_cancel_backend({int(pid)})"
        if dialect in ("mysql", "mariadb"):
            return f"KILL QUERY {int(dbapi.thread_id())}"
    except Exception:  # a driver without these: the fan-out's own cancel only
        return None
    return None


def _rowcount(result: Any) -> int | None:
    """Rows of a shard's result as its driver reports them (``None``: not told)."""
    for r in (getattr(result, "raw", None), result):
        count = getattr(r, "rowcount", None) if r is not None and hasattr(r, "context") else None
        if isinstance(count, int) and count >= 0:
            return count
    return None


def fanout_probe(session: Any, statement: Any, options: Mapping[str, Any], targets: ShardTargets) -> FanoutProbe | None:
    """A probe for a fan-out read about to run, ``None`` when nothing watches it (no listener,
    no ``max_rows``, no ``explain(analyze=True)``): then it costs nothing."""
    cluster = session.cluster
    obs = observer_of(cluster)
    if obs is not None and not obs.fanout_fns and not obs.statement_fns:
        obs = None
    capture = _capture.get()
    max_rows = max_rows_of(session, options)
    if obs is None and capture is None and max_rows is None:
        return None
    return FanoutProbe(obs, capture, targets.aliases, table_name(statement), max_rows, is_scatter(targets))


# -- explain(analyze=True) -------------------------------------------------------------------------


def explain_analyze(session: Any, statement: Any, plan: str) -> str:
    """Run ``statement`` (every row read) and add to ``plan`` (what ``explain()`` says) each
    shard's rows and time, the merge time and the total."""
    captured: list[FanoutEvent] = []
    token = _capture.set(captured)
    start = time.perf_counter()
    try:
        result = session.execute(statement)
        rows = len(result.all())
    finally:
        _capture.reset(token)
    total = time.perf_counter() - start
    return format_analyze(plan, captured[-1] if captured else None, rows, total)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f} ms"


def format_analyze(plan: str, fanout: FanoutEvent | None, rows: int, total: float) -> str:
    """The report of :func:`explain_analyze`: the plan, then what running it measured::

    analyze: rows=12 time=3.104 ms
      s0: rows=3 time=1.020 ms
      s1: rows=9 time=2.411 ms (slowest)
      merge: 0.082 ms
    """
    lines = [plan.rstrip("\n")]
    if fanout is None:  # one shard
        lines.append(f"analyze: rows={rows} time={_ms(total)}")
        return "\n".join(lines)
    slowest = fanout.slowest
    lines.append(f"analyze: rows={rows} time={_ms(total)} shards={fanout.width}")
    for alias, t in fanout.shards.items():
        rows_text = "?" if t.rows is None else str(t.rows)
        note = " (slowest)" if slowest is not None and slowest.alias == alias and fanout.width > 1 else ""
        if t.error is not None:
            note += f" error: {brief(t.error)}"
        lines.append(f"  {alias}: rows={rows_text} time={_ms(t.seconds)}{note}")
    lines.append(f"  merge: {_ms(fanout.merge_seconds)}")
    if fanout.partial:
        lines.append(f"  partial: no rows from {', '.join(fanout.errors)}")
    return "\n".join(lines)
