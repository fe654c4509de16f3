"""The example's models and router: users sharded by id on the ring, countries on default only."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Country(Base):
    """Unsharded: lives on ``default`` only (see :class:`UnshardedOnDefault`)."""

    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class User(Base):
    """Sharded by id: the ring's router allows its table on the ring's shards only."""

    __tablename__ = "users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str | None] = mapped_column(String(200))  # added by revision 0002


class UnshardedOnDefault:
    """Tables of models without a shard key go to ``default`` only; sharded ones pass to the ring's router."""

    def allow_migrate(self, db: str, model: Any, **hints: Any) -> bool | None:
        if model is not None and getattr(model, "__shard_key__", None):
            return None
        return db == "default"
