"""A campaign's money: reserve before a HIT is offered, release what will not be paid, spend on
approval -- each one conditional UPDATE of the campaign row plus one ledger row.

Why a single conditional UPDATE: ``UPDATE campaigns SET reserved = reserved + cost WHERE
reserved + spent + cost <= budget AND status = 'running' RETURNING ...`` is atomic in PostgreSQL
(the row lock makes concurrent reservations queue and re-check the condition on the newest row), so
no interleaving of requests can overspend; the table's CHECK (``reserved + spent <= budget``) is the
second line of defence. The UPDATE is issued last in a transaction, so the hot campaign row is locked
only for the time it takes to commit.

Costs follow Amazon Mechanical Turk: a 20% fee on reward, 40% for HITs with 10 or more assignments.
A ``local`` campaign pays its in-house team directly, so it carries no fee.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Integer,
    Text,
    Update,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from service.models import Backend, Campaign, CampaignStatus, LedgerEntry, LedgerKind

__all__ = [
    "Funds",
    "MoneyError",
    "assignment_cost",
    "fee_percent",
    "funds",
    "hit_cost",
    "mark_exhausted",
    "release",
    "reserve",
    "spend",
]

MTURK_FEE_PERCENT = 20
MTURK_LARGE_FEE_PERCENT = 40
#: MTurk charges the higher fee on HITs with this many assignments or more.
MTURK_LARGE_HIT_ASSIGNMENTS = 10

_C = Campaign.__table__
_LEDGER = LedgerEntry.__table__


class MoneyError(RuntimeError):
    """A release or spend found less reserved money than it moves: a bookkeeping bug, never a
    user error, so it aborts the transaction."""


@dataclass(frozen=True)
class Funds:
    budget: int
    reserved: int
    spent: int
    status: CampaignStatus

    @property
    def available(self) -> int:
        return self.budget - self.reserved - self.spent


def fee_percent(backend: Backend | str, assignments: int) -> int:
    """The marketplace fee on a HIT, in percent of the reward."""
    if Backend(backend) is Backend.LOCAL:
        return 0
    if assignments >= MTURK_LARGE_HIT_ASSIGNMENTS:
        return MTURK_LARGE_FEE_PERCENT
    return MTURK_FEE_PERCENT


def assignment_cost(reward_micros: int, assignments: int, backend: Backend | str) -> int:
    """What one approved assignment costs: reward plus fee, rounded up to a whole micro-dollar."""
    if reward_micros < 0:
        raise ValueError(f"reward must be >= 0 micro-dollars, got {reward_micros}")
    if assignments < 1:
        raise ValueError(f"a HIT needs at least one assignment, got {assignments}")
    fee = -((-reward_micros * fee_percent(backend, assignments)) // 100)
    return reward_micros + fee


def hit_cost(reward_micros: int, assignments: int, backend: Backend | str) -> int:
    """Reward x assignments x (1 + fee): what a HIT reserves. A whole multiple of the assignment
    cost, so paying or releasing assignment by assignment leaves nothing behind."""
    return assignment_cost(reward_micros, assignments, backend) * assignments


def funds(session: Session, campaign_id: int) -> Funds:
    row = session.execute(
        select(_C.c.budget_micros, _C.c.reserved_micros, _C.c.spent_micros, _C.c.status).where(
            _C.c.id == campaign_id
        )
    ).one()
    return Funds(row[0], row[1], row[2], CampaignStatus(row[3]))


Movement = tuple[int | None, int, str]  # (hit id, amount, note): one ledger row

_AMOUNT = bindparam("amount", type_=BigInteger)
_NEXT = bindparam("next_cost", type_=BigInteger)
_LEFT = _C.c.budget_micros - _C.c.reserved_micros - _C.c.spent_micros

_RESERVE = (
    update(_C)
    .where(
        _C.c.id == bindparam("cid"),
        _C.c.status == CampaignStatus.RUNNING,
        _C.c.reserved_micros + _C.c.spent_micros + _AMOUNT <= _C.c.budget_micros,
    )
    .values(
        reserved_micros=_C.c.reserved_micros + _AMOUNT,
        status=case((_LEFT - _AMOUNT < _NEXT, CampaignStatus.EXHAUSTED.value), else_=_C.c.status),
    )
)
_RELEASE = (
    update(_C)
    .where(_C.c.id == bindparam("cid"), _C.c.reserved_micros >= _AMOUNT)
    .values(
        reserved_micros=_C.c.reserved_micros - _AMOUNT,
        status=case(
            (
                and_(_C.c.status == CampaignStatus.EXHAUSTED, _LEFT + _AMOUNT >= _NEXT),
                CampaignStatus.RUNNING.value,
            ),
            else_=_C.c.status,
        ),
    )
)
_SPEND = (
    update(_C)
    .where(_C.c.id == bindparam("cid"), _C.c.reserved_micros >= _AMOUNT)
    .values(
        reserved_micros=_C.c.reserved_micros - _AMOUNT,
        spent_micros=_C.c.spent_micros + _AMOUNT,
    )
)


def _with_ledger(change: Update, kind: LedgerKind):
    """PostgreSQL: the campaign UPDATE as a data-modifying CTE feeding the ledger INSERT, so a
    money movement is one statement (one round trip) on the hottest path. The ledger rows travel
    as arrays (one row per HIT)."""
    moved = change.returning(_C.c.id).cte("moved")
    rows = select(
        func.unnest(bindparam("hit_ids", type_=ARRAY(Integer))).label("hit_id"),
        func.unnest(bindparam("amounts", type_=ARRAY(BigInteger))).label("amount"),
        func.unnest(bindparam("notes", type_=ARRAY(Text))).label("note"),
    ).subquery("v")
    return (
        insert(_LEDGER)
        .from_select(
            ["campaign_id", "hit_id", "kind", "amount_micros", "note"],
            select(moved.c.id, rows.c.hit_id, literal(kind.value), rows.c.amount, rows.c.note)
            .select_from(moved)
            .join(rows, true()),
        )
        .returning(_LEDGER.c.id)
    )


_PG_MOVES = {
    LedgerKind.RESERVE: _with_ledger(_RESERVE, LedgerKind.RESERVE),
    LedgerKind.RELEASE: _with_ledger(_RELEASE, LedgerKind.RELEASE),
    LedgerKind.SPEND: _with_ledger(_SPEND, LedgerKind.SPEND),
}
_CHANGES = {LedgerKind.RESERVE: _RESERVE, LedgerKind.RELEASE: _RELEASE, LedgerKind.SPEND: _SPEND}


def _move(
    session: Session,
    kind: LedgerKind,
    campaign_id: int,
    amount: int,
    rows: Sequence[Movement],
    next_hit_cost: int = 0,
) -> bool:
    """Apply a conditional campaign UPDATE moving ``amount`` and write its ledger ``rows``;
    ``False`` if the condition refused it (nothing written)."""
    params = {"cid": campaign_id, "amount": amount, "next_cost": next_hit_cost}
    if session.get_bind().dialect.name == "postgresql":
        params.update(
            hit_ids=[r[0] for r in rows], amounts=[r[1] for r in rows], notes=[r[2] for r in rows]
        )
        return session.execute(_PG_MOVES[kind], params).first() is not None
    campaign = session.execute(_CHANGES[kind].returning(_C.c.id), params).first()
    if campaign is None:
        return False
    session.execute(
        insert(_LEDGER),
        [
            {
                "campaign_id": campaign_id,
                "hit_id": hit_id,
                "kind": kind,
                "amount_micros": value,
                "note": note,
            }
            for hit_id, value, note in rows
        ],
    )
    return True


def reserve(
    session: Session,
    campaign_id: int,
    per_hit: int,
    hit_ids: Sequence[int | None],
    *,
    next_hit_cost: int,
) -> bool:
    """Reserve ``per_hit`` for each HIT if the budget covers them all and the campaign is running;
    ``False`` (nothing reserved) otherwise. One ledger row per HIT.

    In the same statement the campaign becomes ``exhausted`` when what is left cannot pay for
    another HIT (``next_hit_cost``), so it stops building new work at once.
    """
    if per_hit < 0:
        raise ValueError(f"cannot reserve a negative amount ({per_hit})")
    if not hit_ids:
        return True
    rows = [(hit_id, per_hit, "HIT reserved") for hit_id in hit_ids]
    return _move(
        session, LedgerKind.RESERVE, campaign_id, per_hit * len(hit_ids), rows, next_hit_cost
    )


def release(
    session: Session,
    campaign_id: int,
    amount: int,
    *,
    hit_id: int | None,
    note: str,
    next_hit_cost: int,
) -> None:
    """Give reserved money back to the budget; an ``exhausted`` campaign that can again pay for a
    HIT becomes ``running`` (a rejected assignment frees money for the re-asked questions)."""
    if amount < 0:
        raise ValueError(f"cannot release a negative amount ({amount})")
    if not _move(
        session, LedgerKind.RELEASE, campaign_id, amount, [(hit_id, amount, note)], next_hit_cost
    ):
        raise MoneyError(f"campaign {campaign_id} has less than {amount} micro-dollars reserved")


def spend(
    session: Session, campaign_id: int, amount: int, *, hit_id: int | None, note: str
) -> None:
    """Move reserved money to spent (an approved assignment is paid from its HIT's reservation)."""
    if amount < 0:
        raise ValueError(f"cannot spend a negative amount ({amount})")
    if not _move(session, LedgerKind.SPEND, campaign_id, amount, [(hit_id, amount, note)]):
        raise MoneyError(f"campaign {campaign_id} has less than {amount} micro-dollars reserved")


def mark_exhausted(session: Session, campaign_id: int, next_hit_cost: int) -> bool:
    """Flag a running campaign ``exhausted`` if its budget cannot pay for another HIT."""
    row = session.execute(
        update(_C)
        .where(
            _C.c.id == campaign_id,
            _C.c.status == CampaignStatus.RUNNING,
            _C.c.budget_micros - _C.c.reserved_micros - _C.c.spent_micros < next_hit_cost,
        )
        .values(status=CampaignStatus.EXHAUSTED)
        .returning(_C.c.id)
    ).first()
    return row is not None
