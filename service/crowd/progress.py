"""A campaign's progress, as DESIGN.md's ``GET /api/v1/campaigns/{cid}`` returns it.

Every number is a SQL aggregate (a handful of GROUP BY queries), never a Python loop over rows, so
the dashboard can poll a campaign of millions of masks.

Scope: questions and workers are the campaign's own (its HITs); clusters and masks are those of the
campaign's project (of its round, if it has one), because campaigns of one project share its search.
Masks: ``accepted`` / ``rejected`` sum the sizes of decided ranges (human rejections and automatic
ones); decided ranges never nest, so the sums count each mask once. ``skipped`` masks (clusters too
small to ask about) are neither; ``pending`` is everything else.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, distinct, func, select, text
from sqlalchemy.orm import Session

from service.models import (
    MICROS_PER_USD,
    Assignment,
    Campaign,
    CampaignStatus,
    Cluster,
    ClusterState,
    Hit,
    HitStatus,
    Tree,
    Worker,
)

__all__ = ["campaign_json", "progress", "usd"]

_C = Campaign.__table__
_CL = Cluster.__table__
_T = Tree.__table__
_H = Hit.__table__
_AS = Assignment.__table__
_W = Worker.__table__


def usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)


def _cluster_counts(session: Session, project_id: int, round_id: int | None) -> dict[str, Any]:
    query = select(_CL.c.state, func.count(), func.coalesce(func.sum(_CL.c.size), 0)).group_by(
        _CL.c.state
    )
    query = query.where(_CL.c.project_id == project_id)
    if round_id is not None:
        query = query.where(_CL.c.tree_id.in_(select(_T.c.id).where(_T.c.round_id == round_id)))
    counts = {s.value: 0 for s in ClusterState}
    sizes = {s.value: 0 for s in ClusterState}
    for state, n, size in session.execute(query).all():
        counts[ClusterState(state).value] = int(n)
        sizes[ClusterState(state).value] = int(size)
    return {"counts": counts, "sizes": sizes}


def _mask_total(session: Session, project_id: int, round_id: int | None) -> int:
    query = select(func.coalesce(func.sum(_T.c.mask_count), 0)).where(_T.c.project_id == project_id)
    if round_id is not None:
        query = query.where(_T.c.round_id == round_id)
    return int(session.execute(query).scalar_one())


# A HIT's questions are arrays of its row (:mod:`service.crowd.questions`): counted in SQL, one
# element per question; a sample is a question without a gold item.
_QUESTION_COUNTS = {
    "postgresql": text(
        "SELECT count(*), count(*) FILTER (WHERE x.s = 'answered'), "
        "count(*) FILTER (WHERE x.s = 'discarded') "
        "FROM hits h, unnest(h.question_statuses, h.question_gold_item_ids) AS x(s, g) "
        "WHERE h.campaign_id = :cid AND h.status <> 'cancelled' AND x.g IS NULL"
    ),
    "sqlite": text(
        "SELECT count(*), coalesce(sum(s.value = 'answered'), 0), "
        "coalesce(sum(s.value = 'discarded'), 0) "
        "FROM hits h, json_each(h.question_statuses) AS s "
        "WHERE h.campaign_id = :cid AND h.status <> 'cancelled' "
        "AND json_extract(h.question_gold_item_ids, '$[' || s.key || ']') IS NULL"
    ),
}


def _questions(session: Session, campaign_id: int) -> dict[str, int]:
    """Sample questions put into the campaign's HITs (cancelled ones excluded) and answered."""
    query = _QUESTION_COUNTS[session.get_bind().dialect.name]
    row = session.execute(query, {"cid": campaign_id}).one()
    return {"asked": int(row[0]), "answered": int(row[1]), "discarded": int(row[2])}


def _hits(session: Session, campaign_id: int) -> dict[str, int]:
    rows = session.execute(
        select(_H.c.status, func.count())
        .where(_H.c.campaign_id == campaign_id)
        .group_by(_H.c.status)
    ).all()
    out = {s.value: 0 for s in HitStatus}
    out.update({HitStatus(s).value: int(n) for s, n in rows})
    return out


def _workers(session: Session, campaign_id: int) -> dict[str, int]:
    """Workers who took at least one of the campaign's HITs, by whether they are blocked now."""
    row = session.execute(
        select(
            func.count(distinct(case((_W.c.blocked.is_(False), _W.c.id)))),
            func.count(distinct(case((_W.c.blocked.is_(True), _W.c.id)))),
        )
        .select_from(_AS.join(_H, _H.c.id == _AS.c.hit_id).join(_W, _W.c.id == _AS.c.worker_id))
        .where(_H.c.campaign_id == campaign_id)
    ).one()
    return {"active": int(row[0]), "blocked": int(row[1])}


def campaign_json(row: Any) -> dict[str, Any]:
    """The campaign's settings (no counts): what ``POST`` and list calls return."""
    return {
        "id": row.id,
        "project_id": row.project_id,
        "round_id": row.round_id,
        "backend": str(row.backend),
        "status": str(row.status),
        "budget_usd": usd(row.budget_micros),
        "reward_per_hit_usd": usd(row.reward_per_hit_micros),
        "questions_per_hit": row.questions_per_hit,
        "gold_per_hit": row.gold_per_hit,
        "assignments_per_hit": row.assignments_per_hit,
        "params": row.params,
        "created_at": row.created_at.isoformat() if row.created_at else None,
    }


def progress(session: Session, campaign_id: int) -> dict[str, Any]:
    """DESIGN.md's progress document (plus a few extra keys: hits, exact micro-dollar amounts)."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise ValueError(f"campaign {campaign_id} does not exist")
    clusters = _cluster_counts(session, campaign.project_id, campaign.round_id)
    counts, sizes = clusters["counts"], clusters["sizes"]
    total = _mask_total(session, campaign.project_id, campaign.round_id)
    accepted = sizes[ClusterState.ACCEPTED]
    rejected = sizes[ClusterState.REJECTED] + sizes[ClusterState.AUTO_REJECTED]
    skipped = sizes[ClusterState.SKIPPED]
    out = campaign_json(campaign)
    out.update(
        {
            "status": CampaignStatus(campaign.status).value,
            "spent_usd": usd(campaign.spent_micros),
            "reserved_usd": usd(campaign.reserved_micros),
            "budget_micros": campaign.budget_micros,
            "spent_micros": campaign.spent_micros,
            "reserved_micros": campaign.reserved_micros,
            "questions": _questions(session, campaign_id),
            "clusters": counts,
            "masks": {
                "accepted": accepted,
                "rejected": rejected,
                "skipped": skipped,
                "pending": max(0, total - accepted - rejected - skipped),
                "total": total,
            },
            "workers": _workers(session, campaign_id),
            "hits": _hits(session, campaign_id),
        }
    )
    return out
