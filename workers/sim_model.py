"""Class-wise Gaussian mixtures over (feature, score, IoU) triplets — the data model of Sec. 5.2.

The paper's large-scale simulation assumes that detections at scale follow the same joint
distribution P(f, s, IoU) as on a small annotated set, learns it per class with a Gaussian
mixture, and samples millions of triplets from it. This module holds that distribution:

* :class:`ClassMixture` — one class's mixture over the vector ``[f_1..f_d, s, IoU]``;
* :func:`builtin_model` — a documented, plausible mixture used when no predictions with ground
  truth are at hand;
* :func:`fit_model` — fitting the mixtures from arrays (the COCO loader lives in ``sim_coco``);
* :func:`class_sizes` — how many masks each simulated class gets (uniform or long-tailed).

Sampling is per class and seeded per class, so a 10M-mask campaign never holds more than one
class in memory and the masks of class ``c`` do not depend on how many classes are simulated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

#: Scores are probabilities of a correct mask; keep them strictly inside (0, 1).
SCORE_EPS = 1e-4

#: Exponent of the long-tail class-size law. ADE20K's 100 instance classes span roughly two orders
#: of magnitude between the most and the least frequent class; 1/rank over 100 ranks gives 100:1.
ZIPF_EXPONENT = 1.0

SIZE_KINDS = ("uniform", "zipf", "empirical")


@dataclass(frozen=True, eq=False)
class MaskSample:
    """The simulated masks of one class: features, predicted scores and true IoUs."""

    features: np.ndarray  # float64[n, d]
    scores: np.ndarray  # float64[n], in (0, 1)
    iou: np.ndarray  # float64[n], in [0, 1]

    @property
    def n(self) -> int:
        return int(self.scores.shape[0])

    def subset(self, index: np.ndarray) -> MaskSample:
        return MaskSample(self.features[index], self.scores[index], self.iou[index])


@dataclass(frozen=True, eq=False)
class ClassMixture:
    """A Gaussian mixture over ``[f_1..f_d, s, IoU]`` for one class.

    The last two columns are the score and the IoU; everything before is the feature vector.
    """

    weights: np.ndarray  # float64[k], sums to 1
    means: np.ndarray  # float64[k, d + 2]
    covariances: np.ndarray  # float64[k, d + 2, d + 2]

    def __post_init__(self) -> None:
        w, mu, cov = self.weights, self.means, self.covariances
        if w.ndim != 1 or w.size == 0:
            raise ValueError("mixture weights must be a non-empty 1-D array")
        if mu.ndim != 2 or mu.shape[0] != w.size or mu.shape[1] < 3:
            raise ValueError(
                f"mixture means must have shape (k, d + 2) with d >= 1, got {mu.shape}"
            )
        if cov.shape != (w.size, mu.shape[1], mu.shape[1]):
            raise ValueError(f"mixture covariances must have shape (k, D, D), got {cov.shape}")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(mu)) and np.all(np.isfinite(cov))):
            raise ValueError("mixture parameters must be finite")
        if np.any(w < 0) or not math.isclose(float(w.sum()), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ValueError("mixture weights must be non-negative and sum to 1")
        # Fail here, not deep inside sampling, when a covariance is not positive definite.
        _ = self.cholesky

    @property
    def n_components(self) -> int:
        return int(self.weights.size)

    @property
    def feature_dim(self) -> int:
        return int(self.means.shape[1] - 2)

    @cached_property
    def cholesky(self) -> np.ndarray:
        try:
            return np.linalg.cholesky(self.covariances)
        except np.linalg.LinAlgError as exc:
            raise ValueError("mixture covariances must be positive definite") from exc

    def sample(self, n: int, rng: np.random.Generator) -> MaskSample:
        """Draw ``n`` triplets; IoU is clipped to [0, 1] and the score to (0, 1).

        Rows are filled component by component into one preallocated array, in a random
        component order per row, so memory stays at one copy of the output.
        """
        if n < 0:
            raise ValueError(f"number of masks must be >= 0, got {n}")
        dim = self.means.shape[1]
        labels = rng.choice(self.n_components, size=n, p=self.weights)
        out = np.empty((n, dim), dtype=np.float64)
        for j in range(self.n_components):
            rows = np.flatnonzero(labels == j)
            if rows.size == 0:
                continue
            z = rng.standard_normal((rows.size, dim))
            out[rows] = z @ self.cholesky[j].T + self.means[j]
        scores = np.clip(out[:, -2], SCORE_EPS, 1.0 - SCORE_EPS)
        iou = np.clip(out[:, -1], 0.0, 1.0)
        return MaskSample(np.ascontiguousarray(out[:, :-2]), scores, iou)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassMixture:
        try:
            return cls(
                np.asarray(d["weights"], dtype=np.float64),
                np.asarray(d["means"], dtype=np.float64),
                np.asarray(d["covariances"], dtype=np.float64),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad mixture description: {exc}") from exc


@dataclass(frozen=True)
class ClassSpec:
    """One simulated class: its name, mixture, and how many source masks it was fitted on."""

    class_id: int
    name: str
    mixture: ClassMixture
    source_count: int = 0  # masks the mixture was fitted on (0 for built-in parameters)


@dataclass(frozen=True)
class SimulationModel:
    """All classes' mixtures plus where they came from."""

    classes: tuple[ClassSpec, ...]
    feature_source: str  # "builtin" | "predictions" | "box_geometry" (+ "+projection")
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("a simulation model needs at least one class")
        dims = {c.mixture.feature_dim for c in self.classes}
        if len(dims) != 1:
            raise ValueError(f"all classes must share one feature dimension, got {sorted(dims)}")

    @property
    def feature_dim(self) -> int:
        return self.classes[0].mixture.feature_dim

    def select(self, n_classes: int | None) -> SimulationModel:
        """The first ``n_classes`` classes (fitted models keep classes by decreasing support)."""
        if n_classes is None:
            return self
        if not 1 <= n_classes <= len(self.classes):
            raise ValueError(
                f"--classes must be between 1 and {len(self.classes)} for this model, "
                f"got {n_classes}"
            )
        return SimulationModel(self.classes[:n_classes], self.feature_source, self.notes)

    def summary(self) -> dict[str, Any]:
        """A compact description for reports (no covariance matrices)."""
        return {
            "feature_source": self.feature_source,
            "feature_dim": self.feature_dim,
            "n_classes": len(self.classes),
            "components": [c.mixture.n_components for c in self.classes],
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_source": self.feature_source,
            "notes": list(self.notes),
            "classes": [
                {
                    "id": c.class_id,
                    "name": c.name,
                    "source_count": c.source_count,
                    "mixture": c.mixture.to_dict(),
                }
                for c in self.classes
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SimulationModel:
        if not isinstance(d, Mapping) or not isinstance(d.get("classes"), list):
            raise ValueError("a simulation model must be an object with a 'classes' list")
        try:
            classes = tuple(
                ClassSpec(
                    int(c["id"]),
                    str(c["name"]),
                    ClassMixture.from_dict(c["mixture"]),
                    int(c.get("source_count", 0)),
                )
                for c in d["classes"]
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad class in simulation model: {exc}") from exc
        return cls(classes, str(d.get("feature_source", "unknown")), tuple(d.get("notes", ())))


def class_rng(seed: int, class_index: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, class, purpose).

    Seeding from the tuple keeps each class's data identical whatever the number or order of the
    other classes, and keeps e.g. the worker answers independent from the mask sample.
    """
    return np.random.default_rng([seed, class_index, stream])


# --------------------------------------------------------------------------- built-in parameters


def _builtin_mixture(rng: np.random.Generator, feature_dim: int) -> ClassMixture:
    """A plausible per-class mixture (see :func:`builtin_model` for the rationale)."""
    k = int(rng.integers(6, 13))
    n_good = max(1, round(0.35 * k))
    n_mid = max(1, round(0.30 * k))
    n_bad = k - n_good - n_mid
    easy = rng.uniform(0.25, 0.55)  # probability mass of the good components: class easiness
    group_mass = (easy, 0.4 * (1 - easy), 0.6 * (1 - easy))
    weights: list[float] = []
    iou_mu: list[float] = []
    iou_sd: list[float] = []
    for count, mass, mu_range, sd_range in (
        (n_good, group_mass[0], (0.80, 0.92), (0.04, 0.08)),
        (n_mid, group_mass[1], (0.62, 0.80), (0.08, 0.12)),
        (n_bad, group_mass[2], (0.15, 0.55), (0.10, 0.18)),
    ):
        weights.extend(mass * rng.dirichlet(np.full(count, 2.0)))
        iou_mu.extend(rng.uniform(*mu_range, size=count))
        iou_sd.extend(rng.uniform(*sd_range, size=count))

    d = feature_dim
    # A class-level "quality direction": components of similar mean IoU get nearby feature
    # means, and within a component the same direction carries part of the IoU noise.
    q_dir = rng.standard_normal(d)
    q_dir /= np.linalg.norm(q_dir)
    means = np.empty((k, d + 2))
    covs = np.empty((k, d + 2, d + 2))
    for j in range(k):
        mu, sd = iou_mu[j], iou_sd[j]
        s_mu = float(np.clip(0.2 + 0.65 * mu + rng.normal(0.0, 0.06), 0.05, 0.97))
        s_sd = rng.uniform(0.10, 0.16)
        rho = rng.uniform(0.2, 0.45)  # within-component corr(score, IoU)
        means[j, :d] = 2.5 * rng.standard_normal(d) + 6.0 * (mu - 0.6) * q_dir
        means[j, d] = s_mu
        means[j, d + 1] = mu
        # x = mean + L z with independent standard normal z; the IoU row depends on z_iou only,
        # the score row on (z_s, z_iou), the feature rows on (z_f, z_iou): L is invertible.
        loading = np.zeros((d + 2, d + 2))
        loading[:d, :d] = np.eye(d)
        loading[:d, d + 1] = 0.8 * q_dir
        loading[d, d] = s_sd * math.sqrt(1 - rho**2)
        loading[d, d + 1] = s_sd * rho
        loading[d + 1, d + 1] = sd
        covs[j] = loading @ loading.T
    return ClassMixture(np.asarray(weights) / np.sum(weights), means, covs)


def builtin_model(n_classes: int, feature_dim: int = 16, seed: int = 0) -> SimulationModel:
    """Built-in per-class mixtures, used when no predictions with ground truth are given.

    Each class has 6–12 components in three groups, chosen to look like a Mask Scoring R-CNN's
    output after a score > 0.2 filter:

    * *good* components (mean IoU 0.80–0.92, sd 0.04–0.08) holding 25–55% of the masks
      (the class's "easiness");
    * *borderline* components (mean IoU 0.62–0.80, sd 0.08–0.12) straddling K_iou = 0.75, which
      force the search to split deep;
    * *bad* components (mean IoU 0.15–0.55, sd 0.10–0.18).

    The score correlates with IoU across components (mean s ≈ 0.2 + 0.65·IoU, sd 0.06) and within
    one (corr 0.2–0.45, score sd 0.10–0.16): per mask corr(s, IoU) comes out around 0.5–0.8, a
    noisy predictor as in the paper's Fig. 4a, while cluster means are much better predictors.
    Feature means are random (scale 2.5 per dimension) plus an offset along a class-level quality
    direction, and the same direction carries part of each mask's IoU noise, so masks of similar
    quality cluster — the premise of the method. (A side effect worth knowing: quality is then
    partly *linear* in the features, which suits the LSUN baseline's linear classifier.)
    ``seed`` fixes the parameters, not the sampled masks.
    """
    if n_classes < 1:
        raise ValueError(f"number of classes must be >= 1, got {n_classes}")
    if not 1 <= feature_dim <= 1024:
        raise ValueError(f"feature dimension must be in [1, 1024], got {feature_dim}")
    classes = tuple(
        ClassSpec(c, f"class_{c:03d}", _builtin_mixture(class_rng(seed, c, 0), feature_dim))
        for c in range(n_classes)
    )
    return SimulationModel(classes, "builtin", (f"built-in parameters, parameter seed {seed}",))


# --------------------------------------------------------------------------------------- fitting


def fit_mixture(
    data: np.ndarray, *, n_components: int = 6, min_per_component: int = 20, seed: int = 0
) -> ClassMixture:
    """Fit a full-covariance Gaussian mixture to rows ``[f..., s, IoU]`` of one class.

    The number of components shrinks for small classes (at least ``min_per_component`` rows per
    component) so tiny classes do not give degenerate covariances.
    """
    from sklearn.mixture import GaussianMixture

    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] < 3:
        raise ValueError(f"fit data must have shape (n, d + 2) with d >= 1, got {data.shape}")
    if data.shape[0] < 2:
        raise ValueError(f"need at least 2 masks to fit a class mixture, got {data.shape[0]}")
    if not np.all(np.isfinite(data)):
        raise ValueError("fit data contains NaN or inf")
    k = max(1, min(n_components, data.shape[0] // min_per_component))
    gmm = GaussianMixture(
        n_components=k, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=200
    )
    gmm.fit(data)
    weights = gmm.weights_ / gmm.weights_.sum()
    return ClassMixture(weights, gmm.means_.copy(), gmm.covariances_.copy())


def fit_model(
    per_class: Mapping[int, np.ndarray],
    names: Mapping[int, str],
    *,
    feature_source: str,
    n_components: int = 6,
    seed: int = 0,
    notes: Sequence[str] = (),
) -> SimulationModel:
    """Fit one mixture per class; classes are kept by decreasing number of source masks."""
    usable = {c: x for c, x in per_class.items() if x.shape[0] >= 2}
    skipped = sorted(set(per_class) - set(usable))
    if not usable:
        raise ValueError("no class has at least 2 predictions with a ground-truth image")
    ordered = sorted(usable, key=lambda c: (-usable[c].shape[0], c))
    classes = tuple(
        ClassSpec(
            c,
            names.get(c, str(c)),
            fit_mixture(usable[c], n_components=n_components, seed=seed),
            int(usable[c].shape[0]),
        )
        for c in ordered
    )
    all_notes = list(notes)
    if skipped:
        all_notes.append(f"skipped classes with fewer than 2 predictions: {skipped}")
    return SimulationModel(classes, feature_source, tuple(all_notes))


# ----------------------------------------------------------------------------------- class sizes


def class_sizes(
    total: int,
    n_classes: int,
    kind: str,
    *,
    zipf_exponent: float = ZIPF_EXPONENT,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Split ``total`` masks over classes: ``uniform``, ``zipf`` (long tail), or ``empirical``.

    ``empirical`` uses ``weights`` (e.g. the per-class prediction counts of a fitted source,
    which is how the paper followed ADE20K's class distribution). Rounding is by largest
    remainder, so the sizes sum exactly to ``total``; every class gets at least one mask.
    """
    if kind not in SIZE_KINDS:
        raise ValueError(f"class-size distribution must be one of {SIZE_KINDS}, got {kind!r}")
    if n_classes < 1:
        raise ValueError(f"number of classes must be >= 1, got {n_classes}")
    if total < n_classes:
        raise ValueError(f"need at least one mask per class: {total} masks for {n_classes} classes")
    if kind == "uniform":
        w = np.ones(n_classes)
    elif kind == "zipf":
        if zipf_exponent < 0:
            raise ValueError(f"zipf exponent must be >= 0, got {zipf_exponent}")
        w = 1.0 / np.arange(1, n_classes + 1, dtype=np.float64) ** zipf_exponent
    else:
        if weights is None or len(weights) != n_classes:
            raise ValueError("empirical class sizes need one weight per class")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError("empirical class weights must be positive")
    # One mask per class first, the rest proportionally.
    spare = total - n_classes
    exact = spare * w / w.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = spare - int(sizes.sum())
    if short:
        sizes[np.argsort(-(exact - sizes), kind="stable")[:short]] += 1
    return sizes + 1
