"""The ``render`` job: pre-render the overlays of new questions, so a worker's page never waits for one.

The web service renders on a cache miss too (:func:`service.render.overlay_for_question`), so this job
is an optimisation, not a dependency: if it runs late or fails, pages still work, only slower. It is
idempotent (cached overlays are skipped) and reads each tree file once per run (questions are taken in
tree order). The database session is closed before the rendering itself.

Two entry points: :func:`render_questions` for direct calls and RQ's plain dotted-name enqueueing, and
:func:`render_job` for :func:`service.jobs.enqueue`, which passes a :class:`JobContext`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from service.db import Database
from service.jobs import JobContext
from service.models import Question
from service.render import (
    TreeFileCache,
    open_image,
    overlay_key,
    question_target,
    render_overlay,
)
from service.settings import Settings
from service.storage import Storage, open_storage

log = logging.getLogger(__name__)

MAX_QUESTIONS_PER_JOB = 10_000


@dataclass
class RenderReport:
    rendered: int = 0
    cached: int = 0
    missing: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "rendered": self.rendered,
            "cached": self.cached,
            "missing": self.missing,
            "failed": self.failed,
        }


def _check_ids(question_ids: Any) -> list[int]:
    if not isinstance(question_ids, list | tuple):
        raise ValueError(
            f"question_ids must be a list of integers, got {type(question_ids).__name__}"
        )
    if any(isinstance(q, bool) or not isinstance(q, int) for q in question_ids):
        raise ValueError("question_ids must contain integers only")
    if len(question_ids) > MAX_QUESTIONS_PER_JOB:
        raise ValueError(
            f"{len(question_ids)} questions in one job; split into jobs of at most "
            f"{MAX_QUESTIONS_PER_JOB}"
        )
    return sorted(set(question_ids))


def render_overlays(
    database: Database,
    storage: Storage,
    settings: Settings,
    question_ids: list[int],
    progress: Callable[[float, str], None] | None = None,
) -> RenderReport:
    """Render and store the overlays of ``question_ids`` that are not cached yet."""
    ids = _check_ids(question_ids)
    report = RenderReport()
    todo: list[tuple[int, str, str, dict[str, Any]]] = []  # (question id, key, image uri, rle)
    trees = TreeFileCache()
    with database.session() as session:
        questions = session.scalars(
            select(Question)
            .where(Question.id.in_(ids))
            .order_by(Question.tree_id, Question.leaf_pos, Question.id)
        ).all()
        report.missing = len(ids) - len(questions)
        planned: set[str] = set()
        for question in questions:
            key = overlay_key(question)
            if key in planned or storage.exists(key):
                report.cached += 1
                continue
            try:
                image, rle = question_target(session, storage, question, trees)
            except (LookupError, ValueError) as exc:
                log.warning("question %s cannot be rendered: %s", question.id, exc)
                report.failed += 1
                continue
            planned.add(key)
            todo.append((question.id, key, image.uri, rle))
    for done, (question_id, key, uri, rle) in enumerate(todo):
        try:
            data = render_overlay(open_image(uri, settings, storage), rle)
        except ValueError as exc:
            log.warning("question %s cannot be rendered: %s", question_id, exc)
            report.failed += 1
            continue
        storage.put_bytes(key, data)
        report.rendered += 1
        if progress is not None and done % 10 == 9:
            progress((done + 1) / len(todo), f"{done + 1} of {len(todo)} overlays")
    return report


def render_questions(question_ids: list[int], *, settings: Settings | None = None) -> int:
    """Pre-render the overlays of these questions; returns how many were rendered (not cached yet).

    Configuration comes from the environment (``MASKMILL_*``) unless ``settings`` is given.
    """
    settings = settings or Settings.from_env()
    database = Database(settings.database_url)
    try:
        storage = open_storage(settings.storage_url)
        return render_overlays(database, storage, settings, question_ids).rendered
    finally:
        database.dispose()


def render_job(ctx: JobContext, *, question_ids: list[int]) -> dict[str, int]:
    """:func:`render_questions` as a recorded job (``service.jobs.enqueue(...,
    "workers.render.render_job", question_ids=[...])``), with progress and a summary result."""
    return render_overlays(
        ctx.database, ctx.storage, ctx.settings, question_ids, progress=ctx.progress
    ).as_dict()
