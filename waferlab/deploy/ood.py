"""Unknown-pattern scores: how unlike every trained class a map is (higher = more unknown).

``msp`` (1 - max calibrated probability), ``maxlogit`` (- max logit), ``energy`` (- T logsumexp(logits/T)),
``mahalanobis`` (smallest class-conditional Mahalanobis distance of the pooled ``cam_target_layer``
features, shared Ledoit-Wolf-shrunk covariance, features L2-normalised first), ``knn`` (Sun et al. 2022:
distance of the L2-normalised pooled features to their k-th nearest neighbour among up to
:data:`KNN_BANK` maps of the fitting data), ``knn+energy`` (the two z-scored by their mean and standard
deviation on the threshold's maps, then summed: each weighs the same) and ``knn+wafer`` (``knn`` fused the
same way with ``wafer``: the Euclidean distance of the map's 18 classic wafer descriptors,
:mod:`waferlab.deploy.descriptors`, standardised on the fitting data, to their k-th nearest neighbour
there; it sees the thin lines and compact blobs that the network's features take for ``none``). The
feature scores pool the map by :data:`DEFAULT_POOL` (global average and global max pooling, each
L2-normalised, concatenated: measured best on the benchmark's tuning fold). The feature statistics are fitted
on the training part when one is given (many more maps per class than the validation part) and the
threshold on validation scores; without a training part (``waferlab calibrate``) on the labelled maps,
scored out of fold.
``benchmarks/open_set.py`` measures every score on held-out classes; :data:`DEFAULT_METHOD` is the one that
measured best. Statistics live in ``ood.json`` (method, settings) and ``ood.safetensors`` (arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError

#: Unknown-pattern scores, each needing only logits except those in :data:`FEATURE_METHODS`.
METHODS: tuple[str, ...] = ("msp", "maxlogit", "energy", "mahalanobis", "knn", "knn+energy", "knn+wafer")
FEATURE_METHODS: tuple[str, ...] = ("mahalanobis", "knn", "knn+energy", "knn+wafer")
#: Feature methods whose score also needs the maps themselves (uint8, at the run's size: the model's input).
MAP_METHODS: tuple[str, ...] = ("knn+wafer",)
#: Chosen by ``benchmarks/open_set.py`` (README "Deploy": AUROC on held-out classes).
DEFAULT_METHOD = "knn+wafer"
#: How the feature scores pool the ``cam_target_layer`` map: the engine returns global average and global max
#: pooling side by side (N, 2C); ``avg+max`` L2-normalises each and concatenates them (each weighs the same).
POOLINGS: tuple[str, ...] = ("avg", "max", "avg+max")
#: Chosen by ``benchmarks/open_set.py`` on its tuning fold; a run stored without one used ``avg``.
DEFAULT_POOL = "avg+max"
#: k of the ``knn`` score and the most maps its bank keeps (a stratified sample beyond that).
KNN_K = 5
KNN_BANK = 4096
#: The most training maps (a stratified sample) whose features are computed for the fit after training.
FIT_MAPS = 16384
#: Arrays each feature method stores, with their number of dimensions.
ARRAYS: dict[str, dict[str, int]] = {"mahalanobis": {"means": 2, "whitener": 2}, "knn": {"bank": 2},
                                     "knn+energy": {"bank": 2, "fusion": 2},
                                     "knn+wafer": {"bank": 2, "fusion": 2, "wafer_bank": 2, "wafer_norm": 2}}
#: Parts of each fused method; row i of its ``fusion`` array: (mean, std) of part i on the threshold's maps.
#: ``wafer_norm`` rows: the descriptors' mean and std on the fitting data; ``wafer_bank``: its standardised
#: descriptors.
FUSED_PARTS: dict[str, tuple[str, ...]] = {"knn+energy": ("knn", "energy"), "knn+wafer": ("knn", "wafer")}


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
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # see ARRAYS
    k: int = KNN_K
    info: dict[str, Any] = field(default_factory=dict)
    pool: str = DEFAULT_POOL  # see POOLINGS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WaferlabError(f"unknown-pattern method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.pool not in POOLINGS:
            raise WaferlabError(f"unknown-pattern pooling {self.pool!r}; choose one of {', '.join(POOLINGS)}")

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    @property
    def needs_maps(self) -> bool:
        return self.method in MAP_METHODS

    def fit(self, features: np.ndarray, labels: np.ndarray, seed: int = 0,
            maps: np.ndarray | None = None) -> OODScorer:
        """Fit the feature statistics (no-op for the logit scores; ``maps``: the fitting maps, for a method
        of :data:`MAP_METHODS`); returns self."""
        if not self.needs_features:
            return self
        f = pooled(features, self.pool)
        if len(f) == 0:
            raise WaferlabError(f"{self.method} unknown-pattern score: no features to fit")
        if self.method == "mahalanobis":
            means, whitener = fit_gaussian(f, labels)
            self.arrays = {"means": means.astype(np.float32), "whitener": whitener.astype(np.float32)}
        else:
            keep = stratified_sample(np.asarray(labels), KNN_BANK, seed)
            self.arrays = {"bank": normalise(f[keep]).astype(np.float32)}
            if self.needs_maps:
                self.arrays.update(fit_wafer(self._maps(maps, len(f))[keep]))
            if self.method in FUSED_PARTS:  # neutral until fit_fusion sees the threshold's maps
                self.arrays["fusion"] = np.array([[0.0, 1.0]] * len(FUSED_PARTS[self.method]), np.float32)
        return self

    def _maps(self, maps: np.ndarray | None, n: int) -> np.ndarray:
        if maps is None or len(maps) != n:
            raise WaferlabError(f"{self.method} unknown-pattern score needs the {n} maps themselves, got "
                                f"{'none' if maps is None else len(maps)}")
        return np.asarray(maps)

    def parts(self, logits: np.ndarray, features: np.ndarray | None = None, maps: np.ndarray | None = None,
              descriptors: np.ndarray | None = None) -> np.ndarray:
        """(N, 2) raw scores of a fused method's parts (:data:`FUSED_PARTS`), before z-scoring; a method of
        :data:`MAP_METHODS` reads the ``descriptors`` of the maps when given (:meth:`describe`, computed
        ahead), else computes them from ``maps``."""
        knn = OODScorer("knn", self.temperature, {"bank": self.arrays["bank"]}, self.k, pool=self.pool)
        if self.needs_maps:
            if descriptors is None:
                descriptors = self.describe(self._maps(maps, len(logits)))
            elif len(descriptors) != len(logits):
                raise WaferlabError(f"{self.method} unknown-pattern score: {len(descriptors)} maps' "
                                    f"descriptors for {len(logits)} maps")
            other = wafer_distance(descriptors, self.arrays["wafer_bank"], self.arrays["wafer_norm"], self.k)
        else:
            other = OODScorer("energy", self.temperature).score(logits)
        return np.stack([knn.score(logits, features), other], 1)

    def describe(self, maps: np.ndarray) -> np.ndarray | None:
        """What :meth:`score` reads of the maps (N, S, S) uint8 the network saw, computed ahead (predict's
        reader thread does, overlapping inference): their wafer descriptors for a method of
        :data:`MAP_METHODS`, None for the others."""
        if not self.needs_maps:
            return None
        from waferlab.deploy.descriptors import wafer_descriptors

        return wafer_descriptors(maps)

    def fuse(self, parts: np.ndarray) -> np.ndarray:
        """A fused method's score from its parts' raw scores (N, 2): z-scored by ``fusion``, summed."""
        mean, std = self.arrays["fusion"][:, 0], self.arrays["fusion"][:, 1]
        return ((parts - mean) / std).sum(axis=1).astype(np.float32)

    def fit_fusion(self, parts: np.ndarray) -> OODScorer:
        """Set the z-scoring of a fused method from its parts' scores (N, 2) on held-out maps."""
        p = np.asarray(parts, np.float64)
        self.arrays["fusion"] = np.stack([p.mean(axis=0), np.maximum(p.std(axis=0), 1e-6)], 1).astype(
            np.float32)
        return self

    def score(self, logits: np.ndarray, features: np.ndarray | None = None, maps: np.ndarray | None = None,
              descriptors: np.ndarray | None = None) -> np.ndarray:
        """Scores (N,) float32 from scaled logits (N, K), for a feature method pooled features (N, D), for a
        method of :data:`MAP_METHODS` also the maps (N, S, S) uint8 the network saw or their
        ``descriptors`` computed ahead (:meth:`describe`)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "msp":
            p = np.exp(z / self.temperature - _logsumexp(z / self.temperature)[:, None])
            return (1.0 - p.max(axis=1)).astype(np.float32)
        if self.method == "maxlogit":
            return (-z.max(axis=1)).astype(np.float32)
        if self.method == "energy":
            return (-self.temperature * _logsumexp(z / self.temperature)).astype(np.float32)
        if features is None or set(self.arrays) != set(ARRAYS[self.method]):
            raise WaferlabError(f"{self.method} unknown-pattern score needs features and fitted statistics")
        if self.method in FUSED_PARTS:
            return self.fuse(self.parts(z, features, maps, descriptors))
        f = normalise(pooled(features, self.pool))
        if self.method == "knn":
            return knn_distance(f, self.arrays["bank"], self.k)
        return mahalanobis_min(f, self.arrays["means"], self.arrays["whitener"]).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """The settings (the arrays go to ``ood.safetensors``: :meth:`to_arrays`)."""
        out: dict[str, Any] = {"method": self.method, "temperature": self.temperature, **self.info}
        if self.needs_features:
            out["pool"] = self.pool
        if self.method in ("knn", *FUSED_PARTS):
            out["k"] = self.k
        if self.arrays:
            out["arrays"] = {k: list(v.shape) for k, v in self.arrays.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str, arrays: dict[str, np.ndarray] | None = None
                  ) -> OODScorer:
        """Rebuild from :meth:`to_json` and the stored arrays; a missing or misshapen one is an error."""
        try:
            info = {k: v for k, v in obj.items() if k not in ("method", "temperature", "k", "arrays", "pool")}
            scorer = cls(str(obj["method"]), float(obj.get("temperature", 1.0)), dict(arrays or {}),
                         int(obj.get("k", KNN_K)), info, str(obj.get("pool", "avg")))
        except (KeyError, TypeError, ValueError) as exc:
            raise WaferlabError(f"{where}: field {exc}: unreadable unknown-pattern settings") from None
        except WaferlabError as exc:
            raise WaferlabError(f"{where}: {exc}") from None
        need = ARRAYS.get(scorer.method, {})
        a = scorer.arrays
        if set(a) != set(need) or any(a[k].ndim != nd for k, nd in need.items()) or (
                scorer.method == "mahalanobis" and a["whitener"].shape != (a["means"].shape[1],) * 2) or (
                "fusion" in a and a["fusion"].shape != (len(FUSED_PARTS[scorer.method]), 2)) or (
                "wafer_norm" in a and a["wafer_norm"].shape != (2, a["wafer_bank"].shape[1])):
            raise WaferlabError(f"{where}: arrays {sorted(a)}: missing or inconsistent statistics for "
                                f"{scorer.method!r} (expected {sorted(need)})")
        if scorer.method in ("knn", *FUSED_PARTS) and scorer.k < 1:
            raise WaferlabError(f"{where}: field 'k': must be >= 1, got {scorer.k}")
        return scorer


def pooled(features: np.ndarray, pool: str) -> np.ndarray:
    """The engine's pooled features (N, 2C: global average | global max of the ``cam_target_layer`` map) as
    one pooling of :data:`POOLINGS` asks: a half, or both halves L2-normalised and concatenated."""
    f = np.asarray(features, dtype=np.float32)
    half = f.shape[1] // 2
    if pool == "avg":
        return f[:, :half]
    if pool == "max":
        return f[:, half:]
    return np.concatenate([normalise(f[:, :half]), normalise(f[:, half:])], axis=1)


def normalise(f: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (class clusters then differ in direction, not in activation scale)."""
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def stratified_sample(labels: np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices: all rows when there are at most ``cap``, else ``cap`` rows drawn per class in
    proportion to its count (at least one each), so rare classes stay in the bank."""
    n = len(labels)
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out.append(rng.choice(rows, max(1, round(cap * len(rows) / n)), replace=False))
    return np.sort(np.concatenate(out))


def mahalanobis_min(f: np.ndarray, means: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    """min over classes k of ||(f - mu_k) W||^2, for every row of ``f`` (differences of whitened vectors:
    the expanded form f'Pf - 2f'Pmu + mu'Pmu cancels catastrophically in float32)."""
    z = f @ whitener
    zm = means @ whitener
    return np.min([((z - m) ** 2).sum(axis=1) for m in zm], axis=0)


def knn_distance(f: np.ndarray, bank: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance of every unit row of ``f`` to its k-th nearest row of the unit-row ``bank``
    (|a - b|^2 = 2 - 2 a.b), in chunks of rows so memory stays bounded."""
    k = max(1, min(k, len(bank)))
    bank = np.asarray(bank, np.float32)
    out = np.empty(len(f), np.float32)
    for s in range(0, len(f), chunk):
        kth = kth_value(np.asarray(f[s:s + chunk], np.float32) @ bank.T, k, largest=True)
        out[s:s + chunk] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def kth_value(x: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The k-th largest (or smallest) value of every row of ``x`` (N, M): the value ``np.partition`` gives,
    by ``torch.topk``, several times faster on the k-NN scores' (maps, 4,096-row bank) matrices."""
    import torch

    top = torch.topk(torch.from_numpy(np.ascontiguousarray(x)), k, dim=1, largest=largest)
    return top.values[:, -1].numpy()


def fit_wafer(maps: np.ndarray) -> dict[str, np.ndarray]:
    """The ``wafer`` part's statistics: descriptors' mean and std on ``maps`` and their standardised rows."""
    from waferlab.deploy.descriptors import wafer_descriptors

    d = wafer_descriptors(maps).astype(np.float64)
    norm = np.stack([d.mean(axis=0), d.std(axis=0) + 1e-6])
    return {"wafer_bank": ((d - norm[0]) / norm[1]).astype(np.float32), "wafer_norm": norm.astype(np.float32)}


def wafer_distance(descriptors: np.ndarray, bank: np.ndarray, norm: np.ndarray, k: int, chunk: int = 1024
                   ) -> np.ndarray:
    """Euclidean distance of the standardised wafer ``descriptors`` (N, D) of maps
    (:func:`waferlab.deploy.descriptors.wafer_descriptors`) to their k-th nearest ``bank`` row."""
    k = max(1, min(k, len(bank)))
    z = (np.asarray(descriptors, np.float64) - norm[0]) / norm[1]
    b = np.asarray(bank, np.float64)
    out = np.empty(len(z), np.float32)
    for s in range(0, len(z), chunk):
        d2 = (z[s:s + chunk] ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * z[s:s + chunk] @ b.T
        out[s:s + chunk] = np.sqrt(np.maximum(kth_value(d2, k, largest=False), 0.0))
    return out


def fit_gaussian(features: np.ndarray, labels: np.ndarray, normalise_features: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Class means of the (normalised) features and a whitener W of their shared within-class (shrunk)
    covariance C: W W^T = C^-1 (from C's eigendecomposition)."""
    f = np.asarray(features, dtype=np.float64)
    f = normalise(f) if normalise_features else f
    classes = np.unique(labels)
    means = np.stack([f[labels == k].mean(axis=0) for k in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    lam, vec = np.linalg.eigh(ledoit_wolf(centred))
    lam = np.maximum(lam, lam.max() * 1e-10)
    return means, vec / np.sqrt(lam)[None, :]


@dataclass
class FitData:
    """Labelled maps' scaled logits (N, K), class ids (N,), pooled features (N, D) or None and the maps
    (N, S, S) uint8 at the run's size or None (needed by :data:`MAP_METHODS`)."""

    logits: np.ndarray
    labels: np.ndarray
    features: np.ndarray | None = None
    maps: np.ndarray | None = None


def fit_scorer(method: str, val: FitData, temperature: float, train: FitData | None = None,
               seed: int = 0) -> tuple[OODScorer, np.ndarray]:
    """A fitted scorer plus honest validation scores for its threshold.

    With ``train`` (the training part, at the end of training) the feature statistics come from it and
    the validation maps are scored as unseen maps. Without it they come from all of ``val``, and the
    threshold's scores from 2-fold fits that did not see the scored map (in-sample distances are too
    small, a threshold set on them would flag far more than 1 - recall of new known maps). A fused score's
    z-scoring is then fitted on those same honest validation scores of its parts.
    """
    scorer = OODScorer(method, temperature)
    if not scorer.needs_features:
        return scorer, scorer.score(val.logits)
    if val.features is None or len(val.features) == 0:
        raise WaferlabError(f"{method} unknown-pattern score: no features to fit")
    raw = _raw_scorer(scorer)
    if train is not None and train.features is not None and len(train.features):
        scorer.fit(train.features, train.labels, seed, train.maps)
        scorer.info["fitted_on"] = f"training part ({len(train.labels)} maps)"
        return _fused(scorer, raw(scorer, val.logits, val.features, val.maps))
    scorer.fit(val.features, val.labels, seed, val.maps)
    scorer.info["fitted_on"] = f"{len(val.labels)} labelled maps (threshold out of fold)"
    scores: np.ndarray | None = None
    fold = np.random.default_rng(seed).permutation(len(val.labels)) % 2
    for k in (0, 1):
        fit, held = fold != k, fold == k
        part = scorer
        if fit.sum() >= 2 and held.any():
            part = OODScorer(method, temperature).fit(val.features[fit], val.labels[fit], seed,
                                                      None if val.maps is None else val.maps[fit])
        s = raw(part, val.logits[held], val.features[held], None if val.maps is None else val.maps[held])
        scores = np.empty((len(val.labels), *s.shape[1:]), np.float32) if scores is None else scores
        scores[held] = s
    return _fused(scorer, scores)


def _raw_scorer(scorer: OODScorer) -> Callable[..., np.ndarray]:
    """The scores a threshold (or, for a fused method, the z-scoring) is fitted on: (scorer, logits,
    features, maps) -> scores."""
    if scorer.method in FUSED_PARTS:
        return lambda s, logits, features, maps: s.parts(logits, features, maps)
    return lambda s, logits, features, maps: s.score(logits, features, maps)


def _fused(scorer: OODScorer, raw: np.ndarray) -> tuple[OODScorer, np.ndarray]:
    """(scorer, final validation scores): a fused method first fits its z-scoring on its parts' scores."""
    if scorer.method not in FUSED_PARTS:
        return scorer, raw
    return scorer, scorer.fit_fusion(raw).fuse(raw)
