"""shardkit migrate: create_all by allow_migrate, and Alembic's upgrade head on every alias."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from .conftest import BAD_PASSWORD, assert_one_line_error, parse

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "alembic"

MODELS = """
from shardkit import HashRing
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASES = {urls!r}
DATABASE_ROUTERS = ["{name}.DefaultOnly"]
SHARDKIT_RING = HashRing(["s0", "s1"], vnodes=16)
SHARDKIT_METADATA = "{name}:Base"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)


class DefaultOnly:
    def allow_migrate(self, db, model, **hints):
        if model is not None and getattr(model, "__shard_key__", None):
            return None
        return db == "default"
"""


def _write(workdir: Path, urls: dict[str, str]) -> str:
    name = f"sk_settings_mig{abs(hash(str(workdir))) % 10**6}"
    (workdir / f"{name}.py").write_text(MODELS.format(urls=urls, name=name))
    return name


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrate_by_allow_migrate(make_urls, run, workdir: Path) -> None:
    urls = make_urls("default", "s0", "s1")
    name = _write(workdir, urls)
    plan = parse(run("migrate", "--settings", name, "--plan", "--json"))
    assert {r["alias"]: r["tables"] for r in plan["aliases"]} == {
        "default": ["countries"],
        "s0": ["users"],
        "s1": ["users"],
    }
    assert _tables(urls["s0"]) == set()  # --plan connects to nothing
    one = parse(run("migrate", "--settings", name, "--database", "s0", "--json"))
    assert [(r["alias"], r["created"]) for r in one["aliases"]] == [("s0", ["users"])]
    result = run("migrate", "--settings", name, "--json")
    assert result.exit_code == 0, result.output
    data = {r["alias"]: r for r in parse(result)["aliases"]}
    assert data["default"]["created"] == ["countries"]
    assert data["s0"]["created"] == [] and data["s0"]["existing"] == ["users"]
    assert data["s1"]["created"] == ["users"]
    assert _tables(urls["default"]) == {"countries"} and _tables(urls["s1"]) == {"users"}
    again = run("migrate", "--settings", name)
    assert again.exit_code == 0 and "s1: already there: users" in again.stdout


def test_migrate_errors(run, workdir: Path, write_settings) -> None:
    urls = {"default": f"sqlite:///{workdir / 'd.db'}", "s0": f"sqlite:///{workdir / 's0.db'}"}
    urls["s1"] = f"postgresql+psycopg2://mario:{BAD_PASSWORD}@127.0.0.1:1/x"
    name = _write(workdir, urls)
    result = run("migrate", "--settings", name, "--json")
    assert_one_line_error(result, code=1, contains="migrate failed on 1 of 3 aliases: s1")
    rows = {r["alias"]: r for r in parse(result)["aliases"]}
    assert rows["s0"]["created"] == ["users"] and "OperationalError" in rows["s1"]["error"]
    no_meta = write_settings("DATABASES = {'default': 'sqlite://'}\n")
    assert_one_line_error(run("migrate", "--settings", no_meta), contains="--metadata")
    assert_one_line_error(run("migrate", "--settings", no_meta, "--metadata", "nope.mod:Base"), contains="nope.mod")
    assert_one_line_error(run("migrate", "--settings", name, "-d", "s7"), contains="unknown database alias 's7'")


def _example(workdir: Path) -> None:
    for item in EXAMPLE.iterdir():
        if item.name != "__pycache__" and not item.name.endswith(".db"):
            dest = workdir / item.name
            if item.is_dir():
                shutil.copytree(item, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(item, dest)


def _version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
    finally:
        engine.dispose()


def test_alembic_example_on_every_shard(make_urls, backend, run, workdir: Path) -> None:
    pytest.importorskip("alembic", reason="alembic is in the test extra")
    _example(workdir)
    if backend == "sqlite":
        settings = "example_settings"
        urls = {a: f"sqlite:///{workdir / f'{a}.db'}" for a in ("default", "s0", "s1")}
    else:
        urls = make_urls("default", "s0", "s1")
        settings = "example_settings_pg"
        (workdir / f"{settings}.py").write_text(
            "from shardkit import HashRing\n"
            f"DATABASES = {urls!r}\n"
            "DATABASE_ROUTERS = ['exampleapp.UnshardedOnDefault']\n"
            "SHARDKIT_RING = HashRing(['s0', 's1'])\n"
            "SHARDKIT_METADATA = 'exampleapp:Base'\n"
        )
    one = run("migrate", "--settings", settings, "--alembic", "alembic.ini", "-d", "s1", "--json")
    assert one.exit_code == 0, one.output
    assert parse(one)["aliases"] == [{"alias": "s1", "from": None, "to": "0002"}]
    result = run("migrate", "--settings", settings, "--alembic", "alembic.ini")
    assert result.exit_code == 0, result.output
    assert "default: upgraded <base> -> 0002" in result.stdout
    assert "s0: upgraded <base> -> 0002" in result.stdout and "s1: already at 0002" in result.stdout
    assert _tables(urls["default"]) == {"alembic_version", "countries"}
    for shard in ("s0", "s1"):
        assert _tables(urls[shard]) == {"alembic_version", "users"}
        engine = create_engine(urls[shard])
        assert {c["name"] for c in inspect(engine).get_columns("users")} == {"id", "name", "email"}
        engine.dispose()
        assert _version(urls[shard]) == "0002"
    # the example's models and the migrated schema agree: the ORM works on the result
    import exampleapp

    from shardkit._settings import load_settings

    loaded = load_settings(settings)
    with loaded.cluster.session() as s:
        s.add_all([exampleapp.User(name=f"u{i}", email=f"u{i}@example.org") for i in range(20)])
        s.add(exampleapp.Country(code="it", name="Italy"))
        s.commit()
    loaded.cluster.dispose()


def test_alembic_command_itself(workdir: Path, monkeypatch) -> None:
    """`alembic upgrade head` without shardkit's CLI: env.py reads the settings named in alembic.ini."""
    pytest.importorskip("alembic", reason="alembic is in the test extra")
    from alembic import command
    from alembic.config import Config

    _example(workdir)
    config = Config(str(workdir / "alembic.ini"))
    config.attributes["shardkit_report"] = report = []
    config.cmd_opts = None
    command.upgrade(config, "0001")
    assert [r["to"] for r in report] == ["0001", "0001", "0001"]
    assert _version(f"sqlite:///{workdir / 's0.db'}") == "0001"
    command.downgrade(config, "base")
    assert _tables(f"sqlite:///{workdir / 's0.db'}") == {"alembic_version"}


def test_alembic_missing(run, workdir: Path, write_settings, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "alembic", None)
    name = write_settings("DATABASES = {'default': 'sqlite://'}\n")
    (workdir / "alembic.ini").write_text("[alembic]\n")
    assert_one_line_error(run("migrate", "--settings", name, "--alembic", "alembic.ini"), contains="shardkit[alembic]")
