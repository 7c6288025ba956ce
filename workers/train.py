"""The ``train`` job: (re)train a round's detector on the seed set plus earlier accepted masks.

Training data (DESIGN.md "Workers"): the project's seed ground truth and, from round 2 on, the masks
the crowd accepted in earlier rounds, at most one per object (:func:`service.export.one_mask_per_object`
collapses the re-detections of one object that several rounds accepted). The set is written as a
COCO file plus PNG images to a temporary directory and read by the model's own
:class:`~workers.model.CocoInstanceDataset`, so a real dataset and a project's data take one path.
An image with accepted masks is only partly annotated; the earlier rounds' other detections on it
are painted over (:func:`unverified_regions`) so that its unannotated objects are not learnt as
background.

Resumable: every ``checkpoint_every`` steps the model, the optimizer and the step go to storage
(``projects/{pid}/rounds/{n}/train/resume.pt``), with what the run started from, its warm-up
length and its losses so far; a retried job (a crashed worker, a preempted GPU) downloads it and
continues at that step with the very batches and learning rates the interrupted run would have
used next (the batch order is a pure function of ``(seed, step)``) and reports the whole run's
loss. An unreadable resume file is discarded (and reported) rather than failing every retry. The
final weights go to ``projects/{pid}/rounds/{n}/model.pt`` (no optimizer state: half the size),
with the run's summary, and to ``Round.checkpoint_uri``; once they exist a retry only
re-evaluates, and reports the stored summary.

A requester's own weights (``checkpoint`` of ``POST .../rounds``) replace training:
:func:`use_checkpoint` checks them and re-saves them as the round's ``model.pt``.

Round 1 starts from scratch (nothing is downloaded, ever); later rounds start from the latest
earlier round's weights with a fresh optimizer, half the learning rate and a short warm-up, which is
cheaper than training from scratch and is what "the retrained model" of the next round means here.

Evaluation: COCO mask AP (0.50:0.95) on the held-out ground truth, when the project has any.
GPU when present, CPU otherwise. The database session is closed during training and evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from scipy import ndimage
from sqlalchemy import select, update

from service.coco import rle_area, rle_bbox, rle_for_pycocotools
from service.engine.treefile import read_tree_file
from service.export import AcceptedMask, accepted_masks, one_mask_per_object
from service.jobs import JobContext
from service.models import GroundTruthMask, Image, Project, Round, Split, Tree
from service.render import open_image, path_under_image_root
from service.storage import Storage, StorageError
from workers import model as mm

DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 2
DEFAULT_LR = 0.02
#: Later rounds start from a trained model: a smaller step keeps what it learnt.
DEFAULT_LR_FINETUNE = 0.01
DEFAULT_CHECKPOINT_EVERY = 50
DEFAULT_WARMUP_SCRATCH = 50
DEFAULT_WARMUP_FINETUNE = 10

#: Steps between progress reports (each report is one small database write).
REPORT_EVERY = 5

#: ModelConfig fields a round may not set: they follow from the project's classes.
_DERIVED_FIELDS = frozenset({"num_classes", "category_ids"})

#: Anchor sizes torchvision uses for ~800 px images, scaled down for small images below.
_BASE_ANCHORS = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------- round data


@dataclass(frozen=True)
class RoundInfo:
    """What the jobs of one round need to know about it, read once (then the session closes)."""

    round_id: int
    project_id: int
    number: int
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ImageRef:
    id: int
    uri: str
    width: int
    height: int


def round_info(session: Any, round_id: int) -> RoundInfo:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise ValueError(f"round {round_id} does not exist")
    project = session.get(Project, rnd.project_id)
    return RoundInfo(
        round_id=rnd.id,
        project_id=rnd.project_id,
        number=rnd.number,
        class_ids=tuple(c.id for c in project.classes),
        class_names=tuple(c.name for c in project.classes),
    )


def round_prefix(project_id: int, number: int) -> str:
    return f"projects/{project_id}/rounds/{number}"


def resume_key(project_id: int, number: int) -> str:
    return f"{round_prefix(project_id, number)}/train/resume.pt"


def model_key(project_id: int, number: int) -> str:
    return f"{round_prefix(project_id, number)}/model.pt"


def image_refs(session: Any, image_ids: Sequence[int]) -> dict[int, ImageRef]:
    if not image_ids:
        return {}
    rows = session.execute(
        select(Image.id, Image.uri, Image.width, Image.height).where(Image.id.in_(image_ids))
    ).all()
    return {row[0]: ImageRef(*row) for row in rows}


# ------------------------------------------------------------------------- checkpoints in storage


def upload_checkpoint(storage: Storage, key: str, path: Path) -> str:
    with path.open("rb") as source, storage.open_write(key) as target:
        shutil.copyfileobj(source, target, length=1 << 20)
    return storage.uri(key)


def download_checkpoint(storage: Storage, key: str, directory: Path) -> Path:
    """Copy a checkpoint out of storage (``torch.load`` wants a file; S3 has none)."""
    path = directory / key.replace("/", "_")
    with storage.open_read(key) as source, path.open("wb") as target:
        shutil.copyfileobj(source, target, length=1 << 20)
    return path


def load_round_model(
    storage: Storage, checkpoint_uri: str, directory: Path, device: torch.device | None = None
) -> mm.Checkpoint:
    """The trained model of a round, from its ``checkpoint_uri``."""
    path = download_checkpoint(storage, storage.key_from_uri(checkpoint_uri), directory)
    try:
        return mm.load_checkpoint(path, device=device)
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the training set


@dataclass(frozen=True)
class CocoSet:
    """A COCO file written for the model's dataset class, and what went into it."""

    path: Path
    images: int
    annotations: int


def write_coco_set(
    path: Path,
    images_dir: Path,
    refs: dict[int, ImageRef],
    masks: Sequence[tuple[int, int, dict[str, Any]]],
    info: RoundInfo,
    ctx: JobContext,
    erase: dict[int, np.ndarray] | None = None,
) -> CocoSet:
    """Write ``(image_id, class_id, rle)`` masks as COCO with the images as PNG files.

    Images are re-encoded losslessly from wherever they live (under the image root or in
    storage, through :func:`service.render.open_image`, which refuses anything else), so the
    dataset class reads one local directory whatever the deployment's storage is. Pixels in
    ``erase[image_id]`` are painted over (see :func:`unverified_regions`).
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    used = sorted({image_id for image_id, _, _ in masks})
    entries = []
    for image_id in used:
        ref = refs.get(image_id)
        if ref is None:
            raise ValueError(f"image {image_id} of the training set is not registered")
        file_name = f"{image_id}.png"
        target = images_dir / file_name
        if not target.exists():
            picture = open_image(ref.uri, ctx.settings, ctx.storage).convert("RGB")
            if picture.size != (ref.width, ref.height):
                raise ValueError(
                    f"image {image_id} is {picture.size[0]}x{picture.size[1]} pixels, "
                    f"registered as {ref.width}x{ref.height}"
                )
            region = (erase or {}).get(image_id)
            if region is not None and region.any():
                picture = PILImage.fromarray(paint_over(np.asarray(picture), region))
            picture.save(target, format="PNG", compress_level=1)
        entries.append(
            {"id": image_id, "file_name": file_name, "width": ref.width, "height": ref.height}
        )
    annotations = [
        {
            "id": k + 1,
            "image_id": image_id,
            "category_id": class_id,
            "segmentation": rle,
            "area": rle_area(rle),
            "bbox": rle_bbox(rle),
            "iscrowd": 0,
        }
        for k, (image_id, class_id, rle) in enumerate(masks)
    ]
    categories = [
        {"id": cid, "name": name}
        for cid, name in zip(info.class_ids, info.class_names, strict=True)
    ]
    path.write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": categories}),
        encoding="utf-8",
    )
    return CocoSet(path, len(entries), len(annotations))


def unverified_regions(
    session: Any,
    storage: Storage,
    info: RoundInfo,
    accepted: Sequence[AcceptedMask],
    *,
    grow: int = 2,
) -> dict[int, np.ndarray]:
    """Per image that has accepted masks, the pixels of the earlier rounds' other detections.

    An image enters training with only the masks the crowd accepted; its other objects are not
    annotated, and the detector would learn them as background. Most of them were detected
    (their masks are in the tree files, but unverified or rejected), so their pixels -- grown by
    ``grow`` pixels, minus every accepted mask -- are painted over before training. Objects the
    model never detected stay, which is the part of the problem this cannot fix.
    """
    shapes: dict[int, tuple[int, int]] = {}
    verified: dict[int, np.ndarray] = {}
    for mask in accepted:
        pixels = mask_utils.decode(rle_for_pycocotools(mask.rle)).astype(bool)
        shapes[mask.image_id] = pixels.shape
        verified[mask.image_id] = verified.get(mask.image_id, np.zeros_like(pixels)) | pixels
    if not verified:
        return {}
    wanted = np.fromiter(verified, dtype=np.int64)
    uris = session.scalars(
        select(Tree.uri)
        .join(Round, Round.id == Tree.round_id)
        .where(Tree.project_id == info.project_id, Round.number < info.number)
    ).all()
    regions: dict[int, np.ndarray] = {}
    for uri in uris:
        with storage.open_read(storage.key_from_uri(uri)) as handle:
            tree_file = read_tree_file(handle)
        for pos in np.flatnonzero(np.isin(tree_file.image_ids, wanted)).tolist():
            image_id = int(tree_file.image_ids[pos])
            pixels = mask_utils.decode(rle_for_pycocotools(tree_file.rle(pos))).astype(bool)
            if pixels.shape != shapes[image_id]:
                continue  # a mask of another size cannot be of this image
            regions[image_id] = regions.get(image_id, np.zeros_like(pixels)) | pixels
    for image_id, region in regions.items():
        if grow > 0:
            region = ndimage.binary_dilation(region, iterations=grow)
        regions[image_id] = region & ~verified[image_id]
    return regions


def paint_over(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``image`` with ``region`` filled with the median colour of the rest of the image."""
    if region.shape != image.shape[:2]:
        raise ValueError(f"region {region.shape} does not fit an image of {image.shape[:2]}")
    out = image.copy()
    rest = image[~region]
    fill = np.median(rest, axis=0) if len(rest) else np.full(image.shape[2], 127)
    out[region] = fill.astype(image.dtype)
    return out


@dataclass(frozen=True)
class TrainingData:
    train: CocoSet
    heldout: CocoSet | None
    images_dir: Path
    seed_masks: int
    accepted_masks: int
    image_sizes: tuple[tuple[int, int], ...]
    painted_images: int = 0


def _ground_truth(session: Any, project_id: int) -> list[Any]:
    """``(image_id, class_id, split, rle)`` of every ground-truth mask, in upload order."""
    return session.execute(
        select(
            GroundTruthMask.image_id,
            GroundTruthMask.class_id,
            GroundTruthMask.split,
            GroundTruthMask.rle,
        )
        .where(GroundTruthMask.project_id == project_id)
        .order_by(GroundTruthMask.id)
    ).all()


def write_heldout_set(ctx: JobContext, info: RoundInfo, workdir: Path) -> CocoSet | None:
    """The held-out ground truth alone (``workdir/heldout.json`` + images), None if there is none:
    what evaluating a model needs when there is nothing to train."""
    with ctx.database.session() as session:
        heldout = [
            (i, c, r)
            for i, c, split, r in _ground_truth(session, info.project_id)
            if split is Split.HELDOUT
        ]
        refs = image_refs(session, sorted({m[0] for m in heldout}))
    if not heldout:
        return None
    return write_coco_set(workdir / "heldout.json", workdir / "images", refs, heldout, info, ctx)


def gather_training_data(
    ctx: JobContext, info: RoundInfo, workdir: Path, *, paint: bool = True
) -> TrainingData:
    """Seed masks + earlier rounds' accepted masks (one per object) + the held-out set; with
    ``paint``, unverified detections on accepted-mask images are painted over."""
    with ctx.database.session() as session:
        truths = _ground_truth(session, info.project_id)
        accepted = [
            m
            for m in accepted_masks(session, ctx.storage, info.project_id)
            if m.round_number < info.number
        ]
        kept = one_mask_per_object(accepted)
        seed = [(i, c, r) for i, c, split, r in truths if split is Split.SEED]
        heldout = [(i, c, r) for i, c, split, r in truths if split is Split.HELDOUT]
        train_masks = seed + [(m.image_id, m.class_id, m.rle) for m in kept]
        refs = image_refs(session, sorted({m[0] for m in train_masks + heldout}))
        erase = unverified_regions(session, ctx.storage, info, accepted) if paint else {}
    if not seed:
        raise ValueError(
            f"project {info.project_id} has no seed ground truth: upload it with "
            "POST /api/v1/projects/{pid}/ground-truth?split=seed before training"
        )
    images_dir = workdir / "images"
    train = write_coco_set(
        workdir / "train.json", images_dir, refs, train_masks, info, ctx, erase=erase
    )
    held = (
        write_coco_set(workdir / "heldout.json", images_dir, refs, heldout, info, ctx)
        if heldout
        else None
    )
    sizes = tuple((refs[i].width, refs[i].height) for i in sorted({m[0] for m in seed}))
    painted = sum(1 for region in erase.values() if region.any())
    return TrainingData(train, held, images_dir, len(seed), len(kept), sizes, painted)


# --------------------------------------------------------------------------- model configuration


def default_model_config(
    class_ids: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    *,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> mm.ModelConfig:
    """A configuration sized for the project's images, with the round's overrides applied.

    Images are fed at their own (median) size instead of torchvision's 800 px: resampling small
    images up only multiplies the cost. Anchors shrink with images smaller than 256 px so the
    smallest anchors still match small objects, and the paper's 1000 px minimum box area (for
    ~800 px images) is scaled by the image area. Explicit overrides win over all of this.
    """
    overrides = dict(overrides or {})
    forbidden = sorted(_DERIVED_FIELDS & set(overrides))
    if forbidden:
        raise ValueError(
            f"model options {forbidden} are derived from the project's classes; do not set them"
        )
    if not image_sizes:
        raise ValueError("no seed images to size the model for")
    short = int(statistics.median(min(w, h) for w, h in image_sizes))
    long = int(statistics.median(max(w, h) for w, h in image_sizes))
    min_size = int(overrides.get("min_size", min(max(short, 32), 1333)))
    scale = min(1.0, min_size / 256)
    values: dict[str, Any] = {
        "num_classes": len(class_ids),
        "category_ids": tuple(class_ids),
        "min_size": min_size,
        "max_size": max(min_size, min(long, 2 * 1333)),
        "anchor_sizes": tuple(max(4, round(s * scale)) for s in _BASE_ANCHORS),
        "min_box_area": round(1000.0 * (min_size / 800) ** 2, 1),
        "seed": seed,
    }
    values.update(overrides)
    return mm.ModelConfig.from_dict(values)


# ------------------------------------------------------------------------------------- batches


class SeededBatches:
    """Batches in an order that is a pure function of ``(seed, step)``.

    Epoch ``e`` visits the dataset in the permutation drawn from ``(seed, e)``; iteration starts at
    global step ``start_step`` without loading the batches before it. So a job resumed from a
    checkpoint at step ``k`` trains on exactly the batches the interrupted run would have used.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, start_step: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError("the training set has no images")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return order[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        step = self.start_step
        while True:
            yield mm.collate_detection([self.dataset[i] for i in self.indices(step)])
            step += 1


# ------------------------------------------------------------------------------------- the job


def _previous_checkpoint(session: Any, info: RoundInfo) -> tuple[int, str] | None:
    """The latest earlier round of the project that has trained weights."""
    row = session.execute(
        select(Round.number, Round.checkpoint_uri)
        .where(
            Round.project_id == info.project_id,
            Round.number < info.number,
            Round.checkpoint_uri.is_not(None),
        )
        .order_by(Round.number.desc())
        .limit(1)
    ).first()
    return (int(row[0]), str(row[1])) if row else None


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _validate(
    steps: Any,
    batch_size: Any,
    lr: Any,
    checkpoint_every: Any,
    warmup_steps: Any = None,
    seed: Any = 0,
    eval_batch_size: Any = 4,
) -> None:
    """Refuse bad options before any work, naming the option (they may come from a job's
    stored arguments, not only from the validated API body)."""
    for name, value, minimum in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("checkpoint_every", checkpoint_every, 1),
        ("seed", seed, 0),
        ("eval_batch_size", eval_batch_size, 1),
    ):
        if not _is_count(value, minimum):
            kind = "a positive integer" if minimum else "a non-negative integer"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    if warmup_steps is not None and not _is_count(warmup_steps, 0):
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    is_number = isinstance(lr, int | float) and not isinstance(lr, bool)
    if lr is not None and not (is_number and math.isfinite(lr) and 0 < lr <= 1):
        raise ValueError(f"lr must be a number in (0, 1], got {lr!r}")


def _record_checkpoint(ctx: JobContext, round_id: int, uri: str) -> None:
    with ctx.database.session() as session:
        session.execute(update(Round).where(Round.id == round_id).values(checkpoint_uri=uri))
        session.commit()


def _evaluate(
    ctx: JobContext, net: mm.MaskScoringRCNN, heldout: CocoSet | None, images_dir: Path, batch: int
) -> dict[str, Any]:
    if heldout is None:
        return {"ap": None}
    ctx.progress(0.9, "evaluating mask AP on the held-out set")
    ap = mm.evaluate_mask_ap(net, heldout.path, images_dir, batch_size=batch)
    return {"ap": round(ap, 4), "heldout_images": heldout.images}


def train(
    ctx: JobContext,
    *,
    round_id: int,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    warmup_steps: int | None = None,
    seed: int = 0,
    model: dict[str, Any] | None = None,
    eval_batch_size: int = 4,
    paint_unverified: bool = True,
) -> dict[str, Any]:
    """Train the round's model; store its checkpoint; report loss and held-out mask AP.

    The summary of the run (how it was initialised, learning rate, loss) is stored inside the
    final checkpoint, so a retry that finds the weights stored reports the same numbers.
    """
    _validate(steps, batch_size, lr, checkpoint_every, warmup_steps, seed, eval_batch_size)
    started = time.perf_counter()
    with ctx.database.session() as session:
        info = round_info(session, round_id)
        previous = _previous_checkpoint(session, info)
    device = mm.default_device()
    storage = ctx.storage
    final_key = model_key(info.project_id, info.number)
    resume = resume_key(info.project_id, info.number)
    ctx.progress(0.01, "gathering the training set")
    with tempfile.TemporaryDirectory(prefix="maskmill-train-") as tmp:
        workdir = Path(tmp)
        data = gather_training_data(ctx, info, workdir, paint=paint_unverified)
        result: dict[str, Any] = {
            "round": info.number,
            "steps": steps,
            "train_images": data.train.images,
            "seed_masks": data.seed_masks,
            "accepted_masks": data.accepted_masks,
            "painted_images": data.painted_images,
            "device": device.type,
        }
        if storage.exists(final_key):
            # A retry after the weights were stored: nothing left to train.
            checkpoint = mm.load_checkpoint(
                download_checkpoint(storage, final_key, workdir), device=device, name=final_key
            )
            result.update({"init": "stored", **checkpoint.extra})
            result["reused_stored_weights"] = True
            net = checkpoint.model
        else:
            run = _train_loop(
                ctx,
                info,
                data,
                workdir,
                device,
                previous=previous,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                checkpoint_every=checkpoint_every,
                warmup_steps=warmup_steps,
                seed=seed,
                overrides=model,
            )
            summary = run.summary()
            result.update(summary)
            net = run.net
            path = mm.save_checkpoint(
                workdir / "model.pt", net, None, steps, net.config, extra=summary
            )
            upload_checkpoint(storage, final_key, path)
        uri = storage.uri(final_key)
        _record_checkpoint(ctx, round_id, uri)
        # Only now: until the round points at the final weights, the resume state is the work.
        storage.delete(resume)
        result["checkpoint_uri"] = uri
        result.update(_evaluate(ctx, net, data.heldout, data.images_dir, eval_batch_size))
    result["seconds"] = round(time.perf_counter() - started, 1)
    ctx.progress(0.99, "trained", ap=result["ap"], loss=result.get("loss"))
    return result


@dataclass
class TrainRun:
    """A finished training loop and what the round reports about it."""

    net: mm.MaskScoringRCNN
    losses: list[float]
    init: str
    resumed_from: int | None
    lr: float
    warmup_steps: int
    resume_discarded: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "init": self.init,
            "resumed_from_step": self.resumed_from,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
        }
        if self.losses:
            # Means over the first and the last few steps: single steps are too noisy.
            window = min(len(self.losses), 2 * REPORT_EVERY)
            out["loss_first"] = round(statistics.fmean(self.losses[:window]), 4)
            out["loss"] = round(statistics.fmean(self.losses[-window:]), 4)
        if self.resume_discarded:
            out["resume_discarded"] = self.resume_discarded
        return out


def _load_resume(
    ctx: JobContext, key: str, workdir: Path, device: torch.device
) -> tuple[mm.Checkpoint | None, str | None]:
    """The interrupted run's state, or why it had to be discarded.

    An unreadable resume file (written by an incompatible version, damaged on disk) would fail
    every retry the same way; starting over is the only way forward, and it is reported.
    """
    if not ctx.storage.exists(key):
        return None, None
    try:
        path = download_checkpoint(ctx.storage, key, workdir)
        return mm.load_checkpoint(path, device=device, name=key), None
    except ValueError as exc:
        ctx.storage.delete(key)
        ctx.progress(0.05, f"discarded an unreadable resume checkpoint: {exc}")
        return None, str(exc)


def _train_loop(
    ctx: JobContext,
    info: RoundInfo,
    data: TrainingData,
    workdir: Path,
    device: torch.device,
    *,
    previous: tuple[int, str] | None,
    steps: int,
    batch_size: int,
    lr: float | None,
    checkpoint_every: int,
    warmup_steps: int | None,
    seed: int,
    overrides: dict[str, Any] | None,
) -> TrainRun:
    storage = ctx.storage
    resume = resume_key(info.project_id, info.number)
    resumed_from: int | None = None
    losses: list[float] = []
    checkpoint, discarded = _load_resume(ctx, resume, workdir, device)
    if checkpoint is not None:
        net, start = checkpoint.model, checkpoint.step
        optimizer = checkpoint.make_optimizer()  # the saved state holds the learning rate
        resumed_from = start
        # What the interrupted run started from, its warm-up and its losses so far: without
        # them a resumed run would report a partial loss curve and warm up on another schedule.
        init = str(checkpoint.extra.get("init", "resumed"))
        if warmup_steps is None and "warmup_steps" in checkpoint.extra:
            warmup_steps = int(checkpoint.extra["warmup_steps"])
        losses = [float(v) for v in checkpoint.extra.get("losses", [])][:start]
    else:
        start = 0
        if previous is not None:
            base = load_round_model(storage, previous[1], workdir, device)
            net, init = base.model, f"round {previous[0]}"
        else:
            config = default_model_config(
                info.class_ids, data.image_sizes, seed=seed, overrides=overrides
            )
            net, init = mm.build_model(config).to(device), "scratch"
        if lr is None:
            lr = DEFAULT_LR if init == "scratch" else DEFAULT_LR_FINETUNE
        optimizer = mm.make_optimizer(net, lr=lr)
    if tuple(net.config.category_ids) != info.class_ids:
        raise ValueError(
            f"the checkpoint's classes {net.config.category_ids} are not the project's "
            f"{info.class_ids}"
        )
    if warmup_steps is None:
        warmup_steps = DEFAULT_WARMUP_SCRATCH if init == "scratch" else DEFAULT_WARMUP_FINETUNE
        warmup_steps = min(warmup_steps, max(1, steps // 4))
    dataset = mm.CocoInstanceDataset(data.train.path, data.images_dir, category_ids=info.class_ids)
    step = start
    # Torch's own randomness (proposal sampling) depends on where the run (re)starts, so a resumed
    # run is reproducible too, though not bit-identical to an uninterrupted one.
    torch.manual_seed(seed * 1_000_003 + start)
    while step < steps:
        n = min(REPORT_EVERY, steps - step, checkpoint_every - step % checkpoint_every)
        batches = SeededBatches(dataset, batch_size, seed, start_step=step)
        chunk = mm.train_steps(
            net, batches, optimizer, n, start_step=step, warmup_steps=warmup_steps
        )
        losses += [h["loss"] for h in chunk]
        step += n
        ctx.progress(
            0.05 + 0.8 * step / steps,
            f"training step {step}/{steps}",
            step=step,
            steps=steps,
            loss=round(statistics.fmean(h["loss"] for h in chunk), 4),
        )
        if step % checkpoint_every == 0 and step < steps:
            state = {"init": init, "warmup_steps": warmup_steps, "losses": losses}
            path = mm.save_checkpoint(
                workdir / "resume.pt", net, optimizer, step, net.config, extra=state
            )
            upload_checkpoint(storage, resume, path)
    net.eval()
    group = optimizer.param_groups[0]
    return TrainRun(
        net=net,
        losses=losses,
        init=init,
        resumed_from=resumed_from,
        lr=float(group.get("base_lr", group["lr"])),
        warmup_steps=warmup_steps,
        resume_discarded=discarded,
    )


# ------------------------------------------------------------------------ a requester's weights


def fetch_checkpoint(ctx: JobContext, uri: str, project_id: int, directory: Path) -> Path:
    """A requester's checkpoint as a local file, from the two places ``POST .../rounds`` accepts.

    An object of the project in storage is downloaded; a file under the image root is read in
    place. The job's arguments are checked again here, as :func:`service.render.open_image`
    checks image URIs: whatever the database says, nothing outside those two places is read.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"checkpoint must be a non-empty URI, got {uri!r}")
    try:
        key = ctx.storage.key_from_uri(uri)
    except StorageError:
        key = None
    if key is not None:
        if not key.startswith(f"projects/{project_id}/"):
            raise ValueError(f"checkpoint {uri!r} is not an object of project {project_id}")
        try:
            return download_checkpoint(ctx.storage, key, directory)
        except StorageError as exc:
            raise ValueError(f"checkpoint {uri!r} cannot be read from storage: {exc}") from None
    path = path_under_image_root(uri, ctx.settings.image_root)
    if path is None:
        raise ValueError(
            f"checkpoint {uri!r} is neither in storage nor under the image root; refusing to read it"
        )
    if not path.is_file():
        raise ValueError(f"checkpoint {uri!r} does not exist (any more)")
    return path


def adapt_to_project(
    config: mm.ModelConfig, info: RoundInfo, name: str
) -> tuple[mm.ModelConfig, dict[str, int]]:
    """The checkpoint's configuration with the project's class ids, and how labels were mapped.

    Weights trained elsewhere carry their own category ids (COCO's 1..K, another project's ids).
    Label ``k`` of the checkpoint is taken as the project's ``k``-th class, in the order the
    project declared its classes; only the number of classes must agree. The mapping is
    reported (``{checkpoint id: project class id}``) so a requester can see what was assumed.
    """
    if config.num_classes != len(info.class_ids):
        raise ValueError(
            f"checkpoint {name!r} detects {config.num_classes} classes but the project has "
            f"{len(info.class_ids)} ({', '.join(info.class_names)}); its labels are taken as the "
            "project's classes in declaration order, so the counts must agree"
        )
    ids = tuple(config.category_ids or ())
    if ids == info.class_ids:
        return config, {}
    mapping = {str(old): new for old, new in zip(ids, info.class_ids, strict=True)}
    return replace(config, category_ids=info.class_ids), mapping


def use_checkpoint(
    ctx: JobContext, *, round_id: int, checkpoint: str, eval_batch_size: int = 4
) -> dict[str, Any]:
    """Make a requester's weights the round's model instead of training (``checkpoint`` of
    ``POST .../rounds``); report their mask AP on the held-out set.

    The weights are checked (a maskmill checkpoint whose classes fit the project) and re-saved
    as the round's own ``model.pt``: later rounds fine-tune from it, and the round keeps working
    if the requester's file changes or disappears. A retry after that finds it stored.
    """
    if not _is_count(eval_batch_size, 1):
        raise ValueError(f"eval_batch_size must be a positive integer, got {eval_batch_size!r}")
    started = time.perf_counter()
    with ctx.database.session() as session:
        info = round_info(session, round_id)
    device = mm.default_device()
    storage = ctx.storage
    final_key = model_key(info.project_id, info.number)
    ctx.progress(0.01, "loading the given checkpoint")
    result: dict[str, Any] = {"round": info.number, "steps": 0, "device": device.type}
    with tempfile.TemporaryDirectory(prefix="maskmill-checkpoint-") as tmp:
        workdir = Path(tmp)
        if storage.exists(final_key):
            stored = mm.load_checkpoint(
                download_checkpoint(storage, final_key, workdir), device=device, name=final_key
            )
            result.update(stored.extra)
            result["reused_stored_weights"] = True
            net = stored.model
        else:
            source = fetch_checkpoint(ctx, checkpoint, info.project_id, workdir)
            loaded = mm.load_checkpoint(source, device=device, name=repr(checkpoint))
            config, class_map = adapt_to_project(loaded.config, info, checkpoint)
            net = loaded.model
            net.config = config
            summary: dict[str, Any] = {"init": "checkpoint", "checkpoint": checkpoint}
            if class_map:
                summary["class_map"] = class_map
            path = mm.save_checkpoint(
                workdir / "model.pt", net, None, loaded.step, config, extra=summary
            )
            upload_checkpoint(storage, final_key, path)
            result.update(summary)
        uri = storage.uri(final_key)
        _record_checkpoint(ctx, round_id, uri)
        result["checkpoint_uri"] = uri
        ctx.progress(0.5, "writing the held-out set")
        heldout = write_heldout_set(ctx, info, workdir)
        result.update(_evaluate(ctx, net, heldout, workdir / "images", eval_batch_size))
    result["seconds"] = round(time.perf_counter() - started, 1)
    ctx.progress(0.99, "checkpoint ready", ap=result["ap"])
    return result
