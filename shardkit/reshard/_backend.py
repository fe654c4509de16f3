"""The one interface the reshard's phases run over: how rows are copied, compared and deleted.

A back end works on one moving table and one source shard at a time, in primary-key batches:

* :meth:`Backend.copy` copies the rows the new ring gives to other shards into their shadow
  tables, a batch per :class:`Step` (resumable from the step's ``last`` primary key);
* :meth:`Backend.read_digests` reads a digest of every moving row on the source and of every
  copy on the targets; :meth:`Backend.compare` turns them into a verify report, or repairs
  the copies (the catch-up);
* :meth:`Backend.delete` deletes the moved rows from their old shard, a batch per step.

Preparing the shadow tables, merging them into the real tables and repairing single rows are
the same everywhere (SQLAlchemy Core, here).  Two implementations: :class:`._portable.PortableBackend`
(any database) and :class:`._pg.PostgresBackend` (every shard PostgreSQL through psycopg2:
raw ``COPY`` both ways, and table/source tasks run in parallel).  The phase machine
(:mod:`._resharder`) keeps the progress, the events and the fences; it never asks which
database it talks to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from sqlalchemy import inspect, select

from . import _dbfence
from ._report import RowDigests, VerifyReport, differences
from ._rows import delete_keys, fetch_rows, insert_shadow

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..ring import HashRing
    from ._tables import MovingTable

__all__ = ["Backend", "Digests", "Step"]

Digests = dict[str, RowDigests]
"""target alias -> primary key -> digest of the row (:data:`._report.Digest`)."""


class Step(NamedTuple):
    """One batch of a copy or a delete on one table and source shard."""

    scanned: int  # rows read
    moved: int  # rows copied or deleted
    last: list[Any] | None  # the last primary key read (JSON), where a resumed run goes on
    done: bool  # the last batch
    total: int = 0  # rows on the source when the step began (copy)


class Backend(ABC):
    """Copy, compare and delete the moving rows of a cluster's shards (see the module docstring).

    :param engines: alias -> engine of every shard of the old and the new ring.
    :param batch_size: rows per primary-key batch.
    """

    parallel: ClassVar[bool] = False
    """True when table/source tasks may run at once in threads."""

    def __init__(self, engines: dict[str, Engine], batch_size: int) -> None:
        self.engines = engines
        self.batch_size = batch_size

    # -- what differs between back ends ---------------------------------------------------
    @abstractmethod
    def copy(self, mt: MovingTable, source: str, new: HashRing, last: Sequence[Any] | None) -> Iterator[Step]:
        """Copy the rows of ``mt`` on ``source`` that ``new`` gives elsewhere into the targets'
        shadow tables, after primary key ``last`` (JSON, from a previous :class:`Step`)."""

    @abstractmethod
    def delete(self, mt: MovingTable, source: str, new: HashRing, last: Sequence[Any] | None) -> Iterator[Step]:
        """Delete from ``source`` the rows of ``mt`` that ``new`` gives elsewhere (past the fence)."""

    @abstractmethod
    def read_digests(
        self, mt: MovingTable, source: str, new: HashRing, targets: Sequence[str], shadowed: Collection[str]
    ) -> tuple[Digests, Digests]:
        """(the moving rows of ``mt`` on ``source``, their copies on each target): digests by
        target.  ``shadowed``: the targets that have ``mt``'s shadow table."""

    # -- the same everywhere ---------------------------------------------------------------
    def has_table(self, alias: str, name: str) -> bool:
        with self.engines[alias].connect() as conn:
            return bool(inspect(conn).has_table(name))

    def prepare(self, target: str, tables: Sequence[MovingTable]) -> None:
        """Create the tables and their shadow tables on ``target`` where missing."""
        engine = self.engines[target]
        for mt in tables:
            mt.table.create(engine, checkfirst=True)
            mt.shadow.create(engine, checkfirst=True)

    def merge(self, target: str, tables: Sequence[MovingTable]) -> None:
        """Move every shadow table's rows into its real table and drop it: one transaction."""
        present = [mt for mt in tables if self.has_table(target, mt.shadow.name)]
        if not present:
            return
        with self.engines[target].begin() as conn, _dbfence.bypass(conn):
            for mt in present:  # parents first
                cols = [c.name for c in mt.table.columns]
                src = select(*[mt.shadow.c[c] for c in cols])
                conn.execute(mt.table.insert().from_select(cols, src))
            for mt in present:
                mt.shadow.drop(conn)

    def compare(
        self, mt: MovingTable, source: str, new: HashRing, targets: Sequence[str], shadowed: Collection[str], *,
        repair: bool,
    ) -> tuple[VerifyReport, int]:  # fmt: skip
        """Compare the moving rows of ``mt`` on ``source`` with their copies on ``targets``:
        repair the copies (catch-up; the number of rows repaired) or report (verify)."""
        report = VerifyReport()
        repaired = 0
        src, tgt = self.read_digests(mt, source, new, targets, shadowed)
        for target in targets:
            if repair:
                repaired += self.repair(mt, source, target, src[target], tgt[target])
            else:
                report.add(mt.name, source, target, src[target], tgt[target], self.batch_size)
        return report, repaired

    def repair(
        self, mt: MovingTable, source: str, target: str, src: RowDigests,
        tgt: RowDigests,
    ) -> int:  # fmt: skip
        """Make the copies on ``target`` equal the moving rows of ``source`` (digests ``src``
        against ``tgt``); the number of rows repaired."""
        missing, extra, different = differences(src, tgt)
        if not (missing or extra or different):
            return 0
        with self.engines[source].connect() as sconn:
            rows = fetch_rows(sconn, mt, missing + different)
        with self.engines[target].begin() as tconn:
            delete_keys(tconn, mt, mt.shadow, extra + different)
            insert_shadow(tconn, mt, rows, source)
        return len(missing) + len(extra) + len(different)
