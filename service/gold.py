"""Gold and qualification items: masks whose right answer is known from held-out ground truth.

Hidden gold must look like any other question, so besides the ground-truth mask itself (a "yes") we
derive realistic wrong masks (shifted, or grown into a box: "no") and, when the requester's predictions
cover held-out images, use those predictions with their true IoU (the most realistic gold of all).
The answer is ``IoU >= K_iou``, the same rule the crowd is instructed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from service.coco import rle_for_pycocotools

# Share of gold items that form the qualification pool instead (never used as hidden gold, so passing
# the test teaches nothing about which HIT questions are gold).
QUALIFICATION_SHARE_PER_10 = 3


def for_qualification(index: int) -> bool:
    """Deterministic split of the items (by their order in the upload) into the two pools."""
    return index % 10 < QUALIFICATION_SHARE_PER_10


@dataclass(frozen=True)
class GoldMask:
    rle: dict[str, Any]
    iou: float


def _encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def iou(a: dict[str, Any], b: dict[str, Any]) -> float:
    value = mask_utils.iou([rle_for_pycocotools(a)], [rle_for_pycocotools(b)], [0])
    return float(np.asarray(value).reshape(-1)[0])


def _shifted(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    angle = rng.uniform(0, 2 * np.pi)
    fraction = rng.uniform(0.35, 0.7)
    dy = int(np.rint(np.sin(angle) * h * fraction))
    dx = int(np.rint(np.cos(angle) * w * fraction))
    out = np.zeros_like(mask)
    src = mask[max(0, -dy) : mask.shape[0] - max(0, dy), max(0, -dx) : mask.shape[1] - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _boxed(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
    return out


def derive_gold(gt_rle: dict[str, Any], rng: np.random.Generator) -> list[GoldMask]:
    """The ground-truth mask (IoU 1) plus one wrong variant, each with its IoU against the truth."""
    mask = mask_utils.decode(rle_for_pycocotools(gt_rle))
    if mask.sum() < 16:
        return []  # too small to show meaningfully
    items = [GoldMask(_encode(mask), 1.0)]
    wrong = _shifted(mask, rng) if rng.random() < 0.6 else _boxed(mask)
    if wrong.any():
        encoded = _encode(wrong)
        items.append(GoldMask(encoded, iou(encoded, gt_rle)))
    return items


def best_iou_against(prediction: dict[str, Any], truths: list[dict[str, Any]]) -> float:
    """The prediction's IoU with its best-matching ground-truth mask (0 when there is none)."""
    if not truths:
        return 0.0
    values = mask_utils.iou(
        [rle_for_pycocotools(prediction)],
        [rle_for_pycocotools(t) for t in truths],
        [0] * len(truths),
    )
    return float(np.max(values))
