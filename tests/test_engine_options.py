"""ENGINE_OPTIONS that create_engine() refuses are a ConfigError naming the alias (issue 10 review).

They are checked when the alias's engine is created (``cluster.engine(alias)``, the first
statement on it, ``shardkit check``); the message never holds the password.
"""

from __future__ import annotations

from typing import Any

import pytest

import shardkit
from shardkit.errors import ConfigError

SECRET = "s3cretPW"


def pg_entry(**engine_options: Any) -> dict[str, Any]:
    return {
        "ENGINE": "postgresql",
        "NAME": "db",
        "USER": "u",
        "PASSWORD": SECRET,
        "HOST": "127.0.0.1",
        "ENGINE_OPTIONS": engine_options,
    }


def chain(exc: BaseException | None) -> str:
    """Every message of ``exc`` and its causes and contexts."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc!s} {exc!r}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pool_size": "abc"}, "pool_size"),
        ({"max_overflow": [1]}, "max_overflow"),
        ({"pool_timeout": "x"}, "pool_timeout"),
        ({"pool_recycle": True}, "pool_recycle"),
        ({"bogus": 1}, "bogus"),
        ({"echo": "loud"}, "echo"),
        ({"poolclass": "QueuePool"}, "poolclass"),
    ],
)
def test_bad_engine_options_are_a_config_error_naming_the_alias(options: dict[str, Any], named: str) -> None:
    cluster = shardkit.Cluster({"default": "sqlite://", "s1": pg_entry(**options)})
    try:
        with pytest.raises(ConfigError, match=r"DATABASES\['s1'\]") as info:
            cluster.engine("s1")
        assert named in str(info.value)
        assert info.value.alias == "s1"  # type: ignore[attr-defined]
        assert isinstance(info.value, ValueError)
        assert SECRET not in chain(info.value)
        assert cluster.engine("default") is not None  # the other aliases are untouched
    finally:
        cluster.dispose()


def test_good_engine_options_are_used() -> None:
    cluster = shardkit.Cluster(
        {
            "default": "sqlite://",
            "s1": pg_entry(pool_size=2, max_overflow=0, pool_timeout=1.5, pool_recycle=-1, pool_pre_ping=True),
        }
    )
    try:
        pool = cluster.engine("s1").pool
        assert (pool.size(), pool.timeout()) == (2, 1.5)  # type: ignore[attr-defined]
    finally:
        cluster.dispose()
