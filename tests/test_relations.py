"""allow_relation enforced at assignment and at flush; the cross-shard write setting."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Column, ForeignKey, Table, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit
from shardkit.errors import CrossShardWriteError, RelationError

from .app.models import Author, Base, Book


@pytest.fixture
def cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    # no routers: objects go where save(using=) puts them, and the default
    # allow_relation allows two objects only when they are on the same database
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(Base)
    yield cluster
    cluster.dispose()


def rows(cluster: shardkit.Cluster, alias: str, table: str) -> int:
    with cluster.engine(alias).connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_many_to_one_set_across_databases_is_refused_at_assignment(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        author = Author(id=1, name="far")
        s.save(author, using="other")
        s.commit()
        book = Book(id=1, title="t", author_id=None)
        s.save(book, using="default")
        # the backref fires too: either side of the relationship may be the one named
        with pytest.raises(RelationError, match=r"(Book\.author|Author\.books) refused") as info:
            book.author = author
        assert {info.value.alias1, info.value.alias2} == {"default", "other"}
        assert {info.value.model1, info.value.model2} == {Author, Book}
        assert book.author is None  # the assignment did not happen
        s.expunge(book)
        s.commit()
    assert rows(cluster, "default", "blog_book") == 0
    assert rows(cluster, "other", "blog_book") == 0


def test_one_to_many_append_across_databases_is_refused(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        author = Author(id=1, name="here")
        s.save(author, using="default")
        s.commit()
        s.save(Author(id=1, name="twin"), using="other")  # so the stray's own FK holds there
        s.commit()
        stray = Book(id=2, title="elsewhere", author_id=1)
        s.save(stray, using="other")
        s.commit()
        with pytest.raises(RelationError, match=r"(Author\.books|Book\.author) refused"):
            author.books.append(stray)
        assert author.books == []


def test_same_database_relations_are_allowed(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        author = Author(id=1, name="a")
        s.save(author, using="other")
        s.commit()
        book = Book(id=1, title="t")
        book.author = author  # a new book follows its author
        s.add(book)
        s.commit()
        assert shardkit.db_of(book) == "other"
    assert rows(cluster, "other", "blog_book") == 1


def test_refusal_at_flush_writes_nothing_anywhere(cluster: shardkit.Cluster) -> None:
    class Router:
        """Places authors by id parity, so a parent can be found from a foreign key alone."""

        def db_for_read(self, model: type, **hints: object) -> str | None:
            return None

        def allow_relation(self, obj1: object, obj2: object, **hints: object) -> bool | None:
            return None

    with cluster.session() as s:
        author = Author(id=1, name="a")
        s.save(author, using="other")
        s.commit()
        # the relationship is set on a new object whose database is decided only at flush
        book = Book(id=5, title="late")
        s.add(book)
        book.author = author  # the book has no placement yet: it follows its author (allowed)
        other_author = Author(id=2, name="b")
        s.save(other_author, using="default")
        book2 = Book(id=6, title="wrong", author=author)
        s.save(book2, using="default")  # explicitly placed away from its author
        with pytest.raises(RelationError, match=r"Book\.author"):
            s.flush()
        s.rollback()
    assert rows(cluster, "default", "blog_book") == 0
    assert rows(cluster, "other", "blog_book") == 0
    assert rows(cluster, "default", "blog_author") == 0


def test_refuse_cross_shard_writes(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "other"), cross_shard_writes="refuse")
    cluster.create_all(Base)
    with cluster.session() as s:
        s.save(Author(id=1, name="x"), using="default")
        s.save(Author(id=2, name="y"), using="other")
        with pytest.raises(CrossShardWriteError, match="default, other"):
            s.commit()
        s.rollback()
        s.save(Author(id=3, name="one place"), using="other")
        s.commit()  # one database per transaction is fine
        s.save(Author(id=4, name="second transaction"), using="default")
        s.commit()
    assert rows(cluster, "default", "blog_author") == 1
    assert rows(cluster, "other", "blog_author") == 1
    cluster.dispose()
    with pytest.raises(shardkit.errors.ConfigError, match="cross_shard_writes"):
        shardkit.Cluster({"default": "sqlite://"}, cross_shard_writes="sometimes")


class _M2MBase(DeclarativeBase):
    pass


_article_tags = Table(
    "article_tags",
    _M2MBase.metadata,
    Column("article_id", ForeignKey("articles.id"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id"), primary_key=True),
)


class Article(_M2MBase):
    __tablename__ = "articles"
    id: Mapped[int] = mapped_column(primary_key=True)
    tags: Mapped[list[Tag]] = relationship(secondary=_article_tags)


class Tag(_M2MBase):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_many_to_many_append_across_databases_is_refused(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(_M2MBase)
    with cluster.session() as s:
        article, near, far = Article(id=1), Tag(id=1), Tag(id=2)
        s.save(article, using="default")
        s.save(near, using="default")
        s.save(far, using="other")
        s.commit()
        article.tags.append(near)  # same database: allowed
        with pytest.raises(RelationError, match=r"Article\.tags refused.*'default'.*'other'"):
            article.tags.append(far)
        assert article.tags == [near]
        s.commit()
    with cluster.engine("default").connect() as conn:
        assert conn.execute(text("SELECT article_id, tag_id FROM article_tags")).all() == [(1, 1)]
    cluster.dispose()


def test_many_to_many_made_before_placement_is_refused_at_flush(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(_M2MBase)
    with cluster.session() as s:
        far = Tag(id=9)
        s.save(far, using="other")
        s.commit()
        article = Article(id=2)
        article.tags.append(far)  # not placed yet: it takes its tag's database, as in Django...
        assert shardkit.db_of(article) == "other"
        s.save(article, using="default")  # ...until placed explicitly elsewhere, after the append
        with pytest.raises(RelationError, match=r"Article\.tags"):
            s.flush()
        s.rollback()
    with cluster.engine("default").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM article_tags")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM articles")).scalar() == 0
    cluster.dispose()


class SpecialArticle(Article):
    """Single-table subclass: it inherits the relationship and must be checked too."""


def test_subclass_relations_are_checked(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(_M2MBase)
    with cluster.session() as s:
        special, far = SpecialArticle(id=3), Tag(id=10)
        s.save(special, using="default")
        s.save(far, using="other")
        s.commit()
        with pytest.raises(RelationError, match="refused"):
            special.tags.append(far)
    cluster.dispose()


def link_rows(cluster: shardkit.Cluster, alias: str) -> list[tuple[int, int]]:
    with cluster.engine(alias).connect() as conn:
        return [(a, t) for a, t in conn.execute(text("SELECT article_id, tag_id FROM article_tags ORDER BY 1, 2"))]


@pytest.fixture
def m2m_cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(_M2MBase)
    yield cluster
    cluster.dispose()


def test_many_to_many_link_rows_are_written_where_the_owner_lives(m2m_cluster: shardkit.Cluster) -> None:
    cluster = m2m_cluster
    with cluster.session() as s:  # both ends on "other", the session is not pinned
        s.save(Article(id=1), using="other")
        s.save(Tag(id=1), using="other")
        s.commit()
    with cluster.session() as s:
        article = s.scalars(select(Article).options(shardkit.using("other"))).one()
        tag = s.scalars(select(Tag).options(shardkit.using("other"))).one()
        article.tags.append(tag)
        s.commit()
        assert shardkit.db_of(article) == "other"  # only a relation changed: it stays where it is
        assert shardkit.db_of(tag) == "other"
    assert link_rows(cluster, "other") == [(1, 1)]
    assert link_rows(cluster, "default") == []
    with cluster.session() as s:
        article = s.scalars(select(Article).options(shardkit.using("other"))).one()
        assert [t.id for t in article.tags] == [1]
        article.tags.remove(article.tags[0])
        s.commit()
    assert link_rows(cluster, "other") == []


def test_link_rows_of_owners_on_two_databases_in_one_flush(m2m_cluster: shardkit.Cluster) -> None:
    cluster = m2m_cluster
    with cluster.session() as s:
        for alias in ("default", "other"):  # the same ids on both databases
            s.save(Article(id=1), using=alias)
            s.save(Tag(id=1), using=alias)
        s.commit()
    with cluster.session() as s:
        for alias in ("default", "other"):
            article = s.scalars(select(Article).options(shardkit.using(alias))).one()
            article.tags.append(s.scalars(select(Tag).options(shardkit.using(alias))).one())
        s.commit()
    assert link_rows(cluster, "default") == [(1, 1)]
    assert link_rows(cluster, "other") == [(1, 1)]
    with cluster.session() as s:  # deleting the owner deletes its link rows on its database only
        s.delete(s.scalars(select(Article).options(shardkit.using("other"))).one())
        s.commit()
    assert link_rows(cluster, "default") == [(1, 1)]
    assert link_rows(cluster, "other") == []


def test_objects_created_through_a_collection_go_to_the_owners_database(m2m_cluster: shardkit.Cluster) -> None:
    cluster = m2m_cluster
    with cluster.session() as s:
        s.save(Article(id=7), using="other")
        s.commit()
    with cluster.session() as s:
        article = s.scalars(select(Article).options(shardkit.using("other"))).one()
        article.tags.append(Tag(id=3))  # a new tag, through the collection
        s.commit()
        assert shardkit.db_of(article.tags[0]) == "other"
    assert link_rows(cluster, "other") == [(7, 3)]
    with cluster.engine("default").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tags")).scalar() == 0


def test_link_rows_ask_db_for_write_of_the_link_table_with_the_owner(m2m_cluster: shardkit.Cluster) -> None:
    asked: list[tuple[object, dict[str, object]]] = []

    class LinkRouter:
        def db_for_write(self, model: object, **hints: object) -> str | None:
            if model is _article_tags:
                asked.append((model, dict(hints)))
                return "default"
            return None

        def allow_relation(self, obj1: object, obj2: object, **hints: object) -> bool:
            return True

    cluster = shardkit.Cluster({a: str(cluster_url(m2m_cluster, a)) for a in ("default", "other")}, [LinkRouter()])
    with cluster.session() as s:
        for alias in ("default", "other"):  # a copy on both, as with a primary and its replica
            s.save(Article(id=1), using=alias)
            s.save(Tag(id=1), using=alias)
        s.commit()
        article = s.scalars(select(Article).options(shardkit.using("other"))).one()
        article.tags.append(s.scalars(select(Tag).options(shardkit.using("other"))).one())
        s.commit()
        assert asked == [(_article_tags, {"instance": article})]
    assert link_rows(cluster, "default") == [(1, 1)]
    assert link_rows(cluster, "other") == []
    cluster.dispose()


def cluster_url(cluster: shardkit.Cluster, alias: str) -> str:
    return cluster.engine(alias).url.render_as_string(hide_password=False)


class _O2OBase(DeclarativeBase):
    pass


class Owner(_O2OBase):
    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(primary_key=True)
    profile: Mapped[Profile | None] = relationship(back_populates="owner")


class Profile(_O2OBase):
    __tablename__ = "profiles"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owners.id"), unique=True)
    owner: Mapped[Owner | None] = relationship(back_populates="profile")


@pytest.fixture
def o2o_cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(_O2OBase)
    yield cluster
    cluster.dispose()


def test_one_to_one_with_an_object_on_another_database_is_placed_with_it(o2o_cluster: shardkit.Cluster) -> None:
    cluster = o2o_cluster
    with cluster.session() as s:
        s.save(Profile(id=1), using="other")
        s.commit()
        profile = s.scalars(select(Profile).options(shardkit.using("other"))).one()
        owner = Owner()
        owner.profile = profile  # Django sets the new owner's database here: the profile's
        assert shardkit.db_of(owner) == "other"
        s.save(owner)
        s.commit()
        assert shardkit.db_of(owner) == "other"
        assert profile.owner_id == owner.id
    with cluster.engine("other").connect() as conn:
        assert conn.execute(text("SELECT o.id FROM owners o JOIN profiles p ON p.owner_id = o.id")).all() != []
    with cluster.engine("default").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM owners")).scalar() == 0


def test_one_to_one_across_databases_is_refused_when_routers_say_no(o2o_cluster: shardkit.Cluster) -> None:
    cluster = o2o_cluster
    with cluster.session() as s:
        s.save(Profile(id=1), using="other")
        s.commit()
        profile = s.scalars(select(Profile).options(shardkit.using("other"))).one()
        owner = Owner(id=5)
        s.save(owner, using="default")  # placed on "default" before the assignment
        with pytest.raises(ValueError, match="the current database router prevents this relation") as info:
            owner.profile = profile
        assert isinstance(info.value, RelationError)
        assert owner.profile is None
        s.rollback()
    for alias in ("default", "other"):
        with cluster.engine(alias).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM owners")).scalar() == 0


def test_db_of_is_unchanged_when_only_a_relation_changes(m2m_cluster: shardkit.Cluster) -> None:
    class WritesToDefault:
        def db_for_write(self, model: object, **hints: object) -> str:
            return "default"

        def allow_relation(self, obj1: object, obj2: object, **hints: object) -> bool:
            return True

    urls = {a: cluster_url(m2m_cluster, a) for a in ("default", "other")}
    cluster = shardkit.Cluster(urls, [WritesToDefault()])
    with cluster.session() as s:
        for alias in ("default", "other"):
            s.save(Article(id=1), using=alias)
            s.save(Tag(id=1), using=alias)
        s.commit()
        article = s.scalars(select(Article).options(shardkit.using("other"))).one()
        article.tags.append(s.scalars(select(Tag).options(shardkit.using("other"))).one())
        s.commit()  # wrote a link row (to "default", the routers say), nothing of the article
        assert shardkit.db_of(article) == "other"
    assert link_rows(cluster, "default") == [(1, 1)]
    cluster.dispose()
