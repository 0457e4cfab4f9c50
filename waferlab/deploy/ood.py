"""Unknown-pattern scores: how unlike every trained class a map is (higher = more unknown).

``msp`` (1 - max calibrated probability), ``maxlogit`` (- max logit), ``energy`` (- T logsumexp(logits/T)) and
``mahalanobis`` (smallest class-conditional Mahalanobis distance of the pooled ``cam_target_layer`` features,
shared Ledoit-Wolf-shrunk covariance, features L2-normalised first). ``benchmarks/open_set.py`` measures them
on held-out classes; :data:`DEFAULT_METHOD` is the one that measured best.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError

#: Unknown-pattern scores, each needing only logits except ``mahalanobis`` (pooled features).
METHODS: tuple[str, ...] = ("msp", "maxlogit", "energy", "mahalanobis")
#: Chosen by ``benchmarks/open_set.py`` (README "Deploy": AUROC on held-out classes).
DEFAULT_METHOD = "mahalanobis"


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` (n, p): well conditioned even when n < p."""
    n, p = x.shape
    s = x.T @ x / n
    mu = float(np.trace(s)) / p
    x2 = x ** 2
    beta_ = float((x2.T @ x2).sum()) / n
    delta_ = float((s ** 2).sum())
    beta = (beta_ / n - delta_ / n) / p
    delta = (delta_ - 2 * mu * np.trace(s) + p * mu ** 2) / p
    shrink = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    return (1 - shrink) * s + shrink * mu * np.eye(p)


@dataclass
class OODScorer:
    """A fitted unknown-pattern score (see the module docstring); ``score`` is higher for stranger maps."""

    method: str
    temperature: float = 1.0
    means: np.ndarray | None = None  # (K', D) class means of the normalised features (mahalanobis)
    whitener: np.ndarray | None = None  # (D, D) W with W W^T = inverse shared covariance (mahalanobis)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WaferlabError(f"unknown-pattern method {self.method!r}; choose one of {', '.join(METHODS)}")

    @property
    def needs_features(self) -> bool:
        return self.method == "mahalanobis"

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Scores (N,) float32 from scaled logits (N, K) and, for ``mahalanobis``, pooled features (N, D)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "msp":
            p = np.exp(z / self.temperature - _logsumexp(z / self.temperature)[:, None])
            return (1.0 - p.max(axis=1)).astype(np.float32)
        if self.method == "maxlogit":
            return (-z.max(axis=1)).astype(np.float32)
        if self.method == "energy":
            return (-self.temperature * _logsumexp(z / self.temperature)).astype(np.float32)
        if features is None or self.means is None or self.whitener is None:
            raise WaferlabError("mahalanobis unknown-pattern score needs features and fitted statistics")
        f = normalise(np.asarray(features, dtype=np.float64))
        d = mahalanobis_min(f, self.means, self.whitener)
        return d.astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "temperature": self.temperature, **self.info}
        if self.means is not None and self.whitener is not None:
            out["means"] = self.means.astype(np.float32).tolist()
            out["whitener"] = self.whitener.astype(np.float32).tolist()
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> OODScorer:
        try:
            means = np.asarray(obj["means"], np.float64) if "means" in obj else None
            prec = np.asarray(obj["whitener"], np.float64) if "whitener" in obj else None
            info = {k: v for k, v in obj.items() if k not in ("method", "temperature", "means", "whitener")}
            scorer = cls(str(obj["method"]), float(obj.get("temperature", 1.0)), means, prec, info)
        except (KeyError, TypeError, ValueError) as exc:
            raise WaferlabError(f"{where}: field {exc}: unreadable unknown-pattern statistics") from None
        if scorer.needs_features and (means is None or prec is None or means.ndim != 2
                                      or prec.shape != (means.shape[1], means.shape[1])):
            raise WaferlabError(f"{where}: field 'means'/'whitener': missing or inconsistent shapes")
        return scorer


def normalise(f: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (class clusters then differ in direction, not in activation scale)."""
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def mahalanobis_min(f: np.ndarray, means: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    """min over classes k of ||(f - mu_k) W||^2, for every row of ``f`` (differences of whitened vectors:
    the expanded form f'Pf - 2f'Pmu + mu'Pmu cancels catastrophically in float32)."""
    z = f @ whitener
    zm = means @ whitener
    return np.min([((z - m) ** 2).sum(axis=1) for m in zm], axis=0)


def fit_gaussian(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means of the normalised features and a whitener W of their shared within-class (shrunk)
    covariance C: W W^T = C^-1 (from C's eigendecomposition)."""
    f = normalise(np.asarray(features, dtype=np.float64))
    classes = np.unique(labels)
    means = np.stack([f[labels == k].mean(axis=0) for k in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    lam, vec = np.linalg.eigh(ledoit_wolf(centred))
    lam = np.maximum(lam, lam.max() * 1e-10)
    return means, vec / np.sqrt(lam)[None, :]


def fit_scorer(method: str, logits: np.ndarray, labels: np.ndarray, features: np.ndarray | None,
               temperature: float, seed: int = 0) -> tuple[OODScorer, np.ndarray]:
    """A fitted scorer plus honest validation scores (out-of-fold for ``mahalanobis``, 2 folds).

    The statistics come from all maps; the scores used for the threshold come from a fit that did not see
    the scored map, so the threshold is not set on in-sample (too small) distances.
    """
    scorer = OODScorer(method, temperature)
    if method != "mahalanobis":
        return scorer, scorer.score(logits)
    if features is None or len(features) == 0:
        raise WaferlabError("mahalanobis unknown-pattern score: no features to fit")
    scorer.means, scorer.whitener = fit_gaussian(features, labels)
    scores = np.empty(len(labels), np.float32)
    fold = np.random.default_rng(seed).permutation(len(labels)) % 2
    for k in (0, 1):
        fit, held = fold != k, fold == k
        if fit.sum() < 2 or not held.any():
            scores[held] = scorer.score(logits[held], features[held])
            continue
        part = OODScorer(method, temperature, *fit_gaussian(features[fit], labels[fit]))
        scores[held] = part.score(logits[held], features[held])
    return scorer, scores
