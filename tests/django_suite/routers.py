"""The routers of Django's tests/multiple_database/routers.py; ``obj._state.db`` is
``shardkit.db_of(obj)``, ``model._meta.app_label`` the model's ``app_label``."""

from __future__ import annotations

from typing import Any

import shardkit

DEFAULT_DB_ALIAS = shardkit.DEFAULT_DB_ALIAS


class TestRouter:
    """Vaguely behave like primary/replica, but the databases aren't assumed to propagate changes."""

    __test__ = False  # not a pytest class

    def db_for_read(self, model: Any, instance: Any = None, **hints: Any) -> str:
        if instance is not None:
            return shardkit.db_of(instance) or "other"
        return "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return shardkit.db_of(obj1) in ("default", "other") and shardkit.db_of(obj2) in ("default", "other")

    def allow_migrate(self, db: str, app_label: str | None, **hints: Any) -> bool:
        return True


class AuthRouter:
    """Control all database operations on models in the contrib.auth application."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        "Point all read operations on auth models to 'default'"
        if getattr(model, "app_label", None) == "auth":
            # We use default here to ensure we can tell the difference
            # between a read request and a write request for Auth objects
            return "default"
        return None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        "Point all operations on auth models to 'other'"
        if getattr(model, "app_label", None) == "auth":
            return "other"
        return None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        "Allow any relation if a model in Auth is involved"
        if getattr(obj1, "app_label", None) == "auth" or getattr(obj2, "app_label", None) == "auth":
            return True
        return None

    def allow_migrate(self, db: str, app_label: str | None, **hints: Any) -> bool | None:
        "Make sure the auth app only appears on the 'other' db"
        if app_label == "auth":
            return db == "other"
        return None


class WriteRouter:
    # A router that only expresses an opinion on writes
    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "writer"
