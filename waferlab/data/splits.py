"""Class sets and train/val/test splits (official, stratified, random, lot-disjoint), seeded.

The split decides what a reported number means: the study's random 80/20 split, WM-811K's own
``trianTestLabel`` split and a lot-disjoint split give very different macro-F1 for the same model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from waferlab.data.cache import PreparedData
from waferlab.data.table import DEFECT8_CLASSES, WM811K_CLASSES
from waferlab.errors import WaferlabError

#: Named class sets: the canonical 9 WM-811K classes, or the study's 8 defect classes in its id order.
CLASS_SETS: dict[str, tuple[str, ...]] = {"all9": WM811K_CLASSES, "defect8": DEFECT8_CLASSES}
#: Split methods understood by :func:`assign_splits`.
SPLIT_METHODS: tuple[str, ...] = ("official", "stratified", "random", "lot")
PARTS: tuple[str, ...] = ("train", "val", "test")
_TAGS = {"training": "train", "train": "train", "test": "test", "testing": "test", "val": "val",
         "validation": "val"}


def select_classes(p: PreparedData, class_set: str | Sequence[str]) -> PreparedData:
    """Keep the rows whose class is in ``class_set`` and renumber labels in that set's order.

    ``"all9"``: the 9 WM-811K classes; ``"defect8"``: the 8 defect classes in the study's failureNum
    order (drops ``none``); a sequence of names picks those classes. Unlabeled rows are always dropped.
    """
    if isinstance(class_set, str):
        if class_set not in CLASS_SETS:
            raise WaferlabError(f"unknown class set {class_set!r}; choose one of {', '.join(CLASS_SETS)}")
        target = CLASS_SETS[class_set]
        label = class_set
    else:
        target = tuple(str(c) for c in class_set)
        label = ",".join(target)
        if not target or len(set(target)) != len(target):
            raise WaferlabError(f"class set {label!r} must list distinct class names")
    where = p.source or "data"
    unknown = [c for c in target if c not in p.class_names]
    if len(unknown) == len(target):
        raise WaferlabError(f"{where}: none of the classes of set {label!r} occur in this data "
                            f"(it has {', '.join(p.class_names) or 'no classes'})")
    new_id = {name: i for i, name in enumerate(target)}
    remap = np.array([new_id.get(name, -1) for name in p.class_names] + [-1], dtype=np.int64)
    labels = remap[np.where(p.labels < 0, len(p.class_names), p.labels)]
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        raise WaferlabError(f"{where}: no maps of class set {label!r} in this data")
    out = p.subset(keep)
    out.labels = labels[keep]
    out.class_names = target
    return out


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        f = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        raise WaferlabError(f"split fractions must be three numbers (train, val, test), "
                            f"got {fractions!r}") from None
    if len(f) != 3 or any(x < 0 or not np.isfinite(x) for x in f):
        raise WaferlabError(f"split fractions must be three non-negative numbers (train, val, test), "
                            f"got {fractions!r}")
    if abs(sum(f) - 1.0) > 1e-6:
        raise WaferlabError(f"split fractions {fractions!r} sum to {sum(f):g}, not 1")
    if f[0] <= 0:
        raise WaferlabError(f"split fractions {fractions!r} leave no training part")
    return f  # type: ignore[return-value]


def _allocate(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Part sizes for ``n`` items: largest remainder, and at least one per positive part when n allows.

    Too few items for every positive part (n smaller than their number) puts them all in train.
    """
    f = np.asarray(fractions, dtype=np.float64)
    positive = f > 0
    if n < positive.sum():
        return np.array([n] + [0] * (len(f) - 1), dtype=np.int64)
    raw = f * n
    counts = np.floor(raw).astype(np.int64)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    for k in np.flatnonzero(positive & (counts == 0)):  # give an empty positive part one item
        donor = int(np.argmax(counts))
        counts[donor] -= 1
        counts[k] += 1
    return counts


def _stratified(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    out = np.empty(len(labels), dtype="<U5")
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        counts = _allocate(len(members), fractions)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k, part in enumerate(PARTS[:len(counts)]):
            out[members[bounds[k]:bounds[k + 1]]] = part
    return out


def _strata(p: PreparedData) -> np.ndarray:
    """Stratification key per row: the label id (unlabeled rows form their own stratum)."""
    return p.labels.copy()


def assign_splits(p: PreparedData, method: str, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> np.ndarray:
    """``"train"``/``"val"``/``"test"`` for every row of ``p``; the same seed always gives the same split.

    ``official``: trianTestLabel Training -> train (a stratified val part carved out in the ratio
    fractions[1]:fractions[0]), Test -> test. ``stratified``: per-class fractions. ``random``: plain
    shuffle (the attention study's protocol). ``lot``: whole lots go to one part (no lot is shared).
    """
    f = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    n = len(p)
    where = p.source or "data"
    if method == "random":
        counts = _allocate(n, f) if n else np.zeros(3, np.int64)
        out = np.empty(n, dtype="<U5")
        perm = rng.permutation(n)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k, part in enumerate(PARTS):
            out[perm[bounds[k]:bounds[k + 1]]] = part
        return out
    if method == "stratified":
        return _stratified(_strata(p), f, rng)
    if method == "official":
        return _official(p, f, rng, where)
    if method == "lot":
        return _lot_split(p, f, rng, where)
    raise WaferlabError(f"unknown split method {method!r}; choose one of {', '.join(SPLIT_METHODS)}")


def _official(p: PreparedData, f: Sequence[float], rng: np.random.Generator, where: str) -> np.ndarray:
    tags = np.array([_TAGS.get(str(s).strip().lower(), "") for s in p.split.tolist()], dtype="<U5")
    if len(tags) and not (tags != "").any():
        raise WaferlabError(f"{where}: the official split needs the source's trianTestLabel tags, and this "
                            f"data has none; use the stratified, random or lot split")
    missing = np.flatnonzero(tags == "")
    if len(missing):
        raise WaferlabError(f"{where}: row {int(missing[0])}: no trianTestLabel tag ({len(missing)} of "
                            f"{len(tags)} rows untagged, usually unlabeled maps); select a class set first")
    out = tags.copy()
    train = np.flatnonzero(tags == "train")
    if f[1] > 0 and len(train):
        val_share = f[1] / (f[0] + f[1])
        sub = _stratified(_strata(p)[train], (1.0 - val_share, val_share, 0.0), rng)
        out[train[sub == "val"]] = "val"
    return out


def _lot_split(p: PreparedData, f: Sequence[float], rng: np.random.Generator, where: str) -> np.ndarray:
    """Greedy lot-disjoint split: lots holding rare classes are placed first, each into the part where it
    best brings every class's share towards the fractions (first making sure each class reaches each part)."""
    lots = np.array([str(x) for x in p.lot.tolist()], dtype=object)
    if len(lots) and all(s == "" for s in lots):
        raise WaferlabError(f"{where}: the lot split needs lot names and this data has none; "
                            f"use the stratified or random split")
    # rows without a lot name are their own group
    keys = np.where(lots == "", np.array([f"\0row{i}" for i in range(len(lots))], dtype=object), lots)
    group_names, group = np.unique(keys.astype(str), return_inverse=True)
    group = group.reshape(-1)
    strata = _strata(p)
    _, stratum = np.unique(strata, return_inverse=True)
    stratum = stratum.reshape(-1)
    n_groups, n_strata = len(group_names), int(stratum.max()) + 1 if len(stratum) else 0
    counts = np.zeros((n_groups, n_strata), dtype=np.float64)
    np.add.at(counts, (group, stratum), 1.0)
    class_total = np.maximum(counts.sum(0), 1.0)
    share = counts / class_total[None, :]  # each lot's share of every class
    f_arr = np.asarray(f, dtype=np.float64)
    have = np.zeros((3, n_strata), dtype=np.float64)  # share of each class placed in each part so far
    # rarest class present in the lot first; random tie-break
    rarest = np.where(counts > 0, class_total[None, :], np.inf).min(1)
    order = np.lexsort((rng.random(n_groups), rarest))
    assign = np.empty(n_groups, dtype=np.int64)
    parts = np.flatnonzero(f_arr > 0)
    # a class spread over at least one lot per part should reach every part: missing it there earns a bonus
    coverable = (counts > 0).sum(0) >= len(parts)
    for g in order:
        nz = np.flatnonzero(counts[g])
        v = share[g, nz]
        h = have[np.ix_(parts, nz)]
        # change of sum_c (share_kc - f_k)^2 / f_k when the lot joins part k: every class weighs the same
        # and every part fills at the same relative pace
        fk = f_arr[parts, None]
        delta = (v * (2.0 * (h - fk) + v) / fk).sum(1)
        delta -= ((h == 0) & coverable[nz]).sum(1)
        delta -= 1e-12 * f_arr[parts]  # exact ties go to the larger part
        k = parts[int(np.argmin(delta))]
        assign[g] = k
        have[k, nz] += v
    return np.array(PARTS, dtype="<U5")[assign[group]]


def split_summary(p: PreparedData, assignment: np.ndarray) -> dict[str, dict[str, int]]:
    """Class counts of each part (``{"train": {class: n, ...}, ...}``), for protocol cards and logs."""
    return {part: p.subset(np.flatnonzero(assignment == part)).class_counts() for part in PARTS}
