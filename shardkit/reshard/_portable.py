"""The portable back end: any database SQLAlchemy speaks, through Core (:mod:`._rows`).

Which rows move is decided in Python: the shard key column is read in keyset batches and
hashed with the new ring's ``get_many`` (one C call per batch); a row moves when the new ring
names another shard than the one it is on.  The rows travel by batched INSERT with the
dialect's "ignore duplicates"; where every shard is PostgreSQL through psycopg2 and the primary
key is one column, by ``COPY`` of the moving primary keys (:func:`._pg.copy_ids`).  Digests
are the server's ``md5(ROW(...)::text)`` where every shard is PostgreSQL, else a BLAKE2b of
the row's Python values.  Table/source tasks run one after the other.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from . import _dbfence, _pg
from ._backend import Backend, Digests, Step
from ._rows import can_scan_raw, delete_keys, digests, insert_shadow, keyset, keyset_raw, pk_from_json, pk_to_json
from ._tables import SOURCE_COLUMN

if TYPE_CHECKING:
    from ..ring import HashRing
    from ._tables import MovingTable

__all__ = ["PortableBackend"]


class PortableBackend(Backend):
    """Copy, compare and delete through SQLAlchemy Core, one table and source at a time."""

    def _resume(self, mt: MovingTable, last: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return pk_from_json(mt, last) if last is not None else None

    def copy(self, mt: MovingTable, source: str, new: HashRing, last: Sequence[Any] | None) -> Iterator[Step]:
        engines = self.engines
        by_id = _pg.copy_ids_ok(engines, mt)  # whole rows go by COPY: read keys only here
        cols = list(mt.table.columns)
        key_at = mt.key_index if by_id else cols.index(mt.key)
        pk_at = list(range(len(mt.pk))) if by_id else [cols.index(c) for c in mt.pk]
        after = self._resume(mt, last)
        raw_scan = by_id and can_scan_raw(engines[source], mt)
        with engines[source].connect() as conn:
            total = int(conn.execute(select(func.count()).select_from(mt.table)).scalar() or 0)
            conn.commit()
            done = False
            while not done:
                if raw_scan:
                    rows = keyset_raw(engines[source], mt, after, self.batch_size)
                else:
                    rows = keyset(conn, mt, after, self.batch_size, full=not by_id)
                conn.commit()  # no snapshot held between batches
                done = len(rows) < self.batch_size
                moving: dict[str, list[Any]] = {}
                if rows:
                    owners = new.get_many([r[key_at] for r in rows])
                    for row, owner in zip(rows, owners, strict=True):
                        if owner != source:
                            moving.setdefault(owner, []).append(row[0] if by_id else row)
                    for target, items in moving.items():
                        if by_id:
                            _pg.copy_ids(engines[source], engines[target], mt, items, source)
                        else:
                            with engines[target].begin() as tconn:
                                insert_shadow(tconn, mt, items, source)
                    after = tuple(rows[-1][i] for i in pk_at)
                moved = sum(len(v) for v in moving.values())
                yield Step(len(rows), moved, None if after is None else pk_to_json(after), done, total)

    def delete(self, mt: MovingTable, source: str, new: HashRing, last: Sequence[Any] | None) -> Iterator[Step]:
        key_at, npk = mt.key_index, len(mt.pk)
        after = self._resume(mt, last)
        with self.engines[source].connect() as conn:
            done = False
            while not done:
                rows = keyset(conn, mt, after, self.batch_size)
                done = len(rows) < self.batch_size
                gone: list[tuple[Any, ...]] = []
                if rows:
                    owners = new.get_many([r[key_at] for r in rows])
                    gone = [tuple(r[:npk]) for r, o in zip(rows, owners, strict=True) if o != source]
                    if gone:
                        with _dbfence.bypass(conn):
                            delete_keys(conn, mt, mt.table, gone)
                    after = tuple(rows[-1][:npk])
                conn.commit()
                yield Step(len(rows), len(gone), None if after is None else pk_to_json(after), done)

    def read_digests(
        self, mt: MovingTable, source: str, new: HashRing, targets: Sequence[str], shadowed: Collection[str]
    ) -> tuple[Digests, Digests]:
        sql_md5 = all(e.dialect.name == "postgresql" for e in self.engines.values())
        src: Digests = {t: {} for t in targets}
        with self.engines[source].connect() as conn:
            for batch in digests(conn, mt, mt.table, sql_md5=sql_md5, batch=self.batch_size):
                owners = new.get_many([k for _, k, _ in batch])
                for (pk, _, digest), owner in zip(batch, owners, strict=True):
                    if owner != source and owner in src:
                        src[owner][pk] = digest
        tgt: Digests = {t: {} for t in targets}
        for target in targets:
            if target not in shadowed:
                continue
            with self.engines[target].connect() as conn:
                where = mt.shadow.c[SOURCE_COLUMN] == source
                for batch in digests(conn, mt, mt.shadow, sql_md5=sql_md5, batch=self.batch_size, where=where):
                    tgt[target].update((pk, d) for pk, _, d in batch)
        return src, tgt
