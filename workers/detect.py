"""The ``detect`` job (one shard of a round's pool per job) and ``finish_round`` (merge + cluster).

Which images: every image of the project without *seed* ground truth -- the unlabelled pool, whose
predictions are clustered and verified, plus the held-out images, whose predictions the cluster job
turns into gold (their true IoU is known). Seed images are annotated already.

Sharding: image ``i`` belongs to shard ``i mod n_shards``. The partition depends only on the image
id, not on what else is in the project, so shards that start at different times (on different
machines) still cover the pool exactly once; images registered after the round started
(``id > max_image_id``) are left to the next round.

Each shard writes its COCO results (RLE, score, mask-attention feature) to storage as one gzip JSON
object. A retried shard whose object exists skips the work (objects appear atomically, so an
existing one is complete). When every shard's object exists, :func:`finish_round` merges them into
the round's ``predictions.json.gz`` -- the same file ``POST .../predictions`` writes -- and runs the
cluster job's own :func:`workers.cluster.build_trees` on it.

Between rounds the model re-detects objects the crowd already accepted; such re-detections (same
image and class, IoU above :data:`service.export.DUPLICATE_IOU` with an accepted mask of an earlier
round) are dropped before clustering, so the crowd is not paid to verify an object twice.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from sqlalchemy import func, select

from service.api.predictions import store_predictions
from service.coco import rle_for_pycocotools
from service.export import DUPLICATE_IOU, AcceptedMask, accepted_masks
from service.jobs import JobContext
from service.models import GroundTruthMask, Image, Round, Split
from service.render import open_image
from service.storage import Storage
from workers import model as mm
from workers.cluster import build_trees, built_summary
from workers.train import ImageRef, RoundInfo, load_round_model, round_info, round_prefix

DEFAULT_BATCH_SIZE = 4


def shard_key(project_id: int, number: int, shard: int, n_shards: int) -> str:
    return f"{round_prefix(project_id, number)}/detect/shard-{shard:05d}-of-{n_shards:05d}.json.gz"


def _check_shard(shard: int, n_shards: int) -> None:
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < n_shards:
        raise ValueError(f"shard must be an integer in [0, {n_shards}), got {shard!r}")


def detection_images(
    session: Any,
    project_id: int,
    *,
    shard: int = 0,
    n_shards: int = 1,
    max_image_id: int | None = None,
) -> list[ImageRef]:
    """The images of one shard: the project's images without seed ground truth, by id."""
    _check_shard(shard, n_shards)
    seed_images = (
        select(GroundTruthMask.image_id)
        .where(GroundTruthMask.project_id == project_id, GroundTruthMask.split == Split.SEED)
        .distinct()
    )
    query = select(Image.id, Image.uri, Image.width, Image.height).where(
        Image.project_id == project_id,
        Image.id.not_in(seed_images),
        Image.id % n_shards == shard,
    )
    if max_image_id is not None:
        query = query.where(Image.id <= max_image_id)
    return [ImageRef(*row) for row in session.execute(query.order_by(Image.id)).all()]


def latest_image_id(session: Any, project_id: int) -> int:
    """The newest image of the project: the snapshot a round's shards agree on."""
    return int(
        session.scalar(select(func.max(Image.id)).where(Image.project_id == project_id)) or 0
    )


def _round_checkpoint(session: Any, round_id: int) -> str:
    uri = session.scalar(select(Round.checkpoint_uri).where(Round.id == round_id))
    if not uri:
        raise ValueError(f"round {round_id} has no trained model yet (no checkpoint_uri): train it")
    return uri


def detect(
    ctx: JobContext,
    *,
    round_id: int,
    shard: int = 0,
    n_shards: int = 1,
    max_image_id: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Detect on one shard of the round's pool; write its COCO results to storage."""
    _check_shard(shard, n_shards)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    started = time.perf_counter()
    with ctx.database.session() as session:
        info = round_info(session, round_id)
        checkpoint_uri = _round_checkpoint(session, round_id)
        images = detection_images(
            session, info.project_id, shard=shard, n_shards=n_shards, max_image_id=max_image_id
        )
    key = shard_key(info.project_id, info.number, shard, n_shards)
    if ctx.storage.exists(key):
        return {"shard": shard, "images": len(images), "skipped": "already written", "key": key}
    device = mm.default_device()
    with tempfile.TemporaryDirectory(prefix="maskmill-detect-") as tmp:
        net = load_round_model(ctx.storage, checkpoint_uri, Path(tmp), device).model
    results: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pictures = [open_image(ref.uri, ctx.settings, ctx.storage).convert("RGB") for ref in batch]
        predictions = mm.predict(net, pictures, batch_size=batch_size)
        results += to_plain_results(
            mm.to_coco_results(predictions, [ref.id for ref in batch], net.config.category_ids)
        )
        done = start + len(batch)
        ctx.progress(
            0.02 + 0.95 * done / len(images),
            f"shard {shard}: {done}/{len(images)} images",
            images=done,
            masks=len(results),
        )
    payload = gzip.compress(json.dumps(results, separators=(",", ":")).encode(), compresslevel=5)
    ctx.storage.put_bytes(key, payload)
    return {
        "shard": shard,
        "n_shards": n_shards,
        "images": len(images),
        "masks": len(results),
        "key": key,
        "seconds": round(time.perf_counter() - started, 1),
    }


def to_plain_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep what the cluster job reads (and the predictions endpoint accepts): image, class, RLE,
    score and feature. Features are stored as float32-precision decimals (what the tree keeps)."""
    return [
        {
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "segmentation": r["segmentation"],
            "score": round(float(r["score"]), 6),
            "feature": [float(np.float32(v)) for v in r["feature"]],
        }
        for r in results
    ]


def missing_shards(storage: Storage, project_id: int, number: int, n_shards: int) -> list[int]:
    return [
        k for k in range(n_shards) if not storage.exists(shard_key(project_id, number, k, n_shards))
    ]


def drop_accepted_duplicates(
    predictions: list[dict[str, Any]], accepted: list[AcceptedMask]
) -> tuple[list[dict[str, Any]], int]:
    """Predictions that re-detect an already accepted object (same image and class, IoU above
    :data:`DUPLICATE_IOU`) are dropped; returns the rest and how many were dropped."""
    known: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for mask in accepted:
        known[(mask.image_id, mask.class_id)].append(rle_for_pycocotools(mask.rle))
    kept: list[dict[str, Any]] = []
    dropped = 0
    for item in predictions:
        others = known.get((item["image_id"], item["category_id"]))
        if others:
            ious = np.asarray(
                mask_utils.iou(
                    [rle_for_pycocotools(item["segmentation"])], others, [0] * len(others)
                )
            )
            if ious.size and float(ious.max()) > DUPLICATE_IOU:
                dropped += 1
                continue
        kept.append(item)
    return kept, dropped


def finish_round(ctx: JobContext, *, round_id: int, n_shards: int) -> dict[str, Any]:
    """Merge the shards into the round's predictions file and build its cluster trees.

    A round whose trees an earlier attempt already committed is left alone: its predictions file
    is what those trees' leaf indices point into, so it is not rewritten either.
    """
    with ctx.database.session() as session:
        info: RoundInfo = round_info(session, round_id)
        done = built_summary(session, round_id)
        if done is not None:
            return done
        earlier = [
            m
            for m in accepted_masks(session, ctx.storage, info.project_id)
            if m.round_number < info.number
        ]
    missing = missing_shards(ctx.storage, info.project_id, info.number, n_shards)
    if missing:
        raise ValueError(
            f"round {info.number}: detect shards {missing} of {n_shards} have not finished"
        )
    ctx.progress(0.01, "merging detect shards")
    merged: list[dict[str, Any]] = []
    for k in range(n_shards):
        data = ctx.storage.get_bytes(shard_key(info.project_id, info.number, k, n_shards))
        merged += json.loads(gzip.decompress(data))
    merged, dropped = drop_accepted_duplicates(merged, earlier)
    key = store_predictions(ctx.storage, info.project_id, info.number, merged)
    result = build_trees(ctx, round_id=round_id, predictions_key=key)
    return {**result, "predictions": len(merged), "dropped_accepted_duplicates": dropped}
