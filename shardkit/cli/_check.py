"""``shardkit check``: connect to every alias; reachability, server version, round-trip time.

Each alias gets its own short-lived engine (no pool, a connect timeout for
servers), so a dead shard is reported and the others are still checked.
Exit code 1 when any alias fails.  URLs are shown with the password hidden,
and driver messages are scrubbed of passwords.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from .._cluster import Cluster
from ._common import CliError, echo_json, json_option, load, one_line, plural, scrub, settings_option

__all__ = ["check", "check_alias"]

_SERVER_NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite", "mysql": "MySQL", "mariadb": "MariaDB"}


def check_alias(cluster: Cluster, alias: str, *, timeout: float = 5.0, rounds: int = 3) -> dict[str, Any]:
    """Connect to ``alias`` once and time ``rounds`` round trips of ``SELECT 1``.

    :returns: ``alias``, ``dialect``, ``url`` (password hidden), ``ok``, ``server_version``,
        ``connect_ms``, ``rtt_ms`` (median) and ``error`` (one line, or ``None``).
    """
    spec = cluster.spec(alias)
    dialect = spec.dialect_name
    out: dict[str, Any] = {
        "alias": alias,
        "dialect": dialect,
        "url": spec.safe_url,
        "ok": False,
        "server_version": None,
        "connect_ms": None,
        "rtt_ms": None,
        "error": None,
    }
    database = spec.url.database
    on_disk = dialect == "sqlite" and database and database != ":memory:" and not database.startswith("file:")
    if on_disk and not Path(str(database)).is_file():
        out["error"] = f"SQLite file {database} does not exist (shardkit migrate creates it)"
        return out
    connect_args: dict[str, Any] = {}
    if dialect in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = max(1, round(timeout))
    try:
        engine = spec.create_engine(poolclass=NullPool, connect_args=connect_args)
    except Exception as exc:  # e.g. the dialect's driver is not installed: this alias's failure
        out["error"] = one_line(exc)
        if spec.url.password:
            out["error"] = str(out["error"]).replace(str(spec.url.password), "***")
        return out
    try:
        started = time.perf_counter()
        with engine.connect() as conn:
            out["connect_ms"] = round((time.perf_counter() - started) * 1000, 3)
            info = conn.dialect.server_version_info or ()
            name = _SERVER_NAMES.get(dialect, dialect)
            if getattr(conn.dialect, "is_mariadb", False):
                name = "MariaDB"
            out["server_version"] = f"{name} {'.'.join(str(p) for p in info)}".strip()
            rtts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                conn.execute(text("SELECT 1")).scalar()
                rtts.append((time.perf_counter() - t0) * 1000)
            out["rtt_ms"] = round(statistics.median(rtts), 3)
            out["ok"] = True
    except Exception as exc:  # any failure to connect or query is this alias's failure
        out["error"] = one_line(exc)
    finally:
        if spec.engine is None:
            engine.dispose()
    if out["error"] and spec.url.password:
        out["error"] = str(out["error"]).replace(str(spec.url.password), "***")
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


@click.command()
@settings_option
@click.option("--database", "-d", "databases", multiple=True, metavar="ALIAS", help="Only this alias (repeatable).")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=5.0, show_default=True, help="Connect timeout.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=3, show_default=True, help="Round trips to time.")
@json_option
def check(settings_path: str | None, databases: tuple[str, ...], timeout: float, rounds: int, as_json: bool) -> None:
    """Connect to every alias: reachability, server version, round-trip time.

    Exits with 1 if any alias fails.
    """
    settings = load(settings_path)
    cluster = settings.cluster
    aliases = [cluster.check_alias(a) for a in databases] or list(cluster.aliases)
    with ThreadPoolExecutor(max_workers=min(8, len(aliases))) as pool:
        results = list(pool.map(lambda a: check_alias(cluster, a, timeout=timeout, rounds=rounds), aliases))
    for r in results:
        if r["error"]:
            r["error"] = scrub(r["error"], settings)
    failed = [r["alias"] for r in results if not r["ok"]]
    if as_json:
        echo_json({"ok": not failed, "aliases": results})
    else:
        header = {"alias": "alias", "url": "url", "server": "server"}
        width = max(len(header["alias"]), *(len(r["alias"]) for r in results))
        urls = max(len(header["url"]), *(len(r["url"]) for r in results))
        servers = max(len(header["server"]), *(len(r["server_version"] or "-") for r in results))
        click.echo(
            f"{'alias':<{width}}  {'url':<{urls}}  {'server':<{servers}}  {'connect':>10}  {'round trip':>10}  status"
        )
        for r in results:
            status = "ok" if r["ok"] else f"FAILED: {r['error']}"
            click.echo(
                f"{r['alias']:<{width}}  {r['url']:<{urls}}  {r['server_version'] or '-':<{servers}}  "
                f"{_ms(r['connect_ms']):>10}  {_ms(r['rtt_ms']):>10}  {status}"
            )
    if failed:
        counted = plural(len(results), "alias", "aliases")
        raise CliError(f"{len(failed)} of {counted} failed: {', '.join(failed)}", exit_code=1)
    if not as_json:
        one = len(results) == 1
        click.echo(f"alias {results[0]['alias']} reachable" if one else f"all {len(results)} aliases reachable")
