from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import shardkit

from .models import SHARDS, Base, make_cluster


@pytest.fixture
def cluster(make_urls: Callable[..., dict[str, str]]) -> Iterator[shardkit.Cluster]:
    cluster = make_cluster(make_urls("default", *SHARDS))
    cluster.create_all(Base)
    with cluster.activate():
        yield cluster
    cluster.dispose()
