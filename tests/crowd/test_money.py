"""Money: costs with MTurk's fees, and reserve / release / spend against the budget -- including
sixteen concurrent reservations on real PostgreSQL, which must never overspend."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from service.auth import create_api_key
from service.crowd import money
from service.db import Database
from service.models import Backend, Campaign, CampaignStatus, LedgerEntry, Project


def test_costs_follow_mturk_fees():
    assert money.fee_percent("local", 1) == 0
    assert money.fee_percent("mturk", 9) == 20
    assert money.fee_percent(Backend.MTURK, 10) == 40
    assert money.assignment_cost(100_000, 1, "mturk") == 120_000
    assert money.hit_cost(100_000, 3, "mturk") == 360_000
    assert money.hit_cost(100_000, 10, "mturk") == 1_400_000
    assert money.hit_cost(100_000, 3, "local") == 300_000
    # Fees round up to a whole micro-dollar and the HIT cost is a whole number of assignments.
    assert money.assignment_cost(1, 1, "mturk") == 2
    assert money.hit_cost(7, 4, "mturk") == 4 * money.assignment_cost(7, 4, "mturk")
    with pytest.raises(ValueError, match="reward"):
        money.assignment_cost(-1, 1, "local")
    with pytest.raises(ValueError, match="assignment"):
        money.hit_cost(1, 0, "local")


@pytest.fixture(scope="module")
def database(migrated_pg_url: str) -> Iterator[Database]:
    db = Database(migrated_pg_url)
    yield db
    db.dispose()


def _campaign(database: Database, budget: int, status=CampaignStatus.RUNNING) -> int:
    with database.session() as session:
        key, _ = create_api_key(session, "money")
        project = Project(name="money", api_key_id=key.id, params={})
        session.add(project)
        session.flush()
        campaign = Campaign(
            project_id=project.id,
            backend=Backend.LOCAL,
            status=status,
            budget_micros=budget,
            reserved_micros=0,
            spent_micros=0,
            reward_per_hit_micros=100,
        )
        session.add(campaign)
        session.commit()
        return campaign.id


def test_reserve_release_spend_and_the_ledger(database):
    cid = _campaign(database, budget=1_000)
    with database.session() as s:
        assert money.reserve(s, cid, 400, [None], next_hit_cost=400)
        assert money.reserve(s, cid, 400, [None], next_hit_cost=400)
        # 200 left cannot pay for another HIT: exhausted in the same statement.
        assert money.funds(s, cid).status is CampaignStatus.EXHAUSTED
        assert not money.reserve(s, cid, 100, [None], next_hit_cost=400)
        money.spend(s, cid, 400, hit_id=None, note="approved")
        money.release(s, cid, 400, hit_id=None, note="rejected", next_hit_cost=400)
        funds = money.funds(s, cid)
        assert (funds.reserved, funds.spent, funds.available) == (0, 400, 600)
        assert funds.status is CampaignStatus.RUNNING  # money came back: work can resume
        with pytest.raises(money.MoneyError):
            money.spend(s, cid, 1, hit_id=None, note="nothing reserved")
        s.commit()
    with database.session() as s:
        ledger = dict(
            s.execute(
                select(LedgerEntry.kind, func.sum(LedgerEntry.amount_micros))
                .where(LedgerEntry.campaign_id == cid)
                .group_by(LedgerEntry.kind)
            ).all()
        )
    assert ledger == {"reserve": 800, "spend": 400, "release": 400}


def test_a_paused_campaign_reserves_nothing(database):
    cid = _campaign(database, budget=1_000, status=CampaignStatus.PAUSED)
    with database.session() as s:
        assert not money.reserve(s, cid, 1, [None], next_hit_cost=1)
        assert not money.mark_exhausted(s, cid, 10_000)  # only running campaigns are flagged


def test_concurrent_reservations_never_overspend(database):
    cid = _campaign(database, budget=10_000)
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def grab() -> None:
        with database.session() as s:
            barrier.wait()
            for _ in range(3):
                ok = money.reserve(s, cid, 700, [None], next_hit_cost=700)
                s.commit()
                results.append(ok)

    threads = [threading.Thread(target=grab) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 10_000 // 700
    with database.session() as s:
        funds = money.funds(s, cid)
        reserved_in_ledger = s.scalar(
            select(func.sum(LedgerEntry.amount_micros)).where(LedgerEntry.campaign_id == cid)
        )
    assert funds.reserved == reserved_in_ledger == 14 * 700 <= funds.budget
    assert funds.status is CampaignStatus.EXHAUSTED
