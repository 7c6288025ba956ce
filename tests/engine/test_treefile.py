"""Tree files: round trips with real pycocotools RLE, partial reads, rejection of bad files."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from service.engine.tree import ClusterTree, build_tree
from service.engine.treefile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TreeFile,
    read_tree_file,
    read_tree_index,
    write_tree_file,
)

# pycocotools' decode trips a numpy 2 deprecation inside its own code; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def random_masks(n: int, seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    """Blob-like binary masks of varying image sizes' worth of content (fixed h x w here)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for k in range(n):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        masks[k, y0 : y0 + rng.integers(2, h // 2), x0 : x0 + rng.integers(2, w // 2)] = 1
        masks[k] ^= (rng.random((h, w)) < 0.05).astype(np.uint8)
    return masks


def make_tree_file(n: int = 40, dim: int = 6, seed: int = 0) -> tuple[TreeFile, dict]:
    rng = np.random.default_rng(seed)
    masks = random_masks(n, seed)
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    features = rng.normal(size=(n, dim)).astype(np.float32)
    scores = rng.random(n)
    tree = build_tree(features, scores)
    source = {
        "masks": masks,
        "tree": tree,
        "features": features,
        "scores": scores,
        "image_ids": rng.integers(1, 10**9, n),
        "mask_ids": np.arange(n, dtype=np.int64) + 5000,
    }
    tf = TreeFile.from_tree(
        tree,
        rles=rles,
        image_ids=source["image_ids"],
        mask_ids=source["mask_ids"],
        scores=scores,
        class_id=7,
        class_name="chair",
        features=features if dim else None,
        params={"round": 2},
    )
    return tf, source


def to_bytes(tf: TreeFile, **kwargs) -> bytes:
    buf = io.BytesIO()
    write_tree_file(buf, tf, **kwargs)
    return buf.getvalue()


def read(data: bytes) -> TreeFile:
    return read_tree_file(io.BytesIO(data))


def rewrite(data: bytes, **replace) -> bytes:
    """Rebuild an archive with some members replaced (``None`` drops a member)."""
    with np.load(io.BytesIO(data)) as npz:
        arrays = {name: npz[name] for name in npz.files}
    for name, value in replace.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def meta_bytes(**fields) -> np.ndarray:
    return np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8)


def assert_same_tree(a: ClusterTree, b: ClusterTree) -> None:
    for name in ("linkage", "lo", "hi", "left", "right", "parent", "height", "size"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.allclose(a.score_prefix, b.score_prefix)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_in_leaf_order(compress):
    tf, src = make_tree_file()
    back = read(to_bytes(tf, compress=compress))
    order = src["tree"].order
    assert (back.n, back.dim, back.class_id, back.class_name) == (40, 6, 7, "chair")
    assert back.params["round"] == 2 and back.params["builder"] == "exact"
    for pos in range(back.n):
        rle = back.rle(pos)
        assert isinstance(rle["counts"], str)
        assert np.array_equal(mask_utils.decode(rle), src["masks"][order[pos]])
        assert mask_utils.area(rle) == src["masks"][order[pos]].sum()
    assert np.array_equal(back.image_ids, src["image_ids"][order])
    assert np.array_equal(back.mask_ids, src["mask_ids"][order])
    assert np.array_equal(back.scores, src["scores"][order])
    assert np.array_equal(back.features, src["features"][order])
    # leaf order is file order, so the rebuilt tree is the original with order = identity
    rebuilt = back.tree()
    assert np.array_equal(rebuilt.order, np.arange(40))
    assert_same_tree(rebuilt, src["tree"])
    assert np.allclose(rebuilt.node_scores(), src["tree"].node_scores())


def test_uncompressed_and_string_rle_inputs_and_no_features():
    masks = random_masks(5, 3)
    encoded = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    as_str = [{"size": r["size"], "counts": r["counts"].decode()} for r in encoded[:2]]
    # uncompressed COCO RLE: run lengths in column-major order, starting with zeros
    flat = masks[2].flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    uncompressed = [{"size": list(masks[2].shape), "counts": ([0] if flat[0] else []) + runs}]
    rles = as_str + uncompressed + encoded[3:]
    scores = np.linspace(0.2, 0.9, 5)
    tree = build_tree(np.zeros((5, 0)), scores)
    tf = TreeFile.from_tree(
        tree,
        rles=rles,
        image_ids=np.arange(5),
        mask_ids=np.arange(5),
        scores=scores,
        class_id=1,
        class_name="cup",
    )
    back = read(to_bytes(tf))
    assert back.dim == 0 and back.features.shape == (5, 0)
    for pos in range(5):
        assert np.array_equal(mask_utils.decode(back.rle(pos)), masks[tree.order[pos]])


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_trees_round_trip(n):
    tf, _ = make_tree_file(n=n, dim=3, seed=n)
    back = read(to_bytes(tf))
    assert back.n == n and back.tree().n == n and back.tree().root == (2 * n - 2 if n else -1)
    index = read_tree_index(io.BytesIO(to_bytes(tf)))
    assert index.n == n


def test_index_reads_scores_and_linkage_without_masks_or_features():
    tf, _ = make_tree_file(n=60, dim=16)
    data = to_bytes(tf)
    index = read_tree_index(io.BytesIO(data))
    assert (index.class_id, index.class_name, index.dim, index.version) == (7, "chair", 16, 1)
    assert np.array_equal(index.scores, tf.scores) and np.array_equal(index.linkage, tf.linkage)
    assert_same_tree(index.tree(), tf.tree())
    # Damage the bytes of the masks and features: the index does not read them, the full
    # reader must notice (zip CRC).
    damaged = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in ("rle_counts.npy", "features.npy"):
            info = archive.getinfo(member)
            data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            damaged[data_start + info.compress_size - 3] ^= 0x01
    index_again = read_tree_index(io.BytesIO(bytes(damaged)))
    assert np.array_equal(index_again.scores, tf.scores)
    with pytest.raises(ValueError, match="corrupt tree file"):
        read(bytes(damaged))


def test_rle_position_must_be_in_range():
    tf, _ = make_tree_file(n=4)
    with pytest.raises(ValueError, match="out of range"):
        tf.rle(4)
    with pytest.raises(ValueError, match="integer"):
        tf.rle(1.5)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"", "not a tree file"),
        (lambda d: b"garbage" * 50, "not a tree file"),
        (lambda d: d[: len(d) // 2], "not a tree file"),
        (lambda d: rewrite(d, meta=None), "'meta' is missing"),
        (lambda d: rewrite(d, linkage=None), "'linkage' is missing"),
        (lambda d: rewrite(d, meta=np.frombuffer(b"{nope", dtype=np.uint8)), "not JSON"),
        (
            lambda d: rewrite(d, meta=meta_bytes(format="other", version=1)),
            "not a maskmill tree file",
        ),
        (
            lambda d: rewrite(
                d,
                meta=meta_bytes(
                    format=FORMAT_NAME,
                    version=FORMAT_VERSION + 1,
                    n=40,
                    dim=6,
                    class_id=7,
                    class_name="chair",
                ),
            ),
            "unsupported tree file version 2",
        ),
        (
            lambda d: rewrite(d, meta=meta_bytes(format=FORMAT_NAME, version=1, n=40)),
            "meta field 'dim'",
        ),
        (lambda d: rewrite(d, scores=np.zeros(40, dtype=np.float32)), "dtype float64"),
        (lambda d: rewrite(d, scores=np.full(40, np.nan)), "NaN"),
        (lambda d: rewrite(d, features=np.zeros((40, 5), np.float32)), "disagree with meta"),
        (lambda d: rewrite(d, rle_offsets=np.arange(41, dtype=np.int64)), "len\\(rle_counts\\)"),
        (lambda d: rewrite(d, mask_heights=np.zeros(40, np.int32)), "positive"),
        (lambda d: rewrite(d, mask_ids=np.zeros(39, np.int64)), "shape"),
    ],
)
def test_corrupt_files_are_rejected(mutate, message):
    tf, _ = make_tree_file()
    data = mutate(to_bytes(tf))
    with pytest.raises(ValueError, match=message):
        read(data)


def test_bad_rle_bytes_and_broken_linkage_are_rejected():
    tf, _ = make_tree_file()
    data = to_bytes(tf)
    counts = tf.rle_counts.copy()
    counts[3] = ord("~")  # outside COCO's '0'..'o' alphabet
    with pytest.raises(ValueError, match="not compressed COCO RLE"):
        read(rewrite(data, rle_counts=counts))
    linkage = tf.linkage.copy()
    linkage[0, :2] = linkage[0, 1::-1]  # swap a merge's children: its ranges are out of order
    with pytest.raises(ValueError, match="corrupt tree file"):
        read(rewrite(data, linkage=linkage))
    with pytest.raises(ValueError, match="corrupt tree file"):
        read_tree_index(io.BytesIO(rewrite(data, linkage=linkage)))


def test_a_plain_npy_or_pickle_is_not_a_tree_file():
    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    with pytest.raises(ValueError, match=r"expected an \.npz"):
        read(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a tree file"):
        read(buf.getvalue())


def test_from_tree_validates_its_inputs():
    tf, src = make_tree_file(n=6)
    tree, n = src["tree"], 6
    rles = [tf.rle(p) for p in range(n)]
    good = {
        "rles": rles,
        "image_ids": np.arange(n),
        "mask_ids": np.arange(n),
        "scores": src["scores"],
        "class_id": 1,
        "class_name": "x",
    }
    with pytest.raises(ValueError, match="RLEs"):
        TreeFile.from_tree(tree, **{**good, "rles": rles[:-1]})
    with pytest.raises(ValueError, match="image_ids"):
        TreeFile.from_tree(tree, **{**good, "image_ids": np.zeros(n - 1, np.int64)})
    with pytest.raises(ValueError, match="scores do not match"):
        TreeFile.from_tree(tree, **{**good, "scores": src["scores"] + 1})
    with pytest.raises(ValueError, match="COCO RLE dict"):
        TreeFile.from_tree(tree, **{**good, "rles": [{"counts": "0"}] * n})
    with pytest.raises(ValueError, match="features"):
        TreeFile.from_tree(tree, **{**good, "features": np.zeros((n, 2, 2))})
    with pytest.raises(ValueError, match="JSON"):
        TreeFile.from_tree(tree, **{**good, "params": {"bad": object()}})
    with pytest.raises(ValueError, match="TreeFile"):
        write_tree_file(io.BytesIO(), "not a tree file")  # type: ignore[arg-type]


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 25),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    dim=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)
def test_round_trip_property(n, h, w, dim, seed):
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, h, w)) < rng.random()).astype(np.uint8)
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    features = rng.normal(size=(n, dim))
    scores = rng.random(n)
    tree = build_tree(features, scores)
    tf = TreeFile.from_tree(
        tree,
        rles=rles,
        image_ids=np.arange(n),
        mask_ids=np.arange(n),
        scores=scores,
        class_id=0,
        class_name="c",
        features=features,
    )
    back = read(to_bytes(tf))
    for pos in range(n):
        assert np.array_equal(mask_utils.decode(back.rle(pos)), masks[tree.order[pos]])
    assert np.allclose(back.features, features[tree.order].astype(np.float32))
    assert_same_tree(back.tree(), tree)
