"""Which tree nodes the live search can ever reach, and their state at the start.

The automatic rules depend only on ``(S, size)``, so when a tree is built we already know every node
Algorithm 1 could visit: walk down from the root, through auto-split nodes unconditionally and through
askable nodes (they are reached again if humans split them); stop at auto-rejected and skipped nodes.
Only these nodes become database rows; the rest of the tree stays in the tree file.

Nodes reached through auto-split ancestors alone get their final automatic state at once (or
``candidate`` when humans are needed); everything below an askable node starts ``pending`` and is
activated when that node splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.policy import AUTO_CODE_ACTIONS, Action, PolicyParams, auto_action_codes
from service.engine.tree import ClusterTree

# Initial row states (the values of service.models.ClusterState, kept as plain strings here so the
# engine does not depend on the database layer).
PENDING, CANDIDATE = "pending", "candidate"
_AUTO_STATE = {
    Action.AUTO_REJECT: "auto_rejected",
    Action.AUTO_SPLIT: "auto_split",
    Action.SKIP: "skipped",
}


@dataclass(frozen=True)
class ReachablePlan:
    """Reachable nodes in walk order (parents before children).

    ``parent[i]`` indexes the row of node ``nodes[i]``'s tree parent within the plan (-1 for the root).
    """

    nodes: np.ndarray  # int64 node ids
    parent: np.ndarray  # int64 index into this plan, -1 for the root
    state: list[str]  # initial state per row

    def __len__(self) -> int:
        return int(self.nodes.size)


def reachable_plan(tree: ClusterTree, params: PolicyParams) -> ReachablePlan:
    if tree.n == 0:
        return ReachablePlan(np.zeros(0, np.int64), np.zeros(0, np.int64), [])
    codes = auto_action_codes(tree.node_scores(), tree.size, params)
    nodes: list[int] = []
    parents: list[int] = []
    states: list[str] = []
    # (node, index of the parent's row, reached through auto-split ancestors only)
    stack: list[tuple[int, int, bool]] = [(tree.root, -1, True)]
    left, right = tree.left, tree.right
    while stack:
        node, parent_row, reached = stack.pop()
        action = AUTO_CODE_ACTIONS[codes[node]]
        row = len(nodes)
        nodes.append(node)
        parents.append(parent_row)
        if action is None:
            states.append(CANDIDATE if reached else PENDING)
            children_reached = False
        else:
            states.append(_AUTO_STATE[action] if reached else PENDING)
            if action is not Action.AUTO_SPLIT:
                continue
            children_reached = reached
        if left[node] >= 0:
            # Push right first so the left child is walked first (stable, readable order).
            stack.append((int(right[node]), row, children_reached))
            stack.append((int(left[node]), row, children_reached))
    return ReachablePlan(
        np.asarray(nodes, dtype=np.int64), np.asarray(parents, dtype=np.int64), states
    )
