"""Synthetic instance-segmentation data: textured shapes with occlusion and exact masks.

The synthetic set stands in for a real dataset in the demo and in the tests, so it has to exercise
what a real one does to the pipeline: several classes that differ in shape *and* appearance, objects
that occlude each other (the annotation is the *visible* part, as in COCO), clutter that is not an
object, and variation in scale, rotation and lighting. Every mask is exact because it is the very
set of pixels an object was painted on, tracked in an instance-label map while painting.

Determinism: each image is rendered from its own ``numpy`` generator seeded with
``(seed, split, index)``, so an image does not depend on how many images were generated before it
or in which order splits are written, and the same seed always gives byte-identical JSON and
identical pixels.

Layout written by :func:`generate` (one call per split)::

    out_dir/images/<split>_000000.jpg ...  (or .png: lossless, slower to write)
    out_dir/<split>.json          COCO: images, annotations (RLE), categories
    out_dir/<split>_gt.json       only with ``hide_annotations=True`` (the unlabelled pool): the
                                  ground truth kept aside so quality can be measured; then
                                  ``<split>.json`` lists the images with no annotations.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "star",
    "ring",
    "ellipse",
    "cross",
    "hexagon",
)
"""Every class the generator can draw."""

DEFAULT_CLASSES: tuple[str, ...] = SHAPES[:6]

IMAGE_FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG"}

# Annotation ids are ``image_id * _ANN_ID_STRIDE + k``: unique across splits as long as image ids
# are, without a counter shared between splits.
_ANN_ID_STRIDE = 1000
_CIRCLE_VERTICES = 48


@dataclass(frozen=True)
class ClassStyle:
    """Appearance statistics of one class, so classes differ in texture and colour, not only shape.

    Hues overlap a little between neighbouring classes on purpose: the model must use the shape too.
    """

    hue: float
    texture: str
    period: float  # texture period as a fraction of the object radius
    hue_spread: float = 0.06
    saturation: tuple[float, float] = (0.45, 0.9)
    value: tuple[float, float] = (0.55, 0.95)


STYLES: dict[str, ClassStyle] = {
    "disc": ClassStyle(hue=0.00, texture="stripes", period=0.45),
    "square": ClassStyle(hue=0.32, texture="checker", period=0.5),
    "triangle": ClassStyle(hue=0.60, texture="waves", period=0.7),
    "star": ClassStyle(hue=0.14, texture="dots", period=0.35),
    "ring": ClassStyle(hue=0.78, texture="gradient", period=1.0),
    "ellipse": ClassStyle(hue=0.50, texture="concentric", period=0.4),
    "cross": ClassStyle(hue=0.07, texture="grain", period=1.0, saturation=(0.6, 1.0)),
    "hexagon": ClassStyle(hue=0.90, texture="hatch", period=0.4),
}


@dataclass(frozen=True)
class RenderOptions:
    """Knobs of the scene model. Sizes are fractions of the image side so they scale with it."""

    min_objects: int = 2
    max_objects: int = 7
    min_radius: float = 0.06
    max_radius: float = 0.22
    min_visible_fraction: float = 0.25  # an occluded object keeps at least this share of its pixels
    min_visible_pixels: int = 30
    clutter: tuple[int, int] = (6, 14)  # background strokes and blobs (never annotated)
    occluding_lines: tuple[int, int] = (0, 2)  # thin clutter drawn over the objects
    placement_attempts: int = 12

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects < _ANN_ID_STRIDE:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects < {_ANN_ID_STRIDE}, "
                f"got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 < self.min_radius <= self.max_radius < 0.5:
            raise ValueError(
                f"need 0 < min_radius <= max_radius < 0.5, got {self.min_radius}, {self.max_radius}"
            )
        if not 0.0 <= self.min_visible_fraction <= 1.0:
            raise ValueError(
                f"min_visible_fraction must be in [0, 1], got {self.min_visible_fraction}"
            )
        if self.min_visible_pixels < 1:
            raise ValueError(f"min_visible_pixels must be >= 1, got {self.min_visible_pixels}")
        for name in ("clutter", "occluding_lines"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"{name} must be a range (lo, hi) with 0 <= lo <= hi, got {lo, hi}"
                )
        if self.placement_attempts < 1:
            raise ValueError(f"placement_attempts must be >= 1, got {self.placement_attempts}")


@dataclass
class Instance:
    """One painted object: its class and its full (amodal, in-image) extent before occlusion."""

    category: int  # index into the class list
    offset: tuple[int, int]  # (x0, y0) of ``full_crop`` in the image
    full_crop: np.ndarray  # bool mask of the whole object, cropped to its box


@dataclass
class RenderedImage:
    """A rendered scene. ``label_map`` holds ``k + 1`` where instance ``k`` is visible, else 0."""

    image: np.ndarray  # uint8, H x W x 3
    label_map: np.ndarray  # int16, H x W
    instances: list[Instance] = field(default_factory=list)

    def visible_mask(self, k: int) -> np.ndarray:
        return self.label_map == k + 1

    def full_mask(self, k: int) -> np.ndarray:
        inst = self.instances[k]
        out = np.zeros(self.label_map.shape, dtype=bool)
        x0, y0 = inst.offset
        h, w = inst.full_crop.shape
        out[y0 : y0 + h, x0 : x0 + w] = inst.full_crop
        return out


# --------------------------------------------------------------------------------------------
# geometry


def _outline(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (and hole, for the ring) of a shape with unit radius, centred at 0."""
    circle = np.linspace(0.0, 2.0 * math.pi, _CIRCLE_VERTICES, endpoint=False)
    if shape == "disc":
        return np.stack([np.cos(circle), np.sin(circle)], 1), None
    if shape == "ellipse":
        aspect = rng.uniform(0.4, 0.68)
        return np.stack([np.cos(circle), aspect * np.sin(circle)], 1), None
    if shape == "ring":
        inner = rng.uniform(0.45, 0.65)
        unit = np.stack([np.cos(circle), np.sin(circle)], 1)
        return unit, inner * unit
    if shape == "square":
        s = 1.0 / math.sqrt(2.0)
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]]), None
    if shape in ("triangle", "hexagon"):
        n = 3 if shape == "triangle" else 6
        a = np.arange(n) * 2.0 * math.pi / n - math.pi / 2.0
        return np.stack([np.cos(a), np.sin(a)], 1), None
    if shape == "star":
        inner = rng.uniform(0.38, 0.5)
        a = np.arange(10) * math.pi / 5.0 - math.pi / 2.0
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1), None
    if shape == "cross":
        t = rng.uniform(0.28, 0.4)  # half-width of the bars
        pts = [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1)]
        pts += [(-t, -1), (-t, -t), (-1, -t), (-1, t), (-t, t), (-t, 1)]
        return np.array(pts, dtype=float) / math.sqrt(1 + t * t), None
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _place(poly: np.ndarray, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    return poly @ rot * radius + np.array([cx, cy])


def _rasterize(
    outer: np.ndarray, hole: np.ndarray | None, size: int
) -> tuple[tuple[int, int], np.ndarray] | None:
    """Binary mask of a polygon (minus its hole), cropped to its in-image box; None if outside."""
    x0 = max(math.floor(outer[:, 0].min()), 0)
    y0 = max(math.floor(outer[:, 1].min()), 0)
    x1 = min(math.ceil(outer[:, 0].max()) + 1, size)
    y1 = min(math.ceil(outer[:, 1].max()) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    shift = np.array([x0, y0])
    draw.polygon([tuple(p) for p in (outer - shift).tolist()], fill=1)
    if hole is not None:
        draw.polygon([tuple(p) for p in (hole - shift).tolist()], fill=0)
    crop = np.asarray(canvas, dtype=bool)
    if not crop.any():
        return None
    return (x0, y0), crop


# --------------------------------------------------------------------------------------------
# appearance


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _texture(
    kind: str,
    u: np.ndarray,
    v: np.ndarray,
    period: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Texture intensity in [0, 1] at object-frame coordinates (u, v), in pixels."""
    two_pi = 2.0 * math.pi
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(two_pi * u / period)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if kind == "concentric":
        return 0.5 + 0.5 * np.sin(two_pi * np.hypot(u, v) / period)
    if kind == "hatch":
        a = np.sin(two_pi * (u + v) / period) > 0.6
        b = np.sin(two_pi * (u - v) / period) > 0.6
        return (a | b).astype(np.float32)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * u / period, 0.0, 1.0)
    if kind == "waves":
        f = rng.uniform(0.7, 1.3, size=3) * two_pi / period
        ph = rng.uniform(0.0, two_pi, size=3)
        t = np.sin(f[0] * u + ph[0]) + np.sin(f[1] * v + ph[1]) + np.sin(f[2] * (u + v) + ph[2])
        return 0.5 + t / 6.0
    if kind == "grain":
        return rng.random(u.shape, dtype=np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _paint_object(
    style: ClassStyle,
    offset: tuple[int, int],
    shape_hw: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    angle: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """RGB float colours of an object over its crop; the texture rotates with the object."""
    h, w = shape_hw
    x0, y0 = offset
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx - s * dy, s * dx + c * dy
    hue = style.hue + rng.uniform(-style.hue_spread, style.hue_spread)
    sat = rng.uniform(*style.saturation)
    val = rng.uniform(*style.value)
    light = _hsv(hue, sat, val)
    dark = _hsv(hue + rng.uniform(-0.03, 0.03), sat * 0.7, val * rng.uniform(0.35, 0.6))
    t = _texture(style.texture, u, v, style.period * radius, rng)[..., None]
    rgb = light * (1.0 - t) + dark * t
    # Soft shading across the object, as if lit from one side.
    shade = 1.0 + 0.18 * (math.cos(angle * 0.7) * dx + math.sin(angle * 0.7) * dy) / radius
    return rgb * shade[..., None]


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Low-saturation gradient plus low-frequency noise: a cheap stand-in for scene context.

    Built on a coarse grid and upsampled: a bilinear upsample of a linear ramp is a linear ramp,
    so the full-resolution image costs one resize.
    """
    cells = 6
    grid = rng.uniform(60, 200, size=(cells, cells, 3))
    # Pull colours towards grey: the background should not mimic the class colours.
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + 0.35 * (grid - grey)
    ramp = np.linspace(-1.0, 1.0, cells)
    a = rng.uniform(0.0, 2.0 * math.pi)
    grid += 30.0 * (math.cos(a) * ramp[None, :, None] + math.sin(a) * ramp[:, None, None])
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BILINEAR)


def _dull_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.85))
    return tuple(int(c) for c in rgb)


def _draw_clutter(img: Image.Image, n: int, rng: np.random.Generator) -> None:
    """Strokes and jagged blobs that are not objects: negatives the detector must learn to skip."""
    size = img.width
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        if rng.random() < 0.5:
            pts = rng.uniform(-0.1 * size, 1.1 * size, size=(2, 2))
            width = int(rng.integers(1, max(2, size // 40)))
            draw.line([tuple(p) for p in pts.tolist()], fill=_dull_colour(rng), width=width)
        else:
            k = int(rng.integers(5, 9))
            a = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=k))
            r = rng.uniform(0.3, 1.0, size=k) * rng.uniform(0.02, 0.08) * size
            c = rng.uniform(0, size, size=2)
            pts = np.stack([c[0] + r * np.cos(a), c[1] + r * np.sin(a)], 1)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=_dull_colour(rng))


# --------------------------------------------------------------------------------------------
# scene


def _resolve_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        return DEFAULT_CLASSES
    names = tuple(classes)
    if not names:
        raise ValueError("classes must name at least one shape")
    unknown = [c for c in names if c not in STYLES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known shapes: {', '.join(SHAPES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct, got {list(names)}")
    return names


def render_image(
    rng: np.random.Generator,
    image_size: int,
    classes: Sequence[str] | None = None,
    options: RenderOptions | None = None,
) -> RenderedImage:
    """Render one scene; the visible mask of instance k is ``label_map == k + 1``.

    Objects are painted back to front. A new object is only accepted if every object already
    painted keeps at least ``min_visible_fraction`` of its in-image pixels (and
    ``min_visible_pixels``), so no painted object ends up as an unannotated sliver.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    names = _resolve_classes(classes)
    opts = options or RenderOptions()
    size = image_size

    bg = _background(size, rng)
    _draw_clutter(bg, int(rng.integers(opts.clutter[0], opts.clutter[1] + 1)), rng)
    image = np.asarray(bg, dtype=np.float32).copy()
    label = np.zeros((size, size), dtype=np.int16)
    instances: list[Instance] = []
    full_area: list[int] = []
    visible_area: list[int] = []

    def keeps_visible(counts: np.ndarray) -> bool:
        """Would every existing instance stay visible enough after losing ``counts`` pixels?"""
        for k, lost in enumerate(counts[1:]):
            left = visible_area[k] - int(lost)
            if left < max(opts.min_visible_pixels, opts.min_visible_fraction * full_area[k]):
                return False
        return True

    n_objects = int(rng.integers(opts.min_objects, opts.max_objects + 1))
    for _ in range(n_objects):
        for _attempt in range(opts.placement_attempts):
            cat = int(rng.integers(len(names)))
            radius = size * math.exp(
                rng.uniform(math.log(opts.min_radius), math.log(opts.max_radius))
            )
            cx, cy = rng.uniform(-0.05 * size, 1.05 * size, size=2)
            angle = rng.uniform(0.0, 2.0 * math.pi)
            outer, hole = _outline(names[cat], rng)
            raster = _rasterize(
                _place(outer, cx, cy, radius, angle),
                None if hole is None else _place(hole, cx, cy, radius, angle),
                size,
            )
            if raster is None:
                continue
            (x0, y0), crop = raster
            h, w = crop.shape
            area = int(crop.sum())
            if area < max(opts.min_visible_pixels, 1):
                continue
            region = label[y0 : y0 + h, x0 : x0 + w]
            counts = np.bincount(region[crop], minlength=len(instances) + 1)
            if not keeps_visible(counts):
                continue
            colours = _paint_object(
                STYLES[names[cat]], (x0, y0), (h, w), (cx, cy), radius, angle, rng
            )
            image[y0 : y0 + h, x0 : x0 + w][crop] = colours[crop]
            region[crop] = len(instances) + 1
            for k, lost in enumerate(counts[1:]):
                visible_area[k] -= int(lost)
            instances.append(Instance(category=cat, offset=(x0, y0), full_crop=crop))
            full_area.append(area)
            visible_area.append(area)
            break

    # Thin occluders over the objects: they cut pixels out of the visible masks.
    n_lines = int(rng.integers(opts.occluding_lines[0], opts.occluding_lines[1] + 1))
    for _ in range(n_lines):
        canvas = Image.new("L", (size, size), 0)
        pts = rng.uniform(0, size, size=(2, 2))
        ImageDraw.Draw(canvas).line(
            [tuple(p) for p in pts.tolist()], fill=1, width=int(rng.integers(1, 3))
        )
        line = np.asarray(canvas, dtype=bool)
        counts = np.bincount(label[line], minlength=len(instances) + 1)
        colour = np.array(_dull_colour(rng), dtype=np.float32)
        if not keeps_visible(counts):
            continue
        image[line] = colour
        label[line] = 0
        for k, lost in enumerate(counts[1:]):
            visible_area[k] -= int(lost)

    # Global lighting: exposure, an illumination ramp across the scene, sensor noise. In place:
    # these full-image passes are a large share of the rendering time.
    gain = rng.uniform(0.7, 1.25)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    a = rng.uniform(0.0, 2.0 * math.pi)
    light = gain * (1.0 + 0.25 * (math.cos(a) * ramp[None, :] + math.sin(a) * ramp[:, None]))
    image *= light[..., None]
    # Uniform rather than Gaussian noise: indistinguishable here and several times cheaper.
    amplitude = rng.uniform(3.0, 10.0)
    noise = rng.random(image.shape, dtype=np.float32)
    noise -= 0.5
    noise *= amplitude
    image += noise
    image += 0.5  # round to nearest on the cast below
    np.clip(image, 0, 255, out=image)
    pixels = image.astype(np.uint8)
    return RenderedImage(image=pixels, label_map=label, instances=instances)


# --------------------------------------------------------------------------------------------
# COCO output


def _annotations(rendered: RenderedImage, image_id: int) -> list[dict]:
    """COCO annotations of the visible masks: RLE, bbox = the mask's pixel extent, area = count."""
    n = len(rendered.instances)
    if n == 0:
        return []
    label = rendered.label_map
    ids = np.arange(1, n + 1, dtype=np.int16)
    stack = np.asfortranarray((label[..., None] == ids).astype(np.uint8))
    rles = mask_utils.encode(stack)
    areas = np.bincount(label.ravel(), minlength=n + 1)
    # toBbox gives [x, y, w, h] of the mask's pixel extent (w = last column - first + 1).
    boxes = mask_utils.toBbox(rles).astype(int).tolist()
    out = []
    for k, (inst, rle) in enumerate(zip(rendered.instances, rles, strict=True)):
        out.append(
            {
                "id": image_id * _ANN_ID_STRIDE + k,
                "image_id": image_id,
                "category_id": inst.category + 1,
                "segmentation": {
                    "size": [label.shape[0], label.shape[1]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "area": int(areas[k + 1]),
                "bbox": boxes[k],
                "iscrowd": 0,
            }
        )
    return out


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator image ``index`` of ``split`` is rendered from (stable across runs)."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8")), index])
    )


def _write_json(path: Path, payload: dict) -> None:
    # Fixed key order and separators: the same scene must give byte-identical files.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)


def generate(
    out_dir: str | Path,
    n_images: int,
    *,
    seed: int,
    image_size: int = 256,
    classes: Sequence[str] | None = None,
    split: str = "train",
    first_image_id: int = 1,
    hide_annotations: bool = False,
    image_format: str = "jpg",
    options: RenderOptions | None = None,
) -> Path:
    """Write ``n_images`` scenes and their COCO file; return the path of ``<split>.json``.

    With ``hide_annotations`` (the unlabelled pool), ``<split>.json`` has images but no
    annotations and the ground truth goes to ``<split>_gt.json``. Category ids are 1-based
    positions in ``classes``.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if not split or not split.replace("_", "").replace("-", "").isalnum():
        raise ValueError(
            f"split must be a non-empty name of letters, digits, '-' or '_': {split!r}"
        )
    if first_image_id < 1:
        raise ValueError(f"first_image_id must be >= 1, got {first_image_id}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}"
        )
    names = _resolve_classes(classes)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")

    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]
    images: list[dict] = []
    annotations: list[dict] = []
    for i in range(n_images):
        rendered = render_image(image_rng(seed, split, i), image_size, names, options)
        image_id = first_image_id + i
        file_name = f"{split}_{i:06d}.{image_format}"
        pil = Image.fromarray(rendered.image, "RGB")
        if image_format == "png":
            pil.save(images_dir / file_name, format="PNG", compress_level=1)
        else:
            pil.save(images_dir / file_name, format="JPEG", quality=95)
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        annotations.extend(_annotations(rendered, image_id))

    info = {
        "description": "maskmill synthetic shapes",
        "version": "1",
        "split": split,
        "seed": seed,
    }
    payload = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": [] if hide_annotations else annotations,
        "categories": categories,
    }
    path = out / f"{split}.json"
    _write_json(path, payload)
    if hide_annotations:
        _write_json(out / f"{split}_gt.json", {**payload, "annotations": annotations})
    return path


# --------------------------------------------------------------------------------------------
# command line

HIDDEN_SPLITS = frozenset({"pool"})
"""Splits whose annotations go to ``<split>_gt.json`` instead of ``<split>.json``."""


def parse_splits(text: str) -> list[tuple[str, int]]:
    """Parse ``"train:200,heldout:50,pool:500"`` into ``[("train", 200), ...]``."""
    result: list[tuple[str, int]] = []
    for part in text.split(","):
        name, sep, count = part.strip().partition(":")
        if not sep or not name:
            raise ValueError(f"split {part!r} is not of the form name:count")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"split {part!r}: count {count!r} is not an integer") from None
        if n < 0:
            raise ValueError(f"split {part!r}: count must be >= 0")
        if any(name == seen for seen, _ in result):
            raise ValueError(f"split {name!r} is given twice")
        result.append((name, n))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskmill synth",
        description="Generate a synthetic instance-segmentation dataset (images + COCO JSON).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--images", type=int, default=100, help="images (without --split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--classes",
        default=",".join(DEFAULT_CLASSES),
        help=f"comma-separated shapes out of: {', '.join(SHAPES)}",
    )
    parser.add_argument(
        "--format",
        choices=sorted(IMAGE_FORMATS),
        default="jpg",
        help="jpg (default, fast) or png (lossless pixels, about 3x slower to write)",
    )
    parser.add_argument(
        "--split",
        help="e.g. train:200,heldout:50,pool:500 (one COCO file per split; the pool's "
        "annotations go to pool_gt.json)",
    )
    args = parser.parse_args(argv)
    try:
        splits = parse_splits(args.split) if args.split else [("train", args.images)]
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        _resolve_classes(classes)
        if args.size < 16:
            raise ValueError(f"--size must be >= 16, got {args.size}")
    except ValueError as exc:
        parser.error(str(exc))

    start = time.perf_counter()
    next_id = 1
    total = 0
    for name, n in splits:
        path = generate(
            args.out,
            n,
            seed=args.seed,
            image_size=args.size,
            classes=classes,
            split=name,
            first_image_id=next_id,
            hide_annotations=name in HIDDEN_SPLITS,
            image_format=args.format,
        )
        next_id += n
        total += n
        print(f"{name}: {n} images -> {path}")
    elapsed = time.perf_counter() - start
    print(f"{total} images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
