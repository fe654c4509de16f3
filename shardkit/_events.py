"""Events with the database alias: Django's ``pre_save`` / ``post_save`` / ``pre_delete`` /
``post_delete`` / ``m2m_changed`` signals (which carry ``using=``), in SQLAlchemy's style::

    @shardkit.listens_for(Person, "post_save")
    def saved(instance, using, created, **kw):
        print(f"{instance!r} written to {using} ({'insert' if created else 'update'})")

    shardkit.listen(Book, "m2m_changed", on_links)   # and shardkit.remove(...), shardkit.contains(...)

A listener registered on a class also hears its subclasses (register on your declarative base to
hear every model); ``m2m_changed`` can also be registered on the link (secondary) ``Table``.
Listeners are called with keyword arguments only, and should accept ``**kw``:

==============  =====================================================================================
event           keyword arguments
==============  =====================================================================================
pre_save        ``instance``, ``using`` (the alias it is about to be written to), ``created``
post_save       ``instance``, ``using`` (the alias it was written to), ``created`` (it was an INSERT)
pre_delete      ``instance``, ``using``
post_delete     ``instance``, ``using``
m2m_changed     ``instance``, ``action`` (``pre_add`` ``post_add`` ``pre_remove`` ``post_remove``
                ``pre_clear`` ``post_clear``), ``model`` (the class on the other side), ``pk_set``
                (primary keys added or removed; ``None`` for a clear), ``using`` (the alias of the
                link rows), ``reverse`` (``True`` from the back-reference side: the relationship
                of the pair declared second), ``relationship`` (the attribute name), ``through``
                (the link table)
==============  =====================================================================================

The save and delete events are sent by every flush of a :class:`~shardkit.ShardSession` (so by
``save()``, ``delete()``, ``create()`` and a plain ``session.commit()``), once the aliases of the
whole flush are decided: ``pre_*`` before any statement, ``post_*`` after the flush wrote
everything.  ``m2m_changed`` is sent by the related managers (``add``, ``remove``, ``clear``,
``set``), not by in-memory list operations flushed later.  An exception a listener raises
propagates: from a ``pre_*`` event it stops the flush before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ShardkitError

__all__ = ["EVENTS", "contains", "listen", "listens_for", "remove"]

EVENTS = ("pre_save", "post_save", "pre_delete", "post_delete", "m2m_changed")

_listeners: dict[tuple[Any, str], list[Callable[..., Any]]] = {}


def _check(identifier: str) -> None:
    if identifier not in EVENTS:
        raise ShardkitError(f"unknown shardkit event {identifier!r} (events: {', '.join(EVENTS)})")


def listen(target: Any, identifier: str, fn: Callable[..., Any]) -> None:
    """Call ``fn(**kw)`` on ``identifier`` for ``target`` (a mapped class and its subclasses, or a link table).

    :param target: a mapped class, or for ``m2m_changed`` also a secondary ``Table``.
    :param identifier: one of :data:`EVENTS`.
    """
    _check(identifier)
    _listeners.setdefault((target, identifier), []).append(fn)


def listens_for(target: Any, identifier: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of :func:`listen`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        listen(target, identifier, fn)
        return fn

    return decorate


def remove(target: Any, identifier: str, fn: Callable[..., Any]) -> None:
    """Stop calling ``fn``; a listener that was not registered is an error, as in SQLAlchemy."""
    _check(identifier)
    fns = _listeners.get((target, identifier), [])
    if fn not in fns:
        raise ShardkitError(f"{fn!r} is not listening to {identifier!r} on {target!r}")
    fns.remove(fn)
    if not fns:
        del _listeners[(target, identifier)]


def contains(target: Any, identifier: str, fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` listens to ``identifier`` on ``target``."""
    return fn in _listeners.get((target, identifier), ())


def active() -> bool:
    """Whether any listener is registered (the flush skips all of this when none is)."""
    return bool(_listeners)


def fire(identifier: str, *targets: Any, **kw: Any) -> None:
    """Call the listeners of ``identifier`` registered on any of ``targets`` (classes: their MRO)."""
    if not _listeners:
        return
    seen: set[int] = set()
    for target in targets:
        chain = target.__mro__ if isinstance(target, type) else (target,)
        for t in chain:
            for fn in list(_listeners.get((t, identifier), ())):
                if id(fn) not in seen:
                    seen.add(id(fn))
                    fn(**kw)
