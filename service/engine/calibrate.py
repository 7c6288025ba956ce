"""Calibrating the automatic rules (``K_pr``, ``K_pa``) and the sequential prior on ground truth.

Sec. 4.3 of the paper: on a held-out set with ground truth, the quality ``Q`` of every cluster
is known, so one can estimate how likely a cluster of score ``S`` is to be of high quality,
``P_h(S) = P(Q >= K_a | S)``, or of low quality, ``P_l(S) = P(Q <= 1 - K_a | S)`` (Fig. 4c).
Below ``K_pr`` clusters are (almost) always bad and are rejected without asking; below ``K_pa``
they are (almost) never good and are split without asking.

Choices made here, and why:

* Only nodes with ``size >= N_s`` are used (as the paper): smaller clusters are never split
  automatically, and their ``Q`` is dominated by the noise of a handful of masks.
* Nodes are weighted by their size by default (``weight="size"``). The cost of a wrong
  automatic rule is the masks it throws away, not the number of clusters; and without weights
  the many nodes just above ``N_s`` would dominate every bin. ``weight="node"`` counts nodes.
* Bins are right-closed, ``(e_b, e_{b+1}]`` (the first one closed), to match the rules'
  ``S <= K``: a threshold at a bin edge covers exactly the bins below it.
* Thresholds are read off the binned curves from the low end: ``K_pr`` is the upper edge of the
  last bin of the initial run of bins with ``P_l >= 1 - eps``; ``K_pa`` likewise with
  ``P_h <= eps``. Bins with fewer than ``min_count`` nodes carry no evidence and neither extend
  nor break a run. If the very first informative bin already fails, the threshold is put just
  below every observed score, i.e. the rule never fires. Per-bin (rather than cumulative
  ``P(. | S < t)``) evaluation keeps a narrow band of good clusters from being averaged away by
  the mass of bad clusters at low scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.policy import PolicyParams

__all__ = ["Calibration", "calibrate", "node_quality", "plot_calibration"]

#: Tolerance for ``Q >= K_a``: cluster qualities are ratios of integers computed in float64,
#: which this absorbs without ever moving a ratio across a threshold (sizes < 10^10).
_Q_TOL = 1e-12

#: Bounds of the method-of-moments prior strength (pseudo-answers).
_STRENGTH_BOUNDS = (0.5, 1000.0)


def node_quality(tree: Any, correct_in_leaf_order: Any) -> np.ndarray:
    """Quality ``Q`` (share of correct masks) of every node, float64[2n - 1], via prefix sums.

    ``correct_in_leaf_order`` holds, per leaf position, 1/True for a correct mask (IoU with its
    ground truth ``>= K_iou``) and 0/False otherwise; fractional values (e.g. a soft label) are
    allowed in ``[0, 1]``.
    """
    values = np.asarray(correct_in_leaf_order)
    if values.ndim != 1 or values.shape[0] != tree.n:
        raise ValueError(f"correct_in_leaf_order must have shape ({tree.n},), got {values.shape}")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"correct_in_leaf_order must be numeric, got dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError("correct_in_leaf_order values must lie in [0, 1]")
    prefix = np.zeros(values.shape[0] + 1, dtype=np.float64)
    np.cumsum(values, out=prefix[1:])
    lo, hi = np.asarray(tree.lo), np.asarray(tree.hi)
    return (prefix[hi] - prefix[lo]) / (hi - lo)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Result of :func:`calibrate`: thresholds, the binned curves and the sequential prior.

    Per bin ``b`` (edges ``bin_edges[b]``, ``bin_edges[b+1]``): ``p_h``/``p_l`` (NaN where the
    bin holds fewer than ``min_count`` nodes), ``mean_q`` (weighted mean quality), ``count``
    (nodes) and ``weight`` (their total weight). ``prior_strength`` is a method-of-moments
    estimate of the Beta prior's strength ``E[m(1-m)] / E[Var(Q | S)] - 1``, pooled over bins;
    it is biased low (the spread of ``Q`` also contains within-cluster sampling noise), which
    errs on the side of a weaker prior.
    """

    k_pr: float
    k_pa: float
    eps: float
    k_a: float
    n_s: int
    weighting: str
    min_count: int
    bin_edges: np.ndarray
    p_h: np.ndarray
    p_l: np.ndarray
    mean_q: np.ndarray
    count: np.ndarray
    weight: np.ndarray
    n_nodes: int
    prior_strength: float | None

    @property
    def bin_centers(self) -> np.ndarray:
        return 0.5 * (self.bin_edges[:-1] + self.bin_edges[1:])

    def prior_map(self) -> tuple[tuple[float, float], ...]:
        """``(S, E[Q])`` knots (bin centres of informative bins) for ``PolicyParams.prior_map``."""
        ok = ~np.isnan(self.p_h)
        return tuple(
            (float(s), float(np.clip(q, 0.0, 1.0)))
            for s, q in zip(self.bin_centers[ok], self.mean_q[ok], strict=True)
        )

    def apply(self, params: PolicyParams, *, prior: bool = True) -> PolicyParams:
        """``params`` with the calibrated thresholds (and, if ``prior``, the sequential prior)."""
        changes: dict[str, Any] = {"k_pr": self.k_pr, "k_pa": self.k_pa}
        if prior:
            knots = self.prior_map()
            if knots:
                changes["prior_map"] = knots
            if self.prior_strength is not None:
                changes["prior_strength"] = self.prior_strength
        return replace(params, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``None``)."""

        def floats(a: np.ndarray) -> list[float | None]:
            return [None if math.isnan(x) else float(x) for x in a.tolist()]

        return {
            "k_pr": self.k_pr,
            "k_pa": self.k_pa,
            "eps": self.eps,
            "k_a": self.k_a,
            "n_s": self.n_s,
            "weighting": self.weighting,
            "min_count": self.min_count,
            "n_nodes": self.n_nodes,
            "prior_strength": self.prior_strength,
            "bin_edges": floats(self.bin_edges),
            "p_h": floats(self.p_h),
            "p_l": floats(self.p_l),
            "mean_q": floats(self.mean_q),
            "count": [int(c) for c in self.count.tolist()],
            "weight": floats(self.weight),
            "prior_map": [list(k) for k in self.prior_map()],
        }


def _as_1d(name: str, values: Any, kind: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind not in kind:
        raise ValueError(f"{name} has unsupported dtype {a.dtype}")
    return a


def calibrate(
    node_S: Any,
    node_Q: Any,
    node_size: Any,
    params: PolicyParams,
    *,
    bins: int | Any = 20,
    eps: float = 0.01,
    weight: str = "size",
    min_count: int = 5,
) -> Calibration:
    """Estimate ``P_h(S)``, ``P_l(S)`` and choose ``K_pr``, ``K_pa`` (see the module docstring).

    ``node_S``, ``node_Q``, ``node_size``: per node of one or more held-out trees (concatenate
    trees freely; nodes are exchangeable here). ``bins``: a number of equal-width bins over the
    observed score range, or explicit increasing edges (nodes outside them are ignored).
    ``eps``: the tolerated probability, ``P_l >= 1 - eps`` / ``P_h <= eps``.
    """
    s = _as_1d("node_S", node_S, "biuf").astype(np.float64)
    q = _as_1d("node_Q", node_Q, "biuf").astype(np.float64)
    z = _as_1d("node_size", node_size, "biu").astype(np.int64)
    if not (s.shape == q.shape == z.shape):
        raise ValueError(f"node arrays disagree in length: {s.shape}, {q.shape}, {z.shape}")
    if not (np.isfinite(s).all() and np.isfinite(q).all()):
        raise ValueError("node_S and node_Q must be finite")
    if (q < 0).any() or (q > 1).any():
        raise ValueError("node_Q values must lie in [0, 1]")
    if (z < 1).any():
        raise ValueError("node_size values must be >= 1")
    if not (isinstance(eps, int | float) and 0 < eps < 0.5):
        raise ValueError(f"eps must satisfy 0 < eps < 0.5, got {eps!r}")
    if weight not in ("size", "node"):
        raise ValueError(f"weight must be 'size' or 'node', got {weight!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")

    keep = z >= params.n_s
    s, q, z = s[keep], q[keep], z[keep]
    edges = _edges(bins, s)
    inside = (s >= edges[0]) & (s <= edges[-1])
    s, q, z = s[inside], q[inside], z[inside]
    if s.size == 0:
        raise ValueError(f"no nodes with size >= n_s={params.n_s} inside the bins to calibrate on")
    n_bins = edges.shape[0] - 1
    idx = np.clip(np.searchsorted(edges, s, side="left") - 1, 0, n_bins - 1)
    w = z.astype(np.float64) if weight == "size" else np.ones_like(s)

    count = np.bincount(idx, minlength=n_bins)
    wsum = np.bincount(idx, weights=w, minlength=n_bins)
    high = np.bincount(idx, weights=w * (q >= params.k_a - _Q_TOL), minlength=n_bins)
    low = np.bincount(idx, weights=w * (q <= 1.0 - params.k_a + _Q_TOL), minlength=n_bins)
    qsum = np.bincount(idx, weights=w * q, minlength=n_bins)
    informative = count >= min_count
    with np.errstate(invalid="ignore", divide="ignore"):
        p_h = np.where(informative, high / wsum, np.nan)
        p_l = np.where(informative, low / wsum, np.nan)
        mean_q = np.where(count > 0, qsum / wsum, np.nan)

    k_pr = _threshold(edges, p_l >= 1.0 - eps, informative)
    k_pa = _threshold(edges, p_h <= eps, informative)
    return Calibration(
        k_pr=min(k_pr, k_pa),  # P_l >= 1-eps implies P_h <= eps; min() only guards rounding
        k_pa=k_pa,
        eps=float(eps),
        k_a=params.k_a,
        n_s=params.n_s,
        weighting=weight,
        min_count=min_count,
        bin_edges=edges,
        p_h=p_h,
        p_l=p_l,
        mean_q=mean_q,
        count=count,
        weight=wsum,
        n_nodes=int(s.size),
        prior_strength=_prior_strength(idx, q, w, mean_q, informative),
    )


def _edges(bins: int | Any, s: np.ndarray) -> np.ndarray:
    if isinstance(bins, int | np.integer) and not isinstance(bins, bool):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if s.size == 0:
            raise ValueError("no nodes with size >= n_s to calibrate on")
        return np.linspace(float(s.min()), float(s.max()), int(bins) + 1)
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.shape[0] < 2 or not np.isfinite(edges).all():
        raise ValueError("bins must be an integer or at least two finite edges")
    if (np.diff(edges) <= 0).any():
        raise ValueError("bin edges must be strictly increasing")
    return edges


def _threshold(edges: np.ndarray, ok: np.ndarray, informative: np.ndarray) -> float:
    """Upper edge of the last informative bin in the initial run of bins satisfying ``ok``."""
    best = float(np.nextafter(edges[0], -np.inf))  # "below everything": the rule never fires
    for b in np.flatnonzero(informative):
        if not ok[b]:
            break
        best = float(edges[b + 1])
    return best


def _prior_strength(
    idx: np.ndarray, q: np.ndarray, w: np.ndarray, mean_q: np.ndarray, informative: np.ndarray
) -> float | None:
    if not informative.any():
        return None
    use = informative[idx]
    m = mean_q[idx[use]]
    dev2 = (q[use] - m) ** 2
    between = float(np.sum(w[use] * m * (1.0 - m)))
    within = float(np.sum(w[use] * dev2))
    if between <= 0.0:
        return None  # every informative bin is pure: the spread says nothing about strength
    if within <= 0.0:
        return _STRENGTH_BOUNDS[1]
    return float(np.clip(between / within - 1.0, *_STRENGTH_BOUNDS))


def plot_calibration(
    calibration: Calibration, path: str | Path, *, title: str | None = None
) -> Path:
    """Draw ``P_h``/``P_l`` against ``S`` with the chosen thresholds (Fig. 4c) into a PNG.

    Uses matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), imported
    here so the web service never pays for matplotlib unless it plots.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    centers = calibration.bin_centers
    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(centers, calibration.p_h, "o-", color="tab:green", label="P_h = P(Q ≥ K_a | S)")
    ax.plot(centers, calibration.p_l, "s-", color="tab:red", label="P_l = P(Q ≤ 1-K_a | S)")
    ax.plot(centers, calibration.mean_q, ":", color="tab:gray", label="E[Q | S]")
    for value, name, style in ((calibration.k_pr, "K_pr", "--"), (calibration.k_pa, "K_pa", "-.")):
        if value >= calibration.bin_edges[0]:  # a rule that never fires gets no line
            ax.axvline(
                value, color="black", linestyle=style, linewidth=1, label=f"{name} = {value:.3f}"
            )
    ax.set_xlabel("cluster score S")
    ax.set_ylabel("probability")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="center left", fontsize=8)
    ax.set_title(title or f"Calibration (K_a={calibration.k_a}, eps={calibration.eps})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
