"""The tree file: everything about one (project, round, class) cluster tree, in leaf order.

Bulk, immutable arrays live in the storage backend (local disk or S3), never row by row in
Postgres (DESIGN.md, "State"). One tree file holds, in leaf order so a cluster ``[lo, hi)`` is a
slice of every array:

=================  =============  ============================================================
member             dtype/shape    meaning
=================  =============  ============================================================
``meta``           uint8[*]       UTF-8 JSON: format name and version, n, dim, class id/name,
                                  builder params
``rle_counts``     uint8[*]       compressed COCO RLE ``counts`` strings, concatenated
``rle_offsets``    int64[n+1]     mask ``p``'s counts are ``rle_counts[off[p]:off[p+1]]``
``mask_heights``   int32[n]       RLE ``size[0]`` (image height)
``mask_widths``    int32[n]       RLE ``size[1]`` (image width)
``image_ids``      int64[n]       image of each mask
``mask_ids``       int64[n]       prediction / annotation id of each mask
``scores``         float64[n]     mask score ``s``
``features``       float32[n,D]   clustering features (D may be 0: not kept)
``linkage``        float64[n-1,4] scipy-format linkage, leaves numbered by leaf position
=================  =============  ============================================================

The container is an ``.npz`` (a zip of ``.npy`` members) read with ``allow_pickle=False``: no
code runs on load, every member has a CRC, and a reader can load ``meta``, ``scores`` and
``linkage`` alone (:func:`read_tree_index`) without touching masks or features. Members are
stored uncompressed by default (RLE is already compressed and float features barely compress),
which keeps those partial reads cheap. Readers validate everything and raise ``ValueError`` on a
corrupt, truncated, foreign or newer-version file.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, BinaryIO

import numpy as np

from service.engine.tree import ClusterTree

FORMAT_NAME = "maskmill.treefile"
FORMAT_VERSION = 1

#: COCO's compressed RLE writes 6-bit groups as characters 48 ('0') .. 111 ('o').
_RLE_CHAR_MIN, _RLE_CHAR_MAX = 48, 111

_INDEX_MEMBERS = ("meta", "scores", "linkage")
_ALL_MEMBERS = (
    "meta",
    "rle_counts",
    "rle_offsets",
    "mask_heights",
    "mask_widths",
    "image_ids",
    "mask_ids",
    "scores",
    "features",
    "linkage",
)


def _int_like(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_linkage(linkage: np.ndarray, scores: np.ndarray) -> ClusterTree:
    """Build (and thereby fully validate) the tree a leaf-position linkage describes."""
    return ClusterTree.from_linkage(linkage, scores)


@dataclass(frozen=True, eq=False)
class TreeIndex:
    """The small part of a tree file: enough to rebuild the tree and every cluster score."""

    class_id: int
    class_name: str
    scores: np.ndarray
    linkage: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    dim: int = 0
    version: int = FORMAT_VERSION

    @property
    def n(self) -> int:
        return int(self.scores.shape[0])

    @cached_property
    def _tree(self) -> ClusterTree:
        return _check_linkage(self.linkage, self.scores)

    def tree(self) -> ClusterTree:
        """The :class:`ClusterTree` (leaf order is file order: ``order`` is the identity)."""
        return self._tree


@dataclass(frozen=True, eq=False)
class TreeFile:
    """All arrays of one tree file, in leaf order (see the module docstring for the layout)."""

    class_id: int
    class_name: str
    rle_counts: np.ndarray
    rle_offsets: np.ndarray
    mask_heights: np.ndarray
    mask_widths: np.ndarray
    image_ids: np.ndarray
    mask_ids: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    linkage: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _int_like(self.class_id, "class_id")
        if not isinstance(self.class_name, str):
            raise ValueError(f"class_name must be a string, got {self.class_name!r}")
        if not isinstance(self.scores, np.ndarray) or self.scores.ndim != 1:
            raise ValueError("scores must be a 1-D numpy array")
        n = self.scores.shape[0]
        expected = {
            "rle_counts": (np.uint8, None),
            "rle_offsets": (np.int64, (n + 1,)),
            "mask_heights": (np.int32, (n,)),
            "mask_widths": (np.int32, (n,)),
            "image_ids": (np.int64, (n,)),
            "mask_ids": (np.int64, (n,)),
            "scores": (np.float64, (n,)),
            "linkage": (np.float64, (max(n - 1, 0), 4)),
        }
        for name, (dtype, shape) in expected.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
                raise ValueError(f"{name} must be a numpy array of dtype {np.dtype(dtype)}")
            if shape is not None and arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
        if self.rle_counts.ndim != 1:
            raise ValueError("rle_counts must be 1-D")
        f = self.features
        if not isinstance(f, np.ndarray) or f.dtype != np.float32 or f.ndim != 2:
            raise ValueError("features must be a 2-D float32 array (n, D)")
        if f.shape[0] != n:
            raise ValueError(f"features has {f.shape[0]} rows, expected {n}")
        off = self.rle_offsets
        if off[0] != 0 or off[-1] != self.rle_counts.shape[0]:
            raise ValueError("rle_offsets must start at 0 and end at len(rle_counts)")
        if (np.diff(off) < 1).any():
            raise ValueError("rle_offsets must be strictly increasing (every mask has counts)")
        buf = self.rle_counts
        if buf.size and (buf.min() < _RLE_CHAR_MIN or buf.max() > _RLE_CHAR_MAX):
            raise ValueError("rle_counts contains bytes that are not compressed COCO RLE")
        if (self.mask_heights < 1).any() or (self.mask_widths < 1).any():
            raise ValueError("mask heights and widths must be positive")
        if not np.isfinite(self.scores).all():
            raise ValueError("scores contain NaN or infinity")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or infinity")
        try:
            json.dumps(self.params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"params must be JSON-serialisable: {exc}") from None

    @property
    def n(self) -> int:
        """Number of masks."""
        return int(self.scores.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension (0 when features are not kept)."""
        return int(self.features.shape[1])

    def rle(self, pos: int) -> dict[str, Any]:
        """The mask at leaf position ``pos`` as a COCO RLE ``{"size": [h, w], "counts": str}``.

        ``counts`` is the compressed string as COCO JSON holds it: JSON-serialisable, and
        accepted by ``pycocotools.mask.decode``/``area``/``toBbox`` (which also take the
        ``bytes`` that ``pycocotools.mask.encode`` returns; ``.encode("ascii")`` converts).
        """
        p = _int_like(pos, "pos")
        if not 0 <= p < self.n:
            raise ValueError(f"leaf position {p} out of range [0, {self.n})")
        lo, hi = int(self.rle_offsets[p]), int(self.rle_offsets[p + 1])
        return {
            "size": [int(self.mask_heights[p]), int(self.mask_widths[p])],
            "counts": self.rle_counts[lo:hi].tobytes().decode("ascii"),
        }

    @cached_property
    def _tree(self) -> ClusterTree:
        return _check_linkage(self.linkage, self.scores)

    def tree(self) -> ClusterTree:
        """The :class:`ClusterTree` rebuilt from the linkage (``order`` is the identity)."""
        return self._tree

    def index(self) -> TreeIndex:
        """The index part of this file (what :func:`read_tree_index` returns)."""
        return TreeIndex(
            class_id=int(self.class_id),
            class_name=self.class_name,
            scores=self.scores,
            linkage=self.linkage,
            params=dict(self.params),
            dim=self.dim,
            version=self.version,
        )

    @classmethod
    def from_tree(
        cls,
        tree: ClusterTree,
        *,
        rles: Sequence[Mapping[str, Any]],
        image_ids: Any,
        mask_ids: Any,
        scores: Any,
        class_id: int,
        class_name: str,
        features: Any = None,
        params: dict[str, Any] | None = None,
    ) -> TreeFile:
        """Assemble a tree file from per-mask data in the *original* order used to build
        ``tree``; everything is permuted into leaf order here.

        ``rles`` are COCO RLE dicts (compressed ``counts`` as ``bytes``/``str``, or uncompressed
        lists, which are compressed with pycocotools). ``features=None`` stores none (D = 0).
        """
        n = tree.n
        if len(rles) != n:
            raise ValueError(f"got {len(rles)} RLEs for a tree of {n} masks")
        order = tree.order
        s = np.asarray(scores)
        if s.shape != (n,) or s.dtype.kind not in "biuf":
            raise ValueError(f"scores must be a numeric array of shape ({n},)")
        ids = {}
        for name, value in (("image_ids", image_ids), ("mask_ids", mask_ids)):
            arr = np.asarray(value)
            if arr.shape != (n,) or arr.dtype.kind not in "iu":
                raise ValueError(f"{name} must be an integer array of shape ({n},)")
            ids[name] = arr.astype(np.int64)[order]
        if features is None:
            feats = np.zeros((n, 0), dtype=np.float32)
        else:
            feats = np.asarray(features)
            if feats.ndim != 2 or feats.shape[0] != n or feats.dtype.kind not in "biuf":
                raise ValueError(f"features must be a numeric array of shape ({n}, D)")
            feats = feats[order].astype(np.float32)
        counts, heights, widths = _encode_rles([rles[int(i)] for i in order])
        leaf_scores = s.astype(np.float64)[order]
        if not np.allclose(tree.score_prefix, np.concatenate(([0.0], np.cumsum(leaf_scores)))):
            raise ValueError("scores do not match the scores the tree was built with")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(c) for c in counts], out=offsets[1:])
        buffer = np.frombuffer(b"".join(counts), dtype=np.uint8).copy()
        merged = dict(tree.params)
        merged.update(params or {})
        return cls(
            class_id=_int_like(class_id, "class_id"),
            class_name=class_name,
            rle_counts=buffer,
            rle_offsets=offsets,
            mask_heights=heights,
            mask_widths=widths,
            image_ids=ids["image_ids"],
            mask_ids=ids["mask_ids"],
            scores=leaf_scores,
            features=feats,
            linkage=np.array(tree.linkage, dtype=np.float64),
            params=merged,
        )


def _encode_rles(rles: Sequence[Mapping[str, Any]]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Compressed counts (bytes) and sizes of COCO RLE dicts, converting uncompressed ones."""
    counts: list[bytes] = []
    heights = np.empty(len(rles), dtype=np.int32)
    widths = np.empty(len(rles), dtype=np.int32)
    for k, rle in enumerate(rles):
        try:
            h, w = (int(v) for v in rle["size"])
            c = rle["counts"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"RLE {k} is not a COCO RLE dict with 'size' and 'counts'") from None
        if isinstance(c, list):
            from pycocotools import mask as mask_utils

            c = mask_utils.frPyObjects({"size": [h, w], "counts": c}, h, w)["counts"]
        if isinstance(c, str):
            c = c.encode("ascii")
        if not isinstance(c, bytes) or not c:
            raise ValueError(f"RLE {k} has empty or invalid counts")
        counts.append(c)
        heights[k], widths[k] = h, w
    return counts, heights, widths


# ----------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------


def _meta(tf: TreeFile) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "n": tf.n,
        "dim": tf.dim,
        "class_id": int(tf.class_id),
        "class_name": tf.class_name,
        "params": tf.params,
    }


def write_tree_file(f: BinaryIO, tf: TreeFile, *, compress: bool = False) -> None:
    """Write ``tf`` to the binary file object ``f`` (a local file, a BytesIO for S3, ...)."""
    if not isinstance(tf, TreeFile):
        raise ValueError(f"expected a TreeFile, got {type(tf).__name__}")
    meta = np.frombuffer(json.dumps(_meta(tf), sort_keys=True).encode("utf-8"), dtype=np.uint8)
    arrays = {name: getattr(tf, name) for name in _ALL_MEMBERS if name != "meta"}
    save = np.savez_compressed if compress else np.savez
    save(f, meta=meta, **arrays)


def _open(f: BinaryIO) -> Any:
    try:
        npz = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a tree file: {exc}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError("not a tree file: expected an .npz archive")
    return npz


def _member(npz: Any, name: str) -> np.ndarray:
    if name not in npz.files:
        raise ValueError(f"corrupt tree file: member {name!r} is missing")
    try:
        return npz[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise ValueError(f"corrupt tree file: cannot read {name!r}: {exc}") from None


def _read_meta(npz: Any) -> dict[str, Any]:
    raw = _member(npz, "meta")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError("corrupt tree file: bad meta member")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt tree file: meta is not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError("not a maskmill tree file (format name missing or wrong)")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"unsupported tree file version {meta.get('version')!r} "
            f"(this reader understands {FORMAT_VERSION})"
        )
    for key, kind in (("n", int), ("dim", int), ("class_id", int), ("class_name", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"corrupt tree file: meta field {key!r} missing or invalid")
    if meta["n"] < 0 or meta["dim"] < 0:
        raise ValueError("corrupt tree file: negative n or dim")
    if not isinstance(meta.get("params", {}), dict):
        raise ValueError("corrupt tree file: meta field 'params' must be an object")
    return meta


def read_tree_index(f: BinaryIO) -> TreeIndex:
    """Read only the meta, scores and linkage (no masks, no features) and validate them.

    ``f`` must be seekable (zip archives are read from their central directory).
    """
    with _open(f) as npz:
        meta = _read_meta(npz)
        scores = _member(npz, "scores")
        linkage = _member(npz, "linkage")
    n = meta["n"]
    if scores.dtype != np.float64 or scores.shape != (n,):
        raise ValueError("corrupt tree file: scores have the wrong dtype or shape")
    if linkage.dtype != np.float64 or linkage.shape != (max(n - 1, 0), 4):
        raise ValueError("corrupt tree file: linkage has the wrong dtype or shape")
    index = TreeIndex(
        class_id=meta["class_id"],
        class_name=meta["class_name"],
        scores=scores,
        linkage=linkage,
        params=meta.get("params", {}),
        dim=meta["dim"],
        version=meta["version"],
    )
    try:
        index.tree()  # validates the linkage (and the scores) now rather than at first use
    except ValueError as exc:
        raise ValueError(f"corrupt tree file: {exc}") from None
    return index


def read_tree_file(f: BinaryIO) -> TreeFile:
    """Read and validate a whole tree file. ``f`` must be seekable."""
    with _open(f) as npz:
        meta = _read_meta(npz)
        arrays = {name: _member(npz, name) for name in _ALL_MEMBERS if name != "meta"}
    n, dim = meta["n"], meta["dim"]
    if arrays["scores"].shape != (n,) or arrays["features"].shape != (n, dim):
        raise ValueError("corrupt tree file: array shapes disagree with meta")
    try:
        tf = TreeFile(
            class_id=meta["class_id"],
            class_name=meta["class_name"],
            params=meta.get("params", {}),
            version=meta["version"],
            **arrays,
        )
        tf.tree()  # validates the linkage now rather than at first use
    except ValueError as exc:
        raise ValueError(f"corrupt tree file: {exc}") from None
    return tf
