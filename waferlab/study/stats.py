"""Statistics of a study: mean +/- std with a t-interval over seeds, and paired tests between models.

Paired tests compare two models on the SAME test maps (same seed, hence same split):

* a paired bootstrap of the macro-F1 difference: test maps are resampled with replacement (the same resample
  for every model, independently per seed), the statistic is the difference averaged over seeds; the p-value
  is two-sided (twice the smaller tail of the resampled differences around 0);
* McNemar's exact test on correctness, pooled over seeds (discordant pairs summed; a stratified McNemar).

p-values of all pairs are Holm-adjusted (statsmodels) before saying which differences are real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap resamples of the test maps and their seed (fixed: a report is reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
_CHUNK = 250
ALPHA = 0.05


def as_finite(v: object) -> float | None:
    """``v`` as a float when it is a finite number (a table cell may hold None, NaN or text), else None."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Interval:
    """Mean, sample std (ddof 1) and a two-sided t-interval of the mean over ``n`` values."""

    n: int
    mean: float
    std: float | None
    lo: float | None
    hi: float | None


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, bounds: tuple[float, float] | None = None
) -> Interval:
    """Mean +/- t_{(1+c)/2, n-1} * s / sqrt(n); with one value the std and interval are undefined (None).

    ``bounds`` clips the interval to the metric's range (a rate cannot leave [0, 1]; with 2 seeds
    t = 12.7 makes the raw interval wider than the range), so a printed interval never claims the impossible.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, None, None, None)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Interval(n, mean, std, lo, hi)


def macro_f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices (..., K, K) (rows true), averaged over classes present (as metrics)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    denom = support + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    present = support > 0
    return (f1 * present).sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def bootstrap_macro_f1(
    y_true: np.ndarray, preds: np.ndarray, n_classes: int, weights: np.ndarray
) -> np.ndarray:
    """Macro-F1 of each model (rows of ``preds``, M x N) under each resample (rows of ``weights``, B x N)."""
    codes = y_true[None, :] * n_classes + preds  # (M, N) cell of the confusion matrix
    out = np.empty((preds.shape[0], weights.shape[0]))
    w = weights.astype(np.float32)
    for m in range(preds.shape[0]):
        onehot = np.zeros((len(y_true), n_classes * n_classes), dtype=np.float32)
        onehot[np.arange(len(y_true)), codes[m]] = 1.0
        cms = (w @ onehot).reshape(-1, n_classes, n_classes)
        out[m] = macro_f1_from_confusion(cms)
    return out


@dataclass(frozen=True)
class PairedResult:
    """Model a minus model b: observed macro-F1 difference (mean over seeds), its bootstrap CI, p-values."""

    diff: float
    lo: float
    hi: float
    p_bootstrap: float
    discordant_a: int  # maps a got right and b wrong (summed over seeds)
    discordant_b: int
    p_mcnemar: float


def paired_tests(
    y_true: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    n_classes: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[tuple[int, int], PairedResult]:
    """Every ordered pair (a, b), a < b, of M models: ``y_true[s]`` (N_s,), ``preds[s]`` (M, N_s) per seed."""
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(seed)
    m = preds[0].shape[0]
    observed = np.zeros(m)
    boot = np.zeros((m, resamples))
    correct = []
    for y, p in zip(y_true, preds):
        n = len(y)
        observed += macro_f1_from_confusion(_confusions(y, p, n_classes))
        for start in range(0, resamples, _CHUNK):  # chunks keep the (B, N) weights small
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, resamples - start))
            boot[:, start : start + len(weights)] += bootstrap_macro_f1(y, p, n_classes, weights)
        correct.append(p == y[None, :])
    observed /= len(y_true)
    boot /= len(y_true)
    hits = np.concatenate(correct, axis=1)  # (M, total maps)
    out = {}
    for a in range(m):
        for b in range(a + 1, m):
            d = boot[a] - boot[b]
            p_boot = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
            if np.all(d == 0):
                p_boot = 1.0
            n_ab = int(np.sum(hits[a] & ~hits[b]))
            n_ba = int(np.sum(~hits[a] & hits[b]))
            p_mc = 1.0 if n_ab + n_ba == 0 else float(mcnemar([[0, n_ab], [n_ba, 0]], exact=True).pvalue)
            lo, hi = np.quantile(d, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
            out[(a, b)] = PairedResult(
                float(observed[a] - observed[b]), float(lo), float(hi), float(p_boot), n_ab, n_ba, p_mc
            )
    return out


def _confusions(y: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    return np.stack([np.bincount(y * k + p, minlength=k * k).reshape(k, k) for p in preds])


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (family-wise error over all pairs)."""
    if not len(pvalues):
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(pvalues), alpha=ALPHA, method="holm")[1]]
