"""Read replicas per shard: which replica a routed read goes to, and when it goes to the primary.

An alias of ``DATABASES`` names its replicas, each itself an alias (Django-style settings still read
naturally)::

    DATABASES = {
        "default": {...},
        "s0": {"ENGINE": "postgresql", "NAME": "app", "HOST": "db0",
               "REPLICAS": ["s0_r1", "s0_r2"],          # or {"s0_r1": 3, "s0_r2": 1}: weights
               "REPLICA_POLICY": "round_robin",          # "random", "weighted"
               "MAX_REPLICA_LAG": 5.0},                  # seconds; None: lag is not checked
        "s0_r1": {"ENGINE": "postgresql", "NAME": "app", "HOST": "db0-r1"},
        "s0_r2": {"ENGINE": "postgresql", "NAME": "app", "HOST": "db0-r2"},
    }

A read routed to ``s0`` runs on one of its replicas, chosen by the policy among the healthy ones;
the objects it loads still belong to ``s0`` (their identity token), so their writes go to ``s0``.
The primary serves: every write, every read of a transaction that has written to that shard (a
session reads its own writes), a read named with ``shardkit.using("s0", primary=True)`` or the
``shardkit_primary=True`` execution option, and any read when no replica is healthy.

A replica is healthy when it answers, and, with ``MAX_REPLICA_LAG``, when its replay lag (PostgreSQL:
``now() - pg_last_xact_replay_timestamp()`` while WAL it received is not replayed yet, else 0) is
within the limit.  The answer is cached ``check_interval`` seconds (default 1) per replica.  The
first check (and the first after :meth:`Replicas.forget`) is waited for, at most ``check_timeout``
seconds (default 1); later ones run in the background while reads go on with the last answer, and
one that has not answered after ``check_timeout`` marks the replica down -- a hung replica is
skipped, never waited for longer than that.  A replica skipped is logged at WARNING by this
module's logger, once per change of state.  A connection error on a replica (a read that failed)
marks it down at once, until its next check.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from sqlalchemy import event, text

from .errors import ConfigError

if TYPE_CHECKING:
    from ._cluster import Cluster
    from ._config import AliasSpec

__all__ = ["POLICIES", "ReplicaHealth", "ReplicaSet", "Replicas", "replicas_of"]

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "random", "weighted")

#: seconds a replica's health is trusted before it is checked again
DEFAULT_CHECK_INTERVAL = 1.0
#: seconds a health check may take before the replica counts as unreachable
DEFAULT_CHECK_TIMEOUT = 1.0

_PG_LAG_SQL = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() "
    "THEN 0 ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)


def parse_replica_options(
    alias: str, entry: Mapping[str, Any]
) -> tuple[tuple[str, ...], tuple[float, ...], str, float | None]:
    """``REPLICAS``, ``REPLICA_POLICY`` and ``MAX_REPLICA_LAG`` of one DATABASES dict entry:
    (replica aliases, their weights, the policy, the maximum lag); checked, not yet resolved."""
    raw = entry.get("REPLICAS") or ()
    names: list[str] = []
    weights: list[float] = []
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, list | tuple):
        items = [(name, 1.0) for name in raw]
    else:
        raise ConfigError(
            f"DATABASES[{alias!r}]: REPLICAS must be a list of aliases or a dict alias -> weight, "
            f"got {type(raw).__name__}",
            alias=alias,
            key="REPLICAS",
        )
    for name, weight in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"DATABASES[{alias!r}]: REPLICAS names {name!r}, not an alias", alias=alias)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise ConfigError(
                f"DATABASES[{alias!r}]: the weight of replica {name!r} must be a positive number, got {weight!r}",
                alias=alias,
                replica=name,
            )
        if name == alias:
            raise ConfigError(f"DATABASES[{alias!r}]: an alias cannot be its own replica", alias=alias)
        if name in names:
            raise ConfigError(f"DATABASES[{alias!r}]: replica {name!r} is named twice", alias=alias)
        names.append(name)
        weights.append(float(weight))
    policy = entry.get("REPLICA_POLICY") or ("weighted" if isinstance(raw, Mapping) else "round_robin")
    if policy not in POLICIES:
        raise ConfigError(
            f"DATABASES[{alias!r}]: REPLICA_POLICY must be one of {', '.join(POLICIES)}, got {policy!r}",
            alias=alias,
            key="REPLICA_POLICY",
        )
    lag = entry.get("MAX_REPLICA_LAG")
    if lag is not None and (isinstance(lag, bool) or not isinstance(lag, int | float) or lag < 0):
        raise ConfigError(
            f"DATABASES[{alias!r}]: MAX_REPLICA_LAG must be a number of seconds >= 0, got {lag!r}",
            alias=alias,
            key="MAX_REPLICA_LAG",
        )
    if not names and ("REPLICA_POLICY" in entry or "MAX_REPLICA_LAG" in entry):
        raise ConfigError(
            f"DATABASES[{alias!r}]: REPLICA_POLICY / MAX_REPLICA_LAG without REPLICAS", alias=alias, key="REPLICAS"
        )
    return tuple(names), tuple(weights), str(policy), None if lag is None else float(lag)


def check_replica_graph(specs: Mapping[str, AliasSpec]) -> dict[str, str]:
    """Check every alias's replicas against the whole DATABASES: each names an alias of it, is the
    replica of one primary only, and has no replicas of its own (a replica of a replica, a cycle).
    Returns replica alias -> its primary."""
    primary_of: dict[str, str] = {}
    for alias, spec in specs.items():
        for name in spec.replicas:
            if name not in specs:
                raise ConfigError(
                    f"DATABASES[{alias!r}]: replica {name!r} is not an alias of DATABASES "
                    f"(aliases: {', '.join(specs)})",
                    alias=alias,
                    replica=name,
                )
            if name in primary_of:
                raise ConfigError(
                    f"DATABASES[{alias!r}]: replica {name!r} is already a replica of {primary_of[name]!r}",
                    alias=name,
                )
            primary_of[name] = alias
    for name, alias in primary_of.items():
        if specs[name].replicas:
            chain, seen, step = [alias, name], {alias, name}, name
            while specs[step].replicas and (step := specs[step].replicas[0]) not in seen:
                chain.append(step)
                seen.add(step)
            kind = "a cycle" if step in seen and specs[chain[-1]].replicas else "a replica of a replica"
            if kind == "a cycle":
                chain.append(step)
            chain_text = " -> ".join(map(repr, chain))
            raise ConfigError(
                f"DATABASES[{name!r}]: a replica (of {alias!r}) cannot have replicas of its own ({chain_text}: {kind})",
                alias=name,
            )
        if name == "default":
            raise ConfigError("DATABASES['default'] cannot be a replica", alias=name)
    return primary_of


@dataclass
class ReplicaHealth:
    """What the last check of one replica found."""

    alias: str
    ok: bool = True
    lag: float | None = None
    checked_at: float = float("-inf")
    reason: str = ""
    checking: bool = False
    check_started: float = float("-inf")


class ReplicaSet:
    """One primary and its replicas; :meth:`choose` picks the replica of a read."""

    def __init__(
        self,
        replicas: Replicas,
        primary: str,
        aliases: Sequence[str],
        weights: Sequence[float],
        policy: str,
        max_lag: float | None,
    ) -> None:
        self.owner = replicas
        self.primary = primary
        self.aliases = tuple(aliases)
        self.weights = tuple(weights)
        self.policy = policy
        self.max_lag = max_lag
        self._counter = itertools.count()

    def __repr__(self) -> str:
        return f"ReplicaSet({self.primary!r} -> {list(self.aliases)!r}, policy={self.policy!r})"

    def _pick(self, candidates: Sequence[str]) -> str:
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == "random":
            return random.choice(candidates)
        if self.policy == "weighted":
            weights = [self.weights[self.aliases.index(a)] for a in candidates]
            return random.choices(candidates, weights=weights)[0]
        return candidates[next(self._counter) % len(candidates)]

    def choose(self) -> str:
        """The alias a read of this shard runs on: a healthy replica by the policy, else the primary."""
        health = self.owner.health
        now = time.monotonic()
        interval = self.owner.check_interval
        candidates = []
        for alias in self.aliases:
            state = health[alias]
            if now - state.checked_at > interval:
                # never checked (or forgotten): wait for the answer; else refresh in the background
                # and go on with the last answer (it is at most one interval older)
                state = self.owner.check(alias, self.max_lag, wait=state.checked_at == float("-inf"))
            if state.ok:
                candidates.append(alias)
        if not candidates:
            return self.primary
        return self._pick(candidates)


class Replicas:
    """The replicas of one cluster: alias -> :class:`ReplicaSet`, and each replica's health."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    ) -> None:
        self.cluster = cluster
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        self.sets: dict[str, ReplicaSet] = {}
        self.health: dict[str, ReplicaHealth] = {}
        self.primary_of: dict[str, str] = {}
        self._lock = threading.Lock()
        for alias in cluster.aliases:
            spec = cluster.spec(alias)
            if spec.replicas:
                self.sets[alias] = ReplicaSet(
                    self, alias, spec.replicas, spec.replica_weights, spec.replica_policy, spec.max_replica_lag
                )
                for name in spec.replicas:
                    self.primary_of[name] = alias
                    self.health[name] = ReplicaHealth(name)

    def read_alias(self, alias: str) -> str:
        """Where a read routed to ``alias`` runs (``alias`` itself when it has no replicas)."""
        replica_set = self.sets.get(alias)
        return alias if replica_set is None else replica_set.choose()

    # -- health ------------------------------------------------------------------

    def check(self, alias: str, max_lag: float | None, *, wait: bool = True) -> ReplicaHealth:
        """Check ``alias`` in a worker thread and return its state.  With ``wait``, wait for the
        answer at most ``check_timeout`` seconds (no answer: down); without, return the last state
        at once and let the check update it when it ends.  While another check of it runs, its
        last state counts (a hung check stops counting after ten timeouts)."""
        state = self.health[alias]
        with self._lock:
            now = time.monotonic()
            busy = state.checking and now - state.check_started < 10 * self.check_timeout
            if not busy:
                state.checking, state.check_started = True, now
        if busy:
            if state.ok and now - state.check_started > self.check_timeout:  # a background check hangs
                self._set(state, False, None, f"no answer within {self.check_timeout}s")
            return state
        done = threading.Event()
        started = state.check_started

        def probe() -> None:
            try:
                in_recovery, lag = self._measure(alias)
            except Exception as exc:  # any failure to reach or query the replica: unreachable
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                self._set(state, False, None, f"unreachable ({type(exc).__name__}: {first})")
            else:
                if max_lag is not None and lag is not None and lag > max_lag:
                    self._set(state, False, lag, f"lag {lag:.1f}s exceeds max_replica_lag={max_lag}s")
                else:
                    self._set(state, True, lag, "" if in_recovery is not False else "not in recovery")
            finally:
                if state.check_started == started:
                    state.checking = False
                done.set()

        threading.Thread(target=probe, name=f"shardkit-replica-check-{alias}", daemon=True).start()
        if wait and not done.wait(self.check_timeout):
            self._set(state, False, None, f"no answer within {self.check_timeout}s")
        return state

    def _measure(self, alias: str) -> tuple[bool | None, float | None]:
        engine = self.cluster.engine(alias)
        _watch_errors(self, alias, engine)
        with engine.connect() as conn:
            if conn.dialect.name != "postgresql":
                conn.execute(text("SELECT 1"))
                return None, None
            row = conn.execute(text(_PG_LAG_SQL)).one()
            conn.rollback()
        return bool(row[0]), float(row[1]) if row[1] is not None else None

    def _set(self, state: ReplicaHealth, ok: bool, lag: float | None, reason: str) -> None:
        was = state.ok
        state.ok, state.lag, state.reason = ok, lag, reason
        state.checked_at = time.monotonic()
        primary = self.primary_of[state.alias]
        if not ok and was:  # once per change of state: a replica down is not logged on every read
            logger.warning("replica %s of %s skipped: %s; reads go to %s", state.alias, primary, reason, primary)
        elif not ok:
            logger.debug("replica %s of %s still skipped: %s", state.alias, primary, reason)
        elif not was:
            logger.warning("replica %s of %s is back in use (lag %s)", state.alias, primary, lag)

    def mark_down(self, alias: str, reason: str) -> None:
        """A read on ``alias`` failed to reach it: skip it until its next check."""
        state = self.health.get(alias)
        if state is not None:
            self._set(state, False, None, reason)

    def forget(self) -> None:
        """Check every replica again on its next read (after a failover, in tests)."""
        for state in self.health.values():
            state.checked_at = float("-inf")


_watched: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()


def _watch_errors(replicas: Replicas, alias: str, engine: Any) -> None:
    """A connection error on the replica's engine marks it down at once."""
    if engine in _watched:
        return
    _watched[engine] = True

    def on_error(context: Any) -> None:
        if context.is_disconnect:
            replicas.mark_down(alias, f"connection lost ({type(context.original_exception).__name__})")

    event.listen(engine, "handle_error", on_error)


_REGISTRY: WeakKeyDictionary[Any, Replicas | None] = WeakKeyDictionary()


def replicas_of(cluster: Cluster) -> Replicas | None:
    """The :class:`Replicas` of ``cluster``, ``None`` when no alias has replicas (cached)."""
    try:
        return _REGISTRY[cluster]
    except KeyError:
        pass
    real = cluster.__dict__.get("_cluster", cluster)  # an async session's view: the cluster's own (sync checks)
    if real is not cluster:
        found = replicas_of(real)
    else:
        found = Replicas(cluster) if any(cluster.spec(a).replicas for a in cluster.aliases) else None
    _REGISTRY[cluster] = found
    return found


def read_alias(cluster: Cluster, alias: str, written: set[str] | frozenset[str] = frozenset()) -> str:
    """Where a read routed to ``alias`` runs: ``alias`` when the transaction wrote to it (read your
    writes) or it has no replicas, else :meth:`Replicas.read_alias`."""
    replicas = replicas_of(cluster)
    if replicas is None or alias in written:
        return alias
    return replicas.read_alias(alias)
