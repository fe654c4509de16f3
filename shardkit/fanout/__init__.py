"""Reads across several shards: plan, execute in parallel, merge.

The road: :func:`plan_select` rewrites a SELECT into a per-shard statement
and a :class:`MergePlan`; :func:`run_parallel` runs one task per shard under
one deadline; :func:`merge_rows` merges the shard row streams into exactly
the rows one database holding every row would return (or the plan refuses
the statement with :class:`~shardkit.errors.UnsupportedQueryError`).
"""

from shardkit.fanout._execute import (
    CallableTask,
    FanoutOutcome,
    ShardTask,
    mysql_statement_timeout_sql,
    pg_statement_timeout_sql,
    run_parallel,
)
from shardkit.fanout._keyset import cursor_of, keyset_page
from shardkit.fanout._merge import MergePlan, SortKey, merge_rows
from shardkit.fanout._plan import FanoutPlan, plan_select

__all__ = [
    "CallableTask",
    "FanoutOutcome",
    "FanoutPlan",
    "MergePlan",
    "ShardTask",
    "SortKey",
    "cursor_of",
    "keyset_page",
    "merge_rows",
    "mysql_statement_timeout_sql",
    "pg_statement_timeout_sql",
    "plan_select",
    "run_parallel",
]
