"""The database itself refuses rows that break the domain's invariants, on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import migrate
from service.auth import create_api_key
from service.db import Database
from service.models import (
    Answer,
    Assignment,
    Backend,
    Campaign,
    Cluster,
    GoldItem,
    Hit,
    Image,
    Project,
    ProjectClass,
    QualificationAttempt,
    Question,
    QuestionKind,
    Round,
    Tree,
    Worker,
)


@pytest.fixture(scope="module")
def migrated_sqlite_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('constraints') / 'db.sqlite'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def session(request) -> Iterator[Session]:
    if request.param == "postgres":
        url = request.getfixturevalue("migrated_pg_url")
    else:
        url = request.getfixturevalue("migrated_sqlite_url")
    database = Database(url)
    with database.session() as s:
        yield s
    database.dispose()


@pytest.fixture()
def world(session: Session) -> dict:
    """A minimal valid graph of rows to break one field at a time."""
    key, _ = create_api_key(session, "owner")
    project = Project(name="p", api_key_id=key.id, params={})
    project.classes = [ProjectClass(name="chair")]
    session.add(project)
    session.flush()
    image = Image(project_id=project.id, file_name="a.jpg", uri="file:///a.jpg", width=4, height=3)
    rnd = Round(project_id=project.id, number=1)
    session.add_all([image, rnd])
    session.flush()
    tree = Tree(
        project_id=project.id,
        round_id=rnd.id,
        class_id=project.classes[0].id,
        uri="file:///t.npz",
        mask_count=10,
    )
    session.add(tree)
    session.flush()
    cluster = Cluster(
        project_id=project.id, tree_id=tree.id, node=18, lo=0, hi=10, size=10, score=0.9
    )
    campaign = Campaign(
        project_id=project.id,
        backend=Backend.LOCAL,
        budget_micros=10_000_000,
        reward_per_hit_micros=100_000,
    )
    session.add_all([cluster, campaign])
    session.flush()
    worker = Worker(backend=Backend.LOCAL, external_id=f"w-{project.id}", project_id=project.id)
    hit = Hit(campaign_id=campaign.id, cost_micros=120_000)
    session.add_all([worker, hit])
    session.flush()
    assignment = Assignment(
        hit_id=hit.id,
        worker_id=worker.id,
        public_id=f"a-{hit.id}",
        lease_expires_at=campaign.created_at,
    )
    gold = GoldItem(
        project_id=project.id,
        image_id=image.id,
        class_id=project.classes[0].id,
        rle={"size": [3, 4], "counts": "0<"},
        iou=0.9,
        expected=True,
        for_qualification=True,
    )
    session.add_all([assignment, gold])
    session.flush()
    question = Question(
        public_id=f"q-{hit.id}", kind=QuestionKind.QUALIFICATION, gold_item_id=gold.id
    )
    session.add(question)
    session.flush()
    session.commit()
    return {
        "project": project,
        "tree": tree,
        "cluster": cluster,
        "campaign": campaign,
        "worker": worker,
        "assignment": assignment,
        "gold": gold,
        "question": question,
        "hit": hit,
    }


def _rejected(session: Session, action) -> None:
    with pytest.raises(IntegrityError):
        action()
        session.flush()
    session.rollback()


def test_valid_world_is_accepted(session, world):
    assert world["cluster"].id is not None


def test_negative_budget_rejected(session, world):
    campaign = Campaign(
        project_id=world["project"].id,
        backend=Backend.LOCAL,
        budget_micros=-1,
        reward_per_hit_micros=0,
    )
    _rejected(session, lambda: session.add(campaign))


def test_overspend_rejected(session, world):
    campaign_id = world["campaign"].id

    def overspend():
        session.execute(
            update(Campaign)
            .where(Campaign.id == campaign_id)
            .values(reserved_micros=6_000_000, spent_micros=4_000_001)
        )

    _rejected(session, overspend)
    # exactly the budget is fine
    session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(reserved_micros=6_000_000, spent_micros=4_000_000)
    )
    session.flush()
    session.rollback()


def test_duplicate_qualification_answer_rejected(session, world):
    attempt = QualificationAttempt(worker_id=world["worker"].id)
    session.add(attempt)
    session.flush()

    def answer():
        return Answer(
            question_id=world["question"].id,
            qualification_attempt_id=attempt.id,
            worker_id=world["worker"].id,
            value=True,
            ms=900,
        )

    session.add(answer())
    session.commit()
    _rejected(session, lambda: session.add(answer()))


@pytest.mark.parametrize(("lo", "hi"), [(5, 5), (6, 5), (-1, 3)])
def test_bad_cluster_range_rejected(session, world, lo, hi):
    cluster = Cluster(
        project_id=world["project"].id,
        tree_id=world["tree"].id,
        node=99,
        lo=lo,
        hi=hi,
        size=hi - lo,
        score=0.5,
    )
    _rejected(session, lambda: session.add(cluster))


def test_cluster_size_must_match_range(session, world):
    cluster = Cluster(
        project_id=world["project"].id,
        tree_id=world["tree"].id,
        node=98,
        lo=0,
        hi=4,
        size=3,
        score=0.5,
    )
    _rejected(session, lambda: session.add(cluster))


def test_cluster_project_must_match_tree(session, world):
    key, _ = create_api_key(session, "other")
    other = Project(name="other", api_key_id=key.id, params={})
    session.add(other)
    session.flush()
    cluster = Cluster(
        project_id=other.id, tree_id=world["tree"].id, node=97, lo=0, hi=2, size=2, score=0.5
    )
    _rejected(session, lambda: session.add(cluster))


_GOLD_FIELDS = ("project_id", "image_id", "class_id", "rle", "iou", "expected")


@pytest.mark.parametrize(
    ("kind", "gold"),
    [
        # A HIT's questions are arrays of its HIT row (migration 0006), never rows here.
        (QuestionKind.SAMPLE, "existing"),
        (QuestionKind.GOLD, "existing"),
        (QuestionKind.QUALIFICATION, "missing"),
        (QuestionKind.QUALIFICATION, "none"),
        (QuestionKind.QUALIFICATION, "asked"),  # world["question"] is this item's question
    ],
    ids=["sample", "gold", "unknown-gold-item", "no-gold-item", "second-for-the-item"],
)
def test_questions_are_qualification_questions_of_a_gold_item(session, world, kind, gold):
    other = GoldItem(**{c: getattr(world["gold"], c) for c in _GOLD_FIELDS})
    session.add(other)
    session.flush()  # an item without a question: only the case's own fault is refused
    gold_item_id = {"existing": other.id, "missing": 999_999, "none": None}.get(
        gold, world["gold"].id
    )
    question = Question(public_id="q-broken", kind=kind, gold_item_id=gold_item_id)
    _rejected(session, lambda: session.add(question))


def test_a_question_for_an_item_without_one_is_accepted(session, world):
    other = GoldItem(**{c: getattr(world["gold"], c) for c in _GOLD_FIELDS})
    session.add(other)
    session.flush()
    session.add(
        Question(public_id="q-fine", kind=QuestionKind.QUALIFICATION, gold_item_id=other.id)
    )
    session.flush()
    session.rollback()


def test_unknown_enum_value_rejected(session, world):
    from sqlalchemy import text

    _rejected(
        session,
        lambda: session.execute(
            text("UPDATE campaigns SET status = 'bogus' WHERE id = :id"),
            {"id": world["campaign"].id},
        ),
    )


def test_blocked_worker_needs_reason(session, world):
    worker_id = world["worker"].id
    _rejected(
        session,
        lambda: session.execute(update(Worker).where(Worker.id == worker_id).values(blocked=True)),
    )


#: An assignment's answers, lined up: two positions, values and times, one discarded.
_VALID_ANSWERS = {
    "answer_positions": [5, 6],
    "answer_values": [True, False],
    "answer_ms": [900, 800],
    "answer_discard_reasons": [None, "gold 0/1"],
}


@pytest.mark.parametrize(
    "arrays",
    [
        # Each breaks one rule only (the discard reasons of the row's valid state are 2 long).
        {"answer_positions": [5, 6, 5], "answer_values": [True] * 3, "answer_ms": [900] * 3},
        {"answer_positions": [5, 7], "answer_values": [True], "answer_ms": [900, 900]},
        {"answer_positions": [5, 7], "answer_values": [True, True], "answer_ms": [900, -1]},
        {"answer_positions": None, "answer_values": [True, True], "answer_ms": None},
        {
            "answer_positions": [5, 6],
            "answer_values": [True, False],
            "answer_ms": [900, 900],
            "answer_discard_reasons": ["gold 0/1"],
        },
    ],
    ids=["question-twice", "lengths-differ", "negative-ms", "values-without-ids", "short-reasons"],
)
def test_hit_answers_that_do_not_line_up_are_rejected_on_postgres(migrated_pg_url, arrays):
    """A HIT's answers are arrays of its assignment (migration 0005): PostgreSQL itself refuses a
    question answered twice, arrays of different lengths and a negative time."""
    database = Database(migrated_pg_url)
    try:
        with database.session() as s:
            assignment = Assignment(
                hit_id=999_999,
                worker_id=999_999,
                public_id="checked",
                lease_expires_at=datetime.now(UTC),
            )
            s.add(assignment)
            s.flush()
            s.execute(
                update(Assignment).where(Assignment.id == assignment.id).values(**_VALID_ANSWERS)
            )  # lined up: accepted
            changes = {"answer_discard_reasons": None, **arrays} if len(arrays) == 3 else arrays
            _rejected(
                s,
                lambda: s.execute(
                    update(Assignment).where(Assignment.id == assignment.id).values(**changes)
                ),
            )
    finally:
        database.dispose()


_VALID_QUESTIONS = {
    "question_cluster_ids": [None, 5],
    "question_tree_ids": [None, 3],
    "question_leaf_pos": [None, 40],
    "question_gold_item_ids": [7, None],
    "question_statuses": ["open", "answered"],
}


@pytest.mark.parametrize(
    "change",
    [
        # Each breaks one rule only, against the valid gold-then-sample HIT above.
        {"question_tree_ids": [None]},
        {"question_statuses": ["open", "maybe"]},
        {"question_leaf_pos": [None, -1]},
        {"question_cluster_ids": [None, None]},
        {"question_gold_item_ids": [7, 8]},
        {"question_cluster_ids": [4, 5]},
    ],
    ids=[
        "lengths-differ",
        "unknown-status",
        "negative-leaf",
        "sample-without-cluster",
        "sample-with-gold",
        "gold-with-cluster",
    ],
)
def test_hit_questions_that_do_not_line_up_are_rejected_on_postgres(migrated_pg_url, change):
    """A HIT's questions are arrays of its row (migration 0006): PostgreSQL itself refuses arrays
    of different lengths, an unknown status, a negative leaf position and a position whose
    target does not match its kind."""
    database = Database(migrated_pg_url)
    try:
        with database.session() as s:
            hit = Hit(campaign_id=999_999, cost_micros=0, **_VALID_QUESTIONS)
            s.add(hit)
            s.flush()  # lined up: accepted
            _rejected(s, lambda: s.execute(update(Hit).where(Hit.id == hit.id).values(**change)))
    finally:
        database.dispose()


@pytest.mark.parametrize(
    ("table", "change"),
    [
        ("hits", {"question_tree_ids": [None]}),
        ("hits", {"question_statuses": ["open"]}),
        ("assignments", {"answer_values": [True]}),
        ("assignments", {"answer_ms": [900, 900, 900]}),
        ("assignments", {"answer_discard_reasons": ["gold 0/1"]}),
        ("assignments", {"answer_ms": None}),
        ("assignments", {"answer_positions": None, "answer_values": None, "answer_ms": None}),
    ],
    ids=[
        "hit-lengths-differ",
        "hit-statuses-short",
        "answer-values-short",
        "answer-ms-long",
        "discard-reasons-short",
        "answer-ms-missing",
        "reasons-without-answers",
    ],
)
def test_arrays_that_do_not_line_up_are_rejected_on_both_databases(session, world, table, change):
    """The lengths of a HIT's question arrays and of an assignment's answer arrays must agree, on
    SQLite too (migration 0008; PostgreSQL's CHECKs of 0005 and 0006 check more)."""
    model = {"hits": Hit, "assignments": Assignment}[table]
    row_id = world["hit" if table == "hits" else "assignment"].id
    lined_up = _VALID_QUESTIONS if table == "hits" else _VALID_ANSWERS
    session.execute(update(model).where(model.id == row_id).values(**lined_up))
    session.flush()  # lined up: accepted
    _rejected(
        session,
        lambda: session.execute(update(model).where(model.id == row_id).values(**change)),
    )
