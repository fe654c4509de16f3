"""DATABASES -> validated, frozen alias specs -> engines.

An alias is described the way Django describes a database: either a URL
string (any SQLAlchemy URL) or a dict with ``ENGINE``, ``NAME``, ``USER``,
``PASSWORD``, ``HOST``, ``PORT`` and ``OPTIONS``.  ``ENGINE`` takes SQLAlchemy
dialect names (``postgresql``, ``postgresql+psycopg2``, ``sqlite``, ``mysql``)
and Django backend names (``django.db.backends.postgresql`` ...).

Everything is checked when the cluster is built, before anything connects:
a missing ``"default"``, an unknown ENGINE or a key that is not a Django
setting is a :class:`~shardkit.errors.ConfigError` naming the alias.  The
password is kept inside the :class:`~sqlalchemy.engine.URL` and never shown:
every repr and message uses the URL rendered with its password hidden.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from sqlalchemy import URL, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ._replicas import check_replica_graph, parse_replica_options
from .errors import ConfigError, UnknownEngineError

__all__ = ["DEFAULT_DB_ALIAS", "AliasSpec", "parse_databases"]

logger = logging.getLogger(__name__)

DEFAULT_DB_ALIAS = "default"

# Django backend names and short names -> SQLAlchemy drivername.
_ENGINES: dict[str, str] = {
    "django.db.backends.postgresql": "postgresql+psycopg2",
    "django.db.backends.postgresql_psycopg2": "postgresql+psycopg2",
    "django.db.backends.postgis": "postgresql+psycopg2",
    "django.contrib.gis.db.backends.postgis": "postgresql+psycopg2",
    "django.db.backends.sqlite3": "sqlite",
    "django.db.backends.mysql": "mysql+pymysql",
    "postgresql": "postgresql+psycopg2",
    "postgres": "postgresql+psycopg2",
    "psycopg2": "postgresql+psycopg2",
    "sqlite": "sqlite",
    "sqlite3": "sqlite",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}

# A URL that names no driver gets the one shardkit installs (SQLAlchemy 2.1's own default for
# postgresql:// is psycopg 3, and for mysql:// mysqlclient).
_BARE_URL_DRIVERS = {"postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}

# Keys Django accepts in a DATABASES entry.  Those shardkit has no use for are
# accepted and ignored so a Django settings module works unchanged; anything
# else is a typo and is refused.
_DJANGO_KEYS = frozenset(
    {
        "ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS",
        "TEST", "ATOMIC_REQUESTS", "AUTOCOMMIT", "CONN_MAX_AGE",
        "CONN_HEALTH_CHECKS", "TIME_ZONE", "DISABLE_SERVER_SIDE_CURSORS",
    }
)  # fmt: skip
_SHARDKIT_KEYS = frozenset({"ENGINE_OPTIONS", "REPLICAS", "REPLICA_POLICY", "MAX_REPLICA_LAG"})  # see _replicas
# ENGINE_OPTIONS create_engine() takes as numbers without checking them.
_NUMERIC_ENGINE_OPTIONS = frozenset({"pool_size", "max_overflow", "pool_timeout", "pool_recycle"})


@dataclass(frozen=True)
class AliasSpec:
    """One validated DATABASES entry.

    :param alias: the key in DATABASES.
    :param url: the SQLAlchemy URL (its repr hides the password).
    :param connect_args: ``OPTIONS``, passed to the DBAPI's ``connect()``.
    :param engine_options: ``ENGINE_OPTIONS``, passed to ``create_engine()``.
    :param replicas: ``REPLICAS``: the aliases of its read replicas (see :mod:`shardkit._replicas`),
        with ``replica_weights``, ``replica_policy`` and ``max_replica_lag``; ``replica_of``: the
        primary of a replica alias.
    """

    alias: str
    url: URL
    connect_args: Mapping[str, Any] = field(default_factory=dict)
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    engine: Engine | None = None
    replicas: tuple[str, ...] = ()
    replica_weights: tuple[float, ...] = ()
    replica_policy: str = "round_robin"
    max_replica_lag: float | None = None
    replica_of: str | None = None

    @property
    def dialect_name(self) -> str:
        return self.url.get_backend_name()

    @property
    def safe_url(self) -> str:
        """The URL as a string, password hidden."""
        return self.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"AliasSpec(alias={self.alias!r}, url={self.safe_url!r})"

    def create_engine(self, **defaults: Any) -> Engine:
        """Create the engine this alias describes (``ENGINE_OPTIONS`` win over defaults)."""
        if self.engine is not None:
            return self.engine
        options: dict[str, Any] = dict(defaults)
        # never change the caller's dicts: they are shared by every alias of the cluster
        options["connect_args"] = dict(options.get("connect_args") or {})
        if self.dialect_name == "sqlite":
            # Fan-out reads use a worker thread per shard; a pooled sqlite
            # connection may be used by another thread than the one that made it.
            options.setdefault("connect_args", {}).setdefault("check_same_thread", False)
        options.update(self.engine_options)
        if self.connect_args:
            options["connect_args"] = {**options.get("connect_args", {}), **self.connect_args}
        for key in _NUMERIC_ENGINE_OPTIONS.intersection(self.engine_options):
            value = self.engine_options[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"DATABASES[{self.alias!r}]: ENGINE_OPTIONS[{key!r}] must be a number, got {type(value).__name__}",
                    alias=self.alias,
                    key=key,
                )
        logger.debug("alias %s: creating its engine for %s", self.alias, self.safe_url)
        try:
            return create_engine(self.url, **options)
        except (TypeError, ValueError, KeyError, AttributeError, ArgumentError) as exc:
            # A bad ENGINE_OPTIONS value or key (create_engine's own TypeError names the key);
            # the driver's message is left out should it ever hold the password.
            detail = f"{type(exc).__name__}: {exc}"
            password = self.url.password
            leaks = bool(password) and str(password) in detail
            given = ", ".join(sorted(map(str, self.engine_options))) or "none"
            raise ConfigError(
                f"DATABASES[{self.alias!r}]: cannot create its engine (ENGINE_OPTIONS: {given}): "
                + (type(exc).__name__ if leaks else detail.splitlines()[0]),
                alias=self.alias,
            ) from (None if leaks else exc)


def _drivername(alias: str, engine: Any) -> str:
    if not isinstance(engine, str) or not engine:
        raise UnknownEngineError(
            f"DATABASES[{alias!r}]: ENGINE must be a non-empty string, got {engine!r}",
            alias=alias,
            engine=engine,
        )
    drivername = _ENGINES.get(engine.lower(), engine)
    try:
        URL.create(drivername).get_dialect()
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise UnknownEngineError(
            f"DATABASES[{alias!r}]: unknown ENGINE {engine!r} (use a SQLAlchemy dialect such as "
            f"'postgresql', 'sqlite', 'mysql', or a Django backend such as "
            f"'django.db.backends.postgresql')",
            alias=alias,
            engine=engine,
        ) from exc
    return drivername


def _check_port(alias: str, port: int) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"DATABASES[{alias!r}]: port {port} is out of range (1-65535)", alias=alias, port=port)
    return port


def _dict_port(alias: str, port: Any) -> int | None:
    if port is None or port == "":
        return None
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise ConfigError(
            f"DATABASES[{alias!r}]: PORT must be a number, got {type(port).__name__}", alias=alias, key="PORT"
        )
    if isinstance(port, str):
        if not port.strip().isascii() or not port.strip().isdigit():
            raise ConfigError(
                f"DATABASES[{alias!r}]: PORT must be a number, got {port[:20]!r}", alias=alias, key="PORT"
            )
        port = int(port)
    return _check_port(alias, port)


def _url_from_text(alias: str, entry: URL | str) -> URL:
    """Parse a URL; every parse failure is a ConfigError naming the alias, never echoing the text
    (it may hold a password)."""
    try:
        url = make_url(entry)
    except ArgumentError as exc:
        raise ConfigError(f"DATABASES[{alias!r}]: not a valid database URL", alias=alias) from exc
    except (ValueError, TypeError):
        # SQLAlchemy parses the port with int(): "h:abc", "h:5432x", "[::1:5432"
        raise ConfigError(
            f"DATABASES[{alias!r}]: not a valid database URL: its port is not a number", alias=alias
        ) from None
    if url.port is not None:
        _check_port(alias, url.port)
    return url


def _spec_from_dict(alias: str, entry: Mapping[str, Any]) -> AliasSpec:
    unknown = sorted(set(entry) - _DJANGO_KEYS - _SHARDKIT_KEYS)
    if unknown:
        raise ConfigError(
            f"DATABASES[{alias!r}]: unknown setting(s) {', '.join(unknown)}",
            alias=alias,
            keys=unknown,
        )
    if "ENGINE" not in entry:
        raise ConfigError(f"DATABASES[{alias!r}]: ENGINE is required", alias=alias)
    drivername = _drivername(alias, entry["ENGINE"])
    port = _dict_port(alias, entry.get("PORT"))
    for key in ("USER", "PASSWORD", "HOST"):
        value = entry.get(key)
        if value not in (None, "") and not isinstance(value, str):
            shown = "" if key == "PASSWORD" else f", got {type(value).__name__}"  # never echo a password
            raise ConfigError(f"DATABASES[{alias!r}]: {key} must be a string{shown}", alias=alias, key=key)
    name = entry.get("NAME")
    if name in (None, ""):
        if not (isinstance(entry.get("OPTIONS"), Mapping) and entry["OPTIONS"].get("service")):
            hint = "a file path, or ':memory:'" if drivername.startswith("sqlite") else "the database name"
            raise ConfigError(f"DATABASES[{alias!r}]: NAME is required ({hint})", alias=alias, key="NAME")
        name = None
    elif isinstance(name, os.PathLike):
        name = os.fspath(name)
    if name is not None and not isinstance(name, str):
        raise ConfigError(
            f"DATABASES[{alias!r}]: NAME must be a string or a path, got {type(name).__name__}",
            alias=alias,
            key="NAME",
        )
    options = entry.get("OPTIONS") or {}
    engine_options = entry.get("ENGINE_OPTIONS") or {}
    for key in ("OPTIONS", "ENGINE_OPTIONS"):
        if not isinstance(entry.get(key) or {}, Mapping):
            raise ConfigError(f"DATABASES[{alias!r}]: {key} must be a dict", alias=alias)
    url = URL.create(
        drivername,
        username=entry.get("USER") or None,
        password=entry.get("PASSWORD") or None,
        host=entry.get("HOST") or None,
        port=port,
        database=str(name) if name is not None else None,
    )
    replicas, weights, policy, lag = parse_replica_options(alias, entry)
    return AliasSpec(
        alias,
        url,
        MappingProxyType(dict(options)),
        MappingProxyType(dict(engine_options)),
        replicas=replicas,
        replica_weights=weights,
        replica_policy=policy,
        max_replica_lag=lag,
    )


def _spec(alias: Any, entry: Any) -> AliasSpec:
    if not isinstance(alias, str) or not alias:
        raise ConfigError(f"DATABASES keys must be non-empty strings, got {alias!r}", alias=alias)
    if isinstance(entry, Engine):
        return AliasSpec(alias, entry.url, engine=entry)
    if isinstance(entry, URL | str):
        url = _url_from_text(alias, entry)
        _drivername(alias, url.drivername)
        if url.drivername in _BARE_URL_DRIVERS:  # the driver shardkit installs, not the dialect's default
            url = url.set(drivername=_BARE_URL_DRIVERS[url.drivername])
        return AliasSpec(alias, url)
    if isinstance(entry, Mapping):
        return _spec_from_dict(alias, entry)
    raise ConfigError(
        f"DATABASES[{alias!r}] must be a URL string or a dict with ENGINE/NAME/..., got {type(entry).__name__}",
        alias=alias,
    )


def parse_databases(databases: Mapping[str, Any]) -> dict[str, AliasSpec]:
    """Validate a DATABASES mapping and return alias -> :class:`AliasSpec`.

    :param databases: alias -> URL string, :class:`~sqlalchemy.URL`, Engine or Django-style dict.
    :raises ConfigError: no ``"default"``, a bad entry, an unknown ENGINE.

    >>> specs = parse_databases({"default": "sqlite://"})
    >>> specs["default"].dialect_name
    'sqlite'
    """
    if not isinstance(databases, Mapping):
        raise ConfigError(f"DATABASES must be a dict, got {type(databases).__name__}")
    if DEFAULT_DB_ALIAS not in databases:
        raise ConfigError(
            "DATABASES has no 'default' alias: it is required (aliases given: "
            f"{', '.join(map(repr, databases)) or 'none'})",
            alias=DEFAULT_DB_ALIAS,
        )
    specs = {alias: _spec(alias, entry) for alias, entry in databases.items()}
    for replica, primary in check_replica_graph(specs).items():  # REPLICAS name aliases, no chains
        specs[replica] = replace(specs[replica], replica_of=primary)
    return specs
