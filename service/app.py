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
from flask.sessions import NullSession, SessionInterface

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
    app.session_interface = NoCookieSessions()
    app.extensions["maskmill.settings"] = settings
    app.extensions["maskmill.storage"] = open_storage(settings.storage_url)
    db.init_app(app, db.Database(settings.database_url))
    errors.install(app)

    from service import api

    api.register(app)
    return app


class _NoSession(NullSession):
    def _fail(self, *args: Any, **kwargs: Any):
        raise RuntimeError(
            "maskmill keeps no cookie sessions: requesters send their API key, workers their "
            "invite token, with every request"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = update = setdefault = _fail


class NoCookieSessions(SessionInterface):
    """Never open a cookie session. Nothing in maskmill keeps state in cookies, yet Flask's
    default would build a signing serializer and look for the cookie on every request: about a
    third of Flask's own cost per request (``scripts/bench_request_overhead.py``: an empty route
    151 -> 108 us), paid twice per HIT cycle."""

    null_session_class = _NoSession

    def open_session(self, app: Flask, request: Any) -> None:
        return None  # Flask then uses the null session

    def save_session(self, app: Flask, session: Any, response: Any) -> None:
        return None


def get_settings(app: Flask | None = None) -> Settings:
    from flask import current_app

    return (app or current_app).extensions["maskmill.settings"]
