"""Question overlays: the picture a worker judges (the image, the mask's outline, zoomed on the object).

A worker answers in about a second, so the picture must make the mask obvious at a glance: the crop is
centred on the object with some context around it (a 20-pixel object in a 4000-pixel photo would be
invisible otherwise), scaled so its longer side is ``max_side`` pixels, the mask lightly tinted and its
boundary drawn as a 3-pixel yellow line with a dark halo that stays visible on light and dark
backgrounds alike.

Rendering is a deterministic pure function (:func:`render_overlay`); :func:`overlay_for_question` adds
the storage cache. Cache keys are derived from what is drawn -- ``(tree, leaf_pos)`` for a sample,
the gold item for gold and qualification questions -- and never leave the server: the public URL of
every question is its random ``public_id``, so neither the URL nor the cache reveals which questions are
gold. Several questions showing the same mask share one rendering.

Only PIL, numpy and pycocotools are used here (the web image never imports torch).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, UnidentifiedImageError
from pycocotools import mask as mask_utils
from sqlalchemy.orm import Session

from service.engine.treefile import TreeFile, read_tree_file
from service.models import GoldItem, Image, Question, QuestionKind, Tree
from service.settings import Settings
from service.storage import Storage, StorageError

if TYPE_CHECKING:
    from service.crowd.questions import HitQuestion

    #: What an overlay shows: a qualification question's row, or a HIT's question.
    ShownQuestion = Question | HitQuestion

#: Bump when the drawing changes, so cached overlays of the old style are not served any more.
RENDER_VERSION = 1
DEFAULT_MAX_SIDE = 800
MIN_MAX_SIDE, MAX_MAX_SIDE = 32, 4096
JPEG_QUALITY = 88

#: Context around the object, as a fraction of its longer side added on each side of its box.
CONTEXT = 0.5
#: Smallest crop side in source pixels: tiny objects are shown with at least this much surrounding,
#: which also bounds the zoom factor (upscaling a 5-pixel crop would only show blur).
MIN_CROP_SIDE = 96
#: ... and at least this fraction of the image's longer side, so a small object comes with enough of
#: its surroundings to be recognised.
MIN_CROP_FRACTION = 0.25
#: Longest crop side over its shortest, when the image allows it.
MAX_ASPECT = 2.5

OUTLINE_RGB = (255, 221, 0)
HALO_RGB = (0, 0, 0)
FILL_RGB = (255, 221, 0)
FILL_ALPHA = 0.18


# ------------------------------------------------------------------------------------ drawing


def decode_rle(rle: Any, height: int, width: int) -> np.ndarray:
    """A COCO RLE (compressed ``counts`` string/bytes or uncompressed list) as an ``HxW`` 0/1 array.

    pycocotools does not validate its input (an empty or truncated counts string decodes to
    uninitialised memory), so the result is checked against the RLE's own area.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("mask must be a COCO RLE dict with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int | np.integer) and v > 0 for v in size)
    ):
        raise ValueError(
            f"mask RLE size must be [height, width] of positive integers, got {size!r}"
        )
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(
            f"mask RLE size {int(size[0])}x{int(size[1])} (HxW) does not match the image "
            f"{height}x{width}"
        )
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise ValueError("uncompressed RLE counts must be non-negative and cover the image")
        encoded = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(counts, str | bytes) and counts:
        raw = counts.encode("ascii") if isinstance(counts, str) else counts
        encoded = {"size": [height, width], "counts": raw}
    else:
        raise ValueError("mask RLE counts must be a non-empty string or a list of integers")
    try:
        mask = mask_utils.decode(encoded)
        area = int(mask_utils.area(encoded))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ValueError("mask RLE counts are not valid COCO RLE") from None
    if mask.shape != (height, width) or mask.max(initial=0) > 1 or int(mask.sum()) != area:
        raise ValueError("mask RLE counts are not valid COCO RLE")
    return mask


def crop_box(
    mask: np.ndarray, *, context: float = CONTEXT, min_side: int = MIN_CROP_SIDE
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the region to show: the mask's box grown by ``context`` of
    its longer side (at least ``min_side``), shifted to stay inside the image. An empty mask shows
    the whole image."""
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, 0, width, height
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    pad = context * max(bottom - top, right - left)
    want_w = max(right - left + 2 * pad, min_side)
    want_h = max(bottom - top + 2 * pad, min_side)
    # A pole or a lying person gets room across it too: a 2000x20 strip would show nothing.
    want_w, want_h = max(want_w, want_h / MAX_ASPECT), max(want_h, want_w / MAX_ASPECT)
    x0, x1 = _span(left, right, want_w, width)
    y0, y1 = _span(top, bottom, want_h, height)
    return x0, y0, x1, y1


def _span(lo: int, hi: int, want: float, limit: int) -> tuple[int, int]:
    """An interval of length ``want`` (at most ``limit``) centred on ``[lo, hi)``, inside ``[0,
    limit)``."""
    length = min(round(want), limit)
    start = round((lo + hi) / 2 - length / 2)
    start = min(max(start, 0), limit - length)
    return start, start + length


def render_overlay(
    image: PILImage.Image, rle: dict[str, Any], max_side: int = DEFAULT_MAX_SIDE
) -> bytes:
    """The JPEG a worker judges: ``image`` cropped around the mask ``rle``, scaled so its longer
    side is exactly ``max_side``, the mask tinted and its boundary outlined.

    The outline is computed at the output resolution, so it is 3 pixels wide whatever the zoom: one
    pixel outside the boundary and two inside, with a dark pixel of halo on either side.
    Deterministic: the same inputs give the same bytes.
    """
    if not isinstance(image, PILImage.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if isinstance(max_side, bool) or not isinstance(max_side, int):
        raise ValueError(f"max_side must be an integer, got {max_side!r}")
    if not MIN_MAX_SIDE <= max_side <= MAX_MAX_SIDE:
        raise ValueError(f"max_side must be in [{MIN_MAX_SIDE}, {MAX_MAX_SIDE}], got {max_side}")
    width, height = image.size
    mask = decode_rle(rle, height, width)
    min_side = max(MIN_CROP_SIDE, round(MIN_CROP_FRACTION * max(width, height)))
    left, top, right, bottom = crop_box(mask, min_side=min_side)
    scale = max_side / max(right - left, bottom - top)
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))

    picture = image.crop((left, top, right, bottom)).convert("RGB")
    picture = picture.resize(size, PILImage.Resampling.LANCZOS)
    inside = PILImage.fromarray(mask[top:bottom, left:right] * np.uint8(255), mode="L")
    # Bilinear then threshold: a smooth boundary at any zoom instead of nearest-neighbour steps.
    inside = inside.resize(size, PILImage.Resampling.BILINEAR).point(
        lambda v: 255 if v >= 128 else 0
    )

    tinted = PILImage.blend(picture, PILImage.new("RGB", size, FILL_RGB), FILL_ALPHA)
    picture = PILImage.composite(tinted, picture, inside)
    region = np.asarray(inside) > 0
    halo = _band(region, outside=2, inner=3)
    line = _band(region, outside=1, inner=2)
    picture = PILImage.composite(PILImage.new("RGB", size, HALO_RGB), picture, _as_mask(halo))
    picture = PILImage.composite(PILImage.new("RGB", size, OUTLINE_RGB), picture, _as_mask(line))

    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def _band(region: np.ndarray, *, outside: int, inner: int) -> np.ndarray:
    """Pixels within ``outside`` px outside the region's boundary or ``inner`` px inside it."""
    # Grown region minus shrunk region; shrinking is growing the complement.
    return _dilate(region, outside) & _dilate(~region, inner)


def _dilate(region: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a ``(2r+1)``-square, separably with shifted ORs: a few vectorised passes
    instead of a rank filter (PIL's Min/MaxFilter took most of the render time at 800 px)."""
    out = region.copy()
    for axis in (0, 1):
        source = out.copy()
        for step in range(1, radius + 1):
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(step, None), slice(None, -step)
            out[tuple(ahead)] |= source[tuple(behind)]
            out[tuple(behind)] |= source[tuple(ahead)]
    return out


def _as_mask(region: np.ndarray) -> PILImage.Image:
    return PILImage.fromarray(region.astype(np.uint8) * np.uint8(255), mode="L")


# ------------------------------------------------------------------------------------ sources


def open_image(uri: str, settings: Settings, storage: Storage) -> PILImage.Image:
    """The pixels of an ``Image.uri``: a path under the image root, or an object in storage.

    Anything else is refused, whatever the database says: a row pointing at ``/etc`` (or a symlink
    under the root pointing out of it) must not turn the media endpoint into a file reader.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError("image URI must be a non-empty string")
    path = path_under_image_root(uri, settings.image_root)
    try:
        if path is not None:
            with PILImage.open(path) as picture:
                picture.load()
                return picture.copy()
        try:
            key = storage.key_from_uri(uri)
        except StorageError:
            raise ValueError(
                f"image {uri!r} is neither under the image root nor in storage; refusing to read it"
            ) from None
        with storage.open_read(key) as handle, PILImage.open(handle) as picture:
            picture.load()
            return picture.copy()
    except FileNotFoundError:
        raise ValueError(f"image {uri!r} does not exist") from None
    except StorageError as exc:
        raise ValueError(f"image {uri!r} cannot be read: {exc}") from None
    except (UnidentifiedImageError, PILImage.DecompressionBombError, OSError, SyntaxError):
        raise ValueError(f"image {uri!r} is not a readable image") from None


def path_under_image_root(uri: str, image_root: str) -> Path | None:
    """The file a ``file://`` URI or a bare path names, if it lies under the image root."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    root = Path(image_root).expanduser().resolve()
    raw = Path(uri.removeprefix("file://"))
    candidate = (raw if raw.is_absolute() else root / raw).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        return None
    return candidate


class TreeFileCache:
    """Tree files recently read, by tree, slimmed to what rendering needs.

    Without it a HIT's 50 samples would read their tree file 50 times. Features (the bulk of a
    tree file) are dropped on the way in, and the cache holds at most ``max_bytes`` of arrays, so a
    web process can keep the trees of a busy campaign without holding gigabytes of features. Tree
    files are immutable per tree row (a re-clustered round gets new rows): entries never go stale.
    """

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, str], TreeFile] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, storage: Storage, tree: Tree) -> TreeFile:
        key = (tree.id, tree.uri)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        with storage.open_read(storage.key_from_uri(tree.uri)) as handle:
            full = read_tree_file(handle)
        slim = dataclasses.replace(full, features=np.zeros((full.n, 0), dtype=np.float32))
        with self._lock:
            self._items[key] = slim
            self._items.move_to_end(key)
            # Always keep the newest entry, however large; evict the oldest beyond the budget.
            while len(self._items) > 1 and self._bytes() > self.max_bytes:
                self._items.popitem(last=False)
        return slim

    def _bytes(self) -> int:
        return sum(
            sum(a.nbytes for a in vars(tf).values() if isinstance(a, np.ndarray))
            for tf in self._items.values()
        )


_tree_files = TreeFileCache()


def question_target(
    session: Session,
    storage: Storage,
    question: ShownQuestion,
    trees: TreeFileCache | None = None,
) -> tuple[Image, dict[str, Any]]:
    """The image row and the mask RLE a question shows."""
    if question.kind is QuestionKind.SAMPLE:
        tree = session.get(Tree, question.tree_id)
        if tree is None:
            raise LookupError(f"question {question.id}: tree {question.tree_id} does not exist")
        tree_file = (trees or _tree_files).get(storage, tree)
        pos = int(question.leaf_pos)
        if not 0 <= pos < tree_file.n:
            raise LookupError(f"question {question.id}: leaf {pos} is outside tree {tree.id}")
        image_id, rle, project_id = (
            int(tree_file.image_ids[pos]),
            tree_file.rle(pos),
            tree.project_id,
        )
    else:
        item = session.get(GoldItem, question.gold_item_id)
        if item is None:
            raise LookupError(f"question {question.id}: gold item {question.gold_item_id} is gone")
        image_id, rle, project_id = item.image_id, item.rle, item.project_id
    image = session.get(Image, image_id)
    if image is None or image.project_id != project_id:
        raise LookupError(
            f"question {question.id}: image {image_id} is not in project {project_id}"
        )
    return image, rle


def overlay_key(question: ShownQuestion, max_side: int = DEFAULT_MAX_SIDE) -> str:
    """Storage key of a question's overlay, from what it shows (never from the question itself, so
    equal masks share a rendering). Server-side only: the public URL uses ``public_id``."""
    prefix = f"renders/v{RENDER_VERSION}/{max_side}"
    if question.kind is QuestionKind.SAMPLE:
        return f"{prefix}/trees/{question.tree_id}/{question.leaf_pos}.jpg"
    return f"{prefix}/gold/{question.gold_item_id}.jpg"


def overlay_for_question(
    session: Session,
    storage: Storage,
    settings: Settings,
    question: ShownQuestion,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    trees: TreeFileCache | None = None,
) -> bytes:
    """The question's overlay JPEG: from the storage cache, or rendered, stored and returned.

    Two processes rendering the same overlay at once both write identical bytes atomically, so the
    race is harmless. Raises ``LookupError`` when the question's target rows are gone and
    ``ValueError`` when the image or mask cannot be used.
    """
    key = overlay_key(question, max_side)
    if storage.exists(key):
        return storage.get_bytes(key)
    image, rle = question_target(session, storage, question, trees)
    data = render_overlay(open_image(image.uri, settings, storage), rle, max_side)
    storage.put_bytes(key, data)
    return data


# -------------------------------------------------------------------------- instruction examples

#: The synthetic scene of the instructions: objects by name, each ``(class, shape, box)``.
_SCENE_SIZE = (640, 480)
_SCENE_OBJECTS: dict[str, tuple[str, str, tuple[int, int, int, int]]] = {
    "ball_a": ("ball", "ellipse", (145, 275, 255, 385)),
    "ball_b": ("ball", "ellipse", (290, 318, 370, 398)),
    "box": ("box", "rectangle", (430, 250, 560, 380)),
}


@dataclasses.dataclass(frozen=True)
class Example:
    """A worked example for the instructions: a mask on the synthetic scene and its right answer."""

    name: str
    class_name: str
    answer: bool
    title: str
    explanation: str


EXAMPLES: tuple[Example, ...] = (
    Example(
        "good",
        "ball",
        True,
        "Yes: the outline follows the ball",
        "The line runs along the edge of the ball all the way round.",
    ),
    Example(
        "good_rough",
        "ball",
        True,
        "Yes: small imperfections are fine",
        "The outline is a little off, but it covers nearly all of the ball and little else.",
    ),
    Example(
        "partial",
        "ball",
        False,
        "No: only part of the object",
        "Half of the ball is outside the outline.",
    ),
    Example(
        "too_big",
        "ball",
        False,
        "No: too much background",
        "The outline includes a lot of grass around the ball.",
    ),
    Example(
        "wrong_object",
        "ball",
        False,
        "No: wrong object",
        "This outline is around a box, but the question asks about a ball.",
    ),
    Example(
        "two_objects",
        "ball",
        False,
        "No: two objects in one outline",
        "Each object must be outlined on its own; this outline covers two balls.",
    ),
)
EXAMPLES_BY_NAME = {example.name: example for example in EXAMPLES}


def _shape(kind: str, box: tuple[int, int, int, int]) -> np.ndarray:
    canvas = PILImage.new("L", _SCENE_SIZE, 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse":
        draw.ellipse(box, fill=1)
    else:
        draw.rectangle(box, fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def scene_objects() -> dict[str, np.ndarray]:
    """The true mask of every object of the scene."""
    return {name: _shape(kind, box) for name, (_, kind, box) in _SCENE_OBJECTS.items()}


def example_scene() -> PILImage.Image:
    """Sky, grass, two shaded balls and a box; deterministic (a fixed seed for the grass)."""
    width, height = _SCENE_SIZE
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - rows) * np.array([120, 170, 230]) + rows * np.array([215, 230, 245])
    pixels = np.broadcast_to(sky, (height, width, 3)).copy()
    grass = np.array([70, 150, 60]) + np.random.default_rng(7).normal(0, 12, (height, width, 1))
    horizon = 300
    pixels[horizon:] = grass[horizon:]
    picture = PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(picture)
    for name, colour, light in (
        ("ball_a", (200, 40, 40), (240, 120, 110)),
        ("ball_b", (230, 150, 30), (250, 205, 120)),
    ):
        left, top, right, bottom = _SCENE_OBJECTS[name][2]
        draw.ellipse((left, top, right, bottom), fill=colour)
        w, h = right - left, bottom - top
        draw.ellipse((left + w * 0.2, top + h * 0.15, left + w * 0.45, top + h * 0.38), fill=light)
    left, top, right, bottom = _SCENE_OBJECTS["box"][2]
    draw.rectangle((left, top, right, bottom), fill=(60, 90, 170))
    draw.polygon(
        [(left, top), (left + 25, top - 20), (right + 25, top - 20), (right, top)],
        fill=(100, 130, 210),
    )
    return picture


def example_mask(name: str) -> np.ndarray:
    """The mask an example shows (``HxW`` 0/1)."""
    if name not in EXAMPLES_BY_NAME:
        raise ValueError(f"unknown example {name!r}; known: {', '.join(EXAMPLES_BY_NAME)}")
    objects = scene_objects()
    ball = objects["ball_a"]
    if name == "good":
        return ball
    if name == "good_rough":
        left, top, right, bottom = _SCENE_OBJECTS["ball_a"][2]
        return _shape("ellipse", (left + 6, top - 4, right + 4, bottom - 8))
    if name == "partial":
        half = ball.copy()
        half[:, (_SCENE_OBJECTS["ball_a"][2][0] + _SCENE_OBJECTS["ball_a"][2][2]) // 2 :] = 0
        return half
    if name == "too_big":
        left, top, right, bottom = _SCENE_OBJECTS["ball_a"][2]
        return _shape("ellipse", (left - 40, top - 25, right + 45, bottom + 40))
    if name == "wrong_object":
        return objects["box"]
    return np.maximum(ball, objects["ball_b"])  # two_objects


def example_iou(name: str) -> float:
    """The example mask's IoU with the best-matching true object of the example's class: the number
    the instructions' rule (yes when IoU >= 0.75) is about."""
    mask = example_mask(name).astype(bool)
    wanted = EXAMPLES_BY_NAME[name].class_name
    best = 0.0
    for object_name, truth in scene_objects().items():
        if _SCENE_OBJECTS[object_name][0] != wanted:
            continue
        truth = truth.astype(bool)
        best = max(best, float((mask & truth).sum() / (mask | truth).sum()))
    return best


def example_overlay(storage: Storage, name: str, max_side: int = 480) -> bytes:
    """An example's overlay, rendered on first request and cached in storage like any question's."""
    mask = example_mask(name)
    key = f"renders/v{RENDER_VERSION}/{max_side}/examples/{name}.jpg"
    if storage.exists(key):
        return storage.get_bytes(key)
    encoded = mask_utils.encode(np.asfortranarray(mask))
    rle = {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
    data = render_overlay(example_scene(), rle, max_side)
    storage.put_bytes(key, data)
    return data
