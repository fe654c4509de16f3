"""shardkit's errors: one tree, one base class.

Every error shardkit raises on purpose derives from :class:`ShardkitError`.
Where a builtin fits, the error inherits it too, so ``except ValueError``
keeps working for code that does not know shardkit::

    ShardkitError
     +-- ConfigError (ValueError)            bad DATABASES / settings / ring layout
     |    +-- UnknownAliasError (KeyError)    an alias that is not in DATABASES
     |    +-- UnknownEngineError              an ENGINE shardkit cannot map to a dialect
     |    +-- RouterImportError (ImportError) a DATABASE_ROUTERS entry that does not import
     +-- RoutingError                        the router chain gave an unusable answer
     |    +-- InvalidRouteError               a router returned something that is not an alias
     |    +-- ScatterRefusedError             a statement that would reach every shard, under scatter="refuse"
     |    +-- CrossDatabaseQueryError (ValueError) a subquery placed on another database
     |    +-- RouterError                     a router's own method raised (the cause is kept)
     +-- InvalidKeyError (TypeError)         a shard key of a type or value the ring refuses
     +-- RelationError (ValueError)          allow_relation refused a relation (cross-shard)
     +-- UnsavedObjectError (ValueError)     a related-manager call on an object not saved there
     +-- ObjectDoesNotExist (LookupError)    get() found no row; each model's DoesNotExist derives from it
     +-- MultipleObjectsReturned (LookupError) get() found several rows; each model has its own subclass
     +-- FieldError (AttributeError)         a keyword lookup names a field or lookup the model lacks
     +-- CrossShardWriteError                a multi-shard commit refused by the strict setting
     +-- UniqueLookupError (sqlalchemy IntegrityError) a unique lookup value already used on the cluster
     +-- CommitError                         a commit over several shards did not end alike on all of them
     |    +-- PartialCommitError              "allow": some shards committed, the others did not
     |    +-- TwoPhaseCommitError             "twophase": decided commit, some shards left for recovery
     +-- TwoPhaseRecoveryError               recovery could not reach or resolve some aliases
     +-- FanoutError                         a read across shards failed
     |    +-- UnsupportedQueryError           a statement shape that cannot be merged correctly
     |    +-- InvalidCursorError (TypeError)  a keyset cursor value that is not a plain value
     |    +-- InvalidPageError (ValueError)   a keyset page size below 1
     |    +-- ShardQueryError                 one or more shards failed: ``.errors`` maps alias -> exception
     |    +-- FanoutTimeoutError (TimeoutError) the fan-out deadline passed
     |    +-- MaxRowsError                    a fan-out read more than its ``max_rows``; the other shards were cancelled
     +-- ReshardError                        a reshard that cannot start, continue or verify
          +-- ShardMovingError                a write (or an every-shard read) of a key being moved; retry
          +-- ReshardLockedError              another reshard holds the lock (``owner`` names it)
          +-- ReshardVerifyError              verify found differences (``report`` lists every differing key)

Context is passed as keyword arguments and kept as attributes (``alias``,
``model``, ``key``), so callers can react without parsing messages.  No error
message ever contains a password: URLs are rendered with
``render_as_string(hide_password=True)`` before they reach a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import IntegrityError as _IntegrityError

__all__ = [
    "CommitError",
    "ConfigError",
    "CrossDatabaseQueryError",
    "CrossShardWriteError",
    "FanoutError",
    "FanoutTimeoutError",
    "FieldError",
    "InvalidCursorError",
    "InvalidKeyError",
    "InvalidPageError",
    "InvalidRouteError",
    "MaxRowsError",
    "MultipleObjectsReturned",
    "ObjectDoesNotExist",
    "PartialCommitError",
    "RelationError",
    "ReshardError",
    "ReshardLockedError",
    "ReshardVerifyError",
    "RouterError",
    "RouterImportError",
    "RoutingError",
    "ScatterRefusedError",
    "ShardMovingError",
    "ShardQueryError",
    "ShardkitError",
    "TwoPhaseCommitError",
    "TwoPhaseRecoveryError",
    "UniqueLookupError",
    "UnknownAliasError",
    "UnknownEngineError",
    "UnsavedObjectError",
    "UnsupportedQueryError",
]


class ShardkitError(Exception):
    """Base class of every error shardkit raises.

    :param message: the human-readable explanation.
    :param context: keyword context kept as attributes (``alias=``, ``model=``, ``key=`` ...).
    """

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for name, value in context.items():
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.message


class ConfigError(ShardkitError, ValueError):
    """The DATABASES dict, the settings module or a ring layout is invalid."""


class UnknownAliasError(ConfigError, KeyError):
    """An alias was named that is not a key of DATABASES."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self.message


class UnknownEngineError(ConfigError):
    """An ENGINE value that maps to no SQLAlchemy dialect."""


class RouterImportError(ConfigError, ImportError):
    """A dotted path in DATABASE_ROUTERS that does not import."""


class RoutingError(ShardkitError):
    """The router chain could not give a usable answer."""


class InvalidRouteError(RoutingError, ValueError):
    """A router returned a value that is not an alias of the cluster."""


class ScatterRefusedError(RoutingError):
    """``scatter="refuse"``: the statement names no shard key, so it would run on every shard.

    Raised before anything runs.  Attributes: ``statement`` (its SQL, shortened), ``model``,
    ``shard_key`` (the column names the statement could filter on), ``aliases``.
    """


class RouterError(RoutingError):
    """A method of a router raised an exception that is not a shardkit error.

    ``router`` is the router object, ``method`` the method's name (``"db_for_read"`` ...),
    ``model`` the model asked about; the router's exception is ``__cause__``.  A shardkit
    error a router raises on purpose (``ShardMovingError``, ``InvalidKeyError`` ...) is not
    wrapped: it reaches the caller unchanged.
    """


class InvalidKeyError(ShardkitError, TypeError):
    """A shard key the ring cannot hash: wrong type, None, bool, NaN or out of range."""


class RelationError(ShardkitError, ValueError):
    """allow_relation refused to relate two objects (they live on different databases)."""


class CrossDatabaseQueryError(RoutingError, ValueError):
    """A query placed on one database uses a subquery placed on another (Django's ValueError)."""


class UnsavedObjectError(ShardkitError, ValueError):
    """A related-manager call needs an object saved on the database it works on (Django's ValueError)."""


class ObjectDoesNotExist(ShardkitError, LookupError):
    """``get()`` found no row. Each model has its own subclass, ``Model.DoesNotExist`` (Django's)."""


class MultipleObjectsReturned(ShardkitError, LookupError):
    """``get()`` found more than one row. Each model has its own subclass, ``Model.MultipleObjectsReturned``."""


class FieldError(ShardkitError, AttributeError):
    """A keyword lookup (``filter(name__startswith=...)``) names a field or a lookup the model does not have."""


class CrossShardWriteError(ShardkitError):
    """A commit touching several shards was refused before anything was written."""


class UniqueLookupError(ShardkitError, _IntegrityError):
    """A unique lookup (``__lookups__ = {"email": {"unique": True}}``) refused a value another
    row of the cluster already holds (or a write in progress is registering).  Nothing of the
    refused write was left on any database.  Also SQLAlchemy's ``IntegrityError``, as a unique
    index's refusal would be.  Attributes: ``model``, ``column``, ``value``, ``holder`` (the
    shard key of the row holding it, when known), ``pending`` (held by a write in progress)."""

    def __init__(self, message: str, **context: Any) -> None:
        _IntegrityError.__init__(self, None, None, Exception(message))
        self.message = message
        self.context = context
        for name, value in context.items():
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.message, self.context))


def _rebuild(cls: type[ShardkitError], message: str, context: dict[str, Any]) -> ShardkitError:
    return cls(message, **context)


class CommitError(ShardkitError):
    """A commit over several shards that did not end the same way on every shard.

    ``committed`` lists the aliases whose writes are committed, ``not_committed`` the
    others (in the order they were committed in); the driver's error is ``__cause__``.
    """

    committed: list[str]
    not_committed: list[str]


class PartialCommitError(CommitError):
    """``cross_shard_writes="allow"``: a COMMIT failed on ``alias`` after the shards in
    ``committed`` had committed; the rest (``rolled_back``) were rolled back.

    The COMMIT that failed may still have been applied by a server that lost the
    connection after receiving it: ``alias`` is listed as not committed, check it.
    """

    alias: str
    rolled_back: list[str]


class TwoPhaseCommitError(CommitError):
    """``cross_shard_writes="twophase"``: the decision (``decision == "commit"``) is logged
    and ``committed`` are committed, but ``COMMIT PREPARED`` failed on ``not_committed``
    (their transactions stay prepared, locks held, until ``recover`` commits them).
    ``decision == "unknown"``: logging the decision failed and ``default`` could not be
    checked; every alias stays prepared until ``recover`` settles it by the log.
    ``decision == "abort"``: two-phase recovery logged ABORT for this transaction before its
    COMMIT could be logged (it stalled longer than recovery's ``min_age``); nothing is
    committed anywhere (``committed`` is empty); every alias is rolled back (by recovery,
    following the logged ABORT, where this commit could not).

    ``txid`` names the transaction in ``shardkit_twophase_log``; ``errors`` maps each alias
    that failed to its exception.
    """

    decision: str
    txid: str
    errors: dict[str, BaseException]


class TwoPhaseRecoveryError(ShardkitError):
    """Two-phase recovery could not reach (or resolve on) some aliases; it resolved the others.

    ``errors`` maps each alias that failed to its exception, ``resolved`` lists the
    :class:`~shardkit._twophase.InDoubt` transactions that were resolved all the same.
    """

    errors: dict[str, BaseException]
    resolved: list[Any]


class FanoutError(ShardkitError):
    """A read across several shards could not be answered."""


class UnsupportedQueryError(FanoutError, NotImplementedError):
    """The statement has a shape whose cross-shard merge would not be exact.

    ``construct`` names what was refused (``"window function"``, ``"LIMIT in a subquery"`` ...).
    """


class InvalidCursorError(FanoutError, TypeError):
    """A keyset cursor value that is a SQL expression (or anything but a plain value).

    ``position`` is its index in the cursor.  Cursor values are bound as parameters, never
    spliced into the SQL, so ``text("-1 OR TRUE")`` is refused rather than run.
    """


class InvalidPageError(FanoutError, ValueError):
    """A keyset page that cannot be read: ``page_size`` below 1 (``page_size`` is kept)."""


class ShardQueryError(FanoutError):
    """One or more shards failed during a fan-out.

    ``errors`` maps each failed alias to its exception.
    """

    def __init__(self, message: str, *, errors: Mapping[str, BaseException], **context: Any) -> None:
        super().__init__(message, errors=dict(errors), **context)


class FanoutTimeoutError(ShardQueryError, TimeoutError):
    """The deadline of a fan-out passed before every shard answered."""


class MaxRowsError(FanoutError):
    """A fan-out read more rows than its ``max_rows``: it stopped, the shards still running were
    cancelled.  Attributes: ``max_rows``, ``rows`` (counted when it stopped), ``alias`` (the
    shard whose rows crossed the limit, ``None`` when counted during the merge)."""


class ReshardError(ShardkitError):
    """A reshard cannot start, resume, verify or cut over."""


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

    report: Any

    def __init__(self, message: str, *, report: Any, **context: Any) -> None:
        super().__init__(message, report=report, **context)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, for one-line reports (a database error's own
    message, not SQLAlchemy's wrapper with the SQL; drivers put no password in it); the type's
    name when the message is empty."""
    orig = getattr(exc, "orig", None)
    shown = orig if isinstance(orig, BaseException) else exc
    lines = str(shown).strip().splitlines()
    return lines[0].strip() if lines else type(shown).__name__


def brief(exc: BaseException) -> str:
    """``Type: first line`` of an error (see :func:`first_line`)."""
    orig = getattr(exc, "orig", None)
    shown = orig if isinstance(orig, BaseException) else exc
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0].strip()}" if lines else type(shown).__name__
