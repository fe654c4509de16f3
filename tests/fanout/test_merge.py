"""merge_rows on hand-made rows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from shardkit.errors import FanoutError, UnsupportedQueryError
from shardkit.fanout import MergePlan, SortKey, merge_rows
from shardkit.fanout._merge import AggregatePlan, AggregateSpec, BinOp, Const, Ref


def test_concat() -> None:
    plan = MergePlan(row_width=1, output_positions=(0,))
    assert list(merge_rows(plan, [[(1,)], [], [(2,), (3,)]], dialect_name="sqlite")) == [(1,), (2,), (3,)]


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [("postgresql", [1, 3, None]), ("sqlite", [None, 1, 3])],
)
def test_default_null_order_by_dialect(dialect: str, expected: list[Any]) -> None:
    plan = MergePlan(row_width=1, output_positions=(0,), sort_keys=(SortKey(0),))
    streams = [[(1,), (None,)], [(3,)]] if dialect == "postgresql" else [[(None,), (1,)], [(3,)]]
    assert [r[0] for r in merge_rows(plan, streams, dialect_name=dialect)] == expected


def test_desc_explicit_nulls_last_mixed_types_and_tie_break() -> None:
    plan = MergePlan(
        row_width=2,
        output_positions=(1,),
        sort_keys=(SortKey(0, descending=True, nulls_first=False),),
    )
    streams = [
        [(Decimal("2.5"), "a"), (1, "b"), (None, "c")],
        [(3.0, "d"), (1, "e"), (None, "f")],
    ]
    got = [r[0] for r in merge_rows(plan, streams, dialect_name="postgresql")]
    assert got == ["d", "a", "b", "e", "c", "f"]


def test_datetime_and_offset_limit_are_lazy() -> None:
    consumed: list[int] = []

    def stream(start: int) -> Iterator[tuple[Any, ...]]:
        for i in range(start, 1000, 2):
            consumed.append(i)
            yield (dt.datetime(2024, 1, 1) + dt.timedelta(days=i),)

    plan = MergePlan(row_width=1, output_positions=(0,), sort_keys=(SortKey(0),), offset=2, limit=3)
    got = list(merge_rows(plan, [stream(0), stream(1)], dialect_name="sqlite"))
    assert [(r[0] - dt.datetime(2024, 1, 1)).days for r in got] == [2, 3, 4]
    assert len(consumed) < 10


def test_distinct_before_offset_limit() -> None:
    plan = MergePlan(row_width=1, output_positions=(0,), sort_keys=(SortKey(0),), distinct=True, offset=1, limit=2)
    streams = [[("a",), ("b",), ("c",)], [("a",), ("b",), ("d",)]]
    assert list(merge_rows(plan, streams, dialect_name="sqlite")) == [("b",), ("c",)]


def _group_plan(**kw: Any) -> MergePlan:
    # shard row: country, count(*), sum(score), sum(score) for avg, count(score), distinct name
    agg = AggregatePlan(
        group_positions=(0,),
        constant_positions=(),
        aggregates=(
            AggregateSpec("count", (1,)),
            AggregateSpec("sum", (2,)),
            AggregateSpec("avg", (3, 4)),
            AggregateSpec("count_distinct", (5,)),
            AggregateSpec("max", (2,)),
        ),
        having=kw.pop("having", None),
        outputs=(Ref(0, 0), Ref(2, 0), Ref(2, 1), Ref(2, 2), Ref(2, 3), Ref(2, 4)),
        scalar=False,
    )
    return MergePlan(row_width=6, output_positions=tuple(range(6)), aggregate=agg, **kw)


def test_group_merge_with_having_and_sort() -> None:
    streams = [
        [("DE", 2, 5, 5, 2, "x"), ("DE", 1, None, None, 0, "y"), ("FR", 1, 4, 4, 1, "x")],
        [("DE", 1, 1, 1, 1, "x"), ("US", 3, None, None, 0, None)],
    ]
    plan = _group_plan(
        having=BinOp(">", Ref(2, 0), Const(1)),
        sort_keys=(SortKey(1, descending=True), SortKey(0)),
    )
    got = list(merge_rows(plan, streams, dialect_name="postgresql"))
    assert got == [
        ("DE", 4, 6, Decimal(2), 2, 5),
        ("US", 3, None, None, 0, None),
    ]
    got_sqlite = list(merge_rows(plan, streams, dialect_name="sqlite"))
    assert got_sqlite[0][3] == 2.0 and isinstance(got_sqlite[0][3], float)


def test_scalar_aggregate_without_rows_gives_one_row() -> None:
    agg = AggregatePlan(
        (), (), (AggregateSpec("count", (0,)), AggregateSpec("sum", (1,))), None, (Ref(2, 0), Ref(2, 1)), True
    )
    plan = MergePlan(row_width=2, output_positions=(0, 1), aggregate=agg)
    assert list(merge_rows(plan, [[], []], dialect_name="sqlite")) == [(0, None)]


def test_row_width_is_checked() -> None:
    plan = MergePlan(row_width=2, output_positions=(0,), sort_keys=(SortKey(1),))
    with pytest.raises(FanoutError, match="expects 2"):
        list(merge_rows(plan, [[(1,)]], dialect_name="sqlite"))


def test_unknown_dialect_needs_explicit_nulls() -> None:
    plan = MergePlan(row_width=1, output_positions=(0,), sort_keys=(SortKey(0),))
    with pytest.raises(UnsupportedQueryError):
        list(merge_rows(plan, [[(1,)], [(2,)]], dialect_name="exotic"))
    explicit = MergePlan(row_width=1, output_positions=(0,), sort_keys=(SortKey(0, nulls_first=True),))
    assert list(merge_rows(explicit, [[(2,)], [(None,)]], dialect_name="exotic")) == [(None,), (2,)]
