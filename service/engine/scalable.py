"""Cluster trees for classes too large for exact complete linkage (bounded memory, ~O(n * part)).

Exact complete-linkage HAC needs every pairwise distance: 8 bytes per pair, 4 TB for a million
masks. This builder keeps the exact algorithm where it matters most -- inside compact groups of
similar masks, where the clusters a crowd worker is asked about live -- and approximates only the
top of the tree:

1. **Scales.** The z-score statistics of the combined distance (see :mod:`service.engine.tree`)
   must be global so every sub-tree uses the same distance: the score term's are exact
   (closed form, O(n log n)); the feature term's are estimated from a seeded sample of random pairs.
2. **Partition.** Hierarchical seeded k-means (at most 32-way splits; k-means++ initialisation
   and Lloyd iterations on a sample, then one assignment pass over the masks, BLAS matrix products
   in float32) on the embedding ``[f / sd_f, w s / sd_s]``, whose Euclidean distance approximates
   the combined distance. Parts above the cap are split again (or, if k-means cannot separate them
   because the masks are identical, cut into equal chunks), so no part exceeds the cap.
3. **Exact sub-trees.** Exact complete linkage inside every part, parts spread over threads
   (fastcluster and numpy release the GIL), each thread reusing one condensed buffer.
4. **Top tree.** Complete linkage over the parts with, as the distance between parts ``A`` and
   ``B``, an *upper bound* of their true complete-linkage distance ``max_{a in A, b in B} d(a, b)``:
   the feature term is bounded by ``min(max_a ||a - c_B|| + r_B, max_b ||b - c_A|| + r_A)``
   (centroid ``c``, radius ``r``; triangle inequality), which is within ``r_B`` of a matching
   lower bound ``max_a ||a - c_B||``; the score term ``max(smax_A - smin_B, smax_B - smin_A)``
   is exact. Centroid distance would ignore how spread out a part is; the bound keeps complete
   linkage's objective -- two parts are joined early only if their union is guaranteed compact --
   and complete linkage's update rule (max) keeps every top merge height an upper bound of the
   true one. Heights are then made monotone (a parent never below a child). Computing
   ``max_a ||a - c_q||`` for all parts ``q`` costs one (m x k) product per part.
5. **Stitch.** Parts are laid out in the top tree's leaf order, each in its own sub-tree's leaf
   order, and the rows renumbered, so every node of the single resulting linkage is still a
   contiguous leaf range.

Peak memory: the caller's features, per thread one condensed buffer for its largest part (at most
``cap (cap - 1) / 2`` float64) and block scratch, the float32 k-means sample, k x k bound
matrices and the O(n) tree arrays -- never an n x n matrix. Measured with
``scripts/bench_tree.py`` (D = 257, 2 threads, defaults): n = 10^6 in 1.4 GiB peak RSS, of
which 1.0 GiB is the input.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import leaves_list

from service.engine.tree import (
    DEFAULT_EXACT_LIMIT,
    ClusterTree,
    DistanceScales,
    _tree_from_leafpos_linkage,
    blas_threads,
    build_exact_tree,
    complete_linkage_inplace,
    default_threads,
    fill_condensed,
    prefix_sums,
    score_distance_stats,
    validate_inputs,
)

#: Default mean part size (parts are capped at twice this). Sub-tree cost grows like
#: ``n * part`` (pairs inside parts), so this trades fidelity to the exact tree against time.
DEFAULT_PART_SIZE = 2048

#: Random pairs used to estimate the feature distance's mean and std (relative error ~0.2%).
SCALE_SAMPLE_PAIRS = 1 << 18

#: k-means splits at most this many ways at a time; larger partitions recurse (hierarchical
#: k-means), so each level costs O(n * 32) distance evaluations instead of O(n * n / part).
_KMEANS_MAX_K = 32
_KMEANS_MAX_ITER = 15
_KMEANS_SAMPLE_PER_CENTER = 256
_KMEANS_MIN_SAMPLE = 8192
_ROW_BLOCK = 32_768


@dataclass(frozen=True)
class _Part:
    """A finished part: its masks in sub-tree leaf order and its leaf-position linkage."""

    order: np.ndarray  # original indices, in the sub-tree's leaf order
    linkage: np.ndarray  # float64[m-1, 4], leaves numbered 0..m-1 by local leaf position
    far: np.ndarray  # float64[k]: largest feature distance from this part's masks to each centroid
    score_min: float
    score_max: float


def estimate_scales(
    features: np.ndarray,
    scores: np.ndarray,
    score_weight: float,
    rng: np.random.Generator,
    n_pairs: int = SCALE_SAMPLE_PAIRS,
) -> DistanceScales:
    """Global z-score statistics: exact for the score term, sampled pairs for the feature term."""
    n, dim = features.shape
    score_mean, score_std = score_distance_stats(scores)
    if dim == 0 or n < 2:
        return DistanceScales(0.0, 0.0, score_mean, score_std, score_weight)
    i = rng.integers(0, n, size=n_pairs)
    j = rng.integers(0, n - 1, size=n_pairs)
    j += j >= i  # uniform over j != i
    dists = np.empty(n_pairs, dtype=np.float64)
    step = max(1, (1 << 22) // dim)
    for start in range(0, n_pairs, step):
        a = features[i[start : start + step]].astype(np.float64)
        a -= features[j[start : start + step]]
        dists[start : start + step] = np.sqrt(np.einsum("ij,ij->i", a, a))
    feature_std = float(dists.std())
    if not math.isfinite(feature_std):
        raise ValueError("features are too large: distances overflow float64")
    return DistanceScales(float(dists.mean()), feature_std, score_mean, score_std, score_weight)


class _Embedding:
    """Rows of ``[a (f - mean_f), b (s - mean_s)]`` in float32, computed on demand in blocks."""

    def __init__(self, features: np.ndarray, scores: np.ndarray, scales: DistanceScales) -> None:
        self.features = features
        self.scores = scores
        self.a = scales.feature_coef
        self.b = scales.score_coef
        n, dim = features.shape
        total = np.zeros(dim, dtype=np.float64)
        for start in range(0, n, _ROW_BLOCK):
            total += features[start : start + _ROW_BLOCK].sum(axis=0, dtype=np.float64)
        self.feature_mean = total / max(n, 1)
        self.score_mean = float(scores.mean()) if n else 0.0
        self._mean32 = self.feature_mean.astype(np.float32)
        self.dim = dim + 1

    def rows(self, index: np.ndarray) -> np.ndarray:
        # float32 throughout: k-means only needs compact parts, and a float64 round trip of
        # the gathered rows was most of the partitioning time.
        out = np.empty((index.shape[0], self.dim), dtype=np.float32)
        f = out[:, :-1]
        f[...] = self.features[index]
        f -= self._mean32
        f *= np.float32(self.a)
        out[:, -1] = self.b * (self.scores[index] - self.score_mean)
        return out


def _nearest(x: np.ndarray, centers: np.ndarray, center_sq: np.ndarray) -> np.ndarray:
    """Index of the nearest center for each row (``|c|^2 - 2 x.c``; |x|^2 is irrelevant)."""
    d = x @ centers.T
    d *= -2.0
    d += center_sq
    return d.argmin(axis=1)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling), seeded by ``rng``; one matrix-vector product per center."""
    m = x.shape[0]
    x_sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    closest = np.full(m, np.inf)
    pick = int(rng.integers(m))
    for c in range(k):
        centers[c] = x[pick]
        d = x_sq - 2.0 * (x @ centers[c]).astype(np.float64) + float(x_sq[pick])
        np.minimum(closest, np.maximum(d, 0.0), out=closest)
        if c + 1 == k:
            break
        total = closest.sum()
        if total <= 0:  # fewer distinct points than centers: duplicate centers are harmless
            pick = int(rng.integers(m))
        else:
            pick = min(int(np.searchsorted(np.cumsum(closest), rng.random() * total)), m - 1)
    return centers


def _kmeans_labels(
    emb: _Embedding, index: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Seeded k-means of the rows ``index``: fit on a sample, then label every row.

    Lloyd stops once fewer than 0.1% of the sample change cluster: the parts only need to be
    compact, not a converged optimum.
    """
    m = index.shape[0]
    sample_size = min(m, max(_KMEANS_MIN_SAMPLE, _KMEANS_SAMPLE_PER_CENTER * k))
    sample = np.sort(rng.choice(m, size=sample_size, replace=False)) if sample_size < m else None
    x = emb.rows(index if sample is None else index[sample])
    centers = _kmeans_pp(x, k, rng)
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    for _ in range(_KMEANS_MAX_ITER):
        new = _nearest(x, centers, np.einsum("ij,ij->i", centers, centers))
        changed = int(np.count_nonzero(new != labels))
        labels = new
        if changed <= x.shape[0] // 1000:
            break
        counts = np.bincount(labels, minlength=k)
        by_label = np.argsort(labels, kind="stable")
        present = np.flatnonzero(counts)
        starts = np.concatenate(([0], np.cumsum(counts[present])[:-1]))
        sums = np.add.reduceat(x[by_label].astype(np.float64), starts, axis=0)
        centers[present] = (sums / counts[present, None]).astype(np.float32)
    if sample is None:
        return labels
    center_sq = np.einsum("ij,ij->i", centers, centers)
    out = np.empty(m, dtype=np.int64)
    for start in range(0, m, _ROW_BLOCK):
        out[start : start + _ROW_BLOCK] = _nearest(
            emb.rows(index[start : start + _ROW_BLOCK]), centers, center_sq
        )
    return out


def _split(
    emb: _Embedding, index: np.ndarray, seed: np.random.SeedSequence, target: int, cap: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One k-means split of an oversize part: returns (final parts, parts to split again)."""
    k = min(_KMEANS_MAX_K, max(2, math.ceil(index.shape[0] / target)))
    labels = _kmeans_labels(emb, index, k, np.random.default_rng(seed))
    counts = np.bincount(labels, minlength=k)
    if counts.max() == index.shape[0]:
        # k-means found a single cluster: the rows are (numerically) identical, so any split
        # is as good as any other.
        return list(np.array_split(index, math.ceil(index.shape[0] / cap))), []
    by_label = index[np.argsort(labels, kind="stable")]
    pieces = [p for p in np.split(by_label, np.cumsum(counts)[:-1]) if p.shape[0]]
    return [p for p in pieces if p.shape[0] <= cap], [p for p in pieces if p.shape[0] > cap]


def partition(
    emb: _Embedding, n: int, target: int, cap: int, seed: int, threads: int = 1
) -> list[np.ndarray]:
    """Split ``0..n-1`` into parts of at most ``cap`` rows, ``target`` rows on average.

    Hierarchical: every oversize part of a level is split (in parallel over ``threads``) with
    its own random stream, spawned from ``seed`` along its path in the hierarchy, so the
    result is deterministic whatever the thread count or scheduling. Returns index arrays
    sorted by their first row.
    """
    done: list[np.ndarray] = []
    level = [(np.arange(n, dtype=np.int64), np.random.SeedSequence(seed))]
    if n <= cap:
        return [level[0][0]]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while level:
            results = list(pool.map(lambda item: _split(emb, *item, target, cap), level))
            following = []
            for (_, seq), (final, again) in zip(level, results, strict=True):
                done.extend(final)
                following.extend(zip(again, seq.spawn(len(again)), strict=True))
            level = following
    return sorted(done, key=lambda part: int(part[0]))


def _leafpos_linkage(z: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel a linkage over local indices to local leaf positions; returns (order, linkage)."""
    if m == 1:
        return np.zeros(1, dtype=np.int64), np.zeros((0, 4))
    order = leaves_list(z).astype(np.int64)
    position = np.empty(m, dtype=np.int64)
    position[order] = np.arange(m, dtype=np.int64)
    out = z.copy()
    for col in (0, 1):
        ids = z[:, col].astype(np.int64)
        leaf = ids < m
        ids[leaf] = position[ids[leaf]]
        out[:, col] = ids
    return order, out


def _centroids(features: np.ndarray, index_parts: list[np.ndarray]) -> np.ndarray:
    """Feature centroid (float64) of every part."""
    out = np.zeros((len(index_parts), features.shape[1]), dtype=np.float64)
    for p, index in enumerate(index_parts):
        out[p] = features[index].mean(axis=0, dtype=np.float64)
    return out


def _far_distances(f: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``max_i ||f_i - c_q||`` for every centroid ``q`` (one BLAS product, m x k)."""
    if f.shape[1] == 0:
        return np.zeros(centroids.shape[0])
    d2 = f @ centroids.T
    d2 *= -2.0
    d2 += np.einsum("ij,ij->i", f, f)[:, None]
    d2 += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    return np.sqrt(np.maximum(d2.max(axis=0), 0.0))


def _build_part(
    features: np.ndarray,
    scores: np.ndarray,
    index: np.ndarray,
    scales: DistanceScales,
    centroids: np.ndarray,
    buf: np.ndarray,
) -> _Part:
    m = index.shape[0]
    f = features[index].astype(np.float64)
    s = scores[index]
    far = _far_distances(f, centroids)
    if m > 1:
        cond = buf[: m * (m - 1) // 2]
        fill_condensed(f, s, cond, feature_coef=scales.feature_coef, score_coef=scales.score_coef)
        z = complete_linkage_inplace(cond, m)
    else:
        z = np.zeros((0, 4))
    local_order, leafpos = _leafpos_linkage(z, m)
    return _Part(
        order=index[local_order],
        linkage=leafpos,
        far=far,
        score_min=float(s.min()),
        score_max=float(s.max()),
    )


def _top_distances(parts: list[_Part], scales: DistanceScales) -> np.ndarray:
    """Condensed upper bounds of the complete-linkage distance between every pair of parts.

    For parts ``A``, ``B`` with centroids ``c``: ``max_{a,b} ||a - b|| <= max_a ||a - c_B|| +
    max_b ||b - c_B||`` (triangle inequality), and symmetrically; the smaller of the two is
    used. The bound is tight up to ``B``'s radius, because ``max_a ||a - c_B||`` is itself a
    lower bound (``c_B`` is a mean of the ``b``, and distance is convex). The score term
    ``max |s_a - s_b| = max(smax_A - smin_B, smax_B - smin_A)`` is exact.
    """
    k = len(parts)
    far = np.stack([p.far for p in parts])  # far[p, q] = max_{a in p} ||a - c_q||
    radius = np.diag(far)
    smin = np.array([p.score_min for p in parts])
    smax = np.array([p.score_max for p in parts])
    i, j = np.triu_indices(k, 1)
    feature = np.minimum(far[i, j] + radius[j], far[j, i] + radius[i])
    score = np.maximum(smax[i] - smin[j], smax[j] - smin[i])
    return scales.feature_coef * feature + scales.score_coef * score


def _stitch(parts: list[_Part], top: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Join sub-tree linkages under the top linkage (leaf positions over parts).

    Returns the global leaf order and the global leaf-position linkage.
    """
    k = len(parts)
    sizes = np.array([p.order.shape[0] for p in parts], dtype=np.int64)
    leaf_offset = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    row_offset = np.concatenate(([0], np.cumsum(sizes - 1)[:-1]))
    z = np.empty((n - 1, 4), dtype=np.float64)
    root_id = np.empty(k, dtype=np.int64)
    root_height = np.zeros(k, dtype=np.float64)
    for p, part in enumerate(parts):
        m = sizes[p]
        rows = z[row_offset[p] : row_offset[p] + m - 1]
        for col in (0, 1):
            ids = part.linkage[:, col].astype(np.int64)
            rows[:, col] = np.where(ids < m, leaf_offset[p] + ids, n + row_offset[p] + ids - m)
        rows[:, 2:] = part.linkage[:, 2:]
        root_id[p] = leaf_offset[p] if m == 1 else n + row_offset[p] + m - 2
        root_height[p] = part.linkage[-1, 2] if m > 1 else 0.0
    # Top rows: children < k are parts (their sub-tree roots), others earlier top rows.
    first_top = n - k
    top_size = np.empty(2 * k - 1, dtype=np.int64)
    top_height = np.empty(2 * k - 1, dtype=np.float64)
    top_id = np.empty(2 * k - 1, dtype=np.int64)
    top_size[:k], top_height[:k], top_id[:k] = sizes, root_height, root_id
    for r in range(k - 1):
        a, b = int(top[r, 0]), int(top[r, 1])
        node = k + r
        top_size[node] = top_size[a] + top_size[b]
        # Parts are not clusters of one HAC, so an upper bound can fall below a sub-tree's own
        # height; clamp to keep heights monotone along every root path.
        top_height[node] = max(top[r, 2], top_height[a], top_height[b])
        top_id[node] = n + first_top + r
        z[first_top + r] = (top_id[a], top_id[b], top_height[node], top_size[node])
    # scipy's convention (and is_monotonic) wants rows sorted by height. Heights never decrease
    # towards the root and children have lower row numbers, so a stable sort keeps every child
    # before its parent; renumber internal ids accordingly.
    rank = np.argsort(z[:, 2], kind="stable")
    new_id = np.empty(n - 1, dtype=np.int64)
    new_id[rank] = np.arange(n, 2 * n - 1, dtype=np.int64)
    z = z[rank]
    for col in (0, 1):
        ids = z[:, col].astype(np.int64)
        internal = ids >= n
        ids[internal] = new_id[ids[internal] - n]
        z[:, col] = ids
    order = np.concatenate([p.order for p in parts])
    return order, z


def _build_parts(
    features: np.ndarray,
    scores: np.ndarray,
    index_parts: list[np.ndarray],
    scales: DistanceScales,
    threads: int,
) -> list[_Part]:
    """Exact sub-trees of all parts, spread over ``threads`` threads (fastcluster and numpy
    release the GIL). Work is balanced by cost ~ m^2 (largest first, to the least loaded
    thread); each thread reuses one condensed buffer sized for its largest part."""
    sizes = np.array([p.shape[0] for p in index_parts])
    threads = max(1, min(threads, len(index_parts)))
    assigned: list[list[int]] = [[] for _ in range(threads)]
    load = np.zeros(threads)
    for p in np.argsort(-sizes, kind="stable"):
        t = int(load.argmin())
        assigned[t].append(int(p))
        load[t] += float(sizes[p]) ** 2
    results: list[_Part | None] = [None] * len(index_parts)
    centroids = _centroids(features, index_parts)

    def work(ids: list[int]) -> None:
        if not ids:
            return
        largest = max(int(sizes[p]) for p in ids)
        buf = np.empty(largest * (largest - 1) // 2, dtype=np.float64)
        for p in ids:
            results[p] = _build_part(features, scores, index_parts[p], scales, centroids, buf)

    if threads == 1:
        work(assigned[0])
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, assigned))
    return [r for r in results if r is not None]


def build_scalable_tree(
    features: Any,
    scores: Any,
    *,
    score_weight: float = 1.0,
    max_part: int = DEFAULT_EXACT_LIMIT,
    n_parts: int | None = None,
    part_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> ClusterTree:
    """Approximate complete-linkage tree of any size in bounded memory (see module docstring).

    ``max_part`` caps every exactly clustered part (the exact builder's memory limit). The mean
    part size is ``part_size`` (default ``min(DEFAULT_PART_SIZE, max_part // 2)``) or
    ``n / n_parts``; parts are capped at ``min(max_part, 2 * mean)`` to bound the time and memory
    of the largest sub-tree. Deterministic for a given ``seed`` whatever ``threads`` is.
    """
    f, s = validate_inputs(features, scores)
    n = f.shape[0]
    for name, value, low in (("max_part", max_part, 2), ("part_size", part_size, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if value is not None and value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_parts is not None and (
        isinstance(n_parts, bool) or not isinstance(n_parts, int) or n_parts < 2
    ):
        raise ValueError(f"n_parts must be None or an integer >= 2, got {n_parts!r}")
    if not isinstance(score_weight, int | float) or not math.isfinite(score_weight):
        raise ValueError(f"score_weight must be a finite number >= 0, got {score_weight!r}")
    if score_weight < 0:
        raise ValueError(f"score_weight must be a finite number >= 0, got {score_weight!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n_threads = threads if threads is not None else default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"threads must be None or a positive integer, got {threads!r}")
    if n_parts is not None:
        target = max(1, math.ceil(n / n_parts))
    elif part_size is not None:
        target = part_size
    else:
        target = max(1, min(DEFAULT_PART_SIZE, max_part // 2))
    cap = max(2, min(max_part, 2 * target))
    with blas_threads(1):
        if n <= cap:
            return build_exact_tree(f, s, score_weight=float(score_weight), threads=n_threads)
        scales = estimate_scales(f, s, float(score_weight), np.random.default_rng(seed))
        index_parts = partition(_Embedding(f, s, scales), n, target, cap, seed, n_threads)
        k = len(index_parts)
        if k > max_part:
            raise ValueError(
                f"{k} parts exceed the top tree's limit of {max_part}; raise part_size"
            )
        parts = _build_parts(f, s, index_parts, scales, n_threads)
        top = complete_linkage_inplace(_top_distances(parts, scales), k)
    top_order, top_leafpos = _leafpos_linkage(top, k)
    parts = [parts[p] for p in top_order]
    order, z = _stitch(parts, top_leafpos, n)
    params: dict[str, Any] = {
        "builder": "scalable",
        "score_weight": float(score_weight),
        "seed": int(seed),
        "part_size": int(target),
        "part_cap": int(cap),
        "n_parts": k,
        "largest_part": int(max(p.shape[0] for p in index_parts)),
        "scales": scales.to_dict(),
    }
    return _tree_from_leafpos_linkage(z, prefix_sums(s[order]), order, params, validate=False)
