"""Cluster-wide 64-bit ids: time-ordered, unique across shards, processes and threads.

An id is a positive signed 64-bit int laid out Snowflake-style (as
Instagram's sharded ids and Twitter's Snowflake)::

    bit 63      62 ............ 23   22 ........ 10   9 ........ 0
    0 (sign)    milliseconds since   worker id        sequence
                EPOCH (41 bits)      (13 bits)        (10 bits)

* 41 bits of milliseconds since :data:`EPOCH_MS` (2024-01-01T00:00:00Z) last
  until 2093; 13 bits of worker id give 8192 workers; 10 bits give 1024 ids
  per worker per millisecond.
* Ids from one generator strictly increase.  Ids of different workers never
  collide; ids sort roughly by creation time across the cluster.
* **Clock moving backwards / bursts**: the generator never waits and never
  repeats.  It keeps a logical clock ``max(now, last)``; when the clock goes
  back it keeps issuing from the last millisecond, and when a millisecond's
  1024 sequence numbers are used up it borrows the next millisecond.  The
  logical clock rejoins the wall clock as soon as the wall clock catches up.
* **Worker ids**: pass ``worker_id=`` (0..8191) or set ``SHARDKIT_WORKER_ID``
  for a guarantee (e.g. from the pod ordinal).  Otherwise the worker id is
  ``(hash(hostname) ^ pid) & 8191``: distinct for processes of one host whose
  pids differ in their low 13 bits (what a fresh process pool gets), but only
  probabilistically distinct across hosts: deployments with many hosts should
  assign worker ids.
* **Threads**: a lock makes each generator safe to share; generators of one
  process that have the same worker id share one clock and sequence.
* **fork**: a child process re-derives its worker id from its own pid
  (``os.register_at_fork``).  A generator with an explicit worker id (argument
  or ``SHARDKIT_WORKER_ID``) refuses
  to issue ids in a forked child until :meth:`IdGenerator.reseed` gives it a
  new one, since parent and child would otherwise issue the same ids.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

from mmh3 import hash as _murmur3_32

from .errors import ConfigError

__all__ = [
    "EPOCH_MS",
    "MAX_WORKER_ID",
    "IdGenerator",
    "IdParts",
    "default_generator",
    "next_id",
    "parse_id",
]

logger = logging.getLogger(__name__)

EPOCH_MS = 1_704_067_200_000
"""2024-01-01T00:00:00Z in Unix milliseconds: time zero of the id layout."""

TIME_BITS = 41
WORKER_BITS = 13
SEQUENCE_BITS = 10
MAX_WORKER_ID = (1 << WORKER_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_TIME = (1 << TIME_BITS) - 1
_WORKER_SHIFT = SEQUENCE_BITS
_TIME_SHIFT = SEQUENCE_BITS + WORKER_BITS

_generators: weakref.WeakSet[IdGenerator] = weakref.WeakSet()


class _Clock:
    """Logical clock + sequence of one worker id: shared by every generator of the
    process that uses that worker id, so two generators never issue the same id."""

    __slots__ = ("last", "lock", "sequence")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = -1  # logical ms of the last id, relative to the epoch
        self.sequence = MAX_SEQUENCE


_clocks: dict[tuple[int, int], _Clock] = {}
_clocks_lock = threading.Lock()


def _clock_for(worker_id: int, epoch_ms: int) -> _Clock:
    with _clocks_lock:
        return _clocks.setdefault((worker_id, epoch_ms), _Clock())


class IdParts(NamedTuple):
    """The fields of an id: ``timestamp_ms`` is Unix milliseconds."""

    timestamp_ms: int
    worker_id: int
    sequence: int


def parse_id(value: int, *, epoch_ms: int = EPOCH_MS) -> IdParts:
    """Split an id into its timestamp (Unix ms), worker id and sequence."""
    return IdParts(
        (value >> _TIME_SHIFT) + epoch_ms,
        (value >> _WORKER_SHIFT) & MAX_WORKER_ID,
        value & MAX_SEQUENCE,
    )


def _derived_worker_id() -> tuple[int, bool]:
    """(worker id, explicit?): from SHARDKIT_WORKER_ID (explicit) or from (host, pid)."""
    env = os.environ.get("SHARDKIT_WORKER_ID", "").strip()
    if env:
        try:
            return _check_worker_id(int(env)), True
        except ValueError:
            raise ConfigError(
                f"SHARDKIT_WORKER_ID must be an int in [0, {MAX_WORKER_ID}], not {env!r}",
                worker_id=env,
            ) from None
    host = _murmur3_32(socket.gethostname().encode("utf-8", "surrogatepass"), 0, False)
    worker_id = (host ^ os.getpid()) & MAX_WORKER_ID
    logger.debug("id worker id %d derived from host and pid %d (SHARDKIT_WORKER_ID not set)", worker_id, os.getpid())
    return worker_id, False


def _check_worker_id(worker_id: object) -> int:
    if isinstance(worker_id, bool) or not isinstance(worker_id, int) or not 0 <= worker_id <= MAX_WORKER_ID:
        raise ConfigError(f"worker_id must be an int in [0, {MAX_WORKER_ID}], not {worker_id!r}", worker_id=worker_id)
    return worker_id


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class IdGenerator:
    """A source of unique, time-ordered positive 64-bit ids.

    :param worker_id: 0..8191, unique per live process in the cluster; ``None``
        derives it from ``SHARDKIT_WORKER_ID`` or from (host, pid).
    :param epoch_ms: time zero in Unix milliseconds (default :data:`EPOCH_MS`);
        every generator of a cluster must use the same one.
    :param clock: returns Unix milliseconds (default: the wall clock); for tests.

    >>> gen = IdGenerator(worker_id=7)
    >>> a, b = gen(), gen()
    >>> 0 < a < b < 2**63 and parse_id(a).worker_id == 7
    True
    """

    def __init__(
        self,
        worker_id: int | None = None,
        *,
        epoch_ms: int = EPOCH_MS,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._worker_id, self._explicit = self._pick(worker_id)
        self._epoch_ms = epoch_ms
        self._clock = clock or _wall_ms
        self._state = _clock_for(self._worker_id, epoch_ms)
        self._forked = False
        _generators.add(self)

    @staticmethod
    def _pick(worker_id: int | None) -> tuple[int, bool]:
        return (_check_worker_id(worker_id), True) if worker_id is not None else _derived_worker_id()

    @property
    def worker_id(self) -> int:
        """The 13-bit worker id embedded in every id of this generator."""
        return self._worker_id

    def reseed(self, worker_id: int | None = None) -> None:
        """Take a new worker id (explicit, or derived again from host and pid)."""
        self._worker_id, self._explicit = self._pick(worker_id)
        self._state = _clock_for(self._worker_id, self._epoch_ms)
        self._forked = False

    def _after_fork(self) -> None:
        # runs in the child after _clocks was emptied: fresh locks and clocks
        if self._explicit:
            self._forked = True
        else:
            self._worker_id, self._explicit = _derived_worker_id()
            self._forked = self._explicit  # SHARDKIT_WORKER_ID is inherited too
        self._state = _clock_for(self._worker_id, self._epoch_ms)

    def next_id(self) -> int:
        """Return a new id, larger than every id this generator returned before.

        :raises ConfigError: the clock is before the epoch or past 2093, or this
            explicit-worker generator was inherited by a forked child.
        """
        state = self._state
        with state.lock:
            if self._forked:
                raise ConfigError(
                    f"IdGenerator(worker_id={self._worker_id}) was inherited by a forked child; "
                    "call reseed() with a worker id of its own",
                    worker_id=self._worker_id,
                )
            now = self._clock() - self._epoch_ms
            if now < 0:
                raise ConfigError("the clock is before the id epoch", now_ms=now + self._epoch_ms)
            if now > state.last:
                state.last = now
                state.sequence = 0
            elif state.sequence < MAX_SEQUENCE:
                state.sequence += 1
            else:  # sequence exhausted, or the clock went back: borrow the next millisecond
                state.last += 1
                state.sequence = 0
            if state.last > MAX_TIME:
                raise ConfigError("the 41-bit id clock is exhausted (year 2093)")
            return (state.last << _TIME_SHIFT) | (self._worker_id << _WORKER_SHIFT) | state.sequence

    __call__ = next_id

    def __repr__(self) -> str:
        return f"<IdGenerator worker_id={self._worker_id}>"


def _reseed_after_fork() -> None:
    global _clocks_lock
    _clocks_lock = threading.Lock()  # a lock held by another thread at fork() stays held
    _clocks.clear()
    for gen in list(_generators):
        gen._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)

default_generator = IdGenerator()
"""The process-wide generator :func:`next_id` uses (worker id derived, see the module docstring)."""


def next_id() -> int:
    """A new cluster-wide id from :data:`default_generator`."""
    return default_generator.next_id()
