"""Models with lookups for tests/lookups (and the subprocesses those tests start)."""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit


class Base(DeclarativeBase):
    pass


class User(shardkit.ModelMixin, Base):
    __tablename__ = "lk_users"
    __shard_key__ = "id"
    __lookups__ = {"email": {"unique": True}, "external_id": {}}

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(String(120))
    external_id: Mapped[str | None] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(60), default="")


class Order(shardkit.ModelMixin, Base):
    """A co-located child with no lookup (reads by it are untouched)."""

    __tablename__ = "lk_orders"
    __shard_key__ = "user_id"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("lk_users.id"))
    code: Mapped[str] = mapped_column(String(40), default="")


class Account(Base):
    """Lookups declared by the router (``HashRingRouter(lookups=...)``), not on the model."""

    __tablename__ = "lk_accounts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant: Mapped[int] = mapped_column(BigInteger)
    number: Mapped[str] = mapped_column(String(40))


class Ticket(Base):
    """``__lookups__`` on a model whose shard key only the router names (not its primary key)."""

    __tablename__ = "lk_tickets"
    __lookups__ = {"code": {"unique": True}}

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant: Mapped[int] = mapped_column(BigInteger)
    code: Mapped[str] = mapped_column(String(40))


SHARDS = ("s0", "s1", "s2", "s3")


def make_cluster(urls: dict[str, str], **kwargs: object) -> shardkit.Cluster:
    """A cluster of ``default`` + the ring's shards, with Account sharded by tenant and looked up by number."""
    ring = shardkit.HashRing([a for a in urls if a != "default"])
    router = shardkit.HashRingRouter(
        ring, shard_keys={Account: "tenant", Ticket: "tenant"}, lookups={"lk_accounts": {"number": {"unique": True}}}
    )
    return shardkit.Cluster(urls, [router], **kwargs)  # type: ignore[arg-type]
