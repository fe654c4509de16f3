"""The reshard's own errors, all under :class:`shardkit.errors.ReshardError`::

ReshardError
 +-- ShardMovingError        a write (or an every-shard read) of a key that is being moved; retry
 +-- ReshardLockedError      another reshard holds the lock (``owner`` names it)
 +-- ReshardVerifyError      verify found differences (``report`` lists every differing primary key)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ReshardError

if TYPE_CHECKING:
    from ._resharder import VerifyReport

__all__ = ["ReshardLockedError", "ReshardVerifyError", "ShardMovingError"]


class ShardMovingError(ReshardError):
    """The key's rows are being moved to another shard right now: retry in a moment.

    Raised by :class:`~shardkit.reshard.FencingRouter` during the short cut-over of a
    reshard.  Attributes: ``key`` (the shard key, or ``None`` for a statement whose key
    is not known), ``table``, ``retryable`` (always ``True``).
    """

    retryable = True


class ReshardLockedError(ReshardError):
    """Another reshard is running; ``owner`` is ``"host:pid"`` of the holder."""


class ReshardVerifyError(ReshardError):
    """Source and target differ; ``report`` (a :class:`~shardkit.reshard.VerifyReport`) names every
    differing primary key.  The cut-over did not happen."""

    report: VerifyReport

    def __init__(self, message: str, *, report: VerifyReport, **context: Any) -> None:
        super().__init__(message, report=report, **context)
