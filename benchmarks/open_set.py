"""Open-set benchmark: how well each unknown-pattern score spots classes the model never saw.

For every fold, a model is trained (``waferlab.engine.train``, default recipe) WITHOUT the fold's held-out
classes. Logits and pooled features of several layers are then collected once for the run's training part
(no augmentation), validation part, test part (known classes) and the maps of the held-out classes
(unknown); every candidate score in :data:`CANDIDATES` is fitted on train/val exactly as
:func:`waferlab.deploy.ood.fit_scorer` would (or as its formula says) and evaluated on test-known against
unknown. Prints AUROC (unknown = positive) and FPR at 95 % TPR (the share of unknown maps accepted when 95 %
of known maps are accepted, i.e. at the threshold ``predict`` uses), per fold and the mean.

    python benchmarks/open_set.py --folds Donut+Scratch,Center+Edge-Loc --keep /tmp/os   # + the real samples
    python benchmarks/open_set.py --folds Donut+Scratch --no-real --size 32 --epochs 4   # quick
    python benchmarks/open_set.py --set head=linear --set outlier_exposure=0.5 ...    # training variants
    python benchmarks/open_set.py --reuse /tmp/os             # re-score collected folds, no training

The default preset (ResNet34 + ``failpool`` head, 64 px) trains each fold; ``--set`` changes it.
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
    for name in ("layer2", "layer3"):
        if hasattr(backbone, name):
            layers[name] = getattr(backbone, name)
    return layers


def collect(model: object, maps: np.ndarray, spec: object, batch: int = 256) -> dict[str, np.ndarray]:
    """Logits and, per layer, mean-pooled (``NAME``) and max-pooled (``NAME_max``) features."""
    import torch

    from waferlab.engine.predict import prepare_batch

    store: dict[str, list] = {}
    hooks = []
    for name, layer in feature_layers(model).items():
        def hook(_m, _i, out, name=name):
            store.setdefault(name, []).append(out.float().mean(dim=(2, 3)))
            store.setdefault(f"{name}_max", []).append(out.float().amax(dim=(2, 3)))
        hooks.append(layer.register_forward_hook(hook))
    logits = []
    try:
        with torch.no_grad():
            for s in range(0, len(maps), batch):
                x = prepare_batch(torch.from_numpy(maps[s:s + batch]), spec, torch.device("cpu"))
                logits.append(model(x).float() * spec.logit_scale)
    finally:
        for h in hooks:
            h.remove()
    out = {k: torch.cat(v).numpy() for k, v in store.items()}
    out["logits"] = torch.cat(logits).numpy()
    return out


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
        if part != "unknown":
            arrays[f"{part}/labels"] = split.data.labels[rows[part]]
    meta = {"data": kind, "held_out": "+".join(held), "model": args.model, "size": args.size,
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

    def data(part: str) -> ood.FitData:
        return ood.FitData(fold[part, "logits"], fold[part, "labels"], feats(part))

    scorer, _ = ood.fit_scorer(method, data("val"), fold.meta["temperature"], data("train"))
    return lambda part: scorer.score(fold[part, "logits"], feats(part))


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


def candidates(fold: Fold) -> dict[str, Callable[[str], np.ndarray]]:
    """Every candidate score of the fold, each a function part -> scores (higher = more unknown)."""
    t = fold.meta["temperature"]
    logit = {m: (lambda part, m=m: ood.OODScorer(m, t).score(fold[part, "logits"]))
             for m in ("msp", "maxlogit", "energy")}
    c: dict[str, Callable[[str], np.ndarray]] = dict(logit)
    c["maha val (current)"] = _gauss(fold, "cam", "val", True)
    c["maha train"] = _gauss(fold, "cam", "train", True)
    c["maha train raw"] = _gauss(fold, "cam", "train", False)
    c["maha train max-pool"] = _gauss(fold, "cam_max", "train", True)
    layers = [k for k in ("layer2", "layer3") if f"train/{k}" in fold.a]
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
    c["knn GAP+GMP as shipped (ood.fit_scorer, the default)"] = _shipped(fold, "knn")
    if "layer3" in layers:
        c["knn cam + knn layer3 GAP+GMP + energy"] = _rank_sum(c["knn k=5"], c["knn k=5 layer3 GAP+GMP"],
                                                               c["energy"])
    c["maha train + energy"] = _rank_sum(c["maha train"], c["energy"])
    return c


def score_fold(path: Path) -> dict:
    fold = Fold(path)
    acc = float((fold["test", "logits"].argmax(1) == fold["test", "labels"]).mean())
    row = {**fold.meta, "n_train": len(fold["train", "labels"]), "n_val": len(fold["val", "labels"]),
           "n_known_test": len(fold["test", "labels"]), "n_unknown": len(fold["unknown", "logits"]),
           "known_test_accuracy": round(acc, 4), "scores": {}}
    for name, fn in candidates(fold).items():
        known, unk = fn("test"), fn("unknown")
        row["scores"][name] = {"auroc": round(auroc(known, unk), 4), "fpr95": round(fpr_at_95(known, unk), 4)}
    return row


def print_table(rows: list[dict]) -> None:
    """One line per score; one AUROC / FPR95 column per fold, then the mean."""
    def head(r: dict) -> str:
        oe = " OE" if any("outlier" in x for x in r.get("set", [])) else ""
        recipe = f"{r.get('head', 'linear')} {r['size']}px {r['epochs']}ep{oe}"
        return f"{r['data'][:5]} {r['held_out']} ({recipe}, acc {r['known_test_accuracy']:.2f})"

    heads = [head(r) for r in rows]
    print("| score | " + " | ".join(heads) + " | mean AUROC | mean FPR95 |")
    print("|---|" + "---|" * (len(rows) + 2))
    names = list(rows[0]["scores"]) if rows else []
    for name in names:
        cells = [f"{r['scores'][name]['auroc']:.3f} / {r['scores'][name]['fpr95']:.2f}" for r in rows]
        ma = np.mean([r["scores"][name]["auroc"] for r in rows])
        mf = np.mean([r["scores"][name]["fpr95"] for r in rows])
        print(f"| {name} | " + " | ".join(cells) + f" | {ma:.3f} | {mf:.3f} |")


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
