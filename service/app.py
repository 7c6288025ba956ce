"""The Flask application factory.

``create_app`` builds everything from settings and touches nothing at import time; the database engine
is lazy, so creating an app never connects (the first request, or ``/healthz``, does).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from flask.sessions import NullSession, SessionInterface
from werkzeug.wsgi import ClosingIterator

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
    database = db.Database(settings.database_url)
    db.init_app(app, database)
    errors.install(app)

    from service import api
    from service.api.hotlane import HotLane

    api.register(app)
    # The crowd's claims and submissions are served below Flask when they can be (hotlane.py);
    # whatever they leave unread of a body is drained for every request alike.
    hot = app.extensions["maskmill.hotlane"] = HotLane(
        app, app.wsgi_app, database, settings.max_body_bytes
    )
    app.wsgi_app = ReadUnreadBody(hot, limit=2 * settings.max_body_bytes)
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


class ReadUnreadBody:
    """Read what is left of a request's body once the service has answered.

    A request refused before its body is read (over ``MASKMILL_MAX_BODY_BYTES``, or a bad key)
    leaves the body unread. gunicorn then closes the connection with data unread, so the kernel
    resets it, and a sender still writing the body loses the answer: behind deploy/nginx.conf,
    nginx then answers its own HTML 502 instead of the service's JSON error
    (``tests/test_deploy.py``). Bodies up to ``limit`` bytes (nginx's ``client_max_body_size``
    by default) are read and dropped; a larger one is not worth reading, and its sender is cut
    off as before. Costs one empty read on a request whose body was read.
    """

    def __init__(self, app: Callable[..., Any], *, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # When the response is closed: a view may read its body while its response streams.
        return ClosingIterator(self.app(environ, start_response), lambda: self._read_rest(environ))

    def _read_rest(self, environ: dict[str, Any]) -> None:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return
        if 0 < length <= self.limit:
            stream = environ["wsgi.input"]
            while length > 0 and (chunk := stream.read(min(length, 1 << 16))):
                length -= len(chunk)


def get_settings(app: Flask | None = None) -> Settings:
    from flask import current_app

    return (app or current_app).extensions["maskmill.settings"]
