"""Public type aliases and Protocols.

A router is any object that defines some of the four methods below: shardkit
asks each router only for what it defines (Django's ``ConnectionRouter``
does the same), so there is nothing to inherit.  ``None`` from a router means
"I have no opinion, ask the next one".

What a read router may answer
-----------------------------
``db_for_read`` may return, besides ``None`` and one alias:

* a collection of aliases (``list``, ``tuple``, ``set``, ``frozenset``): the
  statement runs on each of them and the results are merged (a fan-out);
* a :class:`ShardTargets`: like a collection, but with a statement per alias
  (used by the ring router to send each shard only its own ``IN`` values).

``db_for_write`` returns one alias (or ``None``) for an instance; for a write by
statement (``update(User)`` with no shard key) it may return several, like a read.
Optional batch forms, used when every write router has them:
``db_for_write_rows(model, rows)`` and ``db_for_write_instances(model, instances)``
(one alias per row / instance); ``allow_relation_by_db = True`` on a router says its
``allow_relation`` depends only on the models and the ``db1``/``db2`` hints.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from sqlalchemy.sql import Executable

__all__ = [
    "Alias",
    "AllowMigrateRouter",
    "ReadRouter",
    "ReadTarget",
    "RelationRouter",
    "Router",
    "ShardKey",
    "ShardTargets",
    "WriteRouter",
]

Alias: TypeAlias = str
"""A key of DATABASES."""

ShardKey: TypeAlias = "int | str | bytes | Any"
"""A value the ring can hash: int, str, bytes or uuid.UUID."""


@dataclass(frozen=True)
class ShardTargets:
    """A read routed to several aliases, optionally with one statement per alias.

    :param statements: alias -> the statement that alias runs; ``None`` as a
        value means "the original statement".
    :param reason: why the read spans these shards (shown by ``explain()``).
    """

    statements: Mapping[Alias, Executable | None]
    reason: str = ""
    all_shards: bool = field(default=False)
    shard_key_columns: tuple[Any, ...] = ()
    """Columns the rows are sharded by: a GROUP BY on one keeps each group on one shard."""

    @property
    def aliases(self) -> tuple[Alias, ...]:
        return tuple(self.statements)


ReadTarget: TypeAlias = "Alias | Collection[Alias] | ShardTargets | None"


@runtime_checkable
class ReadRouter(Protocol):
    def db_for_read(self, model: type[Any], **hints: Any) -> ReadTarget: ...


@runtime_checkable
class WriteRouter(Protocol):
    def db_for_write(self, model: type[Any], **hints: Any) -> Alias | None: ...


@runtime_checkable
class RelationRouter(Protocol):
    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None: ...


@runtime_checkable
class AllowMigrateRouter(Protocol):
    def allow_migrate(self, db: Alias, model: type[Any] | None, **hints: Any) -> bool | None: ...


Router: TypeAlias = "ReadRouter | WriteRouter | RelationRouter | AllowMigrateRouter | Any"
"""Any object defining one or more of the router methods."""
