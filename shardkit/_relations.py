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
from sqlalchemy.orm.attributes import get_state_history, instance_state
from sqlalchemy.orm.base import PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.interfaces import MANYTOONE

from . import _sqla
from ._placement import db_of_or_none, many_to_ones, placed_alias, set_db, stand_in
from .errors import RelationError, ShardkitError

if TYPE_CHECKING:
    from sqlalchemy.orm import RelationshipProperty
    from sqlalchemy.orm.state import InstanceState

    from ._session import ShardSession

__all__ = ["check_flush_relations", "django_lead", "relation_error"]


def relation_error(
    obj1: Any, db1: str | None, obj2: Any, db2: str | None, relationship: str, *, lead: str = ""
) -> RelationError:
    """The error for a refused relation; ``lead`` is Django's own sentence for the case."""
    m1, m2 = type(obj1).__name__, type(obj2).__name__
    detail = (
        f"relation {relationship} refused: {m1} on {db1!r} and {m2} on {db2!r} are on different "
        f"databases (allow_relation said no); a foreign key cannot cross databases"
    )
    return RelationError(
        f"{lead} ({detail})" if lead else detail,
        model1=type(obj1),
        model2=type(obj2),
        alias1=db1,
        alias2=db2,
        relationship=relationship,
    )


def django_lead(target: Any, value: Any, prop: RelationshipProperty[Any], db1: Any, db2: Any) -> str:
    """Django's message for a relation its routers refuse, by the kind of relation."""
    if prop.secondary is not None:  # a many-to-many add
        return f'Cannot add "{value!r}": instance is on database "{db1}", value is on database "{db2}"'
    if prop.uselist:  # a one-to-many add sets the child's foreign key to the owner
        return f'Cannot assign "{target!r}": the current database router prevents this relation.'
    return f'Cannot assign "{value!r}": the current database router prevents this relation.'


def _db(session: ShardSession, obj: Any) -> str | None:
    try:
        return session.placement_of(obj)
    except ShardkitError:  # not decidable yet (a shard key still unset): the flush check decides
        return None


def _own_db(session: ShardSession | None, obj: Any) -> str | None:
    """The database ``obj`` lives on or was placed on, asking no router (Django's ``_state.db``)."""
    state = instance_state(obj)
    if session is not None:
        alias = session.flush_aliases.get(state)
        if alias is not None:
            return alias
        if session.pinned is not None:
            return session.pinned
    if state.key is None:
        return placed_alias(state)
    return db_of_or_none(obj)


def _adopt(cluster: Any, obj: Any, other: Any, other_db: str) -> str | None:
    """Django's rule for a new object related to one that has a database: it takes
    ``db_for_write(type(obj), instance=other)``, else the other object's database.  Models a
    router shards by key are left to the flush, which places them by their key."""
    router = cluster.router
    if any(getattr(r, "is_sharded", None) is not None and r.is_sharded(type(obj)) for r in router.routers):
        return None
    try:
        target = router.write_opinion(type(obj), instance=other)
    except ShardkitError:
        return None
    alias = target if isinstance(target, str) else other_db
    set_db(instance_state(obj), alias)
    return alias


def _session_of(*objs: Any) -> ShardSession | None:
    from ._session import ShardSession

    for obj in objs:
        session = object_session(obj)
        if isinstance(session, ShardSession):
            return session
    return None


def _cluster_for(session: ShardSession | None) -> Any:
    if session is not None:
        return session.cluster
    from ._cluster import get_active_cluster

    try:
        return get_active_cluster()
    except ShardkitError:  # no cluster: nothing to ask
        return None


def _check_pair(target: Any, value: Any, prop: RelationshipProperty[Any]) -> None:
    if value is None:
        return
    session = _session_of(target, value)
    cluster = _cluster_for(session)
    if cluster is None:
        return
    own1, own2 = _own_db(session, target), _own_db(session, value)
    if own1 is None and own2 is not None:
        own1 = _adopt(cluster, target, value, own2)
    elif own2 is None and own1 is not None:
        own2 = _adopt(cluster, value, target, own1)
    db1 = own1 if own1 is not None or session is None else _db(session, target)
    db2 = own2 if own2 is not None or session is None else _db(session, value)
    if (db1 is None) != (db2 is None):
        return  # one side not decidable yet: the flush check decides
    if not cluster.router.allow_relation(target, value, db1=db1, db2=db2, relationship=prop.key):
        name = f"{prop.parent.class_.__name__}.{prop.key}"
        raise relation_error(target, db1, value, db2, name, lead=_lead(session, target, value, prop, db1, db2))


def _lead(session: ShardSession | None, target: Any, value: Any, prop: Any, db1: Any, db2: Any) -> str:
    """Django's sentence, built without flushing anything (a repr may read an expired attribute)."""
    if session is None:
        return django_lead(target, value, prop, db1, db2)
    with session.no_autoflush:
        return django_lead(target, value, prop, db1, db2)


@event.listens_for(Mapper, "mapper_configured")
def _instrument(mapper: Mapper[Any], class_: type[Any]) -> None:
    for prop in mapper.relationships:
        if prop.parent is not mapper:  # inherited: the base mapper has it already
            continue
        attr = getattr(class_, prop.key)

        def on_set(target: Any, value: Any, oldvalue: Any, initiator: Any, _prop: Any = prop) -> None:
            _check_event(target, value, _prop, initiator)

        def on_append(target: Any, value: Any, initiator: Any, _prop: Any = prop) -> None:
            _check_event(target, value, _prop, initiator)

        # propagate: subclasses share the relationship and must be checked too
        if prop.uselist:
            event.listen(attr, "append", on_append, propagate=True)
        else:
            event.listen(attr, "set", on_set, propagate=True)


def _check_event(target: Any, value: Any, prop: RelationshipProperty[Any], initiator: Any) -> None:
    """An attribute event: when it is the back-reference of a change made on the other side
    (``dive.editor = marty`` also appends to ``marty.edited``), check it as that change, so the
    refusal names the relation the user assigned."""
    key = getattr(initiator, "key", prop.key)
    if key != prop.key and value is not None:
        for other in _sqla.reverse_properties(prop):
            if other.key == key:
                _check_pair(value, target, other)
                return
    _check_pair(target, value, prop)


_COLLECTIONS: dict[Mapper[Any], tuple[RelationshipProperty[Any], ...]] = {}


def _collections(mapper: Mapper[Any]) -> tuple[RelationshipProperty[Any], ...]:
    rels = _COLLECTIONS.get(mapper)
    if rels is None:
        rels = tuple(r for r in mapper.relationships if r.direction is not MANYTOONE and not r.viewonly)
        _COLLECTIONS[mapper] = rels
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


def _stand_in(prop: RelationshipProperty[Any], values: tuple[Any, ...]) -> Any:
    """A transient parent carrying only the key the foreign key names (for the routers to look at)."""
    target = prop.mapper
    return stand_in(
        target,
        {
            target.get_property_by_column(remote).key: value
            for (_local, remote), value in zip(prop.local_remote_pairs or (), values, strict=True)
        },
    )


def _parent_aliases_by_fk(
    session: ShardSession,
    prop: RelationshipProperty[Any],
    pending: list[tuple[InstanceState[Any], str, tuple[Any, ...]]],
) -> list[str | None]:
    """Where the parents named by foreign keys live: one batch question to the routers
    (``db_for_write_rows``: where a parent row with that key is written), else one read
    question per child."""
    target = prop.mapper
    remote_keys = [str(remote.key) for _local, remote in prop.local_remote_pairs or ()]
    rows = [dict(zip(remote_keys, values, strict=True)) for _state, _alias, values in pending]
    batch = session.cluster.router.db_for_write_rows(target.class_, rows, session=session)
    if batch is not None:  # a router placed every parent by its key
        return list(batch)
    out: list[str | None] = []
    lookup = _fk_lookup(prop)
    for _state, _alias, values in pending:
        params = {f"shardkit_fk_{i}": v for i, v in enumerate(values)}
        where = session.cluster.router.read_opinion(target.class_, statement=lookup, parameters=params, session=session)
        out.append(where if isinstance(where, str) else None)
    return out


def _check(
    router: Any, obj1: Any, db1: str, obj2: Any, db2: str, state: InstanceState[Any], prop: RelationshipProperty[Any]
) -> None:
    """Ask the router chain about one relation of ``state``'s object; refuse it by raising."""
    if not router.allow_relation(obj1, obj2, db1=db1, db2=db2, relationship=prop.key):
        lead = _lead(object_session(obj1), obj1, obj2, prop, db1, db2)  # type: ignore[arg-type]
        raise relation_error(obj1, db1, obj2, db2, f"{state.class_.__name__}.{prop.key}", lead=lead)


def check_flush_relations(session: ShardSession) -> None:
    """Refuse the flush if any object is related to one on another database."""
    router = session.cluster.router
    deleted = {instance_state(obj) for obj in session.deleted}
    by_fk: dict[RelationshipProperty[Any], list[tuple[InstanceState[Any], str, tuple[Any, ...]]]] = {}
    for state, alias in session.flush_aliases.items():
        if state.obj() is None or state in deleted:
            continue
        for prop in many_to_ones(state.mapper):
            parent = state.dict.get(prop.key)
            if parent is None:  # named only by its foreign key: checked below, in batches
                values = tuple(state.dict.get(attr) for attr in _local_attrs(state.mapper, prop))
                if values and None not in values:
                    by_fk.setdefault(prop, []).append((state, alias, values))
                continue
            parent_alias = session.flush_aliases.get(instance_state(parent)) or _db(session, parent)
            if parent_alias is None:
                continue
            _check(router, state.obj(), alias, parent, parent_alias, state, prop)
    # Routers whose answer depends only on the models and aliases are asked once per kind of pair.
    memo: dict[tuple[Any, ...], bool] | None = {} if router.relation_depends_on_dbs_only else None
    # One-to-many (one-to-one too) and many-to-many members added since the last flush (a
    # one-to-many without a back-reference, or a many-to-many, has no many-to-one side above).
    for state, alias in list(session.flush_aliases.items()):
        if state in deleted:
            continue
        for prop in _collections(state.mapper):
            if prop.key not in state.dict:
                continue  # never loaded: nothing was added
            added = get_state_history(state, prop.key, PASSIVE_NO_INITIALIZE).added
            for member in added or ():
                member_alias = session.flush_aliases.get(instance_state(member)) or _db(session, member)
                if member_alias is None:
                    continue
                _check(router, state.obj(), alias, member, member_alias, state, prop)
    for prop, pending in by_fk.items():
        for (state, alias, values), parent_alias in zip(
            pending, _parent_aliases_by_fk(session, prop, pending), strict=True
        ):
            if parent_alias is None:
                continue
            pair = (state.class_, prop.mapper.class_, alias, parent_alias, prop.key)
            if memo is not None and memo.get(pair) is True:
                continue
            parent = _stand_in(prop, values)
            set_db(instance_state(parent), parent_alias)  # the row it stands for is there
            _check(router, state.obj(), alias, parent, parent_alias, state, prop)
            if memo is not None:
                memo[pair] = True
