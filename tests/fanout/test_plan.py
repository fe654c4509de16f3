"""The planner without a database: rewritten SQL, merge plans, refusals."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    String,
    cast,
    desc,
    distinct,
    func,
    literal,
    literal_column,
    select,
    text,
    union_all,
)

try:  # SQLAlchemy 2.1: select().ext(distinct_on(...)); 2.0: select().distinct(*columns)
    from sqlalchemy.dialects.postgresql import distinct_on
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    distinct_on = None
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardkit.errors import FanoutError, UnsupportedQueryError
from shardkit.fanout import plan_select

from .strategies import users

c = users.c



def _distinct_on(stmt: Any, *columns: Any) -> Any:
    """PostgreSQL's DISTINCT ON in the spelling of the installed SQLAlchemy."""
    if distinct_on is not None:
        return stmt.ext(distinct_on(*columns))
    return stmt.distinct(*columns)

class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    score: Mapped[int | None] = mapped_column(Integer)
    country: Mapped[str | None] = mapped_column(String(2))


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    total: Mapped[int] = mapped_column(Integer)


def sql(plan: Any) -> str:
    return " ".join(str(plan.shard_statement.compile(compile_kwargs={"literal_binds": True})).split())


def test_plain_select_is_concat() -> None:
    plan = plan_select(select(users))
    assert plan.mode == "concat"
    assert plan.merge.is_concat
    assert plan.shard_statement is not None
    assert plan.output_keys == ("id", "name", "score", "country", "balance")
    assert "concatenate" in plan.explain()


def test_order_by_selected_column_reuses_its_position() -> None:
    plan = plan_select(select(c.id, c.score).order_by(c.score.desc(), c.id))
    assert [(k.position, k.descending) for k in plan.merge.sort_keys] == [(1, True), (0, False)]
    assert plan.merge.row_width == 2
    assert "ORDER BY users.score DESC, users.id" in sql(plan)


def test_order_by_unselected_column_is_appended_hidden() -> None:
    plan = plan_select(select(c.name).order_by(c.score.nulls_first(), "id"))
    assert "users.score AS _sk_0" in sql(plan)
    assert [k.position for k in plan.merge.sort_keys] == [1, 2]
    assert plan.merge.sort_keys[0].nulls_first is True
    assert plan.merge.sort_keys[1].nulls_first is None
    assert plan.merge.output_positions == (0,)


def test_order_by_label_name() -> None:
    plan = plan_select(select(c.id, (c.score * 2).label("double")).order_by(desc("double")))
    assert [(k.position, k.descending) for k in plan.merge.sort_keys] == [(1, True)]


def test_limit_offset_pushed_as_offset_plus_limit() -> None:
    plan = plan_select(select(users).order_by(c.id).limit(10).offset(5))
    assert "LIMIT 15" in sql(plan)
    assert "OFFSET" not in sql(plan)
    assert (plan.merge.offset, plan.merge.limit) == (5, 10)


def test_offset_without_limit_sends_neither() -> None:
    plan = plan_select(select(users).order_by(c.id).offset(5))
    assert "LIMIT" not in sql(plan) and "OFFSET" not in sql(plan)
    assert (plan.merge.offset, plan.merge.limit) == (5, None)


def test_avg_becomes_sum_and_count() -> None:
    plan = plan_select(select(c.country, func.avg(c.score)).group_by(c.country).having(func.count() > 2))
    s = sql(plan)
    assert "sum(users.score)" in s and "count(users.score)" in s and "count(*)" in s
    assert "HAVING" not in s and "GROUP BY users.country" in s
    agg = plan.merge.aggregate
    assert agg is not None and [a.kind for a in agg.aggregates] == ["avg", "count"]
    assert plan.mode == "re-aggregate"


def test_count_distinct_groups_by_the_value() -> None:
    plan = plan_select(select(c.country, func.count(distinct(c.name))).group_by(c.country))
    assert "GROUP BY users.country, users.name" in sql(plan)
    assert plan.merge.aggregate is not None
    assert plan.merge.aggregate.aggregates[0].kind == "count_distinct"


def test_grouped_limit_not_pushed_and_order_in_memory() -> None:
    stmt = select(c.country, func.count().label("n")).group_by(c.country).order_by(desc("n")).limit(3)
    plan = plan_select(stmt)
    assert "LIMIT" not in sql(plan) and "ORDER BY" not in sql(plan)
    assert plan.merge.limit == 3 and plan.merge.sort_keys[0].position == 1


def test_group_by_shard_key_pushes_having_and_limit() -> None:
    stmt = (
        select(c.id, func.count().label("n"))
        .group_by(c.id)
        .having(func.count() > 1)
        .order_by(func.sum(c.score))
        .limit(4)
    )
    plan = plan_select(stmt, shard_key_columns=[c.id])
    s = sql(plan)
    assert plan.mode == "pushdown-groups"
    assert "HAVING count(*) > 1" in s and "LIMIT 4" in s and "sum(users.score) AS _sk_0" in s
    assert plan.merge.aggregate is None


def test_count_with_select_from() -> None:
    plan = plan_select(select(func.count()).select_from(users))
    assert plan.merge.aggregate is not None and plan.merge.aggregate.scalar
    assert "count(*)" in sql(plan)


def test_expression_over_aggregates_is_decomposed() -> None:
    plan = plan_select(select(func.coalesce(func.sum(c.score), 0) / func.count()).select_from(users))
    assert plan.merge.aggregate is not None
    assert [a.kind for a in plan.merge.aggregate.aggregates] == ["sum", "count"]
    plan = plan_select(select(cast(func.avg(c.score), Float)).select_from(users))
    assert plan.merge.aggregate is not None


def test_orm_entity_and_join() -> None:
    stmt = select(User, Order).join(Order, Order.user_id == User.id).order_by(Order.total.desc()).limit(5)
    plan = plan_select(stmt)
    # the sort column is read from the Order entity: the shards do not send it twice
    assert plan.merge.row_width == 2
    assert (plan.merge.sort_keys[0].position, plan.merge.sort_keys[0].attribute) == (1, "total")
    assert plan.output_keys == ("User", "Order")
    assert "JOIN orders" in sql(plan)


def test_orm_columns_grouped() -> None:
    plan = plan_select(select(User.country, func.avg(User.score)).group_by(User.country))
    assert plan.merge.aggregate is not None
    assert plan.output_keys == ("country", "avg")


def test_distinct_with_limit_keeps_shard_distinct_limit() -> None:
    plan = plan_select(select(c.name).distinct().order_by(c.name).limit(3))
    assert "SELECT DISTINCT" in sql(plan) and "LIMIT 3" in sql(plan)
    assert plan.merge.distinct


def test_explain_renders_for_a_dialect() -> None:
    text = plan_select(select(users).order_by(c.id).limit(2)).explain("postgresql")
    assert "LIMIT 2" in text and "k-way" in text


@pytest.mark.filterwarnings("ignore:DISTINCT ON is currently supported only")  # SQLAlchemy 2.0 only
@pytest.mark.parametrize(
    ("stmt", "construct"),
    [
        (select(c.id, func.row_number().over(order_by=c.id)), "window function"),
        (select(func.string_agg(c.name, ",")).select_from(users), "aggregate function string_agg()"),
        (select(func.array_agg(c.name)).select_from(users), "aggregate function array_agg()"),
        (select(users).with_for_update(), "FOR UPDATE"),
        (select(users).order_by(func.random()), "ORDER BY random()"),
        (select(literal(1)), "SELECT without FROM"),
        (select(c.country, func.count()).group_by(func.rollup(c.country)), "GROUP BY ROLLUP/CUBE/GROUPING SETS"),
        (select(select(c.id).limit(3).subquery()), "LIMIT/OFFSET in a subquery"),
        (select(select(func.count()).select_from(users).subquery()), "aggregate in a subquery"),
        (select(users).where(c.score > select(func.avg(c.score)).scalar_subquery()), "aggregate in a subquery"),
        (select(users).fetch(3), "FETCH FIRST"),
        (select(c.name, func.count()).select_from(users), "column outside an aggregate"),
        (select(c.name, func.count()).group_by(c.country), "column neither grouped nor aggregated"),
        (select(c.name).distinct().order_by(c.score), "ORDER BY expression not in the select list of a DISTINCT query"),
        (_distinct_on(select(users), c.country), "DISTINCT ON"),
        (
            select(func.count()).select_from(users).having(func.count() % 2 == 0),
            "operator mod over aggregates or in HAVING",
        ),
        (select(func.upper(func.min(c.name))).select_from(users), "aggregate inside Function"),
        (select(users).limit(func.abs(3)), "LIMIT given as an expression"),
        (select(func.max(c.score, c.id)).select_from(users), "max() with several arguments"),
    ],
)
def test_refusals_name_the_construct(stmt: Any, construct: str) -> None:
    with pytest.raises(UnsupportedQueryError) as info:
        plan_select(stmt)
    assert info.value.construct == construct  # type: ignore[attr-defined]
    assert construct in str(info.value)
    assert isinstance(info.value, FanoutError)


def test_union_refused() -> None:
    with pytest.raises(UnsupportedQueryError) as info:
        plan_select(union_all(select(c.id), select(c.id)))  # type: ignore[arg-type]
    assert "set operation" in info.value.construct  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:DISTINCT ON is currently supported only")  # SQLAlchemy 2.0 only
def test_distinct_on_shard_key_allowed() -> None:
    plan = plan_select(_distinct_on(select(users), c.id).order_by(c.id), shard_key_columns=[c.id])
    assert not plan.merge.distinct


@pytest.mark.parametrize(
    "order",
    [lambda: literal_column("2"), lambda: text("n"), lambda: text("n desc")],
    ids=["position", "text label", "text with direction"],
)
def test_raw_sql_in_order_by_is_refused(order: Any) -> None:
    stmt = select(c.name.label("n"), c.id).order_by(order(), c.id).limit(5)
    with pytest.raises(UnsupportedQueryError, match="raw SQL in ORDER BY") as info:
        plan_select(stmt)
    assert info.value.construct == "raw SQL in ORDER BY / GROUP BY"


@pytest.mark.parametrize(
    "key",
    [func.length(c.name), func.lower(c.name), func.coalesce(c.country, "??"), func.substr(c.name, 1, 2)],
    ids=["length", "lower", "coalesce", "substr"],
)
def test_group_by_a_selected_function(key: Any) -> None:
    # regression: SQLAlchemy stores group_by(func.f(x)) as ClauseList(Label(anon, f(x))); the
    # planner refused it as "expression Function in an aggregate query"
    plan = plan_select(select(key, func.count(), func.avg(c.score)).group_by(key).order_by(key))
    assert plan.mode == "re-aggregate"
    assert plan.merge.aggregate is not None and plan.merge.aggregate.group_positions == (0,)
    assert " GROUP BY " in sql(plan) and sql(plan).count(str(key.compile(compile_kwargs={"literal_binds": True}))) >= 2


def test_group_by_date_trunc_having_and_order_on_it() -> None:
    day = func.date_trunc("day", func.now() - c.score)  # any expression, grouped and selected
    stmt = select(day.label("day"), func.count().label("n")).group_by(day).having(func.count() > 1).order_by(day)
    plan = plan_select(stmt)
    assert plan.mode == "re-aggregate" and plan.merge.sort_keys[0].position == 0
    assert "GROUP BY date_trunc('day', now() - users.score)" in sql(plan)


def test_order_by_function_in_rows_mode() -> None:
    plan = plan_select(select(c.id).order_by(func.lower(c.name).desc()).limit(3))
    assert plan.mode == "ordered" and plan.merge.sort_keys[0].descending
    assert "lower(users.name) AS _sk_0" in sql(plan)


# review of issue 12: count(*) over LIMIT / GROUP BY / DISTINCT subqueries, EXISTS


def test_count_over_a_limited_subquery_counts_without_the_limit() -> None:
    from shardkit.fanout import merge_rows
    from shardkit.fanout._merge import Reduce

    plan = plan_select(select(func.count()).select_from(select(users).order_by(c.name).limit(3).offset(2).subquery()))
    assert plan.mode == "count" and plan.merge.reduce == Reduce("sum", 2, 3)
    assert "LIMIT" not in sql(plan) and "ORDER BY" not in sql(plan) and "count(*)" in sql(plan)
    assert list(merge_rows(plan.merge, [[(2,)], [(1,)], [(0,)]], dialect_name="sqlite")) == [(1,)]  # 3 - 2
    assert list(merge_rows(plan.merge, [[(40,)], [(7,)]], dialect_name="sqlite")) == [(3,)]
    assert "cut by OFFSET 2 LIMIT 3" in plan.merge.describe()


def test_count_over_group_by_counts_the_merged_groups() -> None:
    from shardkit.fanout import merge_rows

    inner = select(c.country, func.count()).group_by(c.country).having(func.count() > 1).limit(5)
    plan = plan_select(select(func.count()).select_from(inner.subquery()))
    assert plan.mode == "count" and plan.merge.aggregate is not None and plan.merge.reduce is not None
    assert "GROUP BY users.country" in sql(plan) and "HAVING" not in sql(plan)
    shard_a = [("de", 1), ("fr", 2)]  # (group key, partial count)
    shard_b = [("de", 1), ("jp", 1)]
    assert list(merge_rows(plan.merge, [shard_a, shard_b], dialect_name="sqlite")) == [(2,)]  # de (2), fr (2)


def test_count_over_distinct_dedupes_across_shards() -> None:
    from shardkit.fanout import merge_rows

    plan = plan_select(select(func.count()).select_from(select(c.country).distinct().subquery()))
    assert sql(plan).startswith("SELECT DISTINCT anon_1.country FROM (SELECT users.country")
    assert list(merge_rows(plan.merge, [[("de",), ("fr",)], [("de",), ("us",)]], dialect_name="sqlite")) == [(3,)]


def test_exists_is_the_or_of_the_shards() -> None:
    from shardkit.fanout import merge_rows

    plan = plan_select(select(select(users).where(c.score > 5).exists()))
    assert plan.mode == "exists"
    assert list(merge_rows(plan.merge, [[(False,)], [(True,)]], dialect_name="sqlite")) == [(True,)]
    negated = plan_select(select(~select(users).where(c.score > 5).exists()))
    assert list(merge_rows(negated.merge, [[(True,)], [(False,)]], dialect_name="sqlite")) == [(False,)]


def test_count_with_distinct_and_group_by_is_refused() -> None:
    inner = select(c.country).group_by(c.country).distinct()
    with pytest.raises(UnsupportedQueryError, match="DISTINCT with GROUP BY"):
        plan_select(select(func.count()).select_from(inner.subquery()))
