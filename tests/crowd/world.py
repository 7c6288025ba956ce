"""Building blocks for the crowd tests: a project with a fake cluster tree, gold items, workers,
and simulated workers answering through the HTTP API.

Cluster rows are created exactly as the cluster job does (``service.engine.reachable``), from a
hand-built tree whose leaf truths are known, so a test can answer every question correctly (or
not) by looking the question up in the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask.testing import FlaskClient
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from service.crowd import questions as stored_questions
from service.engine.policy import PolicyParams
from service.engine.reachable import reachable_plan
from service.engine.tree import ClusterTree
from service.models import (
    Assignment,
    Cluster,
    ClusterState,
    GoldItem,
    Image,
    Question,
    QuestionKind,
    Round,
    Tree,
    Worker,
)
from tests.helpers import hit_answers, new_key

RLE = {"size": [4, 4], "counts": "04"}


def balanced_tree(scores: np.ndarray) -> ClusterTree:
    """A perfectly balanced tree over ``len(scores)`` (a power of two) leaves in leaf order."""
    n = len(scores)
    if n < 2 or n & (n - 1):
        raise ValueError("balanced_tree needs a power of two >= 2 leaves")
    rows, ids, sizes, next_id, height = [], list(range(n)), dict.fromkeys(range(n), 1), n, 1.0
    while len(ids) > 1:
        merged = []
        for a, b in zip(ids[::2], ids[1::2], strict=True):
            sizes[next_id] = sizes[a] + sizes[b]
            rows.append([a, b, height, sizes[next_id]])
            merged.append(next_id)
            next_id += 1
        ids, height = merged, height + 1.0
    return ClusterTree.from_linkage(np.array(rows, dtype=np.float64), np.asarray(scores))


def block_world(blocks: str, block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Leaf scores and truths from a string of block kinds (each ``block`` leaves):

    ``G`` good (score 0.9, all correct), ``B`` confidently wrong (0.9, all incorrect), ``L`` low
    score (0.4, incorrect: automatic), ``M`` mixed (0.9; first half correct, second half not).
    """
    scores, truth = [], []
    for kind in blocks:
        if kind == "G":
            scores += [0.9] * block
            truth += [True] * block
        elif kind == "B":
            scores += [0.9] * block
            truth += [False] * block
        elif kind == "L":
            scores += [0.4] * block
            truth += [False] * block
        elif kind == "M":
            scores += [0.9] * block
            truth += [True] * (block // 2) + [False] * (block - block // 2)
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return np.array(scores), np.array(truth)


@dataclass
class World:
    """One project with one class, a tree of clusters and gold items."""

    key_id: int
    headers: dict[str, str]
    project_id: int
    class_id: int
    image_id: int
    round_id: int
    tree_id: int = 0
    tree: ClusterTree | None = None
    truth: np.ndarray | None = None
    cluster_of_node: dict[int, int] = field(default_factory=dict)

    def campaign(self, client: FlaskClient, **body: Any) -> dict[str, Any]:
        payload = {"budget_usd": 100.0, "backend": "local", "reward_per_hit_usd": 0.5}
        payload.update(body)
        response = client.post(
            f"/api/v1/projects/{self.project_id}/campaigns", json=payload, headers=self.headers
        )
        assert response.status_code == 201, response.get_json()
        return response.get_json()


def make_world(
    client: FlaskClient, db: Session, params: dict[str, Any] | None = None, name: str = "w"
) -> World:
    key_id, headers = new_key(db, name)
    response = client.post(
        "/api/v1/projects",
        json={"name": name, "classes": ["chair"], "params": params or {}},
        headers=headers,
    )
    assert response.status_code == 201, response.get_json()
    project = response.get_json()
    image = Image(
        project_id=project["id"],
        file_name=f"{name}.jpg",
        uri=f"file:///{name}.jpg",
        width=4,
        height=4,
    )
    rnd = Round(project_id=project["id"], number=1)
    db.add_all([image, rnd])
    db.commit()
    return World(key_id, headers, project["id"], project["classes"][0]["id"], image.id, rnd.id)


def add_tree(db: Session, world: World, scores: np.ndarray, truth: np.ndarray) -> None:
    """Insert the tree and its reachable cluster rows as the cluster job would."""
    tree = balanced_tree(scores)
    params = PolicyParams.from_dict(_project_params(db, world.project_id))
    row = Tree(
        project_id=world.project_id,
        round_id=world.round_id,
        class_id=world.class_id,
        uri="file:///tree.npz",
        mask_count=tree.n,
    )
    db.add(row)
    db.flush()
    plan = reachable_plan(tree, params)
    node_scores = tree.node_scores()
    # Parents come before children in the plan; insert depth by depth (one statement each) so
    # every row can name its parent's id.
    depth = np.zeros(len(plan), dtype=np.int64)
    for i in range(len(plan)):
        if plan.parent[i] >= 0:
            depth[i] = depth[plan.parent[i]] + 1
    ids = np.zeros(len(plan), dtype=np.int64)
    for level in range(int(depth.max()) + 1 if len(plan) else 0):
        members = np.flatnonzero(depth == level).tolist()
        rows = []
        for i in members:
            node, parent = int(plan.nodes[i]), int(plan.parent[i])
            rows.append(
                {
                    "project_id": world.project_id,
                    "tree_id": row.id,
                    "parent_id": int(ids[parent]) if parent >= 0 else None,
                    "node": node,
                    "lo": int(tree.lo[node]),
                    "hi": int(tree.hi[node]),
                    "size": int(tree.size[node]),
                    "score": float(node_scores[node]),
                    "state": plan.state[i],
                    "yes_count": 0,
                    "no_count": 0,
                }
            )
        created = db.scalars(
            insert(Cluster).returning(Cluster.id, sort_by_parameter_order=True), rows
        ).all()
        ids[members] = created
        world.cluster_of_node.update(
            {int(plan.nodes[i]): int(c) for i, c in zip(members, created, strict=True)}
        )
    db.commit()
    world.tree_id, world.tree, world.truth = row.id, tree, truth


def _project_params(db: Session, project_id: int) -> dict[str, Any]:
    from service.models import Project

    return db.get(Project, project_id).params


def add_gold(
    db: Session, world: World, expected: list[bool], *, for_qualification: bool = False
) -> list[int]:
    items = [
        GoldItem(
            project_id=world.project_id,
            image_id=world.image_id,
            class_id=world.class_id,
            rle=RLE,
            iou=0.9 if e else 0.2,
            expected=e,
            for_qualification=for_qualification,
        )
        for e in expected
    ]
    db.add_all(items)
    db.commit()
    return [g.id for g in items]


def invite(client: FlaskClient, world: World) -> dict[str, Any]:
    response = client.post(f"/api/v1/projects/{world.project_id}/workers", headers=world.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def qualify_directly(db: Session, worker_id: int) -> None:
    db.execute(update(Worker).where(Worker.id == worker_id).values(qualified=True))
    db.commit()


def campaign_world(
    client: FlaskClient,
    db: Session,
    name: str,
    blocks: str = "GLGLGLGL",
    gold: tuple[bool, ...] = (True, False, True),
    **campaign: Any,
) -> tuple[World, dict[str, Any], dict[str, Any]]:
    """A project with a tree of ``blocks``, gold items, a running campaign (10 questions per HIT,
    2 of them gold, unless ``campaign`` says otherwise) and one qualified local worker:
    ``(world, campaign, worker invite)``."""
    world = make_world(client, db, name=name)
    scores, truth = block_world(blocks)
    add_tree(db, world, scores, truth)
    add_gold(db, world, list(gold))
    created = world.campaign(client, **{"questions_per_hit": 10, "gold_per_hit": 2, **campaign})
    worker = invite(client, world)
    qualify_directly(db, worker["worker_id"])
    return world, created, worker


def worker_headers(token: str) -> dict[str, str]:
    return {"X-Worker-Token": token}


def stored_answers(db: Session, assignment_public_id: str) -> int:
    """How many answers the database holds for the assignment (read, then the read ends)."""
    count = len(hit_answers(db, Assignment.public_id == assignment_public_id))
    db.rollback()
    return count


def correct_answers(db: Session, world: World | None, public_ids: list[str]) -> dict[str, bool]:
    """The right answer to each question: the leaf's truth, or the gold item's expected value."""
    # Qualification questions are rows; a HIT's questions are arrays of its row (migration 0006).
    rows = [
        (pid, kind, None, expected)
        for pid, kind, expected in db.execute(
            select(Question.public_id, Question.kind, GoldItem.expected)
            .join(GoldItem, GoldItem.id == Question.gold_item_id)
            .where(Question.public_id.in_(public_ids))
        )
    ]
    found = stored_questions.of_public_ids(db, public_ids)
    expected = stored_questions.expected_answers(db, found.values())
    rows += [(q.public_id, q.kind, q.leaf_pos, expected.get(q.id)) for q in found.values()]
    out = {}
    for pid, kind, leaf_pos, expected in rows:
        if QuestionKind(kind) is QuestionKind.SAMPLE:
            assert world is not None and world.truth is not None
            out[pid] = bool(world.truth[leaf_pos])
        else:
            out[pid] = bool(expected)
    db.rollback()  # end the read transaction: the test session must not pin old snapshots
    return out


Answerer = Callable[[str, bool], bool]


def honest(_: str, right: bool) -> bool:
    return right


def do_hit(
    client: FlaskClient,
    db: Session,
    world: World,
    token: str,
    answerer: Answerer = honest,
    ms: int = 1500,
) -> dict[str, Any] | None:
    """Claim a HIT and answer all of it in one post; ``None`` when there is no work."""
    headers = worker_headers(token)
    response = client.post("/api/v1/work/assignments", headers=headers)
    if response.status_code == 409:
        assert response.get_json()["error"]["code"] == "no_work"
        return None
    assert response.status_code == 200, response.get_json()
    hit = response.get_json()
    right = correct_answers(db, world, [q["id"] for q in hit["questions"]])
    answers = [
        {"question_id": q["id"], "value": answerer(q["id"], right[q["id"]]), "ms": ms}
        for q in hit["questions"]
    ]
    posted = client.post(
        f"/api/v1/work/assignments/{hit['assignment_id']}/answers",
        json={"answers": answers},
        headers=headers,
    )
    assert posted.status_code == 200, posted.get_json()
    assert posted.get_json()["complete"] is True
    return hit


def ranges(db: Session, world: World, state: ClusterState) -> set[tuple[int, int]]:
    rows = db.execute(
        select(Cluster.lo, Cluster.hi).where(
            Cluster.tree_id == world.tree_id, Cluster.state == state
        )
    ).all()
    db.rollback()
    return {(int(lo), int(hi)) for lo, hi in rows}


def check_built_hits(db: Session, hit_ids: list[int], gold_per_hit: int) -> None:
    """Each HIT's stored payload lists its own questions, in their positions, with the class
    name and image URL of each; and each has its hidden gold. A build inserts many HITs and all
    their questions in two statements, so a HIT id matched to the wrong payload would show."""
    from service.crowd.hits import image_url, question_payload

    assert hit_ids == sorted(hit_ids) and len(set(hit_ids)) == len(hit_ids)
    for hit_id in hit_ids:
        rows = [
            (q.public_id, q.kind, q.position)
            for q in stored_questions.of_hits(db, [hit_id])[hit_id]
        ]
        assert [position for _, _, position in rows] == list(range(len(rows)))
        assert question_payload(db, hit_id) == [
            {"class_name": "chair", "id": public_id, "image_url": image_url(public_id)}
            for public_id, _, _ in rows
        ]
        assert sum(kind is QuestionKind.GOLD for _, kind, _ in rows) == gold_per_hit
