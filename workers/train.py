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
(``projects/{pid}/rounds/{n}/train/resume.pt``); a retried job (a crashed worker, a preempted GPU)
downloads it and continues at that step with the very batches the interrupted run would have seen
next (the batch order is a pure function of ``(seed, step)``). The final weights go to
``projects/{pid}/rounds/{n}/model.pt`` (no optimizer state: half the size) and to
``Round.checkpoint_uri``; once they exist a retry only re-evaluates.

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
from dataclasses import dataclass
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
from service.render import open_image
from service.storage import Storage
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


def gather_training_data(
    ctx: JobContext, info: RoundInfo, workdir: Path, *, paint: bool = True
) -> TrainingData:
    """Seed masks + earlier rounds' accepted masks (one per object) + the held-out set; with
    ``paint``, unverified detections on accepted-mask images are painted over."""
    with ctx.database.session() as session:
        truths = session.execute(
            select(
                GroundTruthMask.image_id,
                GroundTruthMask.class_id,
                GroundTruthMask.split,
                GroundTruthMask.rle,
            )
            .where(GroundTruthMask.project_id == info.project_id)
            .order_by(GroundTruthMask.id)
        ).all()
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


def _validate(steps: int, batch_size: int, lr: float | None, checkpoint_every: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and 0 < lr <= 1):
        raise ValueError(f"lr must be a number in (0, 1], got {lr!r}")


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
    """Train the round's model; store its checkpoint; report loss and held-out mask AP."""
    _validate(steps, batch_size, lr, checkpoint_every)
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
                download_checkpoint(storage, final_key, workdir), device=device
            )
            result.update(init="stored", resumed_from_step=checkpoint.step)
            net = checkpoint.model
        else:
            net, history, init, resumed_from, lr_used = _train_loop(
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
            result.update(init=init, resumed_from_step=resumed_from, lr=lr_used)
            if history:
                # Means over the first and the last few steps: single steps are too noisy.
                window = min(len(history), 2 * REPORT_EVERY)
                result["loss_first"] = round(
                    statistics.fmean(h["loss"] for h in history[:window]), 4
                )
                result["loss"] = round(statistics.fmean(h["loss"] for h in history[-window:]), 4)
            path = mm.save_checkpoint(workdir / "model.pt", net, None, steps, net.config)
            upload_checkpoint(storage, final_key, path)
        uri = storage.uri(final_key)
        with ctx.database.session() as session:
            session.execute(update(Round).where(Round.id == round_id).values(checkpoint_uri=uri))
            session.commit()
        storage.delete(resume)
        result["checkpoint_uri"] = uri
        result["ap"] = None
        if data.heldout is not None:
            ctx.progress(0.9, "evaluating mask AP on the held-out set")
            result["ap"] = round(
                mm.evaluate_mask_ap(
                    net, data.heldout.path, data.images_dir, batch_size=eval_batch_size
                ),
                4,
            )
            result["heldout_images"] = data.heldout.images
    result["seconds"] = round(time.perf_counter() - started, 1)
    ctx.progress(0.99, "trained", ap=result["ap"], loss=result.get("loss"))
    return result


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
) -> tuple[mm.MaskScoringRCNN, list[dict[str, float]], str, int | None, float]:
    storage = ctx.storage
    resume = resume_key(info.project_id, info.number)
    resumed_from: int | None = None
    if storage.exists(resume):
        checkpoint = mm.load_checkpoint(
            download_checkpoint(storage, resume, workdir), device=device
        )
        net, start = checkpoint.model, checkpoint.step
        optimizer = checkpoint.make_optimizer()  # the saved state holds the learning rate
        init = "resumed"
        resumed_from = start
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
    history: list[dict[str, float]] = []
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
        history += chunk
        step += n
        ctx.progress(
            0.05 + 0.8 * step / steps,
            f"training step {step}/{steps}",
            step=step,
            steps=steps,
            loss=round(statistics.fmean(h["loss"] for h in chunk), 4),
        )
        if step % checkpoint_every == 0 and step < steps:
            path = mm.save_checkpoint(workdir / "resume.pt", net, optimizer, step, net.config)
            upload_checkpoint(storage, resume, path)
    net.eval()
    group = optimizer.param_groups[0]
    return net, history, init, resumed_from, float(group.get("base_lr", group["lr"]))
