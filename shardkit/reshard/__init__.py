"""Resharding: move the rows a new ring gives to other shards, verify, cut over, clean up.

::

    from shardkit.reshard import Resharder, FencingRouter, load_current_ring

    plan = Resharder(cluster, add="s4", models=[User]).plan()   # measured row counts
    print(plan.render())
    Resharder(cluster, add="s4", models=[User]).run()           # resumable; see docs/reshard.md

Writes of moving keys are fenced during the cut-over by every process of the cluster (each
cluster with a ring router follows the stored state: :class:`FencingRouter`) and by the
databases themselves (triggers, PostgreSQL and SQLite), so a process that never heard of the
reshard cannot break it.

Limits: one reshard at a time per cluster; tables need a primary key; the rows are compared
by primary key, so a primary key must be unique across the cluster; no database-side fence
on MySQL.
"""

from __future__ import annotations

from ..errors import ReshardLockedError, ReshardVerifyError, ShardMovingError
from ._fence import FencingRouter
from ._progress import ProgressEvent
from ._report import Move, RangeCheck, ReshardPlan, ReshardResult, VerifyReport
from ._resharder import Resharder, reshard
from ._state import load_current_ring
from ._tables import MovingTable

__all__ = [
    "FencingRouter",
    "Move",
    "MovingTable",
    "ProgressEvent",
    "RangeCheck",
    "ReshardLockedError",
    "ReshardPlan",
    "ReshardResult",
    "ReshardVerifyError",
    "Resharder",
    "ShardMovingError",
    "VerifyReport",
    "load_current_ring",
    "reshard",
]
