"""The command itself: python -m shardkit, --help of every command, demo, optional commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shardkit.cli import cli


def test_help_of_every_command(run) -> None:
    for args in (
        [],
        ["check"],
        ["ring"],
        ["ring", "show"],
        ["ring", "distribution"],
        ["ring", "diff"],
        ["migrate"],
        ["demo"],
    ):
        result = run(*args, "--help")
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.stdout


def test_python_dash_m_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "shardkit", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in ("check", "demo", "migrate", "ring"):
        assert name in proc.stdout


def test_demo_still_works(run, workdir: Path) -> None:
    result = run("demo", "--dir", str(workdir / "demo"), "--users", "50", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert "Loaded 50 users" in result.stdout


def test_reshard_is_registered_when_present() -> None:
    if (Path(__file__).resolve().parents[2] / "shardkit" / "cli" / "_reshard.py").exists():
        assert "reshard" in cli.commands
    else:
        assert "reshard" not in cli.commands
