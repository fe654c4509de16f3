"""Relations on a ring: children live with their parents, loads follow the instance,
reference tables are everywhere, nothing crosses shards (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import BigInteger, Column, ForeignKey, String, Table, func, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship, selectinload

import shardkit
from shardkit.errors import RelationError, RoutingError
from tests.conftest import StatementLog

SHARDS = ["s0", "s1", "s2", "s3"]


class Base(DeclarativeBase):
    pass


class Country(Base):
    __tablename__ = "countries"
    __reference_table__ = True
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Customer(Base):
    __tablename__ = "customers"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    country_code: Mapped[str | None] = mapped_column(ForeignKey("countries.code"))
    country: Mapped[Country | None] = relationship()
    orders: Mapped[list[Purchase]] = relationship(back_populates="customer", order_by="Purchase.id")
    # many-to-many between two sharded models; the link rows live with their owner, the customer
    favorites: Mapped[list[Purchase]] = relationship(secondary="favorites", order_by="Purchase.id")


class Purchase(Base):
    __tablename__ = "purchases"
    __shard_key__ = "customer_id"  # co-located: a purchase lives with its customer
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("customers.id"))
    amount: Mapped[int] = mapped_column(default=0)
    customer: Mapped[Customer] = relationship(back_populates="orders")


favorites = Table(
    "favorites",
    Base.metadata,
    Column("customer_id", BigInteger, ForeignKey("customers.id"), primary_key=True),
    Column("purchase_id", BigInteger, ForeignKey("purchases.id"), primary_key=True),
)


class LinkTables:
    """The link table lives on the shards only, as its owners do (it has no model to shard)."""

    def allow_migrate(self, db: str, model: object, table_name: str | None = None, **hints: object) -> bool | None:
        return db in SHARDS if table_name == "favorites" else None


@pytest.fixture
def ring() -> shardkit.HashRing:
    return shardkit.HashRing(SHARDS)


@pytest.fixture
def cluster(make_urls: Callable[..., dict[str, str]], ring: shardkit.HashRing) -> Iterator[shardkit.Cluster]:
    routers = [LinkTables(), shardkit.HashRingRouter(ring)]
    cluster = shardkit.Cluster(make_urls("default", *SHARDS), routers=routers)
    cluster.create_all(Base)
    with cluster.session() as s:
        s.execute(insert(Country), [{"code": "de", "name": "Germany"}, {"code": "jp", "name": "Japan"}])
        s.commit()
    yield cluster
    cluster.dispose()


def on_shard(cluster: shardkit.Cluster, alias: str, sql: str) -> list[tuple[object, ...]]:
    with cluster.engine(alias).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def test_reference_table_is_on_every_shard(cluster: shardkit.Cluster) -> None:
    for alias in SHARDS:
        assert on_shard(cluster, alias, "SELECT code FROM countries ORDER BY code") == [("de",), ("jp",)]
    assert on_shard(cluster, "default", "SELECT 1") == [(1,)]
    with cluster.session() as s:
        assert [c.code for c in s.scalars(select(Country).order_by(Country.code))] == ["de", "jp"]
        s.execute(update(Country).where(Country.code == "jp").values(name="Nippon"))
        s.commit()
        s.add(Country(code="fr", name="France"))
        with pytest.raises(RoutingError, match="reference table"):
            s.flush()
        s.rollback()
    for alias in SHARDS:
        assert on_shard(cluster, alias, "SELECT name FROM countries WHERE code = 'jp'") == [("Nippon",)]


def test_children_follow_their_parents(cluster: shardkit.Cluster, ring: shardkit.HashRing) -> None:
    customers = [Customer(name=f"c{i}", country_code="de" if i % 2 else "jp") for i in range(1000)]
    purchases = [Purchase(id=i + 1, customer=customers[i % 1000], amount=i) for i in range(10_000)]
    with cluster.session(expire_on_commit=False) as s:
        s.add_all(customers)
        s.add_all(purchases)
        s.commit()
    owner = {c.id: ring.get(c.id) for c in customers}
    total = 0
    for alias in SHARDS:
        rows = on_shard(
            cluster, alias, "SELECT p.customer_id FROM purchases p JOIN customers c ON c.id = p.customer_id"
        )
        count = on_shard(cluster, alias, "SELECT count(*) FROM purchases")[0][0]
        assert len(rows) == count  # every purchase found its customer on its own shard
        assert all(owner[customer_id] == alias for (customer_id,) in rows)  # type: ignore[index]
        total += int(count)  # type: ignore[call-overload]
    assert total == 10_000


def test_loads_follow_the_instance(cluster: shardkit.Cluster, ring: shardkit.HashRing) -> None:
    with cluster.session(expire_on_commit=False) as s:
        people = [Customer(name=f"p{i}", orders=[Purchase(id=100 + 10 * i + j) for j in range(3)]) for i in range(8)]
        s.add_all(people)
        s.commit()
        ids = [p.id for p in people]
    log = StatementLog(cluster)
    with cluster.session() as s:
        one = s.scalars(select(Customer).where(Customer.id == ids[0])).one()
        log.seen.clear()
        assert len(one.orders) == 3  # lazy load
        assert log.touching("purchases") == [ring.get(ids[0])]
        assert {shardkit.db_of(o) for o in one.orders} == {ring.get(ids[0])}
        assert one.orders[0].customer is one  # many-to-one from the identity map, no query
    for option in (selectinload, joinedload):
        with cluster.session() as s:
            log.seen.clear()
            stmt = select(Customer).where(Customer.id == ids[1]).options(option(Customer.orders))
            loaded = s.scalars(stmt).unique().one()
            assert len(loaded.orders) == 3
            assert set(log.touching("purchases")) | set(log.touching("customers")) == {ring.get(ids[1])}
    with cluster.session() as s:  # a fan-out with selectin: each shard's children from that shard
        log.seen.clear()
        everyone = s.scalars(select(Customer).options(selectinload(Customer.orders))).all()
        assert sorted(len(c.orders) for c in everyone) == [3] * 8
        for c in everyone:
            assert {shardkit.db_of(o) for o in c.orders} == {shardkit.db_of(c)}


def test_cross_shard_assignment_is_refused_and_nothing_written(
    cluster: shardkit.Cluster, ring: shardkit.HashRing
) -> None:
    with cluster.session() as s:
        a = Customer(name="a")
        s.add(a)
        s.commit()
        home = shardkit.db_of(a)
        away = next(alias for alias in SHARDS if alias != home)
        stray = Purchase(id=1, customer_id=a.id)
        s.save(stray, using=away)  # placed by hand on the wrong shard
        with pytest.raises(RelationError, match=rf"'{away}'.*'{home}'|'{home}'.*'{away}'"):
            stray.customer = a
        with pytest.raises(RelationError, match=r"Purchase\.customer"):
            s.flush()  # the foreign key column alone names a customer on another shard
        s.rollback()
    for alias in SHARDS:
        assert on_shard(cluster, alias, "SELECT count(*) FROM purchases") == [(0,)]


def test_statement_writes_reach_every_shard(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        s.add_all([Customer(name=f"x{i}") for i in range(40)])
        s.commit()
        result = s.execute(update(Customer).values(name="renamed"))
        assert result.rowcount == 40
        s.commit()
        assert s.scalar(select(func.count()).select_from(Customer).where(Customer.name == "renamed")) == 40


def test_relation_to_a_reference_row_is_allowed(cluster: shardkit.Cluster) -> None:
    with cluster.session() as s:
        de = s.scalars(select(Country).where(Country.code == "de")).one()
        c = Customer(name="with country")
        c.country = de  # a reference row: allowed whatever shard the customer lands on
        s.add(c)
        s.commit()
        assert on_shard(cluster, shardkit.db_of(c) or "", f"SELECT country_code FROM customers WHERE id = {c.id}") == [
            ("de",)
        ]


def test_many_to_many_link_rows_live_with_their_owner(cluster: shardkit.Cluster, ring: shardkit.HashRing) -> None:
    with cluster.session(expire_on_commit=False) as s:
        people = [Customer(name=f"f{i}", orders=[Purchase(id=500 + 10 * i + j) for j in range(2)]) for i in range(12)]
        s.add_all(people)
        s.commit()
        ids = {p.id: ring.get(p.id) for p in people}
    assert len(set(ids.values())) > 1  # the owners are spread over several shards
    with cluster.session() as s:  # a session that is not pinned: each owner's rows go to its shard
        for customer in s.scalars(select(Customer)).all():
            customer.favorites.extend(customer.orders)
            customer.favorites.append(Purchase(id=900 + customer.id % 1000, customer=customer))  # a new one
        s.commit()
    total = 0
    for alias in SHARDS:
        rows = on_shard(cluster, alias, "SELECT customer_id, purchase_id FROM favorites")
        assert all(ids[customer_id] == alias for customer_id, _p in rows)  # type: ignore[index]
        joined = on_shard(cluster, alias, "SELECT count(*) FROM favorites f JOIN purchases p ON p.id = f.purchase_id")
        assert joined == [(len(rows),)]  # every linked purchase is on the same shard
        total += len(rows)
    assert total == 12 * 3
    with cluster.session() as s:
        some = next(iter(ids))
        customer = s.scalars(select(Customer).where(Customer.id == some)).one()
        assert len(customer.favorites) == 3  # read back from the owner's shard
        assert {shardkit.db_of(p) for p in customer.favorites} == {ids[some]}
        s.delete(customer.favorites[0])  # the purchase stays linked: remove the link first
        customer.favorites.pop(0)
        s.commit()
    assert on_shard(cluster, ids[some], f"SELECT count(*) FROM favorites WHERE customer_id = {some}") == [(2,)]


# -- Django's manager API on a ring (issue 11) ---------------------------------------------


class _DjangoBase(shardkit.ModelMixin, DeclarativeBase):
    pass


class Member(_DjangoBase):
    __tablename__ = "members"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    notes: Mapped[list[Note]] = relationship(back_populates="member", order_by="Note.id")
    pinned: Mapped[list[Note]] = relationship(secondary="member_pins", order_by="Note.id", viewonly=False)


class Note(_DjangoBase):
    __tablename__ = "notes"
    __shard_key__ = "member_id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    member_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("members.id"))
    text: Mapped[str] = mapped_column(String(40), default="")
    member: Mapped[Member] = relationship(back_populates="notes")


member_pins = Table(
    "member_pins",
    _DjangoBase.metadata,
    Column("member_id", BigInteger, ForeignKey("members.id"), primary_key=True),
    Column("note_id", BigInteger, ForeignKey("notes.id"), primary_key=True),
)


class PinsOnShards:
    def allow_migrate(self, db: str, model: object, table_name: str | None = None, **hints: object) -> bool | None:
        return db in SHARDS if table_name == "member_pins" else None


@pytest.fixture
def django_ring(make_urls: Callable[..., dict[str, str]], ring: shardkit.HashRing) -> Iterator[shardkit.Cluster]:
    cluster = shardkit.Cluster(make_urls("default", *SHARDS), routers=[PinsOnShards(), shardkit.HashRingRouter(ring)])
    cluster.create_all(_DjangoBase)
    with cluster.activate():
        yield cluster
    cluster.dispose()


def test_related_managers_keep_children_and_link_rows_with_their_owner(
    django_ring: shardkit.Cluster, ring: shardkit.HashRing
) -> None:
    members = [Member.objects.create(name=f"m{i}") for i in range(8)]
    assert {shardkit.db_of(m) for m in members} == {ring.get(m.id) for m in members}
    assert len({shardkit.db_of(m) for m in members}) > 1
    for i, member in enumerate(members):
        home = shardkit.db_of(member)
        note = member.notes.create(id=1000 + i, text="hello")  # written with its member
        assert shardkit.db_of(note) == home
        again, created = member.notes.get_or_create(id=1000 + i)
        assert not created and shardkit.db_of(again) == home
        member.pinned.add(note)  # the link row lives with its owner
        assert member.notes.count() == 1
        assert member.pinned.count() == 1
        assert member.notes.db == home
        assert list(member.pinned.values_list("text", flat=True)) == ["hello"]
    for alias in SHARDS:
        rows = on_shard(django_ring, alias, "SELECT member_id FROM member_pins")
        assert all(ring.get(member_id) == alias for (member_id,) in rows)  # type: ignore[arg-type]
    assert Member.objects.get(id=members[0].id).name == "m0"  # a read pinned by its key
    assert Note.objects.count() == 8  # a fan-out, summed
    first = members[0]
    first.pinned.clear()
    assert first.pinned.count() == 0
    assert first.notes.update(text="changed") == 1
    assert Note.objects.get(member_id=first.id).text == "changed"


def test_a_link_table_sharded_by_its_owners_key(
    make_urls: Callable[..., dict[str, str]], ring: shardkit.HashRing
) -> None:
    # the link table declares its own shard key, the owner's column: its rows hash with the owner
    router = shardkit.HashRingRouter(ring, shard_keys={"favorites": "customer_id"})
    cluster = shardkit.Cluster(make_urls("default", *SHARDS), routers=[LinkTables(), router])
    cluster.create_all(Base)
    with cluster.session(expire_on_commit=False) as s:
        people = [Customer(name=f"k{i}", orders=[Purchase(id=700 + i)]) for i in range(8)]
        s.add_all(people)
        s.commit()
        for person in people:
            person.favorites.extend(person.orders)
        s.commit()
    for alias in SHARDS:
        rows = on_shard(cluster, alias, "SELECT customer_id FROM favorites")
        assert all(ring.get(customer_id) == alias for (customer_id,) in rows)  # type: ignore[arg-type]
    assert sum(len(on_shard(cluster, a, "SELECT 1 FROM favorites")) for a in SHARDS) == 8
    cluster.dispose()
