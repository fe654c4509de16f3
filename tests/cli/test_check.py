"""shardkit check: every alias connected, timed and reported; failures are one line and exit 1."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .conftest import BAD_PASSWORD, assert_one_line_error, parse


def _settings(write_settings: Callable[[str], str], urls: dict[str, str]) -> str:
    return write_settings(f"DATABASES = {urls!r}\n")


def test_check_every_alias(write_settings, make_urls, run, backend) -> None:
    urls = make_urls("default", "s0", "s1")
    if backend == "sqlite":  # check never creates a SQLite file: make them
        for url in urls.values():
            sqlite3.connect(url.removeprefix("sqlite:///")).close()
    name = _settings(write_settings, urls)
    result = run("check", "--settings", name, "--json")
    assert result.exit_code == 0, result.output
    data = parse(result)
    assert data["ok"] is True
    assert [a["alias"] for a in data["aliases"]] == ["default", "s0", "s1"]
    for alias in data["aliases"]:
        assert alias["ok"] and alias["error"] is None
        assert alias["server_version"].startswith({"sqlite": "SQLite ", "postgresql": "PostgreSQL "}[backend])
        assert alias["rtt_ms"] >= 0 and alias["connect_ms"] >= 0
    text = run("--settings", name, "check", "-d", "s1")  # group option, one alias
    assert text.exit_code == 0, text.output
    assert "s1" in text.stdout and "s0" not in text.stdout and text.stdout.endswith("alias s1 reachable\n")


def test_unreachable_shard_fails_without_password(write_settings, run, workdir: Path) -> None:
    sqlite3.connect(workdir / "default.db").close()
    urls = {
        "default": f"sqlite:///{workdir / 'default.db'}",
        "dead": f"postgresql+psycopg2://mario:{BAD_PASSWORD}@127.0.0.1:1/nowhere",
    }
    name = _settings(write_settings, urls)
    result = run("check", "--settings", name, "--json", "--timeout", "2")
    assert_one_line_error(result, code=1, contains="1 of 2 aliases failed: dead")
    data = parse(result)
    assert data["ok"] is False
    dead = data["aliases"][1]
    assert dead["ok"] is False and "OperationalError" in dead["error"]
    assert dead["url"] == "postgresql+psycopg2://mario:***@127.0.0.1:1/nowhere"
    text = run("check", "--settings", name)
    assert_one_line_error(text, code=1)
    assert "FAILED" in text.stdout


def test_missing_sqlite_file_is_a_failure(write_settings, run, workdir: Path) -> None:
    name = _settings(write_settings, {"default": f"sqlite:///{workdir / 'absent.db'}"})
    result = run("check", "--settings", name)
    assert_one_line_error(result, code=1)
    assert not (workdir / "absent.db").exists()


def test_user_mistakes_are_one_line(write_settings, run, workdir: Path, monkeypatch) -> None:
    assert_one_line_error(run("check", "--settings", "no_such_settings_mod"), contains="not found")
    assert_one_line_error(run("check", "--settings", "missing/shardkit.toml"), contains="does not exist")
    assert_one_line_error(run("check"), contains="SHARDKIT_SETTINGS")
    name = _settings(write_settings, {"default": "sqlite://"})
    assert_one_line_error(run("check", "--settings", name, "-d", "nope"), contains="unknown database alias 'nope'")
    broken = write_settings("DATABASES = {'default': 'sqlite://'}\n1 / 0\n")
    assert_one_line_error(run("check", "--settings", broken), contains="ZeroDivisionError")
    monkeypatch.setenv("SHARDKIT_SETTINGS", name)
    assert run("check", "--json").exit_code == 0


def test_python_dash_m_and_console_errors(workdir: Path) -> None:
    """The real entry point, in a subprocess: one line on stderr, exit 2, no traceback."""
    (workdir / "pwsettings.py").write_text(
        f"DATABASES = {{'default': 'postgresql+psycopg2://mario:{BAD_PASSWORD}@127.0.0.1:1/x'}}\n"
        "SHARDKIT_METADATA = 'pwsettings:Base'\n"
        "from sqlalchemy.orm import DeclarativeBase\n"
        "class Base(DeclarativeBase): pass\n"
        "from sqlalchemy import Column, Integer, Table\n"
        "Table('t', Base.metadata, Column('id', Integer, primary_key=True))\n"
    )
    for args, code in (
        (["--settings", "nowhere_at_all", "check"], 2),
        (["--settings", "pwsettings", "check", "--timeout", "1"], 1),
        (["--settings", "pwsettings", "migrate"], 1),
        (["--settings", "pwsettings", "ring", "show"], 2),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "shardkit", *args], cwd=workdir, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and BAD_PASSWORD not in proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("shardkit: error:"), proc.stderr
