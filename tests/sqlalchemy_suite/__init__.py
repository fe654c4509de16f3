"""SQLAlchemy's own sharding contract (``test/ext/test_horizontal_shard.py`` and
``examples/sharding/``), ported to shardkit's API: a router picks the shards."""
