"""Settings: a cluster and its hash ring, loaded from a settings module or a TOML file.

Two forms, one result (:class:`Settings`):

* a **Python module** (``myproject.settings``), Django-style::

      DATABASES = {"default": "sqlite:///default.db", "s0": {...}, "s1": {...}}
      DATABASE_ROUTERS = ["myproject.routers.AuthRouter"]
      SHARDKIT_RING = HashRing(["s0", "s1"])   # or its to_dict() dict, or a JSON string
      SHARDKIT_SHARD_KEYS = {"orders": "user_id"}  # optional, for the ring's router
      SHARDKIT_METADATA = "myproject.models:Base"  # optional, for `shardkit migrate`

* a **TOML file** (``path/to/shardkit.toml``)::

      routers = ["myproject.routers.AuthRouter"]
      metadata = "myproject.models:Base"

      [databases]
      default = "sqlite:///default.db"
      s0 = { ENGINE = "postgresql", NAME = "s0", HOST = "127.0.0.1" }

      [ring]
      shards = ["s0", "s1"]     # or a table alias -> weight
      vnodes = 1024             # mode = "buckets" + buckets = 4096 for the balanced mode
      shard_keys = { orders = "user_id" }

Which one is meant: a path ending in ``.py`` is a Python settings file, imported
as the module named by its stem with its folder on ``sys.path`` (the Django habit,
``--settings settings.py``); a path ending in ``.toml``, or naming an existing file,
is a TOML file; anything else is a dotted module path.  With no argument, the
environment variable ``SHARDKIT_SETTINGS`` names any of them.  This module is the one
loader: :func:`load_settings`, :meth:`Cluster.from_settings <shardkit.Cluster.from_settings>`
and every ``shardkit`` command read settings through it, so each way in behaves alike.

The ring and the router chain: when the settings define a ring and no router
of ``DATABASE_ROUTERS`` is a :class:`~shardkit.HashRingRouter`, a
``HashRingRouter(ring, shard_keys=...)`` is appended to the chain (after the
listed routers, so they are asked first).  When they define no ring but a
listed router is a ``HashRingRouter``, its ring is the settings' ring.  Every
shard of the ring must be an alias of ``DATABASES``.

Every mistake (a path that does not exist, a module that does not import, a
TOML syntax error, an unknown key, a ring shard missing from ``DATABASES``) is
a :class:`~shardkit.errors.ConfigError` with a one-line message that never
contains a password.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ._cluster import Cluster
from ._find import import_object, ring_router_of
from .errors import ConfigError, brief
from .ring import HashRing, HashRingRouter

__all__ = ["ENV_VAR", "Settings", "import_object", "load_settings", "ring_router_of"]

logger = logging.getLogger(__name__)

ENV_VAR = "SHARDKIT_SETTINGS"
"""The environment variable naming the settings (a dotted module path or a TOML file)."""

_TOML_KEYS = frozenset({"databases", "routers", "ring", "metadata"})
_RING_KEYS = frozenset({"version", "generation", "mode", "shards", "vnodes", "buckets", "table"})


@dataclass(frozen=True)
class Settings:
    """What a settings module or file describes.

    :param cluster: the :class:`~shardkit.Cluster` built from ``DATABASES`` and the routers.
    :param ring: the hash ring (``SHARDKIT_RING`` / ``[ring]`` / the ``HashRingRouter``'s), or ``None``.
    :param metadata: ``SHARDKIT_METADATA`` / ``metadata``: a ``"module:attr"`` path or the object, or ``None``.
    :param source: where the settings came from (a module name or a file path), for messages.
    """

    cluster: Cluster
    ring: HashRing | None = None
    metadata: Any = None
    source: str = ""

    def get_metadata(self, override: Any = None) -> Any:
        """The MetaData or declarative base to migrate: ``override`` if given, else the settings'.

        Strings (``"package.module:Base"`` or ``"package.module.Base"``) are imported.

        :raises ConfigError: neither is given, or the path does not import.
        """
        target = override if override is not None else self.metadata
        if target is None:
            raise ConfigError(
                f"no metadata to migrate: pass --metadata package.module:Base or set SHARDKIT_METADATA "
                f"(`metadata = ...` in a TOML file) in {self.source or 'the settings'}"
            )
        return import_object(target) if isinstance(target, str) else target

    def require_ring(self) -> HashRing:
        """The ring, or a :class:`ConfigError` saying how to define one."""
        if self.ring is None:
            raise ConfigError(
                f"{self.source or 'the settings'} define no hash ring: set SHARDKIT_RING (a HashRing or its "
                "to_dict()), a [ring] table in a TOML file, or put a HashRingRouter in DATABASE_ROUTERS"
            )
        return self.ring


def load_settings(
    source: str | os.PathLike[str] | ModuleType | None = None,
    *,
    cluster_class: type[Cluster] = Cluster,
    **cluster_options: Any,
) -> Settings:
    """Load a cluster and its ring from a settings module or a TOML file.

    :param source: a dotted module path, the module itself, the path of a Python
        settings file (``settings.py``) or of a TOML file; ``None`` reads the
        environment variable ``SHARDKIT_SETTINGS``.
    :param cluster_class: the class of the cluster built (a subclass of :class:`~shardkit.Cluster`).
    :param cluster_options: keyword arguments for :class:`~shardkit.Cluster`
        (``engine_options``, ``deadline`` ...).
    :raises ConfigError: the settings cannot be found, read or validated.

    >>> settings = load_settings("myproject.settings")  # doctest: +SKIP
    >>> settings.cluster.aliases, settings.ring  # doctest: +SKIP
    """
    if source is None:
        source = os.environ.get(ENV_VAR) or None
        if source is None:
            raise ConfigError(f"no settings given: pass --settings (a module or a .toml file) or set {ENV_VAR}")
    if isinstance(source, ModuleType):
        return _from_module(source, cluster_class, cluster_options)
    text = os.fspath(source)
    if not text.strip():
        raise ConfigError("the settings name is empty")
    if text.strip().endswith(".py"):  # the Django habit: a file path where a module name goes
        return _from_module(_module_from_file(Path(text.strip())), cluster_class, cluster_options)
    if _looks_like_file(text):
        return _from_toml(Path(text), cluster_class, cluster_options)
    return _from_module(_import_settings(text), cluster_class, cluster_options)


# ----------------------------------------------------------------------------- sources
def _looks_like_file(text: str) -> bool:
    return text.endswith(".toml") or os.sep in text or "/" in text or Path(text).is_file()


def _import_settings(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise ConfigError(
                f"settings module {name!r} not found (is its folder on sys.path? a TOML file needs the .toml suffix)",
                settings=name,
            ) from exc
        raise ConfigError(f"settings module {name!r} does not import: {brief(exc)}", settings=name) from exc
    except Exception as exc:  # a syntax error or a crash inside the user's module
        raise ConfigError(f"settings module {name!r} does not import: {brief(exc)}", settings=name) from exc


def _module_from_file(path: Path) -> ModuleType:
    """Import the settings file ``path`` as the module named by its stem, its folder on ``sys.path``.

    The folder goes on ``sys.path`` (as ``python path/to/settings.py`` would do) so that the
    file's own imports and paths such as ``SHARDKIT_METADATA = "models:Base"`` resolve; an
    already imported module of the same name and file is reused.
    """
    if not path.is_file():
        raise ConfigError(f"settings file {str(path)!r} does not exist", settings=str(path))
    path = path.resolve()
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(
            f"settings file {str(path)!r}: {name!r} is not a Python module name; rename the file", settings=str(path)
        )
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    known = sys.modules.get(name)
    known_file = getattr(known, "__file__", None)
    if known is not None and known_file and Path(known_file).resolve() == path:
        return known
    if known is not None:
        raise ConfigError(
            f"settings file {str(path)!r}: another module named {name!r} is already imported "
            f"({known_file or 'built in'}); rename the file or pass a dotted module path",
            settings=str(path),
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has a loader
        raise ConfigError(f"settings file {str(path)!r} cannot be imported", settings=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code failed: a settings mistake, in one line
        del sys.modules[name]
        raise ConfigError(f"settings file {str(path)!r} does not import: {brief(exc)}", settings=str(path)) from exc
    return module


def _from_module(module: ModuleType, cluster_class: type[Cluster], options: Mapping[str, Any]) -> Settings:
    source = module.__name__
    databases = getattr(module, "DATABASES", None)
    if databases is None:
        raise ConfigError(f"settings module {source!r} defines no DATABASES", settings=source)
    routers = list(getattr(module, "DATABASE_ROUTERS", ()) or ())
    ring = _ring_from_value(getattr(module, "SHARDKIT_RING", None), f"{source}.SHARDKIT_RING")
    shard_keys = getattr(module, "SHARDKIT_SHARD_KEYS", None)
    metadata = getattr(module, "SHARDKIT_METADATA", None)
    return _build(source, databases, routers, ring, shard_keys, metadata, cluster_class, options)


def _from_toml(path: Path, cluster_class: type[Cluster], options: Mapping[str, Any]) -> Settings:
    source = str(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"settings file {source!r} does not exist", settings=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"settings file {source!r} cannot be read: {brief(exc)}", settings=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {source!r} is not valid TOML: {exc}", settings=source) from None
    unknown = sorted(set(data) - _TOML_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_TOML_KEYS))})",
            settings=source,
            keys=unknown,
        )
    databases = data.get("databases")
    if not isinstance(databases, Mapping):
        raise ConfigError(f"{source}: a [databases] table is required", settings=source)
    databases = {alias: _toml_alias(source, alias, entry) for alias, entry in databases.items()}
    routers = data.get("routers", [])
    if not isinstance(routers, list) or not all(isinstance(r, str) for r in routers):
        raise ConfigError(f"{source}: 'routers' must be a list of dotted paths", settings=source)
    ring_data = data.get("ring")
    shard_keys = None
    ring = None
    if ring_data is not None:
        if not isinstance(ring_data, Mapping):
            raise ConfigError(f"{source}: 'ring' must be a table", settings=source)
        ring_data = dict(ring_data)
        shard_keys = ring_data.pop("shard_keys", None)
        ring = _ring_from_value(ring_data, f"{source} [ring]")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        raise ConfigError(f"{source}: 'metadata' must be a 'package.module:Base' string", settings=source)
    return _build(source, databases, routers, ring, shard_keys, metadata, cluster_class, options)


def _toml_alias(source: str, alias: str, entry: Any) -> Any:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        # Django's keys are upper case; TOML users may write them in lower case
        return {str(k).upper(): v for k, v in entry.items()}
    raise ConfigError(f"{source}: databases.{alias} must be a URL string or a table of ENGINE/NAME/...", alias=alias)


def _ring_from_value(value: Any, where: str) -> HashRing | None:
    if value is None or isinstance(value, HashRing):
        return value
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{where}: a string ring must be the JSON of HashRing.to_dict()") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a HashRing, its to_dict() dict or its JSON, not {type(value).__name__}")
    unknown = sorted(set(value) - _RING_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_RING_KEYS))}, shard_keys)"
        )
    try:
        return HashRing.from_dict(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _build(
    source: str,
    databases: Any,
    routers: list[Any],
    ring: HashRing | None,
    shard_keys: Any,
    metadata: Any,
    cluster_class: type[Cluster],
    options: Mapping[str, Any],
) -> Settings:
    if shard_keys is not None and not isinstance(shard_keys, Mapping):
        raise ConfigError(f"{source}: shard keys must map table names (or models) to attribute names")
    cluster = cluster_class(databases, routers, **options)
    ring_router = ring_router_of(cluster)
    if ring is None:
        if ring_router is not None:
            ring = ring_router.ring
    elif ring_router is not None:
        if ring_router.ring != ring:
            raise ConfigError(
                f"{source}: SHARDKIT_RING and the ring of the HashRingRouter in DATABASE_ROUTERS differ; "
                "define the ring once (the router's ring is used when SHARDKIT_RING is not set)"
            )
    else:
        # routers as loaded (paths imported, classes instantiated) plus the ring's router
        routers = [*cluster.router.routers, HashRingRouter(ring, shard_keys=shard_keys)]
        cluster = cluster_class(databases, routers, **options)
    if ring is not None:
        missing = [alias for alias in ring if alias not in cluster.aliases]
        if missing:
            raise ConfigError(
                f"{source}: ring shard(s) {', '.join(missing)} not in DATABASES "
                f"(aliases: {', '.join(cluster.aliases)})",
                aliases=missing,
            )
        replicas = [alias for alias in ring if cluster.spec(alias).replica_of is not None]
        if replicas:  # a replica is read-only: it serves its primary's reads, it is not a shard
            raise ConfigError(
                f"{source}: ring shard(s) {', '.join(replicas)} are replicas (of "
                f"{', '.join(str(cluster.spec(a).replica_of) for a in replicas)}), not shards",
                aliases=replicas,
            )
    logger.debug("settings %s: aliases %s, ring: %s", source, ", ".join(cluster.aliases), ring is not None)
    return Settings(cluster=cluster, ring=ring, metadata=metadata, source=source)
