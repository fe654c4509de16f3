"""Benchmark helpers.  ``ring_figures`` (ring only) collects the ring benchmark's
medians and measured figures; they are printed as one table at the end of the run.
The summary always starts with the machine the figures were measured on (CPU model
and count): a figure measured on another machine is not a result."""

from __future__ import annotations

import os
import platform
from typing import Any

import pytest

_RING_FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def ring_figures() -> dict[str, Any]:
    """Ring benchmarks record ``name -> value`` here (seconds for medians)."""
    return _RING_FIGURES


def cpu_model() -> str:
    """The CPU model as the kernel names it (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def pytest_report_header(config: pytest.Config) -> str:
    return f"benchmark machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.section("benchmark machine")
    terminalreporter.write_line(
        f"{cpu_model()}; {os.cpu_count()} CPUs; Python {platform.python_version()}; {platform.platform()}"
    )
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
