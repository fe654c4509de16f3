"""Rows of a moving table through SQLAlchemy Core: keyset batches, whole rows by primary key,
the shadow-table insert that skips rows already there, row digests and deletes by key.

Everything here works on one table and one source shard at a time, in primary-key order
(keyset batches: ``WHERE pk > :last ORDER BY pk LIMIT :n``), so a batch is a bounded amount
of work and "where was I" is one primary key (:func:`pk_to_json` / :func:`pk_from_json`).
Inserting into a shadow table ignores rows whose primary key is there already, so copying a
batch twice is harmless.  The portable back end (:mod:`._portable`) is built on these; the
repair and the merge of every back end too (:class:`._backend.Backend`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, literal, select, text, tuple_

from ._tables import SOURCE_COLUMN, MovingTable

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine, Table
    from sqlalchemy.sql.elements import ColumnElement

__all__ = [
    "can_scan_raw",
    "delete_keys",
    "digests",
    "fetch_rows",
    "insert_ignore",
    "insert_shadow",
    "keyset",
    "keyset_raw",
    "pk_from_json",
    "pk_to_json",
]


def pk_to_json(values: Sequence[Any]) -> list[Any]:
    return [v if isinstance(v, int | str | float) or v is None else str(v) for v in values]


def pk_from_json(mt: MovingTable, values: Sequence[Any]) -> tuple[Any, ...]:
    out = []
    for col, v in zip(mt.pk, values, strict=True):
        try:
            py = col.type.python_type
        except NotImplementedError:
            py = object
        out.append(uuid.UUID(v) if py is uuid.UUID and isinstance(v, str) else v)
    return tuple(out)


def _after(mt: MovingTable, table: Table, last: Sequence[Any] | None) -> list[ColumnElement[bool]]:
    if last is None:
        return []
    cols = [table.c[c.name] for c in mt.pk]
    if len(cols) == 1:
        return [cols[0] > last[0]]
    return [tuple_(*cols) > tuple_(*[literal(v) for v in last])]


def _pk_in(mt: MovingTable, table: Table, pks: Sequence[tuple[Any, ...]]) -> ColumnElement[bool]:
    cols = [table.c[c.name] for c in mt.pk]
    if len(cols) == 1:
        return cols[0].in_([p[0] for p in pks])
    return tuple_(*cols).in_([tuple(p) for p in pks])


def keyset(
    conn: Connection,
    mt: MovingTable,
    last: Sequence[Any] | None,
    limit: int,
    *,
    full: bool = False,
    table: Table | None = None,
    where: ColumnElement[bool] | None = None,
) -> list[Any]:
    """One batch in primary-key order after ``last``: (pk..., key) rows, or whole rows with ``full``."""
    table = mt.table if table is None else table
    cols = list(table.columns) if full else [table.c[c.name] for c in mt.scan_columns]
    stmt = select(*cols).where(*_after(mt, table, last)).order_by(*[table.c[c.name] for c in mt.pk]).limit(limit)
    if where is not None:
        stmt = stmt.where(where)
    return list(conn.execute(stmt).all())


def _plain(col: Any) -> bool:
    try:
        return col.type.python_type in (int, str)
    except NotImplementedError:
        return False


def keyset_raw(engine: Engine, mt: MovingTable, last: Sequence[Any] | None, limit: int) -> list[Any]:
    """:func:`keyset` (pk..., key) through the DBAPI cursor, for int/str columns (no type processing)."""
    prep = engine.dialect.identifier_preparer
    cols = ", ".join(prep.quote(c.name) for c in mt.scan_columns)
    pks = ", ".join(prep.quote(c.name) for c in mt.pk)
    where = ""
    params: list[Any] = []
    if last is not None:
        where = f"WHERE ({pks}) > ({', '.join(['%s'] * len(last))})"
        params = list(last)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(
            f"SELECT {cols} FROM {prep.format_table(mt.table)} {where} ORDER BY {pks} LIMIT {int(limit)}", params
        )
        rows = list(cur.fetchall())
        raw.commit()
    finally:
        raw.close()
    return rows


def can_scan_raw(engine: Engine, mt: MovingTable) -> bool:
    return engine.dialect.driver == "psycopg2" and all(_plain(c) for c in mt.scan_columns)


def insert_ignore(table: Table, dialect: str) -> Any:
    """An INSERT into ``table`` that skips rows whose primary key is already there."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table).prefix_with("IGNORE")


def fetch_rows(conn: Connection, mt: MovingTable, pks: Sequence[tuple[Any, ...]], chunk: int = 5000) -> list[Any]:
    """Whole rows of ``mt.table`` with these primary keys."""
    out: list[Any] = []
    for i in range(0, len(pks), chunk):
        part = pks[i : i + chunk]
        out.extend(conn.execute(select(*mt.table.columns).where(_pk_in(mt, mt.table, part))).all())
    return out


def insert_shadow(conn: Connection, mt: MovingTable, rows: Sequence[Any], source: str) -> None:
    if not rows:
        return
    names = [c.name for c in mt.table.columns]
    params = [{**dict(zip(names, row, strict=True)), SOURCE_COLUMN: source} for row in rows]
    conn.execute(insert_ignore(mt.shadow, conn.dialect.name), params)


def _py_digest(row: Sequence[Any]) -> str:
    return hashlib.blake2b(repr(tuple(row)).encode(), digest_size=16).hexdigest()


def digests(
    conn: Connection,
    mt: MovingTable,
    table: Table,
    *,
    sql_md5: bool,
    batch: int,
    where: ColumnElement[bool] | None = None,
) -> Iterator[list[tuple[tuple[Any, ...], Any, str]]]:
    """Batches of (pk, key, digest of the row's columns) in primary-key order.

    ``sql_md5``: the digest is PostgreSQL's ``md5(ROW(cols)::text)``, computed by the server
    (same on both sides when both are PostgreSQL); else a BLAKE2b of the row's Python values.
    """
    cols = [table.c[c.name] for c in mt.table.columns]
    pk_cols = [table.c[c.name] for c in mt.pk]
    key_col = table.c[mt.key.name]
    npk = len(pk_cols)
    if sql_md5:
        prep = conn.dialect.identifier_preparer
        row_sql = ", ".join(f"{prep.format_table(table)}.{prep.quote(c.name)}" for c in cols)
        digest: Any = text(f"md5(ROW({row_sql})::text)")
        select_cols: list[Any] = [*pk_cols, key_col, digest]
    else:
        select_cols = [*pk_cols, key_col, *cols]
    last: tuple[Any, ...] | None = None
    while True:
        stmt = select(*select_cols).where(*_after(mt, table, last)).order_by(*pk_cols).limit(batch)
        if where is not None:
            stmt = stmt.where(where)
        rows = conn.execute(stmt).all()
        if not rows:
            return
        if sql_md5:
            out = [(tuple(r[:npk]), r[npk], r[npk + 1]) for r in rows]
        else:
            out = [(tuple(r[:npk]), r[npk], _py_digest(r[npk + 1 :])) for r in rows]
        last = out[-1][0]
        yield out
        if len(rows) < batch:
            return


def delete_keys(
    conn: Connection, mt: MovingTable, table: Table, pks: Sequence[tuple[Any, ...]], chunk: int = 5000
) -> int:
    n = 0
    for i in range(0, len(pks), chunk):
        n += conn.execute(delete(table).where(_pk_in(mt, table, pks[i : i + chunk]))).rowcount
    return n
