"""The REST API: one blueprint per resource, registered by :func:`register`."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    from service.api import (
        campaigns,
        export,
        ground_truth,
        health,
        images,
        jobs,
        openapi,
        predictions,
        projects,
        rounds,
        timeline,
        work,
        workers,
    )

    app.register_blueprint(health.bp)
    app.register_blueprint(projects.bp)
    app.register_blueprint(images.bp)
    app.register_blueprint(ground_truth.bp)
    app.register_blueprint(predictions.bp)
    app.register_blueprint(rounds.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(export.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(campaigns.bp)
    app.register_blueprint(workers.bp)
    app.register_blueprint(work.bp)
    app.register_blueprint(timeline.bp)

    from service import pages

    app.register_blueprint(pages.bp)
