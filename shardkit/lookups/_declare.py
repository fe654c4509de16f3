"""Declaring lookups: ``__lookups__`` on a model, or ``HashRingRouter(lookups=...)``.

Each lookup of a model's column gets a *lookup table* in the model's MetaData, mapped in the
model's registry by a small class sharded by the lookup value (``__shard_key__ = "value"``),
so every :class:`~shardkit.ring.HashRingRouter` places it on the ring like any sharded table:
``create_all`` / ``shardkit migrate`` create it on the ring's shards, and a reshard moves its
rows with the others.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Column, Table, event, inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper

from ..errors import ConfigError

__all__ = ["DEFAULT_GRACE", "Lookup", "declare", "lookup_for", "lookups_of", "registered", "table_name_for"]

DEFAULT_GRACE = 10.0
"""Seconds a unique lookup whose row is missing stays reserved before another row may take it."""

_OPTIONS = frozenset({"unique", "grace"})
_lock = threading.RLock()
_by_model: dict[type[Any], dict[str, Lookup]] = {}
_resolved: dict[type[Any], dict[str, Lookup]] = {}  # model (with its bases' lookups) -> lookups
_all: list[Lookup] = []


@dataclass(eq=False)
class Lookup:
    """One lookup: ``model.attr`` value -> the row's shard key, kept in ``table``.

    :ivar model: the mapped class whose column is looked up.
    :ivar attr: the attribute name of the looked-up column.
    :ivar unique: values are unique across the cluster.
    :ivar key_attr: the model's shard-key attribute.
    :ivar table: the lookup table (columns ``value``, ``shard_key``, ``created_ms``).
    :ivar cls: the class mapping ``table`` (sharded by ``value``).
    :ivar grace: seconds before a unique value whose row is missing can be taken over.
    """

    model: type[Any]
    attr: str
    unique: bool
    key_attr: str
    column: Any
    key_column: Any
    table: Table
    cls: type[Any]
    grace: float = DEFAULT_GRACE
    lock_ns: int = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(self.table.name.encode(), digest_size=4).digest()
        self.lock_ns = int.from_bytes(digest, "big") & 0x7FFFFFFF

    @property
    def plain_types(self) -> bool:
        """Whether the value and the shard key are ints or strings (the driver takes them as they are:
        the raw, one-round-trip paths of :mod:`shardkit.lookups._store` apply)."""
        found = self.__dict__.get("_plain")
        if found is None:
            try:
                kinds = {self.column.type.python_type, self.key_column.type.python_type}
            except NotImplementedError:
                kinds = {object}
            found = self.__dict__["_plain"] = kinds <= {int, str}
        return bool(found)

    @property
    def label(self) -> str:
        """``Model.attr``, as messages and the CLI name a lookup."""
        return f"{self.model.__name__}.{self.attr}"

    def __repr__(self) -> str:
        return f"<Lookup {self.label} unique={self.unique} table={self.table.name}>"


def table_name_for(table_name: str, attr: str) -> str:
    """The lookup table's name: ``shardkit_lookup_<table>_<column>`` (hashed down to 63 characters)."""
    name = f"shardkit_lookup_{table_name}_{attr}"
    if len(name) > 63:
        digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        name = f"{name[:54]}_{digest}"
    return name


def _key_attr_of(model: type[Any], mapper: Any, explicit: str | None) -> str:
    if explicit:
        return explicit
    attr = getattr(model, "__shard_key__", None)
    if isinstance(attr, str) and attr:
        return attr
    pk = list(mapper.local_table.primary_key.columns) if isinstance(mapper.local_table, Table) else []
    if len(pk) == 1:
        for prop_col_key, col in mapper.columns.items():
            if col is pk[0]:
                return str(prop_col_key)
    raise ConfigError(
        f"{model.__name__} declares lookups but has no __shard_key__ (and no single-column primary key)",
        model=model,
    )


def _column_of(mapper: Any, model: type[Any], attr: str) -> Any:
    try:
        return mapper.columns[attr]
    except KeyError:
        raise ConfigError(
            f"lookup {model.__name__}.{attr}: no such mapped column", model=model, attribute=attr
        ) from None


def _copy_type(column: Any) -> Any:
    return column.type.copy() if hasattr(column.type, "copy") else column.type


def declare(
    model: type[Any], attr: str, *, unique: bool = False, grace: float = DEFAULT_GRACE, key_attr: str | None = None
) -> Lookup:
    """Declare a lookup on ``model.attr`` (what ``__lookups__`` and ``HashRingRouter(lookups=)`` do).

    Declaring the same lookup again returns the first one (options must agree).

    :raises ConfigError: not a mapped class, no such column, or conflicting options.
    """
    with _lock:
        known = _by_model.get(model, {}).get(attr)
        if known is not None:
            if known.unique != bool(unique):
                raise ConfigError(f"lookup {known.label} declared twice with different options", model=model)
            return known
        try:
            mapper: Any = inspect(model)
        except NoInspectionAvailable:
            raise ConfigError(f"lookups need a mapped class, not {model!r}", model=model) from None
        table = mapper.local_table
        if not isinstance(table, Table):
            raise ConfigError(f"{model.__name__} is not mapped to a Table: it cannot have lookups", model=model)
        key_attr = _key_attr_of(model, mapper, key_attr)
        column = _column_of(mapper, model, attr)
        key_column = _column_of(mapper, model, key_attr)
        if column is key_column:
            raise ConfigError(f"{model.__name__}.{attr} is the shard key: it needs no lookup", model=model)
        name = table_name_for(table.name, attr)
        metadata = table.metadata
        full = f"{table.schema}.{name}" if table.schema else name
        ltable = metadata.tables.get(full)
        if ltable is None:
            pk_value = Column("value", _copy_type(column), primary_key=True, autoincrement=False)
            pk_key = Column(
                "shard_key", _copy_type(key_column), primary_key=not unique, nullable=False, autoincrement=False
            )
            ltable = Table(
                name,
                metadata,
                pk_value,
                pk_key,
                Column("created_ms", BigInteger, nullable=False),
                schema=table.schema,
                info={"shardkit_lookup": f"{model.__name__}.{attr}"},
            )
        cls = type(
            f"{model.__name__}_{attr}_Lookup",
            (),
            {"__shard_key__": "value", "__module__": __name__, "__doc__": f"Lookup rows of {model.__name__}.{attr}."},
        )
        mapper.registry.map_imperatively(cls, ltable)
        lookup = Lookup(
            model=model,
            attr=attr,
            unique=bool(unique),
            key_attr=key_attr,
            column=column,
            key_column=key_column,
            table=ltable,
            cls=cls,
            grace=float(grace),
        )
        cls.__shardkit_lookup__ = lookup  # type: ignore[attr-defined]
        _by_model.setdefault(model, {})[attr] = lookup
        _all.append(lookup)
        _resolved.clear()
        return lookup


def _options(model: type[Any], attr: str, options: Any) -> dict[str, Any]:
    if options is None or options is True:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"lookup {model.__name__}.{attr}: options must be a dict, not {options!r}", model=model)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(
            f"lookup {model.__name__}.{attr}: unknown option(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_OPTIONS))})",
            model=model,
        )
    return dict(options)


def declare_all(model: type[Any], spec: Any, *, key_attr: str | None = None) -> list[Lookup]:
    """Declare every lookup of a ``__lookups__``-style spec: ``{"email": {"unique": True}, ...}``
    (a list of attribute names means non-unique lookups)."""
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Mapping):
        spec = dict.fromkeys(spec)
    return [declare(model, attr, key_attr=key_attr, **_options(model, attr, opts)) for attr, opts in spec.items()]


@event.listens_for(Mapper, "after_mapper_constructed")
def _on_mapped(mapper: Mapper[Any], class_: type[Any]) -> None:
    spec = class_.__dict__.get("__lookups__")
    if spec:
        declare_all(class_, spec)


def lookups_of(model: Any) -> dict[str, Lookup]:
    """The lookups of ``model`` (attribute name -> :class:`Lookup`), its bases' included."""
    try:
        return _resolved[model]
    except (KeyError, TypeError):
        pass
    if not isinstance(model, type):
        return {}
    found: dict[str, Lookup] = {}
    for base in reversed(model.__mro__):
        found.update(_by_model.get(base, {}))
    with _lock:
        _resolved[model] = found
    return found


def lookup_for(name: str) -> Lookup:
    """The lookup named ``"table.column"`` (``"users.email"``) or ``"Model.attr"`` (``"User.email"``).

    A table name wins; a model name that several declared lookups share is refused (name the table).

    :raises ConfigError: no such lookup, or an ambiguous model name.
    """
    owner, _, attr = name.rpartition(".")
    by_table = [
        lk for lk in _all if lk.attr == attr and owner in (lk.model.__table__.name, lk.model.__table__.fullname)
    ]
    if len(by_table) == 1:
        return by_table[0]
    by_model = [lk for lk in _all if lk.attr == attr and lk.model.__name__ == owner]
    if len(by_model) == 1:
        return by_model[0]
    if by_model:
        tables = ", ".join(f"{lk.model.__table__.name}.{attr}" for lk in by_model)
        raise ConfigError(f"lookup name {name!r} is ambiguous: name the table ({tables})")
    known = ", ".join(sorted(f"{lk.label} ({lk.model.__table__.name}.{lk.attr})" for lk in _all)) or "none"
    raise ConfigError(f"no lookup named {name!r} (declared: {known})")


def registered() -> list[Lookup]:
    """Every declared lookup, in declaration order."""
    return list(_all)


def any_declared() -> bool:
    return bool(_all)


def resolve_target(target: Any) -> type[Any]:
    """A mapped class from a class or a table name (``HashRingRouter(lookups={"users": ...})``)."""
    if isinstance(target, type):
        return target
    from .._sqla import all_registries

    name = target.fullname if isinstance(target, Table) else str(target)
    for reg in all_registries():
        for mapper in reg.mappers:
            table = mapper.local_table
            if isinstance(table, Table) and name in (table.name, table.fullname) and mapper.inherits is None:
                return mapper.class_  # type: ignore[no-any-return]
    raise ConfigError(f"lookups for {name!r}: no mapped class maps that table")


def declare_router_lookups(router: Any, lookups: Mapping[Any, Any]) -> list[Lookup]:
    """``HashRingRouter(lookups={User or "users": {"email": {"unique": True}}})``: declare each one,
    with the router's own shard key of the model."""
    out: list[Lookup] = []
    for target, spec in lookups.items():
        model = resolve_target(target)
        column = router.shard_key_column(model) if hasattr(router, "shard_key_column") else None
        key_attr = column[0] if column is not None else None
        out.extend(declare_all(model, spec, key_attr=key_attr))
    return out
