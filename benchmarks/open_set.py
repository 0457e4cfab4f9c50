"""Open-set benchmark: how well each unknown-pattern score spots classes the model never saw.

For every fold, a model is trained (``waferlab.engine.train``, default recipe) WITHOUT the fold's held-out
classes. Logits and pooled features of several layers are then collected once for the run's training part
(no augmentation), validation part, test part (known classes) and the maps of the held-out classes
(unknown); every candidate score of :func:`candidates` is fitted on train/val exactly as
:func:`waferlab.deploy.ood.fit_scorer` would (or as its formula says) and evaluated on test-known against
unknown. Prints AUROC (unknown = positive) and FPR at 95 % TPR (the share of unknown maps accepted when 95 %
of known maps are accepted, i.e. at the threshold ``predict`` uses), per fold and the mean.

    python benchmarks/open_set.py --folds Donut+Scratch,Center+Edge-Loc --keep /tmp/os   # + the real samples
    python benchmarks/open_set.py --folds Donut+Scratch,Center+Edge-Loc --seed 1 --keep /tmp/os1  # 2nd seed
    python benchmarks/open_set.py --folds Donut+Scratch --no-real --size 32 --epochs 4   # quick
    python benchmarks/open_set.py --set head=linear --set outlier_exposure=0.5 ...    # training variants
    python benchmarks/open_set.py --reuse /tmp/os             # re-score collected folds, no training

The default preset (ResNet34 + ``failpool`` head, 64 px) trains each fold; ``--set`` changes it.

Besides the pooled features, each part keeps the spatial maps of layer1..layer3 and the CAM layer
(``NAME_sp``, for the patch-level k-NN), logits and pooled features averaged over the 8 rotations/flips of the
map (``NAME_d8``: test-time averaging, 8x the inference), the maps themselves and the held-out maps' class
names. With those the table adds each held-out class's own AUROC, and a diagnosis: the class the model
predicts for each held-out class and the classes of its 5 nearest training maps at every layer.

What it found (docs/deploy_measurements.md, two seeds): held-out Scratches sit next to ``none`` (about 60 % of
their 5 nearest training maps at every layer, ``none`` also being the predicted class) and ``Loc``; the thin
line weighs little against the random background fails, and less the larger the original wafer (a 1-die line
thinned by the nearest resize to 64 px): synthetic Scratch AUROC 0.79-0.81 on wafers under 40 dies a side,
0.52-0.64 on wafers over 64. The logit scores find Scratches (energy, GradNorm 0.84-0.88) but not Donuts or
Centers (0.47-0.77), the feature scores the reverse; only 8-view averaging gained on every fold, at 8x the
cost; no candidate at the default's cost beat it on the tuning fold by more than seed noise.

Issue #13 (README "Deploy", the same kept folds of seeds 0 and 1, ``--reuse``): ``knn+wafer`` (the deep k-NN
z-summed with a k-NN on 18 classic wafer descriptors of the map, :mod:`waferlab.deploy.descriptors`) lifts
the mean AUROC from 0.792 to 0.879 (real Donut+Scratch 0.836/0.790, synthetic Center+Edge-Loc 0.923/0.919,
synthetic Donut+Scratch 0.903/0.902) and became the default; the descriptor set was chosen on these same
folds, so the fold that chose nothing (``--folds Loc+Edge-Ring --no-real``) is its honest test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from waferlab.deploy import ood
from waferlab.errors import WaferlabError

REAL_SOURCES = ("wm811k_mdjunayed_jpg32_45e5fc1/WM811k_Dataset",
                "wm811k_dm3_ntu_png96_56c3b1a/generated_images",
                "wm811k_marco_scatassi_png_0439f8b/Image_for_deploy",
                "wm811k_dm3_ntu_png_67f9ccf/generated_images",
                "wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl")
DEFAULT_FOLDS = ("Donut+Scratch", "Center+Edge-Loc", "Random+Near-full", "Loc+Edge-Ring")
PARTS = ("train", "val", "test", "unknown")


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown map > score of a known map), ties counted half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([known, unknown]))
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def fpr_at_95(known: np.ndarray, unknown: np.ndarray) -> float:
    """Share of unknown maps scored at or below the known maps' 95th percentile (accepted as known)."""
    return float((unknown <= np.quantile(known, 0.95, method="higher")).mean())


# ------------------------------------------------------------------------------------------------ data
def _concat(parts: list) -> object:
    from dataclasses import replace

    first = parts[0]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in
           ("maps", "labels", "split", "lot", "wafer_index", "orig_shape")}
    return replace(first, **cat, multi_hot=None, masks=None, source="real samples")


def build_data(kind: str, held: tuple[str, ...], n: int, size: int, folder: Path,
               seed: int) -> tuple[Path, object]:
    """(cache of the known classes, prepared maps of the held-out classes) for a fold."""
    from waferlab.data.cache import load_prepared, prepare, save_cache
    from waferlab.data.synth import generate
    from waferlab.data.table import WM811K_CLASSES

    if kind == "synthetic":
        known = [c for c in WM811K_CLASSES if c not in held]
        train = prepare(generate(n, seed=seed, classes=known), size)
        unknown = prepare(generate(max(200, n // 8), seed=seed + 1, classes=list(held)), size)
    else:
        root = Path(os.environ.get("WAFERLAB_SHARED_DATA", "/work/shared/data"))
        allp = _concat([load_prepared(root / s, size) for s in REAL_SOURCES])
        names = np.array(allp.class_names, dtype=object)[allp.labels]
        is_held = np.isin(names, list(held))
        train, unknown = allp.subset(~is_held & (allp.labels >= 0)), allp.subset(is_held)
    path = folder / f"{kind}_{'+'.join(held)}.npz"
    save_cache(train, path)
    return path, unknown


def feature_layers(model: object) -> dict[str, object]:
    """Layers whose pooled output is collected: the model's ``cam_target_layer`` (the penultimate features
    of a GAP -> Linear head) and, for ResNet-style backbones, the earlier stages."""
    layers = {"cam": model.cam_target_layer}
    inner = getattr(model, "model", model)  # a FailPooled wrapper's network
    if inner is not model:
        layers["ungated"] = inner.cam_target_layer  # the CAM-layer map before the failed-die gate
    backbone = getattr(inner, "backbone", None)
    for name in ("layer1", "layer2", "layer3"):
        if hasattr(backbone, name):
            layers[name] = getattr(backbone, name)
    return layers


#: Layers whose spatial feature map is kept too (``NAME_sp``, float16, at most :data:`SPATIAL` cells a side):
#: for the patch-level scores (a scratch is a local structure that no known class has).
SPATIAL_LAYERS = ("layer1", "layer2", "layer3", "ungated", "cam")
SPATIAL = 16


def collect(model: object, maps: np.ndarray, spec: object, batch: int = 256) -> dict[str, np.ndarray]:
    """Logits and, per layer, mean-pooled (``NAME``) and max-pooled (``NAME_max``) features, the spatial
    maps of :data:`SPATIAL_LAYERS` (``NAME_sp``) and the pooled features and logits averaged over the 8
    dihedral views of each map (``NAME_d8``, ``NAME_max_d8``, ``logits_d8``: test-time averaging)."""
    import torch
    import torch.nn.functional as F

    from waferlab.engine.predict import dihedral_view, prepare_batch

    cur: dict[str, object] = {}
    hooks = []
    for name, layer in feature_layers(model).items():
        def hook(_m, _i, out, name=name):
            cur[name] = out.float()
        hooks.append(layer.register_forward_hook(hook))
    store: dict[str, list] = {}
    try:
        with torch.no_grad():
            for s in range(0, len(maps), batch):
                x = prepare_batch(torch.from_numpy(maps[s:s + batch]), spec, torch.device("cpu"))
                acc: dict[str, object] = {}
                for t in range(8):
                    logits = model(dihedral_view(x, t)).float() * spec.logit_scale
                    views = {"logits": logits}
                    for name, out in cur.items():
                        views[name], views[f"{name}_max"] = out.mean(dim=(2, 3)), out.amax(dim=(2, 3))
                        if t == 0 and name in SPATIAL_LAYERS:
                            sp = out if out.shape[-1] <= SPATIAL else F.adaptive_avg_pool2d(out, SPATIAL)
                            store.setdefault(f"{name}_sp", []).append(sp.half())
                    for k, v in views.items():
                        if t == 0:
                            store.setdefault(k, []).append(v)
                        acc[k] = acc.get(k, 0) + v / 8
                for k, v in acc.items():
                    store.setdefault(f"{k}_d8", []).append(v)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in store.items()}


def run_fold(kind: str, held: tuple[str, ...], args: argparse.Namespace, folder: Path) -> Path:
    """Train without ``held``; save logits/features of every part to ``folder/collected.npz``."""
    from waferlab.engine.config import build_config
    from waferlab.engine.run import Run
    from waferlab.engine.train import load_split_data, train

    data, unknown = build_data(kind, held, args.n, args.size, folder, args.seed)
    cfg = build_config("default", {"model": args.model, "data": str(data), "out": str(folder / "run"),
                                   "epochs": args.epochs, "image_size": args.size, "batch_size": 64,
                                   "progress": False, "seed": args.seed},
                       ["precise_bn_batches=5", *args.set])
    run = Run.open(train(cfg, overwrite=True) or "")
    split = load_split_data(cfg)
    model, spec = run.load_model("cpu").eval(), run.spec()
    arrays: dict[str, np.ndarray] = {}
    rows = {"train": split.train, "val": split.val, "test": split.test}
    for part in PARTS:
        maps = unknown.maps if part == "unknown" else split.data.maps[rows[part]]
        for k, v in collect(model, maps, spec).items():
            arrays[f"{part}/{k}"] = v
        arrays[f"{part}/maps"] = maps
        if part != "unknown":
            arrays[f"{part}/labels"] = split.data.labels[rows[part]]
    arrays["unknown/class"] = np.array(unknown.class_names, dtype=str)[unknown.labels]
    meta = {"data": kind, "held_out": "+".join(held), "model": args.model, "size": args.size,
            "class_names": json.dumps(list(spec.class_names)),
            "epochs": args.epochs, "head": cfg.head, "set": list(args.set),
            "temperature": run.temperature() if run.has("calibration.json") else 1.0}
    out = folder / "collected.npz"
    np.savez(out, meta=json.dumps(meta), **arrays)
    return out


# ------------------------------------------------------------------------------------------------ scores
class Fold:
    """Collected arrays of one fold: ``fold[part, key]``."""

    def __init__(self, path: Path) -> None:
        z = np.load(path, allow_pickle=False)
        self.meta = json.loads(str(z["meta"]))
        self.a = {k: z[k] for k in z.files if k != "meta"}

    def __getitem__(self, key: tuple[str, str]) -> np.ndarray:
        return self.a[f"{key[0]}/{key[1]}"]


def _gauss(fold: Fold, layer: str, fit_on: str, norm: bool) -> Callable[[str], np.ndarray]:
    f = fold[fit_on, layer]
    means, w = ood.fit_gaussian(f, fold[fit_on, "labels"], normalise_features=norm)
    return lambda part: ood.mahalanobis_min(ood.normalise(fold[part, layer]) if norm else fold[part, layer],
                                            means, w)


def _knn(fold: Fold, layer: str, k: int, fit_on: str = "train") -> Callable[[str], np.ndarray]:
    bank = ood.normalise(fold[fit_on, layer])
    return lambda part: ood.knn_distance(ood.normalise(fold[part, layer]), bank, k)


def _knn_concat(fold: Fold, layers: tuple[str, ...], k: int) -> Callable[[str], np.ndarray]:
    """k-NN on the concatenation of each layer's normalised features (each layer weighs the same)."""
    def feats(part: str) -> np.ndarray:
        return ood.normalise(np.concatenate([ood.normalise(fold[part, n]) for n in layers], axis=1))

    bank = feats("train")
    return lambda part: ood.knn_distance(feats(part), bank, k)


def _knn_class(fold: Fold, layer: str, k: int) -> Callable[[str], np.ndarray]:
    """Class-conditional k-NN: distance to the k-th nearest training map of the predicted class."""
    y = fold["train", "labels"]
    banks = {c: ood.normalise(fold["train", layer][y == c]) for c in np.unique(y)}

    def score(part: str) -> np.ndarray:
        f, pred = ood.normalise(fold[part, layer]), fold[part, "logits"].argmax(1)
        out = np.zeros(len(f), np.float32)
        for c in np.unique(pred):
            rows = pred == c
            out[rows] = ood.knn_distance(f[rows], banks[c], k) if c in banks else 2.0
        return out
    return score


def _shipped(fold: Fold, method: str) -> Callable[[str], np.ndarray]:
    """The score exactly as training fits it (:func:`waferlab.deploy.ood.fit_scorer`): statistics from the
    training part, threshold data (and a fused score's z-scoring) from the validation part."""
    def feats(part: str) -> np.ndarray:  # the engine's layout: average | max pooling
        return np.concatenate([fold[part, "cam"], fold[part, "cam_max"]], axis=1)

    def data(part: str) -> ood.FitData:  # the collected maps are the model's input (the run's size)
        return ood.FitData(fold[part, "logits"], fold[part, "labels"], feats(part), fold[part, "maps"])

    scorer, _ = ood.fit_scorer(method, data("val"), fold.meta["temperature"], data("train"))
    return lambda part: scorer.score(fold[part, "logits"], feats(part), fold[part, "maps"])


def _rank_fuse(*fns: Callable[[str], np.ndarray], ref: str = "val") -> Callable[[str], np.ndarray]:
    """Sum of each score's rank among the validation scores (its empirical CDF there)."""
    refs = [np.sort(fn(ref)) for fn in fns]
    return lambda part: sum(np.searchsorted(r, fn(part), side="right") / len(r) for fn, r in zip(fns, refs))


def _vim(fold: Fold, layer: str) -> Callable[[str], np.ndarray]:
    """ViM (Wang et al. 2022) with the training features' mean as origin (the head need not be linear on
    ``layer``): residual norm outside the principal subspace, scaled to the energy, plus the energy."""
    f = fold["train", layer]
    mu = f.mean(axis=0)
    _, _, vt = np.linalg.svd(f - mu, full_matrices=False)
    dim = max(1, min(f.shape[1] // 2, int(np.searchsorted(np.cumsum(np.var((f - mu) @ vt.T, axis=0))
                                                              / np.var(f - mu, axis=0).sum(), 0.9)) + 1))
    ns = vt[dim:].T

    def resid(part: str) -> np.ndarray:
        return np.linalg.norm((fold[part, layer] - mu) @ ns, axis=1)

    def energy(part: str) -> np.ndarray:
        return ood._logsumexp(fold[part, "logits"])

    alpha = energy("train").mean() / max(resid("train").mean(), 1e-12)
    return lambda part: alpha * resid(part) - energy(part)


def _rank_sum(*fns: Callable[[str], np.ndarray], ref: str = "val") -> Callable[[str], np.ndarray]:
    """Sum of scores standardised by their mean/std on the validation part (each weighs the same)."""
    stats = [(fn(ref).mean(), fn(ref).std() + 1e-12) for fn in fns]
    return lambda part: sum((fn(part) - m) / s for fn, (m, s) in zip(fns, stats))


def _patch_knn(fold: Fold, layer: str, k: int = 1, cap: int = 10000, seed: int = 0
               ) -> Callable[[str], np.ndarray]:
    """Patch-level k-NN (PatchCore-like): every cell of the spatial map ``layer`` (L2-normalised) against a
    bank of up to ``cap`` training cells; a map scores its strangest cell (a local structure no known map
    has)."""
    def cells(part: str) -> np.ndarray:
        sp = fold[part, f"{layer}_sp"].astype(np.float32)
        return ood.normalise(sp.reshape(*sp.shape[:2], -1).transpose(0, 2, 1).reshape(-1, sp.shape[1]))

    bank = cells("train")
    if len(bank) > cap:
        bank = bank[np.random.default_rng(seed).choice(len(bank), cap, replace=False)]
    return lambda part: ood.knn_distance(cells(part), bank, k).reshape(len(fold[part, "logits"]), -1).max(1)


def _gradnorm(fold: Fold, sfx: str = "") -> Callable[[str], np.ndarray]:
    """GradNorm (Huang et al. 2021) of a linear head on the pooled CAM-layer features: L1 norm of the
    gradient of KL(uniform || softmax) w.r.t. the last layer, negated (small gradient = unknown)."""
    def score(part: str) -> np.ndarray:
        z = fold[part, f"logits{sfx}"]
        p = np.exp(z - ood._logsumexp(z)[:, None])
        return -(np.abs(1.0 / z.shape[1] - p).sum(1) * np.abs(fold[part, f"cam{sfx}"]).sum(1))
    return score


def _react(fold: Fold, run_dir: Path, pct: float = 90) -> Callable[[str], np.ndarray] | None:
    """ReAct (Sun et al. 2021): energy of the logits recomputed from the pooled CAM-layer features clipped at
    their training ``pct`` percentile; None when the run's classifier is not one linear layer on them."""
    from waferlab.engine.run import Run

    if not (run_dir / "run").is_dir():
        return None
    run = Run.open(str(run_dir / "run"))
    lin, scale = run.load_model("cpu").classifier, run.spec().logit_scale
    w, b = (lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()) if hasattr(
        lin, "bias") and lin.bias is not None else (None, None)
    if w is None or w.shape[1] != fold["test", "cam"].shape[1] or not np.allclose(
            (fold["test", "cam"] @ w.T + b) * scale, fold["test", "logits"], atol=1e-3):
        return None
    clip, t = np.percentile(fold["train", "cam"], pct), fold.meta["temperature"]
    return lambda part: -t * ood._logsumexp((np.minimum(fold[part, "cam"], clip) @ w.T + b) * scale / t)


def _z_max(*fns: Callable[[str], np.ndarray], ref: str = "val") -> Callable[[str], np.ndarray]:
    """Largest of the scores standardised on the validation part: a map is as strange as its strangest
    view (complementary scores: k-NN finds Donuts, the logit scores find Scratches)."""
    stats = [(fn(ref).mean(), fn(ref).std() + 1e-12) for fn in fns]
    return lambda part: np.max([(fn(part) - m) / s for fn, (m, s) in zip(fns, stats)], axis=0)


def _new_candidates(fold: Fold, c: dict[str, Callable[[str], np.ndarray]], run_dir: Path | None) -> None:
    """This round's candidates (patch k-NN, dihedral test-time averaging, GradNorm, ReAct, max fusion),
    each only when the fold collected what it needs (folds kept by an older benchmark lack some)."""
    has = fold.a.__contains__
    c["knn k=1 cam GAP+GMP"] = _knn_concat(fold, ("cam", "cam_max"), 1)
    for name in ("cam", "layer3", "layer2"):
        if has(f"train/{name}_sp"):
            c[f"patch k-NN k=1 {name} (max over cells)"] = _patch_knn(fold, name)
    if has("train/cam_d8"):
        c["knn k=5 cam GAP+GMP, 8 dihedral views averaged (8x cost)"] = _knn_concat(
            fold, ("cam_d8", "cam_max_d8"), 5)
        c["knn k=5 layer3 GAP+GMP, 8 views (8x cost)"] = _knn_concat(fold, ("layer3_d8", "layer3_max_d8"), 5)
        c["knn k=5 layer2+layer3+cam GAP+GMP, 8 views (8x cost)"] = _knn_concat(
            fold, ("layer2_d8", "layer2_max_d8", "layer3_d8", "layer3_max_d8", "cam_d8", "cam_max_d8"), 5)
    c["GradNorm"] = _gradnorm(fold)
    react = _react(fold, run_dir) if run_dir is not None else None
    if react is not None:
        c["ReAct energy (p90 clip)"] = react
    k5 = c["knn GAP+GMP as shipped (ood.fit_scorer)"]
    c["max(z knn, z energy)"] = _z_max(k5, c["energy"])
    c["max(z knn, z GradNorm)"] = _z_max(k5, c["GradNorm"])
    if "patch k-NN k=1 cam (max over cells)" in c:
        c["max(z patch k-NN cam, z energy)"] = _z_max(c["patch k-NN k=1 cam (max over cells)"], c["energy"])


def candidates(fold: Fold, run_dir: Path | None = None) -> dict[str, Callable[[str], np.ndarray]]:
    """Every candidate score of the fold, each a function part -> scores (higher = more unknown)."""
    t = fold.meta["temperature"]
    logit = {m: (lambda part, m=m: ood.OODScorer(m, t).score(fold[part, "logits"]))
             for m in ("msp", "maxlogit", "energy")}
    c: dict[str, Callable[[str], np.ndarray]] = dict(logit)
    c["maha val (current)"] = _gauss(fold, "cam", "val", True)
    c["maha train"] = _gauss(fold, "cam", "train", True)
    c["maha train raw"] = _gauss(fold, "cam", "train", False)
    c["maha train max-pool"] = _gauss(fold, "cam_max", "train", True)
    layers = [k for k in ("layer2", "layer3") if f"train/{k}" in fold.a]  # layer1: see the patch scores
    for name in layers:
        c[f"maha train {name}"] = _gauss(fold, name, "train", True)
    if layers:
        c["maha train multi-layer"] = _rank_sum(*(c[f"maha train {n}"] for n in layers), c["maha train"])
    for k in (1, 5, 20, 50):
        c[f"knn k={k}"] = _knn(fold, "cam", k)
    c["knn k=5 val bank"] = _knn(fold, "cam", 5, fit_on="val")
    c["knn k=5 max-pool"] = _knn(fold, "cam_max", 5)
    if layers:
        c["knn k=5 multi-layer"] = _rank_sum(*(_knn(fold, n, 5) for n in layers), c["knn k=5"])
    for name in layers:
        c[f"knn k=5 {name}"] = _knn(fold, name, 5)
    if "layer3" in layers:
        c["knn k=5 layer3+cam concat"] = _knn_concat(fold, ("layer3", "cam"), 5)
    c["knn k=5 cam GAP+GMP"] = _knn_concat(fold, ("cam", "cam_max"), 5)
    if "train/ungated" in fold.a:
        c["knn k=5 ungated (failpool: before the gate)"] = _knn(fold, "ungated", 5)
    if "layer3" in layers:
        c["knn k=5 layer3 GAP+GMP"] = _knn_concat(fold, ("layer3", "layer3_max"), 5)
    c["knn k=5 class-conditional"] = _knn_class(fold, "cam", 5)
    c["vim"] = _vim(fold, "cam")
    c["knn k=5 + energy"] = _rank_sum(c["knn k=5"], c["energy"])
    c["knn k=5 + energy (rank fusion)"] = _rank_fuse(c["knn k=5"], c["energy"])
    c["knn+energy GAP+GMP as shipped (ood.fit_scorer)"] = _shipped(fold, "knn+energy")
    c["knn GAP+GMP as shipped (ood.fit_scorer)"] = _shipped(fold, "knn")
    c[f"{ood.DEFAULT_METHOD} as shipped (ood.fit_scorer, the default)"] = _shipped(fold, ood.DEFAULT_METHOD)
    if "layer3" in layers:
        c["knn cam + knn layer3 GAP+GMP + energy"] = _rank_sum(c["knn k=5"], c["knn k=5 layer3 GAP+GMP"],
                                                               c["energy"])
    c["maha train + energy"] = _rank_sum(c["maha train"], c["energy"])
    _new_candidates(fold, c, run_dir)
    return c


def score_fold(path: Path) -> dict:
    fold = Fold(path)
    acc = float((fold["test", "logits"].argmax(1) == fold["test", "labels"]).mean())
    row = {**fold.meta, "n_train": len(fold["train", "labels"]), "n_val": len(fold["val", "labels"]),
           "n_known_test": len(fold["test", "labels"]), "n_unknown": len(fold["unknown", "logits"]),
           "known_test_accuracy": round(acc, 4), "scores": {}}
    held = fold.a.get("unknown/class")
    for name, fn in candidates(fold, path.parent).items():
        known, unk = fn("test"), fn("unknown")
        row["scores"][name] = {"auroc": round(auroc(known, unk), 4), "fpr95": round(fpr_at_95(known, unk), 4)}
        if held is not None:  # AUROC of each held-out class on its own
            row["scores"][name]["per_class"] = {str(c): round(auroc(known, unk[held == c]), 4)
                                                for c in np.unique(held)}
    if held is not None:
        row["neighbours"] = neighbour_classes(fold, held)
    return row


def neighbour_classes(fold: Fold, held: np.ndarray, k: int = 5) -> dict[str, dict[str, dict[str, float]]]:
    """Why held-out maps look known: per layer (GAP+GMP features) and held-out class, the share of each known
    class among their k nearest training maps, and the class the model predicts for them (``predicted``)."""
    names = json.loads(fold.meta.get("class_names", "null") or "null")
    y = fold["train", "labels"]

    def name(i: int) -> str:
        return names[i] if names else str(i)

    out: dict[str, dict[str, dict[str, float]]] = {}
    layers = [n for n in ("layer1", "layer2", "layer3", "ungated", "cam") if f"train/{n}" in fold.a]
    pred = fold["unknown", "logits"].argmax(1)
    for c in np.unique(held):
        out.setdefault("predicted", {})[str(c)] = _shares(pred[held == c], name)
    for layer in layers:
        bank = _gap_gmp(fold, "train", layer)
        sim = _gap_gmp(fold, "unknown", layer) @ bank.T
        nearest = y[np.argsort(-sim, axis=1)[:, :k]]
        out[layer] = {str(c): _shares(nearest[held == c].ravel(), name) for c in np.unique(held)}
    return out


def _gap_gmp(fold: Fold, part: str, layer: str) -> np.ndarray:
    return ood.normalise(np.concatenate([ood.normalise(fold[part, layer]),
                                         ood.normalise(fold[part, f"{layer}_max"])], axis=1))


def _shares(ids: np.ndarray, name: Callable[[int], str], top: int = 3) -> dict[str, float]:
    counts = np.bincount(ids)
    order = np.argsort(-counts)[:top]
    return {name(int(i)): round(float(counts[i] / counts.sum()), 2) for i in order if counts[i]}


def print_table(rows: list[dict]) -> None:
    """One line per score; one AUROC / FPR95 column per fold, then the mean."""
    def head(r: dict) -> str:
        oe = " OE" if any("outlier" in x for x in r.get("set", [])) else ""
        recipe = f"{r.get('head', 'linear')} {r['size']}px {r['epochs']}ep{oe}"
        return f"{r['data'][:5]} {r['held_out']} ({recipe}, acc {r['known_test_accuracy']:.2f})"

    heads = [head(r) for r in rows]
    print("| score | " + " | ".join(heads) + " | mean AUROC | mean FPR95 |")
    print("|---|" + "---|" * (len(rows) + 2))
    names = [n for n in rows[0]["scores"] if all(n in r["scores"] for r in rows)] if rows else []
    for name in names:
        cells = [f"{r['scores'][name]['auroc']:.3f} / {r['scores'][name]['fpr95']:.2f}" for r in rows]
        ma = np.mean([r["scores"][name]["auroc"] for r in rows])
        mf = np.mean([r["scores"][name]["fpr95"] for r in rows])
        print(f"| {name} | " + " | ".join(cells) + f" | {ma:.3f} | {mf:.3f} |")
    split = [r for r in rows if "neighbours" in r]
    if split:
        print("\nAUROC of each held-out class on its own:\n")
        cols = [f"{head(r)} {c}" for r in split for c in r["neighbours"]["predicted"]]
        print("| score | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * sum(len(r["neighbours"]["predicted"]) for r in split))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{a:.3f}" for r in split
                                            for a in r["scores"][name]["per_class"].values()) + " |")
        print("\nWhy held-out maps look known: classes the model predicts for them and classes of their 5 "
              "nearest training maps, per layer (GAP+GMP features):\n")
        for r in split:
            for layer, per in r["neighbours"].items():
                shares = [f"{c} -> " + ", ".join(f"{k} {v:.2f}" for k, v in d.items())
                          for c, d in per.items()]
                print(f"- {head(r)} {layer}: " + "; ".join(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=64, help="image size (the default preset's: 64)")
    parser.add_argument("--n", type=int, default=2400, help="synthetic maps per fold (known classes)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", default=",".join(DEFAULT_FOLDS), help="comma-separated A+B held-out sets")
    parser.add_argument("--no-real", action="store_true", help="skip the fold on the real samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override (as the CLI's --set), e.g. head=linear")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--keep", default=None, help="keep the runs and collected arrays in this folder")
    parser.add_argument("--reuse", default=None, help="only score the collected.npz files under this folder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("WAFERLAB_THREADS", "2")))
    if args.reuse:
        paths = sorted(Path(args.reuse).glob("*/collected.npz"))
    else:
        jobs = [("synthetic", tuple(f.split("+"))) for f in args.folds.split(",") if f]
        if not args.no_real:
            jobs.append(("real", ("Donut", "Scratch")))
        paths = []
        keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="waferlab_openset_"))
        for kind, held in jobs:
            folder = keep / f"{kind}_{'+'.join(held)}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                paths.append(run_fold(kind, held, args, folder))
            except WaferlabError as exc:
                print(f"{kind} {'+'.join(held)}: skipped ({exc})", file=sys.stderr)
    rows = [score_fold(p) for p in paths]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
