"""A real PostgreSQL streaming replica of the local server, for the replica tests.

The tests run as root and ``initdb``/``pg_ctl`` refuse root, so every server binary runs as the
``postgres`` user (``runuser -u postgres --``).  ``pg_basebackup -R`` copies the primary into a
fresh data directory and writes ``standby.signal`` plus ``primary_conninfo``; the replica listens
on a free port of 127.0.0.1 with its sockets in its own directory, and is stopped and removed at
teardown.  The primary must accept replication connections from 127.0.0.1: when its pg_hba.conf
has no such rule, one (trust, 127.0.0.1/32 only) is appended and the configuration reloaded.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

PG_USER = "postgres"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = [] if os.geteuid() != 0 else ["runuser", "-u", PG_USER, "--"]
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False)


class PgReplica:
    """A streaming replica of the primary at ``primary_url``; :meth:`start` then :meth:`stop`."""

    def __init__(self, primary_url: str) -> None:
        self.primary_url = primary_url
        self.port = 0
        self.datadir: Path | None = None
        self.bindir: Path | None = None
        self._root: Path | None = None
        self._copied: dict[str, str] = {}
        # a replication slot keeps the primary's WAL until the replica has it (a busy primary
        # recycles its segments fast); dropped at stop
        self.slot = f"shardkit_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ set up

    def _primary_info(self) -> tuple[str, str, int, bool]:
        engine = create_engine(self.primary_url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                # a hot standby needs these at least as high as on its primary
                self._copied = {
                    name: str(conn.execute(text(f"SHOW {name}")).scalar_one())
                    for name in (
                        "max_connections", "max_worker_processes", "max_wal_senders",
                        "max_prepared_transactions", "max_locks_per_transaction",
                    )
                }  # fmt: skip
                version_num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
                hba_file = str(conn.execute(text("SHOW hba_file")).scalar_one())
                senders = int(conn.execute(text("SHOW max_wal_senders")).scalar_one())
                wal_level = str(conn.execute(text("SHOW wal_level")).scalar_one())
                allowed = bool(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_hba_file_rules WHERE 'replication' = ANY(database) "
                            "AND type = 'host' AND (address IS NULL OR address IN ('127.0.0.1', 'all', "
                            "'samehost', 'samenet'))"
                        )
                    ).scalar_one()
                )
        finally:
            engine.dispose()
        if senders < 1 or wal_level not in ("replica", "logical"):
            raise RuntimeError(f"the primary cannot stream (max_wal_senders={senders}, wal_level={wal_level})")
        return str(version_num // 10000), hba_file, senders, allowed

    def _allow_replication(self, hba_file: str) -> None:
        rule = "host replication all 127.0.0.1/32 trust  # added by shardkit's replica tests\n"
        with open(hba_file, "a", encoding="utf-8") as fh:
            fh.write(rule)
        engine = create_engine(self.primary_url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_reload_conf()"))
        finally:
            engine.dispose()
        time.sleep(0.5)

    def _drop_orphan_slots(self) -> None:
        """Drop the slots of earlier runs whose process is gone (a killed run keeps the primary's WAL)."""
        engine = create_engine(self.primary_url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                names = conn.execute(
                    text(
                        "SELECT slot_name FROM pg_replication_slots "
                        "WHERE NOT active AND slot_name LIKE 'shardkit_test_%'"
                    )
                ).scalars()
                for name in list(names):
                    try:
                        os.kill(int(name.split("_")[2]), 0)
                        continue  # that run is still alive
                    except (ProcessLookupError, ValueError, IndexError):
                        pass
                    except PermissionError:
                        continue
                    conn.execute(text("SELECT pg_drop_replication_slot(:s)"), {"s": name})
                conn.commit()
        finally:
            engine.dispose()

    def start(self) -> None:
        major, hba_file, _, allowed = self._primary_info()
        bindir = Path(f"/usr/lib/postgresql/{major}/bin")
        if not (bindir / "postgres").exists():
            found = shutil.which("pg_ctl")
            if found is None:
                raise RuntimeError(f"no PostgreSQL {major} server binaries (looked in {bindir} and PATH)")
            bindir = Path(found).parent
        self.bindir = bindir
        if not allowed:
            self._allow_replication(hba_file)
        self._drop_orphan_slots()
        url = make_url(self.primary_url)
        self._root = Path(tempfile.mkdtemp(prefix="shardkit-replica-"))
        self.datadir = self._root / "data"
        sockets = self._root / "sock"
        sockets.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            os.chown(self._root, pw.pw_uid, pw.pw_gid)
            os.chown(sockets, pw.pw_uid, pw.pw_gid)
        os.chmod(self._root, 0o700)
        done = _as_postgres(
            str(bindir / "pg_basebackup"),
            "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or PG_USER,
            "-D", str(self.datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            "-C", "-S", self.slot,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {done.stderr.strip()[-500:]}")
        self.port = free_port()
        # Debian keeps postgresql.conf / pg_hba.conf in /etc: the copy has none, so give it its own.
        (self.datadir / "postgresql.conf").write_text(
            f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
            f"unix_socket_directories = '{sockets}'\nhot_standby = on\n"
            "shared_buffers = 16MB\nfsync = off\nlogging_collector = off\n"
            "hot_standby_feedback = on\nmax_standby_streaming_delay = -1\n"
            + "".join(f"{name} = {value}\n" for name, value in self._copied.items()),
            encoding="utf-8",
        )
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
        )
        for name in ("postgresql.conf", "pg_hba.conf"):
            if os.geteuid() == 0:
                pw = pwd.getpwnam(PG_USER)
                os.chown(self.datadir / name, pw.pw_uid, pw.pw_gid)
        done = _as_postgres(
            str(bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self._root / "log"), "-w", "-t", "60", "start"
        )
        if done.returncode != 0:
            log = (self._root / "log").read_text(errors="replace")[-800:] if (self._root / "log").exists() else ""
            raise RuntimeError(f"the replica did not start: {done.stderr.strip()[-300:]} {log}")
        self.wait_streaming()

    # ------------------------------------------------------------------ use

    @property
    def url(self) -> str:
        return make_url(self.primary_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def url_for(self, database: str) -> str:
        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def sql(self, statement: str, database: str = "postgres") -> object:
        engine = create_engine(self.url_for(database), connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                return conn.execute(text(statement)).scalar()
        finally:
            engine.dispose()

    def wait_streaming(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.sql("SELECT pg_is_in_recovery()") is True:
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        engine = create_engine(self.primary_url)
        try:
            with engine.connect() as conn:
                lsn = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
        finally:
            engine.dispose()
        deadline = time.monotonic() + timeout
        while True:
            done = self.sql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
            if done is True:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not replay up to {lsn} in {timeout}s")
            time.sleep(0.05)

    def pause(self) -> None:
        """Stop replaying WAL: the replica falls behind from the next write on."""
        self.sql("SELECT pg_wal_replay_pause()")

    def resume(self) -> None:
        self.sql("SELECT pg_wal_replay_resume()")

    # ------------------------------------------------------------------ tear down

    def stop(self) -> None:
        if self.datadir is not None and self.bindir is not None and (self.datadir / "postmaster.pid").exists():
            _as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        engine = create_engine(self.primary_url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(
                    text("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = :s"),
                    {"s": self.slot},
                )
                conn.commit()
        except Exception:  # best effort: the primary may be gone
            pass
        finally:
            engine.dispose()
