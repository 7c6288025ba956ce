"""``GET /api/v1/campaigns/{cid}/timeline``: masks accepted (and rejected) over a campaign's lifetime,
for the dashboard's chart.

Decisions are attributed to a campaign by time and place: clusters of the campaign's project (and of
its round, when it has one) decided since the campaign was created. The series is bucketed in SQL
(one grouped query, whatever the number of clusters) and returned cumulative, at most ``buckets``
points, so the payload stays small for a campaign of months.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, request
from sqlalchemy import Float, cast, func, select
from sqlalchemy.orm import Session

from service.api.campaigns import owned_campaign
from service.auth import require_api_key
from service.db import get_session
from service.errors import validation_error
from service.models import Campaign, CampaignStatus, Cluster, ClusterState, Tree

bp = Blueprint("timeline", __name__, url_prefix="/api/v1/campaigns")

DEFAULT_BUCKETS = 48
MAX_BUCKETS = 500
_LIVE = (CampaignStatus.RUNNING, CampaignStatus.PAUSED)


def _epoch(session: Session, column: Any) -> Any:
    """Seconds since 1970 of a timestamp column, in the dialect at hand."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(column) - 2440587.5) * 86400.0
    return cast(func.extract("epoch", column), Float)


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back naive; they are UTC (the server default is CURRENT_TIMESTAMP).
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _buckets_arg() -> int:
    raw = request.args.get("buckets", str(DEFAULT_BUCKETS))
    try:
        buckets = int(raw)
    except ValueError:
        raise validation_error(f"buckets: {raw!r} is not an integer") from None
    if not 1 <= buckets <= MAX_BUCKETS:
        raise validation_error(f"buckets: must be between 1 and {MAX_BUCKETS}, got {buckets}")
    return buckets


def campaign_timeline(session: Session, campaign: Campaign, buckets: int) -> dict[str, Any]:
    """Cumulative accepted / rejected masks and clusters per time bucket since the campaign began."""
    decided = [
        Cluster.project_id == campaign.project_id,
        Cluster.state.in_((ClusterState.ACCEPTED, ClusterState.REJECTED)),
        Cluster.decided_at.is_not(None),
        Cluster.decided_at >= campaign.created_at,
    ]
    if campaign.round_id is not None:
        decided.append(
            Cluster.tree_id.in_(select(Tree.id).where(Tree.round_id == campaign.round_id))
        )
    start = _aware(campaign.created_at)
    last = session.scalar(select(func.max(Cluster.decided_at)).where(*decided))
    now = datetime.now(UTC)
    end = now if campaign.status in _LIVE or last is None else max(_aware(last), start)
    span = max((end - start).total_seconds(), 1.0)
    width = max(1.0, float(math.ceil(span / buckets)))
    buckets = max(1, min(buckets, math.ceil(span / width)))  # a young campaign: 1-second buckets

    index = func.floor((_epoch(session, Cluster.decided_at) - start.timestamp()) / width)
    rows = session.execute(
        select(index.label("bucket"), Cluster.state, func.sum(Cluster.size), func.count())
        .where(*decided)
        .group_by(index, Cluster.state)
    ).all()
    per_bucket = [[0, 0, 0, 0] for _ in range(buckets)]  # accepted masks/clusters, rejected ...
    for bucket, state, masks, clusters in rows:
        slot = per_bucket[min(max(int(bucket), 0), buckets - 1)]
        offset = 0 if state is ClusterState.ACCEPTED else 2
        slot[offset] += int(masks)
        slot[offset + 1] += int(clusters)

    points = []
    totals = [0, 0, 0, 0]
    for i, slot in enumerate(per_bucket):
        totals = [a + b for a, b in zip(totals, slot, strict=True)]
        moment = datetime.fromtimestamp(
            min(start.timestamp() + (i + 1) * width, end.timestamp()), UTC
        )
        points.append(
            {
                "t": moment.isoformat(),
                "accepted_masks": totals[0],
                "accepted_clusters": totals[1],
                "rejected_masks": totals[2],
                "rejected_clusters": totals[3],
            }
        )
    return {
        "campaign_id": campaign.id,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "bucket_seconds": width,
        "points": points,
    }


@bp.get("/<int:campaign_id>/timeline")
@require_api_key
def timeline(campaign_id: int):
    """Masks accepted and rejected over time (cumulative) since the campaign was created."""
    buckets = _buckets_arg()
    session = get_session()
    return jsonify(campaign_timeline(session, owned_campaign(campaign_id), buckets))
