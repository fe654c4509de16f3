"""Django's save() of a new object whose primary key is set, and values()/values_list() as lazy
querysets (issue 11 review): on SQLite files and on PostgreSQL."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit
from shardkit.errors import CrossDatabaseQueryError

from .conftest import StatementLog

_made = itertools.count(1)


def _stamp() -> str:
    """A callable default that counts its calls: Django evaluates a default once per object."""
    return f"made-{next(_made)}"


class Base(shardkit.ModelMixin, DeclarativeBase):
    pass


class Shelf(Base):
    __tablename__ = "rv11_shelf"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Doc(Base):
    __tablename__ = "rv11_doc"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    note: Mapped[str | None] = mapped_column(String(50), nullable=True)  # no default: Django writes None
    pages: Mapped[int | None] = mapped_column(default=100, nullable=True)
    copies: Mapped[int] = mapped_column(default=7, nullable=False)
    stamp: Mapped[str] = mapped_column(String(50), default=_stamp)
    echo: Mapped[str] = mapped_column(
        String(60), default=lambda ctx: ctx.get_current_parameters()["title"] + "!"
    )  # a default that reads the row's other values, as SQLAlchemy's context-taking callables do
    kept: Mapped[str] = mapped_column(String(50), server_default="srv")
    asked: Mapped[int] = mapped_column(default=lambda ctx: ctx.connection.scalar(text("SELECT 41")) + 1)
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("rv11_shelf.id"))
    shelf: Mapped[Shelf | None] = relationship()


class Tag(Base):
    """A primary key with a default of its own (Django's UUIDField(default=uuid4))."""

    __tablename__ = "rv11_tag"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(50))


class ToOther:
    """Writes every Doc on "other"."""

    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        return "other" if model is Doc else None


@pytest.fixture
def cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(Base)
    with cluster.activate():
        yield cluster
    cluster.dispose()


def rows(cluster: shardkit.Cluster, alias: str, sql: str) -> list[tuple[Any, ...]]:
    with cluster.engine(alias).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


DOC_ROW = "SELECT id, title, note, pages, copies, stamp, echo, kept, shelf_id FROM rv11_doc ORDER BY id"


def _old_doc(alias: str) -> None:
    Doc.objects.using(alias).create(
        id=3, title="Old", note="n", pages=1, copies=2, stamp="s", echo="e", kept="was here"
    )


# -- save() of a new object over an existing row: the UPDATE writes what Django would -------------


def test_save_using_new_object_over_a_row_writes_defaults_not_nulls(cluster: shardkit.Cluster) -> None:
    _old_doc("other")
    before = next(_made)
    doc = Doc(id=3, title="New")
    doc.save(using="other")
    stamp = f"made-{before + 1}"  # the callable ran exactly once
    # nullable with a default -> the default; NOT NULL with a default -> the default (no
    # IntegrityError); a callable (with or without the context) -> its value; no default -> NULL;
    # a server-side default only -> left as it is
    assert rows(cluster, "other", DOC_ROW) == [(3, "New", None, 100, 7, stamp, "New!", "was here", None)]
    assert (doc.pages, doc.copies, doc.stamp, doc.echo, doc.note) == (100, 7, stamp, "New!", None)
    assert doc.kept == "was here"  # read back from the row it now is
    assert doc.asked == 42  # a default that uses its context's connection
    assert shardkit.db_of(doc) == "other"
    assert rows(cluster, "default", DOC_ROW) == []
    assert next(_made) == before + 2


def test_save_using_new_object_keeps_the_values_it_was_given(cluster: shardkit.Cluster) -> None:
    _old_doc("other")
    shelf = Shelf.objects.using("other").create(id=9, name="top")
    Doc(id=3, title="New", pages=None, copies=5, stamp="mine", echo="me", kept="set", shelf=shelf).save(using="other")
    assert rows(cluster, "other", DOC_ROW) == [(3, "New", None, None, 5, "mine", "me", "set", 9)]


def test_save_using_new_object_without_a_row_is_an_insert_with_sqlalchemy_defaults(
    cluster: shardkit.Cluster,
) -> None:
    doc = Doc(id=4, title="Fresh")
    doc.save(using="other")
    (row,) = rows(cluster, "other", DOC_ROW)
    assert row[:5] == (4, "Fresh", None, 100, 7)
    assert row[5].startswith("made-") and row[6:] == ("Fresh!", "srv", None)
    assert shardkit.db_of(doc) == "other"


# -- save() without using, of a new object whose key is set: UPDATE, else INSERT ---------------------


def test_save_new_object_with_a_set_key_updates_the_existing_row(cluster: shardkit.Cluster) -> None:
    _old_doc("default")
    doc = Doc(id=3, title="New")
    doc.save()  # Django: UPDATE ... WHERE id = 3, which finds the row; no IntegrityError
    assert rows(cluster, "default", DOC_ROW) == [(3, "New", None, 100, 7, doc.stamp, "New!", "was here", None)]
    assert shardkit.db_of(doc) == "default"
    doc.title = "Again"
    doc.save()
    assert [r[:2] for r in rows(cluster, "default", DOC_ROW)] == [(3, "Again")]
    Doc(id=5, title="Five").save()  # no row with that key: an INSERT
    assert [r[:4] for r in rows(cluster, "default", DOC_ROW)] == [(3, "Again", None, 100), (5, "Five", None, 100)]
    # inside a session too, and the same as save(using=<where the routers write>)
    with cluster.session() as session:
        session.save(Doc(id=5, title="Five bis"))
        session.commit()
    Doc(id=3, title="Three bis").save(using="default")
    assert [r[:2] for r in rows(cluster, "default", DOC_ROW)] == [(3, "Three bis"), (5, "Five bis")]
    assert rows(cluster, "other", DOC_ROW) == []


def test_save_new_object_with_a_set_key_updates_where_the_routers_write(make_urls: Callable[..., Any]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "other"), routers=[ToOther()])
    cluster.create_all(Base)
    try:
        with cluster.activate():
            _old_doc("other")
            doc = Doc(id=3, title="Routed")
            doc.save()
            assert [r[:4] for r in rows(cluster, "other", DOC_ROW)] == [(3, "Routed", None, 100)]
            assert rows(cluster, "default", DOC_ROW) == []
            assert shardkit.db_of(doc) == "other"
    finally:
        cluster.dispose()


def test_a_new_object_whose_key_has_a_default_is_always_inserted(cluster: shardkit.Cluster) -> None:
    # Django >= 3.0: the primary key has a default and the instance is new -> INSERT, no UPDATE
    Tag.objects.create(id="a", name="old")
    with pytest.raises(IntegrityError):
        Tag(id="a", name="new").save()
    with pytest.raises(IntegrityError):
        Tag(id="a", name="new").save(using="default")
    assert rows(cluster, "default", "SELECT id, name FROM rv11_tag") == [("a", "old")]
    Tag(id="b", name="b").save()  # the next call works, and a free key is inserted
    tag = Tag(name="generated")
    tag.save()
    assert tag.id is not None and Tag.objects.count() == 3


# -- values() / values_list(): lazy querysets, subqueries with the cross-database check ---------------


def test_values_and_values_list_are_lazy_querysets(cluster: shardkit.Cluster) -> None:
    for i, title in enumerate(["b", "a", "c"], start=1):
        Doc.objects.create(id=i, title=title, pages=i * 10)
    log = StatementLog(cluster)
    flat = Doc.objects.values_list("title", flat=True)
    pairs = Doc.objects.filter(pages__gte=20).values_list("id", "title").order_by("id")
    dicts = Doc.objects.values("id", "title").order_by("-id")
    named = Doc.objects.values_list("id", "pages", named=True).order_by("id")
    assert log.seen == []  # nothing ran yet
    Doc.objects.create(id=4, title="d", pages=40)  # made after the querysets: they still see it
    assert sorted(flat) == ["a", "b", "c", "d"]
    assert list(pairs) == [(2, "a"), (3, "c"), (4, "d")]
    assert pairs == [(2, "a"), (3, "c"), (4, "d")]  # still equal to the list they used to be
    assert dicts[0] == {"id": 4, "title": "d"}
    row = named[0]
    assert (row.id, row.pages) == (1, 10) and tuple(row) == (1, 10)
    assert len(flat) == 4 and pairs.count() == 3 and pairs.exists()
    assert pairs[1] == (3, "c") and list(pairs[1:]) == [(3, "c"), (4, "d")]
    assert pairs.first() == (2, "a") and pairs.last() == (4, "d")
    assert list(pairs.filter(title="c")) == [(3, "c")]
    assert list(flat.exclude(title__in=["a", "b"]).order_by("-title")) == ["d", "c"]
    assert Doc.objects.values_list("id", flat=True).using("other").count() == 0
    assert Doc.objects.values("title").using("other").db == "other"
    assert Doc.objects.values("title").db == "default"
    assert Doc.objects.filter(title="a").values().get()["pages"] == 20
    assert "values_list('title', flat=True)" in repr(flat)
    assert not Doc.objects.filter(title="zzz").values_list("id").exists()
    with pytest.raises(TypeError):
        Doc.objects.values_list("id", "title", flat=True)


@pytest.mark.parametrize(
    "inner",
    [
        lambda: Shelf.objects.using("other").values_list("id", flat=True),
        lambda: Shelf.objects.using("other").values_list("id"),
        lambda: Shelf.objects.using("other").values("id"),
        lambda: Shelf.objects.using("other").filter(name="top").values_list("id", flat=True),
    ],
    ids=["values_list_flat", "values_list", "values", "filtered"],
)
def test_values_subquery_on_another_database_is_refused(cluster: shardkit.Cluster, inner: Callable[[], Any]) -> None:
    Shelf.objects.using("other").create(id=1, name="top")
    Doc.objects.create(id=1, title="B", shelf_id=None)
    log = StatementLog(cluster)
    for field in ("id__in", "shelf_id__in"):
        with pytest.raises(CrossDatabaseQueryError) as caught:
            list(Doc.objects.filter(**{field: inner()}))
        assert isinstance(caught.value, ValueError)
    assert log.seen == []  # the inner query never ran, on either database


def test_values_subquery_on_the_same_database_is_one_sql_query(cluster: shardkit.Cluster) -> None:
    Shelf.objects.create(id=1, name="top")
    Shelf.objects.create(id=2, name="low")
    Doc.objects.create(id=1, title="on top", shelf_id=1)
    Doc.objects.create(id=2, title="low", shelf_id=2)
    Doc.objects.using("other").create(id=3, title="elsewhere", shelf_id=None)
    log = StatementLog(cluster)
    tops = Shelf.objects.filter(name="top")
    for inner in (tops.values_list("id", flat=True), tops.values_list("id"), tops.values("id")):
        assert list(Doc.objects.filter(shelf_id__in=inner).values_list("title", flat=True)) == ["on top"]
    assert len(log.seen) == 3 and all("IN (SELECT" in sql for _a, sql in log.seen)
    assert log.aliases() == ["default"] * 3
    on_other = Doc.objects.using("other").filter(id__in=Doc.objects.using("other").values_list("id", flat=True))
    assert list(on_other.values_list("title", flat=True)) == ["elsewhere"]
    with pytest.raises(TypeError, match="multi-field"):
        list(Doc.objects.filter(id__in=Doc.objects.values_list("id", "title")))


def test_save_new_object_with_a_set_key_updates_on_its_ring_shard(make_urls: Callable[..., Any]) -> None:
    router = shardkit.HashRingRouter(shardkit.HashRing(["s0", "s1"], vnodes=16), shard_keys={Doc: "id"})
    cluster = shardkit.Cluster(make_urls("default", "s0", "s1"), routers=[router])
    cluster.create_all(Base)
    try:
        with cluster.activate():
            for i in range(1, 9):
                Doc.objects.create(id=i, title=f"old {i}", pages=i)
            before = {alias: rows(cluster, alias, "SELECT id FROM rv11_doc ORDER BY id") for alias in ("s0", "s1")}
            assert all(before.values())  # both shards hold some rows
            for i in range(1, 9):
                doc = Doc(id=i, title=f"new {i}")
                doc.save()  # an UPDATE on the shard the key maps to, never a duplicate elsewhere
                assert shardkit.db_of(doc) == next(a for a, ids in before.items() if (i,) in ids)
            for alias, ids in before.items():
                got = rows(cluster, alias, "SELECT id, title, pages FROM rv11_doc ORDER BY id")
                assert got == [(i, f"new {i}", 100) for (i,) in ids]
            assert sum(len(ids) for ids in before.values()) == 8  # the shards hold every row once
    finally:
        cluster.dispose()


def test_create_always_inserts_as_django_does(cluster: shardkit.Cluster) -> None:
    # Django's create() is save(force_insert=True): an existing key raises, the row is not overwritten
    _old_doc("other")
    with pytest.raises(IntegrityError):
        Doc.objects.using("other").create(id=3, title="Overwrite?")
    Doc.objects.create(id=3, title="On default")  # another database: no conflict
    with pytest.raises(IntegrityError):
        Doc.objects.create(id=3, title="Overwrite?")
    with pytest.raises(IntegrityError):
        Doc(id=3, title="Overwrite?").save(force_insert=True)
    assert [r[:2] for r in rows(cluster, "other", DOC_ROW)] == [(3, "Old")]
    assert [r[:2] for r in rows(cluster, "default", DOC_ROW)] == [(3, "On default")]
    obj, created = Doc.objects.get_or_create(id=3, defaults={"title": "x"})
    assert not created and obj.title == "On default"
    with pytest.raises(shardkit.ShardkitError, match="force_insert"):
        obj.save(force_insert=True)  # a loaded object is never inserted again by force


def test_values_of_a_foreign_key_by_its_relationship_name(cluster: shardkit.Cluster) -> None:
    Shelf.objects.create(id=1, name="top")
    Doc.objects.create(id=1, title="a", shelf_id=1)
    Doc.objects.create(id=2, title="b")
    assert list(Doc.objects.order_by("id").values_list("shelf", flat=True)) == [1, None]  # Django: the key
    assert list(Doc.objects.filter(id=1).values("shelf", "title")) == [{"shelf": 1, "title": "a"}]
    assert [s.name for s in Shelf.objects.filter(id__in=Doc.objects.values_list("shelf", flat=True))] == ["top"]


def test_get_or_create_reads_again_when_a_concurrent_insert_wins(
    cluster: shardkit.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Django: create() raising IntegrityError (the row was inserted meanwhile) -> get() again
    real_get = shardkit.QuerySet.get
    calls: list[int] = []

    def racing_get(self: Any, *criteria: Any, **lookups: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # the first read misses; another connection then inserts the row
            with cluster.engine("default").begin() as conn:
                conn.execute(text("INSERT INTO rv11_tag (id, name) VALUES ('k', 'theirs')"))
            raise Tag.DoesNotExist("not yet")
        return real_get(self, *criteria, **lookups)

    monkeypatch.setattr(shardkit.QuerySet, "get", racing_get)
    tag, created = Tag.objects.get_or_create(id="k", defaults={"name": "mine"})
    assert (tag.name, created, len(calls)) == ("theirs", False, 2)
    assert rows(cluster, "default", "SELECT id, name FROM rv11_tag") == [("k", "theirs")]
    monkeypatch.setattr(shardkit.QuerySet, "get", real_get)
    with pytest.raises(IntegrityError):  # the key exists but the lookup does not match: no retry hides it
        Tag.objects.get_or_create(id="k", name="other")
