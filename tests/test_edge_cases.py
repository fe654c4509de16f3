"""Edge cases found in review: each test pins one behaviour that once was wrong."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit
from shardkit.errors import ConfigError, CrossShardWriteError, ShardkitError

from .app.models import Author, Base, Book


@pytest.fixture
def cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "other"))
    cluster.create_all(Base)
    yield cluster
    cluster.dispose()


def test_bulk_insert_returning_gives_the_rows(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        rows = [{"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
        got = s.execute(insert(Author).returning(Author.id, Author.name), rows).all()
        assert sorted(tuple(r) for r in got) == [(2, "b"), (3, "c")]
        objs = s.scalars(insert(Author).returning(Author), [{"id": 4, "name": "d"}]).all()
        assert [a.name for a in objs] == ["d"]


def test_lazy_many_to_one_comes_from_the_childs_database(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        s.save(Author(id=1, name="on default"), using="default")
        s.save(Author(id=1, name="on other", books=[Book(id=1, title="t")]), using="other")
        s.commit()
    with cluster.session() as s:
        s.scalars(select(Author).options(shardkit.using("default"))).one()  # id 1 from default first
        book = s.scalars(select(Book).options(shardkit.using("other"))).one()
        assert book.author.name == "on other"


def test_explain_and_execution_agree_on_the_last_using(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        stmt = select(Author).options(shardkit.using("default")).options(shardkit.using("other"))
        assert s.explain(stmt).startswith("single shard: other")


def test_engine_options_of_the_cluster_are_not_changed(make_urls: Callable[..., dict[str, str]]) -> None:
    shared = {"connect_args": {}}
    cluster = shardkit.Cluster(make_urls("default"), engine_options=shared)
    cluster.engine("default")
    assert shared == {"connect_args": {}}
    cluster.dispose()


def test_statement_writes_count_toward_refuse(make_urls: Callable[..., dict[str, str]]) -> None:
    cluster = shardkit.Cluster(make_urls("default", "other"), cross_shard_writes="refuse")
    cluster.create_all(Base)
    with cluster.session() as s:
        s.execute(text("SELECT 1"))  # a read: no write anywhere
        a = Author(id=1, name="a")
        s.save(a, using="other")
        s.commit()
        a.name = a.name  # touched, not changed: writes nothing
        s.save(Author(id=2, name="b"), using="default")
        s.commit()
        s.delete_from(a, "default")  # a write to default...
        s.save(Author(id=3, name="c"), using="other")  # ...then one to other in the same transaction
        with pytest.raises(CrossShardWriteError):
            s.flush()
        s.rollback()
    cluster.dispose()


def test_last_of_a_sliced_queryset_is_refused(cluster: shardkit.Cluster) -> None:
    with cluster.activated():
        for i in range(5):
            Author.objects.create(name=f"a{i}")
        with pytest.raises(ShardkitError, match="slice"):
            Author.objects.order_by("id")[:3].last()
        assert Author.objects.order_by("id").last().name == "a4"  # type: ignore[union-attr]
        cluster.autocommit_session().close()


def test_activated_is_local_and_activate_restores(make_urls: Callable[..., dict[str, str]]) -> None:
    one = shardkit.Cluster(make_urls("default"))
    two = shardkit.Cluster({"default": "sqlite://"})
    seen: list[object] = []
    with one.activated():
        assert shardkit.get_active_cluster() is one
        worker = threading.Thread(target=lambda: seen.append(_active_or_none()))
        worker.start()
        worker.join()
    assert seen == [None]  # another thread never saw it
    with two.activate():
        assert shardkit.get_active_cluster() is two
    with pytest.raises(ConfigError):
        shardkit.get_active_cluster()


def _active_or_none() -> object:
    try:
        return shardkit.get_active_cluster()
    except ConfigError:
        return None


class RingBase(DeclarativeBase):
    pass


class Category(RingBase):  # not sharded: lives on default
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)


class Item(RingBase):
    __tablename__ = "items"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20), default="")
    category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"))
    category: Mapped[Category | None] = relationship()


def test_ring_insert_values_form_and_unsharded_parent(tmp_path: object) -> None:
    urls = {alias: f"sqlite:///{tmp_path}/{alias}.db" for alias in ("default", "s0", "s1")}
    ring = shardkit.HashRing(["s0", "s1"])

    class Anywhere:  # unsharded tables may live on every database here
        def allow_migrate(self, db: str, model: object, **hints: object) -> bool:
            return True

    cluster = shardkit.Cluster(urls, routers=[shardkit.HashRingRouter(ring), Anywhere()], cross_shard_writes="refuse")
    cluster.create_all(RingBase)
    with cluster.session() as s:
        s.execute(insert(Item).values(name="generated id"))  # the ring fills in the id
        s.commit()
        item = s.scalars(select(Item).where(Item.name == "generated id")).one()
        assert shardkit.db_of(item) == ring.get(item.id)
        with pytest.raises(CrossShardWriteError):  # one insert per shard in one transaction
            for i in range(20):
                s.execute(insert(Item), {"name": f"n{i}"})
        s.rollback()
    with cluster.session() as s:  # a foreign key to an unsharded parent is not a cross-shard relation
        s.save(Category(id=1), using=ring.get(7))
        s.commit()
        s.add(Item(id=7, category_id=1))
        s.commit()
    cluster.dispose()
