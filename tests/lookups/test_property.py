"""Any filter on a lookup column returns what one database would."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, create_engine, delete, or_, select
from sqlalchemy.orm import Session

import shardkit
from shardkit.lookups import lookups_of

from .models import SHARDS, Base, User

EMAILS = [f"e{i}@x.org" for i in range(12)]
EXTS = ["a", "b", "c", None]
NAMES = ["n0", "n1", "n2"]

rows = st.lists(
    st.tuples(st.sampled_from([*EMAILS, None]), st.sampled_from(EXTS), st.sampled_from(NAMES)),
    max_size=25,
)


def _values(draw: Any, pool: list[Any]) -> list[Any]:
    return draw(st.lists(st.sampled_from(pool), max_size=5))


@st.composite
def filters(draw: Any) -> Any:
    kinds = ["eq", "in", "ext_eq", "ext_in", "and_name", "or", "in_and_ext", "empty_in", "not_in", "null", "ne"]
    kind = draw(st.sampled_from(kinds))
    email = draw(st.sampled_from(EMAILS))
    if kind == "eq":
        return User.email == email
    if kind == "in":
        return User.email.in_(_values(draw, [*EMAILS, "zz@x.org"]))
    if kind == "ext_eq":
        return User.external_id == draw(st.sampled_from(["a", "b", "c"]))
    if kind == "ext_in":
        return User.external_id.in_(_values(draw, ["a", "b", "c", "d"]))
    if kind == "and_name":
        return and_(User.email.in_(_values(draw, EMAILS)), User.name == draw(st.sampled_from(NAMES)))
    if kind == "or":
        return or_(User.email == email, User.name == draw(st.sampled_from(NAMES)))
    if kind == "in_and_ext":
        return and_(User.email.in_(_values(draw, EMAILS)), User.external_id.in_(_values(draw, ["a", "b", "c"])))
    if kind == "not_in":
        return ~User.email.in_(_values(draw, EMAILS))
    if kind == "null":
        return User.email.is_(None)
    if kind == "ne":
        return and_(User.email != email, User.external_id == "a")
    return User.email.in_([])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=rows, queries=st.lists(filters(), min_size=1, max_size=6))
def test_filters_on_lookup_columns_match_one_database(
    cluster: shardkit.Cluster, data: list[tuple[Any, Any, Any]], queries: list[Any]
) -> None:
    seen: set[str] = set()
    unique = []
    for email, ext, name in data:  # the unique lookup: one row per email
        if email is not None and email in seen:
            continue
        if email is not None:
            seen.add(email)
        unique.append((email, ext, name))
    oracle = create_engine("sqlite://")
    Base.metadata.create_all(oracle, tables=[User.__table__])
    with cluster.session() as s:
        for alias in SHARDS:
            conn = s.connection(bind_arguments={"shard_id": alias})
            conn.execute(delete(User.__table__))
            for lookup in lookups_of(User).values():
                conn.execute(delete(lookup.table))
        s.commit()
        users = [User(id=i + 1, email=e, external_id=x, name=n) for i, (e, x, n) in enumerate(unique)]
        s.add_all(users)
        s.commit()
    with Session(oracle) as one:
        one.add_all([User(id=i + 1, email=e, external_id=x, name=n) for i, (e, x, n) in enumerate(unique)])
        one.commit()
        with cluster.session() as s:
            for where in queries:
                stmt = select(User.id, User.email, User.external_id, User.name).where(where).order_by(User.id)
                assert s.execute(stmt).all() == one.execute(stmt).all(), str(where)
    oracle.dispose()
