"""Django's model API over SQLAlchemy: ``objects``, ``using()``, ``db_manager()``, ``save(using=)``.

Add :class:`ModelMixin` to a declarative base and every model gets::

    User.objects.filter(User.name.startswith("a")).using("credentials")
    User.objects.filter(name__startswith="a", score__gte=10).order_by("-score")[:10]
    User.objects.db_manager("credentials").create_user("mario")   # your own manager method
    user.save(using="other"); user.delete(using="other")

Which session and cluster are used
----------------------------------
* An object that belongs to a session is saved and deleted through it.
* Inside ``with cluster.session() as s:``, every manager call uses ``s`` and only
  flushes: you commit (Django's ``transaction.atomic()``).
* Anywhere else, calls use the *active* cluster's per-thread autocommit session
  and commit at once, as Django does by default.  Activate a cluster with
  ``cluster.activate()`` at start-up; without one a :class:`ConfigError` says so.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, TypeVar, overload

from sqlalchemy import ColumnElement, and_, delete, func, inspect, not_, select, update
from sqlalchemy.orm import Mapper, object_session
from sqlalchemy.orm.attributes import InstrumentedAttribute

from ._cluster import get_active_cluster
from ._session import ShardSession, current_session
from .errors import ShardkitError

__all__ = [
    "FieldError",
    "Manager",
    "ModelMixin",
    "MultipleObjectsReturned",
    "ObjectDoesNotExist",
    "QuerySet",
]

M = TypeVar("M")


class ObjectDoesNotExist(ShardkitError, LookupError):
    """``get()`` found no row. Each model has its own subclass, ``Model.DoesNotExist``."""


class MultipleObjectsReturned(ShardkitError, LookupError):
    """``get()`` found more than one row. Each model has ``Model.MultipleObjectsReturned``."""


class FieldError(ShardkitError, AttributeError):
    """A keyword lookup names a field or a lookup the model does not have."""


@contextmanager
def _session_scope(obj: Any = None) -> Iterator[ShardSession]:
    """The session a manager call runs in; commits when it is the autocommit one."""
    session: Any = object_session(obj) if obj is not None else None
    if session is None:
        session = current_session()
    if session is None:
        session = get_active_cluster().autocommit_session()
    if not isinstance(session, ShardSession):
        raise ShardkitError(f"{type(obj).__name__} belongs to a plain SQLAlchemy session, not a shardkit session")
    autocommit = bool(getattr(session, "_shardkit_autocommit", False))
    try:
        yield session
    except BaseException:
        if autocommit:
            session.rollback()
        raise
    else:
        if autocommit:
            session.commit()
        else:
            session.flush()


_LOOKUPS: dict[str, Any] = {
    "exact": lambda c, v: c.is_(None) if v is None else c == v,
    "iexact": lambda c, v: func.lower(c) == func.lower(v),
    "ne": lambda c, v: c.is_not(None) if v is None else c != v,
    "in": lambda c, v: c.in_(list(v)),
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
}


def _column(model: type[Any], name: str) -> Any:
    mapper: Mapper[Any] = inspect(model)
    if name == "pk":
        if len(mapper.primary_key) != 1:
            raise FieldError(f"{model.__name__} has a composite primary key: 'pk' is ambiguous", model=model)
        name = mapper.get_property_by_column(mapper.primary_key[0]).key
    attr = getattr(model, name, None)
    if not isinstance(attr, InstrumentedAttribute) or name not in mapper.column_attrs:
        fields = ", ".join(sorted(p.key for p in mapper.column_attrs))
        raise FieldError(f"{model.__name__} has no field {name!r} (fields: {fields})", model=model, field=name)
    return attr


def _criteria(model: type[Any], args: Sequence[Any], kwargs: dict[str, Any]) -> list[ColumnElement[bool]]:
    criteria: list[ColumnElement[bool]] = list(args)
    for key, value in kwargs.items():
        name, _, lookup = key.partition("__")
        lookup = lookup or "exact"
        op = _LOOKUPS.get(lookup)
        if op is None:
            raise FieldError(
                f"unsupported lookup {lookup!r} in {key!r} for {model.__name__} "
                f"(supported: {', '.join(sorted(_LOOKUPS))})",
                model=model,
                field=name,
            )
        criteria.append(op(_column(model, name), value))
    return criteria


class QuerySet(Generic[M]):
    """A lazy, chainable query of one model, in Django's style.

    Nothing runs until the queryset is iterated, sliced with an index, or asked
    for ``len``, ``get``, ``first``, ``count`` ...  Every method returns a new queryset.
    """

    def __init__(self, model: type[M], *, using: str | None = None, manager: Manager[M] | None = None) -> None:
        self.model = model
        self._db = using
        self._manager = manager
        self._where: tuple[ColumnElement[bool], ...] = ()
        self._order: tuple[Any, ...] = ()
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

    # -- chaining --------------------------------------------------------------

    def using(self, alias: str) -> QuerySet[M]:
        """Run this queryset on ``alias`` (chainable; the last call wins)."""
        return self._clone(_db=alias)

    def all(self) -> QuerySet[M]:
        return self._clone()

    def filter(self, *criteria: Any, **lookups: Any) -> QuerySet[M]:
        """Keep rows matching SQLAlchemy criteria and Django lookups (``name__startswith="a"``)."""
        return self._clone(_where=(*self._where, *_criteria(self.model, criteria, lookups)))

    def exclude(self, *criteria: Any, **lookups: Any) -> QuerySet[M]:
        return self._clone(_where=(*self._where, not_(and_(*_criteria(self.model, criteria, lookups)))))

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

    # -- the statement ---------------------------------------------------------

    @property
    def db(self) -> str | None:
        """The alias this queryset was placed on with ``using()``, if any."""
        return self._db

    def _apply(self, stmt: Any) -> Any:
        if self._where:
            stmt = stmt.where(*self._where)
        if self._db is not None:
            stmt = stmt.execution_options(shardkit_using=self._db)
        return stmt

    @property
    def statement(self) -> Any:
        """The SQLAlchemy ``Select`` this queryset runs."""
        stmt = self._apply(select(self.model))
        if self._order:
            stmt = stmt.order_by(*self._order)
        if self._options:
            stmt = stmt.options(*self._options)
        if self._offset:
            stmt = stmt.offset(self._offset)
        if self._limit is not None:
            stmt = stmt.limit(self._limit)
        return stmt

    def __repr__(self) -> str:
        where = " AND ".join(str(c) for c in self._where) or "all"
        return f"<QuerySet {self.model.__name__} {where}{f' using {self._db!r}' if self._db else ''}>"

    # -- evaluation --------------------------------------------------------------

    def _fetch(self) -> list[M]:
        if self._cache is None:
            with _session_scope() as session:
                self._cache = list(session.scalars(self.statement).unique())
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
        mapper: Mapper[Any] = inspect(self.model)
        return tuple(getattr(self.model, mapper.get_property_by_column(c).key) for c in mapper.primary_key)

    def first(self) -> M | None:
        """The first object (ordered by primary key when unordered), or ``None``."""
        qs = self if self._order else self._clone(_order=tuple(c.asc() for c in self._pk_order()))
        rows = qs[:1]._fetch()
        return rows[0] if rows else None

    def last(self) -> M | None:
        if self._limit is not None or self._offset:
            raise ShardkitError("cannot reverse a query once a slice has been taken (as in Django)", model=self.model)
        order = self._order or tuple(c.asc() for c in self._pk_order())
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
        stmt = self._apply(select(func.count()).select_from(self.model))
        with _session_scope() as session:
            return int(session.execute(stmt).scalar_one())

    def exists(self) -> bool:
        return self[:1]._fetch() != []

    def create(self, **fields: Any) -> M:
        """Make a ``Model(**fields)`` and save it (on this queryset's alias, if placed)."""
        obj = self.model(**fields)
        save(obj, using=self._db)
        return obj

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[M, bool]:
        try:
            return self.get(**lookups), False
        except ObjectDoesNotExist:
            return self.create(**{**lookups, **(defaults or {})}), True

    def update(self, **values: Any) -> int:
        """``UPDATE`` the matching rows; returns the number of rows changed."""
        stmt = self._apply(update(self.model)).values(**values)
        with _session_scope() as session:
            result = session.execute(stmt.execution_options(synchronize_session="fetch"))
            return int(getattr(result, "rowcount", 0) or 0)

    def delete(self) -> int:
        """``DELETE`` the matching rows; returns the number of rows deleted."""
        stmt = self._apply(delete(self.model))
        with _session_scope() as session:
            result = session.execute(stmt.execution_options(synchronize_session="fetch"))
            return int(getattr(result, "rowcount", 0) or 0)


def _reverse(order: Any) -> Any:
    modifier = getattr(order, "modifier", None)
    element = getattr(order, "element", order)
    if modifier is not None and getattr(modifier, "__name__", "") == "desc_op":
        return element.asc()
    return element.desc()


def _model_error(model: type[Any], name: str, default: type[ShardkitError]) -> type[ShardkitError]:
    err = getattr(model, name, default)
    return err if isinstance(err, type) and issubclass(err, ShardkitError) else default


class Manager(Generic[M]):
    """Django's model manager: the entry point of queries, ``Model.objects``.

    Subclass it to add methods (``create_user()`` ...); they work through
    :meth:`db_manager` too, since ``self`` is then bound to that alias.
    """

    def __init__(self) -> None:
        self.model: type[M] | None = None
        self.name = "objects"
        self._db: str | None = None
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
        """The alias this manager is bound to by :meth:`db_manager`, if any."""
        return self._db

    def db_manager(self, using: str) -> Manager[M]:
        """A copy of this manager bound to ``using``: its querysets and ``create()`` go there."""
        clone = copy.copy(self)
        clone._db = using
        return clone

    def get_queryset(self) -> QuerySet[M]:
        if self.model is None:
            raise ShardkitError("this manager is not attached to a model")
        return QuerySet(self.model, using=self._db, manager=self)

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

    def create(self, **fields: Any) -> M:
        return self.get_queryset().create(**fields)

    def get_or_create(self, defaults: dict[str, Any] | None = None, **lookups: Any) -> tuple[M, bool]:
        return self.get_queryset().get_or_create(defaults, **lookups)


def save(obj: Any, *, using: str | None = None) -> None:
    """Save ``obj`` now, as Django's ``Model.save(using=...)`` does."""
    with _session_scope(obj) as session:
        session.save(obj, using=using)


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


class ModelMixin:
    """Gives a declarative model Django's ``objects``, ``save()`` and ``delete()``.

    ::

        class Base(shardkit.ModelMixin, DeclarativeBase): ...
        class User(Base): ...
        User.objects.filter(name="mario").using("credentials").first()

    Each subclass gets its own ``DoesNotExist`` and ``MultipleObjectsReturned``.
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

    def save(self, using: str | None = None) -> None:
        """Write this object now: to ``using`` if given, else where the routers say."""
        save(self, using=using)

    def delete(self, using: str | None = None) -> None:
        """Delete this object now: from ``using`` if given, else from where it lives."""
        delete_obj(self, using=using)
