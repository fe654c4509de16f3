"""SHARDKIT_DISABLE_EXTENSIONS=1 wins at import time too, over an extension built before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys; import shardkit.ring as r; "
    "print(r.IMPLEMENTATION, r.HashRing(['a', 'b']).implementation, "
    "'shardkit.ring._speedups' in sys.modules, os.environ.get('SHARDKIT_RING_IMPL'))"
)


def _import(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("SHARDKIT_DISABLE_EXTENSIONS", "SHARDKIT_RING_IMPL")}
    return subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def _built() -> bool:
    proc = _import(SHARDKIT_RING_IMPL="c")
    return proc.returncode == 0


def test_disable_extensions_selects_python_without_loading_c() -> None:
    if not _built():
        pytest.skip("the C extension is not built here: nothing to disable")
    assert _import().stdout.split() == ["c", "c", "True", "None"]
    for value in ("1", "yes"):
        proc = _import(SHARDKIT_DISABLE_EXTENSIONS=value)
        assert proc.returncode == 0, proc.stderr
        # the extension is not even loaded, and the environment is left as it was
        assert proc.stdout.split() == ["python", "python", "False", "None"]
    assert _import(SHARDKIT_DISABLE_EXTENSIONS="0").stdout.split()[0] == "c"
    both = _import(SHARDKIT_DISABLE_EXTENSIONS="1", SHARDKIT_RING_IMPL="python")
    assert both.stdout.split() == ["python", "python", "False", "python"]


def test_disable_extensions_contradicting_ring_impl_c() -> None:
    proc = _import(SHARDKIT_DISABLE_EXTENSIONS="1", SHARDKIT_RING_IMPL="c")
    assert proc.returncode != 0
    assert "ImportError: SHARDKIT_DISABLE_EXTENSIONS=1 and SHARDKIT_RING_IMPL=c contradict" in proc.stderr
