"""Cluster-tree builders: exactness against scipy, tree invariants, the scalable builder, errors."""

from __future__ import annotations

import fastcluster
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import is_monotonic, is_valid_linkage, leaves_list, linkage
from scipy.spatial.distance import pdist

from service.engine.scalable import build_scalable_tree
from service.engine.tree import (
    ClusterTree,
    build_tree,
    complete_linkage_inplace,
    fill_condensed,
    prefix_sums,
    score_distance_stats,
)

# --------------------------------------------------------------------------------------------
# helpers


def mixture(n: int, dim: int, seed: int, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A seeded Gaussian mixture with scores that depend on the component (as real ones do)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 4
    label = rng.integers(0, k, n)
    features = (centers[label] + rng.normal(size=(n, dim))).astype(np.float32)
    scores = np.clip(rng.normal(0.3 + 0.1 * label, 0.1), 0, 1)
    return features, scores


def reference_linkage(features: np.ndarray, scores: np.ndarray, weight: float) -> np.ndarray:
    """scipy on the same distance, computed independently: pdist of the features and of the
    scores, each z-scored with numpy's std, shifted by the z-score of a zero distance."""
    parts = []
    if features.shape[1]:
        d = pdist(features.astype(np.float64))
        if d.std() > 0:
            parts.append(d / d.std())
    d = pdist(scores[:, None])
    if d.std() > 0:
        parts.append(weight * d / d.std())
    combined = sum(parts) if parts else np.zeros(len(scores) * (len(scores) - 1) // 2)
    return linkage(combined, method="complete")


def clusters_of(z: np.ndarray, n: int) -> set[frozenset[int]]:
    """The set of internal clusters (as sets of original indices) of a scipy linkage."""
    members: list[frozenset[int]] = [frozenset([i]) for i in range(n)]
    for a, b, _, _ in z:
        members.append(members[int(a)] | members[int(b)])
    return set(members[n:])


def tree_clusters(tree: ClusterTree) -> set[frozenset[int]]:
    return {
        frozenset(tree.order[tree.lo[v] : tree.hi[v]].tolist()) for v in range(tree.n, tree.n_nodes)
    }


def assert_valid_tree(tree: ClusterTree, scores: np.ndarray) -> None:
    """Every invariant of the ClusterTree contract, checked by brute force."""
    n = tree.n
    assert len(scores) == n
    assert np.array_equal(np.sort(tree.order), np.arange(n))
    assert tree.n_nodes == 2 * n - 1 and tree.root == 2 * n - 2
    assert tree.linkage.shape == (n - 1, 4)
    if n > 1:
        assert is_valid_linkage(tree.linkage)
        assert is_monotonic(tree.linkage)
        assert np.array_equal(leaves_list(tree.linkage), np.arange(n))
    assert np.array_equal(tree.lo[:n], np.arange(n))
    assert np.array_equal(tree.hi[:n], np.arange(1, n + 1))
    assert (tree.left[:n] == -1).all() and (tree.right[:n] == -1).all()
    assert tree.lo[tree.root] == 0 and tree.hi[tree.root] == n
    assert tree.parent[tree.root] == -1
    assert np.array_equal(tree.size, tree.hi - tree.lo)
    for v in range(n, tree.n_nodes):
        a, b = tree.left[v], tree.right[v]
        # children's ranges partition the parent's, left first
        assert tree.lo[a] == tree.lo[v] and tree.hi[a] == tree.lo[b] and tree.hi[b] == tree.hi[v]
        assert tree.size[v] == tree.size[a] + tree.size[b] == tree.linkage[v - n, 3]
        assert tree.parent[a] == v and tree.parent[b] == v
        assert tree.height[v] >= max(tree.height[a], tree.height[b])
        assert tree.height[v] == tree.linkage[v - n, 2]
    assert (tree.parent[: tree.root] >= n).all()
    brute = [scores[tree.order[tree.lo[v] : tree.hi[v]]].mean() for v in range(tree.n_nodes)]
    assert np.allclose(tree.node_scores(), brute)
    assert np.allclose(tree.score_prefix, np.concatenate(([0], np.cumsum(scores[tree.order]))))


# --------------------------------------------------------------------------------------------
# exact builder against scipy


@pytest.mark.parametrize(
    ("n", "dim", "weight", "seed"),
    [(80, 16, 1.0, 0), (120, 257, 1.0, 1), (60, 3, 0.0, 2), (70, 8, 2.5, 3), (50, 0, 1.0, 4)],
)
def test_exact_tree_equals_scipy_on_the_same_distance(n, dim, weight, seed):
    features, scores = mixture(n, dim, seed)
    tree = build_tree(features, scores, score_weight=weight)
    ref = reference_linkage(features, scores, weight)
    assert np.allclose(np.sort(tree.linkage[:, 2]), np.sort(ref[:, 2]), rtol=1e-9, atol=1e-9)
    # With continuous data there are no ties, so complete linkage is unique: same clusters.
    assert tree_clusters(tree) == clusters_of(ref, n)
    assert_valid_tree(tree, scores)


def test_heights_are_in_units_of_standard_deviations():
    """The shift documented in tree.py: d = ||df|| / sd_f + w |ds| / sd_s (0 for identical)."""
    features, scores = mixture(40, 5, 7)
    tree = build_tree(features, scores)
    scales = tree.params["scales"]
    d = pdist(features.astype(np.float64))
    assert scales["feature_std"] == pytest.approx(d.std(), rel=1e-10)
    assert scales["feature_mean"] == pytest.approx(d.mean(), rel=1e-10)
    assert scales["score_std"] == pytest.approx(pdist(scores[:, None]).std(), rel=1e-10)
    assert tree.height[tree.root] == pytest.approx(
        (d / d.std() + pdist(scores[:, None]) / scales["score_std"]).max()
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    dim=st.integers(0, 6),
    weight=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
    seed=st.integers(0, 2**31),
    duplicates=st.booleans(),
)
def test_exact_tree_invariants_and_heights(n, dim, weight, seed, duplicates):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    scores = rng.random(n)
    if duplicates:  # repeated masks and tied scores: still a valid tree
        features[n // 2 :] = features[: n - n // 2]
        scores = np.round(scores, 1)
    tree = build_tree(features, scores, score_weight=weight)
    assert_valid_tree(tree, scores)
    if not duplicates:  # with ties, equally valid trees may differ from scipy's
        ref = reference_linkage(features, scores, weight)
        assert np.allclose(np.sort(tree.linkage[:, 2]), np.sort(ref[:, 2]), rtol=1e-7, atol=1e-9)


def test_build_is_deterministic_and_independent_of_threads():
    features, scores = mixture(300, 12, 11)
    a = build_tree(features, scores, threads=1)
    b = build_tree(features, scores, threads=2)
    for name in ("order", "linkage", "lo", "hi", "left", "right", "parent", "height"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.params == b.params


def test_degenerate_distances():
    n = 30
    scores = np.linspace(0.1, 0.9, n)
    same = np.ones((n, 4), dtype=np.float32)
    tree = build_tree(same, scores)  # feature term dropped: a 1-D clustering of the scores
    assert_valid_tree(tree, scores)
    assert tree.params["scales"]["feature_std"] == 0.0
    ref = reference_linkage(same, scores, 1.0)
    assert np.allclose(np.sort(tree.linkage[:, 2]), np.sort(ref[:, 2]))
    flat = build_tree(np.zeros((n, 3)), np.full(n, 0.5))  # everything identical: height 0
    assert_valid_tree(flat, np.full(n, 0.5))
    assert (flat.height == 0).all()
    pair = build_tree(np.array([[0.0], [3.0]]), np.array([0.2, 0.4]))
    assert pair.n == 2 and pair.root == 2 and pair.height[2] == 0.0  # one pair: no z-score


def test_trivial_sizes():
    empty = build_tree(np.zeros((0, 5)), np.zeros(0))
    assert (empty.n, empty.root, empty.n_nodes) == (0, -1, 0)
    assert empty.linkage.shape == (0, 4) and empty.node_scores().shape == (0,)
    assert np.array_equal(empty.score_prefix, [0.0])
    one = build_tree(np.ones((1, 5)), np.array([0.7]))
    assert (one.n, one.root, one.n_nodes) == (1, 0, 1)
    assert (one.lo[0], one.hi[0], one.parent[0], one.left[0]) == (0, 1, -1, -1)
    assert one.node_scores() == pytest.approx([0.7])


@pytest.mark.parametrize(
    ("features", "scores", "message"),
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0.1, 0.2]), "NaN or infinity"),
        (np.array([[0.0, 1.0], [1.0, 2.0]]), np.array([0.1, np.inf]), "NaN or infinity"),
        (np.zeros((3, 2)), np.zeros(2), "disagree on the number of masks"),
        (np.zeros(3), np.zeros(3), "2-D"),
        (np.zeros((3, 2, 2)), np.zeros(3), "2-D"),
        (np.zeros((3, 2)), np.zeros((3, 1)), "1-D"),
        (np.array([["a", "b"]]), np.zeros(1), "real numbers"),
        (np.zeros((1, 2)), np.array(["x"]), "real numbers"),
    ],
)
def test_bad_input_is_a_clear_value_error(features, scores, message):
    with pytest.raises(ValueError, match=message):
        build_tree(features, scores)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score_weight": -1.0}, "score_weight"),
        ({"score_weight": float("nan")}, "score_weight"),
        ({"exact_limit": 1}, "exact_limit"),
        ({"n_parts": 1}, "n_parts"),
        ({"seed": -3}, "seed"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tree(np.zeros((4, 2)), np.zeros(4), **kwargs)


# --------------------------------------------------------------------------------------------
# scalable builder


def test_scalable_tree_is_a_valid_nested_tree():
    features, scores = mixture(3000, 24, 5, k=12)
    tree = build_tree(features, scores, exact_limit=500, seed=3)
    assert tree.params["builder"] == "scalable"
    assert tree.params["largest_part"] <= 500 and tree.params["n_parts"] >= 6
    assert tree.linkage.shape == (2999, 4)
    assert_valid_tree(tree, scores)
    # the same linkage survives full validation by the contract's constructor
    again = ClusterTree.from_linkage(tree.linkage, scores[tree.order], tree.order)
    assert np.array_equal(again.lo, tree.lo) and np.array_equal(again.parent, tree.parent)


def test_scalable_tree_is_deterministic_under_a_seed():
    features, scores = mixture(2000, 8, 6)
    a = build_tree(features, scores, exact_limit=300, seed=9, threads=1)
    b = build_tree(features, scores, exact_limit=300, seed=9, threads=2)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.linkage, b.linkage)
    c = build_tree(features, scores, exact_limit=300, seed=10)
    assert not np.array_equal(a.order, c.order)


def test_scalable_subtrees_are_exact_and_parts_are_separable():
    """Well-separated groups that fit in a part come out as exact clusters of the tree."""
    rng = np.random.default_rng(0)
    groups = 8
    centers = rng.normal(size=(groups, 6)) * 100
    label = np.repeat(np.arange(groups), 150)
    features = centers[label] + rng.normal(size=(label.size, 6))
    # Scores are part of the distance: keep them group-wise too, or the groups are not separated.
    scores = 0.2 + 0.08 * label + rng.normal(0, 0.002, label.size)
    tree = build_scalable_tree(features, scores, max_part=400, part_size=200, seed=1)
    assert_valid_tree(tree, scores)
    found = tree_clusters(tree)
    for g in range(groups):
        assert frozenset(np.flatnonzero(label == g).tolist()) in found


def test_scalable_handles_identical_masks_and_tiny_parts():
    features = np.zeros((700, 3), dtype=np.float32)  # k-means cannot split: equal chunks
    scores = np.full(700, 0.5)
    tree = build_scalable_tree(features, scores, max_part=100, part_size=50)
    assert tree.params["largest_part"] <= 100
    assert_valid_tree(tree, scores)
    no_features = build_scalable_tree(np.zeros((400, 0)), np.linspace(0, 1, 400), max_part=64)
    assert_valid_tree(no_features, np.linspace(0, 1, 400))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_part": 1}, "max_part"), ({"part_size": 0}, "part_size"), ({"n_parts": 1}, "n_parts")],
)
def test_scalable_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_scalable_tree(np.zeros((10, 2)), np.zeros(10), **kwargs)


# --------------------------------------------------------------------------------------------
# building blocks


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=0, max_size=60))
def test_score_distance_stats_match_brute_force(values):
    s = np.array(values, dtype=np.float64)
    mean, std = score_distance_stats(s)
    if len(s) < 3 or np.ptp(s) == 0:
        assert std == 0.0
    else:
        d = pdist(s[:, None])
        assert mean == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
        assert std == pytest.approx(d.std(), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("threads", [1, 3])
def test_fill_condensed_matches_pdist(threads):
    rng = np.random.default_rng(4)
    features = rng.normal(size=(700, 9)) + 50.0  # offset: centring must keep it exact
    scores = rng.random(700)
    out = np.empty(700 * 699 // 2)
    mean, std = fill_condensed(
        features, scores, out, feature_coef=0.5, score_coef=2.0, threads=threads
    )
    expected = 0.5 * pdist(features) + 2.0 * pdist(scores[:, None])
    assert np.allclose(out, expected, rtol=1e-10, atol=1e-9)
    assert mean == pytest.approx(expected.mean(), rel=1e-12)
    assert std == pytest.approx(expected.std(), rel=1e-9)
    with pytest.raises(ValueError, match="condensed"):
        fill_condensed(features, scores, out[:-1], feature_coef=1.0, score_coef=0.0)


def test_in_place_linkage_equals_fastcluster():
    d = pdist(np.random.default_rng(2).normal(size=(90, 4)))
    expected = fastcluster.linkage(d, method="complete")
    got = complete_linkage_inplace(d.copy(), 90)
    assert np.array_equal(got, expected)


def test_prefix_sums_and_range_mean():
    assert np.array_equal(prefix_sums([1, 2, 3]), [0.0, 1.0, 3.0, 6.0])
    with pytest.raises(ValueError, match="1-D"):
        prefix_sums(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        prefix_sums([1.0, np.nan])
    features, scores = mixture(20, 3, 1)
    tree = build_tree(features, scores)
    areas = np.arange(20, dtype=np.float64)  # any per-mask quantity, in leaf order
    root_mean = tree.range_mean(prefix_sums(areas), tree.root)
    assert isinstance(root_mean, float) and root_mean == pytest.approx(areas.mean())
    nodes = np.array([0, 5, tree.root])
    assert tree.range_mean(tree.score_prefix, nodes) == pytest.approx(tree.node_scores()[nodes])
    with pytest.raises(ValueError, match="out of range"):
        tree.range_mean(tree.score_prefix, tree.n_nodes)
    with pytest.raises(ValueError, match="values_prefix"):
        tree.range_mean(np.zeros(3), 0)


def test_tree_arrays_are_read_only_views():
    features, scores = mixture(10, 2, 0)
    tree = build_tree(features, scores)
    with pytest.raises(ValueError):
        tree.lo[0] = 5
    own = np.arange(3, dtype=np.int64)
    t = ClusterTree.from_linkage(np.array([[0, 1, 1.0, 2], [3, 2, 2.0, 3]]), [0.1, 0.2, 0.3], own)
    assert own.flags.writeable and t.order.flags.writeable is False


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[0, 2, 1.0, 2], [3, 1, 2.0, 3]], "not contiguous"),  # leaves 0 and 2 are not adjacent
        ([[0, 1, 1.0, 2], [3, 3, 2.0, 4]], "exactly once"),
        ([[0, 4, 1.0, 2], [3, 2, 2.0, 3]], "before it is formed"),
        ([[0, 1, 1.0, 2], [3, 2, 2.0, 5]], "counts"),
        ([[0, 1, -1.0, 2], [3, 2, 2.0, 3]], "negative"),
        ([[0, 1.5, 1.0, 2], [3, 2, 2.0, 3]], "integers"),
        ([[0, 1, np.nan, 2], [3, 2, 2.0, 3]], "NaN"),
        ([[0, 1, 1.0, 2]], "shape"),
    ],
)
def test_from_linkage_rejects_invalid_linkages(rows, message):
    with pytest.raises(ValueError, match=message):
        ClusterTree.from_linkage(np.array(rows, dtype=np.float64), [0.1, 0.2, 0.3])


def test_from_linkage_rejects_bad_order():
    z = np.array([[0, 1, 1.0, 2], [3, 2, 2.0, 3]])
    with pytest.raises(ValueError, match="permutation"):
        ClusterTree.from_linkage(z, [0.1, 0.2, 0.3], order=[0, 0, 1])
