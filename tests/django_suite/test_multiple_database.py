"""Django's tests/multiple_database/tests.py, ported to shardkit's API.

Each test keeps the name of the Django test it ports, named in a comment; Django's assertions
are kept as they are (``ValueError`` stays ``ValueError``: shardkit's errors subclass it).
What maps to what, and the tests not ported (contenttypes, fixtures, management commands,
model validation) with the reason, are in docs/django.md.  Runs on SQLite files and on
PostgreSQL databases.
"""

from __future__ import annotations

import datetime
import pickle
import re
import types
from typing import Any
from unittest.mock import Mock

import pytest
from sqlalchemy import Table

import shardkit
from shardkit import db_of

from .conftest import override_routers, through_count, through_delete
from .models import Base, Book, Person, Pet, User, UserProfile
from .routers import DEFAULT_DB_ALIAS, AuthRouter, TestRouter, WriteRouter

pytestmark = pytest.mark.usefixtures("multidb")


def raises_message(exc: type[BaseException], msg: str) -> Any:
    """Django's ``assertRaisesMessage``: the message contains ``msg``."""
    return pytest.raises(exc, match=re.escape(msg))


def titles(qs: Any) -> list[str]:
    return list(qs.values_list("title", flat=True))


def names(qs: Any) -> list[str]:
    return list(qs.values_list("name", flat=True))


class TestQueryTestCase:
    # Django: QueryTestCase.test_db_selection
    def test_db_selection(self) -> None:
        "Querysets will use the default database by default"
        assert Book.objects.db == DEFAULT_DB_ALIAS
        assert Book.objects.all().db == DEFAULT_DB_ALIAS
        assert Book.objects.using("other").db == "other"
        assert Book.objects.db_manager("other").db == "other"
        assert Book.objects.db_manager("other").all().db == "other"

    # Django: QueryTestCase.test_default_creation
    def test_default_creation(self) -> None:
        "Objects created on the default database don't leak onto other databases"
        Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        dive = Book()
        dive.title = "Dive into Python"
        dive.published = datetime.date(2009, 5, 4)
        dive.save()
        Book.objects.get(title="Pro Django")
        Book.objects.using("default").get(title="Pro Django")
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("other").get(title="Pro Django")
        Book.objects.get(title="Dive into Python")
        Book.objects.using("default").get(title="Dive into Python")
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("other").get(title="Dive into Python")

    # Django: QueryTestCase.test_other_creation
    def test_other_creation(self) -> None:
        "Objects created on another database don't leak onto the default database"
        Book.objects.using("other").create(title="Pro Django", published=datetime.date(2008, 12, 16))
        dive = Book()
        dive.title = "Dive into Python"
        dive.published = datetime.date(2009, 5, 4)
        dive.save(using="other")
        Book.objects.using("other").get(title="Pro Django")
        with pytest.raises(Book.DoesNotExist):
            Book.objects.get(title="Pro Django")
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("default").get(title="Pro Django")
        Book.objects.using("other").get(title="Dive into Python")
        with pytest.raises(Book.DoesNotExist):
            Book.objects.get(title="Dive into Python")
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("default").get(title="Dive into Python")

    # Django: QueryTestCase.test_refresh
    def test_refresh(self) -> None:
        dive = Book(title="Dive into Python", published=datetime.date(2009, 5, 4))
        dive.save(using="other")
        dive2 = Book.objects.using("other").get()
        dive2.title = "Dive into Python (on default)"
        dive2.save(using="default")
        dive.refresh_from_db()
        assert dive.title == "Dive into Python"
        dive.refresh_from_db(using="default")
        assert dive.title == "Dive into Python (on default)"
        assert db_of(dive) == "default"

    # Django: QueryTestCase.test_refresh_router_instance_hint
    def test_refresh_router_instance_hint(self, multidb: shardkit.Cluster) -> None:
        router = Mock()
        router.db_for_read.return_value = None
        book = Book.objects.create(title="Dive Into Python", published=datetime.date(1957, 10, 12))
        with override_routers(multidb, [router]):
            book.refresh_from_db()
        router.db_for_read.assert_called_once_with(Book, instance=book)

    # Django: QueryTestCase.test_basic_queries
    def test_basic_queries(self) -> None:
        "Queries are constrained to a single database"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        dive = Book.objects.using("other").get(published=datetime.date(2009, 5, 4))
        assert dive.title == "Dive into Python"
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("default").get(published=datetime.date(2009, 5, 4))
        dive = Book.objects.using("other").get(title__icontains="dive")
        assert dive.title == "Dive into Python"
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("default").get(title__icontains="dive")
        dive = Book.objects.using("other").get(title__iexact="dive INTO python")
        assert dive.title == "Dive into Python"
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("default").get(title__iexact="dive INTO python")
        dive = Book.objects.using("other").get(published__year=2009)
        assert dive.title == "Dive into Python"
        assert dive.published == datetime.date(2009, 5, 4)
        with pytest.raises(Book.DoesNotExist):
            Book.objects.using("default").get(published__year=2009)
        years = Book.objects.using("other").dates("published", "year")
        assert [o.year for o in years] == [2009]
        years = Book.objects.using("default").dates("published", "year")
        assert [o.year for o in years] == []
        months = Book.objects.using("other").dates("published", "month")
        assert [o.month for o in months] == [5]
        months = Book.objects.using("default").dates("published", "month")
        assert [o.month for o in months] == []

    # Django: QueryTestCase.test_m2m_separation
    def test_m2m_separation(self, multidb: shardkit.Cluster) -> None:
        "M2M fields are constrained to a single database"
        pro = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = Person.objects.create(name="Marty Alchin")
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        pro.authors.set([marty])
        dive.authors.set([mark])
        # Inspect the m2m tables directly. There should be 1 entry in each database
        assert through_count(multidb, "default") == 1
        assert through_count(multidb, "other") == 1
        # Queries work across m2m joins
        assert titles(Book.objects.using("default").filter(authors__name="Marty Alchin")) == ["Pro Django"]
        assert titles(Book.objects.using("other").filter(authors__name="Marty Alchin")) == []
        assert titles(Book.objects.using("default").filter(authors__name="Mark Pilgrim")) == []
        assert titles(Book.objects.using("other").filter(authors__name="Mark Pilgrim")) == ["Dive into Python"]
        # Reget the objects to clear caches
        dive = Book.objects.using("other").get(title="Dive into Python")
        mark = Person.objects.using("other").get(name="Mark Pilgrim")
        # Retrieve related object by descriptor. Related objects should be database-bound.
        assert list(dive.authors.values_list("name", flat=True)) == ["Mark Pilgrim"]
        assert list(mark.book_set.values_list("title", flat=True)) == ["Dive into Python"]

    # Django: QueryTestCase.test_m2m_forward_operations
    def test_m2m_forward_operations(self) -> None:
        "M2M forward manipulations are all constrained to a single DB"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        dive.authors.set([mark])
        john = Person.objects.using("other").create(name="John Smith")
        assert titles(Book.objects.using("other").filter(authors__name="John Smith")) == []
        dive.authors.add(john)
        assert titles(Book.objects.using("other").filter(authors__name="Mark Pilgrim")) == ["Dive into Python"]
        assert titles(Book.objects.using("other").filter(authors__name="John Smith")) == ["Dive into Python"]
        dive.authors.remove(john)
        assert titles(Book.objects.using("other").filter(authors__name="Mark Pilgrim")) == ["Dive into Python"]
        assert titles(Book.objects.using("other").filter(authors__name="John Smith")) == []
        dive.authors.clear()
        assert titles(Book.objects.using("other").filter(authors__name="Mark Pilgrim")) == []
        assert titles(Book.objects.using("other").filter(authors__name="John Smith")) == []
        dive.authors.create(name="Jane Brown")
        assert titles(Book.objects.using("other").filter(authors__name="Mark Pilgrim")) == []
        assert titles(Book.objects.using("other").filter(authors__name="Jane Brown")) == ["Dive into Python"]

    # Django: QueryTestCase.test_m2m_reverse_operations
    def test_m2m_reverse_operations(self) -> None:
        "M2M reverse manipulations are all constrained to a single DB"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        dive.authors.set([mark])
        grease = Book.objects.using("other").create(title="Greasemonkey Hacks", published=datetime.date(2005, 11, 1))
        mark.book_set.add(grease)
        assert names(Person.objects.using("other").filter(book_set__title="Dive into Python")) == ["Mark Pilgrim"]
        assert names(Person.objects.using("other").filter(book_set__title="Greasemonkey Hacks")) == ["Mark Pilgrim"]
        mark.book_set.remove(grease)
        assert names(Person.objects.using("other").filter(book_set__title="Dive into Python")) == ["Mark Pilgrim"]
        assert names(Person.objects.using("other").filter(book_set__title="Greasemonkey Hacks")) == []
        mark.book_set.clear()
        assert names(Person.objects.using("other").filter(book_set__title="Dive into Python")) == []
        assert names(Person.objects.using("other").filter(book_set__title="Greasemonkey Hacks")) == []
        mark.book_set.create(title="Dive into HTML5", published=datetime.date(2020, 1, 1))
        assert names(Person.objects.using("other").filter(book_set__title="Dive into Python")) == []
        assert names(Person.objects.using("other").filter(book_set__title="Dive into HTML5")) == ["Mark Pilgrim"]

    # Django: QueryTestCase.test_m2m_cross_database_protection
    def test_m2m_cross_database_protection(self, multidb: shardkit.Cluster) -> None:
        "Operations that involve sharing M2M objects across databases raise an error"
        pro = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = Person.objects.create(name="Marty Alchin")
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        # Set a foreign key set with an object from a different database
        msg = 'Cannot assign "<Person: Marty Alchin>": the current database router prevents this relation.'
        with raises_message(ValueError, msg), multidb.session():
            marty.edited.set([pro, dive])
        # Add to an m2m with an object from a different database
        msg = 'Cannot add "<Book: Dive into Python>": instance is on database "default", value is on database "other"'
        with raises_message(ValueError, msg), multidb.session():
            marty.book_set.add(dive)
        # Set a m2m with an object from a different database
        with raises_message(ValueError, msg), multidb.session():
            marty.book_set.set([pro, dive])
        # Add to a reverse m2m with an object from a different database
        msg = 'Cannot add "<Person: Marty Alchin>": instance is on database "other", value is on database "default"'
        with raises_message(ValueError, msg), multidb.session():
            dive.authors.add(marty)
        # Set a reverse m2m with an object from a different database
        with raises_message(ValueError, msg), multidb.session():
            dive.authors.set([mark, marty])

    # Django: QueryTestCase.test_m2m_deletion
    def test_m2m_deletion(self, multidb: shardkit.Cluster) -> None:
        "Cascaded deletions of m2m relations issue queries on the right database"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        dive.authors.set([mark])
        assert Person.objects.using("default").count() == 0
        assert Book.objects.using("default").count() == 0
        assert through_count(multidb, "default") == 0
        assert Person.objects.using("other").count() == 1
        assert Book.objects.using("other").count() == 1
        assert through_count(multidb, "other") == 1
        dive.delete(using="other")
        assert Person.objects.using("default").count() == 0
        assert Book.objects.using("default").count() == 0
        assert through_count(multidb, "default") == 0
        assert Person.objects.using("other").count() == 1  # The person still exists ...
        assert Book.objects.using("other").count() == 0  # ... but the book has been deleted
        assert through_count(multidb, "other") == 0  # ... and the relationship object too.
        # Now try deletion in the reverse direction. Set up the relation again
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        dive.authors.set([mark])
        assert Person.objects.using("default").count() == 0
        assert Book.objects.using("default").count() == 0
        assert through_count(multidb, "default") == 0
        assert Person.objects.using("other").count() == 1
        assert Book.objects.using("other").count() == 1
        assert through_count(multidb, "other") == 1
        mark.delete(using="other")
        assert Person.objects.using("default").count() == 0
        assert Book.objects.using("default").count() == 0
        assert through_count(multidb, "default") == 0
        assert Person.objects.using("other").count() == 0  # The person has been deleted ...
        assert Book.objects.using("other").count() == 1  # ... but the book still exists
        assert through_count(multidb, "other") == 0  # ... and the relationship object has been deleted.

    # Django: QueryTestCase.test_foreign_key_separation
    def test_foreign_key_separation(self) -> None:
        "FK fields are constrained to a single database"
        pro = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        george = Person.objects.create(name="George Vilches")
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        chris = Person.objects.using("other").create(name="Chris Mills")
        pro.editor = george
        pro.save()
        dive.editor = chris
        dive.save()
        pro = Book.objects.using("default").get(title="Pro Django")
        assert pro.editor is not None and pro.editor.name == "George Vilches"
        dive = Book.objects.using("other").get(title="Dive into Python")
        assert dive.editor is not None and dive.editor.name == "Chris Mills"
        # Queries work across foreign key joins
        assert names(Person.objects.using("default").filter(edited__title="Pro Django")) == ["George Vilches"]
        assert names(Person.objects.using("other").filter(edited__title="Pro Django")) == []
        assert names(Person.objects.using("default").filter(edited__title="Dive into Python")) == []
        assert names(Person.objects.using("other").filter(edited__title="Dive into Python")) == ["Chris Mills"]
        chris = Person.objects.using("other").get(name="Chris Mills")
        dive = Book.objects.using("other").get(title="Dive into Python")
        assert list(chris.edited.values_list("title", flat=True)) == ["Dive into Python"]

    # Django: QueryTestCase.test_foreign_key_reverse_operations
    def test_foreign_key_reverse_operations(self) -> None:
        "FK reverse manipulations are all constrained to a single DB"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        chris = Person.objects.using("other").create(name="Chris Mills")
        dive.editor = chris
        dive.save()
        html5 = Book.objects.using("other").create(title="Dive into HTML5", published=datetime.date(2010, 3, 15))
        assert names(Person.objects.using("other").filter(edited__title="Dive into HTML5")) == []
        chris.edited.add(html5)
        assert names(Person.objects.using("other").filter(edited__title="Dive into HTML5")) == ["Chris Mills"]
        assert names(Person.objects.using("other").filter(edited__title="Dive into Python")) == ["Chris Mills"]
        chris.edited.remove(html5)
        assert names(Person.objects.using("other").filter(edited__title="Dive into HTML5")) == []
        assert names(Person.objects.using("other").filter(edited__title="Dive into Python")) == ["Chris Mills"]
        chris.edited.clear()
        assert names(Person.objects.using("other").filter(edited__title="Dive into HTML5")) == []
        assert names(Person.objects.using("other").filter(edited__title="Dive into Python")) == []
        chris.edited.create(title="Dive into Water", published=datetime.date(2010, 3, 15))
        assert names(Person.objects.using("other").filter(edited__title="Dive into HTML5")) == []
        assert names(Person.objects.using("other").filter(edited__title="Dive into Water")) == ["Chris Mills"]
        assert names(Person.objects.using("other").filter(edited__title="Dive into Python")) == []

    # Django: QueryTestCase.test_foreign_key_cross_database_protection
    def test_foreign_key_cross_database_protection(self, multidb: shardkit.Cluster) -> None:
        "Operations that involve sharing FK objects across databases raise an error"
        pro = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = Person.objects.create(name="Marty Alchin")
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        msg = 'Cannot assign "<Person: Marty Alchin>": the current database router prevents this relation.'
        with raises_message(ValueError, msg):
            dive.editor = marty
        with raises_message(ValueError, msg), multidb.session():
            marty.edited.set([pro, dive])
        with raises_message(ValueError, msg), multidb.session():
            marty.edited.add(dive)

    # Django: QueryTestCase.test_foreign_key_deletion
    def test_foreign_key_deletion(self) -> None:
        "Cascaded deletions of Foreign Key relations issue queries on the right database"
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        Pet.objects.using("other").create(name="Fido", owner=mark)
        assert Person.objects.using("default").count() == 0
        assert Pet.objects.using("default").count() == 0
        assert Person.objects.using("other").count() == 1
        assert Pet.objects.using("other").count() == 1
        mark.delete(using="other")  # Delete the person object, which will cascade onto the pet
        assert Person.objects.using("default").count() == 0
        assert Pet.objects.using("default").count() == 0
        assert Person.objects.using("other").count() == 0
        assert Pet.objects.using("other").count() == 0

    # Django: QueryTestCase.test_o2o_separation
    def test_o2o_separation(self) -> None:
        "OneToOne fields are constrained to a single database"
        alice = User.objects.db_manager("default").create_user("alice", "alice@example.com")
        alice_profile = UserProfile.objects.using("default").create(user=alice, flavor="chocolate")
        bob = User.objects.db_manager("other").create_user("bob", "bob@example.com")
        bob_profile = UserProfile.objects.using("other").create(user=bob, flavor="crunchy frog")
        alice = User.objects.using("default").get(username="alice")
        assert alice.userprofile is not None and alice.userprofile.flavor == "chocolate"
        bob = User.objects.using("other").get(username="bob")
        assert bob.userprofile is not None and bob.userprofile.flavor == "crunchy frog"
        users = User.objects.using("default").filter(userprofile__flavor="chocolate")
        assert list(users.values_list("username", flat=True)) == ["alice"]
        users = User.objects.using("other").filter(userprofile__flavor="chocolate")
        assert list(users.values_list("username", flat=True)) == []
        users = User.objects.using("default").filter(userprofile__flavor="crunchy frog")
        assert list(users.values_list("username", flat=True)) == []
        users = User.objects.using("other").filter(userprofile__flavor="crunchy frog")
        assert list(users.values_list("username", flat=True)) == ["bob"]
        alice_profile = UserProfile.objects.using("default").get(flavor="chocolate")
        bob_profile = UserProfile.objects.using("other").get(flavor="crunchy frog")
        assert alice_profile.user is not None and alice_profile.user.username == "alice"
        assert bob_profile.user is not None and bob_profile.user.username == "bob"

    # Django: QueryTestCase.test_o2o_cross_database_protection
    def test_o2o_cross_database_protection(self) -> None:
        "Operations that involve sharing FK objects across databases raise an error"
        alice = User.objects.db_manager("default").create_user("alice", "alice@example.com")
        bob = User.objects.db_manager("other").create_user("bob", "bob@example.com")
        alice_profile = UserProfile.objects.using("default").create(user=alice, flavor="chocolate")
        msg = f'Cannot assign "{alice_profile!r}": the current database router prevents this relation.'
        with raises_message(ValueError, msg):
            bob.userprofile = alice_profile
        # BUT! if you assign a FK object when the base object hasn't been saved yet, you
        # implicitly assign the database for the base object.
        bob_profile = UserProfile.objects.using("other").create(user=bob, flavor="crunchy frog")
        new_bob_profile = UserProfile(flavor="spring surprise")
        # assigning a profile requires an explicit pk as the object isn't saved
        charlie = User(pk=51, username="charlie", email="charlie@example.com")
        charlie.set_unusable_password()
        # initially, no db assigned
        assert db_of(new_bob_profile) is None
        assert db_of(charlie) is None
        # old object comes from 'other', so the new object is set to use 'other'...
        new_bob_profile.user = bob
        charlie.userprofile = bob_profile
        assert db_of(new_bob_profile) == "other"
        assert db_of(charlie) == "other"
        # ... but it isn't saved yet
        assert list(User.objects.using("other").values_list("username", flat=True)) == ["bob"]
        assert list(UserProfile.objects.using("other").values_list("flavor", flat=True)) == ["crunchy frog"]
        # When saved (no using required), new objects goes to 'other'
        charlie.save()
        bob_profile.save()
        new_bob_profile.save()
        assert list(User.objects.using("default").values_list("username", flat=True)) == ["alice"]
        assert sorted(User.objects.using("other").values_list("username", flat=True)) == ["bob", "charlie"]
        assert list(UserProfile.objects.using("default").values_list("flavor", flat=True)) == ["chocolate"]
        flavors = list(UserProfile.objects.using("other").values_list("flavor", flat=True))
        assert flavors == ["crunchy frog", "spring surprise"]
        # This also works if you assign the O2O relation in the constructor
        denise = User.objects.db_manager("other").create_user("denise", "denise@example.com")
        denise_profile = UserProfile(flavor="tofu", user=denise)
        assert db_of(denise_profile) == "other"
        # ... but it isn't saved yet
        assert list(UserProfile.objects.using("default").values_list("flavor", flat=True)) == ["chocolate"]
        flavors = list(UserProfile.objects.using("other").values_list("flavor", flat=True))
        assert flavors == ["crunchy frog", "spring surprise"]
        # When saved, the new profile goes to 'other'
        denise_profile.save()
        assert list(UserProfile.objects.using("default").values_list("flavor", flat=True)) == ["chocolate"]
        flavors = list(UserProfile.objects.using("other").values_list("flavor", flat=True))
        assert flavors == ["crunchy frog", "spring surprise", "tofu"]

    # Django: QueryTestCase.test_ordering
    def test_ordering(self) -> None:
        "get_next_by_XXX commands stick to a single database"
        Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        learn = Book.objects.using("other").create(title="Learning Python", published=datetime.date(2008, 7, 16))
        assert learn.get_next_by_published().title == "Dive into Python"
        assert dive.get_previous_by_published().title == "Learning Python"

    # Django: QueryTestCase.test_raw
    def test_raw(self) -> None:
        "test the raw() method across databases"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        val = Book.objects.db_manager("other").raw("SELECT id FROM multiple_database_book")
        assert [b.pk for b in val] == [dive.pk]
        val = Book.objects.raw("SELECT id FROM multiple_database_book").using("other")
        assert [b.pk for b in val] == [dive.pk]

    # Django: QueryTestCase.test_select_related
    def test_select_related(self) -> None:
        "Database assignment is retained if an object is retrieved with select_related()"
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4), editor=mark)
        book = Book.objects.using("other").select_related("editor").get(title="Dive into Python")
        assert db_of(book.editor) == "other"  # The editor instance should have a db state

    # Django: QueryTestCase.test_subquery
    def test_subquery(self) -> None:
        """Make sure as_sql works with subqueries and primary/replica."""
        sub = Person.objects.using("other").filter(name="fff")
        qs = Book.objects.filter(editor__in=sub)
        # If the subquery explicitly uses a different database, an error should be raised.
        msg = (
            "Subqueries aren't allowed across different databases. Force the inner query to be "
            "evaluated using `list(inner_query)`."
        )
        with raises_message(ValueError, msg):
            str(qs.query)
        # Evaluating the query shouldn't work, either
        with raises_message(ValueError, msg):
            for _obj in qs:
                pass

    # Django: QueryTestCase.test_related_manager
    def test_related_manager(self) -> None:
        "Related managers return managers, not querysets"
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        # extra_arg is removed by the BookManager's implementation of create(); but the
        # BookManager's implementation won't get called unless edited returns a Manager
        mark.book_set.create(title="Dive into Python", published=datetime.date(2009, 5, 4), extra_arg=True)
        mark.book_set.get_or_create(title="Dive into Python", published=datetime.date(2009, 5, 4), extra_arg=True)
        mark.edited.create(title="Dive into Water", published=datetime.date(2009, 5, 4), extra_arg=True)
        mark.edited.get_or_create(title="Dive into Water", published=datetime.date(2009, 5, 4), extra_arg=True)


class TestConnectionRouterTestCase:
    # Django: ConnectionRouterTestCase.test_router_init_default
    def test_router_init_default(self, multidb: shardkit.Cluster) -> None:
        settings = types.ModuleType("settings")
        settings.DATABASES = {alias: multidb.engine(alias).url for alias in multidb.aliases}  # type: ignore[attr-defined]
        settings.DATABASE_ROUTERS = [  # type: ignore[attr-defined]
            "tests.django_suite.routers.TestRouter",
            "tests.django_suite.routers.WriteRouter",
        ]
        cluster = shardkit.Cluster.from_settings(settings)
        assert [r.__class__.__name__ for r in cluster.router.routers] == ["TestRouter", "WriteRouter"]

    # Django: ConnectionRouterTestCase.test_router_init_arg
    def test_router_init_arg(self) -> None:
        aliases = ["default", "other"]
        chain = shardkit.RouterChain(
            ["tests.django_suite.routers.TestRouter", "tests.django_suite.routers.WriteRouter"], aliases
        )
        assert [r.__class__.__name__ for r in chain.routers] == ["TestRouter", "WriteRouter"]
        # Init with instances instead of strings
        chain = shardkit.RouterChain([TestRouter(), WriteRouter()], aliases)
        assert [r.__class__.__name__ for r in chain.routers] == ["TestRouter", "WriteRouter"]


@pytest.fixture
def test_router(multidb: shardkit.Cluster) -> Any:
    # Make the 'other' database appear to be a replica of the 'default'
    with override_routers(multidb, [TestRouter()]) as chain:
        yield chain


@pytest.mark.usefixtures("test_router")
class TestRouterTestCase:
    # Django: RouterTestCase.test_db_selection
    def test_db_selection(self) -> None:
        "Querysets obey the router for db suggestions"
        assert Book.objects.db == "other"
        assert Book.objects.all().db == "other"
        assert Book.objects.using("default").db == "default"
        assert Book.objects.db_manager("default").db == "default"
        assert Book.objects.db_manager("default").all().db == "default"

    # Django: RouterTestCase.test_migrate_selection
    def test_migrate_selection(self, multidb: shardkit.Cluster) -> None:
        "Synchronization behavior is predictable"
        router = multidb.router
        assert router.allow_migrate_model("default", User)
        assert router.allow_migrate_model("default", Book)
        assert router.allow_migrate_model("other", User)
        assert router.allow_migrate_model("other", Book)
        with override_routers(multidb, [TestRouter(), AuthRouter()]) as router:
            # Add the auth router to the chain. TestRouter is a universal synchronizer, so it
            # should have no effect.
            assert router.allow_migrate_model("default", User)
            assert router.allow_migrate_model("default", Book)
            assert router.allow_migrate_model("other", User)
            assert router.allow_migrate_model("other", Book)
        with override_routers(multidb, [AuthRouter(), TestRouter()]) as router:
            # Now check what happens if the router order is reversed.
            assert not router.allow_migrate_model("default", User)
            assert router.allow_migrate_model("default", Book)
            assert router.allow_migrate_model("other", User)
            assert router.allow_migrate_model("other", Book)

    # Django: RouterTestCase.test_partial_router
    def test_partial_router(self, multidb: shardkit.Cluster) -> None:
        "A router can choose to implement a subset of methods"
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        router = multidb.router
        # First check the baseline behavior.
        assert router.db_for_read(User) == "other"
        assert router.db_for_read(Book) == "other"
        assert router.db_for_write(User) == "default"
        assert router.db_for_write(Book) == "default"
        assert router.allow_relation(dive, dive)
        assert router.allow_migrate_model("default", User)
        assert router.allow_migrate_model("default", Book)
        # WriteRouter names a "writer" database: shardkit checks every alias a router
        # returns, so this chain is built over the aliases plus "writer".
        aliases = [*multidb.aliases, "writer"]
        with override_routers(multidb, [WriteRouter(), AuthRouter(), TestRouter()], aliases) as router:
            assert router.db_for_read(User) == "default"
            assert router.db_for_read(Book) == "other"
            assert router.db_for_write(User) == "writer"
            assert router.db_for_write(Book) == "writer"
            assert router.allow_relation(dive, dive)
            assert not router.allow_migrate_model("default", User)
            assert router.allow_migrate_model("default", Book)

    # Django: RouterTestCase.test_database_routing
    def test_database_routing(self) -> None:
        marty = Person.objects.using("default").create(name="Marty Alchin")
        pro = Book.objects.using("default").create(
            title="Pro Django", published=datetime.date(2008, 12, 16), editor=marty
        )
        pro.authors.set([marty])
        # Create a book and author on the other database
        Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        # An update query will be routed to the default database
        Book.objects.filter(title="Pro Django").update(pages=200)
        with pytest.raises(Book.DoesNotExist):
            # By default, the get query will be directed to 'other'
            Book.objects.get(title="Pro Django")
        # But the same query issued explicitly at a database will work.
        pro = Book.objects.using("default").get(title="Pro Django")
        assert pro.pages == 200  # The update worked.
        # An update query with an explicit using clause will be routed to the requested database.
        Book.objects.using("other").filter(title="Dive into Python").update(pages=300)
        assert Book.objects.get(title="Dive into Python").pages == 300
        # Related object queries stick to the same database as the original object, regardless
        # of the router
        assert list(pro.authors.values_list("name", flat=True)) == ["Marty Alchin"]
        assert pro.editor is not None and pro.editor.name == "Marty Alchin"
        # get_or_create is a special case. The get needs to be targeted at the write database in
        # order to avoid potential transaction consistency problems
        _book, created = Book.objects.get_or_create(title="Pro Django")
        assert not created
        _book, created = Book.objects.get_or_create(
            title="Dive Into Python", defaults={"published": datetime.date(2009, 5, 4)}
        )
        assert created
        # Check the head count of objects
        assert Book.objects.using("default").count() == 2
        assert Book.objects.using("other").count() == 1
        # If a database isn't specified, the read database is used
        assert Book.objects.count() == 1
        # A delete query will also be routed to the default database
        Book.objects.filter(pages__gt=150).delete()
        # The default database has lost the book.
        assert Book.objects.using("default").count() == 1
        assert Book.objects.using("other").count() == 1

    # Django: RouterTestCase.test_invalid_set_foreign_key_assignment
    def test_invalid_set_foreign_key_assignment(self) -> None:
        marty = Person.objects.using("default").create(name="Marty Alchin")
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        # Set a foreign key set with an object from a different database
        msg = "<Book: Dive into Python> instance isn't saved. Use bulk=False or save the object first."
        with raises_message(ValueError, msg):
            marty.edited.set([dive])

    # Django: RouterTestCase.test_foreign_key_cross_database_protection
    def test_foreign_key_cross_database_protection(self) -> None:
        "Foreign keys can cross databases if they two databases have a common source"
        pro = Book.objects.using("default").create(title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = Person.objects.using("default").create(name="Marty Alchin")
        dive = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        # Set a foreign key with an object from a different database
        dive.editor = marty
        # Database assignments of original objects haven't changed...
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "other"
        assert db_of(mark) == "other"
        # ... but they will when the affected object is saved.
        dive.save()
        assert db_of(dive) == "default"
        # ...and the source database now has a copy of any object saved
        Book.objects.using("default").get(title="Dive into Python").delete()
        # This isn't a real primary/replica database, so restore the original from other
        dive = Book.objects.using("other").get(title="Dive into Python")
        assert db_of(dive) == "other"
        # Set a foreign key set with an object from a different database
        marty.edited.set([pro, dive], bulk=False)
        # Assignment implies a save, so database assignments of original objects have changed...
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "default"
        assert db_of(mark) == "other"
        # ...and the source database now has a copy of any object saved
        Book.objects.using("default").get(title="Dive into Python").delete()
        # This isn't a real primary/replica database, so restore the original from other
        dive = Book.objects.using("other").get(title="Dive into Python")
        assert db_of(dive) == "other"
        # Add to a foreign key set with an object from a different database
        marty.edited.add(dive, bulk=False)
        # Add implies a save, so database assignments of original objects have changed...
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "default"
        assert db_of(mark) == "other"
        # ...and the source database now has a copy of any object saved
        Book.objects.using("default").get(title="Dive into Python").delete()
        # This isn't a real primary/replica database, so restore the original from other
        dive = Book.objects.using("other").get(title="Dive into Python")
        # If you assign a FK object when the base object hasn't been saved yet, you implicitly
        # assign the database for the base object.
        chris = Person(name="Chris Mills")
        html5 = Book(title="Dive into HTML5", published=datetime.date(2010, 3, 15))
        # initially, no db assigned
        assert db_of(chris) is None
        assert db_of(html5) is None
        # old object comes from 'other', so the new object is set to use the source of 'other'...
        assert db_of(dive) == "other"
        chris.save()
        dive.editor = chris
        html5.editor = mark
        assert db_of(dive) == "other"
        assert db_of(mark) == "other"
        assert db_of(chris) == "default"
        assert db_of(html5) == "default"
        # This also works if you assign the FK in the constructor
        water = Book(title="Dive into Water", published=datetime.date(2001, 1, 1), editor=mark)
        assert db_of(water) == "default"
        # For the remainder of this test, create a copy of 'mark' in the 'default' database to
        # prevent integrity errors on backends that don't defer constraints checks until the end
        # of the transaction
        mark.save(using="default")
        # This moved 'mark' in the 'default' database, move it back in 'other'
        mark.save(using="other")
        assert db_of(mark) == "other"
        # If you create an object through a FK relation, it will be written to the write
        # database, even if the original object was on the read database
        cheesecake = mark.edited.create(title="Dive into Cheesecake", published=datetime.date(2010, 3, 15))
        assert db_of(cheesecake) == "default"
        # Same goes for get_or_create, regardless of whether getting or creating
        cheesecake, _created = mark.edited.get_or_create(
            title="Dive into Cheesecake", published=datetime.date(2010, 3, 15)
        )
        assert db_of(cheesecake) == "default"
        puddles, _created = mark.edited.get_or_create(title="Dive into Puddles", published=datetime.date(2010, 3, 15))
        assert db_of(puddles) == "default"

    # Django: RouterTestCase.test_m2m_cross_database_protection
    def test_m2m_cross_database_protection(self, multidb: shardkit.Cluster) -> None:
        "M2M relations can cross databases if the database share a source"
        # Create books and authors on the inverse to the usual database
        pro = Book.objects.using("other").create(pk=1, title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = Person.objects.using("other").create(pk=1, name="Marty Alchin")
        dive = Book.objects.using("default").create(pk=2, title="Dive into Python", published=datetime.date(2009, 5, 4))
        mark = Person.objects.using("default").create(pk=2, name="Mark Pilgrim")
        # Now save back onto the usual database. This simulates primary/replica - the objects
        # exist on both database, but the _state.db is as it is for all other tests.
        pro.save(using="default")
        marty.save(using="default")
        dive.save(using="other")
        mark.save(using="other")
        # We have 2 of both types of object on both databases
        assert Book.objects.using("default").count() == 2
        assert Book.objects.using("other").count() == 2
        assert Person.objects.using("default").count() == 2
        assert Person.objects.using("other").count() == 2
        # Set a m2m set with an object from a different database
        marty.book_set.set([pro, dive])
        # Database assignments don't change
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "other"
        assert db_of(mark) == "other"
        # All m2m relations should be saved on the default database
        assert through_count(multidb, "default") == 2
        assert through_count(multidb, "other") == 0
        # Reset relations
        through_delete(multidb, "default")
        # Add to an m2m with an object from a different database
        marty.book_set.add(dive)
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "other"
        assert db_of(mark) == "other"
        assert through_count(multidb, "default") == 1
        assert through_count(multidb, "other") == 0
        through_delete(multidb, "default")
        # Set a reverse m2m with an object from a different database
        dive.authors.set([mark, marty])
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "other"
        assert db_of(mark) == "other"
        assert through_count(multidb, "default") == 2
        assert through_count(multidb, "other") == 0
        through_delete(multidb, "default")
        assert through_count(multidb, "default") == 0
        assert through_count(multidb, "other") == 0
        # Add to a reverse m2m with an object from a different database
        dive.authors.add(marty)
        assert db_of(marty) == "default"
        assert db_of(pro) == "default"
        assert db_of(dive) == "other"
        assert db_of(mark) == "other"
        assert through_count(multidb, "default") == 1
        assert through_count(multidb, "other") == 0
        # If you create an object through a M2M relation, it will be written to the write
        # database, even if the original object was on the read database
        alice = dive.authors.create(name="Alice", pk=3)
        assert db_of(alice) == "default"
        # Same goes for get_or_create, regardless of whether getting or creating
        alice, _created = dive.authors.get_or_create(name="Alice")
        assert db_of(alice) == "default"
        bob, _created = dive.authors.get_or_create(name="Bob", defaults={"pk": 4})
        assert db_of(bob) == "default"

    # Django: RouterTestCase.test_o2o_cross_database_protection
    def test_o2o_cross_database_protection(self) -> None:
        "Operations that involve sharing FK objects across databases raise an error"
        alice = User.objects.db_manager("default").create_user("alice", "alice@example.com")
        bob = User.objects.db_manager("other").create_user("bob", "bob@example.com")
        # Set a one-to-one relation with an object from a different database
        alice_profile = UserProfile.objects.create(user=alice, flavor="chocolate")
        bob.userprofile = alice_profile
        # Database assignments of original objects haven't changed...
        assert db_of(alice) == "default"
        assert db_of(alice_profile) == "default"
        assert db_of(bob) == "other"
        # ... but they will when the affected object is saved.
        bob.save()
        assert db_of(bob) == "default"

    # Django: RouterTestCase.test_m2m_managers
    def test_m2m_managers(self) -> None:
        "M2M relations are represented by managers, and can be controlled like managers"
        pro = Book.objects.using("other").create(pk=1, title="Pro Django", published=datetime.date(2008, 12, 16))
        marty = Person.objects.using("other").create(pk=1, name="Marty Alchin")
        assert pro.authors.db == "other"
        assert pro.authors.db_manager("default").db == "default"
        assert pro.authors.db_manager("default").all().db == "default"
        assert marty.book_set.db == "other"
        assert marty.book_set.db_manager("default").db == "default"
        assert marty.book_set.db_manager("default").all().db == "default"

    # Django: RouterTestCase.test_foreign_key_managers
    def test_foreign_key_managers(self) -> None:
        "FK reverse relations are represented by managers, and can be controlled like managers."
        marty = Person.objects.using("other").create(pk=1, name="Marty Alchin")
        Book.objects.using("other").create(
            pk=1, title="Pro Django", published=datetime.date(2008, 12, 16), editor=marty
        )
        assert marty.edited.db == "other"
        assert marty.edited.db_manager("default").db == "default"
        assert marty.edited.db_manager("default").all().db == "default"

    # Django: RouterTestCase.test_subquery
    def test_subquery(self) -> None:
        """Make sure as_sql works with subqueries and primary/replica."""
        mark = Person.objects.using("other").create(name="Mark Pilgrim")
        Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4), editor=mark)
        sub = Person.objects.filter(name="Mark Pilgrim")
        qs = Book.objects.filter(editor__in=sub)
        # When you call __str__ on the query object, it doesn't know about using so it falls back
        # to the default. Don't let routing instructions force the subquery to an incompatible
        # database.
        str(qs.query)
        # If you evaluate the query, it should work, running on 'other'
        assert list(qs.values_list("title", flat=True)) == ["Dive into Python"]

    # Django: RouterTestCase.test_deferred_models
    def test_deferred_models(self) -> None:
        mark_def = Person.objects.using("default").create(name="Mark Pilgrim")
        mark_other = Person.objects.using("other").create(name="Mark Pilgrim")
        orig_b = Book.objects.using("other").create(
            title="Dive into Python", published=datetime.date(2009, 5, 4), editor=mark_other
        )
        b = Book.objects.using("other").only("title").get(pk=orig_b.pk)
        assert b.published == datetime.date(2009, 5, 4)
        b = Book.objects.using("other").only("title").get(pk=orig_b.pk)
        b.editor = mark_def
        b.save(using="default")
        assert Book.objects.using("default").get(pk=b.pk).published == datetime.date(2009, 5, 4)


@pytest.fixture
def auth_router(multidb: shardkit.Cluster) -> Any:
    with override_routers(multidb, [AuthRouter()]) as chain:
        yield chain


@pytest.mark.usefixtures("auth_router")
class TestAuthTestCase:
    # Django: AuthTestCase.test_auth_manager
    def test_auth_manager(self) -> None:
        "The methods on the auth manager obey database hints"
        # Create one user using default allocation policy
        User.objects.create_user("alice", "alice@example.com")
        # Create another user, explicitly specifying the database
        User.objects.db_manager("default").create_user("bob", "bob@example.com")
        # The second user only exists on the other database
        alice = User.objects.using("other").get(username="alice")
        assert alice.username == "alice"
        assert db_of(alice) == "other"
        with pytest.raises(User.DoesNotExist):
            User.objects.using("default").get(username="alice")
        # The second user only exists on the default database
        bob = User.objects.using("default").get(username="bob")
        assert bob.username == "bob"
        assert db_of(bob) == "default"
        with pytest.raises(User.DoesNotExist):
            User.objects.using("other").get(username="bob")
        # That is... there is one user on each database
        assert User.objects.using("default").count() == 1
        assert User.objects.using("other").count() == 1


class TestPickleQuerySetTestCase:
    # Django: PickleQuerySetTestCase.test_pickling
    def test_pickling(self) -> None:
        for db in ("default", "other"):
            Book.objects.using(db).create(title="Dive into Python", published=datetime.date(2009, 5, 4))
            qs = Book.objects.all()
            assert qs.db == pickle.loads(pickle.dumps(qs)).db


class DatabaseReceiver:
    """Used in the tests for the database argument in signals (#13552)"""

    _database: str | None = None

    def __call__(self, **kwargs: Any) -> None:
        self._database = kwargs["using"]


class WriteToOtherRouter:
    """A router that sends all writes to the other database."""

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "other"


class TestSignalTests:
    # Django: SignalTests.test_database_arg_save_and_delete
    def test_database_arg_save_and_delete(self) -> None:
        """The pre/post_save signal contains the correct database."""
        pre_save_receiver = DatabaseReceiver()
        post_save_receiver = DatabaseReceiver()
        pre_delete_receiver = DatabaseReceiver()
        post_delete_receiver = DatabaseReceiver()
        shardkit.listen(Person, "pre_save", pre_save_receiver)
        shardkit.listen(Person, "post_save", post_save_receiver)
        shardkit.listen(Person, "pre_delete", pre_delete_receiver)
        shardkit.listen(Person, "post_delete", post_delete_receiver)
        try:
            p = Person.objects.create(name="Darth Vader")
            # Save and test receivers got calls
            p.save()
            assert pre_save_receiver._database == DEFAULT_DB_ALIAS
            assert post_save_receiver._database == DEFAULT_DB_ALIAS
            # Delete, and test
            p.delete()
            assert pre_delete_receiver._database == DEFAULT_DB_ALIAS
            assert post_delete_receiver._database == DEFAULT_DB_ALIAS
            # Save again to a different database
            p.save(using="other")
            assert pre_save_receiver._database == "other"
            assert post_save_receiver._database == "other"
            # Delete, and test
            p.delete(using="other")
            assert pre_delete_receiver._database == "other"
            assert post_delete_receiver._database == "other"
        finally:
            shardkit.remove(Person, "pre_save", pre_save_receiver)
            shardkit.remove(Person, "post_save", post_save_receiver)
            shardkit.remove(Person, "pre_delete", pre_delete_receiver)
            shardkit.remove(Person, "post_delete", post_delete_receiver)

    # Django: SignalTests.test_database_arg_m2m
    def test_database_arg_m2m(self, multidb: shardkit.Cluster) -> None:
        """The m2m_changed signal has a correct database arg."""
        receiver = DatabaseReceiver()
        shardkit.listen(Base, "m2m_changed", receiver)  # every model: Django's connect() without sender
        try:
            b = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
            p = Person.objects.create(name="Marty Alchin")
            # Create a copy of the models on the 'other' database to prevent integrity errors on
            # backends that don't defer constraints checks
            Book.objects.using("other").create(pk=b.pk, title=b.title, published=b.published)
            Person.objects.using("other").create(pk=p.pk, name=p.name)
            # Test addition
            b.authors.add(p)
            assert receiver._database == DEFAULT_DB_ALIAS
            with override_routers(multidb, [WriteToOtherRouter()]):
                b.authors.add(p)
            assert receiver._database == "other"
            # Test removal
            b.authors.remove(p)
            assert receiver._database == DEFAULT_DB_ALIAS
            with override_routers(multidb, [WriteToOtherRouter()]):
                b.authors.remove(p)
            assert receiver._database == "other"
            # Test addition in reverse
            p.book_set.add(b)
            assert receiver._database == DEFAULT_DB_ALIAS
            with override_routers(multidb, [WriteToOtherRouter()]):
                p.book_set.add(b)
            assert receiver._database == "other"
            # Test clearing
            b.authors.clear()
            assert receiver._database == DEFAULT_DB_ALIAS
            with override_routers(multidb, [WriteToOtherRouter()]):
                b.authors.clear()
            assert receiver._database == "other"
        finally:
            shardkit.remove(Base, "m2m_changed", receiver)


class AttributeErrorRouter:
    "A router to test the exception handling of ConnectionRouter"

    def db_for_read(self, model: Any, **hints: Any) -> str:
        raise AttributeError

    def db_for_write(self, model: Any, **hints: Any) -> str:
        raise AttributeError


class TestRouterAttributeErrorTestCase:
    # Django: RouterAttributeErrorTestCase.test_attribute_error_read
    def test_attribute_error_read(self, multidb: shardkit.Cluster) -> None:
        "The AttributeError from AttributeErrorRouter bubbles up"
        b = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        with override_routers(multidb, [AttributeErrorRouter()]), pytest.raises(AttributeError):
            Book.objects.get(pk=b.pk)

    # Django: RouterAttributeErrorTestCase.test_attribute_error_save
    def test_attribute_error_save(self, multidb: shardkit.Cluster) -> None:
        "The AttributeError from AttributeErrorRouter bubbles up"
        dive = Book()
        dive.title = "Dive into Python"
        dive.published = datetime.date(2009, 5, 4)
        with override_routers(multidb, [AttributeErrorRouter()]), pytest.raises(AttributeError):
            dive.save()

    # Django: RouterAttributeErrorTestCase.test_attribute_error_delete
    def test_attribute_error_delete(self, multidb: shardkit.Cluster) -> None:
        "The AttributeError from AttributeErrorRouter bubbles up"
        b = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        p = Person.objects.create(name="Marty Alchin")
        b.authors.set([p])
        b.editor = p
        with override_routers(multidb, [AttributeErrorRouter()]), pytest.raises(AttributeError):
            b.delete()

    # Django: RouterAttributeErrorTestCase.test_attribute_error_m2m
    def test_attribute_error_m2m(self, multidb: shardkit.Cluster) -> None:
        "The AttributeError from AttributeErrorRouter bubbles up"
        b = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        p = Person.objects.create(name="Marty Alchin")
        with override_routers(multidb, [AttributeErrorRouter()]), pytest.raises(AttributeError):
            b.authors.set([p])


class ModelMetaRouter:
    "A router to ensure model arguments are real model classes (or, for link rows, the link table)"

    def db_for_write(self, model: Any, **hints: Any) -> None:
        if not (isinstance(model, Table) or hasattr(model, "__mapper__")):
            raise ValueError


@pytest.fixture
def model_meta_router(multidb: shardkit.Cluster) -> Any:
    with override_routers(multidb, [ModelMetaRouter()]) as chain:
        yield chain


@pytest.mark.usefixtures("model_meta_router")
class TestRouterModelArgumentTestCase:
    # Django: RouterModelArgumentTestCase.test_m2m_collection
    def test_m2m_collection(self) -> None:
        b = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        p = Person.objects.create(name="Marty Alchin")
        b.authors.add(p)  # test add
        b.authors.remove(p)  # test remove
        b.authors.clear()  # test clear
        b.authors.set([p])  # test setattr
        b.delete()  # test M2M collection

    # Django: RouterModelArgumentTestCase.test_foreignkey_collection
    def test_foreignkey_collection(self) -> None:
        person = Person.objects.create(name="Bob")
        Pet.objects.create(owner=person, name="Wart")
        person.delete()  # test related FK collection


class RouterUsed(Exception):
    WRITE = "write"

    def __init__(self, mode: str, model: Any, hints: dict[str, Any]) -> None:
        self.mode = mode
        self.model = model
        self.hints = hints


class WriteCheckRouter:
    def db_for_write(self, model: Any, **hints: Any) -> str:
        raise RouterUsed(mode=RouterUsed.WRITE, model=model, hints=hints)


class TestRouteForWriteTestCase:
    @pytest.fixture(autouse=True)
    def _cluster(self, multidb: shardkit.Cluster) -> None:
        self.cluster = multidb

    def override_router(self) -> Any:
        return override_routers(self.cluster, [WriteCheckRouter()])

    # Django: RouteForWriteTestCase.test_fk_delete
    def test_fk_delete(self) -> None:
        owner = Person.objects.create(name="Someone")
        pet = Pet.objects.create(name="fido", owner=owner)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            pet.owner.delete()
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Person
        assert e.hints == {"instance": owner}

    # Django: RouteForWriteTestCase.test_reverse_fk_delete
    def test_reverse_fk_delete(self) -> None:
        owner = Person.objects.create(name="Someone")
        to_del_qs = owner.pet_set.all()
        with pytest.raises(RouterUsed) as cm, self.override_router():
            to_del_qs.delete()
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Pet
        assert e.hints == {"instance": owner}

    # Django: RouteForWriteTestCase.test_reverse_fk_get_or_create
    def test_reverse_fk_get_or_create(self) -> None:
        owner = Person.objects.create(name="Someone")
        with pytest.raises(RouterUsed) as cm, self.override_router():
            owner.pet_set.get_or_create(name="fido")
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Pet
        assert e.hints == {"instance": owner}

    # Django: RouteForWriteTestCase.test_reverse_fk_update
    def test_reverse_fk_update(self) -> None:
        owner = Person.objects.create(name="Someone")
        Pet.objects.create(name="fido", owner=owner)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            owner.pet_set.update(name="max")
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Pet
        assert e.hints == {"instance": owner}

    # Django: RouteForWriteTestCase.test_m2m_add
    def test_m2m_add(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        with pytest.raises(RouterUsed) as cm, self.override_router():
            book.authors.add(auth)
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book.authors.through  # the link table
        assert e.hints == {"instance": book}

    # Django: RouteForWriteTestCase.test_m2m_clear
    def test_m2m_clear(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            book.authors.clear()
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book.authors.through
        assert e.hints == {"instance": book}

    # Django: RouteForWriteTestCase.test_m2m_delete
    def test_m2m_delete(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            book.authors.all().delete()
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Person
        assert e.hints == {"instance": book}

    # Django: RouteForWriteTestCase.test_m2m_get_or_create
    def test_m2m_get_or_create(self) -> None:
        Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        with pytest.raises(RouterUsed) as cm, self.override_router():
            book.authors.get_or_create(name="Someone else")
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book
        assert e.hints == {"instance": book}

    # Django: RouteForWriteTestCase.test_m2m_remove
    def test_m2m_remove(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            book.authors.remove(auth)
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book.authors.through
        assert e.hints == {"instance": book}

    # Django: RouteForWriteTestCase.test_m2m_update
    def test_m2m_update(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            book.authors.update(name="Different")
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Person
        assert e.hints == {"instance": book}

    # Django: RouteForWriteTestCase.test_reverse_m2m_add
    def test_reverse_m2m_add(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        with pytest.raises(RouterUsed) as cm, self.override_router():
            auth.book_set.add(book)
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book.authors.through
        assert e.hints == {"instance": auth}

    # Django: RouteForWriteTestCase.test_reverse_m2m_clear
    def test_reverse_m2m_clear(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            auth.book_set.clear()
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book.authors.through
        assert e.hints == {"instance": auth}

    # Django: RouteForWriteTestCase.test_reverse_m2m_delete
    def test_reverse_m2m_delete(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            auth.book_set.all().delete()
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book
        assert e.hints == {"instance": auth}

    # Django: RouteForWriteTestCase.test_reverse_m2m_get_or_create
    def test_reverse_m2m_get_or_create(self) -> None:
        auth = Person.objects.create(name="Someone")
        Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        with pytest.raises(RouterUsed) as cm, self.override_router():
            auth.book_set.get_or_create(title="New Book", published=datetime.datetime.now())
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Person
        assert e.hints == {"instance": auth}

    # Django: RouteForWriteTestCase.test_reverse_m2m_remove
    def test_reverse_m2m_remove(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            auth.book_set.remove(book)
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book.authors.through
        assert e.hints == {"instance": auth}

    # Django: RouteForWriteTestCase.test_reverse_m2m_update
    def test_reverse_m2m_update(self) -> None:
        auth = Person.objects.create(name="Someone")
        book = Book.objects.create(title="Pro Django", published=datetime.date(2008, 12, 16))
        book.authors.add(auth)
        with pytest.raises(RouterUsed) as cm, self.override_router():
            auth.book_set.update(title="Different")
        e = cm.value
        assert e.mode == RouterUsed.WRITE
        assert e.model == Book
        assert e.hints == {"instance": auth}


class NoRelationRouter:
    """Disallow all relations."""

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return False


@pytest.fixture
def no_relation_router(multidb: shardkit.Cluster) -> Any:
    with override_routers(multidb, [NoRelationRouter()]) as chain:
        yield chain


@pytest.mark.usefixtures("no_relation_router")
class TestRelationAssignmentTests:
    """allow_relation() is called with unsaved model instances."""

    router_prevents_msg = "the current database router prevents this relation"

    # Django: RelationAssignmentTests.test_foreign_key_relation
    def test_foreign_key_relation(self) -> None:
        person = Person(name="Someone")
        pet = Pet()
        with raises_message(ValueError, self.router_prevents_msg):
            pet.owner = person

    # Django: RelationAssignmentTests.test_reverse_one_to_one_relation
    def test_reverse_one_to_one_relation(self) -> None:
        user = User(username="Someone", password="fake_hash")
        profile = UserProfile()
        with raises_message(ValueError, self.router_prevents_msg):
            user.userprofile = profile
