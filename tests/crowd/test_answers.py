"""A HIT's answers as arrays of its assignment row (:mod:`service.crowd.answers`): appending,
discarding, and the round trip through PostgreSQL arrays and SQLite's JSON lists."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from service.crowd import answers as stored_answers
from service.crowd.answers import AnswerSet, StoredAnswer
from service.crowd.questions import question_id
from service.models import Assignment


def test_appending_keeps_the_order_and_the_discards():
    first = AnswerSet().appended([(7, True, 900), (3, False, 800)])
    assert list(first) == [StoredAnswer(7, True, 900, None), StoredAnswer(3, False, 800, None)]
    marked = first.discarded({3}, "gold 0/1")
    assert marked is not None and [a.valid for a in marked] == [True, False]
    more = marked.appended([(5, True, 700)])
    assert [(a.question_id, a.discard_reason) for a in more] == [
        (7, None),
        (3, "gold 0/1"),
        (5, None),
    ]
    assert [a.question_id for a in more.valid()] == [7, 5]


def test_a_discard_marks_only_valid_answers_and_reports_no_change():
    answers = AnswerSet().appended([(1, True, 500), (2, True, 500)]).discarded({1}, "first")
    assert answers.discarded({1}, "second") is None  # already discarded: its reason stays
    everything = answers.discarded(None, "lease expired")
    assert [a.discard_reason for a in everything] == ["first", "lease expired"]
    assert AnswerSet().discarded(None, "anything") is None


def test_no_answers_read_as_an_empty_set():
    empty = AnswerSet.of(1, (None, None, None, None))
    assert (
        len(empty) == 0 and list(empty) == [] and empty.columns()["answer_discard_reasons"] is None
    )


def test_answers_survive_the_database_in_order_with_their_reasons(session):
    """Both backends give back the lists that were stored: booleans as booleans, a missing
    discard reason as ``None``, the order of storing."""
    now = datetime.now(UTC)
    rows = [
        Assignment(hit_id=1, worker_id=n, public_id=f"answers-{n}", lease_expires_at=now)
        for n in (1, 2)
    ]
    session.add_all(rows)
    session.flush()
    one, two = (row.id for row in rows)
    q30, q10, q20 = (question_id(1, position) for position in (30, 10, 20))
    stored = AnswerSet().appended([(q30, True, 900), (q10, False, 800), (q20, True, 700)])
    stored_answers.store(session, one, stored)
    stored_answers.store(session, two, AnswerSet().appended([(q10, True, 600)]))
    assert stored_answers.discard(session, {one: {q10}, two: None}, "worker blocked: test") == 2
    assert stored_answers.discard(session, {one: {q10}}, "again") == 0
    loaded = stored_answers.load(session, [two, one], lock=True)
    assert list(loaded[one]) == [
        StoredAnswer(q30, True, 900, None),
        StoredAnswer(q10, False, 800, "worker blocked: test"),
        StoredAnswer(q20, True, 700, None),
    ]
    assert list(loaded[two]) == [StoredAnswer(q10, True, 600, "worker blocked: test")]
    by_hit = stored_answers.of_hits(session, [1])
    assert [(h.assignment_id, len(h.answers)) for h in by_hit if h.assignment_id in (one, two)] == [
        (one, 3),
        (two, 1),
    ]
    raw = session.execute(
        select(
            Assignment.answer_positions,
            Assignment.answer_values,
            Assignment.answer_discard_reasons,
        ).where(Assignment.id == one)
    ).one()
    # The rows hold the questions' positions in the HIT (migration 0006).
    assert tuple(raw) == ([30, 10, 20], [True, False, True], [None, "worker blocked: test", None])
    # An assignment without answers holds SQL NULLs, not JSON ``null`` (SQLite).
    session.add(Assignment(hit_id=2, worker_id=1, public_id="answers-3", lease_expires_at=now))
    session.flush()
    assert stored_answers.of_hits(session, [2]) == []
