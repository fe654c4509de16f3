"""HashRingRouter: route sharded models by their shard key through a :class:`HashRing`.

A model is *sharded* when it names its shard key, either with a class
attribute ``__shard_key__ = "user_id"`` (an attribute name) or through the
router's ``shard_keys={User: "id", "orders": "user_id"}`` mapping (keys are
mapped classes or table names).  Every other model gets ``None`` from every
method, so the next router in the chain decides.

* **Writes** route by the instance's shard key value.  When the shard key is
  the model's own integer primary key and is still ``None``, an id is taken
  from the cluster-wide generator (:mod:`shardkit.ids`) and set first.
* **Reads** route by the statement's WHERE clause: ``col == value``,
  ``value == col`` and ``col.in_([...])`` on the shard key column, found in
  the top-level AND chain (conditions under OR / NOT are ignored).  One value
  gives one alias; an ``IN`` list spanning several shards gives a
  :class:`~shardkit.typing.ShardTargets` whose per-shard statement keeps only
  that shard's values; no usable condition gives every shard.  Bound values
  given only at execution time (``bindparam("x")`` without a value) are not
  seen, so such reads go to every shard.
* **Co-location**: a child whose shard key is its foreign key to a parent
  (``Order.__shard_key__ = "user_id"``) lives with its parent; a new child
  whose key is still unset takes it from the parent it is attached to.
* **Reference tables** (``__reference_table__ = True`` or ``reference_tables=``)
  are present in full on every shard: reads go to one shard, relations to
  them are always allowed, statement writes (``insert``/``update``/``delete``)
  go to every shard, and a unit-of-work write of one object is refused with
  a clear error (one object cannot be in every database at once).
* Keys are converted to the shard key column's Python type before they are
  hashed, as the database converts them (``"5"`` -> ``5`` for an integer
  column, a UUID's text -> ``uuid.UUID``); a value the column would not accept
  (``"abc"`` or ``5.5`` for an integer key) is an
  :class:`~shardkit.errors.InvalidKeyError` naming the model, the column and
  the value.  This holds for instances (which then hold the converted key),
  bulk rows, ``shard_key=`` hints, ``==`` and ``IN`` conditions.  See
  :mod:`shardkit.ring._coerce` for the table of conversions.

Limits: only the shard key column of the model's own table (or an alias of
it) is looked at; keys reached through joins or subqueries are not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, Grouping
from sqlalchemy.sql.visitors import replacement_traverse

from .. import _sqla
from ..errors import ConfigError, InvalidKeyError, RoutingError
from ..typing import ShardTargets
from ._coerce import coercer_for

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

    from ._ring import HashRing

__all__ = ["HashRingRouter"]


class _Spec:
    """What the router knows about one sharded model or table."""

    __slots__ = ("attr", "column", "convert", "exact", "int_pk", "label", "model", "table")

    def __init__(self, model: Any, label: str, attr: str, table: Table | None, column: Any, int_pk: bool) -> None:
        self.model = model
        self.label = label
        self.attr = attr
        self.table = table
        self.column = column
        self.int_pk = int_pk
        # the key's converter, resolved once: a value of type `exact` is hashed as it is
        coercer = coercer_for(column, model=model, label=label, attr=attr)
        self.exact = coercer.exact
        self.convert = coercer.convert

    def key(self, value: Any) -> Any:
        """``value`` as the column's Python type (see :mod:`shardkit.ring._coerce`)."""
        convert = self.convert
        if convert is None or type(value) is self.exact:
            return value
        return convert(value)

    def keys(self, values: list[Any]) -> list[Any]:
        """:meth:`key` of each value; the list itself when nothing needs converting."""
        convert = self.convert
        if convert is None or (self.exact is not None and set(map(type, values)) <= {self.exact}):
            return values
        return [convert(v) for v in values]

    def refused(self, exc: InvalidKeyError) -> InvalidKeyError:
        """The ring's refusal of a key, told again naming this model and column (once)."""
        if getattr(exc, "model", None) is not None:
            return exc
        column = getattr(self.column, "name", None) or self.attr
        key = getattr(exc, "key", None)
        reason = getattr(exc, "reason", None) or str(exc)
        return InvalidKeyError(
            f"invalid shard key for {self.label}.{self.attr} (column {column!r}): {exc}",
            model=self.model,
            attribute=self.attr,
            column=column,
            key=key,
            key_type=type(key),
            reason=reason,
        )


class _Constraint:
    """One shard-key condition of the WHERE clause: the values it allows."""

    __slots__ = ("bind", "values")

    def __init__(self, values: list[Any], bind: BindParameter[Any] | None) -> None:
        self.values = values
        self.bind = bind  # the expanding IN parameter, to rewrite per shard


_UNSEEN: Any = object()
_SHAPES_KEPT = 2048  # statement shapes remembered per router (forgotten all at once beyond)


def _changed(old: Any, new: Any) -> bool:
    """Whether converting a key changed it (an equal value of the same type is left in place)."""
    return new is not old and (type(new) is not type(old) or bool(new != old))


def _is_int_type(column: Any) -> bool:
    try:
        return column.type.python_type is int
    except (NotImplementedError, AttributeError):
        return False


class HashRingRouter:
    """A router for sharded models, backed by a :class:`~shardkit.ring.HashRing`.

    :param ring: the ring that maps shard keys to aliases.
    :param shard_keys: ``{Model or table name: attribute name}`` for models
        that do not declare ``__shard_key__`` (the mapping wins over the attribute).
    :param ids: the id source for integer primary-key shard keys that are
        ``None`` at write time: an :class:`~shardkit.ids.IdGenerator` or any
        zero-argument callable returning an int (default: :func:`shardkit.ids.next_id`).
    :param reference_tables: models (or table names) present in full on every shard,
        like countries or plans; a model can also say ``__reference_table__ = True``.
    :param lookups: lookup indexes of models this router shards, as ``__lookups__`` declares
        them: ``{User or "users": {"email": {"unique": True}}}`` (see :mod:`shardkit.lookups`).

    >>> router = HashRingRouter(HashRing(["s0", "s1"]), shard_keys={"orders": "user_id"})
    >>> router.shard_for("orders", 42) in ("s0", "s1")
    True
    """

    def __init__(
        self,
        ring: HashRing,
        shard_keys: Mapping[type[Any] | str, str] | None = None,
        ids: Callable[[], int] | None = None,
        reference_tables: Iterable[type[Any] | str] = (),
        lookups: Mapping[type[Any] | str, Any] | None = None,
    ) -> None:
        self.ring = ring
        self._reference: set[Any] = set(reference_tables)
        self._reference_cache: dict[Any, bool] = {}
        # (spec, statement shape) -> where its shard-key conditions' parameters sit (see _constraints)
        self._shapes: dict[tuple[_Spec, Any], tuple[tuple[bool, int], ...] | None] = {}
        self._model_keys: dict[type[Any], str] = {}
        self._table_keys: dict[str, str] = {}
        for target, attr in (shard_keys or {}).items():
            if not isinstance(attr, str) or not attr:
                raise ConfigError(f"shard key of {target!r} must be an attribute name, not {attr!r}")
            if isinstance(target, str):
                self._table_keys[target] = attr
            elif isinstance(target, Table):
                self._table_keys[target.fullname] = attr
            elif isinstance(target, type):
                self._model_keys[target] = attr
            else:
                raise ConfigError(f"shard_keys keys must be mapped classes or table names, not {target!r}")
        if ids is None:
            from ..ids import next_id

            ids = next_id
        self._ids = ids
        self._specs: dict[Any, _Spec | None] = {}
        if lookups:  # shardkit.lookups: {Model or table name: {"email": {"unique": True}}}, see docs/lookups.md
            from ..lookups import declare_router_lookups

            declare_router_lookups(self, lookups)

    # --------------------------------------------------------------- introspection
    def is_sharded(self, model: Any) -> bool:
        """True when ``model`` (a mapped class, a Table or a table name) has a shard key."""
        return self._spec(model) is not None

    def shard_key_column(self, model_or_table: Any) -> tuple[str, Any] | None:
        """``(attribute name, Column)`` of a sharded model's (or table's) shard key; ``None`` if not sharded."""
        spec = self._spec(model_or_table)
        return None if spec is None else (spec.attr, spec.column)

    def shard_for(self, model_or_table: Any, key: Any) -> str:
        """The alias that holds the rows of ``model_or_table`` whose shard key is ``key``.

        :raises RoutingError: the model or table is not sharded.
        :raises InvalidKeyError: ``key`` is not a valid shard key.
        """
        spec = self._spec(model_or_table)
        if spec is None:
            raise RoutingError(f"{model_or_table!r} is not sharded: it has no shard key", model=model_or_table)
        try:
            return self.ring.get(spec.key(key))
        except InvalidKeyError as exc:
            raise spec.refused(exc) from exc

    def ring_key(self, model_or_table: Any, value: Any) -> Any:
        """``value`` converted to the Python type of the shard key column, as the ring hashes it.

        ``"5"`` becomes ``5`` for an integer key, a UUID's text a :class:`uuid.UUID` for a
        ``Uuid`` key, and so on (see :mod:`shardkit.ring._coerce`); a value the column would
        not accept is refused.  Use it to compare keys the way the router does.

        :raises RoutingError: the model or table is not sharded.
        :raises InvalidKeyError: the column would not accept ``value``.
        """
        spec = self._spec(model_or_table)
        if spec is None:
            raise RoutingError(f"{model_or_table!r} is not sharded: it has no shard key", model=model_or_table)
        return spec.key(value)

    def _spec(self, model: Any) -> _Spec | None:
        cache_key: Any = model
        try:
            return self._specs[cache_key]
        except KeyError:
            pass
        except TypeError:  # unhashable: not a model
            return None
        spec = self._build_spec(model)
        self._specs[cache_key] = spec
        return spec

    def _build_spec(self, model: Any) -> _Spec | None:
        if isinstance(model, str):
            attr = self._table_keys.get(model)
            return None if attr is None else _Spec(model, model, attr, None, None, False)
        if isinstance(model, Table):
            attr = self._table_keys.get(model.fullname) or self._table_keys.get(model.name)
            if attr is None:
                for cls, cls_attr in self._model_keys.items():
                    if getattr(cls, "__table__", None) is model:
                        attr = cls_attr
                if attr is None:
                    return None
            column = model.c.get(attr)
            return _Spec(model, model.fullname, attr, model, column, self._int_pk(model, column))
        if not isinstance(model, type):
            return None
        try:
            mapper: Any = inspect(model)
        except NoInspectionAvailable:
            mapper = None
        table = getattr(mapper, "local_table", None) if mapper is not None else None
        if not isinstance(table, Table):
            table = None
        attr = self._model_keys.get(model)
        if attr is None:
            for cls, cls_attr in self._model_keys.items():
                if issubclass(model, cls):
                    attr = cls_attr
                    break
        if attr is None and table is not None:
            attr = self._table_keys.get(table.fullname) or self._table_keys.get(table.name)
        if attr is None:
            attr = getattr(model, "__shard_key__", None)
        if attr is None:
            return None
        if not isinstance(attr, str) or not attr:
            raise ConfigError(f"{model.__name__}.__shard_key__ must be an attribute name, not {attr!r}")
        column = None
        if mapper is not None:
            prop = mapper.attrs.get(attr)
            columns = getattr(prop, "columns", None)
            if not columns:
                raise ConfigError(
                    f"shard key {model.__name__}.{attr} is not a mapped column attribute",
                    model=model,
                    attribute=attr,
                )
            column = columns[0]
        return _Spec(model, model.__name__, attr, table, column, self._int_pk(table, column))

    @staticmethod
    def _int_pk(table: Table | None, column: Any) -> bool:
        if table is None or column is None:
            return False
        return bool(column.primary_key) and _is_int_type(column)

    def is_reference(self, model: Any) -> bool:
        """True for a reference table: a model present in full on every shard."""
        try:
            return self._reference_cache[model]
        except (KeyError, TypeError):
            pass
        found = self._is_reference(model)
        with contextlib.suppress(TypeError):  # unhashable: not a model, nothing to cache
            self._reference_cache[model] = found
        return found

    def _is_reference(self, model: Any) -> bool:
        if isinstance(model, str):
            return model in self._reference
        if isinstance(model, Table):
            return model.name in self._reference or model.fullname in self._reference
        if not isinstance(model, type):
            return False
        if model in self._reference or getattr(model, "__reference_table__", False):
            return True
        table = getattr(model, "__table__", None)
        return isinstance(table, Table) and (table.name in self._reference or table.fullname in self._reference)

    def _every_alias(self, reason: str) -> ShardTargets:
        return ShardTargets(statements=dict.fromkeys(self.ring), reason=reason, all_shards=True)

    def _key_from_parent(self, model: type[Any], spec: _Spec, instance: Any) -> Any:
        """Co-location: a new child whose shard key is the foreign key to a parent takes the
        parent's key (routing the parent first, so a parent id not yet generated is made now)."""
        if spec.column is None:
            return None
        try:
            mapper: Any = inspect(model)
        except NoInspectionAvailable:
            return None
        for rel in mapper.relationships:
            if rel.direction.name != "MANYTOONE":
                continue
            for local, remote in rel.local_remote_pairs or ():
                if local is not spec.column:
                    continue
                parent = instance.__dict__.get(rel.key)
                if parent is None:
                    continue
                parent_attr = rel.mapper.get_property_by_column(remote).key
                value = getattr(parent, parent_attr, None)
                if value is None and self._spec(type(parent)) is not None:
                    self.db_for_write(type(parent), instance=parent)  # may generate the parent's id
                    value = getattr(parent, parent_attr, None)
                if value is not None:
                    return value
        return None

    # ------------------------------------------------------------------- writes
    def db_for_write(self, model: type[Any], **hints: Any) -> str | ShardTargets | None:
        """The alias that stores ``hints["instance"]`` (or the ``shard_key=`` hint, or the
        single shard a statement's WHERE pins); ``None`` for unsharded models.

        :raises RoutingError: the instance's shard key is ``None`` and is not an
            integer primary key that can be generated.
        """
        if self.is_reference(model):
            if hints.get("instance") is not None:
                raise RoutingError(
                    f"{getattr(model, '__name__', model)} is a reference table, present on every shard: "
                    f"write it with a statement (session.execute(insert({getattr(model, '__name__', 'Model')}), "
                    "rows), update(...), delete(...)), which goes to every shard, or place one copy "
                    "explicitly with save(using=alias)",
                    model=model,
                )
            return self._every_alias(f"reference table {getattr(model, '__name__', model)}: every shard")
        spec = self._spec(model)
        if spec is None:
            return None
        try:
            if hints.get("shard_key") is not None:
                return self.ring.get(spec.key(hints["shard_key"]))
            instance = hints.get("instance")
            if instance is not None:
                key = getattr(instance, spec.attr, None)
                if key is None:
                    key = self._key_from_parent(model, spec, instance)
                    if key is not None:
                        key = spec.key(key)
                        setattr(instance, spec.attr, key)
                        return self.ring.get(key)
                    if not spec.int_pk:
                        raise RoutingError(
                            f"cannot route {spec.label}: its shard key {spec.attr!r} is None",
                            model=model,
                            attribute=spec.attr,
                            instance=instance,
                        )
                    key = self._ids()
                    setattr(instance, spec.attr, key)
                elif type(key) is not spec.exact and spec.convert is not None:
                    converted = spec.convert(key)
                    if _changed(key, converted):  # hold what the database will: User(id="5") gets id 5
                        setattr(instance, spec.attr, converted)
                    key = converted
                return self.ring.get(key)
        except InvalidKeyError as exc:
            raise spec.refused(exc) from exc
        statement = hints.get("statement")
        if statement is not None and not getattr(statement, "is_insert", False):
            # an UPDATE / DELETE by statement: the shards its WHERE pins, else every shard
            # (an INSERT is routed row by row, by the session, from each row's key)
            try:
                return self._route_statement(spec, statement, hints.get("parameters"))
            except InvalidKeyError as exc:
                raise spec.refused(exc) from exc
        return None

    allow_relation_by_db = True
    """Given the ``db1``/``db2`` hints, :meth:`allow_relation` answers from the models and aliases alone."""

    def db_for_write_instances(self, model: type[Any], instances: list[Any], **hints: Any) -> list[str] | None:
        """Aliases of many new instances of ``model``, their keys hashed in one C call; an instance
        whose key is unset is routed as :meth:`db_for_write` would (parent's key, generated id)."""
        if self.is_reference(model):
            for obj in instances:
                self.db_for_write(model, instance=obj)  # raises: one object cannot be on every shard
            return []
        spec = self._spec(model)
        if spec is None:
            return None
        attr = spec.attr
        keys = [getattr(obj, attr, None) for obj in instances]
        if None not in keys:
            converted = spec.keys(keys)
            if converted is not keys:
                for obj, old, new in zip(instances, keys, converted, strict=True):
                    if _changed(old, new):  # hold what the database will: User(id="5") gets id 5
                        setattr(obj, attr, new)
            try:
                return self.ring.get_many(converted)
            except InvalidKeyError as exc:
                raise spec.refused(exc) from exc
        out: list[str] = []
        for obj in instances:
            alias = self.db_for_write(model, instance=obj)  # converts, or fills in, the key
            out.append(alias)  # type: ignore[arg-type]
        return out

    def db_for_write_rows(self, model: type[Any], rows: list[dict[str, Any]], **hints: Any) -> list[str] | None:
        """Aliases of a batch of rows to insert (``{column key: value}``), hashed in one C call.

        Missing integer primary-key shard keys are generated, and keys of another type than
        the column's are converted (``"5"`` -> ``5``): such a row is replaced in ``rows`` by a
        copy holding its new key (the caller's dicts are never changed);
        ``None`` for models that are not sharded (and for reference tables).

        :raises InvalidKeyError: a key the column would not accept (names the model and row's value).
        """
        if self.is_reference(model):
            return None
        spec = self._spec(model)
        if spec is None:
            return None
        name = spec.column.key if spec.column is not None else spec.attr
        keys = [row.get(name) for row in rows]
        if None in keys:
            if not spec.int_pk:
                missing = next(i for i, k in enumerate(keys) if k is None)
                raise RoutingError(
                    f"cannot route row {missing} of {spec.label}: its shard key {spec.attr!r} is missing or None",
                    model=model,
                    attribute=spec.attr,
                )
            for i, key in enumerate(keys):
                if key is None:  # the caller's dict is left alone: the row becomes a copy
                    keys[i] = self._ids()
                    rows[i] = {**rows[i], name: keys[i]}
        converted = spec.keys(keys)
        if converted is not keys:
            for i, (old, new) in enumerate(zip(keys, converted, strict=True)):
                if _changed(old, new):  # the row (a copy) holds what the database will store
                    rows[i] = {**rows[i], name: new}
        try:
            return self.ring.get_many(converted)
        except InvalidKeyError as exc:
            raise spec.refused(exc) from exc

    # -------------------------------------------------------------------- reads
    def db_for_read(self, model: type[Any], **hints: Any) -> str | ShardTargets | None:
        """Route a read of a sharded model: one alias, a :class:`ShardTargets`, or ``None``.

        ``instance=`` (a lazy load from a loaded object of a sharded model)
        gives ``None``, so the session uses that object's own database.
        """
        if self.is_reference(model):
            instance = hints.get("instance")
            if instance is not None:  # a lazy load from a sharded object: its own shard has a copy
                return None
            for alias in self.ring:  # every shard holds every row: the first one answers
                return alias
            return None
        spec = self._spec(model)
        if spec is None:
            return None
        try:
            if hints.get("shard_key") is not None:
                return self.ring.get(spec.key(hints["shard_key"]))
            instance = hints.get("instance")
            if instance is not None and self.is_sharded(type(instance)):
                return None
            return self._route_statement(spec, hints.get("statement"), hints.get("parameters"))
        except InvalidKeyError as exc:
            raise spec.refused(exc) from exc

    def _every_shard(self, reason: str, spec: _Spec) -> ShardTargets:
        return ShardTargets(
            statements=dict.fromkeys(self.ring),
            reason=reason,
            all_shards=True,
            shard_key_columns=self._key_columns(spec),
        )

    @staticmethod
    def _key_columns(spec: _Spec) -> tuple[Any, ...]:
        return () if spec.column is None else (spec.column,)

    def _route_statement(self, spec: _Spec, statement: Any, params: Any = None) -> str | ShardTargets:
        if statement is None or spec.column is None:
            return self._every_shard("no shard key in WHERE", spec)
        constraints = self._constraints(spec, statement, params if isinstance(params, Mapping) else None)
        if not constraints:
            return self._every_shard("no shard key in WHERE", spec)
        if len(constraints) == 1 and len(constraints[0].values) == 1:  # `key == value`: one shard
            return self.ring.get(spec.key(constraints[0].values[0]))
        ring_get = self.ring.get
        owners: list[dict[str, list[Any]]] = []
        for constraint in constraints:
            by_alias: dict[str, list[Any]] = {}
            for value in spec.keys(constraint.values):  # per shard, the IN list holds converted values
                by_alias.setdefault(ring_get(value), []).append(value)
            owners.append(by_alias)
        aliases = set(owners[0])
        for by_alias in owners[1:]:
            aliases &= set(by_alias)
        if not aliases:
            union: set[str] = set().union(*owners)
            if not union:  # only empty IN lists: no row can match, any one shard answers
                for alias in self.ring:
                    return alias
                return self._every_shard("empty ring", spec)
            aliases = union  # contradictory keys: no row matches; asking each shard is still right
        ordered = [a for a in self.ring if a in aliases]
        if len(ordered) == 1:
            return ordered[0]
        statements: dict[str, Any] = {}
        for alias in ordered:
            replace: dict[int, BindParameter[Any]] = {}
            for constraint, by_alias in zip(constraints, owners, strict=True):
                bind: Any = constraint.bind
                if bind is not None:
                    replace[id(bind)] = _sqla.bind_with_value(bind, by_alias.get(alias, []))
            statements[alias] = self._rewrite(statement, replace) if replace else None
        label = f"{spec.label}.{spec.attr}"
        return ShardTargets(
            statements=statements,
            reason=f"shard key {label} values span {len(ordered)} shards",
            shard_key_columns=self._key_columns(spec),
        )

    @staticmethod
    def _rewrite(statement: Any, replace: Mapping[int, BindParameter[Any]]) -> Any:
        def swap(element: Any, **kw: Any) -> Any:
            return replace.get(id(element))

        return _sqla.with_where_criteria(
            statement,
            tuple(replacement_traverse(criterion, {}, swap) for criterion in _sqla.where_of(statement)),
        )

    def _constraints(self, spec: _Spec, statement: Any, params: Mapping[str, Any] | None) -> list[_Constraint]:
        """The shard-key conditions of ``statement``'s WHERE with this execution's values.

        Where the conditions sit depends only on the statement's shape, so it is worked out
        once per shape (SQLAlchemy's cache key, which it computes for its compiled cache
        anyway and keeps on the statement) and kept as positions in the key's list of bound
        parameters; each execution then only reads its own values from those parameters.
        A statement without a cache key (or a lambda) is walked every time.
        """
        found = _sqla.cache_key(statement) if type(statement) in _sqla.WHERE_STATEMENTS else None
        if found is None:
            conditions: Iterable[tuple[bool, BindParameter[Any]]] = self._conditions(statement, spec.column)
        else:
            shape_key, binds = found
            cache_key = (spec, shape_key)
            shape = self._shapes.get(cache_key, _UNSEEN)
            if shape is _UNSEEN:
                shape = self._shape(statement, spec.column, binds)
                if len(self._shapes) >= _SHAPES_KEPT:
                    self._shapes.clear()
                self._shapes[cache_key] = shape
            if shape is None:
                conditions = self._conditions(statement, spec.column)
            else:
                conditions = [(is_in, binds[index]) for is_in, index in shape]
        out: list[_Constraint] = []
        for is_in, bind in conditions:
            constraint = self._constraint(is_in, bind, params)
            if constraint is not None:
                out.append(constraint)
        return out

    def _shape(self, statement: Any, column: Any, binds: list[Any]) -> tuple[tuple[bool, int], ...] | None:
        """Where the shard-key conditions' parameters sit in ``binds`` (a cache key's list),
        or ``None`` when one of them is not there (then the statement is walked each time)."""
        index = {id(bind): i for i, bind in enumerate(binds)}
        shape: list[tuple[bool, int]] = []
        for is_in, bind in self._conditions(statement, column):
            position = index.get(id(bind))
            if position is None:
                return None
            shape.append((is_in, position))
        return tuple(shape)

    def _conditions(self, statement: Any, column: Any) -> list[tuple[bool, BindParameter[Any]]]:
        """``(is IN, parameter)`` of each shard-key condition in the top-level AND chain of the WHERE."""
        out: list[tuple[bool, BindParameter[Any]]] = []
        for criterion in _sqla.where_of(statement):
            self._collect(criterion, column, out)
        return out

    def _constraint(
        self, is_in: bool, bind: BindParameter[Any], params: Mapping[str, Any] | None
    ) -> _Constraint | None:
        """The values one condition allows in this execution; ``None`` when its value is unknown."""
        value = self._bound_value(bind, params)
        if value is None:
            return None
        if not is_in:
            return _Constraint([value], None)
        if not isinstance(value, Iterable) or isinstance(value, str | bytes):
            value = [value]
        kept = [v for v in value if v is not None]  # NULL never matches IN
        return _Constraint(kept, bind if bind.expanding else None)

    def _collect(self, clause: Any, column: Any, out: list[tuple[bool, BindParameter[Any]]]) -> None:
        """Append the shard-key conditions of a top-level AND chain to ``out``."""
        if isinstance(clause, BooleanClauseList):
            if clause.operator is operators.and_:
                for sub in clause.clauses:
                    self._collect(sub, column, out)
            return  # OR: no key
        if isinstance(clause, Grouping):
            self._collect(clause.element, column, out)
            return
        if not isinstance(clause, BinaryExpression):
            return
        op = clause.operator
        left, right = clause.left, clause.right
        if op is operators.eq:
            if self._is_column(right, column) and isinstance(left, BindParameter):
                left, right = right, left
            if self._is_column(left, column) and isinstance(right, BindParameter):
                out.append((False, right))
        elif op is operators.in_op and self._is_column(left, column) and isinstance(right, BindParameter):
            out.append((True, right))

    @staticmethod
    def _is_column(element: ColumnElement[Any] | Any, column: Any) -> bool:
        proxy_set = getattr(element, "proxy_set", None)
        return proxy_set is not None and column in proxy_set

    @staticmethod
    def _bound_value(bind: BindParameter[Any], params: Mapping[str, Any] | None = None) -> Any:
        if params is not None and bind.key in params:  # supplied at execution (selectin loads do this)
            return params[bind.key]
        if bind.callable is None and bind.value is None:
            return None  # supplied at execution time (or NULL): unknown here
        return bind.effective_value

    # ---------------------------------------------------------- relations/migrate
    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        """For two sharded objects: True when they are on the same alias, False when not.

        Their aliases come from the ``db1``/``db2`` hints the session passes (where each
        object really is or will be written), else from their shard keys; None when a key
        is still unknown, and None for anything that is not sharded."""
        if self.is_reference(type(obj1)) or self.is_reference(type(obj2)):
            return True  # a reference table is on every shard: relations to it never cross
        spec1, spec2 = self._spec(type(obj1)), self._spec(type(obj2))
        if spec1 is None or spec2 is None:
            return None
        db1, db2 = hints.get("db1"), hints.get("db2")
        if db1 is not None and db2 is not None:  # where they really are (using() may overrule the ring)
            return bool(db1 == db2)
        key1, key2 = getattr(obj1, spec1.attr, None), getattr(obj2, spec2.attr, None)
        if key1 is None or key2 is None:
            return None
        try:
            alias1 = self.ring.get(spec1.key(key1))
        except InvalidKeyError as exc:
            raise spec1.refused(exc) from exc
        try:
            return alias1 == self.ring.get(spec2.key(key2))
        except InvalidKeyError as exc:
            raise spec2.refused(exc) from exc

    def allow_migrate(self, db: str, model: Any, **hints: Any) -> bool | None:
        """Sharded tables live on the ring's shards only; None for everything else."""
        if model is not None and self.is_reference(model):
            return db in self.ring
        if model is None or self._spec(model) is None:
            return None
        return db in self.ring

    def __repr__(self) -> str:
        return f"<HashRingRouter ring={self.ring!r}>"
