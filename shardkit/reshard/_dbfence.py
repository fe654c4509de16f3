"""The database side of the reshard's fence: triggers that refuse writes of keys a shard must not take.

The client-side :class:`~shardkit.reshard.FencingRouter` only fences the processes that run
it.  These triggers make every shard refuse, by itself, the writes that would break a
reshard, whoever sends them: a process with a stale ring, a process that never heard of the
reshard, a ``psql`` session.

What a shard refuses is a set of *arcs* of the 32-bit hash space (the ring hashes a key as
MurmurHash3 x86-32 of its canonical encoding, :mod:`shardkit.ring._keys`; the trigger
computes the very same hash in SQL), chosen per shard and per stage:

* stage ``"fence"`` (from the write fence until a grace period after the switch): shard ``X``
  accepts only keys that both rings give to ``X``.  Moving keys are refused on their old
  owner *and* on their new owner, so no copy can change under the catch-up, the verify and
  the merge, and nobody can write a moved key on its new owner while processes with the old
  ring still read it on the old one.
* stage ``"switched"`` (after that grace, until the old copies are deleted): shard ``X``
  accepts only keys the new ring gives to ``X``; a process still on the old ring is refused
  instead of writing a row that would be deleted, or that would break a foreign key.

Outside a reshard there is no trigger at all.  The triggers and their functions are
installed and removed by the reshard (:func:`install`, :func:`set_stage`, :func:`remove`);
a reshard killed while fenced leaves them in place, so the fence holds until it is resumed.

* **PostgreSQL**: a ``BEFORE INSERT OR UPDATE OR DELETE`` row trigger per table whose function
  encodes the shard key (``int8send``, ``convert_to(..., 'UTF8')``, ``uuid_send``), hashes it
  (``shardkit_murmur3``, plpgsql) and looks the hash up by binary search in the arcs, which
  are constants of the function ``shardkit_fenced`` (so a change of stage is one
  ``CREATE OR REPLACE FUNCTION`` that every transaction sees at its next row, whatever its
  isolation level).  A refusal is ``SQLSTATE 40SK1`` (class 40, "transaction rollback":
  retry), message ``shardkit: ... is moving``.  The reshard's own writes set
  ``SET LOCAL shardkit.fence_bypass = 'on'``.
* **SQLite**: three triggers per table that ``RAISE(ABORT, 'shardkit_moving: ...')`` when the
  key's hash is in table ``shardkit_fence_arcs``; the hash is the SQL function
  ``shardkit_hash(value, kind)`` that shardkit registers on every connection of its engines
  (a connection without it cannot write those tables while the fence is up: it fails closed).
  The reshard's own writes set ``shardkit_fence_state.bypass`` inside their transaction.
* Other databases: no database-side fence (the client-side fence only).

Engines made by a :class:`~shardkit.Cluster` turn a refusal into
:class:`~shardkit.reshard.ShardMovingError` (:func:`instrument`).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text

from ..errors import ReshardError, ShardMovingError
from ..ring import HashRing
from ..ring._keys import hash_key
from ..ring._layout import hash_ranges

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from ._tables import MovingTable

__all__ = [
    "REFUSED_SQLSTATE",
    "barrier",
    "barrier_tables",
    "bypass",
    "fenced_arcs",
    "install",
    "instrument",
    "locked",
    "remove",
    "set_stage",
    "supported",
]

logger = logging.getLogger(__name__)

REFUSED_SQLSTATE = "40SK1"
SQLITE_MARK = "shardkit_moving"
_TRIGGER = "shardkit_fence"
_PG_LOCK_ERRORS = ("55P03", "40P01")  # lock_not_available, deadlock_detected


def supported(engine: Engine) -> bool:
    """True when the database side of the fence exists for ``engine``'s dialect."""
    return engine.dialect.name in ("postgresql", "sqlite")


# ------------------------------------------------------------------------ the arcs
def fenced_arcs(old: HashRing, new: HashRing, alias: str, stage: str) -> list[tuple[int, int]]:
    """The closed hash ranges ``[lo, hi]`` whose keys ``alias`` refuses at ``stage``.

    ``"fence"``: every hash but those both rings give to ``alias``; ``"switched"``: every
    hash the new ring gives to another shard.
    """
    if stage == "fence":
        return hash_ranges(old, new, lambda o, n: not (o == alias and n == alias))
    if stage == "switched":
        return hash_ranges(old, new, lambda o, n: n != alias)
    raise ValueError(stage)


# ---------------------------------------------------------------- locks, with retry
def _lock_error(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    if getattr(orig, "pgcode", None) in _PG_LOCK_ERRORS:
        return True
    return "database is locked" in str(orig)


def locked(
    engine: Engine,
    tables: Sequence[Any],
    mode: str,
    body: Callable[[Connection], Any] | None = None,
    *,
    timeout: float = 120.0,
    alias: str = "",
) -> Any:
    """Run ``body`` in a transaction that holds ``tables`` (at most one) locked in ``mode``.

    Deadlock-free by construction: a transaction of the reshard holds at most one table lock,
    so it never holds one table while it waits for another (the fault this replaces: ``LOCK
    users; LOCK orders`` in one transaction deadlocked with a writer that held ``orders`` and
    wanted ``users``).  Taking several tables in one ``LOCK`` statement would not do: the
    server still takes them one after the other, and under writers that touch both, a short
    timeout and a retry then starve.  Callers lock table after table, each in its own
    transaction (:func:`barrier_tables`).

    PostgreSQL: ``LOCK TABLE t IN <mode> MODE`` under a ``lock_timeout`` that starts short
    (0.2 s, so the writers that queue behind the waiting lock are held up briefly when a long
    transaction holds the table) and doubles on each retry, up to 5 s; tried again after a
    jittered pause until ``timeout`` seconds have passed.  A deadlock reported anyway is
    retried the same way.  SQLite: ``BEGIN IMMEDIATE`` (waits for the one writer), retried
    while the database is locked.  Other databases: ``body`` in a plain transaction.

    :raises ReshardError: no lock within ``timeout`` (long transactions hold the table; retryable).
    """
    if len(tables) > 1:
        raise ValueError("lock one table per transaction")
    name = engine.dialect.name
    deadline = time.monotonic() + timeout
    wait, attempts = 0.2, 0
    while True:
        attempts += 1
        try:
            if name == "postgresql":
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(wait * 1000)}ms'")
                    if tables:
                        target = engine.dialect.identifier_preparer.format_table(tables[0])
                        conn.exec_driver_sql(f"LOCK TABLE {target} IN {mode} MODE")
                    conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
                    return body(conn) if body is not None else None
            if name == "sqlite":
                return _sqlite_immediate(engine, body, wait)
            with engine.begin() as conn:
                return body(conn) if body is not None else None
        except Exception as exc:
            if not _lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                what = ", ".join(getattr(t, "name", str(t)) for t in tables) or "the database"
                raise ReshardError(
                    f"could not lock {what}{' on ' + alias if alias else ''} within {timeout:.0f}s "
                    f"({attempts} attempts): long write transactions hold it; the reshard can be run again",
                    alias=alias,
                    retryable=True,
                ) from exc
            time.sleep(random.uniform(0.005, 0.05))
            wait = min(wait * 2, 5.0, max(0.05, deadline - time.monotonic()))


def barrier_tables(engine: Engine, tables: Sequence[Any], mode: str = "SHARE", *, timeout: float = 120.0,
                   alias: str = "") -> None:  # fmt: skip
    """Wait until no transaction that was writing to ``tables`` when this was called is still
    open: each table locked in ``mode`` in a transaction of its own (see :func:`locked`).

    A transaction that wrote a table holds its write lock until it ends, so the lock of that
    table waits for it; a writer that locks ``orders`` then ``users`` is waited for at both
    and never waits for this.
    """
    if engine.dialect.name == "sqlite":
        locked(engine, [], mode, timeout=timeout, alias=alias)  # one writer at a time: one wait
        return
    for table in tables:
        locked(engine, [table], mode, timeout=timeout, alias=alias)


def _sqlite_immediate(engine: Engine, body: Callable[[Connection], Any] | None, wait: float) -> Any:
    with engine.connect() as conn:
        driver: Any = conn.connection.driver_connection
        if driver.in_transaction:
            conn.rollback()
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {max(1, int(wait * 1000))}")
        try:
            driver.execute("BEGIN IMMEDIATE")
            try:
                out = body(conn) if body is not None else None
            except BaseException:
                driver.rollback()
                raise
            driver.commit()
            return out
        finally:
            conn.exec_driver_sql("PRAGMA busy_timeout = 5000")


# ---------------------------------------------------------------- PostgreSQL SQL
_M = "4294967295"


def _mul(x: str, c: int) -> str:
    """``(x * c) mod 2**32`` for 32-bit ``x`` without overflowing a bigint."""
    return f"((({x} & 65535) * {c} + (((({x} >> 16) * {c}) & 65535) << 16)) & {_M})"


def _rotl(x: str, r: int) -> str:
    return f"((({x} << {r}) | ({x} >> {32 - r})) & {_M})"


def _mix_k(k: str) -> str:
    return f"    {k} := {_mul(k, 0xCC9E2D51)};\n    {k} := {_rotl(k, 15)};\n    {k} := {_mul(k, 0x1B873593)};\n"


_PG_MURMUR = f"""
CREATE OR REPLACE FUNCTION shardkit_murmur3(data bytea) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
-- MurmurHash3 x86 32-bit, seed 0, unsigned: mmh3.hash(data, 0, signed=False)
DECLARE
    n int := length(data);
    nblocks int := length(data) / 4;
    h bigint := 0;
    k bigint;
    j int;
BEGIN
    FOR i IN 0 .. nblocks - 1 LOOP
        j := i * 4;
        k := get_byte(data, j)::bigint | (get_byte(data, j + 1)::bigint << 8)
             | (get_byte(data, j + 2)::bigint << 16) | (get_byte(data, j + 3)::bigint << 24);
{_mix_k("k")}
        h := h # k;
        h := {_rotl("h", 13)};
        h := ({_mul("h", 5)} + 3864292196) & {_M};
    END LOOP;
    j := nblocks * 4;
    k := 0;
    IF n - j >= 3 THEN k := k # (get_byte(data, j + 2)::bigint << 16); END IF;
    IF n - j >= 2 THEN k := k # (get_byte(data, j + 1)::bigint << 8); END IF;
    IF n - j >= 1 THEN
        k := k # get_byte(data, j)::bigint;
{_mix_k("k")}
        h := h # k;
    END IF;
    h := h # n;
    h := h # (h >> 16);
    h := {_mul("h", 0x85EBCA6B)};
    h := h # (h >> 13);
    h := {_mul("h", 0xC2B2AE35)};
    h := h # (h >> 16);
    RETURN h;
END
$fn$;
"""


def _pg_fenced(arcs: Sequence[tuple[int, int]]) -> str:
    los = "{" + ",".join(str(lo) for lo, _ in arcs) + "}"
    his = "{" + ",".join(str(hi) for _, hi in arcs) + "}"
    return f"""
CREATE OR REPLACE FUNCTION shardkit_fenced(data bytea) RETURNS boolean
LANGUAGE plpgsql STABLE STRICT AS $fn$
-- is the hash of this encoded shard key in one of the arcs this shard refuses right now?
DECLARE
    los bigint[] := '{los}'::bigint[];
    his bigint[] := '{his}'::bigint[];
    h bigint;
    a int := 1;
    b int := coalesce(array_length(los, 1), 0);
    m int;
BEGIN
    IF b = 0 THEN RETURN false; END IF;
    h := shardkit_murmur3(data);
    IF h < los[1] THEN RETURN false; END IF;
    WHILE a < b LOOP
        m := (a + b + 1) / 2;
        IF los[m] <= h THEN a := m; ELSE b := m - 1; END IF;
    END LOOP;
    RETURN h <= his[a];
END
$fn$;
"""


def _pg_encode(mt: MovingTable, ref: str) -> str | None:
    """SQL for the canonical encoding (:mod:`shardkit.ring._keys`) of the row's shard key."""
    col = f'{ref}."{mt.key.name}"' if '"' not in mt.key.name else None
    if col is None:
        return None
    try:
        py = mt.key.type.python_type
    except NotImplementedError:
        return None
    if py is int:
        return f"'\\x01'::bytea || int8send({col}::bigint)"
    if py is str:
        return f"'\\x02'::bytea || convert_to({col}::text, 'UTF8')"
    if py is bytes:
        return f"'\\x03'::bytea || {col}"
    if py is uuid.UUID:
        return f"'\\x04'::bytea || uuid_send({col}::uuid)"
    return None


def _pg_function_name(mt: MovingTable) -> str:
    return f'"shardkit_fence__{mt.table.name}"'


def _pg_trigger_function(mt: MovingTable, reshard_id: int) -> str:
    table = mt.name.replace("'", "''")
    new, old = _pg_encode(mt, "NEW"), _pg_encode(mt, "OLD")
    if new is None or old is None:  # a key type the ring does not hash: fence every row
        new = old = "NULL::bytea"
        check_new = check_old = "true"
    else:
        check_new, check_old = f"shardkit_fenced({new})", f"shardkit_fenced({old})"
    refuse = (
        "RAISE EXCEPTION USING ERRCODE = '{code}', "
        "MESSAGE = 'shardkit_moving: key ' || coalesce({key}::text, 'NULL') || ' of table {table} is moving "
        "to another shard (reshard #{rid}); retry shortly', "
        "HINT = 'a reshard is cutting over; this shard does not take this key now'"
    )
    return f"""
CREATE OR REPLACE FUNCTION {_pg_function_name(mt)}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('shardkit.fence_bypass', true) = 'on' THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    IF TG_OP <> 'INSERT' AND {check_old} THEN
        {refuse.format(code=REFUSED_SQLSTATE, table=table, rid=reshard_id, key=f'OLD."{mt.key.name}"')};
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    IF {check_new} THEN
        {refuse.format(code=REFUSED_SQLSTATE, table=table, rid=reshard_id, key=f'NEW."{mt.key.name}"')};
    END IF;
    RETURN NEW;
END
$fn$;
"""


# ---------------------------------------------------------------- SQLite SQL
def _sqlite_kind(mt: MovingTable) -> str:
    try:
        py = mt.key.type.python_type
    except NotImplementedError:
        return "any"
    return {int: "int", str: "str", bytes: "bytes", uuid.UUID: "uuid"}.get(py, "any")


def _sqlite_hash(value: Any, kind: str) -> int | None:
    """``shardkit_hash(value, kind)``: the ring hash of a shard key as SQLite stores it."""
    try:
        if value is None:
            return None
        if kind == "uuid":
            value = uuid.UUID(bytes=value) if isinstance(value, bytes) else uuid.UUID(str(value))
        elif kind == "int" and not isinstance(value, int):
            value = int(value)
        return hash_key(value)
    except Exception:  # a value the ring cannot hash cannot be routed: treat it as moving
        return -1


def _sqlite_triggers(mt: MovingTable) -> list[str]:
    prep_table = f'"{mt.table.name}"'
    key, kind = mt.key.name, _sqlite_kind(mt)

    def moving(ref: str) -> str:
        h = f"shardkit_hash({ref}.\"{key}\", '{kind}')"
        return f"coalesce((SELECT hi FROM shardkit_fence_arcs WHERE lo <= {h} ORDER BY lo DESC LIMIT 1) >= {h}, 0)"

    msg = f"{SQLITE_MARK}: a key of table {mt.table.name} is moving to another shard; retry shortly".replace("'", "''")
    bypassed = "coalesce((SELECT bypass FROM shardkit_fence_state WHERE id = 1), 0) = 0"
    out = []
    for op, cond in (
        ("INSERT", moving("NEW")),
        ("UPDATE", f"({moving('OLD')} OR {moving('NEW')})"),
        ("DELETE", moving("OLD")),
    ):
        name = f'"{_TRIGGER}__{mt.table.name}__{op.lower()}"'
        out.append(
            f"CREATE TRIGGER IF NOT EXISTS {name} BEFORE {op} ON {prep_table} "
            f"WHEN {bypassed} AND {cond} BEGIN SELECT RAISE(ABORT, '{msg}'); END"
        )
    return out


def _sqlite_set_arcs(conn: Connection, arcs: Sequence[tuple[int, int]], reshard_id: int) -> None:
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS shardkit_fence_arcs (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL)")
    conn.exec_driver_sql(
        "CREATE TABLE IF NOT EXISTS shardkit_fence_state "
        "(id INTEGER PRIMARY KEY, bypass INTEGER NOT NULL, reshard_id INTEGER)"
    )
    conn.exec_driver_sql("DELETE FROM shardkit_fence_arcs")
    if arcs:
        conn.exec_driver_sql("INSERT INTO shardkit_fence_arcs (lo, hi) VALUES (?, ?)", list(arcs))
    conn.exec_driver_sql("INSERT OR REPLACE INTO shardkit_fence_state (id, bypass, reshard_id) VALUES (1, 0, ?)",
                         (reshard_id,))  # fmt: skip


# ---------------------------------------------------------------- install / stage / remove
def _present(conn: Connection, tables: Sequence[MovingTable]) -> list[MovingTable]:
    from sqlalchemy import inspect

    insp = inspect(conn)
    return [mt for mt in tables if insp.has_table(mt.table.name, schema=mt.table.schema)]


def install(
    engine: Engine, tables: Sequence[MovingTable], arcs: Sequence[tuple[int, int]], reshard_id: int, *,
    alias: str = "", timeout: float = 120.0,
) -> None:  # fmt: skip
    """Raise the database fence on ``engine`` (idempotent): refuse writes of keys in ``arcs``.

    Each table's trigger is created under that table's ``SHARE ROW EXCLUSIVE`` lock (what
    creating a trigger takes anyway), one table per transaction (:func:`locked`): it waits
    for the write transactions under way on the table, and every write after it is checked.
    So it is also the in-flight barrier of those tables.
    """
    name = engine.dialect.name
    if not supported(engine):
        return
    with engine.connect() as conn:
        present = _present(conn, tables)
    if not present:
        return

    if name == "postgresql":
        with engine.begin() as conn:  # the functions first: no table lock needed
            conn.exec_driver_sql(_PG_MURMUR)
            conn.exec_driver_sql(_pg_fenced(arcs))
            for mt in present:
                conn.exec_driver_sql(_pg_trigger_function(mt, reshard_id))
        for mt in present:  # then each table's trigger, each in its own transaction (see locked())

            def create(conn: Connection, mt: MovingTable = mt) -> None:
                target = engine.dialect.identifier_preparer.format_table(mt.table)
                exists = conn.execute(
                    text("SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :n"),
                    {"t": target, "n": _TRIGGER},
                ).first()
                if exists is None:
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER {_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE ON {target} "
                        f"FOR EACH ROW EXECUTE PROCEDURE {_pg_function_name(mt)}()"
                    )

            locked(engine, [mt.table], "SHARE ROW EXCLUSIVE", create, timeout=timeout, alias=alias)
        return

    def body(conn: Connection) -> None:
        _sqlite_set_arcs(conn, arcs, reshard_id)
        for mt in present:
            for ddl in _sqlite_triggers(mt):
                conn.exec_driver_sql(ddl)

    locked(engine, [], "", body, timeout=timeout, alias=alias)


def set_stage(engine: Engine, arcs: Sequence[tuple[int, int]], reshard_id: int) -> None:
    """Change the arcs the installed fence refuses (no table lock; seen by the next row written)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(_pg_fenced(arcs))
    elif engine.dialect.name == "sqlite":
        locked(engine, [], "", lambda conn: _sqlite_set_arcs(conn, arcs, reshard_id))


def remove(engine: Engine, tables: Sequence[MovingTable], *, alias: str = "", timeout: float = 60.0) -> None:
    """Lift the database fence on ``engine``: the arcs at once, then the triggers and functions."""
    name = engine.dialect.name
    if not supported(engine):
        return
    with engine.connect() as conn:
        present = _present(conn, tables)
        if name == "postgresql":
            installed = conn.exec_driver_sql("SELECT 1 FROM pg_proc WHERE proname = 'shardkit_fenced'").first()
        else:
            installed = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE name IN ('shardkit_fence_arcs', 'shardkit_fence_state') "
                "OR name LIKE 'shardkit\\_fence\\_\\_%' ESCAPE '\\'"
            ).first()
    if installed is None:
        return
    set_stage(engine, [], 0)  # nothing refused from now on, even if dropping has to wait

    try:
        if name == "postgresql":
            for mt in present:  # DROP TRIGGER takes ACCESS EXCLUSIVE: one table per transaction

                def drop(conn: Connection, mt: MovingTable = mt) -> None:
                    target = engine.dialect.identifier_preparer.format_table(mt.table)
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_TRIGGER} ON {target}")
                    conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {_pg_function_name(mt)}()")

                locked(engine, [mt.table], "ACCESS EXCLUSIVE", drop, timeout=timeout, alias=alias)
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP FUNCTION IF EXISTS shardkit_fenced(bytea)")
                conn.exec_driver_sql("DROP FUNCTION IF EXISTS shardkit_murmur3(bytea)")
            return

        def drop_sqlite(conn: Connection) -> None:
            for mt in present:
                for op in ("insert", "update", "delete"):
                    conn.exec_driver_sql(f'DROP TRIGGER IF EXISTS "{_TRIGGER}__{mt.table.name}__{op}"')
            conn.exec_driver_sql("DROP TABLE IF EXISTS shardkit_fence_arcs")
            conn.exec_driver_sql("DROP TABLE IF EXISTS shardkit_fence_state")

        locked(engine, [], "", drop_sqlite, timeout=timeout, alias=alias)
    except ReshardError:  # the triggers refuse nothing now; they go with the next reshard
        logger.warning("could not drop the fence triggers on %s (busy tables); they refuse nothing", alias)


@contextmanager
def bypass(conn: Connection) -> Iterator[None]:
    """Inside the open transaction of ``conn``: the reshard's own writes pass the fence.

    PostgreSQL: ``SET LOCAL shardkit.fence_bypass = 'on'`` (this transaction only).  SQLite: the
    bypass flag is set in this transaction and cleared again before it commits, so no other
    connection ever sees it set (SQLite has one writer at a time).
    """
    name = conn.dialect.name
    if name == "postgresql":
        conn.exec_driver_sql("SET LOCAL shardkit.fence_bypass = 'on'")
        yield
        return
    if name != "sqlite" or not _sqlite_has_state(conn):
        yield
        return
    conn.exec_driver_sql("UPDATE shardkit_fence_state SET bypass = 1 WHERE id = 1")
    yield
    conn.exec_driver_sql("UPDATE shardkit_fence_state SET bypass = 0 WHERE id = 1")


def _sqlite_has_state(conn: Connection) -> bool:
    row = conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shardkit_fence_state'")
    return row.first() is not None


# ---------------------------------------------------------------- engines of a cluster
def _refusal(exc: BaseException) -> str | None:
    """The database's message when ``exc`` is the fence refusing a write, else None."""
    if getattr(exc, "pgcode", None) == REFUSED_SQLSTATE:
        return str(getattr(getattr(exc, "diag", None), "message_primary", None) or exc).strip()
    message = str(exc)
    if SQLITE_MARK in message and "moving" in message:
        return message.strip()
    return None


def _on_error(context: Any) -> None:
    message = _refusal(context.original_exception)
    if message is None:
        return
    table = None
    if " of table " in message:
        table = message.split(" of table ", 1)[1].split(" ", 1)[0]
    raise ShardMovingError(
        f"{message.removeprefix(SQLITE_MARK + ': ')} (refused by the database)", key=None, table=table
    ) from context.original_exception


def _on_sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    create = getattr(dbapi_connection, "create_function", None)
    if create is not None:
        try:
            create("shardkit_hash", 2, _sqlite_hash, deterministic=True)
        except (TypeError, NotImplementedError):  # pragma: no cover - old SQLite
            create("shardkit_hash", 2, _sqlite_hash)


def instrument(engine: Engine) -> None:
    """Make ``engine`` speak the fence: a refusal raises :class:`ShardMovingError`, and on SQLite
    the trigger's hash function exists on every connection.  Called by the cluster on each engine."""
    if getattr(engine, "_shardkit_fence", False):
        return
    engine._shardkit_fence = True  # type: ignore[attr-defined]
    event.listen(engine, "handle_error", _on_error)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _on_sqlite_connect)


def barrier(engine: Engine, tables: Sequence[Any], timeout: float = 120.0, *, alias: str = "") -> None:
    """Wait until every transaction that is writing to ``tables`` on ``engine`` has ended.

    PostgreSQL: ``LOCK TABLE t IN SHARE MODE`` (it waits for every holder of a write lock on
    ``t``), released at once, one table per transaction, under a short ``lock_timeout``,
    retried (see :func:`._dbfence.locked`): the barrier never holds one table while it waits
    for another, so it cannot deadlock with a writer that holds one and wants the other.
    SQLite: ``BEGIN IMMEDIATE`` (it waits for the one writer).  Other databases: nothing.

    :raises ReshardError: the tables stayed busy for ``timeout`` seconds (run again).
    """
    if not supported(engine):
        return  # no barrier on other backends (documented)
    barrier_tables(engine, tables, "SHARE", timeout=timeout, alias=alias)
