"""Frontiers (candidate sets) for searching the cluster tree.

Algorithm 1 of the paper re-sorts the candidate clusters by score before every pop; a binary heap
gives the same order in O(log n) per operation. ``BestFirst`` is the paper's "heuristics only:
mask score" search, which it found to give the best quantity-vs-cost trade-off (Sec. 5.1,
Fig. 6b); breadth-first and depth-first are kept for comparison. Every strategy visits the same
clusters in the end; only the order, and therefore the curve of masks against questions, differs.

All three share one interface (``push(node, score)``, ``pop() -> node``, ``len()``) so the runner
and the live service can switch strategy by name (:func:`make_frontier`).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Protocol

__all__ = ["SEARCHES", "BestFirst", "BreadthFirst", "DepthFirst", "Frontier", "make_frontier"]

SEARCHES = ("best_first", "bfs", "dfs")


class Frontier(Protocol):
    """What the runner needs from a candidate set."""

    def push(self, node: int, score: float) -> None: ...

    def pop(self) -> int: ...

    def __len__(self) -> int: ...


def _check_node(node: int) -> None:
    if node < 0:
        raise ValueError(f"node ids are non-negative, got {node}")


class BestFirst:
    """Highest cluster score first; equal scores pop the smaller node id first.

    The tie-break makes runs reproducible regardless of push order (it matters: many clusters of
    a tree can share a score, e.g. singletons of saturated masks).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []

    def push(self, node: int, score: float) -> None:
        _check_node(node)
        if score != score:  # NaN would silently corrupt the heap order
            raise ValueError(f"score of node {node} is NaN")
        heapq.heappush(self._heap, (-score, node))

    def pop(self) -> int:
        if not self._heap:
            raise IndexError("pop from an empty frontier")
        return heapq.heappop(self._heap)[1]

    def __len__(self) -> int:
        return len(self._heap)


class BreadthFirst:
    """First in, first out: the tree is explored level by level (scores are ignored)."""

    def __init__(self) -> None:
        self._queue: deque[int] = deque()

    def push(self, node: int, score: float) -> None:
        _check_node(node)
        self._queue.append(node)

    def pop(self) -> int:
        if not self._queue:
            raise IndexError("pop from an empty frontier")
        return self._queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)


class DepthFirst:
    """Last in, first out (scores are ignored).

    The runner pushes a split cluster's left child and then its right child, so the search
    descends into the right child first and finishes that subtree before the left one.
    """

    def __init__(self) -> None:
        self._stack: list[int] = []

    def push(self, node: int, score: float) -> None:
        _check_node(node)
        self._stack.append(node)

    def pop(self) -> int:
        if not self._stack:
            raise IndexError("pop from an empty frontier")
        return self._stack.pop()

    def __len__(self) -> int:
        return len(self._stack)


def make_frontier(kind: str) -> BestFirst | BreadthFirst | DepthFirst:
    """An empty frontier by name: ``"best_first"``, ``"bfs"`` or ``"dfs"``."""
    if kind == "best_first":
        return BestFirst()
    if kind == "bfs":
        return BreadthFirst()
    if kind == "dfs":
        return DepthFirst()
    raise ValueError(f"search must be one of {SEARCHES}, got {kind!r}")
