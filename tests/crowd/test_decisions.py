"""Decisions and propagation: the live service reaches the engine's decisions for the same answers.

The reference is :func:`service.engine.runner.run_search`. Trees are built so that the outcome of
every cluster does not depend on which masks happen to be sampled (pure clusters, and mixed ones too
balanced for any sample to accept or reject), so the service and the runner -- which draw different
samples -- must agree exactly on the accepted and rejected ranges.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from service.crowd.decisions import dawid_skene, majority
from service.engine.policy import PolicyParams
from service.engine.runner import run_search
from service.models import Cluster, ClusterState, QuestionKind, QuestionStatus
from tests.crowd.world import (
    add_gold,
    add_tree,
    block_world,
    do_hit,
    invite,
    make_world,
    qualify_directly,
    ranges,
)
from tests.helpers import hit_answers, hit_questions


def _as_set(array: np.ndarray) -> set[tuple[int, int]]:
    return {(int(lo), int(hi)) for lo, hi in array.tolist()}


@pytest.mark.parametrize(
    ("variant", "reuse", "path"),
    [
        ("paper", True, "fast"),
        ("curtailed", True, "fast"),
        ("paper", False, "fast"),
        ("paper", True, "portable"),
        ("curtailed", False, "portable"),
    ],
)
def test_live_decisions_equal_the_engine(client, db, monkeypatch, variant, reuse, path):
    """Both implementations of the hot path (PostgreSQL's fast path and the portable code that
    SQLite and every unusual case use) reach the engine's decisions."""
    if path == "portable":
        monkeypatch.setattr("service.crowd.fastpath.available", lambda _session: False)
    params = {"variant": variant, "reuse_parent_answers": reuse}
    world = make_world(client, db, params, name=f"eq-{variant}-{reuse}-{path}")
    scores, truth = block_world("GLBLMLGL")
    add_tree(db, world, scores, truth)
    add_gold(db, world, [True, False])
    worker = invite(client, world)
    qualify_directly(db, worker["worker_id"])
    world.campaign(client, questions_per_hit=20, gold_per_hit=2)

    hits = 0
    while do_hit(client, db, world, worker["token"]) is not None:
        hits += 1
        assert hits < 50, "the campaign never ran out of work"

    reference = run_search(
        world.tree,
        lambda positions: truth[positions],
        PolicyParams.from_dict(params),
        rng=np.random.default_rng(7),
    )
    assert ranges(db, world, ClusterState.ACCEPTED) == _as_set(reference.accepted)
    assert ranges(db, world, ClusterState.REJECTED) == _as_set(reference.rejected)
    assert ranges(db, world, ClusterState.AUTO_REJECTED) == _as_set(reference.auto_rejected)
    assert _as_set(reference.accepted) == {(0, 16), (64, 72), (96, 112)}
    assert _as_set(reference.rejected) == {(32, 48), (72, 80)}
    # Nothing is left to ask and the campaign says so.
    left = db.scalar(
        select(func.count()).where(
            Cluster.tree_id == world.tree_id,
            Cluster.state.in_([ClusterState.CANDIDATE, ClusterState.ACTIVE]),
        )
    )
    assert left == 0
    open_left = db.scalar(
        select(func.sum(Cluster.open_questions)).where(Cluster.tree_id == world.tree_id)
    )
    assert open_left == 0


def test_split_children_inherit_the_parent_answers(client, db):
    """With reuse, the mixed block's children start from the parent's answers in their range:
    the two children together are asked only about the one mask the parent did not sample."""
    world = make_world(client, db, {"reuse_parent_answers": True}, name="reuse")
    scores, truth = block_world("MLLL")
    add_tree(db, world, scores, truth)
    worker = invite(client, world)
    qualify_directly(db, worker["worker_id"])
    world.campaign(client, questions_per_hit=50, gold_per_hit=0)
    while do_hit(client, db, world, worker["token"]) is not None:
        pass
    asked = len(hit_questions(db, tree_id=world.tree_id, kind=QuestionKind.SAMPLE))
    assert asked == 16  # 15 samples of the 16-mask block, then the one it missed
    children = db.execute(
        select(Cluster.lo, Cluster.yes_count, Cluster.no_count, Cluster.state).where(
            Cluster.tree_id == world.tree_id, Cluster.size == 8, Cluster.lo.in_([0, 8])
        )
    ).all()
    assert sorted((lo, y + n, s) for lo, y, n, s in children) == [
        (0, 8, ClusterState.ACCEPTED),
        (8, 8, ClusterState.REJECTED),
    ]
    # Every answered question was counted exactly once for the cluster it was asked about.
    in_tree = {q.id for q in hit_questions(db, tree_id=world.tree_id)}
    answers = sum(a.question_id in in_tree for a in hit_answers(db))
    answered = len(hit_questions(db, tree_id=world.tree_id, status=QuestionStatus.ANSWERED))
    assert answers == answered == 16


def test_majority_ties_are_not_guessed():
    assert majority([True, True, False]) is True
    assert majority([False, False, True]) is False
    assert majority([True, False]) is None
    assert majority([]) is None


def test_dawid_skene_trusts_workers_that_agree_with_gold():
    """Two reliable workers and one that always says the opposite: majority would follow the
    liar wherever a reliable worker slips; Dawid-Skene learns the liar's confusion matrix from
    gold and recovers the truth on every item."""
    rng = np.random.default_rng(0)
    truth = {i: bool(rng.integers(0, 2)) for i in range(60)}
    gold = {i: truth[i] for i in range(10)}
    answers = []
    for item, label in truth.items():
        answers.append((item, 1, label if item % 7 else not label))  # good, slips 1 in 7
        answers.append((item, 2, label if item % 5 else not label))  # good, slips 1 in 5
        answers.append((item, 3, not label))  # adversarial
    post = dawid_skene(answers, gold)
    labels = {i: p > 0.5 for i, p in post.items()}
    assert labels == truth
    assert all(post[i] in (0.0, 1.0) for i in gold)  # gold stays clamped


def test_dawid_skene_without_gold_matches_unanimous_votes():
    post = dawid_skene([(1, 1, True), (1, 2, True), (2, 1, False), (2, 2, False)])
    assert post[1] > 0.5 > post[2]


def _redundant_world(client, db, name: str, aggregation: str):
    world = make_world(client, db, name=name)
    scores, truth = block_world("GLGL")
    add_tree(db, world, scores, truth)
    add_gold(db, world, [True, False, True, False, True])
    world.campaign(
        client,
        questions_per_hit=15,
        gold_per_hit=5,
        params={
            "answers_per_question": 2,
            "aggregation": aggregation,
            "hits_per_build": 1,
            "hit_min_gold_accuracy": 0.0,
            "worker_min_gold_accuracy": 0.0,
        },
    )
    honest, liar = invite(client, world), invite(client, world)
    for worker in (honest, liar):
        qualify_directly(db, worker["worker_id"])
    first = do_hit(client, db, world, honest["token"])
    second = do_hit(client, db, world, liar["token"], answerer=lambda _q, right: not right)
    assert first["questions"] == second["questions"]  # both answered the same HIT
    return first


def test_redundant_answers_tied_by_majority_are_asked_again(client, db):
    hit = _redundant_world(client, db, "majority2", "majority")
    samples = hit_questions(
        db, public_id=[q["id"] for q in hit["questions"]], kind=QuestionKind.SAMPLE
    )
    assert len(samples) == 15 and {q.status for q in samples} == {QuestionStatus.DISCARDED}
    sample_ids = {q.id for q in samples}
    reasons = [a.discard_reason for a in hit_answers(db) if a.question_id in sample_ids]
    assert len(reasons) == 30 and all("tied" in r for r in reasons)
    (cluster,) = db.scalars(select(Cluster).where(Cluster.id == samples[0].cluster_id)).all()
    assert cluster.state == ClusterState.CANDIDATE and cluster.yes_count + cluster.no_count == 0


def test_dawid_skene_recovers_the_truth_from_gold_when_votes_tie(client, db):
    """Two workers, one of whom inverts every answer: majority can only tie, but gold shows which
    worker is reliable and Dawid-Skene labels every sample as the honest worker did."""
    hit = _redundant_world(client, db, "ds2", "dawid_skene")
    samples = hit_questions(
        db, public_id=[q["id"] for q in hit["questions"]], kind=QuestionKind.SAMPLE
    )
    assert {q.status for q in samples} == {QuestionStatus.ANSWERED}
    (cluster,) = db.scalars(select(Cluster).where(Cluster.id == samples[0].cluster_id)).all()
    assert cluster.state == ClusterState.ACCEPTED and cluster.yes_count == 15
    sample_ids = {q.id for q in samples}
    outvoted = [
        a.discard_reason for a in hit_answers(db) if a.question_id in sample_ids and a.discarded
    ]
    assert len(outvoted) == 15 and all("dawid_skene" in r for r in outvoted)
