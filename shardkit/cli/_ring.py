"""``shardkit ring show | distribution | diff | compare``: a hash ring's layout, load and movement.

The ring comes from the settings (``SHARDKIT_RING``, a TOML ``[ring]`` table or
the ``HashRingRouter`` in ``DATABASE_ROUTERS``) or from ``--ring FILE.json``
(the JSON of ``HashRing.to_dict()``).  Shares are exact (arc lengths of the
classic ring, bucket counts in buckets mode); key distributions are counted
with ``ring.get_many``.  ``distribution --from-table`` also sizes every table on every
shard and finds the heaviest shard keys; ``compare`` lays layouts side by side.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import click
from sqlalchemy import MetaData, Table, func, inspect, select, text, union_all
from sqlalchemy.exc import DBAPIError

from .._settings import Settings, import_object
from ..errors import ConfigError
from ..ring import IMPLEMENTATION, HashRing
from ..ring._layout import (
    balance,
    bucket_ranges,
    exact_movement,
    exact_shares,
    ideal_shares,
    memory,
    movement_on_add,
    movement_on_remove,
    units,
)
from ._common import (
    CliError,
    echo_json,
    json_option,
    load,
    not_in_ring,
    one_line,
    progress,
    scrub,
    settings_option,
    unreachable,
    unreachable_error,
)

__all__ = ["ring"]

KINDS = ("int", "uuid", "str")
_CHUNK = 50_000


def _ring_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--ring",
        "ring_path",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Read the ring from this JSON file (HashRing.to_dict()) instead of the settings.",
    )(fn)


def _get_ring(settings_path: str | None, ring_path: Path | None) -> tuple[HashRing, Settings | None]:
    if ring_path is not None:
        try:
            data = json.loads(ring_path.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"{ring_path}: not a JSON ring description ({exc})") from None
        try:
            return HashRing.from_dict(data), None
        except ConfigError as exc:
            raise CliError(f"{ring_path}: {exc}") from None
    settings = load(settings_path)
    return settings.require_ring(), settings


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


@click.group()
def ring() -> None:
    """Inspect the hash ring: layout, key distribution, movement on add/remove, layouts compared."""


# ----------------------------------------------------------------------------- show
@ring.command()
@settings_option
@_ring_option
@json_option
def show(settings_path: str | None, ring_path: Path | None, as_json: bool) -> None:
    """Shards, weights, virtual nodes or buckets, version, and each shard's exact share."""
    hr, _ = _get_ring(settings_path, ring_path)
    shares = exact_shares(hr)
    ideal = ideal_shares(hr.weights)
    per = units(hr)
    unit = "buckets" if hr.mode == "buckets" else "points"
    rows: list[dict[str, Any]] = [
        {
            "alias": alias,
            "weight": weight,
            unit: per[alias],
            "share": float(shares[alias]),
            "ideal": float(ideal[alias]),
            "ratio": float(shares[alias] / ideal[alias]) if ideal[alias] else None,
        }
        for alias, weight in hr.weights.items()
    ]
    peak = max((r["ratio"] for r in rows if r["ratio"] is not None), default=None)
    data: dict[str, Any] = {
        "mode": hr.mode,
        "version": hr.version,
        "generation": hr.generation,
        "implementation": IMPLEMENTATION,
        "shards": rows,
        "peak_over_ideal": peak,
    }
    if hr.mode == "buckets":
        data["buckets"] = hr.buckets
    else:
        data["vnodes"] = hr.vnodes
        data["points"] = sum(per.values())
    if as_json:
        echo_json(data)
        return
    size = f"{hr.buckets} buckets" if hr.mode == "buckets" else f"{hr.vnodes} vnodes per unit of weight"
    click.echo(f"ring: mode {hr.mode}, {size}, {len(hr)} shards, version {hr.version}, generation {hr.generation}")
    if not rows:
        click.echo("(no shards)")
        return
    width = max(5, *(len(r["alias"]) for r in rows))
    click.echo(f"{'shard':<{width}}  {'weight':>6}  {unit:>8}  {'share':>9}  {'ideal':>9}  share/ideal")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4f}"
        click.echo(
            f"{r['alias']:<{width}}  {r['weight']!s:>6}  {r[unit]:>8}  {_pct(r['share']):>9}  "
            f"{_pct(r['ideal']):>9}  {ratio}"
        )
    click.echo(f"peak share / ideal: {peak:.4f}" if peak is not None else "")


# ----------------------------------------------------------------------- key sources
def _synthetic(kind: str, n: int, seed: int) -> Iterator[Any]:
    if kind == "int":
        yield from range(1, n + 1)
    elif kind == "str":
        yield from (f"user:{i}" for i in range(1, n + 1))
    else:
        rng = random.Random(seed)
        yield from (uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(n))


def _coerce(kind: str | None) -> Callable[[Any], Any]:
    if kind == "int":
        return lambda v: v if isinstance(v, int) else int(str(v).strip())
    if kind == "uuid":
        return lambda v: v if isinstance(v, uuid.UUID) else uuid.UUID(str(v).strip())
    if kind == "str":
        return lambda v: v if isinstance(v, str) else str(v)
    return lambda v: v


def _chunks(keys: Iterator[Any]) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _file_keys(path: Path, kind: str | None) -> Iterator[Any]:
    convert = _coerce(kind or "str")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if not text:
                continue
            try:
                yield convert(text)
            except ValueError:
                raise CliError(f"{path}:{number}: {text[:40]!r} is not a {kind} key") from None


def _raise_if_down(settings: Settings, alias: str, exc: DBAPIError) -> None:
    """A shard failed while being read: if it cannot be reached, raise an error naming it (exit
    code 1: the command ran and found a shard down); any other database error goes on as it is."""
    down = unreachable(settings, [alias])
    if down:
        raise unreachable_error(down) from exc


def _tables_on(settings: Settings, alias: str) -> list[str]:
    """The table names on ``alias`` (sorted); a shard that cannot be reached is named, exit 1."""
    try:
        return sorted(inspect(settings.cluster.engine(alias)).get_table_names())
    except DBAPIError as exc:
        _raise_if_down(settings, alias, exc)
        raise


def _no_table(target: str, where: str, names: list[str]) -> CliError:
    there = f"tables: {', '.join(names)}" if names else "no tables at all (run shardkit migrate?)"
    return CliError(f"no table {target!r} {where} ({there})")


def _resolve_table(settings: Settings, hr: HashRing, target: str, column: str | None) -> tuple[Any, str]:
    """(table, shard-key column name) for a model path, a Table path or a table name."""
    obj: Any = None
    metadata = None
    if ":" in target or "." in target:
        obj = import_object(target)
    else:
        if settings.metadata is not None:
            meta_obj = settings.get_metadata()
            metadata = meta_obj if isinstance(meta_obj, MetaData) else getattr(meta_obj, "metadata", None)
            registry = getattr(meta_obj, "registry", None)
            if registry is not None:
                for mapper in registry.mappers:
                    if getattr(mapper.local_table, "name", None) == target:
                        obj = mapper.class_
                        break
        if obj is None and metadata is not None:
            obj = metadata.tables.get(target)
        if obj is None and column is None:
            # not a table of the metadata, and no column to read it by: say which tables there are
            if metadata is not None:
                names = sorted(t.name for t in metadata.tables.values())
                raise CliError(
                    f"no table {target!r} in the metadata of {settings.source} (tables: {', '.join(names)}); "
                    "for a table outside it, pass --column NAME"
                )
            first = next(iter(hr), None)
            if first is not None:
                names = _tables_on(settings, first)
                if target not in names:
                    raise _no_table(target, f"on shard {first!r}", names)
        if obj is None:
            obj = target
    if isinstance(obj, Table):
        table: Any = obj
    elif isinstance(obj, type) and isinstance(getattr(obj, "__table__", None), Table):
        model: Any = obj
        table = model.__table__
        column = column or getattr(model, "__shard_key__", None)
        attrs = model.__mapper__.attrs
        if column is not None and column in attrs and hasattr(attrs[column], "columns"):
            column = attrs[column].columns[0].name  # the attribute's column may have another name
    elif isinstance(obj, str):
        table = None
    else:
        raise CliError(f"{target!r} is not a mapped class, a Table or a table name")
    if column is None:
        raise CliError(f"which column of {target!r} holds the shard key? pass --column NAME")
    if table is not None and column not in table.c:
        raise CliError(f"table {table.name!r} has no column {column!r}")
    return (table if table is not None else target), column


def _column_on(settings: Settings, alias: str, table: Any, column_name: str) -> Any:
    """The shard-key column of ``table`` (a Table, or a table name reflected on ``alias``)."""
    engine = settings.cluster.engine(alias)
    if isinstance(table, str):
        names = _tables_on(settings, alias)
        if table not in names:
            raise _no_table(table, f"on shard {alias!r}", names)
        reflected = Table(table, MetaData(), autoload_with=engine)
        if column_name not in reflected.c:
            raise CliError(
                f"table {table!r} on shard {alias!r} has no column {column_name!r} "
                f"(columns: {', '.join(reflected.c.keys())})"
            )
        return reflected.c[column_name]
    if not inspect(engine).has_table(table.name, schema=table.schema):
        raise CliError(f"shard {alias!r} has no table {table.name!r} (run shardkit migrate?)")
    return table.c[column_name]


def _scan_keys(
    settings: Settings, hr: HashRing, target: str, column: str | None, kind: str | None
) -> Iterator[tuple[str, list[Any], int]]:
    """Stream the shard-key column of ``target`` on every shard: ``(alias, keys, NULLs)`` per chunk."""
    cluster = settings.cluster
    table, column_name = _resolve_table(settings, hr, target, column)
    convert = _coerce(kind)
    with progress(list(hr), label="reading shards") as bar:
        for alias in bar:
            engine = cluster.engine(alias)
            try:
                col = _column_on(settings, alias, table, column_name)
                with engine.connect() as conn:
                    result = conn.execution_options(stream_results=True, yield_per=_CHUNK).execute(select(col))
                    for part in result.partitions():
                        keys = []
                        nulls = 0
                        for (value,) in part:
                            if value is None:
                                nulls += 1
                            else:
                                keys.append(convert(value))
                        yield alias, keys, nulls
            except DBAPIError as exc:
                _raise_if_down(settings, alias, exc)
                raise


def _table_keys(
    settings: Settings, hr: HashRing, target: str, column: str | None, kind: str | None
) -> tuple[Counter[str], Counter[str], int, int]:
    """Read the shard-key column on every shard: (keys per owner, rows per shard, misplaced, nulls)."""
    owners: Counter[str] = Counter()
    found: Counter[str] = Counter()
    misplaced = nulls = 0
    for alias, keys, part_nulls in _scan_keys(settings, hr, target, column, kind):
        nulls += part_nulls
        placed = hr.get_many(keys)
        owners.update(placed)
        found[alias] += len(keys)
        misplaced += sum(1 for a in placed if a != alias)
    return owners, found, misplaced, nulls


# ---------------------------------------------------------------- bytes, top keys
_SIZE_SQL = {
    "postgresql": (
        "pg_total_relation_size",
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class AS c "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema()",
    ),
    "sqlite": (
        "dbstat",
        "SELECT m.tbl_name, SUM(d.pgsize) FROM dbstat AS d JOIN sqlite_master AS m ON m.name = d.name "
        "WHERE m.type IN ('table', 'index') GROUP BY m.tbl_name",
    ),
    "mysql": (
        "information_schema",
        "SELECT table_name, COALESCE(data_length, 0) + COALESCE(index_length, 0) FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE'",
    ),
}
_SIZE_SQL["mariadb"] = _SIZE_SQL["mysql"]


def _shard_bytes(settings: Settings, alias: str) -> tuple[str | None, dict[str, int] | None]:
    """``(method, table -> bytes with its indexes and TOAST)`` of the tables on ``alias``;
    ``(None, None)`` where the database cannot say (an SQLite build without ``dbstat``)."""
    engine = settings.cluster.engine(alias)
    method, sql = _SIZE_SQL.get(engine.dialect.name, (None, None))
    if sql is None:
        return None, None
    names = _tables_on(settings, alias)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(sql)).all()
    except DBAPIError as exc:
        _raise_if_down(settings, alias, exc)
        if engine.dialect.name == "sqlite" and "dbstat" in str(exc.orig):  # built without SQLITE_ENABLE_DBSTAT_VTAB
            return None, None
        raise CliError(f"cannot read table sizes on shard {alias!r}: {scrub(one_line(exc), settings)}") from None
    sizes = {str(name): int(size or 0) for name, size in rows}
    return method, {name: sizes.get(name, 0) for name in names}


def _size_of(sizes: dict[str, int] | None, table: str) -> int | None:
    """A table's bytes on one shard: ``None`` when unknown there, 0 when the table is not there."""
    return None if sizes is None else sizes.get(table, 0)


def _bytes_report(settings: Settings, hr: HashRing) -> dict[str, Any]:
    """Bytes per shard and per table (``None``: unknown on that shard)."""
    methods: dict[str, str | None] = {}
    per_table: dict[str, dict[str, int | None]] = {}
    per_shard: dict[str, int | None] = {}
    known: dict[str, dict[str, int] | None] = {}
    with progress(list(hr), label="sizing tables") as bar:
        for alias in bar:
            methods[alias], known[alias] = _shard_bytes(settings, alias)
    names = sorted({name for sizes in known.values() if sizes for name in sizes})
    for name in names:
        per_table[name] = {a: _size_of(known[a], name) for a in hr}
    for alias in hr:
        sizes = known[alias]
        per_shard[alias] = None if sizes is None else sum(sizes.values())
    values = list(per_shard.values())
    return {
        "method": methods,
        "shards": per_shard,
        "tables": per_table,
        "total": None if any(v is None for v in values) else sum(v for v in values if v is not None),
    }


def _parse_colocated(spec: str) -> tuple[str, str | None]:
    target, sep, column = spec.partition("=")
    return target.strip(), (column.strip() or None) if sep else None


def _top_keys(
    settings: Settings, hr: HashRing, sources: list[tuple[str, str | None]], top: int, kind: str | None
) -> dict[str, Any]:
    """The ``top`` shard keys by rows over the co-located ``sources`` (MODEL_OR_TABLE, column):
    per shard one ``GROUP BY key ORDER BY count DESC LIMIT top`` over the union of the tables,
    merged (a key lives on one shard), then each winner's rows per table."""
    resolved = [(target, *_resolve_table(settings, hr, target, column)) for target, column in sources]
    convert = _coerce(kind)
    totals: Counter[Any] = Counter()
    where: dict[Any, set[str]] = {}
    with progress(list(hr), label="counting keys") as bar:
        for alias in bar:
            engine = settings.cluster.engine(alias)
            try:
                cols = [_column_on(settings, alias, table, name) for _, table, name in resolved]
                keyed = union_all(*[select(c.label("k")).where(c.is_not(None)) for c in cols]).subquery()
                n = func.count().label("n")
                stmt = select(keyed.c.k, n).group_by(keyed.c.k).order_by(n.desc(), keyed.c.k).limit(top)
                with engine.connect() as conn:
                    for key, count in conn.execute(stmt):
                        totals[key] += int(count)
                        where.setdefault(key, set()).add(alias)
            except DBAPIError as exc:
                _raise_if_down(settings, alias, exc)
                raise CliError(f"cannot count keys on shard {alias!r}: {scrub(one_line(exc), settings)}") from None
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], str(kv[0])))[:top]
    per_table: dict[Any, Counter[str]] = {key: Counter() for key, _ in ranked}
    for alias in hr:
        mine = [key for key, _ in ranked if alias in where[key]]
        if not mine:
            continue
        engine = settings.cluster.engine(alias)
        with engine.connect() as conn:
            for target, table, name in resolved:
                col = _column_on(settings, alias, table, name)
                stmt = select(col, func.count()).where(col.in_(mine)).group_by(col)
                for key, count in conn.execute(stmt):
                    if key in per_table:
                        per_table[key][target] += int(count)
    rows = []
    for key, count in ranked:
        try:
            owner: str | None = hr.get(convert(key))
        except (TypeError, ValueError):
            owner = None
        rows.append(
            {
                "key": key,
                "rows": count,
                "shards": sorted(where[key]),
                "owner": owner,
                "tables": {target: per_table[key].get(target, 0) for target, _, _ in resolved},
            }
        )
    return {"tables": [target for target, _, _ in resolved], "top": top, "keys": rows}


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# --------------------------------------------------------------------- distribution
def _stats(counts: dict[str, int], hr: HashRing) -> dict[str, Any]:
    total = sum(counts.values())
    n = len(counts)
    mean = total / n if n else 0.0
    ideal = ideal_shares(hr.weights)
    stddev = math.sqrt(sum((c - mean) ** 2 for c in counts.values()) / n) if n else 0.0
    rows = [
        {
            "alias": alias,
            "keys": c,
            "share": c / total if total else 0.0,
            "expected": float(total * ideal[alias]),
            "ratio": (c / float(total * ideal[alias])) if total else None,
        }
        for alias, c in counts.items()
    ]
    peak = max(counts.values(), default=0)
    return {
        "keys": total,
        "shards": rows,
        "mean": mean,
        "peak": peak,
        "peak_mean": peak / mean if mean else None,
        "stddev": stddev,
        "relative_stddev": stddev / mean if mean else None,
        "peak_over_expected": max((r["ratio"] for r in rows if r["ratio"] is not None), default=None),
    }


def _histogram(stats: dict[str, Any], width: int = 40) -> list[str]:
    rows = stats["shards"]
    peak = max((r["keys"] for r in rows), default=0) or 1
    name = max((len(r["alias"]) for r in rows), default=5)
    digits = max((len(f"{r['keys']:,}") for r in rows), default=1)
    return [
        f"{r['alias']:<{name}}  {r['keys']:>{digits},}  {'#' * round(width * r['keys'] / peak):<{width}}  "
        f"{100 * r['share']:6.2f}%"
        for r in rows
    ]


@ring.command()
@settings_option
@_ring_option
@click.option("--keys", "nkeys", type=click.IntRange(1, 100_000_000), default=None, help="Synthetic keys  [100000].")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Key type: synthetic keys, or how to read keys.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed for synthetic uuid keys.")
@click.option(
    "--from-file",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Keys from a file, one per line (str unless --kind).",
)
@click.option("--from-table", "from_table", metavar="MODEL_OR_TABLE", help="Keys from a table on every shard.")
@click.option("--column", help="The shard-key column for --from-table (default: the model's __shard_key__).")
@click.option(
    "--bytes/--no-bytes",
    "with_bytes",
    default=True,
    show_default=True,
    help="With --from-table: bytes per shard and per table (tables with their indexes).",
)
@click.option(
    "--top",
    type=click.IntRange(0, 10_000),
    default=0,
    help="With --from-table: the N shard keys with the most rows (over --colocated tables too).",
)
@click.option(
    "--colocated",
    "colocated",
    multiple=True,
    metavar="MODEL_OR_TABLE[=COLUMN]",
    help="With --top: another table sharded by the same key (repeatable); its rows count for the key.",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a histogram PNG (needs matplotlib)."
)
@json_option
def distribution(
    settings_path: str | None,
    ring_path: Path | None,
    nkeys: int | None,
    kind: str | None,
    seed: int,
    from_file: Path | None,
    from_table: str | None,
    column: str | None,
    with_bytes: bool,
    top: int,
    colocated: tuple[str, ...],
    plot: Path | None,
    as_json: bool,
) -> None:
    """Keys per shard: peak/mean, standard deviation, a histogram (and --plot PNG).

    Synthetic keys (--keys N --kind int|uuid|str: ints 1..N, strs "user:1".., random
    uuids), a file of keys (--from-file), or the shard-key column of a table read
    over every shard (--from-table; also counts rows sitting on the wrong shard,
    gives bytes per shard and per table, and with --top N the heaviest keys).
    """
    if from_file and from_table:
        raise click.UsageError("give --from-file or --from-table, not both")
    if nkeys is not None and (from_file or from_table):
        raise click.UsageError("--keys is for synthetic keys; --from-file/--from-table read every key")
    if (top or colocated) and not from_table:
        raise click.UsageError("--top and --colocated read tables: give --from-table")
    if colocated and not top:
        raise click.UsageError("--colocated goes with --top N")
    if plot is not None:
        from ._plot import require_matplotlib

        require_matplotlib()
    if from_table is not None:
        if ring_path is not None:
            raise click.UsageError("--from-table reads the shards of the settings: drop --ring")
        settings = load(settings_path)
        hr = settings.require_ring()
        owners, found, misplaced, nulls = _table_keys(settings, hr, from_table, column, kind)
        source = f"table {from_table}"
        extra: dict[str, Any] = {
            "rows_per_shard": {a: found.get(a, 0) for a in hr},
            "misplaced": misplaced,
            "null_keys": nulls,
        }
        if with_bytes:
            extra["bytes"] = _bytes_report(settings, hr)
        if top:
            sources = [(from_table, column), *map(_parse_colocated, colocated)]
            extra["top_keys"] = _top_keys(settings, hr, sources, top, kind)
    else:
        hr, _ = _get_ring(settings_path, ring_path)
        owners = Counter()
        extra = {}
        if from_file is not None:
            keys: Iterator[Any] = _file_keys(from_file, kind)
            source = f"file {from_file}"
            length = None
        else:
            nkeys = nkeys or 100_000
            keys = _synthetic(kind or "int", nkeys, seed)
            source = f"{nkeys} synthetic {kind or 'int'} keys"
            length = nkeys
        with progress(length=length or 0, label="hashing keys") as bar:
            for chunk in _chunks(keys):
                owners.update(hr.get_many(chunk))
                bar.update(len(chunk))
    counts = {alias: owners.get(alias, 0) for alias in hr}
    stats = _stats(counts, hr)
    data = {"source": source, "mode": hr.mode, "version": hr.version, **stats, **extra}
    if plot is not None:
        from ._plot import plot_distribution

        plot_distribution(stats, plot, title=f"Keys per shard ({source})")
        data["plot"] = str(plot)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{stats['keys']:,} keys from {source}, {len(counts)} shards (ring version {hr.version})")
    for line in _histogram(stats):
        click.echo("  " + line)
    pm = stats["peak_mean"]
    rel = stats["relative_stddev"]
    click.echo(
        f"mean {stats['mean']:,.1f}  peak {stats['peak']:,}  peak/mean {pm:.4f}  "
        f"stddev {stats['stddev']:,.1f} ({100 * rel:.2f}% of mean)"
        if pm is not None and rel is not None
        else "no keys"
    )
    if extra:
        click.echo(f"rows on a shard the ring does not give them: {misplaced:,}; NULL keys skipped: {nulls:,}")
    if "bytes" in extra:
        _echo_bytes(extra["bytes"])
    if "top_keys" in extra:
        _echo_top(extra["top_keys"])
    if plot is not None:
        click.echo(f"histogram written to {plot}")


_BYTES_COLUMNS = 6


def _echo_bytes(report: dict[str, Any]) -> None:
    shards: dict[str, int | None] = report["shards"]
    tables: dict[str, dict[str, int | None]] = report["tables"]
    # the largest tables, at most _BYTES_COLUMNS of them, in name order (all of them in --json)
    largest = sorted(tables, key=lambda n: -sum(v or 0 for v in tables[n].values()))[:_BYTES_COLUMNS]
    names = sorted(largest)
    width = max([5, *(len(a) for a in shards)])
    cols = [max(12, len(n)) for n in names]
    more = len(tables) - len(names)
    click.echo(
        "bytes (tables with their indexes"
        + (f"; the {len(names)} largest of {len(tables)} tables shown, all in --json):" if more else "):")
    )
    header = "".join(f"  {n:>{w}}" for n, w in zip(names, cols, strict=True))
    click.echo(f"  {'shard':<{width}}  {'total':>12}{header}")
    for alias, total in shards.items():
        cells = "".join(f"  {_human_bytes(tables[n][alias]):>{w}}" for n, w in zip(names, cols, strict=True))
        click.echo(f"  {alias:<{width}}  {_human_bytes(total):>12}{cells}")
    click.echo(f"  {'all':<{width}}  {_human_bytes(report['total']):>12}")


def _echo_top(report: dict[str, Any]) -> None:
    rows = report["keys"]
    click.echo(f"top {len(rows)} shard keys by rows over {', '.join(report['tables'])}:")
    if not rows:
        click.echo("  (no keys)")
        return
    kw = max([3, *(len(str(r["key"])) for r in rows)])
    for r in rows:
        split = "" if len(r["tables"]) < 2 else "  (" + ", ".join(f"{t} {n:,}" for t, n in r["tables"].items()) + ")"
        click.echo(f"  {r['key']!s:<{kw}}  {r['rows']:>10,} rows  on {', '.join(r['shards'])}{split}")


# ------------------------------------------------------------------------------ diff
@ring.command()
@settings_option
@_ring_option
@click.option("--add", "add", metavar="ALIAS", help="Add this shard.")
@click.option("--weight", type=click.FloatRange(min=0, min_open=True), default=None, help="Weight of the added shard.")
@click.option("--remove", "remove", metavar="ALIAS", help="Remove this shard.")
@click.option("--keys", "nkeys", type=click.IntRange(1, 100_000_000), default=100_000, show_default=True)
@click.option("--kind", type=click.Choice(KINDS), default="int", show_default=True, help="Synthetic key type.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--all-buckets", is_flag=True, help="List every moved bucket range (buckets mode).")
@json_option
def diff(
    settings_path: str | None,
    ring_path: Path | None,
    add: str | None,
    weight: float | None,
    remove: str | None,
    nkeys: int,
    kind: str,
    seed: int,
    all_buckets: bool,
    as_json: bool,
) -> None:
    """What moves on --add ALIAS [--weight W] or --remove ALIAS, against the ideal.

    Exact (hash-space arcs, or the buckets that change owner) and sampled over
    --keys synthetic keys.  The ideal is the new shard's share on add (1/(n+1)
    for equal weights) and the removed shard's share on remove.
    """
    if (add is None) == (remove is None):
        raise click.UsageError("give exactly one of --add ALIAS or --remove ALIAS")
    if weight is not None and add is None:
        raise click.UsageError("--weight goes with --add")
    old, _ = _get_ring(settings_path, ring_path)
    new = old.copy()
    w: int | float = 1 if weight is None else (int(weight) if float(weight).is_integer() else weight)
    if add is not None:
        new.add(add, w)
        ideal = Fraction(new.weights[add]) / sum(Fraction(x) for x in new.weights.values())
        operation, alias = "add", add
    else:
        assert remove is not None
        if remove not in old:
            raise not_in_ring(remove, old)
        new.remove(remove)
        ideal = ideal_shares(old.weights)[remove]
        operation, alias = "remove", remove
    moves, moved_buckets = exact_movement(old, new)
    exact_total = sum(moves.values(), Fraction(0))
    staying = set(old.weights) & set(new.weights)
    between_exact = sum((v for (a, b), v in moves.items() if a in staying and b in staying), Fraction(0))

    sampled: Counter[tuple[str, str]] = Counter()
    with progress(length=nkeys, label="sampling keys") as bar:
        for chunk in _chunks(_synthetic(kind, nkeys, seed)):
            for a, b in zip(old.get_many(chunk), new.get_many(chunk), strict=True):
                if a != b:
                    sampled[a, b] += 1
            bar.update(len(chunk))
    sampled_total = sum(sampled.values())
    between_sampled = sum(v for (a, b), v in sampled.items() if a in staying and b in staying)
    pairs = sorted(set(moves) | set(sampled))
    rows = []
    for a, b in pairs:
        row: dict[str, Any] = {"from": a, "to": b, "share": float(moves.get((a, b), 0)), "keys": sampled.get((a, b), 0)}
        if old.mode == "buckets":
            row["buckets"] = len(moved_buckets.get((a, b), []))
            row["bucket_ranges"] = [list(r) for r in bucket_ranges(moved_buckets.get((a, b), []))]
        rows.append(row)
    data: dict[str, Any] = {
        "operation": operation,
        "alias": alias,
        "weight": w if add is not None else old.weights[alias],
        "mode": old.mode,
        "from_version": old.version,
        "to_version": new.version,
        "ideal": float(ideal),
        "exact": {
            "moved": float(exact_total),
            "ratio": float(exact_total / ideal) if ideal else None,
            "between_staying": float(between_exact),
        },
        "sampled": {
            "keys": nkeys,
            "kind": kind,
            "moved": sampled_total,
            "fraction": sampled_total / nkeys,
            "ratio": (sampled_total / nkeys) / float(ideal) if ideal else None,
            "between_staying": between_sampled,
        },
        "moves": rows,
    }
    if old.mode == "buckets":
        data["exact"]["buckets"] = sum(len(v) for v in moved_buckets.values())
        data["exact"]["of_buckets"] = old.buckets
    if as_json:
        echo_json(data)
        return
    what = f"add {alias} (weight {data['weight']})" if add is not None else f"remove {alias}"
    click.echo(f"ring diff: {what}; {len(old)} -> {len(new)} shards, mode {old.mode}")
    click.echo(
        f"exact:   {_pct(float(exact_total))} of the key space moves; ideal {_pct(float(ideal))} "
        f"(ratio {data['exact']['ratio']:.4f})"
    )
    if old.mode == "buckets":
        click.echo(f"         {data['exact']['buckets']} of {old.buckets} buckets change owner")
    click.echo(
        f"sampled: {sampled_total:,} of {nkeys:,} {kind} keys move ({_pct(sampled_total / nkeys)}, "
        f"ratio {data['sampled']['ratio']:.4f})"
    )
    width = max([4, *(len(a) for a, _ in pairs)])
    width_to = max([2, *(len(b) for _, b in pairs)])
    click.echo(f"  {'from':<{width}}  {'to':<{width_to}}  {'exact share':>11}  {'sampled keys':>12}")
    for row in rows:
        click.echo(f"  {row['from']:<{width}}  {row['to']:<{width_to}}  {_pct(row['share']):>11}  {row['keys']:>12,}")
        if old.mode == "buckets":
            ranges = [f"{a}" if a == b else f"{a}-{b}" for a, b in row["bucket_ranges"]]
            shown = ranges if all_buckets else ranges[:8]
            more = "" if len(shown) == len(ranges) else f" ... ({len(ranges) - len(shown)} more ranges, --all-buckets)"
            click.echo(f"  {'':<{width}}  buckets: {', '.join(shown)}{more}")
    click.echo(f"moved between shards that stay: exact {_pct(float(between_exact))}, sampled {between_sampled:,} keys")


# --------------------------------------------------------------------------- compare
def _parse_layout(spec: str, base: HashRing) -> HashRing:
    """One ``--layout``: a ring JSON file, or comma-separated ``vnodes=N``, ``buckets=N``,
    ``shards=N`` and ``ALIAS:WEIGHT`` items (``weights=`` may prefix the first weight)."""
    text_ = spec.strip()
    if text_.endswith(".json") or Path(text_).is_file():
        try:
            return HashRing.from_dict(json.loads(Path(text_).read_text()))
        except (OSError, ValueError) as exc:
            raise CliError(f"--layout {spec!r}: not a JSON ring description ({exc})") from None
        except ConfigError as exc:
            raise CliError(f"--layout {spec!r}: {exc}") from None
    mode, vnodes, buckets = base.mode, base.vnodes, base.buckets
    weights: dict[str, int | float] = dict(base.weights)
    for raw in text_.split(","):
        item = raw.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        try:
            if eq and name == "weights":
                item = value.strip()
            elif eq and name in ("vnodes", "buckets", "shards"):
                number = int(value)
                if name == "vnodes":
                    mode, vnodes = "ring", number
                elif name == "buckets":
                    mode, buckets = "buckets", number
                else:
                    if number < 1:
                        raise ValueError("shards must be at least 1")
                    weights = {f"s{i}": 1 for i in range(number)}
                continue
            elif eq:
                raise ValueError(f"unknown item {name!r} (vnodes=, buckets=, shards=, weights=, ALIAS:WEIGHT)")
            alias, colon, weight = item.rpartition(":")
            if not colon or not alias:
                raise ValueError(f"{item!r} is not ALIAS:WEIGHT")
            number_w = float(weight)
            weights[alias.strip()] = int(number_w) if number_w.is_integer() else number_w
        except ValueError as exc:
            raise CliError(f"--layout {spec!r}: {exc}") from None
    try:
        return HashRing(weights, mode=mode, vnodes=vnodes, buckets=buckets)
    except ConfigError as exc:
        raise CliError(f"--layout {spec!r}: {exc}") from None


def _new_alias(hr: HashRing) -> str:
    n = len(hr)
    while f"s{n}" in hr:
        n += 1
    return f"s{n}"


@ring.command()
@settings_option
@_ring_option
@click.option(
    "--layout",
    "layouts",
    multiple=True,
    required=True,
    metavar="SPEC",
    help="A layout (repeat to compare): vnodes=N | buckets=N, shards=N, ALIAS:WEIGHT,... or a ring JSON file.",
)
@click.option("--shards", "nshards", type=click.IntRange(1, 10_000), default=None, help="Start from s0..sN-1.")
@click.option("--keys", "nkeys", type=click.IntRange(1, 100_000_000), default=None, help="Synthetic keys  [100000].")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Synthetic key type [int], or how to read keys.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed for synthetic uuid keys.")
@click.option("--from-table", "from_table", metavar="MODEL_OR_TABLE", help="Real keys: a table on every shard.")
@click.option("--column", help="The shard-key column for --from-table (default: the model's __shard_key__).")
@click.option("--add", "add", metavar="ALIAS", default=None, help="The shard added for movement [s<n>].")
@click.option("--remove", "remove", metavar="ALIAS", default=None, help="The shard removed [each layout's last].")
@click.option(
    "--png", "--plot", "png", type=click.Path(dir_okay=False, path_type=Path), help="Write one PNG (needs matplotlib)."
)
@json_option
def compare(
    settings_path: str | None,
    ring_path: Path | None,
    layouts: tuple[str, ...],
    nshards: int | None,
    nkeys: int | None,
    kind: str | None,
    seed: int,
    from_table: str | None,
    column: str | None,
    add: str | None,
    remove: str | None,
    png: Path | None,
    as_json: bool,
) -> None:
    """Lay two or more layouts side by side on the same keys: balance, movement, memory.

    Each --layout starts from the base shards (the settings' ring, --ring FILE or
    --shards N) and changes what it names: "vnodes=160", "buckets=4096",
    "vnodes=512,weights=s0:2,s1:1", "shards=8,buckets=4096", or a ring JSON file.
    Balance is peak/mean and the coefficient of variation of keys per shard (over
    the weights), exact (hash-space shares) and over the keys; movement is the
    share of keys that move on adding --add (weight 1) and on removing --remove,
    over the ideal (1/(n+1) on add, the removed shard's share on remove); memory is
    the ring's lookup arrays.
    """
    if nkeys is not None and from_table:
        raise click.UsageError("--keys is for synthetic keys; --from-table reads every key")
    if png is not None:
        from ._plot import require_matplotlib

        require_matplotlib("--png")
    settings: Settings | None = None
    if from_table is not None:
        if ring_path is not None:
            raise click.UsageError("--from-table reads the shards of the settings: drop --ring")
        settings = load(settings_path)
        base = settings.require_ring()
    elif nshards is not None and ring_path is None and settings_path is None:
        base = HashRing([f"s{i}" for i in range(nshards)])
    else:
        try:
            base, _ = _get_ring(settings_path, ring_path)
        except ConfigError as exc:
            raise CliError(f"{exc}; or give --shards N to compare layouts of the shards s0..sN-1") from None
    if nshards is not None:
        base = HashRing([f"s{i}" for i in range(nshards)], mode=base.mode, vnodes=base.vnodes, buckets=base.buckets)
    rings = [_parse_layout(spec, base) for spec in layouts]
    adds: list[tuple[str, HashRing, Fraction, Fraction]] = []
    removes: list[tuple[str, HashRing, Fraction, Fraction]] = []
    for spec, hr in zip(layouts, rings, strict=True):
        if not len(hr):
            raise CliError(f"--layout {spec!r}: no shards")
        alias = add or _new_alias(hr)
        if alias in hr:
            raise CliError(f"--add {alias!r}: already a shard of layout {spec!r}")
        adds.append((alias, *movement_on_add(hr, alias)))
        gone = remove or list(hr)[-1]
        if gone not in hr:
            raise not_in_ring(gone, hr)
        if len(hr) < 2:
            raise CliError(f"--layout {spec!r}: one shard, nothing to remove")
        removes.append((gone, *movement_on_remove(hr, gone)))

    counts: list[Counter[str]] = [Counter() for _ in rings]
    moved_add = [0] * len(rings)
    moved_remove = [0] * len(rings)
    total = 0

    def count(chunk: list[Any]) -> None:
        for i, hr in enumerate(rings):
            before = hr.get_many(chunk)
            counts[i].update(before)
            moved_add[i] += sum(a != b for a, b in zip(before, adds[i][1].get_many(chunk), strict=True))
            moved_remove[i] += sum(a != b for a, b in zip(before, removes[i][1].get_many(chunk), strict=True))

    if from_table is not None:
        assert settings is not None
        source = f"table {from_table}"
        for _, keys, _ in _scan_keys(settings, base, from_table, column, kind):
            for chunk in _chunks(iter(keys)):
                count(chunk)
                total += len(chunk)
    else:
        nkeys = nkeys or 100_000
        source = f"{nkeys} synthetic {kind or 'int'} keys"
        with progress(length=nkeys, label="hashing keys") as bar:
            for chunk in _chunks(_synthetic(kind or "int", nkeys, seed)):
                count(chunk)
                total += len(chunk)
                bar.update(len(chunk))

    def move(entry: tuple[str, HashRing, Fraction, Fraction], keys_moved: int) -> dict[str, Any]:
        alias, _, exact, ideal = entry
        fraction = keys_moved / total if total else None
        return {
            "alias": alias,
            "ideal": float(ideal),
            "exact": float(exact),
            "exact_ratio": float(exact / ideal) if ideal else None,
            "keys_moved": keys_moved,
            "keys_fraction": fraction,
            "keys_ratio": fraction / float(ideal) if fraction is not None and ideal else None,
        }

    out: list[dict[str, Any]] = []
    for i, (spec, hr) in enumerate(zip(layouts, rings, strict=True)):
        per_shard = {a: counts[i].get(a, 0) for a in hr}
        exact_pm, exact_cv = balance(exact_shares(hr), hr.weights)
        keys_pm, keys_cv = balance(per_shard, hr.weights)
        entry: dict[str, Any] = {"label": spec, "mode": hr.mode}
        entry["vnodes" if hr.mode == "ring" else "buckets"] = hr.vnodes if hr.mode == "ring" else hr.buckets
        entry.update(
            {
                "shards": len(hr),
                "weights": dict(hr.weights),
                "version": hr.version,
                "balance": {
                    "exact_peak_mean": exact_pm,
                    "exact_cv": exact_cv,
                    "keys_peak_mean": keys_pm,
                    "keys_cv": keys_cv,
                },
                "keys_per_shard": per_shard,
                "add": move(adds[i], moved_add[i]),
                "remove": move(removes[i], moved_remove[i]),
                "memory": memory(hr),
            }
        )
        out.append(entry)
    data: dict[str, Any] = {"source": source, "keys": total, "layouts": out}
    if png is not None:
        from ._plot import plot_compare

        plot_compare(data, png)
        data["png"] = str(png)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{total:,} keys from {source}; {len(out)} layouts")
    lw = max([6, *(len(e["label"]) for e in out)])
    click.echo(
        f"  {'layout':<{lw}}  {'entries':>8}  {'memory':>10}  {'exact p/m':>9}  {'exact cv':>8}  "
        f"{'keys p/m':>8}  {'keys cv':>7}  {'add/ideal':>9}  {'remove/ideal':>12}"
    )

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for e in out:
        b = e["balance"]
        click.echo(
            f"  {e['label']:<{lw}}  {e['memory']['entries']:>8,}  {_human_bytes(e['memory']['bytes']):>10}  "
            f"{b['exact_peak_mean']:>9.4f}  {b['exact_cv']:>8.4f}  {b['keys_peak_mean']:>8.4f}  "
            f"{b['keys_cv']:>7.4f}  {ratio(e['add']['keys_ratio']):>9}  {ratio(e['remove']['keys_ratio']):>12}"
        )
    first = out[0]
    click.echo(
        f"movement: add {first['add']['alias']} (ideal {_pct(first['add']['ideal'])}), "
        f"remove {first['remove']['alias']} (ideal {_pct(first['remove']['ideal'])}); ratios are keys moved / ideal"
    )
    if png is not None:
        click.echo(f"chart written to {png}")
