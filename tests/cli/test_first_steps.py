"""A newcomer's first hour with the command: what it found, as regression tests.

The demo and the user's own files, check and migrate agreeing, an alias that is down (a real
PostgreSQL shard behind a loopback proxy that cuts it), an alias that is not in the ring,
usage errors, ``--settings settings.py`` and the little things of the output.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from tests.faults import proxied_url, tcp_proxy

from .conftest import BAD_PASSWORD, assert_one_line_error, parse

DEMO_MANIFEST = ".shardkit-demo.json"

SHARDED = """
from shardkit import HashRing
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASES = {urls!r}
SHARDKIT_RING = HashRing(["s0", "s1"], vnodes=64)
SHARDKIT_METADATA = "{name}:Base"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
"""


def _sharded(workdir: Path, urls: dict[str, str], tag: str) -> str:
    name = f"sk_settings_{tag}{abs(hash(str(workdir))) % 10**6}"
    (workdir / f"{name}.py").write_text(SHARDED.format(urls=urls, name=name))
    return name


def _sqlite_urls(workdir: Path, *aliases: str) -> dict[str, str]:
    return {a: f"sqlite:///{workdir / f'{a}.db'}" for a in aliases}


# ------------------------------------------------------------------------------- demo
def _demo(run: Callable[..., Result], folder: Path | str, *args: str) -> Result:
    return run("demo", "--dir", str(folder), "--users", "60", "--shards", "2", *args)


def test_demo_never_deletes_the_users_files(run, workdir: Path) -> None:
    (workdir / "mine.db").write_bytes(b"my own data")
    (workdir / "notes.txt").write_text("keep me")
    refused = _demo(run, ".")
    assert_one_line_error(refused, code=2, contains="files the demo did not create (mine.db, notes.txt)")
    assert "--force" in refused.stderr
    assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith("sk_")) == ["mine.db", "notes.txt"]
    for _ in range(2):  # with --force, twice: the second run replaces only the demo's own files
        forced = _demo(run, ".", "--force")
        assert forced.exit_code == 0, forced.output
        assert (workdir / "mine.db").read_bytes() == b"my own data"
        assert (workdir / "notes.txt").read_text() == "keep me"
        assert {"shard0.db", "shard1.db", DEMO_MANIFEST} <= {p.name for p in workdir.iterdir()}
    assert json.loads((workdir / DEMO_MANIFEST).read_text())["files"] == ["shard0.db", "shard1.db"]


def test_demo_never_overwrites_a_file_of_its_name(run, workdir: Path) -> None:
    own = workdir / "shard0.db"
    con = sqlite3.connect(own)
    con.execute("CREATE TABLE precious (x)")
    con.commit()
    con.close()
    before = own.read_bytes()
    result = _demo(run, ".", "--force")
    assert_one_line_error(result, code=2, contains="shard0.db exists and was not created by the demo")
    assert own.read_bytes() == before
    assert not (workdir / "shard1.db").exists() and not (workdir / DEMO_MANIFEST).exists()


def test_demo_manifest_names_only_what_the_demo_creates(run, workdir: Path) -> None:
    """A manifest cannot make the demo delete other files: only its own shardN.db names count."""
    folder = workdir / "d"
    folder.mkdir()
    (workdir / "outside.db").write_text("outside")
    (folder / "mine.db").write_text("mine")
    (folder / DEMO_MANIFEST).write_text(
        json.dumps({"created_by": "shardkit demo", "files": ["mine.db", "../outside.db", "shard0.db"]})
    )
    assert_one_line_error(_demo(run, folder), code=2, contains="(mine.db)")
    assert _demo(run, folder, "--force").exit_code == 0
    assert (folder / "mine.db").read_text() == "mine" and (workdir / "outside.db").read_text() == "outside"
    (folder / DEMO_MANIFEST).write_text("{not json")
    assert_one_line_error(_demo(run, folder, "--force"), code=2, contains="not a shardkit demo manifest")
    assert (folder / "shard0.db").exists()  # an unreadable manifest: nothing is touched


def _placement(folder: Path, shards: int) -> dict[str, list[int]]:
    out = {}
    for i in range(shards):
        con = sqlite3.connect(folder / f"shard{i}.db")
        out[f"shard{i}"] = sorted(r[0] for r in con.execute("SELECT id FROM users"))
        con.close()
    return out


def _stable(stdout: str) -> str:
    return re.sub(r"in \d+\.\d+s", "in Xs", stdout)


def test_demo_reruns_same_seed_same_placement(run, workdir: Path) -> None:
    folder = workdir / "demo"
    first = run("demo", "--dir", "demo", "--users", "300", "--shards", "3", "--seed", "7")
    assert first.exit_code == 0, first.output
    placed = _placement(folder, 3)
    assert sum(len(ids) for ids in placed.values()) == 300
    again = run("demo", "--dir", "demo", "--users", "300", "--shards", "3", "--seed", "7")
    assert again.exit_code == 0, again.output  # its own folder: no --force needed
    assert _placement(folder, 3) == placed
    assert _stable(again.stdout) == _stable(first.stdout)
    # what it lists is what it made; nothing a package user cannot run
    assert "default.db" not in first.stdout and not (folder / "default.db").exists()
    assert "pytest" not in first.stdout
    listed = [m.group(1) for m in re.finditer(r"sqlite:///(\S+)", first.stdout)]
    assert sorted(listed) == [f"demo/shard{i}.db" for i in range(3)]
    assert all((workdir / name).exists() for name in listed)
    other = run("demo", "--dir", "demo", "--users", "300", "--shards", "2", "--seed", "8")
    assert other.exit_code == 0, other.output
    assert not (folder / "shard2.db").exists()  # the demo's own file of the earlier run: removed
    assert sorted(p.name for p in folder.iterdir()) == [DEMO_MANIFEST, "shard0.db", "shard1.db"]


# ------------------------------------------------------------------ check and migrate
def test_check_goes_green_after_migrate(run, workdir: Path) -> None:
    urls = _sqlite_urls(workdir, "default", "s0", "s1")
    name = _sharded(workdir, urls, "green")
    before = run("check", "--settings", name, "--json")
    assert_one_line_error(before, code=1, contains="3 of 3 aliases failed")
    assert "shardkit migrate creates it" in parse(before)["aliases"][0]["error"]
    migrated = run("migrate", "--settings", name)
    assert migrated.exit_code == 0, migrated.output
    assert "default: nothing to migrate" in migrated.stdout and "created the empty SQLite file" in migrated.stdout
    assert migrated.stderr == ""  # no progress output when stderr is not a terminal
    after = run("check", "--settings", name)
    assert after.exit_code == 0, after.output
    assert "all 3 aliases reachable" in after.stdout
    data = parse(run("migrate", "--settings", name, "--json"))
    assert {r["alias"]: r["created_file"] for r in data["aliases"]} == {"default": None, "s0": None, "s1": None}


def test_check_one_alias_wording_and_alignment(run, workdir: Path) -> None:
    urls = _sqlite_urls(workdir, "default", "s0", "s1")
    for url in urls.values():
        sqlite3.connect(url.removeprefix("sqlite:///")).close()
    name = _sharded(workdir, urls, "align")
    result = run("check", "--settings", name, "-d", "s0")
    assert result.exit_code == 0, result.output
    header, row, last = result.stdout.splitlines()
    assert last == "alias s0 reachable" and "all 1" not in result.stdout
    assert row.index("sqlite:///") == header.index("url")
    assert row.index("SQLite") == header.index("server")
    assert row.rindex(" ok") + 1 == header.index("status")
    assert row.index(" ms") == header.index("connect") + len("connect") - 3  # right-aligned columns
    bad = _sharded(workdir, {**urls, "s1": f"sqlite:///{workdir / 'absent.db'}"}, "one")
    assert_one_line_error(run("check", "--settings", bad, "-d", "s1"), code=1, contains="1 of 1 alias failed: s1")


# ------------------------------------------------------------------ an alias that is down
def test_alias_down_is_named_exit_1(run, workdir: Path, databases) -> None:
    """A shard cut by a real proxy in front of PostgreSQL: every command names it and exits 1."""
    urls = {a: databases.url("postgresql", a) for a in ("default", "s0", "s1", "s2")}
    with tcp_proxy(urls["s1"]) as proxy:
        urls["s1"] = proxied_url(urls["s1"], proxy)
        name = _sharded(workdir, urls, "down")
        assert run("migrate", "--settings", name).exit_code == 0
        from sqlalchemy import create_engine, text

        for alias in ("s0", "s1"):
            engine = create_engine(urls[alias])
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')"))
            engine.dispose()
        up = run("ring", "distribution", "--settings", name, "--from-table", "users", "--json")
        assert up.exit_code == 0, up.output
        assert run("reshard", "plan", "--settings", name, "--add", "s2").exit_code == 0
        proxy.cut()
        for args in (
            ["ring", "distribution", "--from-table", "users"],
            ["reshard", "plan", "--add", "s2"],
            ["reshard", "run", "--add", "s2", "--dry-run"],
            ["check", "--timeout", "2"],
            ["migrate"],
        ):
            result = run(*args, "--settings", name)
            line = assert_one_line_error(result, code=1, contains="s1")
            assert "s0" not in line.split(":", 2)[-1].split("(")[0], (args, line)  # only the alias that is down
            if args[0] != "check" and args[0] != "migrate":
                assert "alias 's1' is unreachable" in line, (args, line)


def test_alias_down_on_an_unused_port_hides_the_password(run, workdir: Path) -> None:
    urls = _sqlite_urls(workdir, "default", "s0")
    urls["s1"] = f"postgresql+psycopg2://mario:{BAD_PASSWORD}@127.0.0.1:1/nowhere"
    for alias in ("default", "s0"):
        sqlite3.connect(urls[alias].removeprefix("sqlite:///")).close()
    name = _sharded(workdir, urls, "port")
    assert_one_line_error(run("migrate", "--settings", name), code=1, contains="1 of 3 aliases: s1")
    for args in (["ring", "distribution", "--from-table", "users"], ["reshard", "plan", "--add", "s0"]):
        result = run(*args, "--settings", name)
        assert_one_line_error(result, code=1, contains="alias 's1' is unreachable")
        assert "***" in result.stderr or "mario" not in result.stderr


# --------------------------------------------------------------- an alias not in the ring
def test_alias_not_in_the_ring_is_the_same_error_everywhere(run, workdir: Path) -> None:
    urls = _sqlite_urls(workdir, "default", "s0", "s1")
    name = _sharded(workdir, urls, "typo")
    assert run("migrate", "--settings", name).exit_code == 0
    plan = assert_one_line_error(run("reshard", "plan", "--settings", name, "--remove", "s00"), code=2)
    dry = assert_one_line_error(run("reshard", "run", "--settings", name, "--remove", "s00", "--dry-run"), code=2)
    diff = assert_one_line_error(run("ring", "diff", "--settings", name, "--remove", "s00"), code=2)
    assert plan == dry == diff == "shardkit: error: shard 's00' is not in the ring (its shards: s0, s1)"
    removed = run("reshard", "plan", "--settings", name, "--remove", "s1")
    assert removed.exit_code == 0, removed.output


def test_reshard_plan_says_the_options(run, workdir: Path) -> None:
    urls = _sqlite_urls(workdir, "default", "s0", "s1", "s2")
    name = _sharded(workdir, urls, "opts")
    assert run("migrate", "--settings", name).exit_code == 0
    for args in ([], ["--add", "s2", "--remove", "s0"]):
        line = assert_one_line_error(run("reshard", "plan", "--settings", name, *args), code=2)
        assert "--new-ring, --add or --remove" in line and "new_ring=" not in line
    result = run("reshard", "plan", "--settings", name, "--add", "s2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("current ring: version ") and "ring ring" not in result.stdout
    assert lines[1].startswith("new ring:     version ") and "3 shards: s0, s1, s2" in lines[1]
    assert "table users: 0 of 0 rows move" in result.stdout


# ------------------------------------------------------------------------ usage errors
def test_usage_errors_are_one_line(run, workdir: Path, write_settings) -> None:
    name = write_settings(
        "from shardkit import HashRing\n"
        "DATABASES = {'default': 'sqlite://', 's0': 'sqlite://', 's1': 'sqlite://'}\n"
        "SHARDKIT_RING = HashRing(['s0', 's1'], vnodes=8)\n"
    )
    cases = [
        (["ring", "diff", "--settings", name], "exactly one of --add ALIAS or --remove ALIAS"),
        (["ring", "distribution", "--settings", name, "--from-file", "missing.txt"], "missing.txt"),
        (["ring", "distribution", "--settings", name, "--from-file"], "--from-file"),
        (["ring", "show", "--settings", name, "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
        (["--no-such-flag", "check"], "--no-such-flag"),
    ]
    for args, contains in cases:
        result = run(*args)
        assert_one_line_error(result, code=2, contains=contains)
        assert "Usage:" not in result.output and "Try '" not in result.output, result.output
        assert result.stderr.count("\n") == 1, result.stderr
    assert run("ring", "--help").exit_code == 0


def test_from_table_that_does_not_exist_lists_the_tables(run, workdir: Path) -> None:
    urls = _sqlite_urls(workdir, "default", "s0", "s1")
    name = _sharded(workdir, urls, "table")
    assert run("migrate", "--settings", name).exit_code == 0
    line = assert_one_line_error(run("ring", "distribution", "--settings", name, "--from-table", "user"), code=2)
    assert "no table 'user'" in line and "(tables: users)" in line
    # without metadata: the tables of the ring's first shard
    bare = workdir / "bare.toml"
    bare.write_text(
        "[databases]\n" + "".join(f'{a} = "{u}"\n' for a, u in urls.items()) + '[ring]\nshards = ["s0", "s1"]\n'
    )
    line = assert_one_line_error(run("ring", "distribution", "--settings", str(bare), "--from-table", "user"))
    assert "no table 'user' on shard 's0' (tables: users)" in line
    line = assert_one_line_error(
        run("ring", "distribution", "--settings", str(bare), "--from-table", "user", "--column", "id")
    )
    assert "no table 'user' on shard 's0' (tables: users)" in line
    ok = run("ring", "distribution", "--settings", str(bare), "--from-table", "users", "--column", "id", "--json")
    assert ok.exit_code == 0, ok.output
    assert parse(ok)["keys"] == 0


def test_progress_only_on_a_terminal(run, workdir: Path, write_settings) -> None:
    name = write_settings(
        "from shardkit import HashRing\n"
        "DATABASES = {'default': 'sqlite://', 's0': 'sqlite://'}\n"
        "SHARDKIT_RING = HashRing(['s0'], vnodes=8)\n"
    )
    for args in (["ring", "distribution", "--keys", "1000"], ["ring", "diff", "--add", "s1", "--keys", "1000"]):
        result = run(*args, "--settings", name)
        assert result.exit_code == 0, result.output
        assert result.stderr == "", (args, result.stderr)


# ---------------------------------------------------------------------- settings.py
def test_settings_given_as_a_py_path(run, workdir: Path, write_settings) -> None:
    urls = _sqlite_urls(workdir, "default", "s0", "s1")
    name = _sharded(workdir, urls, "pyfile")
    migrated = run("migrate", "--settings", f"{name}.py")
    assert migrated.exit_code == 0, migrated.output
    assert run("--settings", f"./{name}.py", "check").exit_code == 0
    sub = workdir / "conf"
    sub.mkdir()
    other = f"sk_settings_sub{abs(hash(str(workdir))) % 10**6}"
    (sub / f"{other}.py").write_text(SHARDED.format(urls=urls, name=other))
    shown = run("ring", "show", "--settings", f"conf/{other}.py", "--json")
    assert shown.exit_code == 0, shown.output
    assert [s["alias"] for s in parse(shown)["shards"]] == ["s0", "s1"]
    assert_one_line_error(run("check", "--settings", "nowhere.py"), contains="'nowhere.py' does not exist")
    broken = write_settings("DATABASES = {'default': 'sqlite://'}\n1 / 0\n")
    assert_one_line_error(run("check", "--settings", f"{broken}.py"), contains="ZeroDivisionError")


def test_settings_py_the_django_habit(tmp_path: Path) -> None:
    """`shardkit --settings settings.py check` in a fresh process, a file literally named settings.py."""
    db = tmp_path / "default.db"
    sqlite3.connect(db).close()
    (tmp_path / "settings.py").write_text(f"DATABASES = {{'default': 'sqlite:///{db}'}}\n")
    for args in (["--settings", "settings.py", "check"], ["check", "--settings", "settings.py"]):
        proc = subprocess.run(
            [sys.executable, "-m", "shardkit", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "TOML" not in proc.stdout + proc.stderr and "alias default reachable" in proc.stdout


def test_settings_py_from_the_environment(run, workdir: Path, write_settings, monkeypatch) -> None:
    name = write_settings("DATABASES = {'default': 'sqlite://'}\n")
    monkeypatch.setenv("SHARDKIT_SETTINGS", f"{name}.py")
    result = run("check", "--json")
    assert result.exit_code == 0, result.output


def test_load_settings_of_a_py_path_imports_the_file(workdir: Path, write_settings) -> None:
    """The Python API takes a settings.py path as the command does (one loader, see shardkit._settings)."""
    import shardkit
    from shardkit._settings import load_settings
    from shardkit.errors import ConfigError

    name = write_settings("DATABASES = {'default': 'sqlite://', 'other': 'sqlite://'}\n")
    assert load_settings(f"{workdir}/{name}.py").cluster.aliases == ("default", "other")
    assert shardkit.Cluster.from_settings(workdir / f"{name}.py").aliases == ("default", "other")
    with pytest.raises(ConfigError, match=r"settings file 'conf/settings.py' does not exist") as caught:
        load_settings("conf/settings.py")
    assert "TOML" not in str(caught.value)
