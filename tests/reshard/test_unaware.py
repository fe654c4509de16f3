"""Writers in other processes that never heard of the reshard, a reshard SIGKILLed after its copy
and resumed: no acknowledged write is lost, nothing fails, no read of an existing row is empty.

The fault this reproduces: writer processes built with a plain ``HashRingRouter`` (no
``FencingRouter``, no ``watch()``) wrote moving keys during the cut-over; with the reshard
killed after its copy and run again, 6 of 348 acknowledged writes were lost, another run died
with a ``ForeignKeyViolation`` in its delete phase, and a read of an existing row returned
nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select, text

from shardkit import HashRing
from shardkit.reshard import load_current_ring
from shardkit.reshard._state import StateStore, reshards

from ..conftest import DatabaseFactory
from .helpers import assert_placed, build, load, snapshot

OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]
ROOT = Path(__file__).resolve().parents[2]
USERS = 1500

WRITER = """
import json, os, random, sys, time
from shardkit import Cluster, HashRing, HashRingRouter
from shardkit.reshard import ShardMovingError
from tests.reshard.models import Order, User

urls, log_path, stop = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
seed, users = int(sys.argv[4]), int(sys.argv[5])
cluster = Cluster(urls, routers=[HashRingRouter(HashRing({old!r}))])  # never told about reshards
rng = random.Random(seed)
next_id = 20_000_000 + seed * 1_000_000
log = open(log_path, "a")
retries = 0
while not os.path.exists(stop):
    op = rng.random()
    uid = next_id if op < 0.4 else rng.randint(1, users)
    for attempt in range(3000):
        try:
            with cluster.session() as s:
                if op < 0.4:  # a new user and its order: parent, then child
                    s.add(User(id=uid, name=f"w{{uid}}", score=0))
                    s.flush()
                    s.add(Order(id=uid * 10, user_id=uid, amount=1))
                elif op < 0.8:  # an update of an existing user (an empty read is a failure)
                    user = s.get(User, uid)
                    if user is None:
                        print(f"EMPTY READ of existing user {{uid}}", file=sys.stderr)
                        sys.exit(3)
                    user.score = User.score + 1  # in SQL: the two writers may pick the same user
                else:  # a read of an existing user's orders, by the shard key
                    from sqlalchemy import func, select
                    n = s.scalar(select(func.count()).select_from(Order).where(Order.user_id == uid))
                    if n != 3:
                        print(f"EMPTY READ: user {{uid}} has {{n}} orders, not 3", file=sys.stderr)
                        sys.exit(3)
                s.commit()
            break
        except ShardMovingError:
            retries += 1
            time.sleep(0.01)
    else:
        print("still refused after 3000 tries", file=sys.stderr)
        sys.exit(4)
    if op < 0.4:
        log.write(f"ins {{uid}}\\n")
        next_id += 1
    elif op < 0.8:
        log.write(f"upd {{uid}}\\n")
    log.flush()
print(f"retries {{retries}}")
"""


def _settings(tmp_path: Path, urls: dict[str, str]) -> str:
    name = f"reshard_unaware_{os.getpid()}_{random.randrange(1 << 30)}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from shardkit import HashRing, HashRingRouter
            DATABASES = {json.dumps(urls)}
            SHARDKIT_RING = HashRing({OLD!r}).to_dict()
            DATABASE_ROUTERS = [HashRingRouter(HashRing.from_dict(SHARDKIT_RING))]
            SHARDKIT_METADATA = "tests.reshard.models.Base"
            """
        )
    )
    return name


@pytest.mark.parametrize("kill_in", ["fenced", "switched", "deleting"])
def test_unaware_writers_through_a_killed_and_resumed_reshard(
    databases: DatabaseFactory, tmp_path: Path, kill_in: str
) -> None:
    urls = databases.urls("postgresql", "default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, USERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    settings = _settings(tmp_path, urls)
    (tmp_path / "writer.py").write_text(WRITER.format(old=OLD))
    stop = tmp_path / "stop"
    logs = [tmp_path / f"writer{n}.log" for n in range(2)]
    writers = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "writer.py"), json.dumps(urls), str(log), str(stop), str(n), str(USERS)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n, log in enumerate(logs)
    ]
    cmd = [sys.executable, "-m", "shardkit", "reshard", "run", "--settings", settings, "--add", "s4",
           "--batch-size", "100", "--quiet", "--fence-grace", "1.5"]  # fmt: skip
    store = StateStore(cluster)
    killed_in = None
    try:
        time.sleep(1.0)  # the writers are writing
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            state = store.active() if store.exists() else None
            if state is not None and state.phase == kill_in:
                proc.send_signal(signal.SIGKILL)
                killed_in = state.phase
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=120)
        assert killed_in == kill_in, f"the reshard ended before phase {kill_in}: {err.decode()[-2000:]}"
        time.sleep(1.5)  # the writers go on while no reshard runs: the databases keep the fence
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=180)
        assert again.returncode == 0, again.stderr.decode()[-3000:]
        time.sleep(1.5)  # and after it
    finally:
        stop.touch()
        outcomes = [w.communicate(timeout=60) for w in writers]
    for w, (_out, err) in zip(writers, outcomes, strict=True):
        assert w.returncode == 0, err.decode()[-3000:]
    inserted: list[int] = []
    updates: Counter[int] = Counter()
    for log in logs:
        for line in log.read_text().splitlines():
            op, uid = line.split()
            if op == "ins":
                inserted.append(int(uid))
            else:
                updates[int(uid)] += 1
    retries = [o.decode().strip() for o, _ in outcomes]
    print(f"\nkilled in {killed_in}; {len(inserted)} inserts, {sum(updates.values())} updates acknowledged; {retries}")
    assert inserted and updates
    new = HashRing(ALL)
    assert load_current_ring(cluster) == new
    with cluster.engine("default").connect() as conn:
        assert [r.phase for r in conn.execute(select(reshards.c.phase))] == ["done"]
    assert_placed(cluster, new, ALL)  # every row where the new ring says, once; no shadow left
    snap = snapshot(cluster, ALL)
    users = {r[0]: r for rows in snap["users"].values() for r in rows}
    orders = {r[0]: r for rows in snap["orders"].values() for r in rows}
    lost = [uid for uid in inserted if uid not in users or uid * 10 not in orders]
    assert not lost, f"{len(lost)} of {len(inserted)} acknowledged inserts lost: {lost[:10]}"
    assert len(users) == USERS + len(inserted) and len(orders) == 3 * USERS + len(inserted)
    wrong = [(uid, users[uid][2], uid % 97 + n) for uid, n in updates.items() if users[uid][2] != uid % 97 + n]
    assert not wrong, f"{len(wrong)} users whose acknowledged updates are not all there: {wrong[:10]}"
    for alias in ALL:
        with cluster.engine(alias).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_fence'")).scalar() == 0
    cluster.dispose()
