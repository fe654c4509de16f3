"""Run the whole ring suite against both lookups (markupsafe-style autouse fixture).

``ring_impl`` is parametrized over ``python`` and ``c``; it points
``shardkit.ring._ring._impl`` (what new ``HashRing`` objects bind to) at the
implementation under test.  When the C extension did not build, the ``c``
runs are skipped with a loud reason, unless ``SHARDKIT_REQUIRE_C=1`` (set it
in CI) turns that into a failure.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from shardkit.ring import IMPLEMENTATION, _lookup_py, _ring

try:
    _speedups: ModuleType | None = importlib.import_module("shardkit.ring._speedups")
    _C_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    _speedups = None
    _C_ERROR = str(exc)

REQUIRE_C = os.environ.get("SHARDKIT_REQUIRE_C", "") not in ("", "0")
IMPLS = {"python": _lookup_py, "c": _speedups}


def pytest_report_header() -> str:
    c = "built" if _speedups is not None else f"NOT BUILT ({_C_ERROR})"
    return f"shardkit.ring: IMPLEMENTATION={IMPLEMENTATION}; C speedups {c}"


def c_module() -> ModuleType:
    """The C module, or skip (fail under SHARDKIT_REQUIRE_C=1) when it did not build."""
    if _speedups is None:
        msg = f"C speedups not built, C half of the ring suite NOT RUN: {_C_ERROR}"
        if REQUIRE_C:
            pytest.fail(msg + " (SHARDKIT_REQUIRE_C=1)")
        pytest.skip(msg)
    return _speedups


@pytest.fixture(params=["python", "c"], autouse=True)
def ring_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The lookup module under test; new HashRing objects use it."""
    module = _lookup_py if request.param == "python" else c_module()
    monkeypatch.setattr(_ring, "_impl", module)
    yield module
