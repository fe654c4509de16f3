"""SIGKILL the reshard process at random moments, run it again: same end state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from shardkit import HashRing
from shardkit.reshard import load_current_ring
from shardkit.reshard._state import StateStore, reshards

from .helpers import SIZE, assert_placed, build, fingerprint, load, snapshot

OLD = ["s0", "s1", "s2", "s3"]
ALL = [*OLD, "s4"]
ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, urls: dict[str, str]) -> str:
    name = f"reshard_settings_{os.getpid()}_{random.randrange(1 << 30)}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from shardkit import HashRing, HashRingRouter
            from shardkit.reshard import FencingRouter
            DATABASES = {json.dumps(urls)}
            SHARDKIT_RING = HashRing({OLD!r}).to_dict()
            DATABASE_ROUTERS = [FencingRouter(), HashRingRouter(HashRing.from_dict(SHARDKIT_RING))]
            SHARDKIT_METADATA = "tests.reshard.models.Base"
            """
        )
    )
    return name


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_killed_runs_resume(databases: object, tmp_path: Path, seed: int) -> None:
    from tests.conftest import DatabaseFactory

    assert isinstance(databases, DatabaseFactory)
    urls = databases.urls("postgresql", "default", *ALL)
    cluster, router = build(urls, OLD)
    load(cluster, router, max(SIZE // 2, 1000))
    before = fingerprint(snapshot(cluster, ALL))
    settings = _settings(tmp_path, urls)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    cmd = [sys.executable, "-m", "shardkit", "reshard", "run", "--settings", settings, "--add", "s4",
           "--batch-size", "150", "--quiet", "--fence-grace", "0"]  # fmt: skip
    rng = random.Random(seed)
    phases = []
    for attempt in range(20):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if attempt < 8:
            try:
                out, err = proc.communicate(timeout=rng.uniform(0.4, 2.5))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                state = StateStore(cluster).active() if StateStore(cluster).exists() else None
                phases.append(state.phase if state else "not started")
                continue
        else:
            out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        break
    print(f"\nseed {seed}: killed in phases {phases}; last run: {out.decode().strip()}")
    new = HashRing(ALL)
    assert load_current_ring(cluster) == new
    with cluster.engine("default").connect() as conn:
        assert [r.phase for r in conn.execute(select(reshards.c.phase))] == ["done"]
    assert fingerprint(snapshot(cluster, ALL)) == before
    assert_placed(cluster, new, ALL)
    cluster.dispose()


def test_cli_plan_and_dry_run(databases: object, tmp_path: Path) -> None:
    from tests.conftest import DatabaseFactory

    assert isinstance(databases, DatabaseFactory)
    urls = {a: databases.url("sqlite", a) for a in ["default", *ALL]}
    cluster, router = build(urls, OLD)
    load(cluster, router, 300)
    settings = _settings(tmp_path, urls)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    base = [sys.executable, "-m", "shardkit", "reshard"]
    plan = subprocess.run([*base, "plan", "--settings", settings, "--add", "s4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "table users:" in plan.stdout and "s0 -> s4:" in plan.stdout
    assert "table orders (co-located with users by user_id)" in plan.stdout
    dry = subprocess.run([*base, "run", "--settings", settings, "--add", "s4", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "dry run (nothing written)" in dry.stdout and "switch the ring" in dry.stdout
    bad = subprocess.run([*base, "plan", "--settings", "no_such_settings_module", "--add", "s4"], cwd=ROOT, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "no_such_settings_module" in bad.stderr and "Traceback" not in bad.stderr
    again = subprocess.run([*base, "plan", "--settings", settings, "--remove", "s9"], cwd=ROOT, env=env,
                           capture_output=True, text=True)  # fmt: skip
    # a shard that is not in the ring is an error (issue 10), the same one `ring diff` gives
    assert again.returncode == 2 and "shard 's9' is not in the ring (its shards: s0, s1, s2, s3)" in again.stderr
    cluster.dispose()
