"""DATABASES parsing, engines, and secrets kept out of every repr and message."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from sqlalchemy import text

import shardkit
from shardkit.errors import ConfigError, ShardkitError, UnknownAliasError, UnknownEngineError

SECRET = "princess_peach"

DJANGO_STYLE = {
    "default": {
        "ENGINE": "postgresql",
        "NAME": "app",
        "USER": "mario",
        "PASSWORD": SECRET,
        "HOST": "127.0.0.1",
        "PORT": 5432,
    },
    "credentials": {"ENGINE": "sqlite", "NAME": "credentials.db"},
    "analytics": "postgresql+psycopg2://mario@127.0.0.1/analytics",
}


def test_issue_example_parses_without_connecting() -> None:
    cluster = shardkit.Cluster(DJANGO_STYLE)
    assert cluster.aliases == ("default", "credentials", "analytics")
    assert cluster.spec("default").url.username == "mario"
    assert cluster.spec("default").url.port == 5432
    assert cluster.spec("default").dialect_name == "postgresql"
    assert cluster.spec("credentials").url.database == "credentials.db"
    assert cluster._engines == {}  # engines are lazy


@pytest.mark.parametrize(
    ("engine", "dialect"),
    [
        ("django.db.backends.postgresql", "postgresql"),
        ("django.db.backends.postgresql_psycopg2", "postgresql"),
        ("django.db.backends.sqlite3", "sqlite"),
        ("django.db.backends.mysql", "mysql"),
        ("postgresql", "postgresql"),
        ("postgresql+psycopg2", "postgresql"),
        ("sqlite", "sqlite"),
        ("mysql", "mysql"),
        ("mysql+pymysql", "mysql"),
        ("mariadb", "mariadb"),
    ],
)
def test_engine_names(engine: str, dialect: str) -> None:
    cluster = shardkit.Cluster({"default": {"ENGINE": engine, "NAME": "x"}})
    assert cluster.spec("default").dialect_name == dialect


def test_missing_default_is_named() -> None:
    with pytest.raises(ConfigError, match="'default'") as info:
        shardkit.Cluster({"other": "sqlite://"})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ShardkitError)


def test_unknown_engine_names_alias_and_engine() -> None:
    with pytest.raises(UnknownEngineError, match=r"'shard9'.*'oracle9000'") as info:
        shardkit.Cluster({"default": "sqlite://", "shard9": {"ENGINE": "oracle9000", "NAME": "x"}})
    assert info.value.alias == "shard9"


def test_unknown_engine_in_url() -> None:
    with pytest.raises(UnknownEngineError, match="'default'"):
        shardkit.Cluster({"default": "nosuchdb://u:pw@h/x"})


def test_unknown_setting_key_is_a_typo() -> None:
    with pytest.raises(ConfigError, match="HSOT"):
        shardkit.Cluster({"default": {"ENGINE": "sqlite", "NAME": "x", "HSOT": "h"}})


def test_django_only_keys_are_accepted() -> None:
    shardkit.Cluster({"default": {"ENGINE": "sqlite", "NAME": "x", "TEST": {}, "CONN_MAX_AGE": 60}})


def test_bad_entry_types() -> None:
    with pytest.raises(ConfigError, match="'default'"):
        shardkit.Cluster({"default": 42})
    with pytest.raises(ConfigError, match="ENGINE is required"):
        shardkit.Cluster({"default": {"NAME": "x"}})
    with pytest.raises(ConfigError, match="PORT"):
        shardkit.Cluster({"default": {"ENGINE": "postgresql", "PORT": "five"}})
    with pytest.raises(ConfigError):
        shardkit.Cluster(["default"])  # type: ignore[arg-type]


def test_unknown_alias() -> None:
    cluster = shardkit.Cluster({"default": "sqlite://"})
    with pytest.raises(UnknownAliasError, match="'nope'") as info:
        cluster.engine("nope")
    assert info.value.alias == "nope"
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownAliasError, match="'nope'"):
        cluster.session(using="nope")


def test_password_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cluster = shardkit.Cluster(DJANGO_STYLE)
    assert SECRET not in repr(cluster)
    assert SECRET not in repr(cluster.spec("default"))
    assert SECRET not in cluster.spec("default").safe_url
    bad = {"default": f"postgresql://mario:{SECRET}@127.0.0.1:1/app", "x": {"ENGINE": "nope", "PASSWORD": SECRET}}
    with pytest.raises(ShardkitError) as info:
        shardkit.Cluster(bad)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    with pytest.raises(ConfigError) as info2:
        shardkit.Cluster({"default": f"::not a url:{SECRET}"})
    assert SECRET not in str(info2.value)
    # a failed connection: SQLAlchemy's own error hides it too, and so does our log
    with pytest.raises(Exception) as info3, cluster.engine("default").connect():
        pass
    assert SECRET not in str(info3.value)
    assert SECRET not in caplog.text
    # the engine's creation is logged, under the module's own logger name, its URL without the password
    assert any(r.name == "shardkit._config" and "mario:***@" in r.getMessage() for r in caplog.records)
    cluster.dispose()


def test_engines_are_lazy_cached_and_disposed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = shardkit.Cluster({"default": f"sqlite:///{tmp_path}/a.db", "b": f"sqlite:///{tmp_path}/b.db"})
    assert cluster._engines == {}
    engine = cluster.engine("default")
    assert cluster.engine("default") is engine
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    cluster.dispose()
    assert cluster._engines == {}
    assert cluster.engine("default") is not engine


def test_options_become_connect_args(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = shardkit.Cluster(
        {"default": {"ENGINE": "sqlite", "NAME": str(tmp_path / "x.db"), "OPTIONS": {"timeout": 7}}}
    )
    assert cluster.spec("default").connect_args == {"timeout": 7}
    with cluster.engine().connect() as conn:
        conn.execute(text("select 1"))
    cluster.dispose()


def test_from_settings_module(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mysettings.py").write_text(
        "DATABASES = {'default': 'sqlite://', 'credentials': {'ENGINE': 'django.db.backends.sqlite3', "
        "'NAME': ':memory:'}}\nDATABASE_ROUTERS = ['tests.app.routers.AuthRouter']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cluster = shardkit.Cluster.from_settings("mysettings")
    assert cluster.aliases == ("default", "credentials")
    assert type(cluster.router.routers[0]).__name__ == "AuthRouter"
    with pytest.raises(ConfigError, match="no_such_settings"):
        shardkit.Cluster.from_settings("no_such_settings")


def test_a_url_without_a_driver_gets_the_installed_one() -> None:
    cluster = shardkit.Cluster({"default": "postgresql://u@h/db", "m": "mysql://root@h/db", "l": "sqlite://"})
    assert cluster.spec("default").url.drivername == "postgresql+psycopg2"
    assert cluster.spec("m").url.drivername == "mysql+pymysql"
    assert cluster.spec("l").url.drivername == "sqlite"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://mario:{SECRET}@db.example:abc/app",
        f"mysql://mario:{SECRET}@db.example:3306x/app",
        f"postgresql://mario:{SECRET}@[::1:5432/app",
        f"postgresql://mario:{SECRET}@db.example:99999/app",
        f"postgresql://mario:{SECRET}@db.example:0/app",
    ],
)
def test_a_url_with_a_bad_port_is_a_config_error_naming_the_alias(url: str) -> None:
    with pytest.raises(ConfigError, match=r"DATABASES\['shard7'\].*port") as info:
        shardkit.Cluster({"default": "sqlite://", "shard7": url})
    assert info.value.alias == "shard7"  # type: ignore[attr-defined]
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"ENGINE": "postgresql", "NAME": "x", "PORT": "five"}, "PORT must be a number"),
        ({"ENGINE": "postgresql", "NAME": "x", "PORT": True}, "PORT must be a number"),
        ({"ENGINE": "postgresql", "NAME": "x", "PORT": 5432.5}, "PORT must be a number"),
        ({"ENGINE": "postgresql", "NAME": "x", "PORT": 70000}, "out of range"),
        ({"ENGINE": "postgresql", "NAME": "x", "PORT": "-1"}, "PORT must be a number"),
        ({"ENGINE": "postgresql", "NAME": "x", "HOST": 127}, "HOST must be a string"),
        ({"ENGINE": "postgresql", "NAME": "x", "USER": ["mario"]}, "USER must be a string"),
        ({"ENGINE": "postgresql", "NAME": "x", "PASSWORD": 12345}, "PASSWORD must be a string"),
        ({"ENGINE": "postgresql"}, "NAME is required"),
        ({"ENGINE": "sqlite", "NAME": ""}, "NAME is required"),
        ({"ENGINE": "postgresql", "NAME": 5}, "NAME must be a string"),
        ({"ENGINE": "oracle9000", "NAME": "x"}, "unknown ENGINE"),
        ({"ENGINE": "", "NAME": "x"}, "ENGINE must be a non-empty string"),
        ({"NAME": "x"}, "ENGINE is required"),
        ({"ENGINE": "postgresql", "NAME": "x", "OPTIONS": "sslmode=require"}, "OPTIONS must be a dict"),
    ],
)
def test_malformed_dict_settings_name_the_alias_and_the_key(entry: dict[str, object], match: str) -> None:
    entry = {**entry}
    with pytest.raises(ConfigError, match=match) as info:
        shardkit.Cluster({"default": "sqlite://", "s1": entry})
    assert info.value.alias == "s1"  # type: ignore[attr-defined]
    assert "12345" not in str(info.value)  # a password is never echoed, whatever its type


def test_well_formed_variants_still_parse(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = shardkit.Cluster(
        {
            "default": {"ENGINE": "sqlite", "NAME": tmp_path / "a.db"},  # a Path, as Django's BASE_DIR / "db"
            "p": {"ENGINE": "postgresql", "NAME": "x", "PORT": " 5433 ", "HOST": "", "USER": None},
            "svc": {"ENGINE": "postgresql", "OPTIONS": {"service": "my_service"}},  # libpq service: no NAME
            "u": "postgresql://mario@db.example:6543/app",
        }
    )
    assert cluster.spec("default").url.database == str(tmp_path / "a.db")
    assert cluster.spec("p").url.port == 5433
    assert cluster.spec("svc").url.database is None
    assert cluster.spec("u").url.port == 6543


def test_the_cli_prints_one_line_without_the_password(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[databases]\ndefault = "sqlite://"\nshard3 = "postgresql://mario:{SECRET}@h:54x32/app"\n')
    done = subprocess.run(
        [sys.executable, "-m", "shardkit", "--settings", str(settings), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stderr + done.stdout
    assert "shard3" in done.stderr and "port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_from_settings_honours_the_ring_and_toml(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Cluster.from_settings is load_settings' cluster: SHARDKIT_RING and TOML files count too."""
    ring = "{'shards': ['s0', 's1'], 'vnodes': 8}"
    databases = "{'default': 'sqlite://', 's0': 'sqlite://', 's1': 'sqlite://'}"
    (tmp_path / "ringsettings.py").write_text(f"DATABASES = {databases}\nSHARDKIT_RING = {ring}\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # a settings.py path puts its folder on sys.path
    monkeypatch.setenv("SHARDKIT_SETTINGS", str(tmp_path / "ringsettings.py"))
    for cluster in (shardkit.Cluster.from_settings(), shardkit.Cluster.from_settings("ringsettings")):
        (router,) = cluster.router.routers
        assert isinstance(router, shardkit.HashRingRouter) and router.ring == shardkit.HashRing(["s0", "s1"], vnodes=8)
    (tmp_path / "shardkit.toml").write_text(
        '[databases]\ndefault = "sqlite://"\ns0 = "sqlite://"\n[ring]\nshards = ["s0"]\nvnodes = 8\n'
    )
    for source in (tmp_path / "shardkit.toml", str(tmp_path / "shardkit.toml")):
        cluster = shardkit.Cluster.from_settings(source)
        assert cluster.aliases == ("default", "s0")
        (router,) = cluster.router.routers
        assert isinstance(router, shardkit.HashRingRouter) and router.ring == shardkit.HashRing(["s0"], vnodes=8)
    with pytest.raises(ConfigError, match=r"ring shard\(s\) s9 not in DATABASES"):
        (tmp_path / "bad.toml").write_text('[databases]\ndefault = "sqlite://"\n[ring]\nshards = ["s9"]\n')
        shardkit.Cluster.from_settings(tmp_path / "bad.toml")
    sys.modules.pop("ringsettings", None)
