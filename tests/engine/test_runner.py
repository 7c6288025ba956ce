"""The simulator's run of Algorithm 1: against brute force, determinism, budget, reuse, speed."""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest

from service.engine.policy import Action, PolicyParams, sample_positions
from service.engine.runner import RunResult, run_search
from service.engine.tree import ClusterTree, prefix_sums

# --------------------------------------------------------------------------------------------
# synthetic trees (shared with the other engine tests)


def random_tree(scores: np.ndarray, rng: np.random.Generator, merge_prob: float = 0.6):
    """A random binary tree over leaf positions, built from the ClusterTree contract's fields.

    Each level merges a random subset of adjacent pairs, so the tree is irregular (unequal
    subtree sizes) and builds in O(n) vectorised work even for 10^6 leaves.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    n_nodes = max(2 * n - 1, 0)
    lo = np.zeros(n_nodes, dtype=np.int64)
    hi = np.zeros(n_nodes, dtype=np.int64)
    left = np.full(n_nodes, -1, dtype=np.int64)
    right = np.full(n_nodes, -1, dtype=np.int64)
    parent = np.full(n_nodes, -1, dtype=np.int64)
    height = np.zeros(n_nodes, dtype=np.float64)
    lo[:n] = np.arange(n)
    hi[:n] = np.arange(1, n + 1)
    seq = np.arange(n, dtype=np.int64)
    next_id, level = n, 0
    while seq.shape[0] > 1:
        level += 1
        m = seq.shape[0]
        starts = np.arange(int(rng.integers(0, 2)) if m > 2 else 0, m - 1, 2)
        keep = rng.random(starts.shape[0]) < merge_prob
        if not keep.any():
            keep[int(rng.integers(starts.shape[0]))] = True
        starts = starts[keep]
        ids = np.arange(next_id, next_id + starts.shape[0], dtype=np.int64)
        a, b = seq[starts], seq[starts + 1]
        left[ids], right[ids] = a, b
        parent[a], parent[b] = ids, ids
        lo[ids], hi[ids] = lo[a], hi[b]
        height[ids] = level
        merged = seq.copy()
        merged[starts] = ids
        drop = np.zeros(m, dtype=bool)
        drop[starts + 1] = True
        seq = merged[~drop]
        next_id += starts.shape[0]
    size = hi - lo
    linkage = np.stack([left[n:], right[n:], height[n:], size[n:]], axis=1).astype(np.float64)
    return ClusterTree(
        order=np.arange(n, dtype=np.int64),
        linkage=linkage.reshape(-1, 4),
        lo=lo,
        hi=hi,
        left=left,
        right=right,
        parent=parent,
        height=height,
        size=size,
        score_prefix=prefix_sums(scores),
    )


def smooth_scores(n: int, rng: np.random.Generator) -> np.ndarray:
    """Scores in (0, 1) that vary smoothly along the leaf order (as clustered scores do)."""
    walk = np.cumsum(rng.normal(0, 0.15, n))
    walk -= np.convolve(walk, np.ones(51) / 51, mode="same")
    base = 0.75 + 0.25 * np.sin(np.arange(n) / max(n / 12, 1.0))
    return np.clip(base + 0.6 * walk + rng.normal(0, 0.03, n), 0.01, 0.99)


def synthetic(n: int, seed: int):
    """(tree, correct-in-leaf-order): correctness follows the score, with noise."""
    rng = np.random.default_rng(seed)
    scores = smooth_scores(n, rng)
    tree = random_tree(scores, rng)
    correct = rng.random(n) < scores**3
    return tree, correct


def perfect_oracle(correct: np.ndarray, log: list[np.ndarray] | None = None):
    def oracle(positions: np.ndarray) -> np.ndarray:
        if log is not None:
            log.append(positions.copy())
        return correct[positions]

    return oracle


def _range_set(ranges: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in ranges}


def _check_partition(result: RunResult, n: int) -> None:
    """Decided ranges are disjoint and, when the search finished, cover every mask once."""
    cover = np.zeros(n, dtype=np.int64)
    for ranges in (result.accepted, result.rejected, result.auto_rejected, result.skipped):
        for a, b in ranges:
            cover[a:b] += 1
    assert cover.max(initial=0) <= 1
    if result.stopped == "frontier_empty":
        assert (cover == 1).all()


# --------------------------------------------------------------------------------------------
# brute-force references


def brute_force_exact(tree, correct: np.ndarray, params: PolicyParams) -> set[tuple[int, int]]:
    """Algorithm 1 by plain recursion when every cluster is fully asked (Q~ = Q)."""
    scores = tree.node_scores()
    k_a = Fraction(repr(params.k_a))
    accepted: set[tuple[int, int]] = set()

    def visit(v: int) -> None:
        lo, hi = int(tree.lo[v]), int(tree.hi[v])
        s, size = scores[v], hi - lo
        if s <= params.k_pr or (s <= params.k_pa and size <= params.n_s):
            return
        if s <= params.k_pa:
            visit(int(tree.left[v]))
            visit(int(tree.right[v]))
            return
        q = Fraction(int(correct[lo:hi].sum()), size)
        if q >= k_a:
            accepted.add((lo, hi))
        elif q > 1 - k_a:
            visit(int(tree.left[v]))
            visit(int(tree.right[v]))

    visit(tree.root)
    return accepted


def reference_algorithm_1(tree, oracle, params: PolicyParams, rng: np.random.Generator):
    """Algorithm 1 literally: re-sort the candidate list before every pop, N_s fresh samples."""
    scores = tree.node_scores()
    k_a = Fraction(repr(params.k_a))
    candidates = [tree.root]
    out: dict[str, list] = {"accept": [], "reject": [], "auto_reject": [], "order": []}
    questions = 0
    while candidates:
        candidates.sort(key=lambda v: (-scores[v], v))
        v = candidates.pop(0)
        out["order"].append(v)
        lo, hi = int(tree.lo[v]), int(tree.hi[v])
        s, size = scores[v], hi - lo
        children = [int(tree.left[v]), int(tree.right[v])]
        if s <= params.k_pr or (s <= params.k_pa and size <= params.n_s):
            out["auto_reject"].append((lo, hi))
            continue
        if s <= params.k_pa:
            candidates += children
            continue
        t = min(params.n_s, size)
        answers = oracle(sample_positions(lo, hi, t, rng))
        questions += t
        q = Fraction(int(np.sum(answers)), t)
        if q >= k_a:
            out["accept"].append((lo, hi))
        elif q <= 1 - k_a:
            out["reject"].append((lo, hi))
        else:
            candidates += children
    return out, questions


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reuse", [True, False])
def test_perfect_oracle_matches_brute_force_recursion(seed, reuse):
    tree, correct = synthetic(600, seed)
    # N_s >= every cluster: each asked cluster is verified completely, so Q~ = Q exactly and
    # the outcome no longer depends on sampling or on the search order.
    params = PolicyParams(n_s=tree.n, k_pa=0.7, k_pr=0.3, reuse_parent_answers=reuse)
    expected = brute_force_exact(tree, correct, params)
    for search in ("best_first", "bfs", "dfs"):
        result = run_search(
            tree, perfect_oracle(correct), params, search=search, rng=np.random.default_rng(seed)
        )
        assert _range_set(result.accepted) == expected
        _check_partition(result, tree.n)
    assert expected  # the synthetic data do contain good clusters


@pytest.mark.parametrize("seed", [3, 4])
def test_sampled_run_matches_literal_algorithm_1(seed):
    tree, correct = synthetic(3000, seed)
    params = PolicyParams(k_pr=0.2, reuse_parent_answers=False)
    ref, ref_questions = reference_algorithm_1(
        tree, perfect_oracle(correct), params, np.random.default_rng(seed)
    )
    result = run_search(tree, perfect_oracle(correct), params, rng=np.random.default_rng(seed))
    assert list(result.node_actions) == ref["order"]
    assert [tuple(r) for r in result.accepted.tolist()] == ref["accept"]
    assert [tuple(r) for r in result.rejected.tolist()] == ref["reject"]
    assert [tuple(r) for r in result.auto_rejected.tolist()] == ref["auto_reject"]
    assert result.questions == ref_questions
    assert result.counts["auto_split"] > 0 and result.counts["split"] > 0
    _check_partition(result, tree.n)


def test_trace_is_cumulative_and_ends_at_the_totals():
    tree, correct = synthetic(2000, 5)
    result = run_search(tree, perfect_oracle(correct), PolicyParams(), rng=np.random.default_rng(0))
    decided = sum(a is not Action.ASK for a in result.node_actions.values())
    assert result.trace.shape == (decided, 2)
    assert (np.diff(result.trace, axis=0) >= 0).all()
    assert tuple(result.trace[-1]) == (result.questions, result.accepted_masks)
    assert result.accepted_leaf_mask(tree.n).sum() == result.accepted_masks


def test_same_seed_same_run_and_different_seed_different_samples():
    tree, correct = synthetic(3000, 6)
    noise = np.random.default_rng(99).random(tree.n) < 0.1
    answers = correct ^ noise  # deterministic noisy workers
    params = PolicyParams(variant="curtailed")

    def run(seed: int) -> RunResult:
        return run_search(tree, perfect_oracle(answers), params, rng=np.random.default_rng(seed))

    a, b, c = run(7), run(7), run(8)
    assert a.node_actions == b.node_actions
    assert a.questions == b.questions
    assert np.array_equal(a.accepted, b.accepted)
    assert np.array_equal(a.trace, b.trace)
    assert a.node_actions != c.node_actions or not np.array_equal(a.trace, c.trace)


@pytest.mark.parametrize("reuse", [True, False])
def test_curtailed_run_takes_the_paper_decisions_with_fewer_questions(reuse):
    tree, correct = synthetic(4000, 8)
    answers = correct ^ (np.random.default_rng(1).random(tree.n) < 0.05)
    runs = {
        variant: run_search(
            tree,
            perfect_oracle(answers),
            PolicyParams(variant=variant, reuse_parent_answers=reuse),
            rng=np.random.default_rng(3),
        )
        for variant in ("paper", "curtailed")
    }
    paper, curtailed = runs["paper"], runs["curtailed"]
    assert paper.node_actions == curtailed.node_actions
    assert np.array_equal(paper.accepted, curtailed.accepted)
    assert curtailed.questions < paper.questions


def test_reuse_never_asks_a_mask_twice_and_costs_no_more_when_sampling_is_exhaustive():
    tree, correct = synthetic(3000, 9)
    log: list[np.ndarray] = []
    run_search(tree, perfect_oracle(correct, log), PolicyParams(), rng=np.random.default_rng(0))
    asked = np.concatenate(log)
    assert np.unique(asked).shape == asked.shape

    log_no_reuse: list[np.ndarray] = []
    run_search(
        tree,
        perfect_oracle(correct, log_no_reuse),
        PolicyParams(reuse_parent_answers=False),
        rng=np.random.default_rng(0),
    )
    asked = np.concatenate(log_no_reuse)
    assert np.unique(asked).shape[0] < asked.shape[0]  # without reuse masks are re-asked

    # With every cluster verified completely, reuse means each mask is asked at most once.
    small, ok = synthetic(400, 10)
    params = PolicyParams(n_s=small.n, k_pa=0.0)
    result = run_search(small, perfect_oracle(ok), params, rng=np.random.default_rng(0))
    assert result.questions == small.n
    no_reuse = run_search(
        small,
        perfect_oracle(ok),
        PolicyParams(n_s=small.n, k_pa=0.0, reuse_parent_answers=False),
        rng=np.random.default_rng(0),
    )
    assert no_reuse.questions > result.questions
    assert np.array_equal(no_reuse.accepted, result.accepted)


def test_budget_stops_the_run_and_is_a_prefix_of_the_full_run():
    tree, correct = synthetic(3000, 11)
    params = PolicyParams(variant="curtailed")
    full = run_search(tree, perfect_oracle(correct), params, rng=np.random.default_rng(2))
    budget = full.questions // 3
    part = run_search(
        tree,
        perfect_oracle(correct),
        params,
        max_questions=budget,
        rng=np.random.default_rng(2),
    )
    assert part.stopped == "budget"
    assert part.questions == budget
    assert Action.ASK in part.node_actions.values()
    assert _range_set(part.accepted) <= _range_set(full.accepted)
    assert np.array_equal(part.trace, full.trace[: part.trace.shape[0]])
    _check_partition(part, tree.n)
    zero = run_search(
        tree, perfect_oracle(correct), params, max_questions=0, rng=np.random.default_rng(2)
    )
    assert zero.questions == 0
    assert zero.stopped == "budget"


@pytest.mark.parametrize("variant", ["paper", "curtailed", "sequential"])
def test_every_variant_partitions_the_masks(variant):
    tree, correct = synthetic(2500, 12)
    answers = correct ^ (np.random.default_rng(4).random(tree.n) < 0.05)
    result = run_search(
        tree, perfect_oracle(answers), PolicyParams(variant=variant), rng=np.random.default_rng(5)
    )
    _check_partition(result, tree.n)
    scores = tree.node_scores()
    for node, action in result.node_actions.items():
        if action in (Action.ACCEPT, Action.REJECT, Action.SPLIT):
            assert scores[node] > 0.7  # humans only see clusters above K_pa
    assert result.counts["accept"] > 0


def test_skip_mode_records_small_clusters_as_skipped():
    tree, correct = synthetic(2000, 13)
    result = run_search(
        tree,
        perfect_oracle(correct),
        PolicyParams(small_clusters="skip"),
        rng=np.random.default_rng(0),
    )
    sizes = result.skipped[:, 1] - result.skipped[:, 0]
    assert sizes.shape[0] > 0
    assert (sizes < 15).all()
    asked = [v for v, a in result.node_actions.items() if a in (Action.ACCEPT, Action.REJECT)]
    assert all(tree.size[v] >= 15 for v in asked)
    _check_partition(result, tree.n)


def test_degenerate_trees():
    empty = random_tree(np.zeros(0), np.random.default_rng(0))
    result = run_search(empty, lambda p: p > 0, PolicyParams(), rng=np.random.default_rng(0))
    assert (
        result.questions == 0 and result.accepted.shape == (0, 2) and result.trace.shape == (0, 2)
    )
    single = random_tree(np.array([0.9]), np.random.default_rng(0))
    yes = run_search(
        single, lambda p: np.ones(p.shape, bool), PolicyParams(), rng=np.random.default_rng(0)
    )
    assert yes.accepted.tolist() == [[0, 1]] and yes.questions == 1
    no = run_search(
        single, lambda p: np.zeros(p.shape, int), PolicyParams(), rng=np.random.default_rng(0)
    )
    assert no.rejected.tolist() == [[0, 1]]


def test_bad_arguments_raise_value_errors():
    tree, correct = synthetic(200, 14)
    rng = np.random.default_rng(0)
    oracle = perfect_oracle(correct)
    with pytest.raises(ValueError, match="search"):
        run_search(tree, oracle, PolicyParams(), search="random", rng=rng)
    with pytest.raises(ValueError, match="max_questions"):
        run_search(tree, oracle, PolicyParams(), max_questions=-1, rng=rng)
    with pytest.raises(ValueError, match="Generator"):
        run_search(tree, oracle, PolicyParams(), rng=np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PolicyParams"):
        run_search(tree, oracle, {"n_s": 15}, rng=rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ClusterTree"):
        run_search(object(), oracle, PolicyParams(), rng=rng)
    with pytest.raises(ValueError, match="one boolean per position"):
        run_search(tree, lambda p: correct[p][:-1], PolicyParams(), rng=rng)
    with pytest.raises(ValueError, match="booleans"):
        run_search(tree, lambda p: np.full(p.shape, 2), PolicyParams(), rng=rng)


def test_large_tree_runs_fast():
    # Per-cluster work must not grow with the cluster size: 2 x 10^5 masks in well under the
    # budget (the 10^6-mask benchmark is in the report).
    tree, correct = synthetic(200_000, 15)
    start = time.perf_counter()
    result = run_search(tree, perfect_oracle(correct), PolicyParams(), rng=np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    assert result.questions > 0
    assert elapsed < 10.0, elapsed
