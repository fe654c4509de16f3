"""The places where shardkit reaches into SQLAlchemy's internals, kept in one module.

* **``Model.relationship.through``.**  Django names a many-to-many's through model
  ``Book.authors.through``; the class-level relationship attribute gets the same name, giving
  the link table (``None`` for a relationship without one), which is what routers receive.
* **Many-to-many link rows.**  The unit of work writes the rows of a ``secondary`` table
  for every owner of one relationship at once, on the connection of
  ``session.get_bind(owner_mapper)``: with no instance, so a router cannot place them.
  Django writes link rows where ``db_for_write(<through model>, instance=owner)`` says.
  :func:`install` wraps the many-to-many dependency processor so that, in a
  :class:`~shardkit.ShardSession`, the owners are grouped by the alias of their link rows
  (:meth:`ShardSession.link_alias_of`) and each group is written on its own alias.
  Other sessions are left exactly as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import configure_mappers, dependency
from sqlalchemy.orm.base import INCLUDE_PENDING_MUTATIONS, PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.relationships import RelationshipProperty

__all__ = ["install", "returning_of"]

_installed = False


def _grouped(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def process(self: Any, uowcommit: Any, states: Any) -> None:
        from ._session import ShardSession

        session = uowcommit.session
        states = list(states)
        if not isinstance(session, ShardSession) or not states:
            original(self, uowcommit, states)
            return
        groups: dict[str, list[Any]] = {}
        for state in states:
            if (self.prop, state) in session._link_aliases or _has_link_changes(self, uowcommit, state):
                alias = session.link_alias_of(self.prop, state)
            else:  # no link row to write: no router question, no new connection
                alias = session._flush_aliases.get(state) or session.link_alias_of(self.prop, state)
            groups.setdefault(alias, []).append(state)
        previous = session._link_alias
        try:
            for alias, group in groups.items():
                session._link_alias = alias
                original(self, uowcommit, group)
        finally:
            session._link_alias = previous

    return process


def _has_link_changes(processor: Any, uowcommit: Any, state: Any) -> bool:
    history = uowcommit.get_attribute_history(state, processor.key, PASSIVE_NO_INITIALIZE | INCLUDE_PENDING_MUTATIONS)
    return bool(history and (history.added or history.deleted))


def _through(comparator: Any) -> Any:
    """``Book.authors.through``: the link table of a relationship (``None`` without one)."""
    configure_mappers()  # ``secondary`` is resolved when the mappers are configured
    return comparator.prop.secondary


def install() -> None:
    """Wrap the many-to-many processor once, add ``.through`` (idempotent)."""
    global _installed
    if _installed:
        return
    comparator: Any = RelationshipProperty.Comparator
    if not hasattr(comparator, "through"):
        comparator.through = property(_through)
    processor: Any = getattr(dependency, "_ManyToManyDP", None) or dependency.ManyToManyDP  # type: ignore[attr-defined]
    processor.process_saves = _grouped(processor.process_saves)
    processor.process_deletes = _grouped(processor.process_deletes)
    _installed = True


# -- statement internals ------------------------------------------------------


def returning_of(statement: Any) -> tuple[Any, ...]:
    """The RETURNING columns of an INSERT / UPDATE / DELETE (``()`` for anything else)."""
    return getattr(statement, "_returning", ()) or ()
