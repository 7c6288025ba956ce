"""The deployment files: gunicorn's two shapes, and the proxy that the sync shape relies on."""

from __future__ import annotations

import multiprocessing
import runpy
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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
