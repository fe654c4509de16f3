"""shardkit: Django's multiple-database model for SQLAlchemy 2.x, turned into real sharding.

::

    import shardkit
    cluster = shardkit.Cluster(DATABASES, routers=[...])
    cluster.create_all(Base)
    with cluster.session() as s:
        s.add(user); s.commit()
        s.scalars(select(User).options(shardkit.using("credentials")))
    shardkit.db_of(user)
"""

from __future__ import annotations

from . import errors, lookups
from ._cluster import Cluster, get_active_cluster
from ._config import DEFAULT_DB_ALIAS, AliasSpec
from ._events import contains, listen, listens_for, remove
from ._manager import Manager, ModelMixin, QuerySet, RelatedList, RelatedManager, ValuesQuerySet
from ._routing import RouterChain
from ._session import ShardSession, current_session, db_of, using
from ._settings import Settings, load_settings
from .errors import FieldError, MultipleObjectsReturned, ObjectDoesNotExist, ShardkitError
from .fanout._orm import ShardedResult, shards_of
from .ids import IdGenerator, next_id
from .ring import HashRing, HashRingRouter
from .typing import ShardTargets

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DB_ALIAS",
    "AliasSpec",
    "Cluster",
    "FieldError",
    "HashRing",
    "HashRingRouter",
    "IdGenerator",
    "Manager",
    "ModelMixin",
    "MultipleObjectsReturned",
    "ObjectDoesNotExist",
    "QuerySet",
    "RelatedList",
    "RelatedManager",
    "RouterChain",
    "Settings",
    "ShardSession",
    "ShardTargets",
    "ShardedResult",
    "ShardkitError",
    "ValuesQuerySet",
    "contains",
    "current_session",
    "db_of",
    "errors",
    "get_active_cluster",
    "listen",
    "listens_for",
    "load_settings",
    "lookups",
    "next_id",
    "remove",
    "shards_of",
    "using",
]
