"""Text ordering of a fan-out merge: which collation each shard sorts (and groups) text by.

The k-way merge compares strings in Python, by code point.  That equals the database's
order only under a binary collation, so before shard streams are merged by a text key, the
effective collation of that key is found on every shard:

1. an explicit ``COLLATE`` in the statement (``User.name.collate("C")``);
2. else the collation of the expression's type (``String(collation="NOCASE")``);
3. else, for the columns in the expression, their collation in the database (PostgreSQL
   ``pg_attribute``, MySQL/MariaDB ``information_schema.columns``: a table can have its own
   default), or the database's default collation (PostgreSQL ``pg_database``); SQLite
   compares by ``BINARY`` unless the column's type says otherwise.

Database facts are read once per engine (per table and column) and cached for the life of
the process, through the DBAPI cursor of the connection the shard's statement runs on (so no
SQLAlchemy event sees them).  A key whose collation is binary everywhere merges as before; a
SQLite ``NOCASE``/``RTRIM`` key merges with the matching Python key; anything else is refused
with :class:`~shardkit.errors.UnsupportedQueryError`, never merged wrongly.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.sql import elements, operators, sqltypes, visitors
from sqlalchemy.sql.selectable import TableClause

from shardkit.errors import UnsupportedQueryError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["TextKey", "effective", "lookups", "text_keys"]

#: PostgreSQL collations that order by code point (lowercased).
PG_BINARY = frozenset({"c", "posix", "c.utf-8", "c.utf8", "ucs_basic", "pg_c_utf8"})

#: Merge rules: code point order, SQLite's NOCASE (ASCII folded) and RTRIM (trailing spaces).
BINARY, NOCASE, RTRIM = "binary", "nocase", "rtrim"

_ENUM_ORDER = "(ENUM declaration order)"


@dataclass(frozen=True)
class TextKey:
    """One expression of the merge that compares text.

    :param role: ``"order"`` (an ORDER BY key, ``index`` into the sort keys), ``"minmax"``
        (MIN/MAX argument) or ``"equal"`` (GROUP BY key, DISTINCT column).
    :param certain: the expression's type is a string type (else it only involves a string
        column, as ``func.lower(name)`` of no declared type: checked on the values).
    :param explicit: an explicit COLLATE, or the collation of the expression's type.
    :param columns: the table columns in the expression, whose database collation applies.
    :param enum: a native ENUM: PostgreSQL and MySQL order it by declaration, not as text.
    """

    role: str
    index: int
    label: str
    certain: bool
    explicit: str | None
    columns: tuple[Any, ...]
    enum: bool = False


def _is_text_type(t: Any) -> bool:
    return isinstance(t, sqltypes.String)


def text_keys(exprs: Iterable[tuple[str, int, Any, str]]) -> tuple[TextKey, ...]:
    """The text-comparing keys among ``(role, index, expression, label)``: cheap, no database."""
    out: list[TextKey] = []
    for role, index, expr, label in exprs:
        t = getattr(expr, "type", None)
        certain = _is_text_type(t)
        if not certain and not isinstance(t, sqltypes.NullType):
            continue  # a number, a date...: no collation
        explicit: str | None = None
        columns: list[Any] = []
        for el in visitors.iterate(expr):
            if isinstance(el, elements.BinaryExpression) and el.operator is operators.collate:
                explicit = str(el.right.collation)
                break
            if isinstance(el, elements.ColumnClause) and _is_text_type(el.type):
                if isinstance(getattr(el, "table", None), TableClause):
                    columns.append(el)
                else:  # a column of a subquery or an alias: the table columns under it
                    base = [b for b in el.base_columns if isinstance(getattr(b, "table", None), TableClause)]
                    columns.extend(base or [el])
        if explicit is None and certain:
            explicit = getattr(t, "collation", None)
        if explicit is None and not certain and not columns:
            continue  # no string inside
        if explicit is None:
            col_collations = {c.type.collation for c in columns if c.type.collation}
            if len(col_collations) == 1 and len(columns) == 1:
                explicit = col_collations.pop()
        enum = isinstance(t, sqltypes.Enum) and bool(t.native_enum)
        if not label:
            from shardkit.fanout._plan import _short

            label = _short(expr)
        out.append(TextKey(role, index, label, certain, explicit, tuple(columns), enum))
    return tuple(out)


# --------------------------------------------------------------------------- database facts

_FACTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], str | None]] = weakref.WeakKeyDictionary()


def _facts(engine: Engine) -> dict[tuple[str, ...], str | None]:
    try:
        return _FACTS[engine.pool]
    except KeyError:
        return _FACTS.setdefault(engine.pool, {})


def _column_key(engine: Engine, column: Any) -> tuple[str, ...] | None:
    table = getattr(column, "table", None)
    name = getattr(table, "name", None)
    if not isinstance(name, str) or getattr(column, "is_literal", False):
        return None
    schema = getattr(table, "schema", None)
    translate = engine.get_execution_options().get("schema_translate_map") or {}
    schema = translate.get(schema, schema)
    return ("column", schema or "", name, str(column.name))


def _needed(engine: Engine, dialect: str, keys: Sequence[TextKey]) -> list[tuple[str, ...]]:
    if dialect not in ("postgresql", "mysql", "mariadb"):
        return []
    out: list[tuple[str, ...]] = []
    for key in keys:
        if key.explicit is not None and key.explicit.lower() != "default":
            continue
        for column in key.columns:
            ck = _column_key(engine, column)
            if ck is not None:
                out.append(ck)
        if not (dialect == "postgresql" and key.role == "equal"):  # a database's default is deterministic
            out.append(("database",))
    if dialect == "postgresql":  # is equality byte equality? (CREATE COLLATION ... deterministic = false)
        explicit = {k.explicit for k in keys if k.role == "equal" and k.explicit and k.explicit.lower() != "default"}
        out.extend(("deterministic", name) for name in sorted(explicit))
    return out


def lookups(engine: Engine, keys: Sequence[TextKey]) -> Callable[[Connection], None] | None:
    """What to read on ``engine``'s connection before its statement runs, or ``None`` when
    everything is known (the usual case after the first fan-out)."""
    if not keys:
        return None
    facts = _facts(engine)
    missing = [k for k in dict.fromkeys(_needed(engine, engine.dialect.name, keys)) if k not in facts]
    if not missing:
        return None

    def read(conn: Connection) -> None:
        cursor = conn.connection.cursor()
        if conn.dialect.paramstyle == "numeric_dollar":  # asyncpg: $1, not %s
            from ._aio import DollarCursor

            cursor = DollarCursor(cursor)
        try:
            for fact in missing:
                facts[fact] = _read_fact(cursor, conn.dialect.name, fact, facts)
        finally:
            cursor.close()

    return read


def _read_fact(
    cursor: Any, dialect: str, fact: tuple[str, ...], facts: dict[tuple[str, ...], str | None]
) -> str | None:
    """Read one fact; a PostgreSQL column's collation also records whether it is deterministic."""
    if dialect == "postgresql":
        if fact[0] == "database":
            cursor.execute("SELECT row_to_json(d)::text FROM pg_database d WHERE datname = current_database()")
            row = json.loads(cursor.fetchone()[0])
            provider = row.get("datlocprovider", "c")
            if provider == "i":
                return "icu:" + str(row.get("daticulocale") or row.get("datlocale") or "")
            if provider == "b":
                return str(row.get("datlocale") or "")
            return str(row.get("datcollate") or "")
        if fact[0] == "deterministic":
            cursor.execute(
                "SELECT bool_and(coalesce((to_jsonb(co) ->> 'collisdeterministic')::boolean, true)) "
                "FROM pg_collation co WHERE collname = %s",
                (fact[1],),
            )
            found = cursor.fetchone()
            return "f" if found is not None and found[0] is False else "t"
        _, schema, table, column = fact
        rel = ('"' + schema.replace('"', '""') + '".' if schema else "") + '"' + table.replace('"', '""') + '"'
        cursor.execute(
            "SELECT co.collname, to_jsonb(co) ->> 'collisdeterministic' FROM pg_attribute a "
            "JOIN pg_collation co ON co.oid = a.attcollation WHERE a.attrelid = to_regclass(%s) AND a.attname = %s",
            (rel, column),
        )
        found = cursor.fetchone()
        if found is None or found[0] == "default":
            return None
        facts[("deterministic", str(found[0]))] = "f" if found[1] == "false" else "t"
        return str(found[0])
    if fact[0] == "database":
        cursor.execute("SELECT @@collation_database")
        return str(cursor.fetchone()[0])
    _, schema, table, column = fact
    cursor.execute(
        "SELECT collation_name FROM information_schema.columns "
        "WHERE table_schema = COALESCE(NULLIF(%s, ''), DATABASE()) AND table_name = %s AND column_name = %s",
        (schema, table, column),
    )
    found = cursor.fetchone()
    return None if found is None else ("" if found[0] is None else str(found[0]))


# --------------------------------------------------------------------------- the decision


def _rule(dialect: str, name: str) -> str | None:
    """The merge rule of collation ``name`` on ``dialect``, or ``None`` when Python cannot
    reproduce it."""
    low = name.lower()
    if dialect == "sqlite":
        return {"binary": BINARY, "nocase": NOCASE, "rtrim": RTRIM}.get(low)
    if dialect == "postgresql":
        return BINARY if low in PG_BINARY else None
    if dialect in ("mysql", "mariadb"):
        return BINARY if low == "binary" or low.endswith("_bin") else None
    return None


def _collations(engine: Engine, dialect: str, key: TextKey) -> list[str]:
    """The collations ``key`` is compared by on ``engine`` (none: no text after all)."""
    if key.enum and key.role != "equal" and dialect in ("postgresql", "mysql", "mariadb"):
        return [_ENUM_ORDER]
    if key.explicit is not None and key.explicit.lower() != "default":
        return [key.explicit]
    if dialect == "sqlite":
        return ["BINARY"]
    facts = _facts(engine)
    database = str(facts.get(("database",)) or "")
    if not key.columns:
        return [database]
    out: list[str] = []
    for column in key.columns:
        ck = _column_key(engine, column)
        found = facts.get(ck) if ck is not None else None
        if found == "":  # MySQL: not a text column in the database
            continue
        out.append(found or database)
    return out


def effective(keys: Sequence[TextKey], engines: dict[str, Engine]) -> dict[int, str]:
    """The Python rule of each ORDER BY key that is not plain code point order, by sort index:
    a fold name (:data:`FOLDS`) or ``"!<why>"`` (refuse a text value at merge time).

    :raises UnsupportedQueryError: a key compared by a collation the merge cannot reproduce.
    """
    rules: dict[int, str] = {}
    for key in keys:
        found: list[tuple[str, str, str | None]] = []  # (alias, collation, rule)
        for alias, engine in engines.items():
            dialect = engine.dialect.name
            found.extend((alias, name, _rule(dialect, name)) for name in _collations(engine, dialect, key))
        rule_set = {rule for _, _, rule in found}
        if not found or rule_set == {BINARY}:
            continue
        if key.role == "order" and len(rule_set) == 1 and None not in rule_set:
            rules[key.index] = str(next(iter(rule_set)))  # SQLite NOCASE / RTRIM on every shard
            continue
        if key.role == "equal" and all(
            rule == BINARY
            or (
                engines[alias].dialect.name == "postgresql"
                and _facts(engines[alias]).get(("deterministic", name)) != "f"
            )
            for alias, name, rule in found
        ):
            continue  # a deterministic PostgreSQL collation: equal means byte-equal
        on: dict[str, list[str]] = {}
        for alias, name, _ in found:
            on.setdefault(name or "(unknown)", []).append(alias)
        names = ", ".join(f"{name!r} (on {', '.join(dict.fromkeys(aliases))})" for name, aliases in on.items())
        what = {"order": "ORDER BY", "minmax": "MIN/MAX of", "equal": "GROUP BY / DISTINCT on"}[key.role]
        why = f"{what} {key.label} compares text by collation {names}, which the merge (by code point) cannot reproduce"
        advice = (
            'use a binary collation on every shard: .collate("C") on PostgreSQL, a *_bin collation '
            "on MySQL/MariaDB; or sort in Python after reading"
        )
        if any(name == _ENUM_ORDER for _, name, _ in found):
            why = f"{what} {key.label}, a native ENUM ordered by its declaration on {', '.join(on[_ENUM_ORDER])}"
            advice = "order by cast(column, String) to sort by name, or sort in Python after reading"
        if key.role == "order" and not key.certain:
            rules[key.index] = f"!{why}; {advice}"
            continue
        raise UnsupportedQueryError(f"cannot run across shards: {why}; {advice}", construct="text collation")
    return rules
