"""Where an object lives, as the instance itself records it: read by the session (to route
its flush), by the relations check (Django's ``_state.db``) and by the managers.

Two keys of ``InstanceState.info`` hold it:

* :data:`DB`: the alias the object was loaded from or saved to (when its identity key does
  not already say so);
* :data:`USING`: the alias ``save(using=...)`` asked for, for the next flush.

Also here, because the session, the relations check and the write routing all need them:
the many-to-one relationships of a mapper, a mapper's column -> attribute names, and the
*stand-in*: a transient instance carrying only a few attributes (a row's values, a parent's
key) for the routers to look at.  Nothing here asks a router or touches a session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import NO_STATE
from sqlalchemy.orm.interfaces import MANYTOONE

from . import _sqla
from .errors import ShardkitError

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, RelationshipProperty
    from sqlalchemy.orm.state import InstanceState

__all__ = [
    "DB",
    "USING",
    "column_attr_keys",
    "db_of",
    "db_of_or_none",
    "info_get",
    "many_to_ones",
    "placed_alias",
    "set_db",
    "stand_in",
]

DB = "shardkit.db"  # the alias the object was loaded from / saved to
USING = "shardkit.using"  # save(using=...) asked for this alias at the next flush


def info_get(state: InstanceState[Any], key: str) -> Any:
    """``state.info.get(key)`` without creating ``info`` (a dict per object) when it is unset."""
    info = state.__dict__.get("info")
    return None if info is None else info.get(key)


def set_db(state: InstanceState[Any], alias: str) -> None:
    state.info[DB] = alias


def db_of(obj: Any) -> str | None:
    """The alias ``obj`` was loaded from or saved to; ``None`` for a new object.

    >>> user = s.scalars(select(User).options(using("credentials"))).one()  # doctest: +SKIP
    >>> db_of(user)  # doctest: +SKIP
    'credentials'
    """
    try:
        state = instance_state(obj)
    except NO_STATE:
        raise ShardkitError(f"{type(obj).__name__} is not a mapped object", model=type(obj)) from None
    db = info_get(state, DB)
    if db is not None:
        return str(db)
    if state.key is not None and state.key[2] is not None:
        return str(state.key[2])
    token = state.identity_token
    return str(token) if token is not None else None


def db_of_or_none(obj: Any) -> str | None:
    """:func:`db_of`, or ``None`` for something that is not a mapped object."""
    try:
        return db_of(obj)
    except ShardkitError:
        return None


def placed_alias(state: InstanceState[Any]) -> str | None:
    """Where a new object was placed before its first flush (``save(using=)``, a related
    object's database), or ``None``."""
    placed = info_get(state, USING) or info_get(state, DB)
    return None if placed is None else str(placed)


_M2O: dict[Mapper[Any], tuple[RelationshipProperty[Any], ...]] = {}


def many_to_ones(mapper: Mapper[Any]) -> tuple[RelationshipProperty[Any], ...]:
    """The many-to-one relationships of ``mapper`` (cached per mapper)."""
    rels = _M2O.get(mapper)
    if rels is None:
        rels = _M2O[mapper] = tuple(r for r in mapper.relationships if r.direction is MANYTOONE)
    return rels


_ATTR_KEYS: dict[Mapper[Any], dict[str, str]] = {}


def column_attr_keys(mapper: Mapper[Any]) -> dict[str, str]:
    """column key -> attribute key, for the mapper's columns (cached per mapper)."""
    keys = _ATTR_KEYS.get(mapper)
    if keys is None:
        keys = {c.key: mapper.get_property_by_column(c).key for c in mapper.columns if c.key is not None}
        _ATTR_KEYS[mapper] = keys
    return keys


def stand_in(mapper: Mapper[Any], attributes: dict[str, Any]) -> Any:
    """A transient instance of ``mapper``'s class holding only ``attributes`` (attribute key ->
    value), for the routers to look at: a row to insert, a parent named by a foreign key."""
    _sqla.ensure_configured(mapper)  # a stand-in's attributes work only once the mappers are configured
    obj = mapper.class_manager.new_instance()
    instance_state(obj).dict.update(attributes)
    return obj
