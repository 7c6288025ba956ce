"""The round pipeline: train → detect (shards) → cluster, one job per stage.

Why one job per stage, each enqueuing the next with a deterministic id, rather than one job doing
everything: detection must spread over many machines (a shard per job, DESIGN.md "Workers"), and the
stages want different queues (``gpu`` for training and detection, ``cpu`` for clustering). A single
job would pin the whole round to one machine, and a job waiting for others would hold a worker idle
(and deadlock the embedded single-thread runner). The ids make every hand-over idempotent: a
stage that is retried after it already enqueued the next one gets ``DuplicateJobError`` and moves on.

::

    round-p{pid}-r{n}        run_round      (cpu)  snapshot the pool, enqueue training
    train-p{pid}-r{n}        train_stage    (gpu)  workers.train.train (use_checkpoint instead
                                                   when the requester gave weights), then the
                                                   detect shards
    detect-p{pid}-r{n}-s{k}  detect_stage   (gpu)  workers.detect.detect on shard k; the shard that
                                                   finds every shard written enqueues clustering
    cluster-p{pid}-r{n}      cluster_stage  (cpu)  workers.detect.finish_round → build_trees

``Round.status`` moves forward only (pending → training → detecting → clustering → ready), so a
late retry of an earlier stage cannot move it back. A stage that fails for good (a non-transient
error, or a transient one on its last attempt) marks the round ``failed``; its error stays on its job
row, where ``GET /api/v1/projects/{pid}/rounds`` and ``GET /api/v1/jobs/{id}`` report it. Stages of a
round that already failed do nothing; a late retry of the cluster stage of a round that is ready
changes nothing either (:func:`workers.cluster.build_trees` refuses to replace cluster rows the
crowd may be answering about).

This module imports no torch at import time: the web service imports it when it enqueues
``workers.rounds.run_round`` by name (``service.jobs.resolve`` checks the function exists).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select, update

from service.api.rounds import cluster_job_id, detect_job_id, train_job_id
from service.jobs import (
    _TRANSIENT,
    DuplicateJobError,
    InProcessRunner,
    JobContext,
    dispatcher_for,
    enqueue,
)
from service.models import Image, Job, JobStatus, Round, RoundStatus
from service.settings import Settings

#: Statuses in pipeline order; a stage only ever moves a round forward along it.
ORDER = (
    RoundStatus.PENDING,
    RoundStatus.TRAINING,
    RoundStatus.DETECTING,
    RoundStatus.CLUSTERING,
    RoundStatus.READY,
)

TRAIN_JOB = "workers.rounds.train_stage"
DETECT_JOB = "workers.rounds.detect_stage"
CLUSTER_JOB = "workers.rounds.cluster_stage"


# ------------------------------------------------------------------------------- round status


def advance(ctx: JobContext, round_id: int, status: RoundStatus) -> bool:
    """Move the round forward to ``status`` (never back); False when the round has failed."""
    earlier = ORDER[: ORDER.index(status)]
    with ctx.database.session() as session:
        current = session.scalar(select(Round.status).where(Round.id == round_id))
        if current is None:
            raise ValueError(f"round {round_id} does not exist")
        if current is RoundStatus.FAILED:
            return False
        session.execute(
            update(Round)
            .where(Round.id == round_id, Round.status.in_(earlier))
            .values(status=status)
        )
        session.commit()
    return True


def mark_failed(ctx: JobContext, round_id: int) -> None:
    with ctx.database.session() as session:
        session.execute(
            update(Round)
            .where(Round.id == round_id, Round.status != RoundStatus.READY)
            .values(status=RoundStatus.FAILED)
        )
        session.commit()


@contextmanager
def failure_marks_round(ctx: JobContext, round_id: int) -> Iterator[None]:
    """Re-raise any error, first marking the round failed unless the job will be retried."""
    try:
        yield
    except _TRANSIENT:
        if ctx.final_attempt:
            mark_failed(ctx, round_id)
        raise
    except Exception:
        mark_failed(ctx, round_id)
        raise


def _enqueue_once(
    ctx: JobContext, func_name: str, job_id: str, queue: str, project_id: int, **kwargs: Any
) -> str:
    """Enqueue the next stage; work already queued or done under that id is left alone.

    Except work that was recorded but never handed to the transport: :func:`enqueue` commits
    the job's row before it dispatches, so an attempt that died in between leaves a ``queued``
    row that nothing will run, and a retry that took the duplicate for "already on its way"
    would leave the round stuck. Such a job is dispatched again.
    """
    with ctx.database.session() as session:
        try:
            enqueue(
                session,
                ctx.settings,
                func_name,
                job_id=job_id,
                queue=queue,
                project_id=project_id,
                **kwargs,
            )
        except DuplicateJobError:
            session.rollback()
            existing = session.get(Job, job_id)
            if existing is not None and existing.status is JobStatus.QUEUED:
                _dispatch_if_lost(ctx.settings, existing)
    return job_id


def _dispatch_if_lost(settings: Settings, job: Job) -> None:
    """Dispatch a ``queued`` job the transport does not hold (what :func:`service.jobs.reconcile`
    does for a whole database, for one job)."""
    dispatcher = dispatcher_for(settings)
    if isinstance(dispatcher, InProcessRunner):
        if job.id not in dispatcher.futures:
            dispatcher.dispatch(job)
        return
    from rq.job import Job as RQJob

    if not RQJob.exists(job.id, connection=dispatcher.connection):
        dispatcher.dispatch(job)


def _round(ctx: JobContext, round_id: int) -> tuple[int, int]:
    with ctx.database.session() as session:
        rnd = session.get(Round, round_id)
        if rnd is None:
            raise ValueError(f"round {round_id} does not exist")
        return rnd.project_id, rnd.number


def _skipped(round_id: int) -> dict[str, Any]:
    return {"round_id": round_id, "skipped": "the round has already failed"}


# ------------------------------------------------------------------------------------- stages


def run_round(
    ctx: JobContext,
    *,
    round_id: int,
    detect: bool = True,
    shards: int = 1,
    train_options: dict[str, Any] | None = None,
    detect_options: dict[str, Any] | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """The round's entry job: fix the pool the detect shards will share, enqueue training
    (or, with ``checkpoint``, the adoption of a requester's weights in its place)."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
        raise ValueError(f"checkpoint must be a non-empty URI or None, got {checkpoint!r}")
    if checkpoint is not None and train_options:
        unused = sorted(set(train_options) - {"seed"})
        if unused:
            raise ValueError(f"training options {unused} cannot be used with a checkpoint")
    project_id, number = _round(ctx, round_id)
    with failure_marks_round(ctx, round_id):
        if not advance(ctx, round_id, RoundStatus.PENDING):
            return _skipped(round_id)
        with ctx.database.session() as session:
            snapshot = int(
                session.scalar(select(func.max(Image.id)).where(Image.project_id == project_id))
                or 0
            )
        train_id = _enqueue_once(
            ctx,
            TRAIN_JOB,
            train_job_id(project_id, number),
            "gpu",
            project_id,
            round_id=round_id,
            detect=bool(detect),
            shards=shards,
            max_image_id=snapshot,
            train_options=dict(train_options or {}),
            detect_options=dict(detect_options or {}),
            **({"checkpoint": checkpoint} if checkpoint is not None else {}),
        )
    return {"round": number, "max_image_id": snapshot, "next": [train_id]}


def train_stage(
    ctx: JobContext,
    *,
    round_id: int,
    detect: bool,
    shards: int,
    max_image_id: int,
    train_options: dict[str, Any],
    detect_options: dict[str, Any],
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train (or adopt the requester's ``checkpoint``), then enqueue one detect job per shard
    (or finish the round if it does not detect)."""
    from workers.train import train, use_checkpoint

    project_id, number = _round(ctx, round_id)
    with failure_marks_round(ctx, round_id):
        if not advance(ctx, round_id, RoundStatus.TRAINING):
            return _skipped(round_id)
        if checkpoint is not None:
            result = use_checkpoint(ctx, round_id=round_id, checkpoint=checkpoint)
        else:
            result = train(ctx, round_id=round_id, **train_options)
        if not detect:
            advance(ctx, round_id, RoundStatus.READY)
            return result
        advance(ctx, round_id, RoundStatus.DETECTING)
        result["next"] = [
            _enqueue_once(
                ctx,
                DETECT_JOB,
                detect_job_id(project_id, number, shard),
                "gpu",
                project_id,
                round_id=round_id,
                shard=shard,
                shards=shards,
                max_image_id=max_image_id,
                detect_options=detect_options,
            )
            for shard in range(shards)
        ]
    return result


def detect_stage(
    ctx: JobContext,
    *,
    round_id: int,
    shard: int,
    shards: int,
    max_image_id: int,
    detect_options: dict[str, Any],
) -> dict[str, Any]:
    """Detect on one shard; the shard that completes the set enqueues the cluster stage.

    Every shard writes its object before it looks at the others, so whichever finishes last sees
    all of them; two shards finishing together may both enqueue, and the id keeps it to one job.
    """
    from workers.detect import detect, missing_shards

    project_id, number = _round(ctx, round_id)
    with failure_marks_round(ctx, round_id):
        if not advance(ctx, round_id, RoundStatus.DETECTING):
            return _skipped(round_id)
        result = detect(
            ctx,
            round_id=round_id,
            shard=shard,
            n_shards=shards,
            max_image_id=max_image_id,
            **detect_options,
        )
        if not missing_shards(ctx.storage, project_id, number, shards):
            result["next"] = [
                _enqueue_once(
                    ctx,
                    CLUSTER_JOB,
                    cluster_job_id(project_id, number),
                    "cpu",
                    project_id,
                    round_id=round_id,
                    shards=shards,
                )
            ]
    return result


def cluster_stage(ctx: JobContext, *, round_id: int, shards: int) -> dict[str, Any]:
    """Merge the shards and build the round's trees (``build_trees`` marks the round ready)."""
    from workers.detect import finish_round

    with failure_marks_round(ctx, round_id):
        if not advance(ctx, round_id, RoundStatus.CLUSTERING):
            return _skipped(round_id)
        return finish_round(ctx, round_id=round_id, n_shards=shards)
