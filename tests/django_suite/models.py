"""The models of Django's tests/multiple_database/models.py, written with shardkit.

Django's ``auth.User`` is a small model of the ``auth`` app here; ``Review`` (a generic
relation through contenttypes) is not ported (see docs/django.md).
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Column, Date, ForeignKey, Integer, String, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit


class Base(shardkit.ModelMixin, DeclarativeBase):
    app_label = "multiple_database"


class PersonManager(shardkit.Manager["Person"]):
    def get_by_natural_key(self, name: str) -> Person:
        return self.get(name=name)


book_authors = Table(
    "multiple_database_book_authors",
    Base.metadata,
    Column("book_id", Integer, ForeignKey("multiple_database_book.id"), primary_key=True),
    Column("person_id", Integer, ForeignKey("multiple_database_person.id"), primary_key=True),
)


class Person(Base):
    __tablename__ = "multiple_database_person"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    book_set: Mapped[list[Book]] = relationship(secondary=book_authors, back_populates="authors")
    edited: Mapped[list[Book]] = relationship(back_populates="editor")
    pet_set: Mapped[list[Pet]] = relationship(back_populates="owner", cascade="all, delete-orphan")

    objects = PersonManager()

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class BookManager(shardkit.Manager["Book"]):
    """Strips ``extra_arg``: shows that related managers run the model's own manager."""

    def create(self, *args: Any, extra_arg: Any = None, **kwargs: Any) -> Book:
        return super().create(**kwargs)

    def get_or_create(
        self, defaults: dict[str, Any] | None = None, extra_arg: Any = None, **kwargs: Any
    ) -> tuple[Book, bool]:
        return super().get_or_create(defaults, **kwargs)


class Book(Base):
    __tablename__ = "multiple_database_book"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    published: Mapped[datetime.date] = mapped_column(Date)
    pages: Mapped[int] = mapped_column(default=100)
    editor_id: Mapped[int | None] = mapped_column(ForeignKey("multiple_database_person.id", ondelete="SET NULL"))
    authors: Mapped[list[Person]] = relationship(secondary=book_authors, back_populates="book_set")
    editor: Mapped[Person | None] = relationship(back_populates="edited")

    objects = BookManager()

    class Meta:
        ordering = ("title",)

    def __str__(self) -> str:
        return self.title


class Pet(Base):
    __tablename__ = "multiple_database_pet"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    owner_id: Mapped[int] = mapped_column(ForeignKey("multiple_database_person.id", ondelete="CASCADE"))
    owner: Mapped[Person] = relationship(back_populates="pet_set")

    class Meta:
        ordering = ("name",)


class UserManager(shardkit.Manager["User"]):
    def create_user(self, username: str, email: str | None = None, password: str | None = None) -> User:
        return self.create(username=username, email=email or "", password=password or "!")


class User(Base):
    """Django's ``auth.User``, as far as these tests use it."""

    __tablename__ = "auth_user"
    app_label = "auth"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(150), unique=True)
    email: Mapped[str] = mapped_column(String(254), default="")
    password: Mapped[str] = mapped_column(String(128), default="!")
    userprofile: Mapped[UserProfile | None] = relationship(back_populates="user")

    objects = UserManager()

    def set_unusable_password(self) -> None:
        self.password = "!"

    def __str__(self) -> str:
        return self.username


class UserProfile(Base):
    __tablename__ = "multiple_database_userprofile"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("auth_user.id", ondelete="SET NULL"), unique=True)
    flavor: Mapped[str] = mapped_column(String(100))
    user: Mapped[User | None] = relationship(back_populates="userprofile")

    class Meta:
        ordering = ("flavor",)
