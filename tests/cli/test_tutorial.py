"""The tutorial (docs/index.md) as a newcomer runs it: one script, run twice in the same folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

INDEX = Path(__file__).resolve().parents[2] / "docs" / "index.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_tutorial_script_runs_twice_in_one_folder(tmp_path: Path) -> None:
    blocks = BLOCK.findall(INDEX.read_text())
    assert len(blocks) >= 5
    script = tmp_path / "tutorial.py"
    script.write_text("\n\n".join(blocks))
    outputs = []
    for run in (1, 2):
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (run, proc.stderr[-2000:])
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]  # the second run starts from the same empty tables
    assert {"app.db", "credentials.db", "archive.db"} <= {p.name for p in tmp_path.iterdir()}
