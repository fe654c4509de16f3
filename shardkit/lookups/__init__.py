"""Lookup indexes: find a row by a column that is not its shard key, and unique columns across the cluster.

::

    class User(Base):
        __tablename__ = "users"
        __shard_key__ = "id"
        __lookups__ = {"email": {"unique": True}, "external_id": {}}

    session.scalars(select(User).where(User.email == "ada@example.com"))  # one lookup read, one shard

A lookup maps each value of the column to the row's shard key, in a lookup table sharded by
the value on the same ring.  See ``docs/lookups.md``.
"""

from __future__ import annotations

from ..errors import UniqueLookupError
from . import _route, _write  # noqa: F401  (their session listeners)
from ._declare import DEFAULT_GRACE, Lookup, declare, declare_router_lookups, lookup_for, lookups_of, registered
from ._ops import BackfillProgress, VerifyReport, backfill, count_rows, repair, verify
from ._route import LookupRoute, lookup_step, plan_lookup_route

__all__ = [
    "DEFAULT_GRACE",
    "BackfillProgress",
    "Lookup",
    "LookupRoute",
    "UniqueLookupError",
    "VerifyReport",
    "backfill",
    "count_rows",
    "declare",
    "declare_router_lookups",
    "lookup_for",
    "lookup_step",
    "lookups_of",
    "plan_lookup_route",
    "registered",
    "repair",
    "verify",
]
