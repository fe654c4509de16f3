"""Finding what the configuration names: an object by its dotted path, the ring router of a chain.

One home for both, so settings, the router chain, the resharder and the CLI agree:

* :func:`import_object` imports ``"package.module:attr"`` (or ``"package.module.attr"``): a
  ``DATABASE_ROUTERS`` entry, ``SHARDKIT_METADATA``, a CLI option that names an object.
* :func:`ring_router_of` is the first :class:`~shardkit.HashRingRouter` of a router chain.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .errors import ConfigError, brief
from .ring import HashRingRouter

__all__ = ["import_object", "ring_router_of"]

logger = logging.getLogger(__name__)


def import_object(path: str, *, what: str = "", error: type[ConfigError] = ConfigError) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute.

    :param what: what the path names, for messages (``"router"`` gives ``router 'x.Y' does not import``).
    :param error: the :class:`ConfigError` subclass to raise (``RouterImportError`` for routers).
    :raises ConfigError: (``error``) the path is not a path, the module or the attribute does not exist;
        ``path`` is kept as an attribute, the import's own exception as ``__cause__``.

    >>> import_object("shardkit:HashRing").__name__
    'HashRing'
    """
    named = f"{what} {path!r}" if what else repr(path)
    if ":" in path:
        module_path, _, attr = path.partition(":")
    else:
        module_path, _, attr = path.rpartition(".")
    if not module_path or not attr:
        raise error(f"{named} is not a path to an object: use 'package.module:name'", path=path)
    try:
        module = importlib.import_module(module_path)
    except Exception as exc:  # any failure while importing user code is a configuration mistake
        raise error(f"{named} does not import: {brief(exc)}", path=path) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise error(f"{named} does not import: {module_path!r} has no attribute {attr!r}", path=path) from None
    logger.debug("imported %s from %s", attr, module_path)
    return obj


def ring_router_of(source: Any) -> HashRingRouter | None:
    """The first :class:`~shardkit.HashRingRouter` of ``source``'s router chain, or ``None``.

    :param source: a :class:`~shardkit.Cluster`, a :class:`~shardkit.RouterChain` or a list of routers.
    """
    routers = getattr(getattr(source, "router", source), "routers", source)
    return next((r for r in routers if isinstance(r, HashRingRouter)), None)
