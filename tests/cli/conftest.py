"""CLI test helpers: settings modules written to tmp_path, the command run with CliRunner."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shardkit.cli import cli

BAD_PASSWORD = "s3cr3t-Pa55"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """cwd = tmp_path, on sys.path (restored afterwards), settings modules forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SHARDKIT_SETTINGS", raising=False)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("sk_settings_", "exampleapp", "example_settings")):
            del sys.modules[name]


@pytest.fixture
def write_settings(workdir: Path) -> Callable[[str], str]:
    """Write a settings module into the work dir; returns its (unique) module name."""

    def write(body: str) -> str:
        name = f"sk_settings_{uuid.uuid4().hex[:8]}"
        (workdir / f"{name}.py").write_text(textwrap.dedent(body))
        return name

    return write


@pytest.fixture
def run() -> Callable[..., Result]:
    runner = CliRunner()

    def invoke(*args: str, **kwargs: Any) -> Result:
        return runner.invoke(cli, list(args), catch_exceptions=True, **kwargs)

    return invoke


def parse(result: Result) -> Any:
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, code: int = 2, contains: str = "") -> str:
    """Non-zero exit, one ``shardkit: error:`` line on stderr, no traceback, no password."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("shardkit: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    assert BAD_PASSWORD not in result.output
    assert contains in errors[0], errors[0]
    return errors[0]
