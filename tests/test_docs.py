"""Every ```python block in docs/*.md runs, top to bottom per page, in a scratch folder."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # a real module: SQLAlchemy resolves Mapped[...] annotations through sys.modules
    module = types.ModuleType(f"docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, block in enumerate(BLOCK.findall(page.read_text()), 1):
        code = compile(block, f"{page.name}[block {number}]", "exec")
        exec(code, module.__dict__)  # the docs are our own code
    from shardkit import _cluster

    _cluster._active_global = None
