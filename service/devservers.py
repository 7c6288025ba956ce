"""Throwaway PostgreSQL and Redis servers on loopback, for the test suite and the benchmarks.

Each server lives in its own temporary directory, listens on a free 127.0.0.1 port, and is stopped
(process group killed, directory removed) by :meth:`stop`, which is also registered with ``atexit`` so
an interrupted run does not leave servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


class ServerError(RuntimeError):
    """A server binary is missing or did not come up."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bindir() -> Path:
    override = os.environ.get("MASKMILL_PG_BINDIR")
    candidates = [override] if override else sorted(glob.glob("/usr/lib/postgresql/*/bin"))[::-1]
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ServerError("PostgreSQL's initdb was not found: run scripts/test, which installs it")


def _drop_privileges_user() -> str | None:
    """PostgreSQL refuses to run as root; when we are root, run it as the ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServerError("running as root but no 'postgres' user exists to run PostgreSQL")


class _Server:
    process: subprocess.Popen | None = None
    directory: Path

    def _register(self) -> None:
        atexit.register(self.stop)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer(_Server):
    """``initdb`` into a temp dir, then ``postgres`` on a free loopback port (trust auth)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        fsync: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = _postgres_bindir()
        self.settings = dict(settings or {})
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="maskmill-pg-"))
        self.user = "maskmill"
        self.fsync = fsync
        self._run_as = _drop_privileges_user()

    def _cmd(self, args: list[str]) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *args]
        return args

    def start(self, timeout: float = 60.0) -> PostgresServer:
        datadir = self.directory / "data"
        if self._run_as:
            info = pwd.getpwnam(self._run_as)
            os.chown(self.directory, info.pw_uid, info.pw_gid)
        subprocess.run(
            self._cmd(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "-U",
                    self.user,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        options = [
            "-c",
            f"port={self.port}",
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.directory}",
            "-c",
            "max_connections=200",
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
            "-c",
            "synchronous_commit=" + ("on" if self.fsync else "off"),
            "-c",
            "full_page_writes=" + ("on" if self.fsync else "off"),
        ]
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        log = open(self.directory / "postgres.log", "wb")  # noqa: SIM115 - lives with the server
        self.process = subprocess.Popen(
            self._cmd([str(self.bindir / "postgres"), "-D", str(datadir), *options]),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._register()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"postgres exited early: {self.log_tail()}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise ServerError("postgres did not accept connections in time")

    def log_tail(self) -> str:
        path = self.directory / "postgres.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RedisServer(_Server):
    """``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, *, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server was not found: run scripts/test, which installs it")
        self.binary = binary
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="maskmill-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]
        log = open(self.directory / "redis.log", "wb")  # noqa: SIM115 - lives with the server
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._register()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError("redis-server exited early")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise ServerError("redis-server did not answer PING in time")
