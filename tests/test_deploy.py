"""The deployment files: gunicorn's two shapes, and the proxy that the sync shape relies on."""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing
import runpy
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.auth import create_api_key
from service.devservers import (
    NginxServer,
    ServerError,
    free_port,
    service_environment,
    stop_process_group,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _gunicorn_config(monkeypatch, **env: str) -> dict:
    for name in ("MASKMILL_WORKER_CLASS", "WEB_CONCURRENCY", "MASKMILL_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))


def test_gunicorn_defaults_to_threads_facing_clients(monkeypatch):
    config = _gunicorn_config(monkeypatch)
    assert config["worker_class"] == "gthread"
    assert config["workers"] == multiprocessing.cpu_count() and config["threads"] == 4


def test_gunicorn_sync_shape_is_one_request_per_process(monkeypatch):
    config = _gunicorn_config(monkeypatch, MASKMILL_WORKER_CLASS="sync")
    assert config["worker_class"] == "sync" and config["threads"] == 1
    assert config["workers"] == multiprocessing.cpu_count() + 1
    sized = _gunicorn_config(monkeypatch, MASKMILL_WORKER_CLASS="sync", WEB_CONCURRENCY="7")
    assert sized["workers"] == 7


def test_gunicorn_refuses_an_unknown_worker_class(monkeypatch):
    with pytest.raises(SystemExit, match="MASKMILL_WORKER_CLASS must be gthread or sync"):
        _gunicorn_config(monkeypatch, MASKMILL_WORKER_CLASS="gevent")


def test_compose_runs_sync_workers_only_behind_the_buffering_proxy():
    compose = (DEPLOY / "docker-compose.yml").read_text()
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "MASKMILL_WORKER_CLASS: sync" in compose
    assert '"./nginx.conf:/etc/nginx/nginx.conf:ro"' in compose
    assert 'ports: ["8000:80"]' in compose  # clients reach the proxy, not gunicorn
    assert 'expose: ["8000"]' in compose
    assert "proxy_request_buffering on;" in nginx and "proxy_buffering on;" in nginx
    assert "server web:8000;" in nginx


# --- The real proxy: deploy/nginx.conf run by nginx in front of gunicorn's sync shape. ---------
#
# The checks above read the files; these run them, because the sync shape is only safe if the
# proxy really buffers whole requests, and a config nginx refuses would only show at deploy time.

MAX_BODY_BYTES = 1024 * 1024  # the service's limit here; nginx's own is 128m
SLOW_BODY_BYTES = 64 * 1024  # larger than nginx's in-memory body buffer: it goes to a temp file
UPSTREAM_CLOSED_EARLY = "failed (32: Broken pipe) while sending request to upstream"


def _tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file for an assertion message (empty when the file was never written)."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _count_in_log(path: Path, text: str) -> int:
    """How often nginx has logged ``text`` so far (to tell a known symptom from a new one)."""
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    return _request(port, "GET", path, headers=headers)


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _wait_until_answering(
    process: subprocess.Popen, port: int, path: str, log: Path, what: str
) -> None:
    """Wait for ``path`` to answer 200; fail with the log's tail if the process dies or stalls."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            if _request(port, "GET", path, timeout=2)[0] == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{what} did not answer {path} within 30 s:\n{_tail(log)}")


@dataclass(frozen=True)
class Served:
    """The running stack: gunicorn's port (to bypass the proxy), nginx's, nginx's error log
    and an API key."""

    gunicorn_port: int
    nginx_port: int
    nginx_log: Path
    auth: dict[str, str]


@pytest.fixture(scope="module")
def api_key(migrated_pg_url: str) -> dict[str, str]:
    """The Authorization header of a real key: the body limit and the slow request both need a
    view that reads the body, and unauthenticated requests are answered before it is read."""
    engine = create_engine(migrated_pg_url)
    try:
        with Session(engine) as session:
            _, plaintext = create_api_key(session, "deploy")
            session.commit()
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {plaintext}"}


@pytest.fixture(scope="module")
def gunicorn_sync(
    migrated_pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, Path]]:
    """deploy/gunicorn.conf.py's sync shape with ONE worker, so one held request holds it all."""
    workdir = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    env = service_environment(
        migrated_pg_url,
        workdir,
        port,
        MASKMILL_WORKER_CLASS="sync",
        WEB_CONCURRENCY="1",
        MASKMILL_BIND=f"127.0.0.1:{port}",
        MASKMILL_REDIS_URL="",  # jobs in-process; no job is started here
        MASKMILL_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    )
    env.pop("MASKMILL_THREADS", None)
    log = workdir / "gunicorn.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "-c",
                str(DEPLOY / "gunicorn.conf.py"),
                # gunicorn >= 25.1 otherwise binds ~/.gunicorn/gunicorn.ctl, shared by every
                # gunicorn of this user (benchmarks running alongside included).
                "--control-socket",
                str(workdir / "gunicorn.ctl"),
                "service.app:create_app()",
            ],
            cwd=str(REPO),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_answering(process, port, "/healthz", log, "gunicorn")
        yield port, log
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def served(gunicorn_sync: tuple[int, Path], api_key: dict[str, str]) -> Iterator[Served]:
    """nginx in the foreground with deploy/nginx.conf, proxying to :func:`gunicorn_sync`."""
    gunicorn_port, _ = gunicorn_sync
    nginx = NginxServer((DEPLOY / "nginx.conf").read_text(), f"127.0.0.1:{gunicorn_port}")
    try:
        nginx.start()
        _wait_until_answering(nginx.process, nginx.port, "/healthz", nginx.error_log, "nginx")
        yield Served(gunicorn_port, nginx.port, nginx.error_log, api_key)
    finally:
        nginx.stop()


def test_nginx_accepts_the_deploy_config():
    """`nginx -t`: the file parses and every directive is valid for the nginx Debian ships."""
    nginx = NginxServer((DEPLOY / "nginx.conf").read_text(), f"127.0.0.1:{free_port()}")
    try:
        result = nginx.check()
        output = result.stdout + result.stderr + nginx.log_tail()
        assert result.returncode == 0, f"nginx -t rejected deploy/nginx.conf:\n{output}"
    finally:
        nginx.stop()


def test_a_changed_deploy_config_is_refused_not_rewritten_wrongly():
    """The places rewritten for a run outside docker-compose must each occur once."""
    text = (DEPLOY / "nginx.conf").read_text()
    with pytest.raises(ServerError, match="'server web:8000;' exactly once, found 2"):
        NginxServer(text.replace("server web:8000;", "server web:8000; server web:8000;"), "x:1")
    with pytest.raises(ServerError, match="'listen 80;' exactly once, found 0"):
        NginxServer(text.replace("listen 80;", "listen 8080;"), "x:1")


def _json_error(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The service's error body, which must reach the client unchanged (not nginx's HTML)."""
    assert headers.get("Content-Type") == "application/json", (status, headers, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"], error
    return error


def test_the_proxy_passes_answers_and_json_errors_through(served: Served):
    status, headers, body = _get(served.nginx_port, "/healthz")
    assert status == 200, body
    assert headers["Server"].startswith("nginx"), headers  # nginx answered, not gunicorn
    assert json.loads(body)["status"] == "ok"

    status, headers, body = _get(served.nginx_port, "/api/v1/projects")
    assert status == 401
    assert _json_error(status, headers, body)["code"] == "unauthorized"


def test_the_service_not_nginx_answers_a_body_over_the_service_limit(served: Served):
    """Above MASKMILL_MAX_BODY_BYTES but far below nginx's client_max_body_size, the service's
    own JSON 413 must come back through the proxy (as the comment in deploy/nginx.conf says),
    every time: before the service read the rest of refused bodies
    (:class:`service.app.ReadUnreadBody`), a few percent of these came back as nginx's HTML 502
    ("Broken pipe while sending request to upstream")."""
    body = b" " * (2 * MAX_BODY_BYTES)
    headers = {**served.auth, "Content-Type": "application/json"}
    broken_pipes = _count_in_log(served.nginx_log, UPSTREAM_CLOSED_EARLY)
    for _ in range(20):
        status, response_headers, response = _request(
            served.nginx_port, "POST", "/api/v1/projects", body=body, headers=headers
        )
        assert status == 413, (status, response[:500])
        error = _json_error(status, response_headers, response)
        assert error["code"] == "payload_too_large" and str(MAX_BODY_BYTES) in error["message"]
    assert _count_in_log(served.nginx_log, UPSTREAM_CLOSED_EARLY) == broken_pipes


def test_a_body_over_the_proxy_limit_gets_the_same_json_error_from_nginx(served: Served):
    """Beyond nginx's own client_max_body_size nginx answers itself, from the declared length
    alone, in the service's error format (clients parse one kind of error body)."""
    with socket.create_connection(("127.0.0.1", served.nginx_port), timeout=10) as sock:
        sock.sendall(_project_post_head(200 * 1024 * 1024))
        status, headers, body = _read_response(sock)
    assert status == 413, body[:500]
    assert headers["Server"].startswith("nginx")  # nginx's answer: the service never saw it
    error = _json_error(413, headers, body)
    assert error["code"] == "payload_too_large" and "128 MiB" in error["message"]


def _project_post_head(length: int, auth: dict[str, str] | None = None) -> bytes:
    """The head of a raw ``POST /api/v1/projects`` announcing a body of ``length`` bytes."""
    key = f"Authorization: {auth['Authorization']}\r\n" if auth else ""
    return (
        "POST /api/v1/projects HTTP/1.1\r\nHost: maskmill\r\nConnection: close\r\n"
        f"{key}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _slow_project_request(auth: dict[str, str]) -> tuple[bytes, bytes]:
    """A project-creating POST split in two: headers with half the body, then the rest. The view
    reads its body, so whoever runs it waits until the last byte arrives."""
    document = json.dumps({"name": "slow client", "classes": ["chair"]}).encode()
    body = document.ljust(SLOW_BODY_BYTES)  # JSON allows trailing whitespace
    head = _project_post_head(len(body), auth)
    half = len(body) // 2
    return head + body[:half], body[half:]


def _send_healthz(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: maskmill\r\nConnection: close\r\n\r\n")
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read a ``Connection: close`` response to its end; check it is complete (Content-Length)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(fields["Content-Length"]) == len(body), data[:500]
    return int(lines[0].split()[1]), fields, body


def _nothing_received(sock: socket.socket) -> bool:
    """True when no byte (and no end of stream) has arrived yet on ``sock``."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(10)
    return False


def test_a_slow_client_does_not_hold_the_only_sync_worker_behind_nginx(served: Served):
    """Why the proxy exists: nginx reads the whole request before handing it to gunicorn, so a
    client still sending its body (a crowd worker on a phone) holds no worker, and the one sync
    worker serves others meanwhile."""
    first_part, rest = _slow_project_request(served.auth)
    with socket.create_connection(("127.0.0.1", served.nginx_port), timeout=10) as slow:
        slow.sendall(first_part)
        with _send_healthz(served.nginx_port) as other:
            status, _, body = _read_response(other)
        assert status == 200, body
        # ... and the first request was still waiting for its body, not answered or dropped.
        assert _nothing_received(slow)
        slow.sendall(rest)
        status, _, body = _read_response(slow)
    assert status == 201, body
    assert json.loads(body)["name"] == "slow client"


def test_without_the_proxy_the_slow_client_holds_the_only_sync_worker(served: Served):
    """The control, showing the test above can fail: straight to gunicorn, the one sync worker
    waits for the slow body and nobody else is served until it arrives."""
    first_part, rest = _slow_project_request(served.auth)
    with socket.create_connection(("127.0.0.1", served.gunicorn_port), timeout=10) as slow:
        slow.sendall(first_part)
        with _send_healthz(served.gunicorn_port) as other:
            other.settimeout(2)
            with pytest.raises(TimeoutError):
                other.recv(1)
            slow.sendall(rest)
            status, _, body = _read_response(slow)
            assert status == 201, body
            # gunicorn lingers (up to 2 s) on a finished connection until the client closes it.
            slow.close()
            # Only now, the first request done, does the worker take the one that waited.
            other.settimeout(10)
            status, _, body = _read_response(other)
            assert status == 200, body


def test_a_refused_body_is_read_to_its_end_before_the_answer(served: Served):
    """The service refuses a body over its limit without reading it; the body must still be
    read to its end before the connection closes. Otherwise the server's kernel resets the
    connection while the sender is still writing (unread data at close), and the sender --
    nginx, in the deployment -- loses the answer: nginx then sends its own HTML 502 instead of
    the service's JSON 413. Straight to gunicorn, so the reset shows to this test itself."""
    body = b" " * (2 * MAX_BODY_BYTES)
    head = _project_post_head(len(body), served.auth)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", served.gunicorn_port), timeout=10) as sock:
            sock.sendall(head)
            for start in range(0, len(body), 65536):
                sock.sendall(body[start : start + 65536])
                time.sleep(0.001)  # a sender that keeps writing while the answer is made
            status, _, response = _read_response(sock)
        assert status == 413, response[:300]
        assert json.loads(response)["error"]["code"] == "payload_too_large"
