"""The Flask application factory.

``create_app`` builds everything from settings and touches nothing at import time; the database engine
is lazy, so creating an app never connects (the first request, or ``/healthz``, does).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from flask import Flask

from service import db, errors
from service.settings import Settings, settings_from
from service.storage import open_storage


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    settings = settings_from(config)
    logging.basicConfig(level=settings.log_level.upper())
    app = Flask(__name__, template_folder="../templates")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        SECRET_KEY=settings.secret_key or secrets.token_hex(32),
        TESTING=settings.testing,
        JSON_SORT_KEYS=False,
    )
    app.extensions["maskmill.settings"] = settings
    app.extensions["maskmill.storage"] = open_storage(settings.storage_url)
    db.init_app(app, db.Database(settings.database_url))
    errors.install(app)

    from service import api

    api.register(app)
    return app


def get_settings(app: Flask | None = None) -> Settings:
    from flask import current_app

    return (app or current_app).extensions["maskmill.settings"]
