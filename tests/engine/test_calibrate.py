"""Calibration of K_pr / K_pa and of the sequential prior (Sec. 4.3, Fig. 4c)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.engine.calibrate import calibrate, node_quality, plot_calibration
from service.engine.policy import Action, PolicyParams, auto_action
from service.engine.tree import build_tree
from tests.engine.test_runner import random_tree

P = PolicyParams()
EDGES = np.linspace(0.0, 1.0, 21)


def test_node_quality_matches_brute_force_on_a_built_tree():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 6))
    scores = rng.random(300)
    tree = build_tree(features, scores)
    correct = rng.random(300) < 0.6  # in the caller's original order
    correct_leaf = correct[tree.order]
    q = node_quality(tree, correct_leaf)
    assert q.shape == (tree.n_nodes,)
    for v in range(tree.n_nodes):
        members = tree.order[tree.lo[v] : tree.hi[v]]
        assert q[v] == pytest.approx(correct[members].mean(), abs=1e-12)
    assert q[tree.root] == pytest.approx(correct.mean())


def test_node_quality_rejects_bad_labels():
    tree = random_tree(np.full(10, 0.5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        node_quality(tree, np.ones(9))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        node_quality(tree, np.full(10, 2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        node_quality(tree, np.full(10, np.nan))
    with pytest.raises(ValueError, match="numeric"):
        node_quality(tree, np.array(["a"] * 10))


def _regions(per_bin: int = 50, seed: int = 0):
    """Nodes whose quality is known by score band.

    S in (0, 0.3]: clearly bad (Q = 0.05) -> P_l = 1;  (0.3, 0.6]: mixed (Q in 0.3..0.7) ->
    P_h = P_l = 0;  (0.6, 1]: good (Q = 0.95) -> P_h = 1. So K_pr = 0.3 and K_pa = 0.6.
    """
    rng = np.random.default_rng(seed)
    s, q = [], []
    for b in range(20):
        lo, hi = EDGES[b], EDGES[b + 1]
        s.append(rng.uniform(lo + 1e-3, hi - 1e-3, per_bin))
        if b < 6:
            q.append(np.full(per_bin, 0.05))
        elif b < 12:
            q.append(rng.uniform(0.3, 0.7, per_bin))
        else:
            q.append(np.full(per_bin, 0.95))
    s, q = np.concatenate(s), np.concatenate(q)
    size = rng.integers(15, 200, s.shape[0])
    return s, q, size


def test_recovers_known_thresholds():
    s, q, size = _regions()
    cal = calibrate(s, q, size, P, bins=EDGES)
    assert cal.k_pr == EDGES[6]
    assert cal.k_pa == EDGES[12]
    assert np.allclose(cal.p_l[:6], 1.0) and np.allclose(cal.p_l[6:], 0.0)
    assert np.allclose(cal.p_h[:12], 0.0) and np.allclose(cal.p_h[12:], 1.0)
    # With integer bins the edges span the observed scores; add the end points to pin them.
    s2 = np.concatenate([s, [0.0, 1.0]])
    cal2 = calibrate(s2, np.concatenate([q, [0.05, 0.95]]), np.concatenate([size, [50, 50]]), P)
    assert cal2.k_pr == pytest.approx(0.3)
    assert cal2.k_pa == pytest.approx(0.6)
    # The rules built from it fire exactly below the thresholds.
    params = cal.apply(P, prior=False)
    assert auto_action(0.29, 100, params) is Action.AUTO_REJECT
    assert auto_action(0.59, 100, params) is Action.AUTO_SPLIT
    assert auto_action(0.61, 100, params) is None


def test_small_nodes_are_ignored():
    s, q, size = _regions()
    # Many small, excellent clusters at low scores: they must not move the thresholds.
    s = np.concatenate([s, np.full(500, 0.12)])
    q = np.concatenate([q, np.ones(500)])
    size = np.concatenate([size, np.full(500, P.n_s - 1)])
    cal = calibrate(s, q, size, P, bins=EDGES)
    assert (cal.k_pr, cal.k_pa) == (EDGES[6], EDGES[12])


def test_tolerance_eps_and_weighting():
    s, q, size = _regions()
    # One big good cluster (10,000 masks) among the small bad ones of bin 3.
    s = np.concatenate([s, [0.17]])
    q = np.concatenate([q, [0.95]])
    size = np.concatenate([np.full(size.shape, 20), [10_000]])
    by_node = calibrate(s, q, size, P, bins=EDGES, weight="node")  # P_h = 1/51 in bin 3
    assert by_node.k_pa == EDGES[3]
    loose = calibrate(s, q, size, P, bins=EDGES, weight="node", eps=0.05)
    assert loose.k_pa == EDGES[12]
    by_size = calibrate(s, q, size, P, bins=EDGES, weight="size")  # the masks at stake
    assert by_size.p_h[3] == pytest.approx(10_000 / (10_000 + 50 * 20))
    assert by_size.k_pa == EDGES[3]
    assert by_size.k_pr == EDGES[3]


def test_sparse_bins_neither_extend_nor_break_a_run():
    s, q, size = _regions()
    keep = ~((s > EDGES[4]) & (s <= EDGES[5]))  # empty bin 4 inside the bad region
    s, q, size = s[keep], q[keep], size[keep]
    s = np.concatenate([s, [0.22, 0.23, 0.24]])  # 3 good nodes in bin 4
    q = np.concatenate([q, [0.95, 0.95, 0.95]])
    size = np.concatenate([size, [100, 100, 100]])
    assert calibrate(s, q, size, P, bins=EDGES, min_count=5).k_pa == EDGES[12]
    assert calibrate(s, q, size, P, bins=EDGES, min_count=1).k_pa == EDGES[4]


def test_a_rule_that_never_holds_never_fires():
    rng = np.random.default_rng(1)
    s = rng.uniform(0.2, 0.9, 400)
    q = np.full(400, 0.9)  # good everywhere: nothing may be split or rejected unasked
    cal = calibrate(s, q, np.full(400, 30), P)
    assert cal.k_pa < s.min() and cal.k_pr < s.min()
    params = cal.apply(P, prior=False)
    assert all(auto_action(float(x), 30, params) is None for x in s)


def test_prior_strength_is_recovered_by_moments():
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 1, 40_000)
    m = 0.1 + 0.8 * s
    strength = 20.0
    q = rng.beta(m * strength, (1 - m) * strength)
    cal = calibrate(s, q, np.full(s.shape, 100), P, weight="node")
    assert cal.prior_strength == pytest.approx(strength, rel=0.1)
    knots = cal.prior_map()
    assert len(knots) == 20
    xs, ys = np.array(knots).T
    assert np.allclose(ys, 0.1 + 0.8 * xs, atol=0.02)
    params = cal.apply(PolicyParams(variant="sequential"))
    assert params.prior_map == knots
    assert params.prior_strength == cal.prior_strength


def test_to_dict_is_json_and_plot_writes_png(tmp_path):
    s, q, size = _regions()
    keep = ~((s > EDGES[8]) & (s <= EDGES[9]))  # an empty bin -> NaN -> null
    cal = calibrate(s[keep], q[keep], size[keep], P, bins=EDGES)
    data = json.loads(json.dumps(cal.to_dict(), allow_nan=False))
    assert data["k_pa"] == cal.k_pa
    assert data["p_h"][8] is None
    assert len(data["bin_edges"]) == 21 and len(data["p_l"]) == 20
    out = plot_calibration(cal, tmp_path / "plots" / "calibration.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"node_S": [0.5, 0.6], "node_Q": [0.5], "node_size": [20, 20]}, "disagree"),
        ({"node_S": [0.5, np.nan], "node_Q": [0.5, 0.5], "node_size": [20, 20]}, "finite"),
        ({"node_S": [0.5, 0.6], "node_Q": [0.5, 1.5], "node_size": [20, 20]}, r"\[0, 1\]"),
        ({"node_S": [0.5, 0.6], "node_Q": [0.5, 0.5], "node_size": [20, 0]}, ">= 1"),
        ({"node_S": [0.5, 0.6], "node_Q": [0.5, 0.5], "node_size": [2, 3]}, "no nodes"),
        ({"node_S": [0.5, 0.6], "node_Q": [0.5, 0.5], "node_size": [20, 20], "eps": 0.7}, "eps"),
        ({"node_S": [0.5, 0.6], "node_Q": [0.5, 0.5], "node_size": [20, 20], "bins": 0}, "bins"),
        (
            {"node_S": [0.5, 0.6], "node_Q": [0.5, 0.5], "node_size": [20, 20], "bins": [1, 0]},
            "increasing",
        ),
        (
            {"node_S": [0.5, 0.6], "node_Q": [0.5, 0.5], "node_size": [20, 20], "weight": "x"},
            "weight",
        ),
    ],
)
def test_bad_input(kwargs, match):
    args = {k: kwargs.pop(k) for k in ("node_S", "node_Q", "node_size")}
    with pytest.raises(ValueError, match=match):
        calibrate(args["node_S"], args["node_Q"], args["node_size"], P, **kwargs)


def test_calibrating_on_a_tree_end_to_end():
    """Masks are correct exactly when their score exceeds 0.5; clusters mix both only near it."""
    rng = np.random.default_rng(3)
    scores = np.sort(rng.random(4000))
    tree = random_tree(scores, rng)
    q = node_quality(tree, scores > 0.5)
    cal = calibrate(tree.node_scores(), q, tree.size, P, bins=40)
    s = tree.node_scores()
    big = tree.size >= P.n_s
    # Every node auto-split by the calibrated rule has (almost) no chance of being good...
    split = big & (s <= cal.k_pa)
    assert (q[split] >= P.k_a).mean() <= 0.05
    # ...and the rule does fire: most bad-scored clusters are handled without humans.
    assert split.sum() > 0.3 * (big & (s < 0.5)).sum()
    assert cal.k_pr <= cal.k_pa < 0.6
