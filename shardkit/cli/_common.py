"""What every command shares: loading the settings, errors as one line, JSON, progress bars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .._settings import ENV_VAR, Settings, load_settings
from ..errors import brief

if TYPE_CHECKING:
    from ..ring import HashRing

__all__ = [
    "CliError",
    "OneLineUsageError",
    "echo_json",
    "json_option",
    "load",
    "not_in_ring",
    "one_line",
    "plural",
    "progress",
    "scrub",
    "settings_option",
    "stderr_is_terminal",
    "unreachable",
    "unreachable_error",
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


class OneLineUsageError(click.UsageError):
    """A usage error (bad or missing option) shown like every other error: one line, exit code 2."""

    def show(self, file: Any = None) -> None:
        where = f"{self.ctx.command_path}: " if self.ctx is not None else ""
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"shardkit: error: {where}{self.format_message().rstrip('.')}{hint}", err=True)


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
    ``--settings mysettings`` finds ``./mysettings.py``; the rest (a module, a
    ``settings.py`` path, a TOML file) is :func:`shardkit.load_settings`'s.  The
    cluster's engines are disposed when the command ends.
    """
    ctx = click.get_current_context()
    root = ctx.find_root()
    path = settings_path or root.params.get("settings_path") or os.environ.get(ENV_VAR) or None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    settings = load_settings(path)
    root.meta["shardkit.settings"] = settings
    root.call_on_close(settings.cluster.dispose)
    return settings


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class _NoBar:
    """What :func:`progress` gives when stderr is not a terminal: the items, and no output."""

    def __init__(self, items: Iterable[Any] | None) -> None:
        self.items: Iterable[Any] = items if items is not None else ()

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def update(self, n_steps: int, current_item: Any = None) -> None:
        return None


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are drawn only there)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(items: Iterable[Any] | None = None, *, length: int | None = None, label: str = "") -> Any:
    """A progress bar on stderr (stdout stays clean for ``--json``), only when stderr is a terminal.

    Redirected to a file, a pipe or a log, stderr gets no progress output at all: only errors.
    """
    if not stderr_is_terminal():
        return _NoBar(items)
    return click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True, width=30)


def plural(n: int, one: str, many: str) -> str:
    """``"1 alias"``, ``"3 aliases"``."""
    return f"{n} {one if n == 1 else many}"


def not_in_ring(alias: str, ring: HashRing) -> CliError:
    """The one error every command gives for an alias that is not a shard of the ring (exit 2)."""
    return CliError(f"shard {alias!r} is not in the ring (its shards: {', '.join(ring) or 'none'})")


one_line = brief
"""``Type: first line`` of an exception, a DBAPI error by its driver's (:func:`shardkit.errors.brief`)."""


def scrub(message: str, settings: Settings | None) -> str:
    """Remove every password of the cluster from ``message`` (drivers may echo a DSN)."""
    if settings is None:
        return message
    for alias in settings.cluster.aliases:
        password = settings.cluster.spec(alias).url.password
        if password:
            message = message.replace(str(password), "***")
    return message


def unreachable(settings: Settings, aliases: Sequence[str] | None = None, *, timeout: float = 5.0) -> dict[str, str]:
    """Connect to each alias (in parallel, a fresh connection, ``timeout`` to connect):
    alias -> one-line error (password scrubbed) of those that cannot be reached."""
    from ._check import check_alias

    cluster = settings.cluster
    names = list(aliases) if aliases is not None else list(cluster.aliases)
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        results = list(pool.map(lambda a: check_alias(cluster, a, timeout=timeout, rounds=1), names))
    return {r["alias"]: scrub(str(r["error"]), settings) for r in results if not r["ok"]}


def unreachable_error(down: dict[str, str]) -> CliError:
    """Exit code 1 ("ran, found a problem"), naming every alias that is down and why."""
    if len(down) == 1:
        ((alias, error),) = down.items()
        return CliError(f"alias {alias!r} is unreachable: {error}", exit_code=1)
    details = "; ".join(f"{alias}: {error}" for alias, error in down.items())
    return CliError(f"{len(down)} aliases are unreachable: {', '.join(down)} ({details})", exit_code=1)
