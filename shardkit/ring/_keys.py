"""The canonical shard key encoding: the specification every implementation follows.

A shard key is turned into bytes by exactly one rule, then hashed with
MurmurHash3 x86 32-bit (seed 0, the unsigned result), the function that
``mmh3.hash(data, 0, signed=False)`` computes.  The C module
(``shardkit.ring._speedups``) follows this module byte for byte; when the C
code meets a key it refuses, it calls :func:`encode_key` here so that both
implementations raise the very same error.

Encoding (version 1)
--------------------
Every key is one *type tag* byte followed by a payload::

    type        tag    payload
    ----------  -----  ------------------------------------------------------
    int         0x01   8 bytes, big-endian two's complement (signed 64-bit)
    str         0x02   the UTF-8 bytes of the string (strict: no surrogates)
    bytes       0x03   the bytes themselves
    uuid.UUID   0x04   the 16 bytes of ``UUID.int``, big-endian (= ``UUID.bytes``)

So the int ``1``, the str ``"1"`` and the bytes ``b"1"`` are three different
keys and may live on different shards: a key is routed by what the column
holds, not by how it prints.  Route an integer column with ints and a UUID
column with ``uuid.UUID`` objects (SQLAlchemy's ``Uuid`` type returns them).

Accepted: instances of ``int`` (and subclasses such as ``IntEnum``) in
``[-2**63, 2**63 - 1]``, ``str``, ``bytes`` and ``uuid.UUID`` (and their
subclasses; the base value is encoded).  Refused with
:class:`~shardkit.errors.InvalidKeyError` (a ``TypeError``): ``None``,
``bool`` (``True == 1`` would silently alias the int ``1``), ``float``
(including NaN), ints outside the signed 64-bit range, strings with lone
surrogates, ``bytearray``/``memoryview`` (mutable) and every other type.

Examples::

    >>> encode_key(1).hex()
    '010000000000000001'
    >>> encode_key(-1).hex()
    '01ffffffffffffffff'
    >>> encode_key("é").hex()
    '02c3a9'
    >>> hash_key("user:1") == mmh3.hash(b"\\x02user:1", 0, signed=False)
    True
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from mmh3 import hash as _murmur3_32

from ..errors import InvalidKeyError

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "TAG_BYTES",
    "TAG_INT",
    "TAG_STR",
    "TAG_UUID",
    "encode_key",
    "hash_key",
    "invalid_key",
]

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

TAG_INT = b"\x01"
TAG_STR = b"\x02"
TAG_BYTES = b"\x03"
TAG_UUID = b"\x04"

_REPR_LIMIT = 200


def invalid_key(key: object, reason: str) -> InvalidKeyError:
    """Build the error for a refused key: the message names its repr and its type.

    :param key: the refused key (kept as the ``key`` attribute).
    :param reason: why it is refused.
    """
    text = repr(key)
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    type_name = type(key).__qualname__
    return InvalidKeyError(
        f"invalid shard key {text} of type {type_name}: {reason}",
        key=key,
        key_type=type(key),
        reason=reason,
    )


def encode_key(key: Any) -> bytes:
    """Return the canonical bytes of a shard key (see the module docstring).

    :param key: an int (signed 64-bit), str, bytes or uuid.UUID.
    :raises InvalidKeyError: for any other type or value.

    >>> encode_key(b"ab")
    b'\\x03ab'
    """
    if isinstance(key, bool):
        raise invalid_key(key, "bool is not a shard key (True == 1 would alias the int 1)")
    if isinstance(key, int):
        if not INT_MIN <= key <= INT_MAX:
            raise invalid_key(key, "int keys must fit in signed 64 bits")
        return TAG_INT + int.to_bytes(key, 8, "big", signed=True)
    if isinstance(key, str):
        try:
            data = str.encode(key, "utf-8")
        except UnicodeEncodeError:
            raise invalid_key(key, "str keys must be encodable as UTF-8 (no lone surrogates)") from None
        return TAG_STR + data
    if isinstance(key, bytes):
        return TAG_BYTES + key
    if isinstance(key, UUID):
        return TAG_UUID + key.int.to_bytes(16, "big")
    if key is None:
        raise invalid_key(key, "None is not a shard key")
    if isinstance(key, float):
        raise invalid_key(key, "float is not a shard key (use int or str)")
    raise invalid_key(key, "shard keys must be int, str, bytes or uuid.UUID")


def hash_key(key: Any) -> int:
    """Return the 32-bit unsigned MurmurHash3 (x86, seed 0) of :func:`encode_key`.

    :param key: a valid shard key.
    :raises InvalidKeyError: for a refused key.
    """
    return _murmur3_32(encode_key(key), 0, False)
