"""The routed session, on SQLite files and on PostgreSQL databases (the `backend` fixture)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

import shardkit
from shardkit.errors import InvalidRouteError, UnknownAliasError

from .app.models import Author, Base, Book, User
from .app.routers import AuthRouter, PrimaryReplicaRouter
from .conftest import StatementLog


def count_rows(cluster: shardkit.Cluster, alias: str, table: str) -> int:
    with cluster.engine(alias).connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture
def auth_cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "credentials", "other"), routers=[AuthRouter()])
    cluster.create_all(Base)
    yield cluster
    cluster.dispose()


@pytest.fixture
def replica_cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", "replica"), routers=[PrimaryReplicaRouter()])
    cluster.create_all(Base)
    yield cluster
    cluster.dispose()


def test_create_all_honours_allow_migrate(auth_cluster: shardkit.Cluster) -> None:
    created = auth_cluster.create_all(Base)
    assert created["credentials"] == ["auth_user"]
    assert "auth_user" not in created["default"]
    assert set(created["default"]) == {"blog_author", "blog_book"}
    from sqlalchemy import inspect

    assert inspect(auth_cluster.engine("credentials")).get_table_names() == ["auth_user"]
    assert "auth_user" not in inspect(auth_cluster.engine("default")).get_table_names()


def test_writes_and_reads_follow_the_auth_router(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s:
        assert isinstance(s, Session)
        user = User(username="mario")
        author = Author(name="alex")
        s.add_all([user, author])
        s.commit()
        assert shardkit.db_of(user) == "credentials"
        assert shardkit.db_of(author) == "default"
    assert count_rows(auth_cluster, "credentials", "auth_user") == 1
    assert count_rows(auth_cluster, "default", "blog_author") == 1
    with auth_cluster.session() as s:
        loaded = s.scalars(select(User).where(User.username == "mario")).one()
        assert shardkit.db_of(loaded) == "credentials"
        assert shardkit.db_of(s.scalars(select(Author)).one()) == "default"


def test_using_option_is_chainable_and_last_wins(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s:
        s.save(Author(name="on-other"), using="other")
        s.commit()
        stmt = select(Author).options(shardkit.using("default")).options(shardkit.using("other"))
        found = s.scalars(stmt).all()
        assert [a.name for a in found] == ["on-other"]
        assert shardkit.db_of(found[0]) == "other"
        assert s.scalars(select(Author).options(shardkit.using("default"))).all() == []
        # Core statements (no ORM entity) too
        n = s.execute(select(func.count()).select_from(Author).options(shardkit.using("other"))).scalar()
        assert n == 1


def test_using_unknown_alias_is_refused(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s, pytest.raises(UnknownAliasError, match="'nowhere'"):
        s.scalars(select(Author).options(shardkit.using("nowhere"))).all()


def test_session_pinned_to_an_alias(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session(using="other") as s:
        s.add(Author(name="pinned"))
        s.commit()
        assert s.scalar(select(func.count()).select_from(Author)) == 1
    assert count_rows(auth_cluster, "other", "blog_author") == 1
    assert count_rows(auth_cluster, "default", "blog_author") == 0
    with auth_cluster.session() as s:
        n = s.scalar(select(func.count()).select_from(Author).execution_options(shardkit_using="other"))
        assert n == 1


def test_same_primary_key_on_two_aliases_is_two_objects(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s:
        s.save(Author(id=1, name="default-one"), using="default")
        s.save(Author(id=1, name="other-one"), using="other")
        s.commit()
        a = s.scalars(select(Author).options(shardkit.using("default"))).one()
        b = s.scalars(select(Author).options(shardkit.using("other"))).one()
        assert a is not b
        assert (a.name, b.name) == ("default-one", "other-one")
        assert s.get(Author, 1, identity_token="other") is b


def test_lazy_loads_run_where_the_parent_lives(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s:
        s.save(Author(id=7, name="there", books=[Book(id=1, title="x"), Book(id=2, title="y")]), using="other")
        s.commit()
    log = StatementLog(auth_cluster)
    with auth_cluster.session() as s:
        author = s.scalars(select(Author).options(shardkit.using("other"))).one()
        log.seen.clear()
        assert [b.title for b in author.books] == ["x", "y"]
        assert log.aliases("blog_book") == ["other"]
        book = author.books[0]
        assert shardkit.db_of(book) == "other"
        s.expire(book)
        log.seen.clear()
        assert book.title == "x"  # refresh of an expired object goes back to its alias
        assert log.aliases() == ["other"]


def test_flush_of_a_router_error_writes_nothing(auth_cluster: shardkit.Cluster) -> None:
    class Broken:
        def db_for_write(self, model: Any, **hints: Any) -> str | None:
            obj = hints.get("instance")
            return "atlantis" if isinstance(obj, Book) else None

    cluster = shardkit.Cluster(
        {a: auth_cluster.spec(a).url for a in auth_cluster.aliases}, routers=[Broken(), AuthRouter()]
    )
    with cluster.session() as s:
        s.add_all([Author(id=1, name="a"), Book(id=1, title="t", author_id=1)])
        with pytest.raises(InvalidRouteError, match=r"'atlantis'.*Book"):
            s.commit()
    assert count_rows(auth_cluster, "default", "blog_author") == 0
    cluster.dispose()


def test_primary_replica_router(replica_cluster: shardkit.Cluster) -> None:
    with replica_cluster.session() as s:
        author = Author(name="w")
        s.add(author)
        s.commit()
        assert shardkit.db_of(author) == "default"
        # reads go to the replica, which (with no real replication here) is empty
        assert s.scalars(select(Author)).all() == []
        assert [a.name for a in s.scalars(select(Author).options(shardkit.using("default")))] == ["w"]
    assert count_rows(replica_cluster, "default", "blog_author") == 1
    assert count_rows(replica_cluster, "replica", "blog_author") == 0
    # an object read from the replica is written back to the primary
    with replica_cluster.engine("replica").begin() as conn:
        conn.execute(text("INSERT INTO blog_author (id, name, score) VALUES (1, 'w', 0)"))
    with replica_cluster.session() as s:
        author = s.scalars(select(Author)).one()
        assert shardkit.db_of(author) == "replica"
        author.score = 5
        s.commit()
        assert shardkit.db_of(author) == "default"
    with replica_cluster.engine("default").connect() as conn:
        assert conn.execute(text("SELECT score FROM blog_author WHERE id = 1")).scalar() == 5


def test_save_using_another_alias_copies_like_django(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s:
        author = Author(id=3, name="mover")
        s.add(author)
        s.commit()
        assert shardkit.db_of(author) == "default"
        s.save(author, using="other")  # not there yet: INSERT
        s.commit()
        assert shardkit.db_of(author) == "other"
        author.name = "changed"
        s.save(author, using="default")  # there already: UPDATE
        s.commit()
        assert shardkit.db_of(author) == "default"
    with auth_cluster.engine("other").connect() as conn:
        assert conn.execute(text("SELECT name FROM blog_author WHERE id = 3")).scalar() == "mover"
    with auth_cluster.engine("default").connect() as conn:
        assert conn.execute(text("SELECT name FROM blog_author WHERE id = 3")).scalar() == "changed"


def test_delete_using(auth_cluster: shardkit.Cluster) -> None:
    with auth_cluster.session() as s:
        a = Author(id=4, name="twice")
        s.save(a, using="default")
        s.commit()
        s.save(a, using="other")
        s.commit()
        s.delete_from(a, "default")
        s.commit()
    assert count_rows(auth_cluster, "default", "blog_author") == 0
    assert count_rows(auth_cluster, "other", "blog_author") == 1


def test_mixed_engines_in_one_cluster(databases: Any) -> None:
    """PostgreSQL, SQLite and MariaDB in one cluster (not parametrized: it uses all three)."""
    urls = {
        "default": databases.url("postgresql", "pg"),
        "credentials": databases.url("sqlite", "lite"),
        "other": databases.url("mysql", "maria"),
    }
    cluster = shardkit.Cluster(urls, routers=[AuthRouter()])
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add_all([User(username="u"), Author(name="pg")])
        s.save(Author(name="maria"), using="other")
        s.commit()
        assert {shardkit.db_of(x) for x in s.scalars(select(User))} == {"credentials"}
        assert [a.name for a in s.scalars(select(Author))] == ["pg"]
        assert [a.name for a in s.scalars(select(Author).options(shardkit.using("other")))] == ["maria"]
    assert cluster.spec("other").dialect_name == "mysql"
    cluster.dispose()
