"""Django's model API over SQLAlchemy: ``objects``, ``using()``, ``db_manager()``, ``save(using=)``,
related managers.

Add :class:`ModelMixin` to a declarative base and every model gets::

    User.objects.filter(User.name.startswith("a")).using("credentials")
    User.objects.filter(name__startswith="a", score__gte=10).order_by("-score")[:10]
    User.objects.db_manager("credentials").create_user("mario")   # your own manager method
    user.save(using="other"); user.delete(using="other")
    book.authors.add(person); book.authors.filter(name="x").count()  # related managers

Which session and cluster are used
----------------------------------
* An object that belongs to a session is saved and deleted through it.
* Inside ``with cluster.session() as s:``, every manager call uses ``s`` and only
  flushes: you commit (Django's ``transaction.atomic()``).
* Anywhere else, as in Django, every evaluation reads the database: each queryset
  evaluation (and each ``create()``/``save()`` of a new object) gets a session of its own, whose
  objects are distinct from those of any other evaluation, and each call commits at once.  The
  objects stay attached to their session, so lazy loads work; a load outside a call runs in a
  transaction of its own, ended at once, so no connection stays checked out.  A failed call
  rolls back, and the next one works.  The *active* cluster is used (``cluster.activate()``);
  without one a :class:`ConfigError` says so.
"""

from __future__ import annotations

import builtins
import copy
import datetime
from collections import namedtuple
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

from sqlalchemy import ColumnElement, and_, delete, event, extract, func, inspect, not_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapper, joinedload, load_only, object_session, selectinload
from sqlalchemy.orm.attributes import InstrumentedAttribute, instance_state
from sqlalchemy.orm.collections import collection
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.sql.elements import ClauseElement

from . import _events, _sqla
from ._amanager import AsyncManagerMixin, AsyncModelMixin, AsyncQuerySetMixin, AsyncRelatedManagerMixin
from ._cluster import Cluster, get_active_cluster
from ._placement import DB as _DB
from ._placement import USING as _USING
from ._relations import django_lead, relation_error
from ._session import ShardSession, current_session, db_of, link_opinion
from .errors import (  # the model errors live in the one error tree; re-exported here by name
    CrossDatabaseQueryError,
    FieldError,
    MultipleObjectsReturned,
    ObjectDoesNotExist,
    RouterError,
    ShardkitError,
    UnsavedObjectError,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import RelationshipProperty
    from sqlalchemy.orm.state import InstanceState

__all__ = [
    "FieldError",
    "Manager",
    "ModelMixin",
    "MultipleObjectsReturned",
    "ObjectDoesNotExist",
    "QuerySet",
    "RelatedList",
    "RelatedManager",
    "ValuesQuerySet",
]

M = TypeVar("M")

_KEEP = "shardkit.manager_session"  # state.info: keeps an evaluation's session alive with its objects


# -- sessions --------------------------------------------------------------------------------


class _CallSession(ShardSession):
    """The session of one manager evaluation outside ``with cluster.session()``.

    Autoflush is off (nothing is written but by a call), objects survive commits
    (``expire_on_commit=False``), and an object of another such session that gets related to one
    of ours (``book.editor = person``) moves here instead of failing as "attached to another
    session", as Django objects of two querysets can be related freely.
    """

    _shardkit_autocommit = True

    def __init__(self, cluster: Cluster) -> None:
        self._own_cluster = cluster
        super().__init__(cluster, expire_on_commit=False, autoflush=False)
        self._calls = 0

    @property
    def cluster(self) -> Cluster:
        """The active cluster when it names the same databases as the one this session was made
        with: Django's settings are global, so routers changed by activating another cluster
        over the same databases apply to objects read before; else the session's own."""
        own = self._own_cluster
        active = _active_cluster()
        if active is None or active is own or not _same_databases(active, own):
            return own
        return active

    @cluster.setter
    def cluster(self, value: Cluster) -> None:
        self._own_cluster = value

    def _before_attach(self, state: InstanceState[Any], obj: object) -> bool:
        other_id = state.session_id
        if other_id is not None and other_id != self.hash_key:
            other = _sqla.session_by_hash_key(other_id)
            if isinstance(other, _CallSession) and other._calls == 0:
                other.expunge(obj)
        key = state.key
        if key is not None and other_id != self.hash_key:
            # Two Django objects may stand for one row; one session cannot hold both: the one
            # joining wins, the other leaves this session (it keeps its values and its db).
            existing = self.identity_map.get(key)
            if existing is not None and existing is not obj:
                self.expunge(existing)
        return super()._before_attach(state, obj)


def _active_cluster() -> Cluster | None:
    try:
        return get_active_cluster()
    except ShardkitError:
        return None


_SAME: dict[tuple[int, int], tuple[Cluster, Cluster, bool]] = {}


def _same_databases(a: Cluster, b: Cluster) -> bool:
    """Whether two clusters name the same databases (aliases and URLs)."""
    key = (id(a), id(b))
    hit = _SAME.get(key)
    if hit is not None and hit[0] is a and hit[1] is b:
        return hit[2]
    same = a.aliases == b.aliases and all(a.spec(x).url == b.spec(x).url for x in a.aliases)
    if len(_SAME) > 64:
        _SAME.clear()
    _SAME[key] = (a, b, same)
    return same


@event.listens_for(_CallSession, "loaded_as_persistent")
def _keep_loaded(session: Any, instance: Any) -> None:
    instance_state(instance).info[_KEEP] = session  # the session lives as long as its objects


@event.listens_for(_CallSession, "before_attach")
def _keep_attached(session: Any, instance: Any) -> None:
    instance_state(instance).info[_KEEP] = session


@event.listens_for(_CallSession, "do_orm_execute", retval=True, insert=True)
def _load_outside_calls(orm_context: Any) -> Any:
    """A lazy load or refresh outside any call: run it, then end its transaction at once."""
    session = orm_context.session
    if not isinstance(session, _CallSession) or session._calls:
        return None
    frozen = orm_context.invoke_statement().freeze()
    transaction = session.get_transaction()
    if transaction is not None:
        transaction.close()  # gives the connection back; unlike rollback(), expires nothing
    return frozen()


def _cluster() -> Cluster:
    session = current_session()
    return session.cluster if session is not None else get_active_cluster()


@contextmanager
def _session_scope(obj: Any = None) -> Iterator[ShardSession]:
    """The session a manager call runs in; commits (or rolls back) when it is a call session."""
    session: Any = object_session(obj) if obj is not None else None
    if session is None:
        session = current_session()
    if session is None:
        session = _CallSession(get_active_cluster())
    if not isinstance(session, ShardSession):
        raise ShardkitError(f"{type(obj).__name__} belongs to a plain SQLAlchemy session, not a shardkit session")
    if not isinstance(session, _CallSession):
        yield session
        session.flush()
        return
    session._calls += 1
    try:
        yield session
        if session._calls == 1:
            session.commit()
    except BaseException:
        if session._calls == 1:
            session.rollback()  # the session stays usable: no PendingRollbackError next time
        raise
    finally:
        session._calls -= 1


# -- lookups -----------------------------------------------------------------------------------

_LOOKUPS: dict[str, Any] = {
    "exact": lambda c, v: c.is_(None) if v is None else c == v,
    "iexact": lambda c, v: func.lower(c) == func.lower(v),
    "ne": lambda c, v: c.is_not(None) if v is None else c != v,
    "in": lambda c, v: c.in_(v if isinstance(v, ClauseElement) else list(v)),
    "gt": lambda c, v: c > v,
    "gte": lambda c, v: c >= v,
    "lt": lambda c, v: c < v,
    "lte": lambda c, v: c <= v,
    "contains": lambda c, v: c.contains(v, autoescape=True),
    "icontains": lambda c, v: c.icontains(v, autoescape=True),
    "startswith": lambda c, v: c.startswith(v, autoescape=True),
    "istartswith": lambda c, v: c.istartswith(v, autoescape=True),
    "endswith": lambda c, v: c.endswith(v, autoescape=True),
    "iendswith": lambda c, v: c.iendswith(v, autoescape=True),
    "isnull": lambda c, v: c.is_(None) if v else c.is_not(None),
    "range": lambda c, v: c.between(v[0], v[1]),
    "year": lambda c, v: extract("year", c) == v,
    "month": lambda c, v: extract("month", c) == v,
    "day": lambda c, v: extract("day", c) == v,
}


def _mapper(model: type[Any]) -> Mapper[Any]:
    return inspect(model)  # type: ignore[no-any-return]


def _pk_attr(model: type[Any]) -> str:
    mapper = _mapper(model)
    if len(mapper.primary_key) != 1:
        raise FieldError(f"{model.__name__} has a composite primary key: 'pk' is ambiguous", model=model)
    return mapper.get_property_by_column(mapper.primary_key[0]).key


def _column(model: type[Any], name: str) -> Any:
    mapper = _mapper(model)
    if name == "pk":
        name = _pk_attr(model)
    attr = getattr(model, name, None)
    if not isinstance(attr, InstrumentedAttribute) or name not in mapper.column_attrs:
        fields = ", ".join(sorted(p.key for p in mapper.column_attrs))
        raise FieldError(f"{model.__name__} has no field {name!r} (fields: {fields})", model=model, field=name)
    return attr


def _as_key(value: Any) -> Any:
    """A mapped object stands for its primary key (``filter(owner=person)``)."""
    if hasattr(value, "_sa_instance_state"):
        return _mapper(type(value)).primary_key_from_instance(value)[0]
    return value


class _Criteria:
    """Turns Django lookups into SQLAlchemy criteria; remembers subqueries' databases."""

    def __init__(self) -> None:
        self.sub_dbs: list[str] = []

    def build(self, model: type[Any], args: Sequence[Any], kwargs: dict[str, Any]) -> list[ColumnElement[bool]]:
        criteria: list[ColumnElement[bool]] = list(args)
        for key, value in kwargs.items():
            criteria.append(self.lookup(model, key.split("__"), value, key))
        return criteria

    def lookup(self, model: type[Any], parts: list[str], value: Any, key: str) -> ColumnElement[bool]:
        name, rest = parts[0], parts[1:]
        mapper = _mapper(model)
        rel = mapper.relationships.get(name) if name != "pk" else None
        if rel is not None:
            pairs = rel.local_remote_pairs or []
            if rel.direction is MANYTOONE and len(pairs) == 1 and (not rest or rest[0] in _LOOKUPS):
                # owner=person, owner__in=[...]: the foreign key column
                fk = getattr(model, mapper.get_property_by_column(pairs[0][0]).key)
                return self.operate(model, fk, rest[0] if rest else "exact", value, key)
            if not rest:
                raise FieldError(f"lookup {key!r} names the relationship {name!r} without a field", model=model)
            inner = self.lookup(rel.mapper.class_, rest, value, key)
            attr = getattr(model, name)
            return attr.any(inner) if rel.uselist else attr.has(inner)  # type: ignore[no-any-return]
        lookup = rest[0] if rest else "exact"
        if len(rest) > 1:
            raise FieldError(f"unsupported lookup {key!r} for {model.__name__}", model=model, field=name)
        return self.operate(model, _column(model, name), lookup, value, key)

    def operate(self, model: type[Any], column: Any, lookup: str, value: Any, key: str) -> ColumnElement[bool]:
        op = _LOOKUPS.get(lookup)
        if op is None:
            raise FieldError(
                f"unsupported lookup {lookup!r} in {key!r} for {model.__name__} "
                f"(supported: {', '.join(sorted(_LOOKUPS))})",
                model=model,
                field=key,
            )
        if isinstance(value, QuerySet):  # a subquery: its primary keys, on the outer query's database
            if value._db is not None:
                self.sub_dbs.append(value._db)
            self.sub_dbs.extend(value._sub_dbs)
            value = value._pk_subquery()
        elif lookup in ("in", "range") and not isinstance(value, ClauseElement):
            value = [_as_key(v) for v in value]
        else:
            value = _as_key(value)
        return op(column, value)  # type: ignore[no-any-return]


def _str_or_none(target: Any) -> str | None:
    return target if isinstance(target, str) else None


def _link_db(prop: Any, instance: Any) -> str:
    """Where a related manager writes ``instance``'s link rows of ``prop``: as the flush does,
    ``db_for_write(<link table>, instance=instance)``, else the instance's database."""
    target = link_opinion(_cluster().router, prop, instance)
    if target is None:
        target = db_of(instance) or _cluster().router.default
    if not isinstance(target, str):
        raise ShardkitError(f"db_for_write gave several aliases for the link rows of {prop}", model=type(instance))
    return target


def _write_db(model: Any, instance: Any) -> str:
    """Django's ``db_for_write(model, instance=obj)`` for a related manager.  A router that shards
    ``model`` by a key the related object does not carry (a hash ring asked about a child with
    its parent as the instance) cannot answer: the related rows live with the object, on its
    database."""
    target: Any
    try:
        target = _cluster().router.db_for_write(model, instance=instance)
    except ShardkitError as exc:
        target = db_of(instance)
        if target is None or isinstance(exc, RouterError):  # a router's own failure is not an answer
            raise
    if not isinstance(target, str):
        raise ShardkitError(f"db_for_write gave several aliases for {getattr(model, '__name__', model)!r}", model=model)
    return target


# -- QuerySet ------------------------------------------------------------------------------------


class QuerySet(AsyncQuerySetMixin[M], Generic[M]):
    """A lazy, chainable query of one model, in Django's style.

    Nothing runs until the queryset is iterated, sliced with an index, or asked
    for ``len``, ``get``, ``first``, ``count`` ...  Every method returns a new queryset.
    """

    def __init__(
        self,
        model: type[M],
        *,
        using: str | None = None,
        manager: Manager[M] | None = None,
        hints: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self._db = using
        self._manager = manager
        self._hints: dict[str, Any] = dict(hints or {})
        self._for_write = False
        self._where: tuple[ColumnElement[bool], ...] = ()
        self._sub_dbs: tuple[str, ...] = ()
        self._order: tuple[Any, ...] | None = None
        self._options: tuple[Any, ...] = ()
        self._limit: int | None = None
        self._offset: int | None = None
        self._cache: list[M] | None = None

    def _clone(self, **changes: Any) -> QuerySet[M]:
        clone = copy.copy(self)
        clone._cache = None
        for key, value in changes.items():
            setattr(clone, key, value)
        return clone

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    # -- chaining --------------------------------------------------------------

    def using(self, alias: str) -> QuerySet[M]:
        """Run this queryset on ``alias`` (chainable; the last call wins)."""
        return self._clone(_db=alias)

    def all(self) -> QuerySet[M]:
        return self._clone()

    def _filtered(self, negate: bool, criteria: Sequence[Any], lookups: dict[str, Any]) -> QuerySet[M]:
        builder = _Criteria()
        where = builder.build(self.model, criteria, lookups)
        added = (not_(and_(*where)),) if negate else tuple(where)
        return self._clone(_where=(*self._where, *added), _sub_dbs=(*self._sub_dbs, *builder.sub_dbs))

    def filter(self, *criteria: Any, **lookups: Any) -> QuerySet[M]:
        """Keep rows matching SQLAlchemy criteria and Django lookups (``name__startswith="a"``,
        ``owner=person``, ``authors__name="x"`` across a relationship, ``id__in=other_queryset``)."""
        return self._filtered(False, criteria, lookups)

    def exclude(self, *criteria: Any, **lookups: Any) -> QuerySet[M]:
        return self._filtered(True, criteria, lookups)

    def order_by(self, *fields: Any) -> QuerySet[M]:
        """Order by ``"name"``, ``"-score"`` (descending) or SQLAlchemy expressions; replaces earlier ordering."""
        order: list[Any] = []
        for f in fields:
            if isinstance(f, str):
                desc = f.startswith("-")
                col = _column(self.model, f.lstrip("-"))
                order.append(col.desc() if desc else col.asc())
            else:
                order.append(f)
        return self._clone(_order=tuple(order))

    def options(self, *options: Any) -> QuerySet[M]:
        """Add SQLAlchemy loader options (``selectinload(User.orders)`` ...)."""
        return self._clone(_options=(*self._options, *options))

    def only(self, *fields: str) -> QuerySet[M]:
        """Load only these columns now; the others load from the object's database on first access."""
        return self.options(load_only(*[_column(self.model, f) for f in fields]))

    def select_related(self, *names: str) -> QuerySet[M]:
        """Load these many-to-one relationships in the same query (a JOIN): Django's ``select_related``."""
        return self.options(*[joinedload(getattr(self.model, name)) for name in names])

    def prefetch_related(self, *names: str) -> QuerySet[M]:
        """Load these relationships with one more query each, on the same database."""
        return self.options(*[selectinload(getattr(self.model, name)) for name in names])

    # -- where it runs ---------------------------------------------------------

    @property
    def db(self) -> str | None:
        """The alias this queryset runs on: ``using()``'s, else the routers' pick
        (``db_for_read``, or ``db_for_write`` for a write), as Django's ``QuerySet.db``;
        ``None`` when the routers name several aliases (a fan-out)."""
        if self._db is not None:
            return self._db
        router = _cluster().router
        if self._for_write:
            if "instance" in self._hints:
                return _write_db(self.model, self._hints["instance"])
            return _str_or_none(router.db_for_write(self.model, **self._hints))
        return _str_or_none(router.db_for_read(self.model, **self._hints))

    def _run_alias(self, write: bool) -> str | None:
        """The alias to place the statement on: ``using()``'s, or the routers' answer with this
        queryset's hints (a related manager's instance); ``None`` leaves it to the session's
        routing, which also sees the statement (a ring router reads the shard key from it)."""
        alias = self._db
        if alias is None and self._hints:
            router = _cluster().router
            if write and "instance" in self._hints:
                alias = _write_db(self.model, self._hints["instance"])
            else:
                target = (
                    router.db_for_write(self.model, **self._hints)
                    if write
                    else router.db_for_read(self.model, **self._hints)
                )
                alias = _str_or_none(target)
        if self._sub_dbs:
            outer = alias if alias is not None else self._clone(_for_write=write).db
            for sub in self._sub_dbs:
                if outer is not None and sub != outer:
                    raise CrossDatabaseQueryError(
                        "Subqueries aren't allowed across different databases. Force the inner query "
                        f"to be evaluated using `list(inner_query)`. (the subquery is placed on {sub!r}, "
                        f"the query runs on {outer!r})",
                        model=self.model,
                        alias=outer,
                    )
        return alias

    def _apply(self, stmt: Any, alias: str | None) -> Any:
        if self._where:
            stmt = stmt.where(*self._where)
        if alias is not None:
            stmt = stmt.execution_options(shardkit_using=alias)
        return stmt

    def _ordering(self) -> tuple[Any, ...]:
        if self._order is not None:
            return self._order
        meta = getattr(self.model, "Meta", None)
        default = getattr(meta, "ordering", None) or ()
        return self._clone().order_by(*default)._order or ()

    def _statement(self, alias: str | None) -> Any:
        stmt = self._apply(select(self.model), alias)
        order = self._ordering()
        if order:
            stmt = stmt.order_by(*order)
        if self._options:
            stmt = stmt.options(*self._options)
        if self._offset:
            stmt = stmt.offset(self._offset)
        if self._limit is not None:
            stmt = stmt.limit(self._limit)
        return stmt

    @property
    def query(self) -> Any:
        """The statement, as Django's ``qs.query`` (``str(qs.query)`` is its SQL)."""
        return self.statement

    @property
    def statement(self) -> Any:
        """The SQLAlchemy ``Select`` this queryset runs (a subquery placed on another database
        than the query is refused here already, as Django's ``str(qs.query)`` does)."""
        return self._statement(self._run_alias(write=False))

    def _pk_subquery(self) -> Any:
        return self._apply(select(_column(self.model, "pk")), None)

    def __repr__(self) -> str:
        where = " AND ".join(str(c) for c in self._where) or "all"
        return f"<QuerySet {self.model.__name__} {where}{f' using {self._db!r}' if self._db else ''}>"

    # -- evaluation --------------------------------------------------------------

    def _fetch(self) -> list[M]:
        if self._cache is None:
            alias = self._run_alias(write=False)
            with _session_scope() as session:
                self._cache = list(session.scalars(self._statement(alias)).unique())
        return self._cache

    def __iter__(self) -> Iterator[M]:
        return iter(self._fetch())

    def __len__(self) -> int:
        return len(self._fetch())

    def __bool__(self) -> bool:
        return bool(self._fetch())

    @overload
    def __getitem__(self, item: int) -> M: ...
    @overload
    def __getitem__(self, item: slice) -> QuerySet[M]: ...
    def __getitem__(self, item: int | slice) -> M | QuerySet[M]:
        if self._cache is not None:
            return self._cache[item] if isinstance(item, int) else self._clone()._slice(item)
        if isinstance(item, slice):
            return self._slice(item)
        if item < 0:
            raise ShardkitError("negative indexing is not supported", model=self.model)
        rows = self._slice(slice(item, item + 1))._fetch()
        if not rows:
            raise IndexError(f"{self.model.__name__} queryset index {item} out of range")
        return rows[0]

    def _slice(self, item: slice) -> QuerySet[M]:
        if item.step not in (None, 1) or (item.start or 0) < 0 or (item.stop is not None and item.stop < 0):
            raise ShardkitError("only non-negative slices without a step are supported", model=self.model)
        start = (self._offset or 0) + (item.start or 0)
        stop = None if item.stop is None else (self._offset or 0) + item.stop
        if self._limit is not None:
            end = (self._offset or 0) + self._limit
            stop = end if stop is None else min(stop, end)
        limit = None if stop is None else max(stop - start, 0)
        return self._clone(_offset=start or None, _limit=limit)

    def _pk_order(self) -> tuple[Any, ...]:
        mapper = _mapper(self.model)
        return tuple(getattr(self.model, mapper.get_property_by_column(c).key) for c in mapper.primary_key)

    def first(self) -> M | None:
        """The first object (ordered by primary key when unordered), or ``None``."""
        qs = self if self._ordering() else self._clone(_order=tuple(c.asc() for c in self._pk_order()))
        rows = qs[:1]._fetch()
        return rows[0] if rows else None

    def last(self) -> M | None:
        if self._limit is not None or self._offset:
            raise ShardkitError("cannot reverse a query once a slice has been taken (as in Django)", model=self.model)
        order = self._ordering() or tuple(c.asc() for c in self._pk_order())
        reversed_order = tuple(_reverse(o) for o in order)
        rows = self._clone(_order=reversed_order)[:1]._fetch()
        return rows[0] if rows else None

    def get(self, *criteria: Any, **lookups: Any) -> M:
        """The one object matching; ``Model.DoesNotExist`` / ``Model.MultipleObjectsReturned`` otherwise."""
        qs = self.filter(*criteria, **lookups) if criteria or lookups else self
        rows = qs._clone(_limit=2 if qs._limit is None else min(qs._limit, 2))._fetch()
        if not rows:
            raise _model_error(self.model, "DoesNotExist", ObjectDoesNotExist)(
                f"{self.model.__name__} matching query does not exist", model=self.model
            )
        if len(rows) > 1:
            raise _model_error(self.model, "MultipleObjectsReturned", MultipleObjectsReturned)(
                f"get() returned more than one {self.model.__name__}", model=self.model
            )
        return rows[0]

    def count(self) -> int:
        """The number of rows (one query; summed over shards on a fan-out)."""
        if self._cache is not None:
            return len(self._cache)
        if self._limit is not None or self._offset:
            return len(self._fetch())
        alias = self._run_alias(write=False)
        stmt = self._apply(select(func.count()).select_from(self.model), alias)
        with _session_scope() as session:
            return int(session.execute(stmt).scalar_one())

    def exists(self) -> bool:
        return self[:1]._fetch() != []

    def values(self, *fields: str) -> ValuesQuerySet[dict[str, Any]]:
        """A lazy queryset of one dict per row, ``{field: value}`` (every column when no field
        is named), as Django's ``values()``.  Chainable; as the right side of ``__in`` it is a
        SQL subquery of its one field, run on the outer query's database."""
        return ValuesQuerySet._of(self, fields, "dict")

    def values_list(self, *fields: str, flat: bool = False, named: bool = False) -> ValuesQuerySet[Any]:
        """A lazy queryset of the values of ``fields`` for each row: tuples, the values
        themselves with ``flat=True`` (one field), named tuples with ``named=True``.
        ``list(qs.values_list(...))`` is the list of them; as the right side of ``__in`` it is
        a SQL subquery of its one field, run on the outer query's database."""
        if flat and named:
            raise TypeError("'flat' and 'named' can't be used together.")
        if flat and len(fields) > 1:
            raise TypeError("'flat' is not valid when values_list is called with more than one field.")
        if flat and not fields:
            fields = (_pk_attr(self.model),)  # Django: flat=True alone is the primary key
        return ValuesQuerySet._of(self, fields, "flat" if flat else "named" if named else "tuple")

    def dates(self, field: str, kind: str) -> list[datetime.date]:
        """The distinct dates of ``field`` truncated to ``kind`` (``"year"``, ``"month"``, ``"day"``), ascending."""
        parts = {"year": ("year",), "month": ("year", "month"), "day": ("year", "month", "day")}.get(kind)
        if parts is None:
            raise ShardkitError(f"dates() kind must be 'year', 'month' or 'day', not {kind!r}", model=self.model)
        col = _column(self.model, field)
        alias = self._run_alias(write=False)
        exprs = [extract(p, col) for p in parts]
        stmt = self._apply(select(*exprs).distinct(), alias).order_by(*exprs)
        with _session_scope() as session:
            rows = session.execute(stmt).all()
        return [datetime.date(int(r[0]), int(r[1]) if len(r) > 1 else 1, int(r[2]) if len(r) > 2 else 1) for r in rows]

    def create(self, **fields: Any) -> M:
        """Make a ``Model(**fields)`` and insert it (on this queryset's alias, if placed): as
        Django's ``create()``, always an INSERT, so a primary key that exists raises
        ``IntegrityError`` rather than overwriting the row."""
        obj = self.model(**fields)
        save(obj, using=self._db, force_insert=True)
        return obj

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[M, bool]:
        """As Django: the whole of it runs on the write database (``db_for_write``), so a
        read/write-split router does not read a replica and then insert a duplicate."""
        qs = self._clone(_for_write=True)
        if qs._db is None:
            qs._db = _str_or_none(_cluster().router.write_opinion(self.model, **self._hints))
        try:
            return qs.get(**lookups), False
        except ObjectDoesNotExist:
            params = {k: v for k, v in lookups.items() if "__" not in k}
            try:
                return qs.create(**{**params, **(defaults or {})}), True
            except IntegrityError:
                # another connection created it in between (Django reads it again); inside a
                # session block the failed flush awaits your rollback: the error is yours
                if current_session() is not None:
                    raise
                try:
                    return qs.get(**lookups), False
                except ObjectDoesNotExist:
                    pass
                raise

    def update(self, **values: Any) -> int:
        """``UPDATE`` the matching rows; returns the number of rows changed."""
        alias = self._run_alias(write=True)
        stmt = self._apply(update(self.model), alias).values(**{k: _as_key(v) for k, v in values.items()})
        with _session_scope() as session:
            result = session.execute(stmt.execution_options(synchronize_session=False))
            return int(getattr(result, "rowcount", 0) or 0)

    def delete(self) -> int:
        """Delete the matching rows, as Django does: each object through the unit of work, so its
        many-to-many link rows and cascades go with it and the delete events are sent; a model
        that no other rows hang on, with no delete listener, in one DELETE statement.  Returns
        the number of rows deleted."""
        alias = self._run_alias(write=True)
        if _fast_delete(self.model) and self._limit is None and not self._offset:
            # nothing hangs on these rows and nobody listens: one DELETE (Django's fast delete)
            stmt = self._apply(delete(self.model), alias)
            with _session_scope() as session:
                result = session.execute(stmt.execution_options(synchronize_session="fetch"))
                return int(getattr(result, "rowcount", 0) or 0)
        if alias is None:  # read the rows to delete where the routers write them
            alias = _str_or_none(_cluster().router.write_opinion(self.model, **self._hints))
        with _session_scope() as session:
            objs = list(session.scalars(self._statement(alias)).unique())
            for obj in objs:
                # Django's Collector deletes on the queryset's database, never where
                # db_for_write would send a new write: from where each object was read.
                where = alias or db_of(obj)
                if where is None:
                    session.delete(obj)
                else:
                    session.delete_from(obj, where)
            session.flush()
            return len(objs)


V = TypeVar("V")


class ValuesQuerySet(QuerySet[V]):
    """What ``values()`` and ``values_list()`` return: a lazy queryset of dicts, tuples, named
    tuples or plain values (``flat=True``) in place of objects.

    It chains (``filter``, ``exclude``, ``order_by``, ``using``, slices) and evaluates as a
    queryset does (iteration, ``len``, an index, ``count``, ``exists``, ``first``, ``get`` ...),
    reading the database at each evaluation.  Used as the right side of ``__in``
    (``filter(id__in=Person.objects.values_list("id", flat=True))``) it becomes a SQL subquery
    of its one field, refused with :class:`CrossDatabaseQueryError` (a ``ValueError``) when it
    is placed on another database than the outer query, as a queryset is.  For code written
    against the lists these methods once returned, it also compares equal to the list of its
    rows (``qs.values_list("name", flat=True) == ["a"]``).
    """

    _fields: tuple[str, ...]
    _kind: str

    @classmethod
    def _of(cls, qs: QuerySet[Any], fields: Sequence[str], kind: str) -> ValuesQuerySet[Any]:
        names = tuple(fields) or tuple(p.key for p in _mapper(qs.model).column_attrs)
        for name in names:
            _value_column(qs.model, name)  # an unknown field fails here, as in Django
        made: ValuesQuerySet[Any] = cls.__new__(cls)
        made.__dict__.update(qs.__dict__)
        made._cache = None
        made._fields = names
        made._kind = kind
        return made

    def _columns(self) -> list[Any]:
        return [_value_column(self.model, f) for f in self._fields]

    def _statement(self, alias: str | None) -> Any:
        return self._ordered_slice(self._apply(select(*self._columns()), alias))

    def _ordered_slice(self, stmt: Any) -> Any:
        """``stmt`` with this queryset's ordering, offset and limit."""
        order = self._ordering()
        if order:
            stmt = stmt.order_by(*order)
        if self._offset:
            stmt = stmt.offset(self._offset)
        if self._limit is not None:
            stmt = stmt.limit(self._limit)
        return stmt

    def _pk_subquery(self) -> Any:
        """The subquery of ``filter(x__in=this)``: its one field (ordered only where a slice needs it)."""
        if len(self._fields) != 1:
            raise TypeError(
                f"Cannot use multi-field values as a filter value ({self.model.__name__}: {', '.join(self._fields)})."
            )
        stmt = self._apply(select(*self._columns()), None)
        return self._ordered_slice(stmt) if self._limit is not None or self._offset else stmt

    def _fetch(self) -> list[V]:
        if self._cache is None:
            alias = self._run_alias(write=False)
            with _session_scope() as session:
                rows = session.execute(self._statement(alias)).all()
            kind, names = self._kind, self._fields
            out: list[Any]
            if kind == "flat":
                out = [row[0] for row in rows]
            elif kind == "dict":
                out = [dict(zip(names, row, strict=True)) for row in rows]
            elif kind == "named":
                row_class = _row_class(names)
                out = [row_class(*row) for row in rows]
            else:
                out = [tuple(row) for row in rows]
            self._cache = out
        return self._cache

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list | tuple):
            return self._fetch() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = " AND ".join(str(c) for c in self._where) or "all"
        method = "values" if self._kind == "dict" else "values_list"
        flag = {"flat": ", flat=True", "named": ", named=True"}.get(self._kind, "")
        fields = ", ".join(repr(f) for f in self._fields)
        return (
            f"<{type(self).__name__} {self.model.__name__}.{method}({fields}{flag}) {where}"
            f"{f' using {self._db!r}' if self._db else ''}>"
        )

    def create(self, **fields: Any) -> Any:
        raise TypeError("Cannot call create() after .values() or .values_list().")

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[Any, bool]:
        raise TypeError("Cannot call get_or_create() after .values() or .values_list().")

    def delete(self) -> int:
        raise TypeError("Cannot call delete() after .values() or .values_list().")


def _value_column(model: type[Any], name: str) -> Any:
    """The column of a ``values()`` field: a column attribute, ``"pk"``, or a many-to-one
    relationship's name, which stands for its foreign key (``values_list("editor")``, as Django)."""
    rel = _mapper(model).relationships.get(name) if name != "pk" else None
    if rel is not None:
        pairs = rel.local_remote_pairs or []
        if rel.direction is MANYTOONE and len(pairs) == 1:
            return getattr(model, _mapper(model).get_property_by_column(pairs[0][0]).key)
    return _column(model, name)


_ROW_CLASSES: dict[tuple[str, ...], type[Any]] = {}


def _row_class(names: tuple[str, ...]) -> type[Any]:
    """The named tuple of ``values_list(named=True)`` (Django's ``Row``)."""
    made = _ROW_CLASSES.get(names)
    if made is None:
        if len(_ROW_CLASSES) > 256:
            _ROW_CLASSES.clear()
        made = _ROW_CLASSES[names] = namedtuple("Row", names, rename=True)
    return made


def _fast_delete(model: type[Any]) -> bool:
    """Whether deleting rows of ``model`` needs no object: no relationship of its own holds other
    rows (children, link rows) and no delete event has a listener."""
    if _events.active():
        return False
    mapper = _mapper(model)
    return all(r.direction is MANYTOONE or r.viewonly for r in mapper.relationships)


def _reverse(order: Any) -> Any:
    modifier = getattr(order, "modifier", None)
    element = getattr(order, "element", order)
    if modifier is not None and getattr(modifier, "__name__", "") == "desc_op":
        return element.asc()
    return element.desc()


def _model_error(model: type[Any], name: str, default: type[ShardkitError]) -> type[ShardkitError]:
    err = getattr(model, name, default)
    return err if isinstance(err, type) and issubclass(err, ShardkitError) else default


class RawQuerySet(Generic[M]):
    """``Manager.raw(sql)``: model objects from a raw SELECT, on one alias (``using()`` changes it)."""

    def __init__(self, model: type[M], sql: str, using: str | None, params: dict[str, Any] | None = None) -> None:
        self.model, self.sql, self._db, self.params = model, sql, using, dict(params or {})

    @property
    def db(self) -> str:
        return self._db or str(_cluster().router.db_for_read(self.model))

    def using(self, alias: str) -> RawQuerySet[M]:
        return RawQuerySet(self.model, self.sql, alias, self.params)

    def __iter__(self) -> Iterator[M]:
        stmt = select(self.model).from_statement(text(self.sql)).execution_options(shardkit_using=self.db)
        with _session_scope() as session:
            return iter(list(session.scalars(stmt, self.params)))


# -- Manager ---------------------------------------------------------------------------------


class Manager(AsyncManagerMixin[M], Generic[M]):
    """Django's model manager: the entry point of queries, ``Model.objects``.

    Subclass it to add methods (``create_user()`` ...); they work through
    :meth:`db_manager` too, since ``self`` is then bound to that alias.
    """

    def __init__(self) -> None:
        self.model: type[M] | None = None
        self.name = "objects"
        self._db: str | None = None
        self._hints: dict[str, Any] = {}
        self._bound: dict[type[Any], Manager[Any]] = {}

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type[M]) -> Manager[M]:
        if instance is not None:
            raise AttributeError(f"Manager isn't accessible via {owner.__name__} instances")
        if self.model is owner:
            return self
        bound = self._bound.get(owner)
        if bound is None:
            bound = copy.copy(self)
            bound._bound = {}
            bound.model = owner
            self._bound[owner] = bound
        return bound

    @property
    def db(self) -> str | None:
        """The alias this manager reads from: :meth:`db_manager`'s, else ``db_for_read``'s pick
        (as Django's ``Manager.db``); ``None`` when the routers name several aliases."""
        if self._db is not None:
            return self._db
        if self.model is None:
            return None
        return _str_or_none(_cluster().router.db_for_read(self.model, **self._hints))

    def db_manager(self, using: str | None = None, hints: dict[str, Any] | None = None) -> Manager[M]:
        """A copy of this manager bound to ``using``: its querysets and ``create()`` go there."""
        clone = copy.copy(self)
        clone._db = using or self._db
        clone._hints = {**self._hints, **(hints or {})}
        return clone

    def get_queryset(self) -> QuerySet[M]:
        if self.model is None:
            raise ShardkitError("this manager is not attached to a model")
        return QuerySet(self.model, using=self._db, manager=self, hints=self._hints)

    def __repr__(self) -> str:
        name = self.model.__name__ if self.model else "?"
        return f"<{type(self).__name__} {name}.{self.name}{f' using {self._db!r}' if self._db else ''}>"

    # the QuerySet entry points
    def all(self) -> QuerySet[M]:
        return self.get_queryset()

    def using(self, alias: str) -> QuerySet[M]:
        return self.get_queryset().using(alias)

    def filter(self, *criteria: Any, **lookups: Any) -> QuerySet[M]:
        return self.get_queryset().filter(*criteria, **lookups)

    def exclude(self, *criteria: Any, **lookups: Any) -> QuerySet[M]:
        return self.get_queryset().exclude(*criteria, **lookups)

    def order_by(self, *fields: Any) -> QuerySet[M]:
        return self.get_queryset().order_by(*fields)

    def only(self, *fields: str) -> QuerySet[M]:
        return self.get_queryset().only(*fields)

    def select_related(self, *names: str) -> QuerySet[M]:
        return self.get_queryset().select_related(*names)

    def prefetch_related(self, *names: str) -> QuerySet[M]:
        return self.get_queryset().prefetch_related(*names)

    def get(self, *criteria: Any, **lookups: Any) -> M:
        return self.get_queryset().get(*criteria, **lookups)

    def first(self) -> M | None:
        return self.get_queryset().first()

    def last(self) -> M | None:
        return self.get_queryset().last()

    def count(self) -> int:
        return self.get_queryset().count()

    def exists(self) -> bool:
        return self.get_queryset().exists()

    def values(self, *fields: str) -> ValuesQuerySet[dict[str, Any]]:
        return self.get_queryset().values(*fields)

    def values_list(self, *fields: str, flat: bool = False, named: bool = False) -> ValuesQuerySet[Any]:
        return self.get_queryset().values_list(*fields, flat=flat, named=named)

    def dates(self, field: str, kind: str) -> list[datetime.date]:
        return self.get_queryset().dates(field, kind)

    def update(self, **values: Any) -> int:
        return self.get_queryset().update(**values)

    def delete(self) -> int:
        return self.get_queryset().delete()

    def create(self, **fields: Any) -> M:
        return self.get_queryset().create(**fields)

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[M, bool]:
        return self.get_queryset().get_or_create(defaults, **lookups)

    def raw(self, sql: str, params: dict[str, Any] | None = None) -> RawQuerySet[M]:
        """Objects from a raw SELECT (``SELECT id, ... FROM table``) on this manager's database."""
        if self.model is None:
            raise ShardkitError("this manager is not attached to a model")
        return RawQuerySet(self.model, sql, self._db, params)


# -- related managers ----------------------------------------------------------------------------


def _owner_values(owner: Any, cols: Iterable[Any], owner_mapper: Mapper[Any]) -> list[Any]:
    values = [getattr(owner, owner_mapper.get_property_by_column(c).key) for c in cols]
    if any(v is None for v in values):
        raise UnsavedObjectError(
            f'"{owner!r}" needs to have a value for its primary key before this relationship can be used.',
            model=type(owner),
        )
    return values


class RelatedManager(AsyncRelatedManagerMixin, Manager[Any]):
    """Django's related manager for one object's one-to-many or many-to-many relationship.

    Reached as the collection itself (``author.books.add(book)``, ``book.authors.filter(...)``)
    on :class:`ModelMixin` models, or as ``RelatedManager.of(obj, "books")``.  Every query and
    write asks the routers with the object as the ``instance`` hint, as Django does:

    * reads: ``db_for_read(RelatedModel, instance=obj)`` (by default, the object's database);
    * ``add`` / ``remove`` / ``clear`` / ``set`` of a many-to-many: the link rows go to
      ``db_for_write(<link table>, instance=obj)``; of a one-to-many:
      ``db_for_write(RelatedModel, instance=obj)``;
    * ``create`` / ``get_or_create``: ``db_for_write(RelatedModel, instance=obj)`` for a
      one-to-many, ``db_for_write(type(obj), instance=obj)`` for a many-to-many.

    The class is made per related model, on top of that model's own manager class, so your
    manager methods (a ``create()`` override ...) run through it.
    """

    instance: Any
    prop: RelationshipProperty[Any]
    model: type[Any]

    @classmethod
    def of(cls, instance: Any, key: str, using: str | None = None) -> RelatedManager:
        """The related manager of ``instance``'s relationship ``key``."""
        prop = _mapper(type(instance)).relationships[key]
        model = prop.mapper.class_
        base = type(getattr(model, "objects", None) or Manager())
        made = _RELATED_CLASSES.get(base)
        if made is None:
            made = _RELATED_CLASSES[base] = type(f"Related{base.__name__}", (cls, base), {})
        manager: RelatedManager = made.__new__(made)
        Manager.__init__(manager)
        manager.model = model
        manager.name = key
        manager.instance = instance
        manager.prop = prop
        manager._db = using
        manager._hints = {"instance": instance}
        return manager

    @property
    def through(self) -> Any:
        """The link table of a many-to-many (``None`` for a one-to-many)."""
        return self.prop.secondary

    @property
    def _router(self) -> Any:
        return _cluster().router

    def __repr__(self) -> str:
        return f"<RelatedManager {type(self.instance).__name__}.{self.prop.key}>"

    def db_manager(self, using: str | None = None, hints: dict[str, Any] | None = None) -> RelatedManager:
        clone = copy.copy(self)
        clone._db = using or self._db
        return clone

    def _relation(self) -> ColumnElement[bool]:
        """The rows of the related model that belong to the instance."""
        prop, owner = self.prop, self.instance
        owner_mapper = _mapper(type(owner))
        target = prop.mapper
        if prop.secondary is not None:
            owner_pairs = prop.synchronize_pairs
            values = _owner_values(owner, [o for o, _s in owner_pairs], owner_mapper)
            links = select(*[s for _t, s in (prop.secondary_synchronize_pairs or [])]).where(
                and_(*[s == v for (_o, s), v in zip(owner_pairs, values, strict=True)])
            )
            target_cols = [
                getattr(self.model, target.get_property_by_column(t).key)
                for t, _s in (prop.secondary_synchronize_pairs or [])
            ]
            if len(target_cols) != 1:
                raise ShardkitError("related managers need a one-column key on each side", model=self.model)
            return target_cols[0].in_(links)  # type: ignore[no-any-return]
        pairs = prop.local_remote_pairs or []
        values = _owner_values(owner, [local for local, _r in pairs], owner_mapper)
        return and_(
            *[
                getattr(self.model, target.get_property_by_column(r).key) == v
                for (_l, r), v in zip(pairs, values, strict=True)
            ]
        )

    def get_queryset(self) -> QuerySet[Any]:
        """The related model's manager's queryset (yours, if you override it), narrowed to the
        instance's related rows and carrying the instance as the routers' hint."""
        qs: QuerySet[Any] = super().get_queryset()
        return qs._clone(
            _db=self._db or qs._db,
            _hints={**qs._hints, "instance": self.instance},
            _where=(*qs._where, self._relation()),
        )

    # -- checks -----------------------------------------------------------------

    def _own_db(self, obj: Any) -> str | None:
        from ._relations import _own_db

        return _own_db(object_session(obj) if isinstance(object_session(obj), ShardSession) else None, obj)  # type: ignore[arg-type]

    def _check_relation(self, obj: Any) -> None:
        if not isinstance(obj, self.model):
            raise TypeError(f"'{self.model.__name__}' instance expected, got {obj!r}")
        db_owner, db_obj = self._own_db(self.instance), self._own_db(obj)
        if self.prop.secondary is not None:
            allowed = self._router.allow_relation(
                obj, self.instance, db1=db_obj, db2=db_owner, relationship=self.prop.key
            )
        else:
            allowed = self._router.allow_relation(
                self.instance, obj, db1=db_owner, db2=db_obj, relationship=self.prop.key
            )
        if not allowed:
            lead = django_lead(self.instance, obj, self.prop, db_owner, db_obj)
            name = f"{type(self.instance).__name__}.{self.prop.key}"
            raise relation_error(self.instance, db_owner, obj, db_obj, name, lead=lead)

    def _target_key(self, obj: Any) -> Any:
        key = _mapper(type(obj)).primary_key_from_instance(obj)
        if any(v is None for v in key):
            raise UnsavedObjectError(
                f'Cannot add "{obj!r}": the value for its primary key is None (save it first)', model=type(obj)
            )
        return key[0]

    def _expire(self, session: ShardSession, objs: Iterable[Any] = ()) -> None:
        """The in-memory collections no longer say what the database does: reload them when next read."""
        state = instance_state(self.instance)
        if state.key is not None and self.prop.key in state.dict and self.instance in session:
            session.expire(self.instance, [self.prop.key])
        else:
            state.dict.pop(self.prop.key, None)
        back = self.prop.back_populates or (self.prop.backref if isinstance(self.prop.backref, str) else None)
        for obj in objs:
            ostate = instance_state(obj)
            if back and back in ostate.dict:
                osession = object_session(obj)
                if osession is not None and ostate.key is not None:
                    osession.expire(obj, [back])
                else:
                    ostate.dict.pop(back, None)

    def _m2m_fire(self, action: str, pk_set: builtins.set[Any] | None, using: str) -> None:
        _events.fire(
            "m2m_changed",
            type(self.instance),
            self.prop.secondary,
            instance=self.instance,
            action=action,
            model=self.model,
            pk_set=pk_set,
            using=using,
            reverse=_is_reverse(self.prop),
            relationship=self.prop.key,
            through=self.prop.secondary,
        )

    # -- writes -----------------------------------------------------------------

    def add(self, *objs: Any, bulk: bool = True) -> None:
        """Relate ``objs`` to the instance now (Django's ``add``)."""
        if self.prop.secondary is not None:
            using = _link_db(self.prop, self.instance)
            for obj in objs:
                self._check_relation(obj)
            self._m2m_write("add", using, objs)
            return
        using = _write_db(self.model, self.instance)
        for obj in objs:
            self._check_relation(obj)
        if bulk:
            pks = []
            for obj in objs:
                if instance_state(obj).key is None or db_of(obj) != using:
                    raise UnsavedObjectError(
                        f"{obj!r} instance isn't saved. Use bulk=False or save the object first.", model=type(obj)
                    )
                pks.append(self._target_key(obj))
            with _session_scope(self.instance) as session:
                session.flush()
                self._set_fk(session, using, pks, self.instance)
                self._expire(session, objs)
            return
        reverse_key = _reverse_key(self.prop)
        for obj in objs:  # bulk=False: each object saved on its own, where the routers say
            if reverse_key is not None:
                setattr(obj, reverse_key, self.instance)
            else:
                self._fill_fk(obj, self.instance)
            save(obj)

    def _fill_fk(self, obj: Any, owner: Any) -> None:
        owner_mapper = _mapper(type(owner))
        for local, remote in self.prop.local_remote_pairs or []:
            value = None if owner is None else getattr(owner, owner_mapper.get_property_by_column(local).key)
            setattr(obj, self.prop.mapper.get_property_by_column(remote).key, value)

    def _set_fk(self, session: ShardSession, using: str, pks: list[Any], owner: Any) -> None:
        owner_mapper = _mapper(type(owner)) if owner is not None else None
        values = {}
        for local, remote in self.prop.local_remote_pairs or []:
            key = self.prop.mapper.get_property_by_column(remote).key
            values[key] = None if owner is None else getattr(owner, owner_mapper.get_property_by_column(local).key)  # type: ignore[union-attr]
        if not pks:
            return
        stmt = update(self.model).where(_column(self.model, "pk").in_(pks)).values(**values)
        session.execute(stmt.execution_options(shardkit_using=using, synchronize_session=False))

    def _m2m_write(self, action: str, using: str, objs: Sequence[Any]) -> None:
        prop = self.prop
        sec: Any = prop.secondary
        owner_mapper = _mapper(type(self.instance))
        owner_values = _owner_values(self.instance, [o for o, _s in prop.synchronize_pairs], owner_mapper)
        owner_match = and_(*[s == v for (_o, s), v in zip(prop.synchronize_pairs, owner_values, strict=True)])
        target_col = (prop.secondary_synchronize_pairs or [])[0][1]
        with _session_scope(self.instance) as session:
            session.flush()  # the collection's pending in-memory changes first: reloaded below
            session.note_writes((using,))
            conn = session.connection(bind_arguments={"shard_id": using})
            if action == "clear":
                self._m2m_fire("pre_clear", None, using)
                conn.execute(sec.delete().where(owner_match))
                self._expire(session)
                self._m2m_fire("post_clear", None, using)
                return
            keys = {self._target_key(obj) for obj in objs}
            if action == "add":
                there = set(conn.execute(select(target_col).where(owner_match, target_col.in_(list(keys)))).scalars())
                missing = keys - there
                self._m2m_fire("pre_add", missing, using)
                if missing:
                    rows = []
                    for key in sorted(missing, key=repr):
                        row: dict[str, Any] = {
                            str(s.key): v for (_o, s), v in zip(prop.synchronize_pairs, owner_values, strict=True)
                        }
                        row[str(target_col.key)] = key
                        rows.append(row)
                    conn.execute(sec.insert(), rows)
                self._expire(session, objs)
                self._m2m_fire("post_add", missing, using)
            else:  # remove
                self._m2m_fire("pre_remove", keys, using)
                conn.execute(sec.delete().where(owner_match, target_col.in_(list(keys))))
                self._expire(session, objs)
                self._m2m_fire("post_remove", keys, using)

    def remove(self, *objs: Any, bulk: bool = True) -> None:
        """Unrelate ``objs`` from the instance now (a nullable foreign key is set to NULL)."""
        if self.prop.secondary is not None:
            using = _link_db(self.prop, self.instance)
            self._m2m_write("remove", using, objs)
            return
        self._require_nullable("remove")
        related = set(self.values_list("pk", flat=True)) if objs else set()
        for obj in objs:
            if self._target_key(obj) not in related:
                raise _model_error(type(self.instance), "DoesNotExist", ObjectDoesNotExist)(
                    f"{obj!r} is not related to {self.instance!r}.", model=type(obj)
                )
        self._clear_fk([self._target_key(obj) for obj in objs], objs)

    def clear(self, bulk: bool = True) -> None:
        """Unrelate every related object now."""
        if self.prop.secondary is not None:
            using = _link_db(self.prop, self.instance)
            self._m2m_write("clear", using, ())
            return
        self._require_nullable("clear")
        self._clear_fk(None, ())

    def _clear_fk(self, pks: list[Any] | None, objs: Sequence[Any]) -> None:
        using = _write_db(self.model, self.instance)
        with _session_scope(self.instance) as session:
            session.flush()
            if pks is None:
                pks = list(
                    session.scalars(
                        select(_column(self.model, "pk"))
                        .where(self._relation())
                        .execution_options(shardkit_using=using)
                    )
                )
            self._set_fk(session, using, pks, None)
            self._expire(session, objs)

    def _require_nullable(self, what: str) -> None:
        for _l, remote in self.prop.local_remote_pairs or []:
            if not remote.nullable:
                raise FieldError(
                    f"{what}() needs a nullable foreign key: {self.model.__name__}.{remote.key} is NOT NULL "
                    "(delete the objects instead)",
                    model=self.model,
                )

    def set(self, objs: Iterable[Any], bulk: bool = True, clear: bool = False) -> None:
        """Make ``objs`` exactly the related objects (Django's ``set``)."""
        objs = list(objs)
        if self.prop.secondary is not None:
            using = _link_db(self.prop, self.instance)
            if clear:
                self.clear()
                self.add(*objs)
                return
            old = set(self.db_manager(using).values_list("pk", flat=True))
            new_keys = {self._target_key(o) for o in objs}
            gone = [k for k in old if k not in new_keys]
            if gone:
                self.remove(*[self.model(**{_pk_attr(self.model): k}) for k in gone])
            self.add(*[o for o in objs if self._target_key(o) not in old])
            return
        using = _write_db(self.model, self.instance)
        if clear:
            self.clear()
            self.add(*objs, bulk=bulk)
            return
        old_objs = list(self.db_manager(using).all())
        keys = {_as_key(o) for o in objs}
        stale = [o for o in old_objs if _as_key(o) not in keys]
        if stale:
            self.remove(*stale, bulk=bulk)
        old_keys = {_as_key(o) for o in old_objs}
        self.add(*[o for o in objs if _as_key(o) not in old_keys], bulk=bulk)

    def _create_db(self) -> str:
        if self.prop.secondary is not None:  # Django asks about the instance's own model here
            return _write_db(type(self.instance), self.instance)
        return _write_db(self.model, self.instance)

    def create(self, **fields: Any) -> Any:
        """Create a related object now, on the write database, and relate it."""
        db = self._create_db()
        if self.prop.secondary is None:
            fields = {**fields, **self._fk_fields()}
        obj = super(RelatedManager, self.db_manager(db)).create(**fields)
        if self.prop.secondary is not None:
            self.add(obj)
        else:
            self._forget()
        return obj

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[Any, bool]:
        """Get the related object matching, or create and relate it; all on the write database."""
        db = self._create_db()
        if self.prop.secondary is None:
            lookups = {**lookups, **self._fk_fields()}
        obj, created = super(RelatedManager, self.db_manager(db)).get_or_create(defaults, **lookups)
        if created and self.prop.secondary is not None:
            self.add(obj)
        elif created:
            self._forget()
        return obj, created

    def _forget(self) -> None:
        """The owner's list misses what was just written: read it again when next used."""
        session = object_session(self.instance)
        if isinstance(session, ShardSession):
            session.flush()
            self._expire(session)

    def _fk_fields(self) -> dict[str, Any]:
        owner_mapper = _mapper(type(self.instance))
        pairs = self.prop.local_remote_pairs or []
        values = _owner_values(self.instance, [local for local, _r in pairs], owner_mapper)
        return {self.prop.mapper.get_property_by_column(r).key: v for (_l, r), v in zip(pairs, values, strict=True)}


_RELATED_CLASSES: dict[type[Any], type[RelatedManager]] = {}


def _is_reverse(prop: RelationshipProperty[Any]) -> bool:
    other = prop._reverse_property
    return any(o._creation_order < prop._creation_order for o in other)


def _reverse_key(prop: RelationshipProperty[Any]) -> str | None:
    for other in prop._reverse_property:
        if other.direction is MANYTOONE:
            return other.key
    return None


class RelatedList(AsyncRelatedManagerMixin, list[M]):
    """The list behind a one-to-many or many-to-many relationship of a :class:`ModelMixin` model.

    A plain SQLAlchemy collection (``append``, ``extend``, ``pop`` ... are flushed with the
    owner as usual) that also offers Django's related-manager API, which writes at once:
    ``add``, ``remove``, ``clear``, ``set``, ``create``, ``get_or_create``, ``all``, ``filter``,
    ``exclude``, ``get``, ``count()`` (no argument: a query), ``exists``, ``values_list``,
    ``update``, ``delete``, ``using``, ``db_manager()``, ``.db``.  See :class:`RelatedManager`.
    """

    @collection.remover  # type: ignore[untyped-decorator]  # what SQLAlchemy removes with (backrefs ...)
    def _sa_remove_one(self, value: Any) -> None:
        list.remove(self, value)

    def _m(self) -> RelatedManager:
        adapter = getattr(self, "_sa_adapter", None)
        if adapter is None:
            raise ShardkitError("this list is not (or no longer) the collection of an object")
        return RelatedManager.of(adapter.owner_state.obj(), adapter.attr.key)

    @property
    def manager(self) -> RelatedManager:
        """The related manager of this collection's owner and relationship."""
        return self._m()

    @property
    def db(self) -> str | None:
        return self._m().db

    def db_manager(self, using: str | None = None) -> RelatedManager:
        return self._m().db_manager(using)

    def using(self, alias: str) -> QuerySet[Any]:
        return self._m().using(alias)

    def all(self) -> QuerySet[Any]:
        return self._m().all()

    def filter(self, *criteria: Any, **lookups: Any) -> QuerySet[Any]:
        return self._m().filter(*criteria, **lookups)

    def exclude(self, *criteria: Any, **lookups: Any) -> QuerySet[Any]:
        return self._m().exclude(*criteria, **lookups)

    def order_by(self, *fields: Any) -> QuerySet[Any]:
        return self._m().order_by(*fields)

    def get(self, *criteria: Any, **lookups: Any) -> Any:
        return self._m().get(*criteria, **lookups)

    def exists(self) -> bool:
        return self._m().exists()

    def values(self, *fields: str) -> ValuesQuerySet[dict[str, Any]]:
        return self._m().values(*fields)

    def values_list(self, *fields: str, flat: bool = False, named: bool = False) -> ValuesQuerySet[Any]:
        return self._m().values_list(*fields, flat=flat, named=named)

    def update(self, **values: Any) -> int:
        return self._m().update(**values)

    def delete(self) -> int:
        return self._m().delete()

    def add(self, *objs: Any, bulk: bool = True) -> None:
        self._m().add(*objs, bulk=bulk)

    @collection.internally_instrumented  # type: ignore[untyped-decorator]
    def remove(self, *objs: Any, bulk: bool = True) -> None:
        self._m().remove(*objs, bulk=bulk)

    @collection.internally_instrumented  # type: ignore[untyped-decorator]
    def clear(self, bulk: bool = True) -> None:
        self._m().clear(bulk=bulk)

    def set(self, objs: Iterable[Any], bulk: bool = True, clear: bool = False) -> None:
        self._m().set(objs, bulk=bulk, clear=clear)

    def create(self, **fields: Any) -> Any:
        return self._m().create(**fields)

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[Any, bool]:
        return self._m().get_or_create(defaults, **lookups)

    def count(self, *value: Any) -> int:
        """``count()``: the number of related rows (a query); ``count(x)``: list.count."""
        if value:
            return list.count(self, *value)
        return self._m().count()


@event.listens_for(Mapper, "after_configured")
def _related_lists() -> None:
    """Give the list relationships of ModelMixin models the related-manager API."""
    from sqlalchemy.orm import mapperlib

    for reg in list(mapperlib._all_registries()):
        for mapper in list(reg.mappers):
            if not issubclass(mapper.class_, ModelMixin):
                continue
            for prop in mapper.relationships:
                if not prop.uselist or prop.collection_class not in (None, list) or prop.parent is not mapper:
                    continue
                if prop.lazy in ("dynamic", "write_only"):
                    continue
                impl = getattr(mapper.class_, prop.key).impl
                if isinstance(impl.collection_factory, type) and issubclass(impl.collection_factory, RelatedList):
                    continue
                impl.collection_factory = mapper.class_manager.instrument_collection_class(prop.key, RelatedList)


# -- save / delete ---------------------------------------------------------------------------------


def _snapshot(obj: Any) -> tuple[Any, ...]:
    state = instance_state(obj)
    info = state.__dict__.get("info") or {}
    return state.key, state.identity_token, info.get(_DB), info.get(_USING)


def _restore(obj: Any, snap: tuple[Any, ...]) -> None:
    """After a failed save: the object says where it was before, as Django's ``_state.db`` does."""
    from sqlalchemy.orm import make_transient_to_detached

    key, token, db, using = snap
    state = instance_state(obj)
    for name, value in ((_DB, db), (_USING, using)):
        if value is None:
            state.info.pop(name, None)
        else:
            state.info[name] = value
    state.identity_token = token
    if key is not None and state.key is None and object_session(obj) is None:
        make_transient_to_detached(obj)  # it still is the row it was loaded as


def save(obj: Any, *, using: str | None = None, force_insert: bool = False) -> None:
    """Save ``obj`` now, as Django's ``Model.save(using=..., force_insert=...)`` does."""
    snap = _snapshot(obj)
    try:
        with _session_scope(obj) as session:
            session.save(obj, using=using, force_insert=force_insert)
    except BaseException:
        _restore(obj, snap)
        raise


def delete_obj(obj: Any, *, using: str | None = None) -> None:
    """Delete ``obj`` now, from ``using`` if given, as Django's ``Model.delete(using=...)`` does."""
    with _session_scope(obj) as session:
        if using is None:
            if obj not in session:
                session.add(obj)
            session.delete(obj)
        else:
            if obj not in session and inspect(obj).key is not None:
                session.add(obj)
            session.delete_from(obj, using)


class _ModelState:
    """What Django keeps in ``obj._state``, read from shardkit: ``db`` and ``adding``."""

    __slots__ = ("_obj",)

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    @property
    def db(self) -> str | None:
        return db_of(self._obj)

    @property
    def adding(self) -> bool:
        return instance_state(self._obj).key is None


class ModelMixin(AsyncModelMixin):
    """Gives a declarative model Django's ``objects``, ``save()``, ``delete()``, ``pk``,
    ``refresh_from_db()`` and related managers.

    ::

        class Base(shardkit.ModelMixin, DeclarativeBase): ...
        class User(Base): ...
        User.objects.filter(name="mario").using("credentials").first()

    Each subclass gets its own ``DoesNotExist`` and ``MultipleObjectsReturned``.  A nested
    ``class Meta: ordering = ("name",)`` gives querysets a default order, as in Django.
    """

    objects: ClassVar[Manager[Any]] = Manager()
    DoesNotExist: ClassVar[type[ObjectDoesNotExist]] = ObjectDoesNotExist
    MultipleObjectsReturned: ClassVar[type[MultipleObjectsReturned]] = MultipleObjectsReturned

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.DoesNotExist = type("DoesNotExist", (cls.DoesNotExist,), {"__module__": cls.__module__})
        cls.MultipleObjectsReturned = type(
            "MultipleObjectsReturned", (cls.MultipleObjectsReturned,), {"__module__": cls.__module__}
        )

    @property
    def _state(self) -> _ModelState:
        """Django's ``obj._state``: ``.db`` is :func:`shardkit.db_of`, ``.adding`` says never saved."""
        return _ModelState(self)

    def __getattr__(self, name: str) -> Any:
        # Django's get_next_by_<field>() / get_previous_by_<field>(); anything else is missing
        for prefix, method in (("get_next_by_", "get_next_by"), ("get_previous_by_", "get_previous_by")):
            if name.startswith(prefix) and len(name) > len(prefix):
                field = name[len(prefix) :]
                return lambda **lookups: getattr(self, method)(field, **lookups)
        return object.__getattribute__(self, name)  # the usual AttributeError (a descriptor's own)

    @property
    def pk(self) -> Any:
        """The primary key value (one-column keys)."""
        return getattr(self, _pk_attr(type(self)))

    @pk.setter
    def pk(self, value: Any) -> None:
        setattr(self, _pk_attr(type(self)), value)

    def __str__(self) -> str:
        state = instance_state(self)  # never loads: repr() of an expired object must not query
        key = state.key[1][0] if state.key is not None else state.dict.get(_pk_attr(type(self)))
        return f"{type(self).__name__} object ({key})"

    def __repr__(self) -> str:
        try:
            text = str(self)
        except Exception:  # a __str__ reading a field that is not set: repr() must not fail
            text = ModelMixin.__str__(self)
        return f"<{type(self).__name__}: {text}>"

    def save(self, using: str | None = None, force_insert: bool = False) -> None:
        """Write this object now: to ``using`` if given, else where the routers say.  A new
        object whose primary key is set updates the row with that key if there is one, else
        is inserted; ``force_insert=True`` always inserts it (as Django's)."""
        save(self, using=using, force_insert=force_insert)

    def delete(self, using: str | None = None) -> None:
        """Delete this object now: from ``using`` if given, else from where it lives."""
        delete_obj(self, using=using)

    def get_next_by(self, field: str, **lookups: Any) -> Any:
        """The next object by ``field`` (then primary key), on this object's database:
        Django's ``get_next_by_<field>()``.  :raises DoesNotExist: there is none."""
        return self._adjacent(field, lookups, "gt")

    def get_previous_by(self, field: str, **lookups: Any) -> Any:
        """The previous object by ``field`` (then primary key), on this object's database."""
        return self._adjacent(field, lookups, "lt")

    def _adjacent(self, field: str, lookups: dict[str, Any], op: str) -> Any:
        cls = type(self)
        value, pk = getattr(self, field), self.pk
        col, pk_col = _column(cls, field), _column(cls, "pk")
        after = (
            (col > value) | ((col == value) & (pk_col > pk))
            if op == "gt"
            else ((col < value) | ((col == value) & (pk_col < pk)))
        )
        prefix = "" if op == "gt" else "-"
        qs = cls.objects.using(db_of(self) or "default").filter(after, **lookups)
        return qs.order_by(f"{prefix}{field}", f"{prefix}pk").first() or qs.get(after)

    def refresh_from_db(self, using: str | None = None) -> None:
        """Reload every column from ``using``, else from ``db_for_read(Model, instance=self)``
        (by default the object's own database); the object's db becomes that alias."""
        cls = type(self)
        alias = using or _str_or_none(_cluster().router.db_for_read(cls, instance=self)) or db_of(self)
        state = instance_state(self)
        pk = _mapper(cls).primary_key_from_instance(self)
        with _session_scope(self) as session:
            if self not in session:
                session.add(self)
            stmt = (
                select(cls)
                .where(_column(cls, "pk") == pk[0])
                .execution_options(shardkit_using=alias, populate_existing=True)
            )
            if alias is not None and state.key is not None and state.key[2] != alias:
                # the row of another database: read it into a fresh object, copy the columns over
                other = session.scalars(stmt).one()
                for prop in _mapper(cls).column_attrs:
                    from sqlalchemy.orm.attributes import set_committed_value

                    set_committed_value(self, prop.key, getattr(other, prop.key))
                session.expunge(other)
                state.info[_DB] = alias
                return
            session.scalars(stmt).one()
