"""Typed settings read from ``MASKMILL_*`` environment variables.

Every knob the service, the CLI and the workers read lives here, so the README's settings table can be
checked against one list (``SETTINGS``). Values are parsed once, with a clear error naming the variable
when a value cannot be parsed, instead of failing later deep inside a request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A ``MASKMILL_*`` variable holds a value that cannot be used."""


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false)")


def _parse_int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Setting:
    """One environment variable: its field name, default and parser (for docs and parsing)."""

    env: str
    field: str
    default: str
    help: str
    kind: str = "str"  # str | int | bool | intlist
    minimum: int = 0

    def parse(self, raw: str) -> Any:
        if self.kind == "int":
            return _parse_int(self.env, raw, self.minimum)
        if self.kind == "bool":
            return _parse_bool(self.env, raw)
        if self.kind == "intlist":
            items = [item for item in raw.replace(" ", "").split(",") if item]
            return tuple(_parse_int(self.env, item, self.minimum) for item in items)
        return raw.strip()


# The single list of settings; the README table mirrors it (tests/test_settings.py checks that).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "MASKMILL_DATABASE_URL",
        "database_url",
        "sqlite:///./var/maskmill.db",
        "SQLAlchemy URL; PostgreSQL in production (postgresql+psycopg://...), SQLite embedded",
    ),
    Setting(
        "MASKMILL_REDIS_URL",
        "redis_url",
        "",
        "Redis for RQ jobs; empty means jobs run in-process (embedded default)",
    ),
    Setting(
        "MASKMILL_STORAGE_URL",
        "storage_url",
        "./var/storage",
        "where tree files, renders and checkpoints go: a local directory or s3://bucket/prefix",
    ),
    Setting(
        "MASKMILL_IMAGE_ROOT",
        "image_root",
        "./var/images",
        "image URIs registered by path must lie under this directory",
    ),
    Setting(
        "MASKMILL_MAX_BODY_BYTES",
        "max_body_bytes",
        str(64 * 1024 * 1024),
        "largest request body accepted; larger bodies get 413",
        kind="int",
        minimum=1024,
    ),
    Setting(
        "MASKMILL_PUBLIC_URL",
        "public_url",
        "http://127.0.0.1:8000",
        "base URL used in invite links and MTurk ExternalQuestion URLs",
    ),
    Setting(
        "MASKMILL_SECRET_KEY",
        "secret_key",
        "",
        "secret for signing worker sessions; empty generates a per-process key (dev only)",
    ),
    Setting(
        "MASKMILL_JOB_RETRY_DELAYS",
        "job_retry_delays",
        "2,10,60",
        "seconds between retries of a job's transient failures (one retry per number)",
        kind="intlist",
    ),
    Setting("MASKMILL_LOG_LEVEL", "log_level", "INFO", "Python logging level"),
)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build with :meth:`from_env`; tests pass overrides."""

    database_url: str = "sqlite:///./var/maskmill.db"
    redis_url: str = ""
    storage_url: str = "./var/storage"
    image_root: str = "./var/images"
    max_body_bytes: int = 64 * 1024 * 1024
    public_url: str = "http://127.0.0.1:8000"
    secret_key: str = ""
    job_retry_delays: tuple[int, ...] = (2, 10, 60)
    log_level: str = "INFO"
    testing: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.env, setting.default)
            values[setting.field] = setting.parse(raw)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_local_dirs(self) -> None:
        """Create the directories a local (embedded) deployment writes into."""
        if self.uses_sqlite and self.database_url.startswith("sqlite:///"):
            db_path = self.database_url.removeprefix("sqlite:///")
            if db_path and db_path != ":memory:":
                Path(db_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if "://" not in self.storage_url:
            Path(self.storage_url).expanduser().mkdir(parents=True, exist_ok=True)


def settings_from(config: Settings | Mapping[str, Any] | None) -> Settings:
    """Accept what ``create_app(config=...)`` may be given: nothing, a Settings, or a dict."""
    if config is None:
        return Settings.from_env()
    if isinstance(config, Settings):
        return config
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
    return Settings.from_env(**dict(config))
