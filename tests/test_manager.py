"""Django's manager API: objects, using(), db_manager(), save/delete(using=)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text

import shardkit
from shardkit.errors import ConfigError

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
