"""Benchmark helpers.  ``ring_figures`` (ring only) collects the ring benchmark's
medians and measured figures; they are printed as one table at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

_RING_FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def ring_figures() -> dict[str, Any]:
    """Ring benchmarks record ``name -> value`` here (seconds for medians)."""
    return _RING_FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RING_FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("shardkit ring figures")
    for name, value in _RING_FIGURES.items():
        if isinstance(value, float) and name.startswith("median"):
            write(f"{name:<52} {value * 1e9:12.1f} ns")
        elif isinstance(value, float):
            write(f"{name:<52} {value:12.4f}")
        else:
            write(f"{name:<52} {value!s:>12}")
