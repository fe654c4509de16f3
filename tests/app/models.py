"""Models in the shape of the seed's examples: auth models, and application models."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit


class Base(shardkit.ModelMixin, DeclarativeBase):
    pass


class UserManager(shardkit.Manager["User"]):
    """A manager with a method of its own, as Django's UserManager.create_user()."""

    def create_user(self, username: str, email: str = "") -> User:
        return self.create(username=username, email=email.lower())


class User(Base):
    __tablename__ = "auth_user"
    app_label = "auth"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(100), default="")

    objects = UserManager()


class Author(Base):
    __tablename__ = "blog_author"
    app_label = "blog"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(default=0)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "blog_book"
    app_label = "blog"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("blog_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")
