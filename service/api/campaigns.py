"""Campaigns: a budget, a backend and HIT settings; pause / resume / stop; progress.

A key sees only its own projects' campaigns: another key's campaign answers 404, exactly like a
missing one.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from flask import Blueprint, g, jsonify
from pydantic import Field
from sqlalchemy import select, update

from service.api.projects import owned_project
from service.api.validation import Body, accepts, parse
from service.auth import require_api_key
from service.crowd import CrowdParams, money
from service.crowd.hits import load_campaign, retire_hits
from service.crowd.progress import campaign_json, progress
from service.db import get_session
from service.errors import conflict, not_found, validation_error
from service.models import (
    MICROS_PER_USD,
    Backend,
    Campaign,
    CampaignStatus,
    HitStatus,
    Project,
    Round,
)

bp = Blueprint("campaigns", __name__, url_prefix="/api/v1")

#: Largest budget accepted (10 million USD): far above any real campaign, far below BigInteger.
MAX_BUDGET_USD = 10_000_000


class CampaignCreate(Body):
    budget_usd: float = Field(ge=0, le=MAX_BUDGET_USD)
    backend: Literal["local", "mturk"]
    reward_per_hit_usd: float = Field(ge=0, le=1000)
    questions_per_hit: int = Field(default=50, ge=1, le=1000)
    gold_per_hit: int = Field(default=5, ge=0, le=100)
    round_id: int | None = Field(default=None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


def to_micros(usd: float) -> int:
    """Exact conversion of a decimal amount as written (``0.1`` is 100000, not 99999)."""
    return int((Decimal(repr(float(usd))) * MICROS_PER_USD).to_integral_value())


def owned_campaign(campaign_id: int) -> Campaign:
    """The caller's campaign, or 404 (another key's campaign is reported like a missing one)."""
    campaign = get_session().scalar(
        select(Campaign)
        .join(Project, Project.id == Campaign.project_id)
        .where(Campaign.id == campaign_id, Project.api_key_id == g.api_key.id)
    )
    if campaign is None:
        raise not_found(f"campaign {campaign_id}")
    return campaign


def _crowd_params(raw: dict[str, Any]) -> CrowdParams:
    try:
        return CrowdParams.from_dict(raw)
    except ValueError as exc:
        raise validation_error(f"params: {exc}") from None


@bp.post("/projects/<int:project_id>/campaigns")
@require_api_key
@accepts(CampaignCreate)
def create_campaign(project_id: int):
    """Launch a campaign with a budget on a project (it starts running at once)."""
    body = parse(CampaignCreate)
    project = owned_project(project_id)
    crowd = _crowd_params(body.params)
    session = get_session()
    if body.round_id is not None:
        round_ = session.get(Round, body.round_id)
        if round_ is None or round_.project_id != project.id:
            raise validation_error(
                f"round_id: round {body.round_id} is not a round of this project"
            )
    campaign = Campaign(
        project_id=project.id,
        round_id=body.round_id,
        backend=Backend(body.backend),
        status=CampaignStatus.RUNNING,
        budget_micros=to_micros(body.budget_usd),
        reserved_micros=0,
        spent_micros=0,
        reward_per_hit_micros=to_micros(body.reward_per_hit_usd),
        questions_per_hit=body.questions_per_hit,
        gold_per_hit=body.gold_per_hit,
        assignments_per_hit=crowd.answers_per_question,
        params=crowd.to_dict(),
    )
    session.add(campaign)
    session.flush()
    cost = money.hit_cost(
        campaign.reward_per_hit_micros, campaign.assignments_per_hit, campaign.backend
    )
    money.mark_exhausted(session, campaign.id, cost)
    session.commit()
    session.refresh(campaign)
    out = campaign_json(campaign)
    out["hit_cost_usd"] = cost / MICROS_PER_USD
    return jsonify(out), 201


@bp.get("/projects/<int:project_id>/campaigns")
@require_api_key
def list_campaigns(project_id: int):
    """The project's campaigns, oldest first."""
    project = owned_project(project_id)
    campaigns = get_session().scalars(
        select(Campaign).where(Campaign.project_id == project.id).order_by(Campaign.id)
    )
    return jsonify({"campaigns": [campaign_json(c) for c in campaigns]})


@bp.get("/campaigns/<int:campaign_id>")
@require_api_key
def get_campaign(campaign_id: int):
    """A campaign's progress: status, money, questions, clusters, masks and workers."""
    campaign = owned_campaign(campaign_id)
    return jsonify(progress(get_session(), campaign.id))


def _set_status(campaign_id: int, allowed: tuple[CampaignStatus, ...], to: CampaignStatus) -> None:
    """A conditional UPDATE, so a concurrent change cannot be overwritten blindly."""
    session = get_session()
    changed = session.execute(
        update(Campaign.__table__)
        .where(Campaign.id == campaign_id, Campaign.status.in_(allowed))
        .values(status=to)
        .returning(Campaign.id)
    ).first()
    if changed is None:
        session.rollback()
        current = owned_campaign(campaign_id).status
        raise conflict(f"a {current} campaign cannot become {to.value}", current=str(current))


@bp.post("/campaigns/<int:campaign_id>/pause")
@require_api_key
def pause_campaign(campaign_id: int):
    """Stop offering work for now; reservations and open HITs are kept."""
    owned_campaign(campaign_id)
    _set_status(
        campaign_id, (CampaignStatus.RUNNING, CampaignStatus.EXHAUSTED), CampaignStatus.PAUSED
    )
    get_session().commit()
    return jsonify(progress(get_session(), campaign_id))


@bp.post("/campaigns/<int:campaign_id>/resume")
@require_api_key
def resume_campaign(campaign_id: int):
    """Offer work again after a pause (or after new clusters arrived for a finished campaign)."""
    owned_campaign(campaign_id)
    _set_status(
        campaign_id, (CampaignStatus.PAUSED, CampaignStatus.FINISHED), CampaignStatus.RUNNING
    )
    session = get_session()
    info = load_campaign(session, campaign_id)
    money.mark_exhausted(session, campaign_id, info.hit_cost)
    session.commit()
    return jsonify(progress(session, campaign_id))


@bp.post("/campaigns/<int:campaign_id>/stop")
@require_api_key
def stop_campaign(campaign_id: int):
    """Stop for good. Two transactions: the status first (no new work is offered from then on),
    then the open HITs are cancelled and their reservations released, taking locks in the order
    every other writer does (HITs, clusters, campaign)."""
    owned_campaign(campaign_id)
    _set_status(
        campaign_id,
        (
            CampaignStatus.RUNNING,
            CampaignStatus.PAUSED,
            CampaignStatus.EXHAUSTED,
            CampaignStatus.FINISHED,
        ),
        CampaignStatus.STOPPED,
    )
    session = get_session()
    session.commit()
    released = retire_hits(session, load_campaign(session, campaign_id), None, HitStatus.CANCELLED)
    session.commit()
    out = progress(session, campaign_id)
    out["released_usd"] = released / MICROS_PER_USD
    return jsonify(out)
