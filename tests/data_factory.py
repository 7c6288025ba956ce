"""Builds small, exact test data: PNG images under the image root, COCO ground truth and COCO
predictions whose masks are rectangles of known geometry (so IoUs are known exactly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from pycocotools import mask as mask_utils


def rect_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def write_images(root: Path, count: int, size: tuple[int, int] = (64, 48)) -> list[dict]:
    """PNG files ``img{i}.png`` under ``root``; returns the API's image entries."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    entries = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        name = f"img{i}.png"
        PILImage.fromarray(pixels).save(root / name)
        entries.append({"file_name": name, "width": width, "height": height})
    return entries


def coco_ground_truth(images: list[dict], class_names: list[str], per_image: int = 2) -> dict:
    """COCO GT: ``per_image`` rectangles per image, classes round-robin. ``images`` carry API ids."""
    categories = [{"id": 100 + k, "name": name} for k, name in enumerate(class_names)]
    coco_images, annotations = [], []
    for index, image in enumerate(images):
        coco_id = 1000 + index
        coco_images.append(
            {
                "id": coco_id,
                "file_name": image["file_name"],
                "width": image["width"],
                "height": image["height"],
            }
        )
        for j in range(per_image):
            x0, y0 = 4 + 20 * j, 6 + 4 * j
            mask = rect_mask(image["height"], image["width"], x0, y0, x0 + 16, y0 + 18)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": coco_id,
                    "category_id": categories[(index + j) % len(categories)]["id"],
                    "segmentation": rle(mask),
                    "iscrowd": 0,
                }
            )
    return {"images": coco_images, "categories": categories, "annotations": annotations}


def predictions_for(
    images: list[dict], class_ids: list[int], per_image: int, seed: int = 0, feature_dim: int = 0
) -> list[dict]:
    """COCO results: random rectangles with random scores (and features when asked)."""
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        for _ in range(per_image):
            w, h = image["width"], image["height"]
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            x1, y1 = int(rng.integers(x0 + 4, w + 1)), int(rng.integers(y0 + 4, h + 1))
            item = {
                "image_id": image["id"],
                "category_id": int(rng.choice(class_ids)),
                "segmentation": rle(rect_mask(h, w, x0, y0, x1, y1)),
                "score": round(float(rng.uniform(0.2, 1.0)), 4),
            }
            if feature_dim:
                item["feature"] = [round(float(v), 4) for v in rng.normal(size=feature_dim)]
            out.append(item)
    return out
