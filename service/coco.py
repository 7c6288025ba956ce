"""COCO parsing shared by the ground-truth and predictions endpoints and the export.

Every check raises :class:`CocoError` with a message that names the offending item (``annotations[12]:
RLE size [480, 640] does not match image 'a.jpg' (640x480)``), so a requester can fix the file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


class CocoError(ValueError):
    """A COCO document is malformed or does not fit the project."""


def _where(index: int, kind: str = "annotations") -> str:
    return f"{kind}[{index}]"


def normalise_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """A compressed RLE (``counts`` as str) for a COCO segmentation: RLE (compressed or not) or
    polygons. The size must match the image."""
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)
        ):
            raise CocoError(f"{where}: segmentation.size must be [height, width]")
        if size != [height, width]:
            raise CocoError(
                f"{where}: RLE size {size} does not match the image's [height, width] "
                f"[{height}, {width}]"
            )
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                raise CocoError(f"{where}: uncompressed RLE counts must be non-negative integers")
            if sum(counts) != height * width:
                raise CocoError(
                    f"{where}: RLE counts cover {sum(counts)} pixels, the image has {height * width}"
                )
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
        elif isinstance(counts, str) and counts:
            rle = {"size": size, "counts": counts.encode("ascii", errors="strict")}
            try:
                area = float(mask_utils.area(rle))
            except Exception:
                raise CocoError(f"{where}: RLE counts string is not valid COCO RLE") from None
            if not math.isfinite(area) or area < 0 or area > height * width:
                raise CocoError(f"{where}: RLE counts string is not valid COCO RLE")
            decoded = mask_utils.decode(rle)
            if decoded.shape != (height, width):
                raise CocoError(f"{where}: RLE decodes to {decoded.shape}, not {(height, width)}")
            # Re-encode: a string whose runs overflow the image would otherwise slip through.
            rle = mask_utils.encode(np.asfortranarray(decoded))
        else:
            raise CocoError(f"{where}: segmentation.counts must be a string or a list of integers")
    elif isinstance(segmentation, list) and segmentation:
        polygons = segmentation
        for k, polygon in enumerate(polygons):
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in polygon
                )
            ):
                raise CocoError(f"{where}: polygon {k} must be a flat list of >= 3 (x, y) points")
        rles = mask_utils.frPyObjects(polygons, height, width)
        rle = mask_utils.merge(rles)
    else:
        raise CocoError(f"{where}: segmentation must be an RLE object or a list of polygons")
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def rle_for_pycocotools(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def rle_area(rle: dict[str, Any]) -> int:
    return int(mask_utils.area(rle_for_pycocotools(rle)))


def rle_bbox(rle: dict[str, Any]) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(rle_for_pycocotools(rle))]


def require_list(document: Any, key: str, where: str = "body") -> list[Any]:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, list):
        raise CocoError(f"{where}: '{key}' must be a list")
    return value


def require_int(item: dict[str, Any], key: str, where: str) -> int:
    value = item.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CocoError(f"{where}: '{key}' must be an integer")
    return value


def require_str(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CocoError(f"{where}: '{key}' must be a non-empty string")
    return value


def require_score(item: dict[str, Any], where: str) -> float:
    value = item.get("score")
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise CocoError(f"{where}: 'score' must be a number in [0, 1]")
    return float(value)


def require_feature(item: dict[str, Any], where: str, dim: int | None) -> list[float] | None:
    """The optional per-mask feature vector; every prediction must use the same dimension."""
    feature = item.get("feature")
    if feature is None:
        return None
    if not isinstance(feature, list) or not feature:
        raise CocoError(f"{where}: 'feature' must be a non-empty list of numbers")
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in feature
    ):
        raise CocoError(f"{where}: 'feature' must contain only finite numbers")
    if dim is not None and len(feature) != dim:
        raise CocoError(f"{where}: 'feature' has {len(feature)} values, earlier ones have {dim}")
    return [float(v) for v in feature]
