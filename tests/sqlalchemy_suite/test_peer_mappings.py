"""The other test classes of SQLAlchemy's ``test/ext/test_horizontal_shard.py``, on shardkit.

``SelectinloadRegressionTest``, ``RefreshDeferExpireTest``, ``LazyLoadIdentityKeyTest`` and
``UseAssocProxForM2MTest`` each map their own small model and run it on one or two shards;
here each runs on SQLite files and on PostgreSQL databases (the ``make_urls`` fixture), with
a router where the peer passes chooser functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, event, inspect
from sqlalchemy.ext.associationproxy import association_proxy
from sqlalchemy.orm import DeclarativeBase, Session, deferred, relationship, selectinload

import shardkit

# ----------------------------------------------------------------------------- the models


class BookBase(DeclarativeBase):
    pass


class Book(BookBase):
    __tablename__ = "book"
    id = Column(Integer, primary_key=True)
    title = Column(String(50))
    pages = relationship("Page", backref="book")


class Page(BookBase):
    __tablename__ = "page"
    id = Column(Integer, primary_key=True)
    book_id = Column(ForeignKey("book.id"))
    title = Column(String(50))


class ABase(DeclarativeBase):
    pass


class A(ABase):
    __tablename__ = "a"
    id = Column(Integer, primary_key=True)
    data = Column(String(30))
    deferred_data = deferred(Column(String(30)))


class M2MBase(DeclarativeBase):
    pass


class AssocBook(M2MBase):
    __tablename__ = "book"
    id = Column(Integer, primary_key=True)
    authors = association_proxy("book_authors", "author", creator=lambda author: BookAuthor(author=author))
    book_authors = relationship("BookAuthor", back_populates="book")


class BookAuthor(M2MBase):
    __tablename__ = "book_author"
    authorid = Column(ForeignKey("author.id"), primary_key=True)
    bookid = Column(ForeignKey("book.id"), primary_key=True)
    book = relationship("AssocBook", back_populates="book_authors")
    author = relationship("Author", back_populates="book_authors")


class Author(M2MBase):
    __tablename__ = "author"
    id = Column(Integer, primary_key=True)
    books = association_proxy("book_authors", "book", creator=lambda book: BookAuthor(book=book))
    book_authors = relationship(BookAuthor, back_populates="author")


# ---------------------------------------------------------------------------- the routers


class OneShard:
    """The peer's one-shard sessions: every write on ``alias``; reads where ``reads`` says."""

    def __init__(self, alias: str, reads: list[str] | None = None, strict: bool = False) -> None:
        self.alias = alias
        self.reads = reads or [alias]
        self.strict = strict

    def db_for_write(self, model: Any, *, instance: Any = None, statement: Any = None, **hints: Any) -> str:
        if self.strict and instance is None and statement is None:
            raise AssertionError("Cannot determine shard")  # the peer's shard_chooser refuses it too
        return self.alias

    def db_for_read(self, model: Any, *, instance: Any = None, **hints: Any) -> Any:
        return None if instance is not None else self.reads


class ByTitle:
    """LazyLoadIdentityKeyTest's choosers: "title 1" on test, "title 2" on test2."""

    def __init__(self) -> None:
        self.lazy_reads: list[tuple[str, str]] = []

    def db_for_write(self, model: Any, *, instance: Any = None, **hints: Any) -> Any:
        book = instance.book if isinstance(instance, Page) else instance
        if isinstance(book, Book):
            return {"title 1": "test", "title 2": "test2"}[book.title]
        return None

    def db_for_read(self, model: Any, *, instance: Any = None, **hints: Any) -> Any:
        if instance is not None:  # a lazy load from an object: its own shard (shardkit's default)
            self.lazy_reads.append((model.__name__, type(instance).__name__))
            return None
        return ["test", "test2"]


@pytest.fixture
def cluster_of(make_urls: Callable[..., dict[str, str]]) -> Iterator[Callable[..., shardkit.Cluster]]:
    made: list[shardkit.Cluster] = []

    def make(base: type[DeclarativeBase], shards: list[str], router: Any) -> shardkit.Cluster:
        cluster = shardkit.Cluster(make_urls("default", *shards), routers=[router])
        for alias in shards:
            base.metadata.create_all(cluster.engine(alias))
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.dispose()


class Statements:
    def __init__(self, cluster: shardkit.Cluster, aliases: list[str]) -> None:
        self.counts: Counter[str] = Counter()
        self.aliases = aliases
        for alias in aliases:
            event.listen(cluster.engine(alias), "before_cursor_execute", self._hook(alias))

    def _hook(self, alias: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            self.counts[alias] += 1

        return hook

    def per_alias(self) -> list[int]:
        return [self.counts[a] for a in self.aliases]


# ------------------------------------------------------------------ SelectinloadRegressionTest


def test_selectinload_query(cluster_of: Callable[..., shardkit.Cluster]) -> None:
    # SelectinloadRegressionTest.test_selectinload_query (#4175)
    cluster = cluster_of(BookBase, ["test"], OneShard("test"))
    with cluster.session() as session:
        book = Book()
        book.pages.append(Page())
        session.add(book)
        session.commit()
        result = session.query(Book).options(selectinload(Book.pages)).all()
        assert result == [book]
        assert len(result[0].pages) == 1


# --------------------------------------------------------------------- RefreshDeferExpireTest


@pytest.fixture
def main_cluster(cluster_of: Callable[..., shardkit.Cluster]) -> shardkit.Cluster:
    # reads would go to "main" and "fake" (not even an alias: asking the router fails): the
    # loads below must come from the object's identity token, never from the router
    cluster = cluster_of(ABase, ["main"], OneShard("main", reads=["fake", "main"]))
    with Session(cluster.engine("main")) as s:
        s.add(A(data="d1", deferred_data="d2"))
        s.commit()
    return cluster


def test_refresh(main_cluster: shardkit.Cluster) -> None:
    # RefreshDeferExpireTest.test_refresh
    with main_cluster.session() as session:
        a1 = session.query(A).set_shard("main").first()
        session.refresh(a1)
        assert a1.data == "d1"


def test_deferred(main_cluster: shardkit.Cluster) -> None:
    # RefreshDeferExpireTest.test_deferred
    with main_cluster.session() as session:
        a1 = session.query(A).set_shard("main").first()
        assert a1.deferred_data == "d2"


def test_unexpire(main_cluster: shardkit.Cluster) -> None:
    # RefreshDeferExpireTest.test_unexpire
    with main_cluster.session() as session:
        a1 = session.query(A).set_shard("main").first()
        session.expire(a1)
        assert a1.data == "d1"


# -------------------------------------------------------------------- LazyLoadIdentityKeyTest


@pytest.fixture
def titles(cluster_of: Callable[..., shardkit.Cluster]) -> tuple[shardkit.Cluster, ByTitle, Statements]:
    router = ByTitle()
    cluster = cluster_of(BookBase, ["test", "test2"], router)
    return cluster, router, Statements(cluster, ["test", "test2"])


def test_lazy_load_from_identity_map(titles: tuple[shardkit.Cluster, ByTitle, Statements]) -> None:
    # LazyLoadIdentityKeyTest.test_lazy_load_from_identity_map
    cluster, _router, statements = titles
    with cluster.session() as session:
        book = Book(title="title 1")
        book.pages.append(Page())
        session.add(book)
        session.flush()
        page = session.query(Page).first()
        session.expire(page, ["book"])
        before = statements.per_alias()
        assert page.book is book  # no SQL
        assert statements.per_alias() == before


def test_lazy_load_from_db(titles: tuple[shardkit.Cluster, ByTitle, Statements]) -> None:
    # LazyLoadIdentityKeyTest.test_lazy_load_from_db
    cluster, router, statements = titles
    with cluster.session() as session:
        book1 = Book(title="title 1")
        book1.pages.append(Page(title="book 1 page 1"))
        session.add(book1)
        session.flush()
        book1_id = inspect(book1).identity_key
        session.expunge(book1)
        book1_page = session.query(Page).first()
        session.expire(book1_page, ["book"])
        before = statements.per_alias()
        assert inspect(book1_page.book).identity_key == book1_id  # one query, on "test"
        after = statements.per_alias()
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0]
        assert ("Book", "Page") in router.lazy_reads


def test_lazy_load_no_baked_conflict(titles: tuple[shardkit.Cluster, ByTitle, Statements]) -> None:
    # LazyLoadIdentityKeyTest.test_lazy_load_no_baked_conflict
    cluster, router, _statements = titles
    with cluster.session() as session:
        book1 = Book(title="title 1")
        book1.pages.append(Page(title="book 1 page 1"))
        book2 = Book(title="title 2")
        book2.pages.append(Page(title="book 2 page 1"))
        session.add(book1)
        session.add(book2)
        session.flush()
        session.expire(book1, ["pages"])
        session.expire(book2, ["pages"])
        assert book1.pages[0].title == "book 1 page 1"
        # the second lazy load uses its own parent's shard
        assert book2.pages[0].title == "book 2 page 1"
        assert shardkit.db_of(book2.pages[0]) == "test2"
        assert router.lazy_reads.count(("Page", "Book")) == 2


# ---------------------------------------------------------------------- UseAssocProxForM2MTest


def test_update_many_to_many_sharded(cluster_of: Callable[..., shardkit.Cluster]) -> None:
    # UseAssocProxForM2MTest.test_update_many_to_many_sharded (#4376)
    cluster = cluster_of(M2MBase, ["test"], OneShard("test", strict=True))
    with cluster.session() as session:
        book = AssocBook()
        book.authors.append(Author())
        session.add(book)
        session.commit()
        assert [shardkit.db_of(a) for a in book.authors] == ["test"]


def test_update_many_to_many_sharded__save_junction_table_directly(
    cluster_of: Callable[..., shardkit.Cluster],
) -> None:
    # UseAssocProxForM2MTest.test_update_many_to_many_sharded__save_junction_table_directly
    cluster = cluster_of(M2MBase, ["test"], OneShard("test", strict=True))
    with cluster.session() as session:
        book = AssocBook()
        author = Author()
        session.add(book)
        session.add(author)
        session.commit()
        book_author = BookAuthor()
        book_author.bookid = book.id
        book_author.authorid = author.id
        session.add(book_author)
        session.commit()
        assert shardkit.db_of(book_author) == "test"
        assert session.query(BookAuthor).count() == 1
