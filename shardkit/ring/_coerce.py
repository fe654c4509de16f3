"""Shard key values -> the Python type of their column, as the database would convert them.

The ring hashes a key by its Python type (:mod:`shardkit.ring._keys`): the int ``5`` and
the str ``"5"`` are different keys.  A database is not so strict: PostgreSQL reads
``WHERE id = '5'`` on a BIGINT column as ``id = 5``.  So before the router hashes a
value it converts it, once, to the Python type of the shard key column, following
what PostgreSQL accepts for that column, and refuses what PostgreSQL would refuse:

==================  ================================  ======================================
column type         converted                         refused (:class:`InvalidKeyError`)
==================  ================================  ======================================
Integer family      ``"5"``, ``" +5 "`` -> 5;         ``"abc"``, ``"5.0"``, ``"0x10"``,
                    ``5.0`` / ``Decimal("5")`` -> 5   ``5.5``, NaN, inf, ``True``, bytes,
                                                      anything outside signed 64 bits
String family       ``5`` -> ``"5"``;                 ``True``, floats, Decimal, bytes
                    a ``uuid.UUID`` -> its text
Uuid (as_uuid)      ``"A0EEBC99-..."``, braces,       a str that is not a UUID, ints, bytes
                    no hyphens -> ``uuid.UUID``
Uuid (as str)       any UUID form -> canonical        the same
                    lower-case hyphenated text
LargeBinary         ``bytearray`` / ``memoryview``    str, ints, everything else
                    -> ``bytes``
==================  ================================  ======================================

Why these choices: an integral float or Decimal equals the integer in SQL, so it is
accepted; a fraction is refused (PostgreSQL would round it on INSERT but never match it in
a WHERE: two different answers, so neither is right).  ``True`` is refused everywhere
(PostgreSQL has no boolean = integer operator, and ``True == 1`` would alias the key 1).
An int for a text column is converted to its decimal text: that is what an INSERT stores
there (PostgreSQL assigns ``5`` to a VARCHAR as ``'5'``).

Columns of any other type (``Enum``, ``TypeDecorator`` subclasses, ``Numeric`` ...) are
hashed as given, as before: a ``TypeDecorator`` converts values itself, in ways the router
cannot know.  A model known only by its table name (``shard_keys={"orders": "user_id"}``
with ``shard_for("orders", key)``) has no column to look at, so its keys are hashed as given.

Each column gets one converter, built the first time the router meets its model; a value
that already has the column's exact type is hashed without calling it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import types as sqltypes

from ..errors import InvalidKeyError
from ._keys import INT_MAX, INT_MIN

__all__ = ["KeyCoercer", "coercer_for"]

_REPR_LIMIT = 120

# PostgreSQL's int8in: optional blanks, an optional sign, decimal digits, optional blanks (ASCII only:
# Python's int() would also take Unicode digits and underscores, which PostgreSQL 15 refuses).
_INT_TEXT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*", re.ASCII)
# PostgreSQL's uuid_in: 32 hex digits, a hyphen allowed after any group of four, optional braces.
_HEX4 = "[0-9a-fA-F]{4}"
_UUID_TEXT = re.compile(rf"(?:{_HEX4}(?:-?{_HEX4}){{7}}|\{{{_HEX4}(?:-?{_HEX4}){{7}}\}})", re.ASCII)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


class KeyCoercer:
    """The converter of one shard key column: ``exact`` is the type that needs no work.

    :param exact: the column's Python type (``int``, ``str``, ``uuid.UUID``, ``bytes``), or
        ``None`` when values are hashed as given.
    :param convert: the slow path, called only for a value whose type is not ``exact``;
        ``None`` when every value is hashed as given.
    """

    __slots__ = ("convert", "exact", "kind")

    def __init__(self, exact: type | None, kind: str, convert: Callable[[Any], Any] | None) -> None:
        self.exact = exact
        self.kind = kind
        self.convert = convert

    def __call__(self, value: Any) -> Any:
        convert = self.convert
        if convert is None or type(value) is self.exact:
            return value
        return convert(value)


def coercer_for(column: Any, *, model: Any, label: str, attr: str) -> KeyCoercer:
    """The converter for ``column`` (a SQLAlchemy Column, or ``None``).

    :param model: the model (or table) named by the errors.
    :param label: its display name (``"User"``).
    :param attr: the shard key's attribute name.
    """
    column_type = getattr(column, "type", None)
    column_name = getattr(column, "name", None) or attr

    def refuse(value: Any, kind: str, reason: str) -> InvalidKeyError:
        return InvalidKeyError(
            f"invalid shard key {_short(value)} (a {type(value).__qualname__}) for {label}.{attr} "
            f"(column {column_name!r}, {kind}): {reason}",
            model=model,
            attribute=attr,
            column=column_name,
            key=value,
            key_type=type(value),
            reason=reason,
        )

    if column_type is None or isinstance(column_type, sqltypes.TypeDecorator | sqltypes.Enum):
        return KeyCoercer(None, "as given", None)

    if isinstance(column_type, sqltypes.Integer):
        kind = f"{column_type.__visit_name__.upper()}: int"

        def to_int(value: Any) -> Any:
            if isinstance(value, bool):
                raise refuse(value, kind, "a bool is not an integer key")
            if isinstance(value, int):
                number = int(value)
            elif isinstance(value, str):
                if _INT_TEXT.fullmatch(value) is None:
                    raise refuse(value, kind, "the text is not a decimal integer")
                number = int(value)
            elif isinstance(value, float | Decimal):
                if isinstance(value, float) and not math.isfinite(value):
                    raise refuse(value, kind, "not a finite number")
                if isinstance(value, Decimal) and not value.is_finite():
                    raise refuse(value, kind, "not a finite number")
                if value != int(value):
                    raise refuse(value, kind, "a number with a fraction is not an integer key")
                number = int(value)
            else:
                raise refuse(value, kind, "expected an int (or its decimal text)")
            if not INT_MIN <= number <= INT_MAX:
                raise refuse(value, kind, "outside the signed 64-bit range")
            return number

        return KeyCoercer(int, kind, to_int)

    if isinstance(column_type, sqltypes.Uuid):
        as_uuid = bool(getattr(column_type, "as_uuid", True))
        kind = "UUID: uuid.UUID" if as_uuid else "UUID: str"

        def to_uuid(value: Any) -> UUID:
            if isinstance(value, UUID):
                return value
            if isinstance(value, str):
                if _UUID_TEXT.fullmatch(value) is None:
                    raise refuse(value, kind, "the text is not a UUID")
                return UUID(value)
            raise refuse(value, kind, "expected a uuid.UUID or its text")

        if as_uuid:
            return KeyCoercer(UUID, kind, to_uuid)

        def to_uuid_text(value: Any) -> str:
            return str(to_uuid(value))

        # no exact type: every str is brought to the canonical form the database returns
        return KeyCoercer(None, kind, to_uuid_text)

    if isinstance(column_type, sqltypes.String):
        kind = f"{column_type.__visit_name__.upper()}: str"

        def to_str(value: Any) -> Any:
            if isinstance(value, str):
                return value
            if isinstance(value, bool):
                raise refuse(value, kind, "a bool is not a text key")
            if isinstance(value, int):
                if not INT_MIN <= value <= INT_MAX:
                    raise refuse(value, kind, "an int outside the signed 64-bit range")
                return str(int(value))
            if isinstance(value, UUID):
                return str(value)
            raise refuse(value, kind, "expected a str (or an int, stored as its decimal text)")

        return KeyCoercer(str, kind, to_str)

    if isinstance(column_type, sqltypes.LargeBinary):
        kind = "binary: bytes"

        def to_bytes(value: Any) -> Any:
            if isinstance(value, bytes):
                return value
            if isinstance(value, bytearray | memoryview):
                return bytes(value)
            raise refuse(value, kind, "expected bytes")

        return KeyCoercer(bytes, kind, to_bytes)

    return KeyCoercer(None, "as given", None)
