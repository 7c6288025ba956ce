"""The synthetic generator: determinism, exact masks, occlusion, COCO output, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from workers import synthetic

SIZE = 64


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    path = synthetic.generate(out, 12, seed=5, image_size=SIZE, image_format="png")
    return out, _load(path)


def test_same_seed_gives_identical_json_and_pixels(tmp_path: Path) -> None:
    a = synthetic.generate(tmp_path / "a", 5, seed=11, image_size=SIZE)
    b = synthetic.generate(tmp_path / "b", 5, seed=11, image_size=SIZE)
    c = synthetic.generate(tmp_path / "c", 5, seed=12, image_size=SIZE)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for im in _load(a)["images"]:
        pa = _pixels(tmp_path / "a" / "images" / im["file_name"])
        pb = _pixels(tmp_path / "b" / "images" / im["file_name"])
        pc = _pixels(tmp_path / "c" / "images" / im["file_name"])
        assert pa.shape == (SIZE, SIZE, 3)
        assert np.array_equal(pa, pb)
        assert not np.array_equal(pa, pc)


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path: Path) -> None:
    short = synthetic.generate(tmp_path / "short", 2, seed=3, image_size=SIZE)
    long = synthetic.generate(tmp_path / "long", 4, seed=3, image_size=SIZE)
    first = [a for a in _load(long)["annotations"] if a["image_id"] <= 2]
    assert _load(short)["annotations"] == first


def test_annotations_are_exact_visible_masks(dataset: tuple[Path, dict]) -> None:
    _, coco = dataset
    assert {c["name"] for c in coco["categories"]} == set(synthetic.DEFAULT_CLASSES)
    category_ids = {c["id"] for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(coco["annotations"]) >= 2 * len(coco["images"])  # scenes hold several objects
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)

    for image in coco["images"]:
        anns = by_image.get(image["id"], [])
        coverage = np.zeros((image["height"], image["width"]), dtype=np.int32)
        for ann in anns:
            assert ann["category_id"] in category_ids
            assert ann["iscrowd"] == 0
            rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
            mask = mask_utils.decode(rle).astype(bool)
            assert mask.shape == (SIZE, SIZE)
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            extent = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            assert ann["bbox"] == [int(v) for v in extent]
            assert ann["area"] == int(mask.sum()) > 0
            coverage += mask
        assert coverage.max() <= 1, "masks of one image overlap"


def test_generated_annotations_are_the_rendered_visible_masks(dataset: tuple[Path, dict]) -> None:
    """Re-render image 0 from its documented seed and compare with what the file says."""
    _, coco = dataset
    rendered = synthetic.render_image(synthetic.image_rng(5, "train", 0), SIZE)
    first = coco["images"][0]["id"]
    anns = [a for a in coco["annotations"] if a["image_id"] == first]
    assert len(anns) == len(rendered.instances)
    for k, ann in enumerate(anns):
        rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), rendered.visible_mask(k))
        assert ann["category_id"] == rendered.instances[k].category + 1


@pytest.mark.parametrize("seed", range(6))
def test_occluded_pixels_leave_the_occluded_mask(seed: int) -> None:
    options = synthetic.RenderOptions(min_objects=5, max_objects=8)
    rendered = synthetic.render_image(np.random.default_rng(seed), 96, options=options)
    n = len(rendered.instances)
    assert n >= 2
    for i in range(n):
        visible, full = rendered.visible_mask(i), rendered.full_mask(i)
        assert not (visible & ~full).any(), "a visible pixel outside the object"
        assert visible.sum() >= options.min_visible_fraction * full.sum()
        for j in range(i + 1, n):  # j was painted after i, on top of it
            later = rendered.full_mask(j)
            assert not (visible & later).any(), f"object {i} keeps pixels covered by {j}"


def test_occlusion_happens_across_scenes() -> None:
    options = synthetic.RenderOptions(min_objects=6, max_objects=8)
    occluded = 0
    for seed in range(10):
        r = synthetic.render_image(np.random.default_rng(seed), 96, options=options)
        occluded += sum(
            int((r.full_mask(k) & ~r.visible_mask(k)).any()) for k in range(len(r.instances))
        )
    assert occluded >= 5


def test_classes_are_selectable_and_validated(tmp_path: Path) -> None:
    path = synthetic.generate(
        tmp_path, 3, seed=0, image_size=SIZE, classes=["star", "cross", "hexagon"]
    )
    coco = _load(path)
    assert [c["name"] for c in coco["categories"]] == ["star", "cross", "hexagon"]
    assert {a["category_id"] for a in coco["annotations"]} <= {1, 2, 3}
    with pytest.raises(ValueError, match="unknown classes"):
        synthetic.generate(tmp_path, 1, seed=0, classes=["disc", "blob"])
    with pytest.raises(ValueError, match="n_images"):
        synthetic.generate(tmp_path, -1, seed=0)
    with pytest.raises(ValueError, match="image_format"):
        synthetic.generate(tmp_path, 1, seed=0, image_format="gif")
    with pytest.raises(ValueError, match="min_objects"):
        synthetic.RenderOptions(min_objects=3, max_objects=2)


def test_cli_writes_one_coco_file_per_split_and_hides_the_pool(tmp_path: Path) -> None:
    code = synthetic.main(
        ["--out", str(tmp_path), "--seed", "2", "--size", str(SIZE), "--split",
         "train:3,heldout:2,pool:2"]
    )  # fmt: skip
    assert code == 0
    train, heldout = _load(tmp_path / "train.json"), _load(tmp_path / "heldout.json")
    pool, pool_gt = _load(tmp_path / "pool.json"), _load(tmp_path / "pool_gt.json")
    assert not (tmp_path / "train_gt.json").exists()
    assert train["annotations"] and heldout["annotations"]
    assert pool["annotations"] == [] and pool_gt["annotations"]
    assert pool["images"] == pool_gt["images"]
    ids = [im["id"] for d in (train, heldout, pool) for im in d["images"]]
    assert sorted(ids) == list(range(1, 8))
    for d in (train, heldout, pool):
        for im in d["images"]:
            assert (tmp_path / "images" / im["file_name"]).is_file()


@pytest.mark.parametrize("bad", ["train", "train:x", "train:1,train:2", ":3", "a:-1"])
def test_cli_rejects_bad_splits(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--out", str(tmp_path), "--split", bad])
    assert info.value.code == 2
