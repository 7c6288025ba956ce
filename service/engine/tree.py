"""The cluster tree of one (project, round, class) and its exact builder.

The masks of a class are clustered by complete-linkage HAC and then *renumbered in the dendrogram's
leaf order*, so that every cluster is a contiguous range ``[lo, hi)`` of leaf positions. Everything
downstream (cluster scores from one prefix sum, sampling, propagation, export) relies on that.

Distance (the paper authors' combination, see DESIGN.md): for masks ``i, j`` with features ``f`` and
scores ``s``,

    z(i, j) = (||f_i - f_j|| - mu_f) / sd_f  +  w * (|s_i - s_j| - mu_s) / sd_s

where ``mu``/``sd`` are the mean and (population) standard deviation of the respective distance over
all pairs ``i < j`` and ``w`` is ``score_weight``. Complete linkage only compares maxima of
distances, so adding a constant to every distance changes no merge, only shifts every height by
that constant. We add ``mu_f / sd_f + w * mu_s / sd_s`` -- the value ``z`` would take for two
identical masks, i.e. its smallest possible value -- which gives

    d(i, j) = ||f_i - f_j|| / sd_f  +  w * |s_i - s_j| / sd_s      (>= 0; 0 for identical masks)

and merge heights in units of standard deviations. A term whose standard deviation is zero (all
features identical, all scores equal, no features at all, or only one pair) is constant over the
pairs and therefore dropped.

Feature distances are computed with BLAS matrix products (``|a|^2 + |b|^2 - 2 a.b`` on centred
float64 features), written block by block straight into the condensed vector that the linkage
consumes, and the z-score statistics are accumulated per block, so memory is the condensed vector
(8 bytes per pair) plus a few tens of megabytes. Near-duplicate masks get distances accurate to
about ``1e-8`` times the spread of the features (the price of the matrix-product formulation).

Memory sets the exact limit: ``n (n - 1) / 2`` float64 distances (fastcluster needs float64 and
would convert anything else), used in place by fastcluster, plus ~250 MiB. Measured with
``scripts/bench_tree.py`` (D = 257): peak RSS 6.35 GiB at n = 40,000, 1.7 GiB at n = 20,000.
50,000 masks would need 9.3 GiB for the distances alone -- more than the ~8 GB a job may take on
the 2-core/24 GB machine -- so the default ``exact_limit`` is 40,000, not DESIGN.md's "about
50k". Larger classes go to the scalable builder (:mod:`service.engine.scalable`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import leaves_list

#: Largest class clustered exactly. The condensed float64 distance vector needs
#: ``4 * n * (n - 1)`` bytes (6.4 GB at 40,000); measured peak RSS 6.35 GiB.
DEFAULT_EXACT_LIMIT = 40_000

#: Elements per block of the distance computation (x 8 bytes: the size of each scratch array).
_BLOCK_ELEMENTS = 1 << 22

#: Rows of a distance block are capped at this plus 1/16 of its width (see fill_condensed).
_MIN_BLOCK_ROWS = 64

#: Rows per block when scanning features (finiteness checks, projections).
_ROW_BLOCK = 65_536


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


def prefix_sums(values_in_leaf_order: Any) -> np.ndarray:
    """Return ``P`` (float64[n + 1]) with ``P[k] = sum(values[:k])``.

    The mean of any per-mask quantity over a cluster ``[lo, hi)`` is then
    ``(P[hi] - P[lo]) / (hi - lo)`` in O(1), which is how cluster scores are computed everywhere.
    """
    values = np.asarray(values_in_leaf_order)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"values must be real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise ValueError("values contain NaN or infinity")
    out = np.zeros(values.shape[0] + 1, dtype=np.float64)
    np.cumsum(values, out=out[1:])
    return out


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class ClusterTree:
    """A binary cluster tree whose leaves are numbered by leaf position.

    Node ids: leaves ``0..n-1`` are leaf positions; internal node ``n + k`` is linkage row ``k``;
    the root is ``2n - 2``. Node ``v`` covers leaf positions ``[lo[v], hi[v])``; its left child
    covers the first part of that range and its right child the rest. The arrays are read-only.
    """

    order: np.ndarray
    linkage: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    left: np.ndarray
    right: np.ndarray
    parent: np.ndarray
    height: np.ndarray
    size: np.ndarray
    score_prefix: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = np.shape(self.order)[0]
        n_nodes = 2 * n - 1 if n else 0
        for name in ("lo", "hi", "left", "right", "parent", "height", "size"):
            if np.shape(getattr(self, name)) != (n_nodes,):
                raise ValueError(f"{name} must have shape ({n_nodes},) for n={n}")
        if np.shape(self.linkage) != (max(n - 1, 0), 4):
            raise ValueError(f"linkage must have shape ({max(n - 1, 0)}, 4) for n={n}")
        if np.shape(self.score_prefix) != (n + 1,):
            raise ValueError(f"score_prefix must have shape ({n + 1},) for n={n}")
        # Read-only views: the tree is immutable without copying (or freezing) the caller's arrays.
        for name in (
            "order",
            "linkage",
            "lo",
            "hi",
            "left",
            "right",
            "parent",
            "height",
            "size",
            "score_prefix",
        ):
            object.__setattr__(self, name, _readonly(np.asarray(getattr(self, name)).view()))

    @property
    def n(self) -> int:
        """Number of masks (leaves)."""
        return int(self.order.shape[0])

    @property
    def root(self) -> int:
        """Id of the root node, ``-1`` for an empty tree."""
        return 2 * self.n - 2 if self.n else -1

    @property
    def n_nodes(self) -> int:
        """Number of nodes, ``2n - 1`` (0 for an empty tree)."""
        return 2 * self.n - 1 if self.n else 0

    def node_scores(self) -> np.ndarray:
        """Cluster score ``S`` (mean mask score) of every node, float64[2n - 1]."""
        return self.range_mean(self.score_prefix, np.arange(self.n_nodes))

    def range_mean(self, values_prefix: np.ndarray, node: Any) -> Any:
        """Mean of a per-leaf quantity over node(s) ``node`` given its :func:`prefix_sums`.

        ``node`` may be an int (returns a float) or an integer array (returns float64 array).
        """
        prefix = np.asarray(values_prefix)
        if prefix.shape != (self.n + 1,):
            raise ValueError(f"values_prefix must have shape ({self.n + 1},), got {prefix.shape}")
        nodes = np.asarray(node)
        if nodes.dtype.kind not in "iu":
            raise ValueError(f"node must be an integer or integer array, got {nodes.dtype}")
        if nodes.size and (nodes.min() < 0 or nodes.max() >= self.n_nodes):
            raise ValueError(f"node out of range [0, {self.n_nodes})")
        lo, hi = self.lo[nodes], self.hi[nodes]
        out = (prefix[hi] - prefix[lo]) / (hi - lo)
        return float(out) if nodes.ndim == 0 else out

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls, params: dict[str, Any] | None = None) -> ClusterTree:
        """The tree of zero masks: no nodes, ``root == -1``."""
        i64 = np.zeros(0, dtype=np.int64)
        return cls(
            order=i64,
            linkage=np.zeros((0, 4)),
            lo=i64.copy(),
            hi=i64.copy(),
            left=i64.copy(),
            right=i64.copy(),
            parent=i64.copy(),
            height=np.zeros(0),
            size=i64.copy(),
            score_prefix=np.zeros(1),
            params=dict(params or {}),
        )

    @classmethod
    def from_linkage(
        cls,
        linkage: Any,
        leaf_scores: Any,
        order: Any = None,
        *,
        params: dict[str, Any] | None = None,
    ) -> ClusterTree:
        """Build a tree from a linkage whose leaves are already numbered by leaf position.

        ``leaf_scores`` are the mask scores in leaf order; ``order`` maps leaf positions to the
        caller's original indices (default: identity, as in a tree file, which is stored in leaf
        order). The linkage is fully validated: an invalid or non-contiguous one raises
        ``ValueError``.
        """
        scores = np.asarray(leaf_scores)
        if scores.ndim != 1:
            raise ValueError(f"leaf_scores must be 1-D, got shape {scores.shape}")
        n = scores.shape[0]
        prefix = prefix_sums(scores)
        if order is None:
            order_arr = np.arange(n, dtype=np.int64)
        else:
            order_arr = np.asarray(order)
            if order_arr.shape != (n,) or order_arr.dtype.kind not in "iu":
                raise ValueError(f"order must be an integer array of shape ({n},)")
            order_arr = order_arr.astype(np.int64)
            check = np.zeros(n, dtype=bool)
            if n and (order_arr.min() < 0 or order_arr.max() >= n):
                raise ValueError("order is not a permutation of 0..n-1")
            check[order_arr] = True
            if not check.all():
                raise ValueError("order is not a permutation of 0..n-1")
        z = np.asarray(linkage)
        if z.dtype.kind not in "iuf":
            raise ValueError(f"linkage must be numeric, got dtype {z.dtype}")
        z = np.array(z, dtype=np.float64, order="C")  # copy: the tree owns its arrays
        if n == 0:
            if z.size:
                raise ValueError("linkage must be empty for zero masks")
            return cls.empty(params)
        if z.shape != (n - 1, 4):
            raise ValueError(f"linkage must have shape ({n - 1}, 4), got {z.shape}")
        return _tree_from_leafpos_linkage(z, prefix, order_arr, params, validate=True)


def _tree_from_leafpos_linkage(
    z: np.ndarray,
    prefix: np.ndarray,
    order: np.ndarray,
    params: dict[str, Any] | None,
    *,
    validate: bool,
) -> ClusterTree:
    """Derive the node arrays (vectorised) from a leaf-position linkage ``z`` (float64[n-1, 4])."""
    n = order.shape[0]
    n_nodes = 2 * n - 1
    if validate:
        _validate_linkage_structure(z, n)
    left = np.full(n_nodes, -1, dtype=np.int64)
    right = np.full(n_nodes, -1, dtype=np.int64)
    left[n:] = z[:, 0]
    right[n:] = z[:, 1]
    size = np.ones(n_nodes, dtype=np.int64)
    size[n:] = z[:, 3]
    if validate and not np.array_equal(size[n:], size[left[n:]] + size[right[n:]]):
        raise ValueError("linkage counts (column 3) do not add up")
    parent = np.full(n_nodes, -1, dtype=np.int64)
    internal = np.arange(n, n_nodes, dtype=np.int64)
    parent[left[n:]] = internal
    parent[right[n:]] = internal
    # lo of a node is the position of its leftmost leaf: follow left-child pointers by pointer
    # jumping (O(log depth) vectorised rounds; children always have smaller ids, so it ends).
    leftmost = np.arange(n_nodes, dtype=np.int64)
    leftmost[n:] = left[n:]
    while True:
        jumped = leftmost[leftmost]
        if np.array_equal(jumped, leftmost):
            break
        leftmost = jumped
    lo = leftmost
    hi = lo + size
    if validate and n > 1:
        if not np.array_equal(hi[left[n:]], lo[right[n:]]):
            raise ValueError(
                "linkage is not in leaf-position order: a child range is not contiguous"
            )
        if lo[n_nodes - 1] != 0 or hi[n_nodes - 1] != n:
            raise ValueError("linkage root does not cover all leaf positions")
    height = np.zeros(n_nodes, dtype=np.float64)
    height[n:] = z[:, 2]
    return ClusterTree(
        order=order,
        linkage=z,
        lo=lo,
        hi=hi,
        left=left,
        right=right,
        parent=parent,
        height=height,
        size=size,
        score_prefix=prefix,
        params=dict(params or {}),
    )


def _validate_linkage_structure(z: np.ndarray, n: int) -> None:
    """Check that ``z`` is a well-formed binary merge sequence (scipy's rules), vectorised."""
    if not np.isfinite(z).all():
        raise ValueError("linkage contains NaN or infinity")
    children = z[:, :2]
    if not np.array_equal(children, np.floor(children)):
        raise ValueError("linkage child ids (columns 0-1) must be integers")
    own_id = np.arange(n, 2 * n - 1, dtype=np.float64)[:, None]
    if (children < 0).any() or (children >= own_id).any():
        raise ValueError("linkage uses a cluster before it is formed (or a negative id)")
    uses = np.bincount(children.astype(np.int64).ravel(), minlength=2 * n - 1)
    if (uses[: 2 * n - 2] != 1).any() or uses[2 * n - 2] != 0:
        raise ValueError("linkage does not use every cluster exactly once")
    if (z[:, 2] < 0).any():
        raise ValueError("linkage has negative merge heights")
    if not np.array_equal(z[:, 3], np.floor(z[:, 3])) or (z[:, 3] < 2).any():
        raise ValueError("linkage counts (column 3) must be integers >= 2")


def tree_from_linkage(
    z: np.ndarray, scores: np.ndarray, params: dict[str, Any] | None = None
) -> ClusterTree:
    """Turn a scipy-format linkage over *original* indices into a :class:`ClusterTree`.

    The leaf order is scipy's ``leaves_list`` (left child, i.e. column 0, first); leaves are then
    relabelled to their leaf positions so every node is a contiguous range.
    """
    n = scores.shape[0]
    if n == 0:
        return ClusterTree.empty(params)
    if n == 1:
        return _tree_from_leafpos_linkage(
            np.zeros((0, 4)), prefix_sums(scores), np.zeros(1, np.int64), params, validate=False
        )
    order = leaves_list(z).astype(np.int64)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n, dtype=np.int64)
    zp = np.array(z, dtype=np.float64, order="C")
    for col in (0, 1):
        ids = zp[:, col].astype(np.int64)
        is_leaf = ids < n
        ids[is_leaf] = position[ids[is_leaf]]
        zp[:, col] = ids
    return _tree_from_leafpos_linkage(zp, prefix_sums(scores[order]), order, params, validate=False)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def validate_inputs(features: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check ``features`` (n x D, D >= 0) and ``scores`` (n,), raising a clear ``ValueError``.

    Features keep their dtype (no full float64 copy of a million-row float32 matrix); scores are
    returned as float64.
    """
    f = np.asarray(features)
    s = np.asarray(scores)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D array (n_masks, dim), got shape {f.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D array (n_masks,), got shape {s.shape}")
    if f.shape[0] != s.shape[0]:
        raise ValueError(
            f"features and scores disagree on the number of masks: {f.shape[0]} != {s.shape[0]}"
        )
    if f.dtype.kind not in "biuf":
        raise ValueError(f"features must be real numbers, got dtype {f.dtype}")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    if f.dtype.kind == "f":
        for start in range(0, f.shape[0], _ROW_BLOCK):
            if not np.isfinite(f[start : start + _ROW_BLOCK]).all():
                raise ValueError("features contain NaN or infinity")
    return f, s


def _check_params(score_weight: float, exact_limit: int, n_parts: int | None, seed: int) -> None:
    if not isinstance(score_weight, int | float) or not math.isfinite(score_weight):
        raise ValueError(f"score_weight must be a finite number, got {score_weight!r}")
    if score_weight < 0:
        raise ValueError(f"score_weight must be >= 0, got {score_weight}")
    if isinstance(exact_limit, bool) or not isinstance(exact_limit, int) or exact_limit < 2:
        raise ValueError(f"exact_limit must be an integer >= 2, got {exact_limit!r}")
    if n_parts is not None and (
        isinstance(n_parts, bool) or not isinstance(n_parts, int) or n_parts < 2
    ):
        raise ValueError(f"n_parts must be None or an integer >= 2, got {n_parts!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# ----------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistanceScales:
    """The z-score statistics of the two distance terms and the resulting coefficients."""

    feature_mean: float
    feature_std: float
    score_mean: float
    score_std: float
    score_weight: float

    @property
    def feature_coef(self) -> float:
        """Multiplier of ``||f_i - f_j||`` in the shifted distance (0 drops the term)."""
        return 1.0 / self.feature_std if self.feature_std > 0 else 0.0

    @property
    def score_coef(self) -> float:
        """Multiplier of ``|s_i - s_j|`` in the shifted distance (0 drops the term)."""
        return self.score_weight / self.score_std if self.score_std > 0 else 0.0

    @property
    def shift(self) -> float:
        """Constant added to the z-scored distance to make it non-negative."""
        return self.feature_mean * self.feature_coef + self.score_mean * self.score_coef

    def to_dict(self) -> dict[str, float]:
        return {
            "feature_mean": self.feature_mean,
            "feature_std": self.feature_std,
            "score_mean": self.score_mean,
            "score_std": self.score_std,
            "score_weight": self.score_weight,
            "shift": self.shift,
        }


def score_distance_stats(scores: np.ndarray) -> tuple[float, float]:
    """Exact mean and population std of ``|s_i - s_j|`` over all pairs ``i < j``, O(n log n).

    With the scores sorted, ``sum_{i<j} |s_i - s_j| = sum_k s_(k) (2k - n + 1)`` and
    ``sum_{i<j} (s_i - s_j)^2 = n * sum_k (s_k - mean)^2``; no pair is ever materialised, so the
    scalable builder gets the exact value too.
    """
    n = scores.shape[0]
    if n < 3 or np.ptp(scores) == 0:
        # One pair (or none, or all equal): the distance is constant, its z-score undefined.
        mean = float(abs(scores[1] - scores[0])) if n == 2 else 0.0
        return mean, 0.0
    pairs = n * (n - 1) / 2
    centred = scores - scores.mean()
    ranks = 2.0 * np.arange(n, dtype=np.float64) - (n - 1)
    mean = float(np.dot(np.sort(centred), ranks) / pairs)
    mean_sq = float(n * np.dot(centred, centred) / pairs)
    return mean, math.sqrt(max(mean_sq - mean * mean, 0.0))


def _condensed_offset(i: int, n: int) -> int:
    """Index in the condensed vector of the pair ``(i, i + 1)``."""
    return i * n - i * (i + 1) // 2


def _all_rows_equal(features: np.ndarray) -> bool:
    if features.shape[0] == 0 or features.shape[1] == 0:
        return True
    first = features[0]
    return all(
        (features[start : start + _ROW_BLOCK] == first).all()
        for start in range(0, features.shape[0], _ROW_BLOCK)
    )


def _row_blocks(n: int) -> list[tuple[int, int]]:
    """Row blocks ``[start, stop)`` of the condensed matrix, each against all later columns.

    Blocks hold up to ~4M elements so each BLAS product is efficient, but stay thin (at most
    64 + width/16 rows) because a block's own lower triangle is computed in vain.
    """
    blocks = []
    start = 0
    while start < n - 1:
        width = n - start
        rows = max(1, min(n - 1 - start, _BLOCK_ELEMENTS // width, _MIN_BLOCK_ROWS + width // 16))
        blocks.append((start, start + rows))
        start += rows
    return blocks


def fill_condensed(
    features: np.ndarray,
    scores: np.ndarray,
    out: np.ndarray,
    *,
    feature_coef: float,
    score_coef: float,
    threads: int = 1,
) -> tuple[float, float]:
    """Write ``feature_coef * ||f_i - f_j|| + score_coef * |s_i - s_j|`` for all ``i < j`` into
    the condensed vector ``out`` and return the mean and population std of the written values.

    Rows are processed in blocks against all later rows with one BLAS product each, on
    float64 features centred on their mean (centring shrinks ``|a|^2 + |b|^2`` and with it the
    cancellation error of the matrix-product formula). Blocks are shared among ``threads``
    threads (numpy and BLAS release the GIL; call under :func:`blas_threads` ``(1)`` so the
    threads do not oversubscribe the cores). Per-block statistics are merged in block order
    (Chan et al.'s parallel variance), so results do not depend on ``threads`` and no second
    pass over ``out`` is needed.
    """
    n = features.shape[0]
    if out.shape != (n * (n - 1) // 2,) or out.dtype != np.float64:
        raise ValueError("out must be a float64 condensed vector of length n(n-1)/2")
    use_features = feature_coef != 0.0 and features.shape[1] > 0
    f = sq = np.zeros(0)
    if feature_coef < 0 or score_coef < 0:
        raise ValueError("distance coefficients must be non-negative")
    if use_features:
        # Scaling the features (and scores) by their coefficient up front saves a pass per
        # block: a * ||f_i - f_j|| == ||a f_i - a f_j|| for a >= 0.
        f = np.asarray(features, dtype=np.float64)
        f = f - f.mean(axis=0)
        if feature_coef != 1.0:
            f *= feature_coef
        sq = np.einsum("ij,ij->i", f, f)
        if not np.isfinite(sq).all():
            raise ValueError("features are too large: squared norms overflow float64")
    s = scores * score_coef if score_coef != 0.0 else scores
    blocks = _row_blocks(n)
    stats: list[tuple[int, float, float]] = [(0, 0.0, 0.0)] * len(blocks)

    def work(block_ids: range) -> None:
        # Scratch is allocated once per thread: a fresh multi-megabyte temporary per block
        # costs page faults comparable to the arithmetic itself.
        size = min(_BLOCK_ELEMENTS, n * n)
        buf = np.empty(size, dtype=np.float64)
        sbuf = np.empty(size, dtype=np.float64) if score_coef != 0.0 else buf
        for b in block_ids:
            start, stop = blocks[b]
            rows, width = stop - start, n - start
            block = buf[: rows * width].reshape(rows, width)
            if use_features:
                np.matmul(f[start:stop], f[start:].T, out=block)
                block *= -2.0
                block += sq[start:stop, None]
                block += sq[None, start:]
                np.maximum(block, 0.0, out=block)
                np.sqrt(block, out=block)
            else:
                block.fill(0.0)
            if score_coef != 0.0:
                sblock = sbuf[: rows * width].reshape(rows, width)
                np.subtract.outer(s[start:stop], s[start:], out=sblock)
                np.abs(sblock, out=sblock)
                block += sblock
            base = pos = _condensed_offset(start, n)
            for r in range(rows):
                length = n - 1 - (start + r)
                out[pos : pos + length] = block[r, r + 1 :]
                pos += length
            # Sum and sum of squares without temporaries; the block's relative rounding error
            # is ~eps * E[d^2] / var(d), negligible for distances.
            values = out[base:pos]
            count = values.shape[0]
            mean = float(values.sum()) / count
            stats[b] = (count, mean, max(float(np.dot(values, values)) - count * mean * mean, 0.0))

    threads = max(1, min(threads, len(blocks)))
    if threads == 1:
        work(range(len(blocks)))
    else:
        with ThreadPoolExecutor(threads) as pool:
            # Interleaved blocks balance the work (early blocks are the widest).
            list(pool.map(work, [range(t, len(blocks), threads) for t in range(threads)]))
    total, mean, m2 = 0, 0.0, 0.0
    for b_count, b_mean, b_m2 in stats:
        merged = total + b_count
        delta = b_mean - mean
        m2 += b_m2 + delta * delta * total * b_count / merged
        mean += delta * b_count / merged
        total = merged
    if total == 0:
        return 0.0, 0.0
    if not math.isfinite(mean) or not math.isfinite(m2):
        raise ValueError("distances overflow float64; rescale the features")
    return mean, math.sqrt(m2 / total)


def exact_distances(
    features: np.ndarray, scores: np.ndarray, score_weight: float, *, threads: int = 1
) -> tuple[np.ndarray, DistanceScales]:
    """The condensed combined distance (see module docstring) with exact z-score statistics.

    Pass 1 writes the raw feature distances and their statistics; pass 2 rescales them in place
    and adds the score term, so peak memory stays one condensed vector.
    """
    n = features.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    score_mean, score_std = score_distance_stats(scores)
    if features.shape[1] > 0 and not _all_rows_equal(features):
        feature_mean, feature_std = fill_condensed(
            features, scores, out, feature_coef=1.0, score_coef=0.0, threads=threads
        )
    else:
        out.fill(0.0)
        feature_mean, feature_std = 0.0, 0.0
    scales = DistanceScales(feature_mean, feature_std, score_mean, score_std, float(score_weight))
    _rescale_add_scores(out, scores, scales.feature_coef, scales.score_coef, threads)
    return out, scales


def _rescale_add_scores(
    out: np.ndarray, scores: np.ndarray, a: float, b: float, threads: int
) -> None:
    """``out = a * out + b * |s_i - s_j|`` in place, rows split among threads by element count."""
    n = scores.shape[0]
    if a == 1.0 and b == 0.0:
        return
    # Row i starts at offset(i); cut the rows where the cumulative element count crosses k/threads.
    rows = np.arange(n, dtype=np.int64)
    offsets = rows * n - rows * (rows + 1) // 2  # offsets[n - 1] == len(out)
    cuts = np.searchsorted(offsets, np.linspace(0, out.shape[0], threads + 1)[1:-1])
    bounds = [0, *(int(c) for c in cuts), n - 1]

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            seg = out[offsets[i] : offsets[i + 1]]
            if a != 1.0:
                seg *= a
            if b != 0.0:
                seg += b * np.abs(scores[i + 1 :] - scores[i])

    if threads <= 1:
        work(0, n - 1)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, bounds[:-1], bounds[1:]))


def complete_linkage_inplace(condensed: np.ndarray, n: int) -> np.ndarray:
    """Complete-linkage HAC on a condensed float64 distance vector, using it as scratch space.

    ``fastcluster.linkage(..., preserve_input=False)`` still copies its input once (it starts
    with ``numpy.array(X)``), doubling peak memory; its compiled entry point works in place, so
    we call that when available (checked against the public function in the tests).
    ``condensed`` holds unspecified values afterwards.
    """
    if n < 2:
        return np.zeros((0, 4), dtype=np.float64)
    if condensed.dtype != np.float64 or not condensed.flags.c_contiguous:
        raise ValueError("condensed distances must be a contiguous float64 vector")
    try:
        import fastcluster
        from _fastcluster import linkage_wrap
    except ImportError:  # pragma: no cover - fastcluster without its extension module
        import fastcluster

        return fastcluster.linkage(condensed, method="complete", preserve_input=False)
    z = np.empty((n - 1, 4), dtype=np.float64)
    linkage_wrap(n, condensed, z, fastcluster.mthidx["complete"])
    return z


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def default_threads() -> int:
    """Cores this process may use (the builders' default degree of parallelism)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def blas_threads(limit: int) -> Iterator[None]:
    """Limit BLAS to ``limit`` threads inside the block (process-wide, restored on exit).

    The builders parallelise over blocks and parts themselves. Leaving OpenBLAS multi-threaded
    as well oversubscribes the cores, and on a shared machine its spinning threads made the
    distance blocks up to 15x slower than single-threaded BLAS (measured on the 2-core box).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def build_exact_tree(
    features: np.ndarray,
    scores: np.ndarray,
    *,
    score_weight: float = 1.0,
    threads: int = 1,
) -> ClusterTree:
    """Exact complete-linkage tree (O(n^2) memory); inputs must already be validated."""
    n = features.shape[0]
    params: dict[str, Any] = {"builder": "exact", "score_weight": float(score_weight)}
    if n < 2:
        return tree_from_linkage(np.zeros((0, 4)), scores, params)
    condensed, scales = exact_distances(features, scores, score_weight, threads=threads)
    z = complete_linkage_inplace(condensed, n)
    del condensed
    params["scales"] = scales.to_dict()
    return tree_from_linkage(z, scores, params)


def build_tree(
    features: Any,
    scores: Any,
    *,
    score_weight: float = 1.0,
    exact_limit: int = DEFAULT_EXACT_LIMIT,
    n_parts: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> ClusterTree:
    """Cluster the masks of one class into a :class:`ClusterTree`.

    ``features``: (n, D) mask features (D may be 0); ``scores``: (n,) mask scores. Up to
    ``exact_limit`` masks the tree is exact complete-linkage HAC on the combined distance (see
    the module docstring). Beyond it, :func:`service.engine.scalable.build_scalable_tree`
    partitions with seeded k-means into parts of at most ``exact_limit`` masks (``n_parts``: the
    desired number of parts, i.e. mean part size ``n / n_parts``; default mean
    ``min(2048, exact_limit // 2)``), builds exact sub-trees and joins them with a
    complete-linkage top tree. ``threads`` defaults to the usable cores.
    The result is deterministic for a given ``seed`` and independent of ``threads``.
    """
    _check_params(score_weight, exact_limit, n_parts, seed)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise ValueError(f"threads must be None or a positive integer, got {threads!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be None or a positive integer, got {threads!r}")
    f, s = validate_inputs(features, scores)
    n_threads = threads or default_threads()
    with blas_threads(1):
        if f.shape[0] <= exact_limit:
            return build_exact_tree(f, s, score_weight=float(score_weight), threads=n_threads)
        from service.engine.scalable import build_scalable_tree

        return build_scalable_tree(
            f,
            s,
            score_weight=float(score_weight),
            max_part=exact_limit,
            n_parts=n_parts,
            seed=seed,
            threads=n_threads,
        )
