"""The web tier's PostgreSQL connection budget, checked against a real server when it starts."""

from __future__ import annotations

import logging
import runpy
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from click.testing import CliRunner

from service import cli
from service.db import POOL_OVERFLOW, POOL_SIZE, check_connection_budget, connection_budget

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _server_limits(url: str) -> tuple[int, int]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        allowed = int(conn.execute("SHOW max_connections").fetchone()[0])
        reserved = int(conn.execute("SHOW superuser_reserved_connections").fetchone()[0])
    return allowed, reserved


def test_the_budget_is_every_pool_plus_each_threads_held_connection():
    assert connection_budget(1, 1) == POOL_SIZE + POOL_OVERFLOW + 1
    # The deployed sync shape on 2 cores (README): 3 processes of one thread each.
    assert connection_budget(3, 1) == 93
    assert connection_budget(2, 4) == 68


def test_a_server_that_can_take_the_budget_passes(pg_url):
    allowed, reserved = _server_limits(pg_url)
    processes = (allowed - reserved) // connection_budget(1, 1)
    assert processes >= 1
    assert check_connection_budget(pg_url, processes, 1) is None


def test_a_budget_past_max_connections_is_explained(pg_url):
    allowed, reserved = _server_limits(pg_url)
    processes = (allowed - reserved) // connection_budget(1, 2) + 1
    problem = check_connection_budget(pg_url, processes, 2)
    assert problem is not None
    needed = connection_budget(processes, 2)
    assert f"may open {needed} PostgreSQL connections" in problem
    assert f"{processes} processes" in problem and "2 threads" in problem
    assert f"max_connections = {allowed} leaves {allowed - reserved}" in problem


def test_sqlite_has_no_connection_budget(sqlite_url):
    assert check_connection_budget(sqlite_url, 100, 100) is None


def _gunicorn_hook(monkeypatch, url: str, workers: int, threads: int, caplog) -> list[str]:
    """Run deploy/gunicorn.conf.py's ``on_starting`` as gunicorn's master would."""
    monkeypatch.setenv("MASKMILL_DATABASE_URL", url)
    config = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    log = logging.getLogger("test.gunicorn")
    server = SimpleNamespace(cfg=SimpleNamespace(workers=workers, threads=threads), log=log)
    with caplog.at_level(logging.WARNING, logger="test.gunicorn"):
        config["on_starting"](server)
    return [record.getMessage() for record in caplog.records]


def test_gunicorn_warns_before_starting_workers_past_the_budget(monkeypatch, pg_url, caplog):
    allowed, reserved = _server_limits(pg_url)
    too_many = (allowed - reserved) // connection_budget(1, 1) + 1
    warnings = _gunicorn_hook(monkeypatch, pg_url, too_many, 1, caplog)
    assert len(warnings) == 1 and warnings[0].startswith("connection budget: the web tier")
    caplog.clear()
    assert _gunicorn_hook(monkeypatch, pg_url, 1, 1, caplog) == []


def test_gunicorn_starts_with_a_warning_when_it_cannot_check(monkeypatch, caplog):
    unreachable = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    warnings = _gunicorn_hook(monkeypatch, unreachable, 2, 4, caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith("could not check the PostgreSQL connection budget")


@pytest.fixture
def no_gunicorn(monkeypatch):
    """``maskmill serve`` up to the point where it would hand over to gunicorn."""
    started: list[list[str]] = []
    monkeypatch.setattr("gunicorn.app.wsgiapp.run", lambda: started.append(list(cli.sys.argv)))
    return started


def test_serve_warns_of_a_budget_past_max_connections(monkeypatch, tmp_path, pg_url, no_gunicorn):
    monkeypatch.setenv("MASKMILL_DATABASE_URL", pg_url)
    monkeypatch.setenv("MASKMILL_STORAGE_URL", str(tmp_path / "storage"))
    monkeypatch.setenv("MASKMILL_IMAGE_ROOT", str(tmp_path))
    allowed, reserved = _server_limits(pg_url)
    workers = (allowed - reserved) // connection_budget(1, 4) + 1
    result = CliRunner().invoke(cli.main, ["serve", "--workers", str(workers)])
    assert result.exit_code == 0, result.output
    assert "warning: PostgreSQL connection budget: the web tier may open" in result.output
    assert no_gunicorn and "--workers" in no_gunicorn[0]

    no_gunicorn.clear()
    result = CliRunner().invoke(cli.main, ["serve", "--workers", "1"])
    assert result.exit_code == 0 and "warning" not in result.output
    assert no_gunicorn
