"""The seed's two routers: auth models to "credentials", and primary/replica."""

from __future__ import annotations

from typing import Any


class AuthRouter:
    """Sends every model of the auth app to the "credentials" database."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str | None:
        return "credentials" if getattr(model, "app_label", None) == "auth" else None

    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        return "credentials" if getattr(model, "app_label", None) == "auth" else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        if "auth" in (getattr(obj1, "app_label", None), getattr(obj2, "app_label", None)):
            return getattr(obj1, "app_label", None) == getattr(obj2, "app_label", None)
        return None

    def allow_migrate(self, db: str, model: type[Any] | None, **hints: Any) -> bool | None:
        if model is not None and getattr(model, "app_label", None) == "auth":
            return db == "credentials"
        if db == "credentials":
            return False
        return None


class PrimaryReplicaRouter:
    """Reads go to the replica, writes to the primary (the seed's master/slave router)."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return "default"

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True  # both databases hold the same data

    def allow_migrate(self, db: str, model: type[Any] | None, **hints: Any) -> bool:
        return True


class LegacySyncdbRouter:
    """A Django 1.2 router: only the old allow_syncdb name."""

    def allow_syncdb(self, db: str, model: type[Any] | None) -> bool | None:
        if model is not None and getattr(model, "app_label", None) == "blog":
            return db == "default"
        return None
