"""The PostgreSQL back end: raw psycopg2 ``COPY`` in both directions, parsed without a row object.

Used when every shard is PostgreSQL through psycopg2 and every moving table's primary key is
one integer column and its shard key an integer column (:func:`fast_ok`); else the portable
back end (:mod:`._portable`) runs, and copies by ``COPY`` of primary keys when it can
(:func:`copy_ids`).

The unit of work is one table on one source shard, in primary-key batches (``WHERE pk >
:last ORDER BY pk LIMIT :n``), on connections held for the whole task, so several tasks
(source shards, tables) run at once in threads: psycopg2 releases the GIL while it waits.

Two ways to find the moving rows of a batch (:func:`scan_mode`):

* ``"rows"`` (narrow tables): ``COPY (SELECT <every column> ...) TO STDOUT`` once; the shard
  key is cut out of each text line and hashed (one ``get_many`` call per batch), and the
  lines of the moving rows go as they are into ``COPY shadow FROM STDIN``.  One read of the
  source per batch and no list of ids sent back.
* ``"keys"`` (wide tables, where reading every whole row would cost more than looking the
  moving ones up): ``COPY (SELECT pk, key ...)``, then ``COPY (SELECT ... WHERE pk =
  ANY(:ids))`` for the moving rows only.

Either way the rows are loaded into the shadow table by ``COPY ... FROM STDIN`` in a
savepoint; a batch copied again after a crash (its primary keys are there already) goes
through a temporary table and ``INSERT ... ON CONFLICT DO NOTHING``.

The compare (catch-up and verify) reads the moving rows on both sides the same way: as COPY
text lines (``"rows"``: equal lines, equal rows) or as the server's ``md5(ROW(...)::text)``
(``"keys"``).
"""

from __future__ import annotations

import io
from collections.abc import Collection, Iterator, Sequence
from itertools import compress
from typing import TYPE_CHECKING, Any, TypeVar

from ._backend import Backend, Digests, Step
from ._tables import SOURCE_COLUMN, MovingTable

if TYPE_CHECKING:
    from sqlalchemy import Engine, Table

    from ..ring import HashRing

__all__ = [
    "ROWS_MAX_WIDTH",
    "Batch",
    "PostgresBackend",
    "copy_ids",
    "copy_ids_ok",
    "copy_in_shadow",
    "copy_out_ids",
    "delete_ids",
    "fast_ok",
    "line_digest",
    "pick",
    "scan",
    "scan_mode",
    "shadow_lines",
    "shadow_rows",
]

ROWS_MAX_WIDTH = 256
"""Bytes per row (table size on disk / rows) up to which a batch reads whole rows ("rows" mode)."""

_NULL = b"\\N"
T = TypeVar("T")


def _is_int(col: Any) -> bool:
    try:
        return bool(col.type.python_type is int)
    except NotImplementedError:
        return False


def copy_ids_ok(engines: dict[str, Engine], mt: MovingTable) -> bool:
    """Every shard PostgreSQL through psycopg2 and a one-column primary key (:func:`copy_ids`)."""
    return len(mt.pk) == 1 and all(
        e.dialect.name == "postgresql" and e.dialect.driver == "psycopg2" for e in engines.values()
    )


def fast_ok(engines: dict[str, Engine], mt: MovingTable) -> bool:
    """:func:`copy_ids_ok`, with an integer primary key and an integer shard key."""
    return copy_ids_ok(engines, mt) and _is_int(mt.pk[0]) and _is_int(mt.key)


def _q(engine: Engine, name: str) -> str:
    return str(engine.dialect.identifier_preparer.quote(name))


def _t(engine: Engine, table: Table) -> str:
    return str(engine.dialect.identifier_preparer.format_table(table))


def _ints(fields: list[bytes]) -> list[Any]:
    try:
        return list(map(int, fields))
    except ValueError:  # a NULL key: let the ring say what it thinks of None
        return [None if f == _NULL else int(f) for f in fields]


def int_array(ids: Sequence[int]) -> str:
    """A PostgreSQL array literal of integers (much cheaper than binding a list)."""
    return "{" + ",".join(map(str, ids)) + "}"


def _copy_out(cur: Any, sql: str, params: Sequence[Any] = ()) -> bytes:
    buf = io.BytesIO()
    cur.copy_expert(cur.mogrify(sql, params) if params else sql, buf)
    return buf.getvalue()


def scan_mode(engine: Engine, raw: Any, mt: MovingTable, rows: int) -> str:
    """``"rows"`` if the table's rows are narrow (<= :data:`ROWS_MAX_WIDTH` bytes on disk), else ``"keys"``."""
    if rows <= 0:
        return "rows"
    cur = raw.cursor()
    cur.execute("SELECT pg_table_size(%s::regclass)", (_t(engine, mt.table),))
    size = int(cur.fetchone()[0] or 0)
    return "rows" if size / rows <= ROWS_MAX_WIDTH else "keys"


class Batch:
    """One batch of a source scan: the rows' primary keys and shard keys, and their lines
    (``"rows"`` mode) or their md5 digests (``"keys"`` mode with ``digests``)."""

    __slots__ = ("extra", "keys", "last", "pks", "size")

    def __init__(self, pks: list[Any], keys: list[Any], extra: list[bytes] | None) -> None:
        self.pks = pks
        self.keys = keys
        self.extra = extra  # whole lines, or digests; None: keys only
        self.size = len(pks)
        self.last: int | None = pks[-1] if pks else None

    def moving(self, new: HashRing, source: str) -> dict[str, list[bool]]:
        """target -> a mask over the batch of the rows the new ring gives to that (other) shard;
        use it with :func:`pick`.  (C loops only: ``get_many``, ``map``, ``compress``.)"""
        owners = new.get_many(self.keys)
        return {t: list(map(t.__eq__, owners)) for t in set(owners) if t != source}


def pick(items: Sequence[T], mask: Sequence[bool]) -> list[T]:
    """The items where ``mask`` is true."""
    return list(compress(items, mask))


def scan(
    engine: Engine,
    raw: Any,
    mt: MovingTable,
    last: int | None,
    limit: int,
    mode: str,
    *,
    table: Table | None = None,
    digests: bool = False,
) -> Batch:
    """One batch of ``table`` (default: ``mt.table``) after primary key ``last``, in primary-key order.

    ``mode="rows"``: whole rows as COPY text lines (``Batch.extra``); ``"keys"``: primary and
    shard keys only, plus with ``digests`` the server's ``md5(ROW(...)::text)`` of each row.
    """
    table = mt.table if table is None else table
    name = _t(engine, table)
    cols = [c.name for c in mt.table.columns]
    pk, key = mt.pk[0].name, mt.key.name
    where = "" if last is None else f"WHERE {_q(engine, pk)} > {int(last)} "
    order = f"ORDER BY {_q(engine, pk)} LIMIT {int(limit)}"
    cur = raw.cursor()
    if mode == "rows":
        every = ", ".join(_q(engine, c) for c in cols)
        data = _copy_out(cur, f"COPY (SELECT {every} FROM {name} {where}{order}) TO STDOUT")
        raw.commit()
        lines = _lines(data)
        # tabs and newlines inside values are escaped (\t, \n): raw ones only separate fields
        cells = data.replace(b"\n", b"\t").split(b"\t")
        cells.pop()  # after the last newline
        ncols, pk_at, key_at = len(cols), cols.index(pk), cols.index(key)
        pks = _ints(cells[pk_at::ncols])
        keys = pks if key_at == pk_at else _ints(cells[key_at::ncols])
        return Batch(pks, keys, lines)
    select = [_q(engine, pk)] + ([] if key == pk else [_q(engine, key)])
    if digests:
        row = ", ".join(f"{name}.{_q(engine, c)}" for c in cols)
        select.append(f"md5(ROW({row})::text)")
    data = _copy_out(cur, f"COPY (SELECT {', '.join(select)} FROM {name} {where}{order}) TO STDOUT")
    raw.commit()
    fields = data.split()
    width = len(select)
    pks = _ints(fields[0::width])
    keys = pks if key == pk else _ints(fields[1::width])
    return Batch(pks, keys, fields[width - 1 :: width] if digests else None)


def copy_out_ids(engine: Engine, raw: Any, mt: MovingTable, ids: Sequence[Any]) -> bytes:
    """COPY text lines of the rows of ``mt.table`` with these primary keys (in key order)."""
    cols = ", ".join(_q(engine, c.name) for c in mt.table.columns)
    pk = _q(engine, mt.pk[0].name)
    params: tuple[Any, ...] = ()
    if _is_int(mt.pk[0]):
        where = f"{pk} = ANY('{int_array(ids)}'::bigint[])"
    else:
        where = f"{pk} = ANY(%s::{mt.pk[0].type.compile(dialect=engine.dialect)}[])"
        params = ([p if isinstance(p, int) else str(p) for p in ids],)
    sql = f"COPY (SELECT {cols} FROM {_t(engine, mt.table)} WHERE {where} ORDER BY {pk}) TO STDOUT"
    data = _copy_out(raw.cursor(), sql, params)
    raw.commit()
    return data


def _lines(data: bytes) -> list[bytes]:
    """COPY text output as its lines (without the newlines)."""
    lines = data.split(b"\n")
    lines.pop()  # after the last newline
    return lines


def copy_ids(source_engine: Engine, target_engine: Engine, mt: MovingTable, ids: Sequence[Any], source: str) -> None:
    """Copy the rows of ``mt`` with these primary keys from ``source_engine`` into the shadow
    table on ``target_engine``: ``COPY ... TO STDOUT``, then :func:`copy_in_shadow`."""
    raw = source_engine.raw_connection()
    try:
        lines = _lines(copy_out_ids(source_engine, raw, mt, ids))
    finally:
        raw.close()
    raw = target_engine.raw_connection()
    try:
        copy_in_shadow(target_engine, raw, mt, shadow_lines(lines, source))
    finally:
        raw.close()


def shadow_lines(lines: Sequence[bytes], source: str) -> bytes:
    """COPY text lines of a table's columns -> lines of its shadow (the source alias appended)."""
    if not lines:
        return b""
    suffix = b"\t" + _escape(source) + b"\n"
    return suffix.join(lines) + suffix


def _escape(value: str) -> bytes:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r").encode("utf-8")


def copy_in_shadow(engine: Engine, raw: Any, mt: MovingTable, data: bytes) -> None:
    """``COPY shadow FROM STDIN`` (lines from :func:`shadow_lines`), committed; rows already
    there (a batch run again after a crash) are skipped, through a temporary table and
    ``INSERT ... ON CONFLICT DO NOTHING``."""
    import psycopg2.errors  # type: ignore[import-untyped]

    if not data:
        return
    cols = ", ".join(_q(engine, c.name) for c in mt.table.columns)
    all_cols = f"{cols}, {_q(engine, SOURCE_COLUMN)}"
    shadow = _t(engine, mt.shadow)
    cur = raw.cursor()
    try:
        cur.execute("SAVEPOINT shardkit_copy")
        try:
            cur.copy_expert(f"COPY {shadow} ({all_cols}) FROM STDIN", io.BytesIO(data))
        except psycopg2.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT shardkit_copy")
            stage = _q(engine, "shardkit_reshard_stage__" + mt.table.name)
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {shadow} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            cur.copy_expert(f"COPY {stage} ({all_cols}) FROM STDIN", io.BytesIO(data))
            cur.execute(f"INSERT INTO {shadow} ({all_cols}) SELECT {all_cols} FROM {stage} ON CONFLICT DO NOTHING")
        raw.commit()
    except BaseException:
        raw.rollback()
        raise


def shadow_rows(
    engine: Engine, raw: Any, mt: MovingTable, source: str, mode: str, batch: int
) -> Iterator[tuple[list[Any], list[bytes]]]:
    """Batches of (primary keys, lines or md5 digests) of the shadow rows copied from ``source``."""
    shadow = _t(engine, mt.shadow)
    cols = [c.name for c in mt.table.columns]
    pk = _q(engine, mt.pk[0].name)
    pk_at = cols.index(mt.pk[0].name)
    src = f"{_q(engine, SOURCE_COLUMN)} = %s"
    last: int | None = None
    cur = raw.cursor()
    while True:
        after = "" if last is None else f" AND {pk} > {int(last)}"
        if mode == "rows":
            select = ", ".join(_q(engine, c) for c in cols)
        else:
            row = ", ".join(f"{shadow}.{_q(engine, c)}" for c in cols)
            select = f"{pk}, md5(ROW({row})::text)"
        data = _copy_out(
            cur, f"COPY (SELECT {select} FROM {shadow} WHERE {src}{after} ORDER BY {pk} LIMIT {int(batch)}) TO STDOUT",
            (source,),
        )  # fmt: skip
        raw.commit()
        if mode == "rows":
            lines = _lines(data)
            pks = _ints([ln.split(b"\t", pk_at + 1)[pk_at] for ln in lines])
            extra = lines
        else:
            fields = data.split()
            pks, extra = _ints(fields[0::2]), fields[1::2]
        if pks:
            last = pks[-1]
            yield pks, extra
        if len(pks) < batch:
            return


def line_digest(value: bytes, mode: str) -> str | bytes:
    """What a row is compared by: ``"keys"`` mode, the server's md5 (hex); ``"rows"``, its COPY line."""
    return value.decode() if mode == "keys" else value


def delete_ids(engine: Engine, raw: Any, table: Table, pk: str, ids: Sequence[int]) -> int:
    """``DELETE FROM table WHERE pk = ANY(ids)``, committed (past the reshard's database fence)."""
    if not ids:
        return 0
    cur = raw.cursor()
    cur.execute("SET LOCAL shardkit.fence_bypass = 'on'")  # the reshard's own delete passes its fence
    cur.execute(f"DELETE FROM {_t(engine, table)} WHERE {_q(engine, pk)} = ANY(%s::bigint[])", (int_array(ids),))
    n = int(cur.rowcount)
    raw.commit()
    return n


def count_rows(engine: Engine, raw: Any, table: Table) -> int:
    """``SELECT count(*)`` of ``table``, committed."""
    cur = raw.cursor()
    cur.execute(f"SELECT count(*) FROM {_t(engine, table)}")
    n = int(cur.fetchone()[0])
    raw.commit()
    return n


class PostgresBackend(Backend):
    """Copy, compare and delete by raw ``COPY``, on connections held for a whole table/source
    task; the tasks run in parallel (psycopg2 releases the GIL while it waits)."""

    parallel = True

    def copy(self, mt: MovingTable, source: str, new: HashRing, last: Sequence[Any] | None) -> Iterator[Step]:
        after = int(last[0]) if last is not None else None
        engine = self.engines[source]
        src = engine.raw_connection()
        targets: dict[str, Any] = {}
        try:
            total = count_rows(engine, src, mt.table)
            mode = scan_mode(engine, src, mt, total)
            while True:
                batch = scan(engine, src, mt, after, self.batch_size, mode)
                n = 0
                for target, mask in batch.moving(new, source).items():
                    if batch.extra is not None:  # "rows": the lines are here
                        lines = pick(batch.extra, mask)
                    else:
                        lines = _lines(copy_out_ids(engine, src, mt, pick(batch.pks, mask)))
                    if target not in targets:
                        targets[target] = self.engines[target].raw_connection()
                    copy_in_shadow(self.engines[target], targets[target], mt, shadow_lines(lines, source))
                    n += len(lines)
                done = batch.size < self.batch_size
                after = batch.last if batch.last is not None else after
                yield Step(batch.size, n, None if after is None else [after], done, total)
                if done:
                    return
        finally:
            src.close()
            for raw in targets.values():
                raw.close()

    def delete(self, mt: MovingTable, source: str, new: HashRing, last: Sequence[Any] | None) -> Iterator[Step]:
        after = int(last[0]) if last is not None else None
        engine = self.engines[source]
        raw = engine.raw_connection()
        try:
            while True:
                batch = scan(engine, raw, mt, after, self.batch_size, "keys")
                gone = sorted(pk for mask in batch.moving(new, source).values() for pk in pick(batch.pks, mask))
                delete_ids(engine, raw, mt.table, mt.pk[0].name, gone)
                done = batch.size < self.batch_size
                after = batch.last if batch.last is not None else after
                yield Step(batch.size, len(gone), None if after is None else [after], done)
                if done:
                    return
        finally:
            raw.close()

    def read_digests(
        self, mt: MovingTable, source: str, new: HashRing, targets: Sequence[str], shadowed: Collection[str]
    ) -> tuple[Digests, Digests]:
        """Moving rows as COPY lines ("rows" mode) or the server's md5 of each ("keys"), on both sides."""
        engine = self.engines[source]
        src: dict[str, dict[Any, bytes]] = {t: {} for t in targets}
        raw = engine.raw_connection()
        try:
            mode = scan_mode(engine, raw, mt, count_rows(engine, raw, mt.table))
            after: int | None = None
            while True:
                batch = scan(engine, raw, mt, after, self.batch_size, mode, digests=True)
                assert batch.extra is not None
                for target, mask in batch.moving(new, source).items():
                    if target in src:
                        src[target].update(zip(pick(batch.pks, mask), pick(batch.extra, mask), strict=True))
                after = batch.last if batch.last is not None else after
                if batch.size < self.batch_size:
                    break
        finally:
            raw.close()
        tgt: dict[str, dict[Any, bytes]] = {t: {} for t in targets}
        for target in targets:
            if target not in shadowed:
                continue
            raw = self.engines[target].raw_connection()
            try:
                for pks, values in shadow_rows(self.engines[target], raw, mt, source, mode, self.batch_size):
                    tgt[target].update(zip(pks, values, strict=True))
            finally:
                raw.close()

        def by_key(rows: dict[Any, bytes]) -> dict[tuple[Any, ...], str | bytes]:
            return {(pk,): line_digest(v, mode) for pk, v in rows.items()}

        return {t: by_key(d) for t, d in src.items()}, {t: by_key(d) for t, d in tgt.items()}
