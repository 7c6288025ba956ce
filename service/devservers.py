"""Throwaway PostgreSQL, Redis and nginx servers on loopback, for the tests and the benchmarks.

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
from collections.abc import Callable
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


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server started with ``start_new_session`` and everything in its process group:
    SIGTERM, SIGKILL if it is still there after ``timeout`` seconds, and SIGKILL for workers that
    outlived their master."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class _Server:
    process: subprocess.Popen | None = None
    directory: Path
    #: What start-up errors call it, the log to read when it fails (``log_tail``), and where its
    #: standard output and error go (the log, unless the server writes that file itself).
    name: str
    log_name: str
    output_name: str | None = None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.directory / self.log_name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _launch(self, args: list[str], ready: Callable[[], bool], timeout: float) -> None:
        """Start the server (in a session of its own, stopped at exit too) and wait until
        ``ready()``; stop it and raise :class:`ServerError` if it exits or is not ready in time."""
        output = self.directory / (self.output_name or self.log_name)
        log = open(output, "wb")  # noqa: SIM115 - lives with the server
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited early: {self.log_tail()}")
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"{self.name} was not ready in time")


class PostgresServer(_Server):
    """``initdb`` into a temp dir, then ``postgres`` on a free loopback port (trust auth)."""

    name, log_name = "postgres", "postgres.log"

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
        args = self._cmd([str(self.bindir / "postgres"), "-D", str(datadir), *options])
        self._launch(args, self._accepts_connections, timeout)
        return self

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

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

    name, log_name = "redis-server", "redis.log"

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
        self._launch(args, self._answers_ping, timeout)
        return self

    def _answers_ping(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False


#: Debian's path (/usr/sbin is often not on PATH); ``scripts/setup`` installs the package.
NGINX = Path("/usr/sbin/nginx")


def _replace_once(text: str, old: str, new: str) -> str:
    """Replace ``old``, which must occur exactly once: a deployment config that no longer has it
    (or has it twice) must fail loudly here, not run as some other config."""
    count = text.count(old)
    if count != 1:
        raise ServerError(f"the nginx config should contain {old!r} exactly once, found {count}")
    return text.replace(old, new)


def nginx_config(text: str, upstream: str, listen_port: int, directory: Path) -> str:
    """A deployment config (``deploy/nginx.conf``'s text) changed only where a run outside its
    container must differ: the upstream and listen addresses, and every file nginx writes (pid,
    logs, request and response temp files), which default to system paths."""
    text = _replace_once(text, "server web:8000;", f"server {upstream};")
    text = _replace_once(text, "listen 80;", f"listen 127.0.0.1:{listen_port};")
    files = "".join(
        f"\n    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    files += f"\n    access_log {directory / 'access.log'};"
    text = _replace_once(text, "http {", "http {" + files)
    top = f"pid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'};\n"
    if os.geteuid() == 0:
        # nginx started by root runs its workers as `nobody`, who cannot enter this private
        # (0700) directory to write request bodies; as another user nginx ignores `user`.
        top += "user root;\n"
    return top + text


class NginxServer(_Server):
    """nginx in the foreground on a free loopback port, running a deployment config
    (:func:`nginx_config`) in front of ``upstream`` (``host:port``). Its error log is the one
    to read (``log_tail``): nginx writes its own there, from start-up on."""

    name, log_name, output_name = "nginx", "error.log", "stdout.log"

    def __init__(self, config_text: str, upstream: str, *, port: int | None = None) -> None:
        if not NGINX.exists():
            raise ServerError(f"{NGINX} was not found: run scripts/test, which installs nginx")
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="maskmill-nginx-"))
        self.config = self.directory / "nginx.conf"
        self.config.write_text(nginx_config(config_text, upstream, self.port, self.directory))
        self.error_log = self.directory / "error.log"

    def command(self, *extra: str) -> list[str]:
        """nginx with its prefix and startup error log here (not /usr/share/nginx, stderr)."""
        return [
            str(NGINX),
            "-p",
            f"{self.directory}/",
            "-e",
            str(self.error_log),
            "-c",
            str(self.config),
            *extra,
        ]

    def check(self) -> subprocess.CompletedProcess:
        """``nginx -t``: whether nginx accepts the config (its verdict in the output)."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, timeout: float = 30.0) -> NginxServer:
        self._launch(self.command("-g", "daemon off;"), self._listens, timeout)
        return self

    def _listens(self) -> bool:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        return False


def service_environment(
    database_url: str, workdir: Path, port: int, **extra: str
) -> dict[str, str]:
    """The environment of a web service process (gunicorn serving ``service.app:create_app()``)
    listening on ``port``, with its storage and image root in ``workdir``; ``extra`` adds or
    overrides ``MASKMILL_*`` (and gunicorn) variables."""
    return dict(
        os.environ,
        MASKMILL_DATABASE_URL=database_url,
        MASKMILL_STORAGE_URL=str(workdir / "storage"),
        MASKMILL_IMAGE_ROOT=str(workdir / "images"),
        MASKMILL_SECRET_KEY="throwaway-secret",
        MASKMILL_PUBLIC_URL=f"http://127.0.0.1:{port}",
        MASKMILL_LOG_LEVEL="WARNING",
        **extra,
    )
