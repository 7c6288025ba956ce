"""The maskmill CLI: help a newcomer can read, migrations, keys, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from service.cli import main


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKMILL_DATABASE_URL", f"sqlite:///{tmp_path / 'var' / 'm.db'}")
    monkeypatch.setenv("MASKMILL_STORAGE_URL", str(tmp_path / "var" / "storage"))
    monkeypatch.delenv("MASKMILL_REDIS_URL", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [[], ["db"], ["db", "upgrade"], ["create-key"], ["serve"], ["worker"]],
)
def test_help(args):
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 3


def test_top_level_help_lists_commands():
    output = CliRunner().invoke(main, ["--help"]).output
    for command in ("db", "create-key", "serve", "worker", "simulate", "synth", "seed-select"):
        assert command in output


def test_upgrade_then_create_key(env):
    runner = CliRunner()
    first = runner.invoke(main, ["db", "upgrade"])
    assert first.exit_code == 0, first.output
    assert "revision" in first.output
    again = runner.invoke(main, ["db", "upgrade"])
    assert again.exit_code == 0
    key = runner.invoke(main, ["create-key", "--name", "alice"])
    assert key.exit_code == 0, key.output
    assert key.output.strip().startswith("mm_")
    assert runner.invoke(main, ["db", "current"]).output.strip() != "base (empty database)"


def test_create_key_before_upgrade_is_a_clear_error(env):
    result = CliRunner().invoke(main, ["create-key", "--name", "x"])
    assert result.exit_code == 1
    assert "maskmill db upgrade" in result.output
    assert "Traceback" not in result.output


def test_worker_without_redis_is_a_clear_error(env):
    result = CliRunner().invoke(main, ["worker", "--burst"])
    assert result.exit_code == 1
    assert "MASKMILL_REDIS_URL" in result.output


def test_worker_burst_on_real_redis(env, redis_server, monkeypatch):
    monkeypatch.setenv("MASKMILL_REDIS_URL", redis_server.url)
    # The worker first reconciles the database's queued jobs with Redis: it needs the schema.
    refused = CliRunner().invoke(main, ["worker", "--queues", "cpu", "--burst"])
    assert refused.exit_code == 1
    assert "maskmill db upgrade" in refused.output
    assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0
    result = CliRunner().invoke(main, ["worker", "--queues", "cpu", "--burst"])
    assert result.exit_code == 0, result.output


def test_bad_setting_is_a_clear_error(env, monkeypatch):
    monkeypatch.setenv("MASKMILL_MAX_BODY_BYTES", "huge")
    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 1
    assert "MASKMILL_MAX_BODY_BYTES" in result.output


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "maskmill")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "maskmill" in result.stdout
