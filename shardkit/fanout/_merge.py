"""Merge per-shard row streams into the rows one database would return.

This module is pure Python: it knows nothing of SQLAlchemy, routers or
connections.  It is driven by a :class:`MergePlan` built by
:func:`shardkit.fanout.plan_select` and works on plain sequences (a
SQLAlchemy ``Row`` is one).

What it does, in order:

1. **row mode** (no GROUP BY, no aggregates): when the statement is ordered,
   a streaming k-way merge (:func:`heapq.merge`) over the shard streams, each
   already sorted by the shard; otherwise plain concatenation.  Memory stays
   flat: streams are consumed lazily.
2. **aggregate mode**: partial aggregates are re-aggregated per group key
   (COUNT -> sum of counts, SUM, MIN, MAX, AVG from SUM and COUNT, the
   DISTINCT aggregates from the set of distinct values), HAVING is applied in
   Python, and the merged groups are sorted in memory.
3. DISTINCT (first occurrence kept), then OFFSET and LIMIT, then the hidden
   columns are dropped.

Limits worth knowing
--------------------
* **Text ordering**: Python compares strings by code point; a database
  compares by its collation.  The merged order only equals the one-database
  order for a binary collation (PostgreSQL ``COLLATE "C"``, MySQL
  ``utf8mb4_bin``, SQLite's default ``BINARY``), or with a
  :attr:`SortKey.text_rule` reproducing SQLite's ``NOCASE``/``RTRIM``.  The
  session finds each shard's collation and refuses the others
  (:mod:`shardkit.fanout._collation`); this module merges as told.
* Equality of group keys and of DISTINCT values is Python equality
  (NaN never equals itself; ``'a'`` and ``'A'`` differ whatever the collation:
  the session refuses case-insensitive collations there).
* AVG over integers: PostgreSQL and MySQL return ``Decimal``, SQLite a
  ``float``; the merge follows ``dialect_name`` but the last digits of a
  ``Decimal`` quotient can differ from the server's (28 significant digits
  here).  Float sums may differ in the last bits (addition order).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shardkit.errors import FanoutError, UnsupportedQueryError

__all__ = [
    "MERGE_BATCH",
    "AggregatePlan",
    "AggregateSpec",
    "MergePlan",
    "PyExpr",
    "Reduce",
    "SortKey",
    "merge_batches",
    "merge_rows",
    "null_is_larger",
]

# Dialects whose NULL sorts as if larger than every value (NULLS LAST for ASC).
_NULL_LARGER = frozenset({"postgresql", "oracle", "cockroachdb", "redshift"})
# Dialects whose NULL sorts as if smaller than every value (NULLS FIRST for ASC).
_NULL_SMALLER = frozenset({"sqlite", "mysql", "mariadb", "mssql"})


def null_is_larger(dialect_name: str) -> bool:
    """Whether ``dialect_name`` sorts NULL after every value in ascending order.

    :param dialect_name: a SQLAlchemy dialect name (``"postgresql"``, ``"sqlite"`` ...).
    :raises UnsupportedQueryError: for a dialect whose default NULL order is unknown.
    """
    if dialect_name in _NULL_LARGER:
        return True
    if dialect_name in _NULL_SMALLER:
        return False
    raise UnsupportedQueryError(
        f"default NULL ordering of dialect {dialect_name!r} is unknown; "
        "use explicit .nulls_first() / .nulls_last() in ORDER BY",
        construct="NULL ordering of an unknown dialect",
    )


# --------------------------------------------------------------------------- plan data


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY item: where its value is, its direction and NULL placement.

    ``nulls_first`` is ``None`` when the statement did not say; the dialect's
    default then applies (see :func:`null_is_larger`).
    """

    position: int
    descending: bool = False
    nulls_first: bool | None = None
    label: str = ""
    attribute: str | None = None
    """Read the value as ``getattr(row[position], attribute)``: an ORDER BY column of an ORM
    entity already in the row, so the shards need not send it twice (a wider sort is slower)."""
    text_rule: str | None = None
    """How a text value compares: ``None`` by code point; ``"nocase"`` / ``"rtrim"`` as SQLite's
    collations of those names; ``"!<message>"``: under a collation the merge cannot reproduce,
    a text value raises :class:`~shardkit.errors.UnsupportedQueryError` with that message."""

    def resolved_nulls_first(self, dialect_name: str) -> bool:
        if self.nulls_first is not None:
            return self.nulls_first
        larger = null_is_larger(dialect_name)
        # NULL "larger": last when ascending, first when descending.
        return larger == self.descending

    def __str__(self) -> str:
        nulls = "" if self.nulls_first is None else (" NULLS FIRST" if self.nulls_first else " NULLS LAST")
        name = f" ({self.label})" if self.label else ""
        return f"#{self.position}{name} {'DESC' if self.descending else 'ASC'}{nulls}"


class PyExpr:
    """A tiny expression tree evaluated over a merged group.

    The record of a group is ``(group_keys, constants, aggregates)``, three
    tuples; :class:`Ref` points into one of them.
    """

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Ref(PyExpr):
    section: int  # 0 group keys, 1 constants, 2 aggregates
    index: int
    label: str = ""

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        return record[self.section][self.index]

    def __str__(self) -> str:
        return self.label or f"{'gca'[self.section]}{self.index}"


@dataclass(frozen=True)
class Const(PyExpr):
    value: Any

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        return self.value

    def __str__(self) -> str:
        return repr(self.value)


def _coerce_pair(a: Any, b: Any) -> tuple[Any, Any]:
    # SQL mixes numeric and double freely; Python refuses Decimal with float.
    if isinstance(a, Decimal) and isinstance(b, float):
        return float(a), b
    if isinstance(a, float) and isinstance(b, Decimal):
        return a, float(b)
    return a, b


def _div(a: Any, b: Any, dialect_name: str) -> Any:
    if b == 0:
        if dialect_name in ("sqlite", "mysql", "mariadb"):
            return None
        raise FanoutError("division by zero while merging a fan-out result", construct="division")
    if isinstance(a, int) and isinstance(b, int):
        # SQLAlchemy 2 renders int / int as true division (CAST ... AS NUMERIC / + 0.0).
        if dialect_name == "sqlite":
            return a / b
        return Decimal(a) / Decimal(b)
    if isinstance(a, float) or isinstance(b, float):
        return float(a) / float(b)
    return Decimal(a) / Decimal(b)


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}

_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b),
    ">": lambda a, b: bool(a > b),
    ">=": lambda a, b: bool(a >= b),
}


@dataclass(frozen=True)
class BinOp(PyExpr):
    op: str
    left: PyExpr
    right: PyExpr

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        a = self.left.evaluate(record, dialect_name)
        b = self.right.evaluate(record, dialect_name)
        if a is None or b is None:
            return None
        a, b = _coerce_pair(a, b)
        if self.op == "/":
            return _div(a, b, dialect_name)
        if self.op in _ARITH:
            return _ARITH[self.op](a, b)
        return _CMP[self.op](a, b)

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class Neg(PyExpr):
    operand: PyExpr

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        v = self.operand.evaluate(record, dialect_name)
        return None if v is None else -v

    def __str__(self) -> str:
        return f"-{self.operand}"


@dataclass(frozen=True)
class BoolOp(PyExpr):
    """AND / OR with SQL three-valued logic (None is UNKNOWN)."""

    op: str  # "AND" | "OR"
    operands: tuple[PyExpr, ...]

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        unknown = False
        decisive = self.op == "OR"  # OR is decided by a TRUE, AND by a FALSE
        for operand in self.operands:
            v = operand.evaluate(record, dialect_name)
            if v is None:
                unknown = True
            elif bool(v) is decisive:
                return decisive
        return None if unknown else not decisive

    def __str__(self) -> str:
        return "(" + f" {self.op} ".join(str(o) for o in self.operands) + ")"


@dataclass(frozen=True)
class Not(PyExpr):
    operand: PyExpr

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        v = self.operand.evaluate(record, dialect_name)
        return None if v is None else not v

    def __str__(self) -> str:
        return f"NOT {self.operand}"


@dataclass(frozen=True)
class IsNull(PyExpr):
    operand: PyExpr
    negate: bool = False

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        return (self.operand.evaluate(record, dialect_name) is None) != self.negate

    def __str__(self) -> str:
        return f"{self.operand} IS {'NOT ' if self.negate else ''}NULL"


@dataclass(frozen=True)
class InList(PyExpr):
    operand: PyExpr
    values: tuple[Any, ...]
    negate: bool = False

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        v = self.operand.evaluate(record, dialect_name)
        if v is None:
            return None
        if any(v == x for x in self.values if x is not None):
            return not self.negate
        if any(x is None for x in self.values):
            return None
        return self.negate

    def __str__(self) -> str:
        return f"{self.operand} {'NOT ' if self.negate else ''}IN {self.values!r}"


@dataclass(frozen=True)
class Coalesce(PyExpr):
    operands: tuple[PyExpr, ...]

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        for operand in self.operands:
            v = operand.evaluate(record, dialect_name)
            if v is not None:
                return v
        return None

    def __str__(self) -> str:
        return "coalesce(" + ", ".join(str(o) for o in self.operands) + ")"


@dataclass(frozen=True)
class ToFloat(PyExpr):
    operand: PyExpr

    def evaluate(self, record: tuple[Sequence[Any], ...], dialect_name: str) -> Any:
        v = self.operand.evaluate(record, dialect_name)
        return None if v is None else float(v)

    def __str__(self) -> str:
        return f"float({self.operand})"


AGGREGATE_KINDS = frozenset({"count", "sum", "min", "max", "avg", "count_distinct", "sum_distinct", "avg_distinct"})


@dataclass(frozen=True)
class AggregateSpec:
    """One aggregate of the original statement and where its partials are.

    ``kind`` is one of :data:`AGGREGATE_KINDS`.  ``positions`` index the shard
    row: one partial (``count``/``sum``/``min``/``max``: the shard's partial
    aggregate; ``*_distinct``: the raw distinct value), or two for ``avg``
    (the shard's SUM then its COUNT).
    """

    kind: str
    positions: tuple[int, ...]
    label: str = ""

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'#{p}' for p in self.positions)})" + (f" [{self.label}]" if self.label else "")


@dataclass(frozen=True)
class AggregatePlan:
    """How shard rows are re-aggregated into groups.

    :param group_positions: shard-row positions of the GROUP BY keys.
    :param constant_positions: shard-row positions of per-group constants
        (expressions of the group keys computed by the shard).
    :param aggregates: the aggregates, in record order.
    :param having: the HAVING condition over the record, or ``None``.
    :param outputs: expressions producing the post-aggregation row
        (the output columns, then the sort values).
    :param scalar: no GROUP BY: exactly one row even when no shard has rows.
    :param decimal_scales: per output column, the scale of a ``Numeric``
        (asdecimal) result type, or ``None``: a float computed by the merge is
        turned into a ``Decimal`` with that many places, as SQLAlchemy's result
        processor does for one database (SQLite returns floats).
    """

    group_positions: tuple[int, ...]
    constant_positions: tuple[int, ...]
    aggregates: tuple[AggregateSpec, ...]
    having: PyExpr | None
    outputs: tuple[PyExpr, ...]
    scalar: bool
    decimal_scales: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Reduce:
    """The merged rows folded into the one row of an outer ``count(*)`` or ``EXISTS``.

    ``kind``:

    * ``"sum"``: every shard row holds a count; the answer is their sum;
    * ``"count"``: the answer is the number of merged rows (groups, distinct rows);
    * ``"any"``: every shard row holds an ``EXISTS``; the answer is their OR;
    * ``"all"``: every shard row holds a ``NOT EXISTS``; the answer is their AND.

    A count is then cut as ``LIMIT``/``OFFSET`` would cut the rows it counts:
    ``max(0, min(limit, n - offset))``.
    """

    kind: str
    offset: int = 0
    limit: int | None = None

    def __str__(self) -> str:
        cut = ""
        if self.offset or self.limit is not None:
            cut = f" cut by OFFSET {self.offset} LIMIT {'ALL' if self.limit is None else self.limit}"
        what = {
            "sum": "sum of the shards' counts",
            "count": "count of the merged rows",
            "any": "OR of the shards' EXISTS",
            "all": "AND of the shards' NOT EXISTS",
        }[self.kind]
        return f"reduce to one row: {what}{cut}"


@dataclass(frozen=True)
class MergePlan:
    """Everything :func:`merge_rows` needs; no SQLAlchemy inside.

    :param row_width: the number of elements of a shard row (checked).
    :param output_positions: positions (in the shard row in row mode, in the
        post-aggregation row in aggregate mode) of the original columns.
    :param sort_keys: the ORDER BY, as positions in the same row.
    :param distinct: deduplicate output rows (first occurrence kept).
    :param offset: rows skipped after merging.
    :param limit: rows kept after the offset, or ``None``.
    :param aggregate: the re-aggregation, or ``None`` for row mode.
    :param reduce: fold the merged rows into one row (an outer ``count(*)`` or ``EXISTS``).
    """

    row_width: int
    output_positions: tuple[int, ...]
    sort_keys: tuple[SortKey, ...] = ()
    distinct: bool = False
    offset: int = 0
    limit: int | None = None
    aggregate: AggregatePlan | None = None
    notes: tuple[str, ...] = field(default=())
    reduce: Reduce | None = None

    @property
    def is_concat(self) -> bool:
        """True when merging is plain concatenation of the shard streams."""
        return (
            self.aggregate is None
            and self.reduce is None
            and not self.sort_keys
            and not self.distinct
            and self.offset == 0
            and self.limit is None
            and self.output_positions == tuple(range(self.row_width))
        )

    def describe(self) -> str:
        """A readable, multi-line rendering of the plan."""
        if self.is_concat:
            return "merge: concatenate the shard streams"
        lines = [f"shard row width: {self.row_width}"]
        agg = self.aggregate
        if agg is not None:
            lines.append(
                "re-aggregate"
                + (" (scalar: one row)" if agg.scalar else "")
                + f" by group keys at {list(agg.group_positions)}"
            )
            if agg.constant_positions:
                lines.append(f"  per-group constants at {list(agg.constant_positions)}")
            for i, spec in enumerate(agg.aggregates):
                lines.append(f"  a{i} = {spec}")
            if agg.having is not None:
                lines.append(f"  HAVING {agg.having}")
            lines.append("  row = (" + ", ".join(str(o) for o in agg.outputs) + ")")
            if self.sort_keys:
                lines.append("sort in memory by " + ", ".join(str(k) for k in self.sort_keys))
        elif self.sort_keys:
            lines.append("k-way ordered merge by " + ", ".join(str(k) for k in self.sort_keys))
        else:
            lines.append("concatenate the shard streams")
        if self.distinct:
            lines.append("DISTINCT over the output columns")
        if self.offset or self.limit is not None:
            lines.append(f"OFFSET {self.offset} LIMIT {'ALL' if self.limit is None else self.limit}")
        lines.append(f"output positions {list(self.output_positions)}")
        if self.reduce is not None:
            lines.append(str(self.reduce))
        lines.extend(self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- sorting


class _Desc:
    """Wraps a value so that it sorts in reverse."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.v < self.v)

    def __gt__(self, other: _Desc) -> bool:
        return bool(other.v > self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and bool(self.v == other.v)

    def __hash__(self) -> int:  # pragma: no cover - never hashed, present for the protocol
        return hash(self.v)


_NEGATABLE = (int, float, Decimal)


def _sort_key_function(sort_keys: Sequence[SortKey], dialect_name: str) -> Callable[[Sequence[Any]], Any]:
    """A flat key tuple per row: (null rank, value) per ORDER BY item.

    Descending numbers are negated (compared natively; ``bool`` is an ``int``); other
    descending values are wrapped in :class:`_Desc`.  A NULL ranks 0 (first) or 2 (last)
    and carries ``None``, which is only ever compared with another NULL's ``None``.
    """
    if any(k.text_rule is not None for k in sort_keys):
        return _folding_key_function(sort_keys, dialect_name)
    spec = [(k.position, k.attribute, k.descending, k.resolved_nulls_first(dialect_name)) for k in sort_keys]

    def key(row: Sequence[Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        append = parts.append
        for position, attribute, descending, nulls_first in spec:
            v = row[position] if attribute is None else getattr(row[position], attribute)
            if v is None:
                append(0 if nulls_first else 2)
                append(None)
            elif descending:
                append(1)
                append(-v if isinstance(v, _NEGATABLE) else _Desc(v))
            else:
                append(1)
                append(v)
        return tuple(parts)

    return key


def _text_fold(rule: str | None) -> Callable[[str], Any] | None:
    if rule is None:
        return None
    if rule.startswith("!"):
        message = rule[1:]

        def refuse(value: str) -> Any:
            raise UnsupportedQueryError(f"cannot run across shards: {message}", construct="text collation")

        return refuse
    if rule == "nocase":
        table = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
        return lambda value: value.translate(table)
    if rule == "rtrim":
        return lambda value: value.rstrip(" ")
    raise ValueError(f"unknown text rule {rule!r}")


def _folding_key_function(sort_keys: Sequence[SortKey], dialect_name: str) -> Callable[[Sequence[Any]], Any]:
    """:func:`_sort_key_function` with a text value first passed through its key's rule."""
    spec = [
        (k.position, k.attribute, k.descending, k.resolved_nulls_first(dialect_name), _text_fold(k.text_rule))
        for k in sort_keys
    ]

    def key(row: Sequence[Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        append = parts.append
        for position, attribute, descending, nulls_first, fold in spec:
            v = row[position] if attribute is None else getattr(row[position], attribute)
            if v is None:
                append(0 if nulls_first else 2)
                append(None)
                continue
            if fold is not None and isinstance(v, str):
                v = fold(v)
            append(1)
            if descending:
                append(-v if isinstance(v, _NEGATABLE) else _Desc(v))
            else:
                append(v)
        return tuple(parts)

    return key


# --------------------------------------------------------------------------- aggregation


def _avg(total: Any, count: int, dialect_name: str) -> Any:
    if not count or total is None:
        return None
    if isinstance(total, float):
        return total / count
    if dialect_name == "sqlite":
        return float(total) / count
    return Decimal(total) / Decimal(count)


def _aggregate(
    agg: AggregatePlan,
    streams: Sequence[Iterable[Sequence[Any]]],
    width: int,
    dialect_name: str,
) -> Iterator[tuple[Any, ...]]:
    specs = agg.aggregates
    kinds = [s.kind for s in specs]
    groups: dict[tuple[Any, ...], tuple[tuple[Any, ...], list[Any]]] = {}
    gpos = agg.group_positions
    cpos = agg.constant_positions

    def fresh() -> list[Any]:
        state: list[Any] = []
        for kind in kinds:
            if kind == "count":
                state.append(0)
            elif kind == "avg":
                state.append([None, 0])
            elif kind.endswith("_distinct"):
                state.append(set())
            else:
                state.append(None)
        return state

    for row in _checked(streams, width):
        key = tuple(row[p] for p in gpos)
        entry = groups.get(key)
        if entry is None:
            entry = groups[key] = (tuple(row[p] for p in cpos), fresh())
        state = entry[1]
        for i, spec in enumerate(specs):
            kind = kinds[i]
            v = row[spec.positions[0]]
            if kind == "count":
                state[i] += v or 0
            elif kind == "avg":
                s = state[i]
                if v is not None:
                    s[0] = v if s[0] is None else s[0] + v
                s[1] += row[spec.positions[1]] or 0
            elif v is None:
                continue
            elif kind.endswith("_distinct"):
                state[i].add(v)
            elif state[i] is None:
                state[i] = v
            elif kind == "sum":
                a, b = _coerce_pair(state[i], v)
                state[i] = a + b
            elif kind == "min":
                if v < state[i]:
                    state[i] = v
            elif v > state[i]:  # max
                state[i] = v

    if not groups and agg.scalar:
        groups[()] = ((), fresh())

    having = agg.having
    outputs = agg.outputs
    scales = agg.decimal_scales
    for key, (constants, state) in groups.items():
        finals: list[Any] = []
        for i, kind in enumerate(kinds):
            s = state[i]
            if kind == "avg":
                finals.append(_avg(s[0], s[1], dialect_name))
            elif kind == "count_distinct":
                finals.append(len(s))
            elif kind == "sum_distinct":
                finals.append(sum(s) if s else None)
            elif kind == "avg_distinct":
                finals.append(_avg(sum(s), len(s), dialect_name) if s else None)
            else:
                finals.append(s)
        record = (key, constants, tuple(finals))
        if having is not None and having.evaluate(record, dialect_name) is not True:
            continue
        values = [o.evaluate(record, dialect_name) for o in outputs]
        for i, scale in enumerate(scales):
            if scale is not None and isinstance(values[i], float):
                values[i] = Decimal(f"%.{scale}f" % values[i])
        yield tuple(values)


def _checked(streams: Sequence[Iterable[Sequence[Any]]], width: int) -> Iterator[Sequence[Any]]:
    for stream in streams:
        yield from _checked_one(stream, width)


def _checked_one(stream: Iterable[Sequence[Any]], width: int) -> Iterator[Sequence[Any]]:
    it = iter(stream)
    for row in it:
        if len(row) != width:
            raise FanoutError(
                f"a shard row has {len(row)} elements, the merge plan expects {width}; "
                "execute ORM statements through a Session (an entity is one element) "
                "and Core statements through a Connection",
                construct="row width",
            )
        yield row
        yield from it
        return


# --------------------------------------------------------------------------- ordered merge


#: Rows a shard stream is read in by the ordered merge at most (its batches start smaller
#: when the plan needs only a few rows, and double up to this).
MERGE_BATCH = 1000
_NUMBERS = frozenset({int, float, Decimal, bool})


class _BatchKeys:
    """The sort keys of a batch of rows, computed a batch at a time.

    The fast form is computed by C-level getters: the value itself (one ORDER BY item) or
    a tuple of the values, descending numbers negated.  It holds a NULL as ``None``, which
    only compares with another ``None``: a comparison of a NULL with a value raises
    ``TypeError``, and that is exactly when the NULL's placement matters.  Then (or at a
    descending non-number) the merge goes over to the general form of
    :func:`_sort_key_function` (:meth:`go_slow`; the keys in hand are computed again).  Both
    forms order rows alike; they are never compared with each other.
    """

    def __init__(self, sort_keys: Sequence[SortKey], dialect_name: str) -> None:
        self._slow = _sort_key_function(sort_keys, dialect_name)
        self.fast = all(k.text_rule is None for k in sort_keys)
        self.switched = False
        self._whole: Callable[[list[Any]], list[Any]] | None = None
        positions = {k.position for k in sort_keys}
        attributes = [k.attribute for k in sort_keys]
        if not any(k.descending for k in sort_keys):
            if all(a is None for a in attributes):  # columns of the row: one getter, in C
                row_getter = operator.itemgetter(*(k.position for k in sort_keys))
                self._whole = lambda rows: list(map(row_getter, rows))
            elif len(positions) == 1 and all(a is not None for a in attributes):  # one entity's attributes
                entity = operator.itemgetter(next(iter(positions)))
                attrs = operator.attrgetter(*(a for a in attributes if a is not None))
                self._whole = lambda rows: list(map(attrs, map(entity, rows)))
        self._columns: list[tuple[Callable[[list[Any]], list[Any]], bool]] = [
            (_column_getter(k.position, k.attribute), k.descending) for k in sort_keys
        ]

    def go_slow(self) -> None:
        """From now on the general form (a NULL met a value, or a descending non-number)."""
        self.fast = False

    def __call__(self, rows: list[Any]) -> list[Any]:
        """The keys of ``rows``; may switch to the general form (then ``switched`` is True)."""
        self.switched = False
        if self.fast:
            keys = self._whole(rows) if self._whole is not None else self._fast(rows)
            if keys is not None:
                return keys
            self.fast = False
            self.switched = True
        return list(map(self._slow, rows))

    def _fast(self, rows: list[Any]) -> list[Any] | None:
        columns = []
        for values_of, descending in self._columns:
            values = values_of(rows)
            if descending:
                if not set(map(type, values)) <= _NUMBERS:  # NULL (NoneType) included
                    return None
                values = list(map(operator.neg, values))
            columns.append(values)
        if len(columns) == 1:
            return columns[0]
        return list(zip(*columns, strict=True))


def _column_getter(position: int, attribute: str | None) -> Callable[[list[Any]], list[Any]]:
    """The values of one ORDER BY item in a list of rows (C-level getters)."""
    item = operator.itemgetter(position)
    if attribute is None:
        return lambda rows: list(map(item, rows))
    attr = operator.attrgetter(attribute)
    return lambda rows: list(map(attr, map(item, rows)))


class _Source:
    """One shard stream in the ordered merge: its current batch, its keys, where it is."""

    __slots__ = ("cap", "fetch", "keys", "rows", "size", "start")

    def __init__(self, fetch: Callable[[int], list[Any]], size: int, cap: int) -> None:
        self.fetch = fetch
        self.size = size  # rows of the next fetch: doubles up to ``cap``
        self.cap = cap
        self.rows: list[Any] = []
        self.keys: list[Any] = []
        self.start = 0


def _fetcher(stream: Iterable[Sequence[Any]]) -> Callable[[int], list[tuple[Any, ...]]]:
    """``fetch(n)``: the next at most ``n`` rows of ``stream`` as a list of tuples (empty at
    its end); a SQLAlchemy ``Result`` is read with ``fetchmany`` (one call per batch).  Rows
    become plain tuples once, here: keys and output columns are then read from tuples."""
    fetchmany = getattr(stream, "fetchmany", None)
    if callable(fetchmany):
        return lambda n: list(map(tuple, fetchmany(n)))
    it = iter(stream)
    return lambda n: list(map(tuple, itertools.islice(it, n)))


def _ordered_merge(
    streams: Sequence[Iterable[Sequence[Any]]],
    sort_keys: Sequence[SortKey],
    dialect_name: str,
    width: int,
    first_batch: int,
    batch: int,
) -> Iterator[list[Any]]:
    """A stable k-way merge of sorted streams (ties: the lower stream index first), a batch
    at a time: the keys of a batch are computed at once, and every round emits, sorted by
    one C-level ``sorted``, all the rows that can no longer be preceded by an unread row.

    With ``bound`` the smallest last key of the current batches (every unread row is at
    least ``bound``) and ``j`` the first stream whose batch ends at ``bound``: the streams
    up to ``j`` emit their rows ``<= bound``, the others their rows ``< bound``.  Stream
    ``j`` empties its batch, so every round makes progress.

    When the merge ends -- every row read, or the caller stopped (a LIMIT reached, the result
    closed) -- each stream with a ``close()`` is closed: a streamed shard's server-side cursor
    is released at once.
    """
    try:
        yield from _ordered_runs(streams, sort_keys, dialect_name, width, first_batch, batch)
    finally:
        for stream in streams:
            close = getattr(stream, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()


def _ordered_runs(
    streams: Sequence[Iterable[Sequence[Any]]],
    sort_keys: Sequence[SortKey],
    dialect_name: str,
    width: int,
    first_batch: int,
    batch: int,
) -> Iterator[list[Any]]:
    """The merged rows, as lists (one per round of :func:`_ordered_merge`)."""
    keyer = _BatchKeys(sort_keys, dialect_name)
    live: list[_Source] = []
    for stream in streams:
        source = _Source(_fetcher(stream), first_batch, batch)
        if _refill(source, keyer, live, width):
            live.append(source)
    while live:
        if len(live) == 1:
            source = live[0]
            while True:
                yield source.rows[source.start :] if source.start else source.rows
                source.rows, source.start = source.fetch(source.size), 0
                source.size = min(source.cap, source.size * 2)
                if not source.rows:
                    return
        try:
            run = _next_run(live)
        except TypeError:
            if not keyer.fast:
                raise  # values of types that do not compare (as on one database: an error)
            keyer.go_slow()  # a NULL met a value: the general keys, for the batches in hand
            for source in live:
                source.keys = keyer(source.rows)
            continue
        if run:
            yield run
        emptied = [source for source in live if source.start >= len(source.rows)]
        for source in emptied:
            if not _refill(source, keyer, live, width):
                live.remove(source)


def _next_run(live: list[_Source]) -> list[Any]:
    """One round of :func:`_ordered_merge`: the rows no unread row can precede, in order.
    Nothing changes before every comparison has been made (a ``TypeError`` leaves the
    sources as they were)."""
    bound = min(source.keys[-1] for source in live)
    ends: list[int] = []
    through = True  # up to the first stream whose batch ends at the bound: rows <= bound
    for source in live:
        if through:
            ends.append(bisect.bisect_right(source.keys, bound, source.start))
            if not bound < source.keys[-1]:  # this batch ends at the bound
                through = False
        else:
            ends.append(bisect.bisect_left(source.keys, bound, source.start))
    taking = [(source, end) for source, end in zip(live, ends, strict=True) if end > source.start]
    if len(taking) == 1:
        source, end = taking[0]
        rows = source.rows[source.start : end]
    else:
        rows, keys = [], []
        for source, end in taking:
            rows.extend(source.rows[source.start : end])
            keys.extend(source.keys[source.start : end])
        rows = list(map(rows.__getitem__, sorted(range(len(keys)), key=keys.__getitem__)))
    for source, end in taking:
        source.start = end
    return rows


def _refill(source: _Source, keyer: _BatchKeys, live: list[_Source], width: int) -> bool:
    rows = source.fetch(source.size)
    source.size = min(source.cap, source.size * 2)
    if not rows:
        source.rows, source.keys, source.start = [], [], 0
        return False
    _check_width(rows[0], width)
    source.rows, source.start = rows, 0
    source.keys = keyer(rows)
    if keyer.switched:  # a NULL (or a descending non-number): every batch in the general form
        for other in live:
            if other is not source and other.rows:
                other.keys = keyer(other.rows)
    return True


def _check_width(row: Sequence[Any], width: int) -> None:
    if len(row) != width:
        raise FanoutError(
            f"a shard row has {len(row)} elements, the merge plan expects {width}; "
            "execute ORM statements through a Session (an entity is one element) "
            "and Core statements through a Connection",
            construct="row width",
        )


# --------------------------------------------------------------------------- entry point


def merge_rows(
    plan: MergePlan,
    streams: Sequence[Iterable[Sequence[Any]]],
    *,
    dialect_name: str,
    batch: int | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Merge the shard row streams into the rows of the original statement.

    :param plan: the merge plan (``FanoutPlan.merge``).
    :param streams: one iterable of rows per shard, each in the order its
        shard returned them; in a fixed order (ties are broken by stream index).
    :param dialect_name: the dialect of the shards (NULL ordering, AVG type).
    :param batch: rows an ordered merge reads from a stream at a time, at most
        (default :data:`MERGE_BATCH`; a ``yield_per``, so a stream's batch is one fetch).
    :returns: an iterator of tuples holding only the original columns.

    Example::

        rows = merge_rows(plan.merge, [conn_a.execute(s), conn_b.execute(s)],
                          dialect_name="postgresql")
    """
    if plan.aggregate is None:
        rows = itertools.chain.from_iterable(merge_batches(plan, streams, dialect_name=dialect_name, batch=batch))
        return rows if plan.reduce is None else _reduced(plan.reduce, rows)
    width = plan.row_width
    grouped: Iterator[Sequence[Any]] = _aggregate(plan.aggregate, streams, width, dialect_name)
    if plan.sort_keys:
        grouped = iter(sorted(grouped, key=_sort_key_function(plan.sort_keys, dialect_name)))
    out = plan.output_positions
    projected: Iterator[tuple[Any, ...]] = (tuple(r[p] for p in out) for r in grouped)
    if plan.distinct:
        projected = _dedupe(projected)
    if plan.offset or plan.limit is not None:
        stop = None if plan.limit is None else plan.offset + plan.limit
        projected = itertools.islice(projected, plan.offset, stop)
    if plan.reduce is not None:
        return _reduced(plan.reduce, projected)
    return projected


def merge_batches(
    plan: MergePlan,
    streams: Sequence[Iterable[Sequence[Any]]],
    *,
    dialect_name: str,
    batch: int | None = None,
) -> Iterator[list[tuple[Any, ...]]]:
    """:func:`merge_rows` of a plan without aggregates (and without its ``reduce``), as lists
    of rows: what a result reads with ``itertools.chain`` (no Python step per row).

    :param batch: as for :func:`merge_rows`; also the size of an unordered stream's lists.
    """
    if plan.aggregate is not None:
        raise FanoutError("merge_batches() merges rows; re-aggregate with merge_rows()", construct="merge")
    width = plan.row_width
    size = max(1, batch or MERGE_BATCH)
    runs: Iterator[list[Any]]
    if plan.sort_keys:
        first = size
        if plan.limit is not None and not plan.distinct and streams:
            # only offset+limit rows are kept: each shard is read in batches of its share of
            # them (a LIMIT 100 over 4 shards reads 25 rows of each, then 25 more where needed)
            first = size = max(1, min(size, -(-(plan.offset + plan.limit) // len(streams))))
        runs = _ordered_merge(streams, plan.sort_keys, dialect_name, width, first, size)
    else:
        runs = _concatenated(streams, width, size)
    project = _projector(plan.output_positions, width)
    seen: set[tuple[Any, ...]] | None = set() if plan.distinct else None
    skip = plan.offset
    left = plan.limit
    if left is not None and left <= 0:
        return
    for run in runs:
        out = project(run)
        if seen is not None:
            out = [row for row in out if not (row in seen or seen.add(row))]  # type: ignore[func-returns-value]
        if skip:
            if skip >= len(out):
                skip -= len(out)
                continue
            out = out[skip:]
            skip = 0
        if left is not None:
            if len(out) >= left:
                yield out[:left]
                return
            left -= len(out)
        if out:
            yield out


def _projector(out: tuple[int, ...], width: int) -> Callable[[list[Any]], list[tuple[Any, ...]]]:
    """The output columns of a list of shard rows (tuples, see :func:`_fetcher`)."""
    if out == tuple(range(width)):
        return lambda rows: rows
    if len(out) == 1:
        get = operator.itemgetter(out[0])
        return lambda rows: list(zip(map(get, rows)))
    if not out:
        return lambda rows: [() for _ in rows]
    many = operator.itemgetter(*out)
    return lambda rows: list(map(many, rows))


def _concatenated(streams: Sequence[Iterable[Sequence[Any]]], width: int, size: int) -> Iterator[list[Any]]:
    """Every stream after the other, in lists of at most ``size`` rows."""
    for stream in streams:
        fetch = _fetcher(stream)
        first = True
        while True:
            rows = fetch(size)
            if not rows:
                break
            if first:
                _check_width(rows[0], width)
                first = False
            yield rows


def _reduced(reduce: Reduce, rows: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    kind = reduce.kind
    if kind == "any":
        yield (any(bool(r[0]) for r in rows),)
        return
    if kind == "all":
        yield (all(bool(r[0]) for r in rows),)
        return
    n = sum(int(r[0] or 0) for r in rows) if kind == "sum" else sum(1 for _ in rows)
    n = max(0, n - reduce.offset)
    if reduce.limit is not None:
        n = min(n, reduce.limit)
    yield (n,)


def _dedupe(rows: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        if row not in seen:
            seen.add(row)
            yield row
