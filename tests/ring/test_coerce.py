"""Shard key values are converted to their column's Python type before hashing (issue 10)."""

from __future__ import annotations

import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import BigInteger, Integer, LargeBinary, SmallInteger, String, Text, TypeDecorator, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardkit.errors import InvalidKeyError
from shardkit.ring import HashRing, HashRingRouter
from shardkit.typing import ShardTargets

U = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")


class Lower(TypeDecorator[str]):
    impl = String(20)
    cache_ok = True


class Color(enum.IntEnum):
    RED = 3


class Base(DeclarativeBase):
    pass


class Big(Base):
    __tablename__ = "big"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class Small(Base):
    __tablename__ = "small"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)


class Named(Base):
    __tablename__ = "named"
    __shard_key__ = "code"
    code: Mapped[str] = mapped_column(Text, primary_key=True)


class Ident(Base):
    __tablename__ = "ident"
    __shard_key__ = "id"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)


class IdentText(Base):
    __tablename__ = "ident_text"
    __shard_key__ = "id"
    id: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)


class Blob(Base):
    __tablename__ = "blob"
    __shard_key__ = "data"
    data: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)


class Decorated(Base):
    __tablename__ = "decorated"
    __shard_key__ = "code"
    code: Mapped[str] = mapped_column(Lower, primary_key=True)


class Child(Base):
    __tablename__ = "child"
    __shard_key__ = "owner"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[int] = mapped_column("owner_id", Integer)


@pytest.fixture
def router() -> HashRingRouter:
    return HashRingRouter(HashRing(["s0", "s1", "s2", "s3"], vnodes=32))


@pytest.mark.parametrize(
    ("model", "given", "expected"),
    [
        (Big, 5, 5),
        (Big, "5", 5),
        (Big, " +740001\n", 740001),
        (Big, "-9223372036854775808", -(2**63)),
        (Big, 5.0, 5),
        (Big, Decimal("12"), 12),
        (Big, Color.RED, 3),
        (Small, "7", 7),
        (Named, "x", "x"),
        (Named, 42, "42"),
        (Named, -1, "-1"),
        (Named, U, str(U)),
        (Ident, U, U),
        (Ident, str(U).upper(), U),
        (Ident, U.hex, U),
        (Ident, "{" + str(U) + "}", U),
        (Ident, "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", U),
        (IdentText, str(U).upper(), str(U)),
        (IdentText, U, str(U)),
        (Blob, b"ab", b"ab"),
        (Blob, bytearray(b"ab"), b"ab"),
        (Blob, memoryview(b"ab"), b"ab"),
        (Decorated, "Ab", "Ab"),  # a TypeDecorator converts values itself: hashed as given
        (Decorated, 5, 5),
        (Child, "9", 9),
    ],
)
def test_accepted_values_are_converted(router: HashRingRouter, model: Any, given: Any, expected: Any) -> None:
    key = router.ring_key(model, given)
    assert key == expected and type(key) is type(expected)
    assert router.shard_for(model, given) == router.ring.get(expected)
    assert router.db_for_read(model, shard_key=given) == router.ring.get(expected)


@pytest.mark.parametrize(
    ("model", "bad"),
    [
        (Big, "abc"),
        (Big, "5.0"),
        (Big, "0x10"),
        (Big, "1_000"),
        (Big, "٣"),  # an Arabic-Indic digit: int() takes it, PostgreSQL does not
        (Big, ""),
        (Big, 5.5),
        (Big, float("inf")),
        (Big, float("nan")),
        (Big, Decimal("NaN")),
        (Big, Decimal("1.5")),
        (Big, True),
        (Big, b"5"),
        (Big, U),
        (Big, None),
        (Big, 2**63),
        (Big, str(2**63)),
        (Big, [5]),
        (Named, True),
        (Named, 1.5),
        (Named, b"x"),
        (Named, Decimal(1)),
        (Named, 2**70),
        (Ident, "not-a-uuid"),
        (Ident, "urn:uuid:" + str(U)),
        (Ident, " " + str(U)),
        (Ident, U.int),
        (Ident, U.bytes),
        (IdentText, "nope"),
        (Blob, "ab"),
        (Blob, 5),
    ],
)
def test_refused_values_name_model_column_and_value(router: HashRingRouter, model: Any, bad: Any) -> None:
    with pytest.raises(InvalidKeyError) as info:
        router.shard_for(model, bad)
    err = info.value
    assert err.model is model and err.key is bad  # type: ignore[attr-defined]
    assert err.column == model.__table__.c[err.attribute].name  # type: ignore[attr-defined]
    assert f"{model.__name__}." in str(err) and repr(bad)[:30] in str(err)
    if bad is not None:  # (shard_key=None means "no key given")
        with pytest.raises(InvalidKeyError):
            router.db_for_read(model, shard_key=bad)
    if bad is not None and not isinstance(bad, list | bool):  # (`col == True` binds nothing)
        column = getattr(model, router.shard_key_column(model)[0])  # type: ignore[index]
        with pytest.raises(InvalidKeyError, match=model.__name__):
            router.db_for_read(model, statement=select(model).where(column == bad))
        with pytest.raises(InvalidKeyError, match=model.__name__):
            router.db_for_read(model, statement=select(model).where(column.in_([bad])))


def test_out_of_range_int_is_named_too(router: HashRingRouter) -> None:
    # an int of the right type but outside the ring's range: the ring refuses, the router names the model
    with pytest.raises(InvalidKeyError, match=r"Big\.id") as info:
        router.db_for_write(Big, instance=Big(id=2**64))
    assert info.value.model is Big  # type: ignore[attr-defined]
    with pytest.raises(InvalidKeyError, match=r"Big\.id"):
        router.db_for_write_instances(Big, [Big(id=1), Big(id=-(2**70))])


def test_in_list_per_shard_statements_hold_converted_values(router: HashRingRouter) -> None:
    keys = list(range(1, 40))
    target = router.db_for_read(Big, statement=select(Big).where(Big.id.in_([str(k) for k in keys])))
    assert isinstance(target, ShardTargets)
    for alias, stmt in target.statements.items():
        values = stmt.compile().params["id_1"]  # type: ignore[union-attr]
        assert values and all(type(v) is int and router.ring.get(v) == alias for v in values)


def test_batches_convert_and_write_back(router: HashRingRouter) -> None:
    objs = [Big(id=str(k)) for k in range(1, 30)]
    aliases = router.db_for_write_instances(Big, objs)
    assert [o.id for o in objs] == list(range(1, 30))
    assert aliases == [router.ring.get(k) for k in range(1, 30)]
    rows: list[dict[str, Any]] = [{"id": "3"}, {"id": 4}, {"id": 5.0}]
    originals = list(rows)
    assert router.db_for_write_rows(Big, rows) == [router.ring.get(k) for k in (3, 4, 5)]
    assert [r["id"] for r in rows] == [3, 4, 5] and rows[1] is originals[1]  # converted rows are copies
    assert originals[0] == {"id": "3"}
    one = Big(id="8")
    assert router.db_for_write(Big, instance=one) == router.ring.get(8) and one.id == 8
    assert router.allow_relation(Big(id="8"), Child(owner=8)) == (router.ring.get(8) == router.ring.get(8))


def test_exact_types_are_not_converted(router: HashRingRouter) -> None:
    keys = [1, 2, 3]
    assert router._spec(Big).keys(keys) is keys  # type: ignore[union-attr]
    obj = Big(id=7)
    router.db_for_write(Big, instance=obj)
    assert obj.id == 7
