"""Django's own multi-db test suite (tests/multiple_database), ported to shardkit's API."""
