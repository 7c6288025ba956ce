"""A HIT's questions as arrays of its row (:mod:`service.crowd.questions`): ids, public ids and
the round trip through both databases."""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from service.crowd import questions
from service.models import Hit, QuestionKind, QuestionStatus


def test_question_ids_pack_the_hit_and_the_position():
    assert questions.hit_of(questions.question_id(123_456, 54)) == (123_456, 54)
    last = questions.MAX_PER_HIT - 1
    assert questions.hit_of(questions.question_id(1, last)) == (1, last)
    # Distinct for every (HIT, position) a campaign can make (at most 1,100 questions per HIT).
    assert questions.MAX_PER_HIT >= 1_100
    ids = {questions.question_id(h, p) for h in (1, 2, 3) for p in range(questions.MAX_PER_HIT)}
    assert len(ids) == 3 * questions.MAX_PER_HIT


def test_public_ids_are_the_hit_id_and_a_url_safe_position():
    hit = "AaIC_wTyIU9daF4dAJizQ4_U"
    pids = [questions.public_id(hit, p) for p in range(questions.MAX_PER_HIT)]
    assert len(set(pids)) == len(pids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{26}", pid) for pid in pids)
    assert [questions.split_public_id(pid) for pid in pids[:3]] == [(hit, 0), (hit, 1), (hit, 2)]
    assert questions.split_public_id(pids[-1]) == (hit, questions.MAX_PER_HIT - 1)
    # Not a HIT question's id: a qualification question's (24 characters), or an unknown code.
    for other in (hit, hit + "A", hit + "~~", hit + "__"):
        assert questions.split_public_id(other) is None, other


def _hit(session: Session, public_id: str) -> Hit:
    """A HIT of three questions: a gold question between two samples of cluster 5."""
    hit = Hit(
        campaign_id=1,
        cost_micros=0,
        public_id=public_id,
        question_cluster_ids=[5, None, 5],
        question_tree_ids=[3, None, 3],
        question_leaf_pos=[40, None, 41],
        question_gold_item_ids=[None, 7, None],
        question_statuses=["open", "open", "open"],
    )
    session.add(hit)
    session.flush()
    return hit


def test_questions_survive_the_database_and_change_status_once(session):
    hit = _hit(session, "questions-round-trip-001")
    other = _hit(session, "questions-round-trip-002")
    (read,) = questions.of_hits(session, [hit.id], lock=True).values()
    assert [(q.position, q.kind, q.status, q.cluster_id, q.leaf_pos) for q in read] == [
        (0, QuestionKind.SAMPLE, QuestionStatus.OPEN, 5, 40),
        (1, QuestionKind.GOLD, QuestionStatus.OPEN, None, None),
        (2, QuestionKind.SAMPLE, QuestionStatus.OPEN, 5, 41),
    ]
    assert [q.id for q in read] == [questions.question_id(hit.id, p) for p in range(3)]
    assert [q.public_id for q in read] == [questions.public_id(hit.public_id, p) for p in range(3)]
    assert questions.by_public_id(session, read[1].public_id) == read[1]
    assert questions.by_public_id(session, hit.public_id) is None  # the HIT's, not a question's
    assert questions.by_public_id(session, questions.public_id(hit.public_id, 3)) is None
    assert questions.of_ids(session, [read[2].id, questions.question_id(hit.id, 9)]) == {
        read[2].id: read[2]
    }

    gold, sample = read[1], read[2]
    changed = questions.set_statuses(
        session,
        {gold.id: QuestionStatus.ANSWERED, sample.id: QuestionStatus.DISCARDED},
    )
    assert changed == [gold, sample]  # as they were
    # Only questions still open are discarded: the answered one keeps its status.
    again = questions.set_statuses(
        session,
        {gold.id: QuestionStatus.DISCARDED, read[0].id: QuestionStatus.DISCARDED},
        only_from=QuestionStatus.OPEN,
    )
    assert [q.id for q in again] == [read[0].id]
    session.expire_all()
    assert session.get(Hit, hit.id).question_statuses == ["discarded", "answered", "discarded"]
    assert session.get(Hit, other.id).question_statuses == ["open", "open", "open"]
