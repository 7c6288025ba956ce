"""Frontiers: best-first = Algorithm 1's re-sort, BFS level order, DFS, and the runner's order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.policy import Action, PolicyParams
from service.engine.runner import run_search
from service.engine.search import BestFirst, BreadthFirst, DepthFirst, make_frontier
from tests.engine.test_runner import perfect_oracle, synthetic

# An operation is either a push (node, score) or a pop (None).
_ops = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 50), st.sampled_from([0.0, 0.25, 0.5, 0.5, 0.75, 1.0, -1.0])),
        st.none(),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops)
def test_best_first_pops_like_a_full_resort(ops):
    """Each pop returns what sorting all candidates by (score desc, node id asc) would give."""
    frontier = BestFirst()
    reference: list[tuple[int, float]] = []
    for op in ops:
        if op is None:
            if not reference:
                with pytest.raises(IndexError):
                    frontier.pop()
                continue
            reference.sort(key=lambda item: (-item[1], item[0]))
            assert frontier.pop() == reference.pop(0)[0]
        else:
            frontier.push(*op)
            reference.append(op)
        assert len(frontier) == len(reference)


def test_best_first_breaks_ties_by_node_id_whatever_the_push_order():
    for order in ([5, 3, 9, 1], [1, 9, 3, 5], [9, 5, 1, 3]):
        frontier = BestFirst()
        for node in order:
            frontier.push(node, 0.5)
        frontier.push(7, 0.9)
        assert [frontier.pop() for _ in range(5)] == [7, 1, 3, 5, 9]


def test_bfs_and_dfs_orders_on_a_complete_binary_tree():
    # Heap numbering: children of i are 2i+1 and 2i+2; 15 nodes, 4 levels.
    def expand(frontier, start=0):
        frontier.push(start, 0.0)
        order = []
        while frontier:
            node = frontier.pop()
            order.append(node)
            if 2 * node + 2 < 15:
                frontier.push(2 * node + 1, 0.0)
                frontier.push(2 * node + 2, 0.0)
        return order

    assert expand(BreadthFirst()) == list(range(15))  # level order, left to right
    # LIFO with left pushed first: pre-order, right subtree first.
    assert expand(DepthFirst()) == [0, 2, 6, 14, 13, 5, 12, 11, 1, 4, 10, 9, 3, 8, 7]


def test_make_frontier_and_bad_input():
    assert isinstance(make_frontier("best_first"), BestFirst)
    assert isinstance(make_frontier("bfs"), BreadthFirst)
    assert isinstance(make_frontier("dfs"), DepthFirst)
    with pytest.raises(ValueError, match="search must be one of"):
        make_frontier("astar")
    with pytest.raises(ValueError, match="NaN"):
        BestFirst().push(1, float("nan"))
    for frontier in (BestFirst(), BreadthFirst(), DepthFirst()):
        with pytest.raises(ValueError, match="non-negative"):
            frontier.push(-1, 0.0)
        with pytest.raises(IndexError):
            frontier.pop()


# --------------------------------------------------------------------------------------------
# the order in which the runner visits clusters


def _pop_order(search: str, params: PolicyParams):
    tree, correct = synthetic(1500, 21)
    result = run_search(
        tree, perfect_oracle(correct), params, search=search, rng=np.random.default_rng(0)
    )
    return tree, result, list(result.node_actions)  # dicts keep insertion (= pop) order


def _expands(action: Action) -> bool:
    return action in (Action.SPLIT, Action.AUTO_SPLIT)


def test_runner_best_first_always_pops_the_best_candidate():
    tree, result, order = _pop_order("best_first", PolicyParams())
    scores = tree.node_scores()
    frontier = {tree.root}
    for node in order:
        best = min(frontier, key=lambda v: (-scores[v], v))
        assert node == best
        frontier.remove(node)
        if _expands(result.node_actions[node]):
            frontier |= {int(tree.left[node]), int(tree.right[node])}
    assert not frontier


def _depths(tree) -> np.ndarray:
    depth = np.zeros(tree.n_nodes, dtype=np.int64)
    for v in range(tree.n_nodes - 2, -1, -1):  # parents have larger ids than children
        depth[v] = depth[tree.parent[v]] + 1
    return depth


def test_runner_bfs_visits_level_by_level():
    tree, _, order = _pop_order("bfs", PolicyParams())
    depth = _depths(tree)[order]
    assert (np.diff(depth) >= 0).all()
    assert depth.max() > 3


def test_runner_dfs_finishes_a_subtree_before_leaving_it():
    tree, result, order = _pop_order("dfs", PolicyParams())
    # Pre-order property: the nodes popped after v and before the next node outside v's
    # subtree are all inside v's subtree (ranges nest).
    lo, hi = tree.lo.tolist(), tree.hi.tolist()
    for i, v in enumerate(order):
        j = i + 1
        while j < len(order) and lo[v] <= lo[order[j]] and hi[order[j]] <= hi[v]:
            j += 1
        assert all(not (lo[v] <= lo[u] and hi[u] <= hi[v]) for u in order[j:])
    # ...and a split cluster's right child is visited right after it.
    for i, v in enumerate(order[:-1]):
        if _expands(result.node_actions[v]):
            assert order[i + 1] == tree.right[v]


def test_all_searches_end_with_the_same_clusters_when_decisions_are_exact():
    """Sec. 5.1: the search order changes the cost curve, not the final set of clusters."""
    tree, correct = synthetic(800, 22)
    params = PolicyParams(n_s=tree.n, k_pr=0.2)  # every cluster fully verified
    results = {
        search: run_search(
            tree, perfect_oracle(correct), params, search=search, rng=np.random.default_rng(0)
        )
        for search in ("best_first", "bfs", "dfs")
    }
    accepted = {s: sorted(map(tuple, r.accepted.tolist())) for s, r in results.items()}
    assert accepted["best_first"] == accepted["bfs"] == accepted["dfs"]
    assert accepted["bfs"]
    assert len({tuple(sorted(r.node_actions.items())) for r in results.values()}) == 1
