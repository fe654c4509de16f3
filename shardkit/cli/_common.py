"""What every command shares: loading the settings, errors as one line, JSON, progress bars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from .._settings import Settings, load_settings

__all__ = [
    "CliError",
    "echo_json",
    "json_option",
    "load",
    "one_line",
    "progress",
    "scrub",
    "settings_option",
]

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A user-facing failure: printed as one line on stderr, exit code 2 (1 for "ran, found problems")."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"shardkit: error: {self.format_message()}", err=True)


def settings_option(fn: F) -> F:
    """``--settings``: a dotted module path or a TOML file (default: the group's, then ``SHARDKIT_SETTINGS``)."""
    return click.option(
        "--settings",
        "settings_path",
        metavar="MODULE_OR_TOML",
        default=None,
        help="Settings: a dotted module path or a .toml file (default: $SHARDKIT_SETTINGS).",
    )(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(fn)


def load(settings_path: str | None) -> Settings:
    """Load the settings named on the command, else on the group, else by ``SHARDKIT_SETTINGS``.

    The current directory is put on ``sys.path`` first (as ``python -m`` does), so
    ``--settings mysettings`` finds ``./mysettings.py``.  The cluster's engines are
    disposed when the command ends.
    """
    ctx = click.get_current_context()
    root = ctx.find_root()
    path = settings_path or root.params.get("settings_path")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    settings = load_settings(path)
    root.meta["shardkit.settings"] = settings
    root.call_on_close(settings.cluster.dispose)
    return settings


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def progress(items: Iterable[Any] | None = None, *, length: int | None = None, label: str = "") -> Any:
    """A progress bar on stderr (stdout stays clean for ``--json``); animated only on a terminal."""
    return click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True, width=30)


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception; a DBAPI error is shown by its driver's error."""
    orig = getattr(exc, "orig", None)
    shown = orig if isinstance(orig, BaseException) else exc
    lines = [line.strip() for line in str(shown).strip().splitlines() if line.strip()]
    return f"{type(shown).__name__}: {lines[0]}" if lines else type(shown).__name__


def scrub(message: str, settings: Settings | None) -> str:
    """Remove every password of the cluster from ``message`` (drivers may echo a DSN)."""
    if settings is None:
        return message
    for alias in settings.cluster.aliases:
        password = settings.cluster.spec(alias).url.password
        if password:
            message = message.replace(str(password), "***")
    return message
