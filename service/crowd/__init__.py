"""The crowd side of maskmill: money, HITs, qualification, quality control, decisions, progress.

Everything here works on a SQLAlchemy :class:`~sqlalchemy.orm.Session` and never commits: the caller
(an API view, a periodic job) owns the transaction, so one request's claim, answers, quality control,
money and propagation land atomically or not at all.

Hot paths are written as set-based SQL (one UPDATE ... RETURNING instead of a loop of row updates,
a HIT's questions as arrays of its row, its answers as arrays of its assignment's) because
the service must sustain hundreds of HIT cycles per second on a small machine.

:class:`CrowdParams` holds the per-campaign knobs of the crowd protocol (a campaign's ``params``
JSON); the verification policy itself (``N_s``, ``K_a``, ...) is the project's
:class:`~service.engine.policy.PolicyParams`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from service.models import DEFAULT_LEASE_SECONDS

__all__ = [
    "AGGREGATIONS",
    "MAX_BATCH_HITS",
    "CrowdError",
    "CrowdParams",
]

#: How redundant answers to one question are combined (``answers_per_question > 1``).
AGGREGATIONS = ("majority", "dawid_skene")


class CrowdError(Exception):
    """A refusal the caller should report to the client: ``status`` and ``code`` map to the JSON
    error body of :mod:`service.errors` (the crowd layer itself knows nothing of HTTP)."""

    def __init__(
        self, status: int, code: str, message: str, *, persist: bool = False, **details: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        #: The transaction's writes are still valid and must be committed before answering
        #: (e.g. a stale qualification attempt deleted on the way to the refusal).
        self.persist = persist
        self.details = details


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


#: Upper bound of ``hits_per_build`` and ``build_batch_hits``: a claim counts a campaign's open
#: HITs only this far (:mod:`service.crowd.fastpath`), whatever the pool's size.
MAX_BATCH_HITS = 100


@dataclass(frozen=True)
class CrowdParams:
    """Knobs of the crowd protocol; defaults follow the paper's live rounds (Sec. 6).

    Quality control: an assignment whose gold accuracy is below ``hit_min_gold_accuracy`` is
    rejected and its answers re-asked; a worker whose running gold accuracy falls below
    ``worker_min_gold_accuracy`` once ``worker_min_gold`` gold answers are in is blocked; an
    assignment answered faster than ``min_ms_per_question`` per question on average is discarded.
    Redundancy: ``answers_per_question`` workers answer every HIT, combined by ``aggregation``.
    ``hits_per_build``: samples are shuffled across groups of this many HITs, which spreads each
    cluster's samples over several HITs and workers (as the paper shuffled all samples into HITs)
    while keeping the clusters one submission touches few. ``build_batch_hits``: a claim that finds
    no open HIT builds (and reserves) this many at once, in such groups; claims arriving meanwhile
    wait for that build and take its HITs, so a batch as large as the number of workers claiming at
    once serves them all with one build. Building ahead ties up budget and takes clusters from the
    queue before they are due, so it is a small multiple of the group, not the whole campaign.
    """

    lease_seconds: int = DEFAULT_LEASE_SECONDS
    hit_lifetime_seconds: int | None = None
    hits_per_build: int = 4
    build_batch_hits: int = 16
    hit_min_gold_accuracy: float = 0.6
    worker_min_gold_accuracy: float = 0.7
    worker_min_gold: int = 10
    min_ms_per_question: int = 500
    answers_per_question: int = 1
    aggregation: str = "majority"
    qualification_items: int = 10
    qualification_pass: int = 8
    qualification_max_attempts: int = 3
    qualification_retry_seconds: int = 3600

    def __post_init__(self) -> None:
        self._check_ints()
        for name in ("hit_min_gold_accuracy", "worker_min_gold_accuracy"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.qualification_pass > self.qualification_items:
            raise ValueError(
                f"qualification_pass ({self.qualification_pass}) must be <= "
                f"qualification_items ({self.qualification_items})"
            )

    def _check_ints(self) -> None:
        minimums = {
            "lease_seconds": 10,
            "hits_per_build": 1,
            "build_batch_hits": 1,
            "worker_min_gold": 1,
            "min_ms_per_question": 0,
            "answers_per_question": 1,
            "qualification_items": 1,
            "qualification_pass": 1,
            "qualification_max_attempts": 1,
            "qualification_retry_seconds": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("hits_per_build", "build_batch_hits"):
            if getattr(self, name) > MAX_BATCH_HITS:
                raise ValueError(f"{name} must be <= {MAX_BATCH_HITS}, got {getattr(self, name)}")
        if self.answers_per_question > 100:
            raise ValueError(
                f"answers_per_question must be <= 100, got {self.answers_per_question}"
            )
        lifetime = self.hit_lifetime_seconds
        if lifetime is not None and (not _is_int(lifetime) or lifetime < 60):
            raise ValueError(
                f"hit_lifetime_seconds must be null or an integer >= 60, got {lifetime!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CrowdParams:
        """Validated params from a campaign's JSON; unknown keys raise (a typo must not pass)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"crowd params must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown campaign parameter(s): {', '.join(map(str, unknown))}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
