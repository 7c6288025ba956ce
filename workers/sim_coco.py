"""Turn a COCO prediction set with ground truth into (f, s, IoU) rows for fitting mixtures.

Each prediction's IoU is its best mask IoU against the ground-truth masks of the same class in
the same image (pycocotools ``mask.iou``), which is the quantity the crowd is asked about
("does this mask outline the object?"). Crowd ground-truth regions (``iscrowd: 1``) are left out:
a prediction covering a crowd is not a correct instance. Predictions on images the ground truth
does not list are ignored (their IoU is unknown) and counted in the notes.

Features: the prediction's ``feature`` vector when every prediction carries one (reduced by a
seeded Gaussian random projection when it is wider than the simulation's feature dimension, as
the paper's release does for PointRend features); otherwise a 6-d box-geometry descriptor, a
poor stand-in for appearance that the resulting model says it used.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.sim_model import SCORE_EPS


@dataclass(frozen=True)
class FitData:
    """Per-class rows ``[f..., s, IoU]`` ready for :func:`workers.sim_model.fit_model`."""

    per_class: dict[int, np.ndarray]
    names: dict[int, str]
    feature_source: str
    notes: tuple[str, ...]


def _read_json(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _gt_rle(segmentation: Any, height: int, width: int) -> Any:
    """A COCO ground-truth segmentation (polygons, uncompressed or compressed RLE) as one RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation
        ):
            raise ValueError("polygon segmentation needs lists of at least 3 (x, y) points")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return _compressed_rle(segmentation)
    raise ValueError("segmentation must be polygons or an RLE object")


def _compressed_rle(segmentation: Any) -> dict[str, Any]:
    if not isinstance(segmentation, dict):
        raise ValueError("segmentation must be an RLE object")
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ValueError("RLE 'size' must be [height, width]")
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        if isinstance(counts, list):
            from pycocotools import mask as mask_utils

            return mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
        raise ValueError("RLE 'counts' must be a string or a list of run lengths")
    return {"size": size, "counts": counts}


def _load_ground_truth(path: Path) -> tuple[dict[int, tuple[int, int]], dict, dict[int, str]]:
    gt = _read_json(path)
    if not isinstance(gt, dict) or not all(
        isinstance(gt.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise ValueError(f"{path}: COCO ground truth needs 'images', 'annotations', 'categories'")
    try:
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
        by_key: dict[tuple[int, int], list[Any]] = defaultdict(list)
        for i, ann in enumerate(gt["annotations"]):
            if ann.get("iscrowd", 0):
                continue
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in sizes:
                raise ValueError(f"annotation {i} refers to unknown image {image_id}")
            try:
                by_key[(image_id, cat)].append(_gt_rle(ann["segmentation"], *sizes[image_id]))
            except ValueError as exc:
                raise ValueError(f"annotation {i}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed COCO ground truth ({exc!r})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return sizes, by_key, names


def _box_descriptor(rles: list[dict[str, Any]]) -> np.ndarray:
    """Box geometry of each mask: centre, log size and log area relative to the image, fill."""
    from pycocotools import mask as mask_utils

    boxes = mask_utils.toBbox(rles).reshape(-1, 4)
    area = mask_utils.area(rles).astype(np.float64).reshape(-1)
    hw = np.array([r["size"] for r in rles], dtype=np.float64).reshape(-1, 2)
    height, width = hw[:, 0], hw[:, 1]
    x, y, w, h = (boxes[:, i] for i in range(4))
    w1, h1 = np.maximum(w, 1.0), np.maximum(h, 1.0)
    return np.column_stack(
        [
            (x + w / 2) / width,
            (y + h / 2) / height,
            np.log(w1 / width),
            np.log(h1 / height),
            np.log(np.maximum(area, 1.0) / (width * height)),
            area / (w1 * h1),
        ]
    )


def load_fit_data(
    predictions_path: str | Path,
    ground_truth_path: str | Path,
    *,
    feature_dim: int = 16,
    seed: int = 0,
) -> FitData:
    """Read a COCO results list and its ground truth; compute each prediction's best IoU."""
    from pycocotools import mask as mask_utils

    pred_path, gt_path = Path(predictions_path), Path(ground_truth_path)
    sizes, gt_by_key, names = _load_ground_truth(gt_path)
    preds = _read_json(pred_path)
    if not isinstance(preds, list) or not preds:
        raise ValueError(f"{pred_path}: COCO predictions must be a non-empty list of results")

    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    rles: list[dict[str, Any]] = []
    scores = np.empty(len(preds))
    feats: list[list[float] | None] = []
    unknown_image = 0
    try:
        for i, p in enumerate(preds):
            image_id, cat, score = int(p["image_id"]), int(p["category_id"]), float(p["score"])
            if not math.isfinite(score):
                raise ValueError(f"prediction {i}: score must be finite")
            rle = _compressed_rle(p["segmentation"])
            if image_id in sizes and tuple(rle["size"]) != sizes[image_id]:
                raise ValueError(
                    f"prediction {i}: mask size {rle['size']} differs from image {image_id}"
                )
            feature = p.get("feature")
            if feature is not None and not (
                isinstance(feature, list) and feature and all(_is_number(v) for v in feature)
            ):
                raise ValueError(f"prediction {i}: 'feature' must be a non-empty list of numbers")
            scores[i] = score
            rles.append(rle)
            feats.append(feature)
            if image_id not in sizes:
                unknown_image += 1
                continue
            groups[(image_id, cat)].append(i)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{pred_path}: malformed prediction ({exc!r})") from None
    except ValueError as exc:
        raise ValueError(f"{pred_path}: {exc}") from None

    iou = np.zeros(len(preds))
    for key, idx in groups.items():
        gts = gt_by_key.get(key)
        if gts:
            ious = mask_utils.iou([rles[i] for i in idx], gts, [0] * len(gts))
            iou[idx] = np.asarray(ious).reshape(len(idx), len(gts)).max(axis=1)

    have = [f is not None for f in feats]
    notes = [f"{len(preds)} predictions from {pred_path.name}, ground truth {gt_path.name}"]
    if all(have):
        dims = {len(f) for f in feats if f is not None}
        if len(dims) != 1:
            raise ValueError(
                f"{pred_path}: 'feature' vectors have different lengths {sorted(dims)}"
            )
        features = np.asarray(feats, dtype=np.float64)
        if not np.all(np.isfinite(features)):
            raise ValueError(f"{pred_path}: 'feature' contains NaN or inf")
        source = "predictions"
        if features.shape[1] > feature_dim:
            # Gaussian random projection: preserves distances in expectation (Johnson–
            # Lindenstrauss), keeps the mixture's covariance small.
            proj = np.random.default_rng(seed).standard_normal((features.shape[1], feature_dim))
            features = features @ (proj / math.sqrt(feature_dim))
            source = "predictions+projection"
            notes.append(f"features projected from {proj.shape[0]} to {feature_dim} dims")
    elif not any(have):
        features = _box_descriptor(rles)
        source = "box_geometry"
        notes.append("predictions carry no 'feature': using a 6-d box-geometry descriptor")
    else:
        raise ValueError(f"{pred_path}: 'feature' present on some predictions but not all")
    if unknown_image:
        notes.append(f"ignored {unknown_image} predictions on images absent from the ground truth")

    known = np.zeros(len(preds), dtype=bool)
    for idx in groups.values():
        known[idx] = True
    cats = np.array([int(p["category_id"]) for p in preds])
    s = np.clip(scores, SCORE_EPS, 1.0 - SCORE_EPS)
    per_class: dict[int, np.ndarray] = {}
    for c in np.unique(cats[known]):
        rows = known & (cats == c)
        per_class[int(c)] = np.column_stack([features[rows], s[rows], iou[rows]])
    return FitData(per_class, names, source, tuple(notes))


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
