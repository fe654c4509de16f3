"""Django's manager API: objects, using(), db_manager(), save/delete(using=)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

import shardkit
from shardkit.errors import ConfigError, CrossDatabaseQueryError

from .app.models import Author, Base, Book, User
from .app.routers import AuthRouter


@pytest.fixture
def cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "credentials", "other"), routers=[AuthRouter()])
    cluster.create_all(Base)
    with cluster.activate():
        yield cluster
    cluster.autocommit_session().close()
    cluster.dispose()


def names(qs: shardkit.QuerySet[Author]) -> list[str]:
    return [a.name for a in qs]


def test_no_active_cluster_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="activate"):
        Author.objects.count()


def test_create_filter_order_count(cluster: shardkit.Cluster) -> None:
    for i, name in enumerate(["carol", "alice", "bob", "alfred"]):
        Author.objects.create(name=name, score=i)
    assert Author.objects.count() == 4
    assert names(Author.objects.filter(name__startswith="al").order_by("name")) == ["alfred", "alice"]
    assert names(Author.objects.order_by("-score")[:2]) == ["alfred", "bob"]
    assert names(Author.objects.order_by("score")[1:3]) == ["alice", "bob"]
    assert names(Author.objects.exclude(name="carol").order_by("name")) == ["alfred", "alice", "bob"]
    assert names(Author.objects.filter(Author.score >= 2).order_by("name")) == ["alfred", "bob"]
    assert Author.objects.filter(score__in=[0, 3]).count() == 2
    assert Author.objects.first().name == "carol"  # type: ignore[union-attr]
    assert Author.objects.order_by("name").last().name == "carol"  # type: ignore[union-attr]
    assert Author.objects.get(name="bob").score == 2
    assert Author.objects.all().exists()
    assert len(Author.objects.all()) == 4
    assert Author.objects.order_by("name")[0].name == "alfred"
    with pytest.raises(Author.DoesNotExist):
        Author.objects.get(name="nobody")
    with pytest.raises(Author.MultipleObjectsReturned):
        Author.objects.get(name__startswith="al")
    with pytest.raises(shardkit.FieldError, match="no field 'nmae'"):
        Author.objects.filter(nmae="x")


def test_using_on_querysets(cluster: shardkit.Cluster) -> None:
    Author.objects.using("other").create(name="far")
    Author.objects.create(name="near")
    assert names(Author.objects.all()) == ["near"]
    assert names(Author.objects.using("other")) == ["far"]
    assert names(Author.objects.filter(name="far").using("default").using("other")) == ["far"]
    assert shardkit.db_of(Author.objects.using("other").get()) == "other"


def test_db_manager_with_a_custom_manager_method(cluster: shardkit.Cluster) -> None:
    User.__table__.create(cluster.engine("other"))  # by hand: allow_migrate keeps it off "other"
    user = User.objects.db_manager("other").create_user("Mario", "MARIO@EXAMPLE.COM")
    assert shardkit.db_of(user) == "other"
    assert user.email == "mario@example.com"
    assert User.objects.db_manager("other").count() == 1
    with cluster.engine("credentials").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM auth_user")).scalar() == 0
    plain = User.objects.create_user("luigi")  # the router's choice
    assert shardkit.db_of(plain) == "credentials"


def test_save_and_delete_using(cluster: shardkit.Cluster) -> None:
    author = Author(name="copy-me")
    author.save()
    assert shardkit.db_of(author) == "default"
    author.save(using="other")
    assert shardkit.db_of(author) == "other"
    assert Author.objects.using("other").count() == 1
    assert Author.objects.using("default").count() == 1
    author.name = "edited"
    author.save()  # stays on "other", as in Django
    assert Author.objects.using("other").get().name == "edited"
    assert Author.objects.using("default").get().name == "copy-me"
    author.delete(using="default")
    assert Author.objects.using("default").count() == 0
    author.delete()
    assert Author.objects.using("other").count() == 0


def test_lazy_load_through_the_manager(cluster: shardkit.Cluster) -> None:
    author = Author.objects.using("other").create(name="x")
    Book.objects.using("other").create(title="b1", author_id=author.id)
    loaded = Author.objects.using("other").get(name="x")
    assert [b.title for b in loaded.books] == ["b1"]
    assert shardkit.db_of(loaded.books[0]) == "other"


def test_manager_inside_a_session_block_does_not_commit(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        Author.objects.create(name="pending")
        assert Author.objects.count() == 1  # flushed in this session's transaction
        s.rollback()
    assert Author.objects.count() == 0


def test_update_and_delete_querysets(cluster: shardkit.Cluster) -> None:
    for n in ("a", "b", "c"):
        Author.objects.create(name=n)
    assert Author.objects.filter(name__in=["a", "b"]).update(score=9) == 2
    assert Author.objects.filter(score=9).count() == 2
    assert Author.objects.filter(name="c").delete() == 1
    assert names(Author.objects.order_by("name")) == ["a", "b"]
    obj, created = Author.objects.get_or_create(name="a")
    assert not created and obj.score == 9
    obj, created = Author.objects.get_or_create(name="z", defaults={"score": 1})
    assert created and obj.score == 1


def test_manager_is_not_reachable_from_instances(cluster: shardkit.Cluster) -> None:
    with pytest.raises(AttributeError, match="instances"):
        Author(name="x").objects  # noqa: B018


# -- Django's semantics, regression tests (issue 11) ------------------------------------------


def rename_elsewhere(cluster: shardkit.Cluster, alias: str, old: str, new: str) -> None:
    with cluster.engine(alias).begin() as conn:
        conn.execute(text("UPDATE blog_author SET name = :new WHERE name = :old"), {"new": new, "old": old})


def test_every_evaluation_reads_the_database(cluster: shardkit.Cluster) -> None:
    Author.objects.create(name="first")
    one, two = Author.objects.get(name="first"), Author.objects.get(name="first")
    assert one is not two  # distinct instances, as two Django querysets give
    rename_elsewhere(cluster, "default", "first", "renamed")  # another connection changes the row
    assert Author.objects.get(id=one.id).name == "renamed"  # fresh values, not a cached object
    assert one.name == "first"  # objects already read keep what they read
    one.save(using="other")  # copying one object does not move the other
    assert shardkit.db_of(one) == "other"
    assert shardkit.db_of(two) == "default"


def test_a_failed_save_leaves_the_manager_usable(cluster: shardkit.Cluster) -> None:
    first = Author.objects.create(name="a")
    clash = Author(id=first.id, name="b")
    with pytest.raises(IntegrityError):
        Book(id=1, title="t", author_id=None).save()  # NOT NULL
    assert Author.objects.count() == 1  # no PendingRollbackError: the next call just works
    fresh = Author(name="c")
    with pytest.raises(IntegrityError):
        Book(id=2, title=None).save()  # type: ignore[arg-type]
    fresh.save()
    assert shardkit.db_of(fresh) == "default"
    assert Author.objects.count() == 2
    assert clash.name == "b"


def test_db_of_is_unchanged_by_a_failed_save(cluster: shardkit.Cluster) -> None:
    new = Book(id=5, title="no author", author_id=None)
    with pytest.raises(IntegrityError):
        new.save(using="other")
    assert shardkit.db_of(new) is None  # it was never written anywhere
    author = Author.objects.using("other").create(name="x")
    author.name = None  # type: ignore[assignment]
    with pytest.raises(IntegrityError):
        author.save(using="default")  # a copy that fails: it still lives on "other"
    assert shardkit.db_of(author) == "other"


def test_save_using_a_new_object_whose_key_exists_there_updates(cluster: shardkit.Cluster) -> None:
    Author.objects.using("other").create(id=7, name="old", score=1)
    Author(id=7, name="new", score=2).save(using="other")  # as docs/index.md promises: an UPDATE
    assert Author.objects.using("other").values_list("name", "score") == [("new", 2)]
    Author(id=8, name="brand new").save(using="other")  # no such row: an INSERT
    assert Author.objects.using("other").count() == 2


class ReadWriteSplit:
    """Reads from "other", writes to "default" (no replication between them)."""

    def db_for_read(self, model: type, **hints: object) -> str:
        return "other"

    def db_for_write(self, model: type, **hints: object) -> str:
        return "default"

    def allow_relation(self, obj1: object, obj2: object, **hints: object) -> bool:
        return True


@pytest.fixture
def split(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "other"), routers=[ReadWriteSplit()])
    cluster.create_all(Base)
    with cluster.activate():
        yield cluster
    cluster.dispose()


def test_get_or_create_runs_on_the_write_database(split: shardkit.Cluster) -> None:
    Author.objects.create(id=1, name="only on default")
    obj, created = Author.objects.get_or_create(name="only on default")  # not read from "other"
    assert not created and obj.id == 1 and shardkit.db_of(obj) == "default"
    obj, created = Author.objects.get_or_create(name="new", defaults={"score": 3, "id": 2})
    assert created and shardkit.db_of(obj) == "default" and obj.score == 3


def test_queryset_and_manager_db_are_the_routers_pick(split: shardkit.Cluster) -> None:
    assert Author.objects.db == "other"
    assert Author.objects.all().db == "other"
    assert Author.objects.using("default").db == "default"
    assert Author.objects.db_manager("default").db == "default"
    assert Author.objects.db_manager("default").all().db == "default"


def test_save_of_an_object_from_another_database_writes_the_whole_row(split: shardkit.Cluster) -> None:
    with split.engine("other").begin() as conn:
        conn.execute(text("INSERT INTO blog_author (id, name, score) VALUES (3, 'replica copy', 9)"))
    obj = Author.objects.get(id=3)  # read from "other"
    assert shardkit.db_of(obj) == "other"
    obj.name = "edited"
    obj.save()  # the router writes to "default", which has no such row: INSERT of the whole row
    assert shardkit.db_of(obj) == "default"
    assert Author.objects.using("default").values_list("name", "score") == [("edited", 9)]
    same_id = Author.objects.using("other").get(id=3)
    same_id.save()  # now the row exists on "default": UPDATE with every column
    assert Author.objects.using("default").values_list("name", "score") == [("replica copy", 9)]


def test_a_subquery_on_another_database_is_refused(cluster: shardkit.Cluster) -> None:
    author = Author.objects.using("other").create(name="far")
    Book.objects.using("other").create(title="b", author_id=author.id)
    inner = Author.objects.using("other").filter(name="far")
    outer = Book.objects.filter(author__in=inner)  # runs on "default"
    with pytest.raises(CrossDatabaseQueryError, match="Subqueries aren't allowed across different databases"):
        list(outer)
    assert isinstance(CrossDatabaseQueryError("x"), ValueError)
    same = Book.objects.using("other").filter(author__in=inner)
    assert [b.title for b in same] == ["b"]
    unplaced = Book.objects.using("other").filter(author__in=Author.objects.filter(name="far"))
    assert [b.title for b in unplaced] == ["b"]  # a subquery with no using() runs with the outer one


class ModernMigrateRouter:
    """Today's Django signature."""

    def allow_migrate(self, db: str, app_label: str | None, model_name: str | None = None, **hints: object) -> bool:
        seen.append((db, app_label, model_name))
        return not (app_label == "auth" and db != "credentials")


seen: list[tuple[str, str | None, str | None]] = []


def test_allow_migrate_with_the_current_django_signature(make_urls: Callable[..., dict[str, str]]) -> None:
    seen.clear()
    cluster = shardkit.Cluster(make_urls("default", "credentials"), routers=[ModernMigrateRouter()])
    made = cluster.create_all(Base)
    assert "auth_user" in made["credentials"] and "auth_user" not in made["default"]
    assert ("default", "auth", "user") in seen
    assert ("default", "blog", "author") in seen
    cluster.dispose()


def test_related_manager_calls_keep_pending_list_changes(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        author = Author(name="a")
        s.add(author)
        s.flush()
        author.books.append(Book(title="one"))  # in memory only, for now
        author.books.create(title="two")  # the related manager writes at once, the pending list first
        assert sorted(b.title for b in author.books) == ["one", "two"]
        s.commit()
    assert sorted(Book.objects.values_list("title", flat=True)) == ["one", "two"]
    author = Author.objects.get(name="a")
    with pytest.raises(AttributeError, match="nullable"):  # NOT NULL foreign key: as Django, no remove()
        author.books.remove(author.books[0])
    assert Book.objects.count() == 2


def test_related_manager_in_a_session_block_is_undone_by_rollback(cluster: shardkit.Cluster) -> None:
    author = Author.objects.create(name="a")
    Book.objects.create(title="kept", author_id=author.id)
    with cluster.session() as s:
        mine = Author.objects.get(name="a")
        mine.books.create(title="pending")
        assert mine.books.count() == 2
        s.rollback()
    assert Book.objects.count() == 1


def test_activating_another_cluster_over_the_same_databases_changes_the_routers(cluster: shardkit.Cluster) -> None:
    author = Author.objects.create(name="read before")  # under the first cluster's routers
    urls = {alias: cluster.engine(alias).url for alias in cluster.aliases}
    asked: list[tuple[object, dict[str, object]]] = []

    class Recording:
        def db_for_write(self, model: object, **hints: object) -> None:
            asked.append((model, dict(hints)))

    other_settings = shardkit.Cluster(urls, routers=[Recording()])  # Django's override_settings
    with other_settings.activated():
        author.delete()  # an object read before: the routers of now are asked, as Django's are
    assert asked == [(Author, {"instance": author})]
    other_settings.dispose()
    assert Author.objects.count() == 0


def test_related_managers_build_on_the_related_models_own_queryset(cluster: shardkit.Cluster) -> None:
    class HighScoreManager(shardkit.Manager[Book]):
        def get_queryset(self) -> shardkit.QuerySet[Book]:
            return super().get_queryset().filter(title__startswith="keep")

    author = Author.objects.create(name="a")
    for title in ("keep one", "drop", "keep two"):
        Book.objects.create(title=title, author_id=author.id)
    assert "objects" not in Book.__dict__  # it uses ModelMixin's manager
    Book.objects = HighScoreManager()  # type: ignore[misc]
    try:
        assert sorted(author.books.values_list("title", flat=True)) == ["keep one", "keep two"]
        assert author.books.count() == 2
    finally:
        del Book.objects


def test_refresh_asks_db_for_read_with_the_instance_once(cluster: shardkit.Cluster) -> None:
    from unittest.mock import Mock

    author = Author.objects.create(name="x")
    router = Mock()
    router.db_for_read.return_value = None
    urls = {alias: cluster.engine(alias).url for alias in cluster.aliases}
    mocked = shardkit.Cluster(urls, routers=[router])
    with mocked.activated():
        author.refresh_from_db()
    mocked.dispose()
    router.db_for_read.assert_called_once_with(Author, instance=author)
    assert author.name == "x"


def test_db_of_after_a_failed_session_flush_is_where_the_object_was_before(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        book = Book(id=1, title="no author", author_id=None)  # NOT NULL: the INSERT fails
        s.save(book, using="other")
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        assert shardkit.db_of(book) is None  # it was never written to "other"
