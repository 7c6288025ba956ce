"""The REST API: one blueprint per resource, registered by :func:`register`."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    from service.api import health, projects

    app.register_blueprint(health.bp)
    app.register_blueprint(projects.bp)
