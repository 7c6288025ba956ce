"""The ``render`` job: pre-render the overlays of new questions, so a worker's page never waits for one.

The web service renders on a cache miss too (:func:`service.render.overlay_for_question`), so this job
is an optimisation, not a dependency: if it runs late or fails, pages still work, only slower. It is
idempotent (cached overlays are skipped) and reads each tree file once per run (questions are taken in
tree order). The database session is closed before the rendering itself.

Entry points: :func:`render_questions` for direct calls and RQ's plain dotted-name enqueueing;
:func:`render_job` (qualification questions, rows of ``questions``, by id) and
:func:`render_hits_job` (every question of some HITs, arrays of their rows since migration 0006)
for :mod:`service.jobs`, which passes a :class:`JobContext`. The HIT builder records a
``render_hits_job`` for every batch it builds (:mod:`service.crowd.hits`).

A question that cannot be rendered (a missing tree file or image) is counted and logged, once per
distinct reason: a batch whose tree file is gone must not print a warning per question.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.crowd import questions as hit_questions
from service.db import Database
from service.jobs import JobContext
from service.models import Question, QuestionKind
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
#: A batch is at most 100 HITs (``CrowdParams.build_batch_hits``); this leaves room for merged
#: batches while bounding what one job holds in memory.
MAX_HITS_PER_JOB = 1_000


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


def _check_ids(
    ids: Any, name: str = "question_ids", limit: int = MAX_QUESTIONS_PER_JOB
) -> list[int]:
    """Job arguments arrive as JSON: a list of integer ids, bounded, deduplicated and sorted."""
    if not isinstance(ids, list | tuple):
        raise ValueError(f"{name} must be a list of integers, got {type(ids).__name__}")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{name} must contain integers only")
    if len(ids) > limit:
        raise ValueError(f"{len(ids)} {name} in one job; split into jobs of at most {limit}")
    return sorted(set(ids))


def render_overlays(
    database: Database,
    storage: Storage,
    settings: Settings,
    question_ids: list[int],
    progress: Callable[[float, str], None] | None = None,
) -> RenderReport:
    """Render and store the overlays of the qualification questions ``question_ids`` (rows of
    ``questions``) that are not cached yet."""
    ids = _check_ids(question_ids)

    def load(session: Session) -> list[Any]:
        return list(session.scalars(select(Question).where(Question.id.in_(ids))).all())

    report = _render(database, storage, settings, load, progress)
    # Every question found ends rendered, cached or failed; the rest of the ids were not found.
    report.missing = len(ids) - (report.rendered + report.cached + report.failed)
    return report


def render_hits(
    database: Database,
    storage: Storage,
    settings: Settings,
    hit_ids: list[int],
    progress: Callable[[float, str], None] | None = None,
) -> RenderReport:
    """Render and store the overlays of every question of ``hit_ids`` not cached yet (samples,
    hidden gold: a worker's page shows them all alike)."""
    ids = _check_ids(hit_ids, "hit_ids", MAX_HITS_PER_JOB)

    def load(session: Session) -> list[Any]:
        return [q for qs in hit_questions.of_hits(session, ids).values() for q in qs]

    return _render(database, storage, settings, load, progress)


def _tree_order(question: Any) -> tuple[int, int, int]:
    if question.kind is QuestionKind.SAMPLE:
        return (0, question.tree_id, question.leaf_pos)
    return (1, question.gold_item_id, 0)


def _render(
    database: Database,
    storage: Storage,
    settings: Settings,
    load: Callable[[Session], list[Any]],
    progress: Callable[[float, str], None] | None,
) -> RenderReport:
    """Render the overlays of the questions ``load`` reads; ``missing`` is the caller's."""
    report = RenderReport()
    failures: Counter[str] = Counter()
    todo: list[tuple[str, str, dict[str, Any]]] = []  # (key, image uri, rle)
    trees = TreeFileCache()
    with database.session() as session:
        # Tree order, so each tree file is read once (gold and qualification questions, which
        # show a gold item and have no tree, after the samples).
        questions = sorted(load(session), key=_tree_order)
        planned: set[str] = set()
        for question in questions:
            key = overlay_key(question)
            if key in planned or storage.exists(key):
                report.cached += 1
                continue
            try:
                image, rle = question_target(session, storage, question, trees)
            except (LookupError, ValueError) as exc:
                failures[str(exc)] += 1
                continue
            planned.add(key)
            todo.append((key, image.uri, rle))
    # The session is closed: rendering takes seconds and must not hold a connection.
    for done, (key, uri, rle) in enumerate(todo):
        try:
            data = render_overlay(open_image(uri, settings, storage), rle)
        except ValueError as exc:
            failures[str(exc)] += 1
            continue
        storage.put_bytes(key, data)
        report.rendered += 1
        if progress is not None and done % 10 == 9:
            progress((done + 1) / len(todo), f"{done + 1} of {len(todo)} overlays")
    for reason, count in failures.items():
        log.warning("%d question(s) cannot be rendered: %s", count, reason)
    report.failed = sum(failures.values())
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


def render_hits_job(ctx: JobContext, *, hit_ids: list[int]) -> dict[str, int]:
    """The job the HIT builder records for each batch it builds
    (``service.crowd.hits.RENDER_JOB``): pre-render every question of those HITs."""
    return render_hits(
        ctx.database, ctx.storage, ctx.settings, hit_ids, progress=ctx.progress
    ).as_dict()
