"""Reads across several shards: plan, execute in parallel, merge.

The road, one way: :func:`plan_select` (``_plan``) rewrites a SELECT into a per-shard
statement and a :class:`MergePlan` (or refuses it with
:class:`~shardkit.errors.UnsupportedQueryError`); :func:`run_parallel` (``_execute``, with
``_connect`` for each shard's connection and ``_threads`` for engines bound to the calling
thread) runs one task per shard under one deadline; :func:`merge_rows` (``_merge``) merges
the shard row streams into exactly the rows one database holding every row would return.
``_orm`` wires these to a session and returns the merged ``ShardedResult``; ``_prefetch``
reads a streamed shard's next batch while the merge works; ``_collation`` checks that text
compares alike on every shard; keyset pages (:func:`keyset_page`, :func:`cursor_of`) live in
``_keyset``.
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
