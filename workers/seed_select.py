"""Seed selection (seed 001): order unlabelled images so the first ones cover the pool.

The images a requester annotates by hand (the seed set) should look like the whole pool, not like
its most common corner. Following seed 001's "dissimilar" strategy, images are ordered farthest
point first in a CNN feature space: start from a random image, then repeatedly append the image
whose minimum distance to the images chosen so far is largest. The first ``N`` images of the order
are then an ``N``-point cover of the pool, within a factor 2 of the best possible cover radius
(Gonzalez's greedy k-center bound), and each image's distance at selection time -- the cover radius
at that point -- tells how much the next annotation still adds.

Features, in order of preference:

* the backbone of a trained maskmill checkpoint (``--checkpoint``): the FPN levels, average-pooled
  and concatenated -- features that know what the project's objects look like;
* otherwise a fixed, seeded random convolutional network plus colour statistics. Random
  convolutions capture texture and layout surprisingly well, but they are a weak baseline next to
  trained features. Nothing is downloaded: there are no pretrained weights here.

Each feature block is z-scored per dimension and scaled by ``1/sqrt(block dimension)`` so that the
colour block and the convolutional block weigh the same whatever their lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RANDOM_NET_SIZE = 128  # images are resized to this square for the random network


# ------------------------------------------------------------------------------------ ordering


def farthest_first(
    features: np.ndarray, *, count: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Order rows farthest point first; return ``(order, distances)``.

    ``order[0]`` is drawn from ``seed``; ``order[k]`` is the row whose minimum Euclidean distance
    to ``order[:k]`` is largest (ties go to the lowest index, so the order is deterministic), and
    ``distances[k]`` is that distance (``inf`` for the first row). ``count`` stops early.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (images x dims), got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("no images to order")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if count is None:
        count = n
    if not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    count = min(int(count), n)
    squared = np.einsum("ij,ij->i", x, x)
    first = int(np.random.default_rng(seed).integers(n))
    order = [first]
    gaps = [np.inf]

    def distances_to(i: int) -> np.ndarray:
        # |a-b|^2 = |a|^2 - 2 a.b + |b|^2: one matrix-vector product per step (BLAS), no n x n.
        return np.maximum(squared - 2.0 * (x @ x[i]) + squared[i], 0.0)

    nearest = distances_to(first)
    nearest[first] = -np.inf
    for _ in range(count - 1):
        pick = int(np.argmax(nearest))
        order.append(pick)
        gaps.append(float(np.sqrt(max(nearest[pick], 0.0))))
        nearest = np.minimum(nearest, distances_to(pick))
        nearest[pick] = -np.inf  # chosen rows stay at -inf: minimum() keeps them there
    return np.asarray(order, dtype=np.int64), np.asarray(gaps, dtype=np.float64)


def standardise_blocks(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Z-score every dimension and give every block the same total weight."""
    if not blocks:
        raise ValueError("no feature blocks")
    parts = []
    for block in blocks:
        b = np.asarray(block, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] == 0:
            raise ValueError(f"a feature block must be a non-empty 2-D array, got {b.shape}")
        std = b.std(axis=0)
        z = (b - b.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
        parts.append(z / np.sqrt(b.shape[1]))
    return np.concatenate(parts, axis=1)


# ------------------------------------------------------------------------------------ features


def colour_statistics(image: Image.Image) -> np.ndarray:
    """Mean and standard deviation of RGB and HSV, plus an 8-bin hue histogram (12 + 8 values)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64) / 255.0
    stats = []
    for arr in (rgb, hsv):
        flat = arr.reshape(-1, 3)
        stats += [*flat.mean(axis=0), *flat.std(axis=0)]
    hue_hist, _ = np.histogram(hsv[..., 0], bins=8, range=(0.0, 1.0), weights=hsv[..., 1])
    total = hue_hist.sum()
    return np.concatenate([stats, hue_hist / total if total > 0 else hue_hist])


class RandomConvFeatures(nn.Module):
    """A fixed convolutional network with weights drawn from ``seed`` (never trained).

    Three stride-2 conv + ReLU stages; the output of each is average- and max-pooled, so the
    feature mixes fine texture with coarser structure.
    """

    def __init__(self, seed: int = 0, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers = []
        c_in = 3
        for width in widths:
            conv = nn.Conv2d(c_in, width, 3, stride=2, padding=1)
            with torch.no_grad():
                fan_in = c_in * 9
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=generator) * np.sqrt(2.0 / fan_in)
                )
                conv.bias.zero_()
            layers.append(conv)
            c_in = width
        self.stages = nn.ModuleList(layers)
        self.out_dim = 2 * sum(widths)
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
        pooled = []
        for conv in self.stages:
            x = F.relu(conv(x))
            pooled += [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        return torch.cat(pooled, dim=1)


def _load(path: Path) -> Image.Image:
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {path} cannot be read: {exc}") from None


def random_features(paths: Sequence[Path], *, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """Random-conv features and colour statistics, standardised as two equal-weight blocks."""
    net = RandomConvFeatures(seed)
    conv_parts, colour_parts = [], []
    for start in range(0, len(paths), batch_size):
        pictures = [_load(p) for p in paths[start : start + batch_size]]
        colour_parts += [colour_statistics(p) for p in pictures]
        batch = torch.stack(
            [
                torch.from_numpy(
                    np.array(p.resize((RANDOM_NET_SIZE, RANDOM_NET_SIZE), Image.BILINEAR))
                )
                .permute(2, 0, 1)
                .float()
                / 255.0
                for p in pictures
            ]
        )
        conv_parts.append(net(batch).numpy())
    return standardise_blocks([np.concatenate(conv_parts), np.asarray(colour_parts)])


def checkpoint_features(
    paths: Sequence[Path], checkpoint: Path, *, batch_size: int = 8
) -> np.ndarray:
    """The trained backbone's FPN levels, average-pooled and concatenated, one block per level."""
    from workers import model as mm

    net = mm.load_checkpoint(checkpoint, device="cpu").model
    levels: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            images = [mm.image_to_tensor(_load(p)) for p in paths[start : start + batch_size]]
            batch, _ = net.transform(images)  # the detector's own resizing and normalisation
            for name, level in net.backbone(batch.tensors).items():
                levels.setdefault(name, []).append(level.mean(dim=(2, 3)).numpy())
    return standardise_blocks([np.concatenate(parts) for parts in levels.values()])


# ------------------------------------------------------------------------------------ inputs


def images_from_directory(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    paths = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ValueError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def images_from_coco(coco_file: Path, image_dir: Path | None) -> list[Path]:
    """The ``images`` of a COCO file, resolved against ``image_dir`` (default: the file's folder)."""
    try:
        document: Any = json.loads(coco_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read COCO file {coco_file}: {exc}") from None
    entries = document.get("images") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{coco_file} has no 'images' list")
    base = image_dir if image_dir is not None else coco_file.parent
    paths = []
    for i, entry in enumerate(entries):
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{coco_file}: images[{i}] has no file_name")
        paths.append(base / name)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) of {coco_file} are not under {base}, e.g. {missing[0]}; "
            "pass --image-dir"
        )
    return paths


# ------------------------------------------------------------------------------------ command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskmill seed-select",
        description=(
            "Order unlabelled images farthest point first in a CNN feature space, so the first N "
            "images -- the ones to annotate by hand as the seed set -- cover the pool (seed 001's "
            "'dissimilar' selection). Features come from the backbone of a trained checkpoint "
            "(--checkpoint); without one, from a fixed seeded random-convolution network plus "
            "colour statistics, which is a WEAK BASELINE: prefer a checkpoint when you have one. "
            "Nothing is downloaded."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a directory of images")
    source.add_argument("--coco", type=Path, help="a COCO file whose 'images' to order")
    parser.add_argument(
        "--image-dir", type=Path, help="where --coco's file names live (default: its folder)"
    )
    parser.add_argument("--checkpoint", type=Path, help="a maskmill checkpoint (.pt)")
    parser.add_argument("--count", type=int, help="output only the first N images")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--out", type=Path, help="write here instead of standard output")
    parser.add_argument("--seed", type=int, default=1, help="picks the first image (and weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be >= 1")
    if args.image_dir is not None and args.coco is None:
        parser.error("--image-dir goes with --coco")
    torch.set_num_threads(args.threads)
    try:
        if args.images is not None:
            paths = images_from_directory(args.images)
            names = [p.name for p in paths]
        else:
            paths = images_from_coco(args.coco, args.image_dir)
            names = [e["file_name"] for e in json.loads(args.coco.read_text("utf-8"))["images"]]
        if args.checkpoint is not None:
            features = checkpoint_features(paths, args.checkpoint, batch_size=args.batch_size)
            source = "checkpoint"
        else:
            features = random_features(paths, seed=args.seed, batch_size=args.batch_size)
            source = "random-conv+colour (weak baseline)"
        order, gaps = farthest_first(features, count=args.count, seed=args.seed)
    except ValueError as exc:
        print(f"maskmill seed-select: error: {exc}", file=sys.stderr)
        return 2
    ordered = [names[i] for i in order]
    if args.format == "json":
        text = json.dumps(
            {
                "features": source,
                "images": len(names),
                "seed": args.seed,
                "order": ordered,
                # Distance of each image to those before it: the cover radius as the set grows.
                "distances": [None if not np.isfinite(g) else round(float(g), 6) for g in gaps],
            },
            indent=1,
        )
    else:
        text = "\n".join(ordered)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
