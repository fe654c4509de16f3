"""HashRingRouter: shard keys, write routing, WHERE-clause read routing, IN splitting."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, Table, and_, bindparam, create_engine, delete, not_, or_, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from shardkit.errors import ConfigError, InvalidKeyError, RoutingError
from shardkit.ring import HashRing, HashRingRouter
from shardkit.typing import ShardTargets


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), default="")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column("uid", ForeignKey("users.id"))


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(50))


RING = HashRing(["s0", "s1", "s2"], vnodes=64)


@pytest.fixture
def router() -> HashRingRouter:
    counter = iter(range(1000, 10**6))
    return HashRingRouter(RING.copy(), shard_keys={"orders": "user_id", Account: "email"}, ids=lambda: next(counter))


def ids_on(alias: str, n: int = 3, start: int = 1) -> list[int]:
    out, i = [], start
    while len(out) < n:
        if RING.get(i) == alias:
            out.append(i)
        i += 1
    return out


def test_is_sharded_and_shard_for(router: HashRingRouter) -> None:
    assert router.is_sharded(User) and router.is_sharded(Order) and router.is_sharded(Account)
    assert router.is_sharded("orders") and router.is_sharded(Order.__table__)
    assert not router.is_sharded(Country) and not router.is_sharded("countries") and not router.is_sharded(3)
    assert router.shard_for(User, 5) == RING.get(5)
    assert router.shard_for("orders", 5) == RING.get(5)
    with pytest.raises(RoutingError):
        router.shard_for(Country, 5)


def test_unsharded_models_pass(router: HashRingRouter) -> None:
    assert router.db_for_write(Country, instance=Country(code="fr")) is None
    assert router.db_for_read(Country, statement=select(Country)) is None
    assert router.allow_relation(Country(code="fr"), User(id=1)) is None
    assert router.allow_migrate("s0", Country) is None
    assert router.allow_migrate("s0", None) is None


class Bad(Base):
    __tablename__ = "bad"
    __shard_key__ = "nope"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_bad_shard_key_config() -> None:
    with pytest.raises(ConfigError):
        HashRingRouter(RING).is_sharded(Bad)
    with pytest.raises(ConfigError):
        HashRingRouter(RING, shard_keys={User: ""})


def test_write_routes_by_instance_key(router: HashRingRouter) -> None:
    assert router.db_for_write(User, instance=User(id=7)) == RING.get(7)
    assert router.db_for_write(Order, instance=Order(user_id=9)) == RING.get(9)
    assert router.db_for_write(Account, instance=Account(email="a@b")) == RING.get("a@b")
    assert router.db_for_write(User, shard_key=11) == RING.get(11)


def test_write_assigns_an_id_to_an_integer_pk_key(router: HashRingRouter) -> None:
    user = User(name="new")
    alias = router.db_for_write(User, instance=user)
    assert user.id == 1000 and alias == RING.get(1000)


def test_default_id_source_is_the_cluster_generator() -> None:
    user = User()
    alias = HashRingRouter(RING).db_for_write(User, instance=user)
    assert isinstance(user.id, int) and user.id > 2**40 and alias == RING.get(user.id)


def test_write_with_missing_non_pk_key_names_model_and_attribute(router: HashRingRouter) -> None:
    with pytest.raises(RoutingError, match="user_id") as info:
        router.db_for_write(Order, instance=Order())
    assert info.value.model is Order and info.value.attribute == "user_id"  # type: ignore[attr-defined]
    with pytest.raises(InvalidKeyError):
        router.db_for_write(Account, instance=Account(email=1.5))  # type: ignore[arg-type]


def test_write_by_statement(router: HashRingRouter) -> None:
    assert router.db_for_write(User, statement=update(User).where(User.id == 4).values(name="x")) == RING.get(4)
    # no key in WHERE: the update must reach every shard (never a silent "default")
    every = router.db_for_write(User, statement=update(User).values(name="x"))
    assert isinstance(every, ShardTargets) and every.all_shards and set(every.aliases) == set(RING)


@pytest.mark.parametrize(
    "where",
    [
        lambda k: User.id == k,
        lambda k: User.__table__.c.id == k,
        lambda k: bindparam("p", k) == User.id,
        lambda k: and_(User.name != "x", and_(User.id == k)),
        lambda k: User.id.in_([k]),
    ],
)
def test_read_one_key(router: HashRingRouter, where: Any) -> None:
    for key in (1, 2, 3, 99):
        assert router.db_for_read(User, statement=select(User).where(where(key))) == RING.get(key)


def test_read_other_statement_kinds(router: HashRingRouter) -> None:
    assert router.db_for_read(User, statement=update(User).where(User.id == 5)) == RING.get(5)
    assert router.db_for_read(User, statement=delete(User).where(User.id == 5)) == RING.get(5)
    assert router.db_for_read(Order, statement=select(Order).where(Order.user_id == 5)) == RING.get(5)
    assert router.db_for_read(User, statement=select(User).filter_by(id=6)) == RING.get(6)
    u = aliased(User)
    assert router.db_for_read(User, statement=select(u).where(u.id == 8)) == RING.get(8)
    assert router.db_for_read(User, statement=select(User), shard_key=8) == RING.get(8)


@pytest.mark.parametrize(
    "stmt",
    [
        select(User),
        select(User).where(User.name == "x"),
        select(User).where(or_(User.id == 1, User.name == "x")),
        select(User).where(not_(User.id == 1)),
        select(User).where(User.id > 5),
        select(User).where(User.id == bindparam("later")),
        select(User).where(User.id.in_(select(Order.user_id))),
        None,
    ],
)
def test_read_without_key_goes_everywhere(router: HashRingRouter, stmt: Any) -> None:
    target = router.db_for_read(User, statement=stmt)
    assert isinstance(target, ShardTargets)
    assert target.all_shards and target.statements == {"s0": None, "s1": None, "s2": None}
    assert target.reason == "no shard key in WHERE"
    assert target.shard_key_columns == (User.__table__.c.id,)


def test_lazy_load_from_an_instance_passes(router: HashRingRouter) -> None:
    assert router.db_for_read(Order, statement=select(Order), instance=User(id=1)) is None


def test_in_list_on_one_shard(router: HashRingRouter) -> None:
    keys = ids_on("s1", 4)
    assert router.db_for_read(User, statement=select(User).where(User.id.in_(keys))) == "s1"


def test_in_list_split_per_shard(router: HashRingRouter) -> None:
    by_alias = {a: ids_on(a, 3) for a in ("s0", "s2")}
    keys = sorted(by_alias["s0"] + by_alias["s2"])
    stmt = select(User).where(User.id.in_(keys), User.name != "zz")
    target = router.db_for_read(User, statement=stmt)
    assert isinstance(target, ShardTargets) and not target.all_shards
    assert set(target.aliases) == {"s0", "s2"}
    for alias, sub in target.statements.items():
        compiled = sub.compile(compile_kwargs={"literal_binds": True})  # type: ignore[union-attr]
        shown = {int(x) for x in str(compiled).split("IN (")[1].split(")")[0].split(",")}
        assert shown == set(by_alias[alias])
    # the original statement is untouched
    assert str(stmt.compile(compile_kwargs={"literal_binds": True})).count(",") >= len(keys) - 1


def test_split_statements_run_against_a_real_database(router: HashRingRouter) -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine, tables=[Table("users", Base.metadata)])
    everyone = list(range(1, 31))
    with Session(engine) as session:
        session.add_all(User(id=i, name=f"u{i}") for i in everyone)
        session.commit()
        wanted = [2, 3, 5, 7, 11, 13, 17, 19, 23]
        target = router.db_for_read(User, statement=select(User).where(User.id.in_(wanted)))
        assert isinstance(target, ShardTargets)
        seen: list[int] = []
        for alias, sub in target.statements.items():
            got = [u.id for u in session.scalars(sub)]  # type: ignore[arg-type]
            assert all(RING.get(i) == alias for i in got)
            seen += got
        assert sorted(seen) == wanted


def test_contradictory_and_empty_keys(router: HashRingRouter) -> None:
    a, b = ids_on("s0", 1)[0], ids_on("s1", 1)[0]
    target = router.db_for_read(User, statement=select(User).where(User.id == a, User.id == b))
    assert isinstance(target, ShardTargets) and set(target.aliases) == {"s0", "s1"}
    same = ids_on("s2", 2)
    assert router.db_for_read(User, statement=select(User).where(User.id == same[0], User.id == same[1])) == "s2"
    assert router.db_for_read(User, statement=select(User).where(User.id.in_([]))) == "s0"
    narrowed = select(User).where(User.id.in_([a, b]), User.id == a)
    assert router.db_for_read(User, statement=narrowed) == "s0"


def test_allow_relation(router: HashRingRouter) -> None:
    a1, a2 = ids_on("s0", 2)
    b = ids_on("s1", 1)[0]
    assert router.allow_relation(User(id=a1), Order(user_id=a2)) is True
    assert router.allow_relation(User(id=a1), Order(user_id=b)) is False
    assert router.allow_relation(User(id=a1), Order()) is None


def test_allow_migrate(router: HashRingRouter) -> None:
    assert router.allow_migrate("s0", User) is True
    assert router.allow_migrate("default", User) is False
    assert router.allow_migrate("s1", Order.__table__) is True
    assert router.allow_migrate("default", "orders") is False
