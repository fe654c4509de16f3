"""The example's shardkit settings: SQLite files in the current folder, two shards on a ring."""

from shardkit import HashRing

DATABASES = {
    "default": "sqlite:///default.db",
    "s0": "sqlite:///s0.db",
    "s1": "sqlite:///s1.db",
}
DATABASE_ROUTERS = ["exampleapp.UnshardedOnDefault"]
SHARDKIT_RING = HashRing(["s0", "s1"])  # a HashRingRouter(SHARDKIT_RING) is appended to the routers
SHARDKIT_METADATA = "exampleapp:Base"
