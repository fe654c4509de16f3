"""Deletes land on the database the caller named, never where db_for_write would send a new row.

Django's ``QuerySet.delete()`` collects and deletes on the queryset's database, and
``Model.delete(using=...)`` on ``using``.  With a router whose ``db_for_write`` always answers
"default" (the suite's ``TestRouter``), both once read the row on "other" and sent the DELETE to
"default": SQLAlchemy warned that 0 rows matched, the call reported success, the row stayed.
"""

from __future__ import annotations

import datetime

import shardkit

from .conftest import override_routers
from .models import Book, Person
from .routers import TestRouter


def test_queryset_delete_on_named_database_with_related_rows(multidb: shardkit.Cluster) -> None:
    Person.objects.using("other").create(name="Mark")
    Person.objects.using("default").create(name="Mark")
    with override_routers(multidb, [TestRouter()]):
        deleted = Person.objects.using("other").filter(name="Mark").delete()
    assert deleted == 1
    assert Person.objects.using("other").filter(name="Mark").count() == 0
    assert Person.objects.using("default").filter(name="Mark").count() == 1


def test_instance_delete_using_where_it_lives(multidb: shardkit.Cluster) -> None:
    mark = Person.objects.using("other").create(name="Mark")
    Person.objects.using("default").create(name="Mark")
    with override_routers(multidb, [TestRouter()]):
        mark.delete(using="other")
    assert Person.objects.using("other").count() == 0
    assert Person.objects.using("default").count() == 1


def test_book_queryset_delete_takes_its_link_rows_on_that_database(multidb: shardkit.Cluster) -> None:
    book = Book.objects.using("other").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
    book.authors.add(Person.objects.using("other").create(name="Mark"))
    Book.objects.using("default").create(title="Dive into Python", published=datetime.date(2009, 5, 4))
    with override_routers(multidb, [TestRouter()]):
        assert Book.objects.using("other").filter(title="Dive into Python").delete() == 1
    assert Book.objects.using("other").count() == 0
    assert Book.objects.using("default").count() == 1
