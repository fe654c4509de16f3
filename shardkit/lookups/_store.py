"""Reading and writing lookup rows: where they live, claims, takeovers, the in-flight probe.

A lookup row ``(value, shard_key, created_ms)`` lives on ``ring.get(value)`` (the lookup
table is sharded by the value on the same ring as the rows).  Nothing here knows a session:
the write order is decided in :mod:`shardkit.lookups._write`.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, delete, exists, insert, select, text, update
from sqlalchemy.engine import Connection

from .._find import ring_router_of
from ..errors import ConfigError, InvalidKeyError, UniqueLookupError

if TYPE_CHECKING:
    from ..ring import HashRingRouter
    from ._declare import Lookup

__all__ = [
    "BUCKETS",
    "alias_of",
    "bucket_of",
    "insert_claims",
    "now_ms",
    "probe_free",
    "read_keys",
    "refused",
    "ring_router",
    "row_exists",
]

BUCKETS = 256
"""In-flight locks are taken per (lookup, bucket of the value): at most this many per transaction."""

IN_CHUNK = 500  # values per IN list (SQLite's old limit is 999 parameters)

_routers: weakref.WeakKeyDictionary[Any, HashRingRouter] = weakref.WeakKeyDictionary()


def now_ms() -> int:
    return int(time.time() * 1000)


def ring_router(cluster: Any) -> HashRingRouter:
    """The cluster's :class:`~shardkit.HashRingRouter` (lookups live on its ring).

    :raises ConfigError: the cluster has none.
    """
    chain = cluster.router
    try:
        return _routers[chain]
    except (KeyError, TypeError):
        pass
    found = ring_router_of(cluster)
    if found is None:
        raise ConfigError("lookups need a HashRingRouter in the cluster's routers (lookup rows live on its ring)")
    _agree(found)
    with contextlib.suppress(TypeError):  # a chain that cannot be weakly referenced: not kept
        _routers[chain] = found
    return found


def raw_ok(engine: Any) -> bool:
    """Whether the one-round-trip paths (a pooled psycopg2 connection in autocommit) apply."""
    dialect = engine.dialect
    return dialect.name == "postgresql" and dialect.driver == "psycopg2" and not dialect.is_async


_AUTOCOMMIT: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def reader(engine: Any) -> Any:
    """``engine`` reading in autocommit: a lookup read is one statement, with no BEGIN and no ROLLBACK."""
    found = _AUTOCOMMIT.get(engine)
    if found is None:
        found = _AUTOCOMMIT[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
    return found


def _agree(router: HashRingRouter) -> None:
    """A lookup declared on a model that names no ``__shard_key__`` took its primary key; the
    router may shard the model by another attribute (``shard_keys={User: "tenant_id"}``): the
    router's wins."""
    from ._declare import registered

    for lookup in registered():
        named = router.shard_key_column(lookup.model)
        if named is not None and named[0] != lookup.key_attr:
            lookup.key_attr, lookup.key_column = named[0], named[1]


def alias_of(router: HashRingRouter, lookup: Lookup, value: Any) -> str:
    """Where the lookup row of ``value`` lives."""
    return router.shard_for(lookup.cls, value)


def key_alias(router: HashRingRouter, lookup: Lookup, key: Any) -> str:
    """Where the row whose shard key is ``key`` lives."""
    return router.shard_for(lookup.model, key)


def bucket_of(value: Any) -> int:
    from ..ring import hash_key

    try:
        return int(hash_key(value)) % BUCKETS
    except (InvalidKeyError, TypeError):
        return int(hash_key(repr(value))) % BUCKETS


def chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_INSERTS: dict[tuple[Any, str], Any] = {}


def _insert_statement(lookup: Lookup, dialect: str) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING value, shard_key`` where the dialect has it."""
    cache_key = (lookup.table, dialect)
    stmt = _INSERTS.get(cache_key)
    if stmt is None:
        table = lookup.table
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(table).on_conflict_do_nothing().returning(table.c.value, table.c.shard_key)
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).on_conflict_do_nothing().returning(table.c.value, table.c.shard_key)
        else:
            stmt = insert(table)
        _INSERTS[cache_key] = stmt
    return stmt


_CLAIM_SQL: dict[tuple[Any, Any], str] = {}


def claim_one(engine: Any, lookup: Lookup, row: dict[str, Any]) -> bool:
    """Insert one lookup row on a pooled DBAPI connection in autocommit (one round trip, durable
    when it returns); ``False`` when the value (the pair, for a non-unique lookup) was there."""
    dialect = engine.dialect
    key = (lookup.table, dialect)
    sql = _CLAIM_SQL.get(key)
    if sql is None:
        sql = _CLAIM_SQL[key] = str(_insert_statement(lookup, dialect.name).compile(dialect=dialect))
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        was = dbapi.autocommit
        dbapi.autocommit = True
        try:
            cursor = dbapi.cursor()
            try:
                cursor.execute(sql, row)
                return bool(cursor.fetchall())
            finally:
                cursor.close()
        finally:
            dbapi.autocommit = was
    finally:
        raw.close()


UNNEST_CHUNK = 10_000  # lookup rows per statement when many are claimed at once (PostgreSQL)
_UNNEST_SQL: dict[tuple[Any, Any], str] = {}


def _unnest_sql(lookup: Lookup, dialect: Any) -> str:
    """Many lookup rows in one statement: three arrays unnested on the server (psycopg2 sends a
    list as an array), ``ON CONFLICT DO NOTHING RETURNING value, shard_key``."""
    key = (lookup.table, dialect)
    sql = _UNNEST_SQL.get(key)
    if sql is None:
        table = lookup.table
        name = dialect.identifier_preparer.format_table(table)
        value_type = table.c.value.type.compile(dialect=dialect)
        key_type = table.c.shard_key.type.compile(dialect=dialect)
        sql = _UNNEST_SQL[key] = (
            f"INSERT INTO {name} (value, shard_key, created_ms) "
            f"SELECT * FROM unnest(%s::{value_type}[], %s::{key_type}[], %s::BIGINT[]) "
            "ON CONFLICT DO NOTHING RETURNING value, shard_key"
        )
    return sql


def insert_claims(conn: Connection, lookup: Lookup, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert lookup rows; returns those that were not inserted (the value, or for a non-unique
    lookup the pair, was already there)."""
    if not rows:
        return []
    dialect = conn.dialect.name
    stmt = _insert_statement(lookup, dialect)
    if dialect not in ("postgresql", "sqlite"):
        left: list[dict[str, Any]] = []
        for row in rows:  # portable and slow: ask first
            if read_keys(conn, lookup, [row["value"]]).get(row["value"]):
                left.append(row)
            else:
                conn.execute(stmt, [row])
        return left
    if len(rows) == 1:
        got = {tuple(r) for r in conn.execute(stmt, rows[0])}
    elif lookup.plain_types and raw_ok(conn.engine):
        got = set()
        sql = _unnest_sql(lookup, conn.dialect)
        for part in chunks(rows, UNNEST_CHUNK):
            arrays = ([r["value"] for r in part], [r["shard_key"] for r in part], [r["created_ms"] for r in part])
            got.update(tuple(r) for r in conn.exec_driver_sql(sql, arrays))
    else:
        got = {tuple(r) for r in conn.execute(stmt, rows)}
    if len(got) == len(rows):
        return []
    if lookup.unique:
        values = {v for v, _k in got}
        return [r for r in rows if r["value"] not in values]
    return [r for r in rows if (r["value"], r["shard_key"]) not in got]


_READS: dict[Any, tuple[Any, Any]] = {}


def _read_statements(lookup: Lookup) -> tuple[Any, Any]:
    """(one value, an IN list) reads of the lookup table, built once (SQLAlchemy caches them compiled)."""
    found = _READS.get(lookup.table)
    if found is None:
        table = lookup.table
        cols = select(table.c.value, table.c.shard_key, table.c.created_ms)
        found = (
            cols.where(table.c.value == bindparam("value")),
            cols.where(table.c.value.in_(bindparam("values", expanding=True))),
        )
        _READS[lookup.table] = found
    return found


_ONE_SQL: dict[tuple[Any, Any], str] = {}


def read_one(engine: Any, lookup: Lookup, value: Any) -> list[tuple[Any, int]]:
    """[(shard_key, created_ms)] of one value: the statement compiled once per dialect, sent on a
    pooled DBAPI connection in autocommit (one round trip; no BEGIN, no ROLLBACK)."""
    dialect = engine.dialect
    key = (lookup.table, dialect)
    sql = _ONE_SQL.get(key)
    if sql is None:
        one, _many = _read_statements(lookup)
        compiled = one.compile(dialect=dialect)
        if dialect.paramstyle == "pyformat":
            sql = str(compiled).replace("%(value)s", "%s")
        elif dialect.paramstyle == "qmark":
            sql = str(compiled)
        else:  # another paramstyle: the SQLAlchemy path
            with reader(engine).connect() as conn:
                return read_keys(conn, lookup, [value]).get(value, [])
        _ONE_SQL[key] = sql
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        was = getattr(dbapi, "autocommit", None)
        if was is False:
            dbapi.autocommit = True
        try:
            cursor = dbapi.cursor()
            try:
                cursor.execute(sql, (value,))
                return [(k, ms) for _v, k, ms in cursor.fetchall()]
            finally:
                cursor.close()
        finally:
            if was is False:
                dbapi.autocommit = False
    finally:
        raw.close()


def read_keys(conn: Connection, lookup: Lookup, values: Sequence[Any]) -> dict[Any, list[tuple[Any, int]]]:
    """value -> [(shard_key, created_ms)] of the lookup rows of ``values`` on ``conn``'s database."""
    one, stmt = _read_statements(lookup)
    out: dict[Any, list[tuple[Any, int]]] = {}
    if len(values) == 1:
        for value, key, created in conn.execute(one, {"value": values[0]}):
            out.setdefault(value, []).append((key, created))
        return out
    for part in chunks(list(values)):
        for value, key, created in conn.execute(stmt, {"values": list(part)}):
            out.setdefault(value, []).append((key, created))
    return out


def row_exists(conn: Connection, lookup: Lookup, key: Any, value: Any) -> bool:
    """Whether the row with shard key ``key`` holding ``value`` is on ``conn``'s database."""
    table = lookup.model.__table__
    key_col = table.c[lookup.key_column.name]
    col = table.c[lookup.column.name]
    return bool(conn.execute(select(exists().where(and_(key_col == key, col == value)))).scalar())


_LOCK_SHARED = text("SELECT count(pg_advisory_xact_lock_shared(:ns, b)) FROM unnest(CAST(:bs AS integer[])) AS b")
_LOCK_TRY = text("SELECT pg_try_advisory_xact_lock(:ns, :b)")


def hold_in_flight(conn: Connection, lookup: Lookup, values: Iterable[Any]) -> None:
    """Mark, in the transaction that writes the rows (``conn``), that these values' rows are
    being written: a writer that finds their lookup without a row must not take it over until
    this transaction ends.  PostgreSQL: shared transaction-level advisory locks per bucket.
    SQLite needs nothing: the writing transaction holds the file's write lock (see :func:`probe_free`)."""
    if conn.dialect.name != "postgresql":
        return
    buckets = sorted({bucket_of(v) for v in values})
    if buckets:
        conn.execute(_LOCK_SHARED, {"ns": lookup.lock_ns, "bs": buckets})


_PENDING: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def defer_in_flight(conn: Connection, lookup: Lookup, values: Iterable[Any]) -> None:
    """:func:`hold_in_flight`, sent with the next statement of ``conn`` (the row's own INSERT,
    usually) instead of a round trip of its own.  Until that statement, the lookup's grace
    period covers the row (it is sent in the same flush)."""
    if conn.dialect.name != "postgresql":
        return
    if conn.dialect.driver != "psycopg2" or conn.dialect.is_async:  # one statement per execute there
        hold_in_flight(conn, lookup, values)
        return
    buckets = ",".join(str(b) for b in sorted({bucket_of(v) for v in values}))
    if not buckets:
        return
    sql = (
        f"SELECT count(pg_advisory_xact_lock_shared({int(lookup.lock_ns)}, b)) "
        f"FROM unnest(ARRAY[{buckets}]::integer[]) AS b"
    )
    pending = _PENDING.get(conn)
    if pending is None:
        from .. import _sqla

        pending = _PENDING[conn] = []
        _sqla.listen_on_connection(conn, "before_cursor_execute", _carry, retval=True)
    pending.append(sql)


def _carry(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> tuple[str, Any]:
    pending = _PENDING.get(conn)
    if not pending:
        return statement, parameters
    locks = "; ".join(pending)
    pending.clear()
    if executemany:
        cursor.execute(locks)
        return statement, parameters
    return f"{locks}; {statement}", parameters


def probe_free(conn: Connection, lookup: Lookup, value: Any) -> bool:
    """Whether no transaction that may be writing the row of ``value`` is in flight on ``conn``'s
    database.  ``conn`` must be in a fresh transaction, ended by the caller (the lock is kept
    until then, so the row check that follows sees every writer that had it)."""
    name = conn.dialect.name
    if name == "postgresql":
        return bool(conn.execute(_LOCK_TRY, {"ns": lookup.lock_ns, "b": bucket_of(value)}).scalar())
    if name == "sqlite":
        from sqlalchemy.exc import OperationalError

        # a writer's open transaction holds the file's RESERVED lock: taking it ourselves (a write
        # that changes nothing) fails at once while one is in flight
        try:
            conn.exec_driver_sql("PRAGMA busy_timeout = 50")
            conn.execute(delete(lookup.table).where(lookup.table.c.created_ms < -1))
            return True
        except OperationalError:
            return False
        finally:
            with contextlib.suppress(Exception):  # the connection broke: nothing to restore
                conn.exec_driver_sql("PRAGMA busy_timeout = 5000")
    return True


def take_over(conn: Connection, lookup: Lookup, value: Any, old_key: Any, old_ms: int, key: Any, ms: int) -> bool:
    """Point a stale unique lookup at ``key`` (compare-and-set: only if nobody changed it meanwhile)."""
    table = lookup.table
    result = conn.execute(
        update(table)
        .where(table.c.value == value, table.c.shard_key == old_key, table.c.created_ms == old_ms)
        .values(shard_key=key, created_ms=ms)
    )
    return bool(result.rowcount == 1)


def remove(conn: Connection, lookup: Lookup, pairs: Sequence[tuple[Any, Any]], created_ms: int | None = None) -> int:
    """Delete the lookup rows ``(value, shard_key)`` (and, if given, only those made at ``created_ms``)."""
    table = lookup.table
    crit = [table.c.value == bindparam("v"), table.c.shard_key == bindparam("k")]
    if created_ms is not None:
        crit.append(table.c.created_ms == created_ms)
    stmt = delete(table).where(*crit)
    rows = [{"v": v, "k": k} for v, k in pairs]
    if not rows:
        return 0
    result = conn.execute(stmt, rows)
    return int(result.rowcount or 0)


def refused(lookup: Lookup, value: Any, *, holder: Any = None, pending: bool = False) -> UniqueLookupError:
    """The error for a unique value another row holds (or a write in flight is registering)."""
    model = lookup.model.__name__
    if pending:
        why = (
            f"is being registered by another write in progress (or by one that failed less than "
            f"{lookup.grace:g} s ago); retry later"
        )
    else:
        why = f"is already used by the {model} with {lookup.key_attr}={holder!r}"
    return UniqueLookupError(
        f"unique lookup {model}.{lookup.attr}: {lookup.attr}={value!r} {why}; nothing of this write was kept",
        model=lookup.model,
        column=lookup.attr,
        value=value,
        holder=holder,
        pending=pending,
    )
