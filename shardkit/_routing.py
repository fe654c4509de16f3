"""The router chain: Django's ``ConnectionRouter`` for SQLAlchemy.

Each router is asked, in order, only for the methods it defines; the first
answer that is not ``None`` wins.  When every router passes:

* reads and writes go to the instance's own database when there is an
  instance that has one, else to ``"default"``;
* ``allow_relation`` allows two objects on the same database;
* ``allow_migrate`` allows.

``allow_syncdb(db, model)``, the name Django 1.2 used, is accepted as the old
name of ``allow_migrate``.  Every alias a router returns is checked against
the cluster, so a typo in a router is an error naming the router and the
alias, raised before anything is written.

An exception raised inside a router's method (a bug, a lookup that failed) reaches the
caller as a :class:`~shardkit.errors.RouterError` naming the router, the method and the
model, with the router's exception as its ``__cause__``.  A shardkit error a router
raises on purpose (``ShardMovingError``, ``InvalidKeyError``, ``RoutingError`` ...) is
not wrapped: it passes through unchanged, so callers can still catch it by its class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from ._find import import_object
from .errors import InvalidRouteError, RouterError, RouterImportError, ShardkitError
from .typing import ShardTargets

__all__ = ["RouterChain", "import_string", "model_name", "router_error"]

_NO_DB: Callable[[Any], str | None] = lambda obj: None  # noqa: E731


def import_string(path: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name`` (see :func:`shardkit._find.import_object`).

    :raises RouterImportError: the module or the attribute does not exist.
    """
    return import_object(path, what="router", error=RouterImportError)


def model_name(model: Any) -> str:
    if model is None:
        return "None"
    return getattr(model, "__name__", None) or getattr(model, "name", None) or repr(model)


def _router_name(router: Any) -> str:
    return type(router).__qualname__


_CAUSE_LIMIT = 300


def router_error(exc: BaseException, router: Any, method: str, model: Any) -> RouterError:
    """The error for an exception raised inside ``router.method``: names the router, the method
    and the model; the caller raises it ``from exc`` so the router's own exception is the cause."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > _CAUSE_LIMIT:
        text = text[: _CAUSE_LIMIT - 3] + "..."
    message = f"router {_router_name(router)}.{method} raised {text} (routing model {model_name(model)})"
    dual = _dual_class(type(exc))
    if dual is None:
        return RouterError(message, router=router, method=method, model=model)
    # Still the router's own exception too, as Django lets it bubble up: `except AttributeError`
    # (or the router's own exception class) keeps working, with the exception's attributes.
    err = dual.__new__(dual)
    BaseException.__init__(err, message)
    err.message = message
    err.context = {"router": router, "method": method, "model": model}
    for name, value in err.context.items():
        setattr(err, name, value)
    err.__dict__.update(getattr(exc, "__dict__", {}))
    return err


_DUAL: dict[type[BaseException], type[RouterError] | None] = {}


def _dual_class(exc_type: type[BaseException]) -> type[RouterError] | None:
    """A subclass of both :class:`RouterError` and ``exc_type`` (``None`` if they cannot be mixed)."""
    if exc_type in _DUAL:
        return _DUAL[exc_type]
    dual: type[RouterError] | None = None
    if issubclass(exc_type, Exception) and not issubclass(exc_type, ShardkitError):
        try:
            dual = type(f"RouterError[{exc_type.__name__}]", (RouterError, exc_type), {"__module__": __name__})
        except TypeError:  # incompatible layouts (some builtins): the plain RouterError
            dual = None
    _DUAL[exc_type] = dual
    return dual


_DJANGO_STYLE: dict[Any, bool] = {}


def _allow_migrate(method: Callable[..., Any], db: str, model: Any, hints: Mapping[str, Any]) -> Any:
    """Call ``allow_migrate`` in the form its signature asks for: today's Django
    ``(db, app_label, model_name=None, **hints)`` (``model`` is then a hint, as in Django), or
    shardkit's ``(db, model, **hints)``."""
    func = getattr(method, "__func__", method)
    django = _DJANGO_STYLE.get(func)
    if django is None:
        try:
            django = "app_label" in inspect.signature(method).parameters
        except (TypeError, ValueError):  # no signature to read: shardkit's form
            django = False
        _DJANGO_STYLE[func] = django
    if not django:
        return method(db, model, **hints)
    table = hints.get("table")
    app_label: str | None
    if isinstance(model, type):
        app_label = getattr(model, "app_label", None) or model.__module__.rpartition(".")[0] or model.__module__
        name = model.__name__.lower()
    else:
        app_label, name = None, str(getattr(table, "name", None) or hints.get("model_name") or "")
    extra = {k: v for k, v in hints.items() if k not in ("model_name", "app_label", "model")}
    return method(db, app_label, model_name=name, model=model, **extra)


class RouterChain:
    """The ordered list of routers of one cluster.

    :param routers: dotted paths, classes (instantiated without arguments) or instances.
    :param aliases: the cluster's aliases, to validate every answer.
    :param db_of: how to find the database an object lives on (for the defaults).
    """

    def __init__(
        self,
        routers: Iterable[Any],
        aliases: Collection[str],
        db_of: Callable[[Any], str | None] = _NO_DB,
        default: str = "default",
    ) -> None:
        self.routers: list[Any] = [self._load(r) for r in routers]
        self.aliases = frozenset(aliases)
        self._db_of = db_of
        self.default = default
        self._read = self._methods("db_for_read")
        self._write = self._methods("db_for_write")
        self._relation = self._methods("allow_relation")
        self._write_rows = self._methods("db_for_write_rows")
        self._write_instances = self._methods("db_for_write_instances")
        self._write_instances_complete = bool(self._write) and all(
            hasattr(r, "db_for_write_instances") for r, _m in self._write
        )
        self._write_rows_complete = all(hasattr(r, "db_for_write_rows") for r, _m in self._write)
        self._migrate: list[tuple[Any, Callable[..., Any], bool]] = []
        for router in self.routers:
            if (method := getattr(router, "allow_migrate", None)) is not None:
                self._migrate.append((router, method, True))
            elif (method := getattr(router, "allow_syncdb", None)) is not None:
                self._migrate.append((router, method, False))

    @property
    def write_rows_complete(self) -> bool:
        """Whether every router that places writes can also place a batch of rows at once."""
        return self._write_rows_complete

    @property
    def write_instances_complete(self) -> bool:
        """Whether every router that places writes can also place many new instances at once."""
        return self._write_instances_complete

    @staticmethod
    def _load(entry: Any) -> Any:
        if isinstance(entry, str):
            entry = import_string(entry)
        if isinstance(entry, type):
            try:
                entry = entry()
            except ShardkitError:
                raise
            except Exception as exc:
                raise RouterError(
                    f"router {entry.__qualname__}() raised {type(exc).__name__}: {str(exc)[:_CAUSE_LIMIT]}",
                    router=entry,
                    method="__init__",
                    model=None,
                ) from exc
        return entry

    def _methods(self, name: str) -> list[tuple[Any, Callable[..., Any]]]:
        return [(r, m) for r in self.routers if (m := getattr(r, name, None)) is not None]

    def __repr__(self) -> str:
        return f"RouterChain([{', '.join(_router_name(r) for r in self.routers)}])"

    # -- validation ---------------------------------------------------------

    def check_alias(self, alias: Any, *, router: Any = None, model: Any = None, method: str = "") -> str:
        if isinstance(alias, str) and alias in self.aliases:
            return alias
        who = f"router {_router_name(router)}.{method}" if router is not None else method or "routing"
        raise InvalidRouteError(
            f"{who} returned {alias!r} for model {model_name(model)}, which is not an alias of "
            f"this cluster (aliases: {', '.join(sorted(self.aliases))})",
            alias=alias,
            model=model,
            router=router,
        )

    def _check_target(self, target: Any, router: Any, model: Any, method: str) -> str | ShardTargets:
        if isinstance(target, str):
            return self.check_alias(target, router=router, model=model, method=method)
        if isinstance(target, ShardTargets):
            for alias in target.statements:
                self.check_alias(alias, router=router, model=model, method=method)
            if not target.statements:
                raise InvalidRouteError(
                    f"router {_router_name(router)}.{method} returned no alias for {model_name(model)}",
                    model=model,
                    router=router,
                )
            return target
        if isinstance(target, Mapping | Sequence | Collection) and not isinstance(target, bytes):
            aliases = list(dict.fromkeys(target))  # keep order, drop repeats
            for alias in aliases:
                self.check_alias(alias, router=router, model=model, method=method)
            if len(aliases) == 1:
                return str(aliases[0])
            if not aliases:
                raise InvalidRouteError(
                    f"router {_router_name(router)}.{method} returned no alias for {model_name(model)}",
                    model=model,
                    router=router,
                )
            return ShardTargets({a: None for a in aliases}, reason=f"{_router_name(router)}.{method}")
        return self.check_alias(target, router=router, model=model, method=method)

    def _fallback(self, hints: Mapping[str, Any], fallback: str | None) -> str:
        instance = hints.get("instance")
        if instance is not None:
            db = self._db_of(instance)
            if db is not None:
                return db
        return fallback or self.default

    # -- the four questions -------------------------------------------------

    def db_for_read(self, model: Any, *, fallback: str | None = None, **hints: Any) -> str | ShardTargets:
        """The alias (or aliases) a read of ``model`` goes to.

        :param fallback: where to go when every router passes and the instance has no db
            (``"default"`` if not given); it is not passed to the routers.
        """
        target = self._read_opinion(model, hints)
        return target if target is not None else self._fallback(hints, fallback)

    def read_opinion(self, model: Any, **hints: Any) -> str | ShardTargets | None:
        """What the routers say about a read of ``model``; ``None`` if every router passes."""
        return self._read_opinion(model, hints)

    def _read_opinion(self, model: Any, hints: dict[str, Any]) -> str | ShardTargets | None:
        for router, method in self._read:
            try:
                target = method(model, **hints)
            except ShardkitError:
                raise
            except Exception as exc:
                raise router_error(exc, router, "db_for_read", model) from exc
            if target is not None:
                if type(target) is str and target in self.aliases:  # the usual answer, checked at once
                    return target
                return self._check_target(target, router, model, "db_for_read")
        return None

    def db_for_write(self, model: Any, *, fallback: str | None = None, **hints: Any) -> str | ShardTargets:
        """The alias a write of ``model`` goes to.

        A write of one instance always has one alias; a write by statement
        (``update(User)`` with no shard key) may span several.
        """
        target = self.write_opinion(model, **hints)
        return target if target is not None else self._fallback(hints, fallback)

    def write_opinion(self, model: Any, **hints: Any) -> str | ShardTargets | None:
        """What the routers say about a write of ``model``; ``None`` if every router passes."""
        for router, method in self._write:
            try:
                target = method(model, **hints)
            except ShardkitError:
                raise
            except Exception as exc:
                raise router_error(exc, router, "db_for_write", model) from exc
            if target is not None:
                checked = self._check_target(target, router, model, "db_for_write")
                if not isinstance(checked, str) and hints.get("instance") is not None:
                    raise InvalidRouteError(
                        f"router {_router_name(router)}.db_for_write returned several aliases for "
                        f"one {model_name(model)} instance",
                        model=model,
                        router=router,
                    )
                return checked
        return None

    def db_for_write_rows(self, model: Any, rows: list[dict[str, Any]], **hints: Any) -> list[str] | None:
        """Aliases for a batch of rows to insert (column key -> value dicts), or ``None``.

        Answered only when every router that has ``db_for_write`` also has
        ``db_for_write_rows(model, rows, **hints)`` (a router may replace an entry of ``rows``
        with a copy that fills in a missing key, never change the dicts themselves); otherwise the
        caller routes row by row.  A router that returns ``None`` passes the whole batch to the
        next one; if all pass, ``None``: the per-row defaults (a parent's db, ``"default"``) apply.
        """
        if not self._write_rows_complete:
            return None
        return self._batch(self._write_rows, "db_for_write_rows", model, rows, "rows", hints)

    def db_for_write_instances(self, model: Any, instances: list[Any], **hints: Any) -> list[str] | None:
        """Aliases for many new instances of ``model`` at once, or ``None`` (then ask one by one).

        Used only when every router that has ``db_for_write`` also has
        ``db_for_write_instances(model, instances, **hints)``; the first router that does not
        return ``None`` answers for the whole batch.  If all pass, ``None``: the per-object
        defaults (the instance's own db, its parent's) need each object.
        """
        if not self._write_instances_complete:
            return None
        return self._batch(self._write_instances, "db_for_write_instances", model, instances, "instances", hints)

    def _batch(
        self,
        methods: list[tuple[Any, Callable[..., Any]]],
        name: str,
        model: Any,
        items: list[Any],
        what: str,
        hints: Mapping[str, Any],
    ) -> list[str] | None:
        """The first router's answer for a whole batch, checked: one known alias per item."""
        for router, method in methods:
            try:
                aliases = method(model, items, **hints)
                if aliases is None:
                    continue
                aliases = list(aliases)
            except ShardkitError:
                raise
            except Exception as exc:
                raise router_error(exc, router, name, model) from exc
            if len(aliases) != len(items):
                raise InvalidRouteError(
                    f"router {_router_name(router)}.{name} returned {len(aliases)} aliases "
                    f"for {len(items)} {what} of {model_name(model)}",
                    model=model,
                    router=router,
                )
            for alias in set(aliases):
                self.check_alias(alias, router=router, model=model, method=name)
            return aliases
        return None

    @property
    def relation_depends_on_dbs_only(self) -> bool:
        """True when every router's ``allow_relation``, given the ``db1``/``db2`` hints, answers from
        the two models and the two aliases alone (``allow_relation_by_db = True`` on the router):
        answers may then be reused for every pair alike within a flush."""
        return all(getattr(r, "allow_relation_by_db", False) for r, _m in self._relation)

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        """Whether ``obj1`` and ``obj2`` may be related (a foreign key between them)."""
        for router, method in self._relation:
            try:
                allowed = method(obj1, obj2, **hints)
                if allowed is not None:
                    return bool(allowed)
            except ShardkitError:
                raise
            except Exception as exc:
                raise router_error(exc, router, "allow_relation", type(obj1)) from exc
        db1 = hints.get("db1") or self._db_of(obj1) or self.default
        db2 = hints.get("db2") or self._db_of(obj2) or self.default
        return bool(db1 == db2)

    def allow_migrate_model(self, db: str, model: Any) -> bool:
        """Django's ``router.allow_migrate_model(db, model)``: :meth:`allow_migrate` for a model."""
        return self.allow_migrate(db, model)

    def allow_migrate(self, db: str, model: Any, **hints: Any) -> bool:
        """Whether ``model``'s table should exist on database ``db``."""
        for router, method, modern in self._migrate:
            try:
                allowed = _allow_migrate(method, db, model, hints) if modern else method(db, model)
                if allowed is not None:
                    return bool(allowed)
            except ShardkitError:
                raise
            except Exception as exc:
                name = "allow_migrate" if modern else "allow_syncdb"
                raise router_error(exc, router, name, model) from exc
        return True
