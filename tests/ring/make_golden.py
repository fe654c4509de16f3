"""Regenerate golden.json from the pure-Python implementation (the specification).

Run once, review the diff, commit:  SHARDKIT_RING_IMPL=python python tests/ring/make_golden.py
A change to golden.json means every deployed ring would move keys: it needs a
new encoding/ring spec version, never a silent update.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

from shardkit.ring import INT_MAX, INT_MIN, HashRing, _lookup_py, _ring

HERE = Path(__file__).parent


def golden_keys() -> list[Any]:
    rnd = random.Random(20240101)
    keys: list[Any] = [0, 1, -1, 2, INT_MAX, INT_MIN, INT_MAX - 1, INT_MIN + 1, 2**31, -(2**31), 2**32]
    keys += [rnd.randint(INT_MIN, INT_MAX) for _ in range(60)] + list(range(40))
    keys += ["", "0", "1", "a", "user:1", "é", "日本語", "😀", "a\x00b", " ", "x" * 300, "Ω≈ç√"]
    keys += [f"user:{rnd.getrandbits(40)}" for _ in range(60)]
    keys += [b"", b"\x00", b"1", b"\xff" * 20] + [rnd.randbytes(rnd.randint(1, 40)) for _ in range(60)]
    keys += [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)] + [uuid.UUID(int=rnd.getrandbits(128)) for _ in range(60)]
    return keys


def dump_key(key: Any) -> list[str]:
    if isinstance(key, int):
        return ["int", str(key)]
    if isinstance(key, str):
        return ["str", key]
    if isinstance(key, bytes):
        return ["bytes", key.hex()]
    return ["uuid", str(key)]


def load_key(item: list[str]) -> Any:
    kind, text = item
    return {"int": int, "str": str, "bytes": bytes.fromhex, "uuid": uuid.UUID}[kind](text)


def layouts() -> dict[str, HashRing]:
    ten = [f"shard{i}" for i in range(10)]
    bucket_history = HashRing(ten, mode="buckets", buckets=4096)
    bucket_history.add("shard10", weight=2)
    bucket_history.remove("shard3")
    classic_history = HashRing(ten, vnodes=160)
    classic_history.add("shard10")
    classic_history.remove("shard3")
    return {
        "classic-3": HashRing(["s0", "s1", "s2"]),
        "classic-10-vnodes160": HashRing(ten, vnodes=160),
        "classic-10-history": classic_history,
        "weighted": HashRing({"small": 1, "medium": 2, "large": 4.5}, vnodes=100),
        "buckets-10": HashRing(ten, mode="buckets", buckets=4096),
        "buckets-weighted": HashRing({"a": 1, "b": 3, "c": 0.5}, mode="buckets", buckets=480),
        "buckets-history": bucket_history,
    }


def main() -> None:
    _ring._impl = _lookup_py
    keys = golden_keys()
    out: dict[str, Any] = {
        "keys": [dump_key(k) for k in keys],
        "encoded": [_lookup_py.encode_key(k).hex() for k in keys],
        "hashes": [_lookup_py.hash_key(k) for k in keys],
        "layouts": {},
    }
    for name, ring in layouts().items():
        out["layouts"][name] = {"ring": ring.to_dict(), "owners": ring.get_many(keys)}
    (HERE / "golden.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
