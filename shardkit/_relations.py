"""allow_relation, enforced: a foreign key never points into another database.

Two checks, as Django makes one:

* **at assignment** (``order.user = user``, ``user.orders.append(order)``, a
  many-to-many append): when both objects already know their database, the
  router chain's ``allow_relation`` decides, and a refusal raises
  :class:`~shardkit.errors.RelationError` before the attribute changes;
* **at flush**, for everything that slipped past (a foreign key column set
  directly, an object whose database was not known at assignment): every
  new or changed object is checked against each many-to-one parent, loaded
  or only named by its foreign key.  A refusal rejects the whole flush before
  any statement is sent, so nothing is written to any shard.

The database of a new object is where the session would write it.  The
``db1`` / ``db2`` hints carry both aliases to the routers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, event, select
from sqlalchemy.orm import Mapper, object_session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.interfaces import MANYTOONE

from .errors import RelationError, ShardkitError

if TYPE_CHECKING:
    from sqlalchemy.orm import RelationshipProperty
    from sqlalchemy.orm.state import InstanceState

    from ._session import ShardSession

__all__ = ["check_flush_relations", "relation_error"]


def relation_error(obj1: Any, db1: str, obj2: Any, db2: str, relationship: str) -> RelationError:
    m1, m2 = type(obj1).__name__, type(obj2).__name__
    return RelationError(
        f"relation {relationship} refused: {m1} on {db1!r} and {m2} on {db2!r} are on different "
        f"databases (allow_relation said no); a foreign key cannot cross databases",
        model1=type(obj1),
        model2=type(obj2),
        alias1=db1,
        alias2=db2,
        relationship=relationship,
    )


def _db(session: ShardSession, obj: Any) -> str | None:
    try:
        return session.placement_of(obj)
    except ShardkitError:  # not decidable yet (a shard key still unset): the flush check decides
        return None


def _session_of(*objs: Any) -> ShardSession | None:
    from ._session import ShardSession

    for obj in objs:
        session = object_session(obj)
        if isinstance(session, ShardSession):
            return session
    return None


def _check_pair(target: Any, value: Any, prop: RelationshipProperty[Any]) -> None:
    if value is None:
        return
    session = _session_of(target, value)
    if session is None:
        return
    db1, db2 = _db(session, target), _db(session, value)
    if db1 is None or db2 is None:
        return
    if not session.cluster.router.allow_relation(target, value, db1=db1, db2=db2, relationship=prop.key):
        raise relation_error(target, db1, value, db2, f"{prop.parent.class_.__name__}.{prop.key}")


@event.listens_for(Mapper, "mapper_configured")
def _instrument(mapper: Mapper[Any], class_: type[Any]) -> None:
    for prop in mapper.relationships:
        if prop.parent is not mapper:  # inherited: the base mapper has it already
            continue
        attr = getattr(class_, prop.key)

        def on_set(target: Any, value: Any, oldvalue: Any, initiator: Any, _prop: Any = prop) -> None:
            _check_pair(target, value, _prop)

        def on_append(target: Any, value: Any, initiator: Any, _prop: Any = prop) -> None:
            _check_pair(target, value, _prop)

        if prop.uselist:
            event.listen(attr, "append", on_append)
        else:
            event.listen(attr, "set", on_set)


_M2O: dict[Mapper[Any], tuple[RelationshipProperty[Any], ...]] = {}


def _many_to_ones(mapper: Mapper[Any]) -> tuple[RelationshipProperty[Any], ...]:
    rels = _M2O.get(mapper)
    if rels is None:
        rels = tuple(r for r in mapper.relationships if r.direction is MANYTOONE)
        _M2O[mapper] = rels
    return rels


_FK_LOOKUPS: dict[RelationshipProperty[Any], Any] = {}


def _fk_lookup(prop: RelationshipProperty[Any]) -> Any:
    """``select(Parent).where(parent_col == :shardkit_fk_0 ...)``, built once per relationship:
    the routers read the values from the ``parameters`` hint."""
    stmt = _FK_LOOKUPS.get(prop)
    if stmt is None:
        pairs = prop.local_remote_pairs or []
        stmt = select(prop.mapper).where(
            and_(*[remote == bindparam(f"shardkit_fk_{i}") for i, (_local, remote) in enumerate(pairs)])
        )
        _FK_LOOKUPS[prop] = stmt
    return stmt


_LOCAL_ATTRS: dict[tuple[Mapper[Any], RelationshipProperty[Any]], tuple[str, ...]] = {}


def _local_attrs(mapper: Mapper[Any], prop: RelationshipProperty[Any]) -> tuple[str, ...]:
    key = (mapper, prop)
    attrs = _LOCAL_ATTRS.get(key)
    if attrs is None:
        attrs = tuple(mapper.get_property_by_column(local).key for local, _r in prop.local_remote_pairs or ())
        _LOCAL_ATTRS[key] = attrs
    return attrs


def _parent_db_by_fk(session: ShardSession, state: InstanceState[Any], prop: RelationshipProperty[Any]) -> Any:
    """(stand-in parent, its alias) for a many-to-one named only by its foreign key columns."""
    pairs = prop.local_remote_pairs or []
    if not pairs:
        return None
    params: dict[str, Any] = {}
    for i, attr in enumerate(_local_attrs(state.mapper, prop)):
        value = state.dict.get(attr)
        if value is None:
            return None
        params[f"shardkit_fk_{i}"] = value
    target = prop.mapper
    where = session.cluster.router.read_opinion(
        target.class_, statement=_fk_lookup(prop), parameters=params, session=session
    )
    if not isinstance(where, str):
        return None  # no router places the parent, or it could be on any shard: nothing to check
    stand_in = target.class_manager.new_instance()
    stand_in_dict = instance_state(stand_in).dict
    for i, (_local, remote) in enumerate(pairs):
        stand_in_dict[target.get_property_by_column(remote).key] = params[f"shardkit_fk_{i}"]
    return stand_in, where


def check_flush_relations(session: ShardSession) -> None:
    """Refuse the flush if any object is related to one on another database."""
    router = session.cluster.router
    deleted = {instance_state(obj) for obj in session.deleted}
    for state, alias in session._flush_aliases.items():
        if state.obj() is None or state in deleted:
            continue
        for prop in _many_to_ones(state.mapper):
            parent = state.dict.get(prop.key)
            if parent is not None:
                parent_state = instance_state(parent)
                parent_alias = session._flush_aliases.get(parent_state) or _db(session, parent)
            else:
                found = _parent_db_by_fk(session, state, prop)
                if found is None:
                    continue
                parent, parent_alias = found
            if parent_alias is None:
                continue
            child = state.obj()
            if not router.allow_relation(child, parent, db1=alias, db2=parent_alias, relationship=prop.key):
                raise relation_error(child, alias, parent, parent_alias, f"{state.class_.__name__}.{prop.key}")
