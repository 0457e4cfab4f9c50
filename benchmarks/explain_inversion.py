"""Why does a CAM avoid the defect? Heat inside the pattern, in a band around it and on the rest of the wafer.

For each trained run (``RUN_DIR``) and held-out synthetic maps with known pattern regions, on correctly
classified maps of the localised classes, this prints the mean [0, 1] heat in three zones: the pattern
region, a band of ``--band`` pixels just outside it (good dies bordering the pattern), and the rest of
the wafer, for

* ``gradcam``: GradCAM of the class score on the model's CAM layer (what ``waferlab explain`` draws);
* ``pos`` / ``neg``: the same sum split into channels with positive and negative weight (sum w_k A_k
  over w_k > 0, and |w_k| A_k over w_k < 0): where the evidence for and against the class sits;
* ``logodds``: GradCAM of log p(class) (the class against the others) instead of the raw score;
* ``centred``: GradCAM of score(class) - mean score (softmax ignores a map added to every class's
  evidence; this removes that common part);
* ``deep``: GradCAM on a deeper layer of the same model (``--deep-layer``);
* for PAN-like models (a ``decoder.gau1``, whose output is ReLU(conv_low(l1) * w + up(high))): the class
  evidence sum_k v_ck T_k of each term T alone (``low``: the gated layer-1 term, ``high``: the upsampled
  decoder term; v = the classifier's weights), and the correlation of the GradCAM with the good-die
  indicator over the wafer (``r_good``);

and the model's probability of the class when the pattern's failed dies are turned good (``p_del_in``)
or when the band's dies are all made failed (``p_fill_band``), against the original (``p``).

    python benchmarks/explain_inversion.py /tmp/runs/pan48 --data heldout.npz --deep-layer decoder.fpa
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

LOCALISED = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Scratch")


def _zones(masks: np.ndarray, maps: np.ndarray, band: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.ndimage import binary_dilation

    wafer = maps > 0
    inside = (masks > 0) & wafer
    grown = np.stack([binary_dilation(m, iterations=band) for m in inside])
    ring = grown & ~inside & wafer
    return inside, ring, wafer & ~grown


def _grad_cams(model, layer, x, targets, score_kind: str = "raw"):
    """Per map (A, w): activations (B, C, h, w) of ``layer`` and GradCAM channel weights (B, C)."""
    import torch

    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        x = x.clone().requires_grad_(True)
        out = model(x)
        score = {"raw": out, "logodds": torch.log_softmax(out, 1),
                 "centred": out - out.mean(1, keepdim=True)}[score_kind]
        a = store["a"]
        sel = score.gather(1, torch.as_tensor(targets)[:, None]).sum()
        (g,) = torch.autograd.grad(sel, a)
    finally:
        h.remove()
    return a.detach().float().numpy(), g.mean(dim=(2, 3)).detach().float().numpy()


def _heat(a: np.ndarray, w: np.ndarray, size: tuple[int, int], maps: np.ndarray, sign: int = 0) -> np.ndarray:
    from waferlab.explain.cam import postprocess, upsample

    ww = w if sign == 0 else np.where(w * sign > 0, np.abs(w), 0.0)
    raw = np.maximum((ww[:, :, None, None] * a).sum(1), 0.0)
    return postprocess(upsample(raw, size), maps)


def _gau_terms(model, x, c: int):
    """Class-c evidence maps (B, h, w) of GAU1's two summands: gated low-level term and upsampled term."""
    import torch

    gau, store = model.decoder.gau1, {}
    hooks = [
        gau.conv_low.register_forward_hook(lambda m, i, o: store.__setitem__("m", o)),
        gau.conv_gp.register_forward_hook(lambda m, i, o: store.__setitem__("w", o)),
        gau.up.register_forward_hook(lambda m, i, o: store.__setitem__("u", o)),
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    v = model.classifier.weight[c].detach()[None, :, None, None]
    low = (store["m"] * store["w"] * v).sum(1)
    high = (store["u"] * v).sum(1)
    return low.numpy(), high.numpy()


def _zone_means(heat: np.ndarray, zones) -> list[float]:
    return [
        float(np.mean([h[z].mean() for h, z in zip(heat, zone, strict=True) if z.any()])) for zone in zones
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True, help="held-out synthetic maps (with pattern masks)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--band", type=int, default=3, help="width of the band around the pattern, pixels")
    ap.add_argument("--deep-layer", default=None, help="dotted module path of a deeper layer to compare")
    args = ap.parse_args()

    import torch

    from waferlab.data.cache import load_prepared
    from waferlab.data.encode import encode
    from waferlab.engine.run import Run
    from waferlab.explain.cam import probabilities

    torch.set_grad_enabled(True)
    for run_dir in args.runs:
        run = Run.open(run_dir)
        spec, model = run.spec(), run.load_model()
        data = load_prepared(args.data, spec.image_size, resize=spec.resize)
        probs = probabilities(model, data.maps, spec)
        print(f"\n# {run.info.model_name} ({run_dir}), {spec.image_size} px; heat: region / band / rest")
        gau = hasattr(model, "decoder") and hasattr(model.decoder, "gau1")
        print(
            f"{'class':<10} {'n':>3} {'gradcam':>17} {'pos':>17} {'neg':>17} {'logodds':>17} {'centred':>17} "
            f"{'deep':>17} {'p':>5} {'p_del_in':>8} {'p_fill_band':>11}"
            + (f" {'low':>17} {'high':>17} {'r_good':>6}" if gau else "")
        )
        for name in LOCALISED:
            c = spec.class_names.index(name)
            idx = np.flatnonzero(
                (np.asarray(data.class_names)[data.labels] == name) & (probs.argmax(1) == c)
            )[: args.per_class]
            if not len(idx):
                continue
            maps, masks = data.maps[idx], data.masks[idx]
            zones = _zones(masks, maps, args.band)
            x = encode(torch.from_numpy(maps), spec.encoding)
            tg = np.full(len(idx), c)
            size = maps.shape[-2:]
            cells = []
            a, w = _grad_cams(model, model.cam_target_layer, x, tg)
            for sign in (0, 1, -1):
                cells.append(_zone_means(_heat(a, w, size, maps, sign), zones))
            for kind in ("logodds", "centred"):
                a2, w2 = _grad_cams(model, model.cam_target_layer, x, tg, kind)
                cells.append(_zone_means(_heat(a2, w2, size, maps), zones))
            if args.deep_layer:
                layer = model.get_submodule(args.deep_layer)
                a3, w3 = _grad_cams(model, layer, x, tg)
                cells.append(_zone_means(_heat(a3, w3, size, maps), zones))
            else:
                cells.append([np.nan] * 3)
            deleted = np.where(zones[0] & (maps == 2), 1, maps).astype(np.uint8)
            filled = np.where(zones[1], 2, maps).astype(np.uint8)
            p = probs[idx, c].mean()
            p_del = probabilities(model, deleted, spec)[:, c].mean()
            p_fill = probabilities(model, filled, spec)[:, c].mean()
            text = " ".join(f"{z[0]:.2f}/{z[1]:.2f}/{z[2]:.2f}".rjust(17) for z in cells)
            extra = ""
            if gau:
                low, high = _gau_terms(model, x, c)
                terms = [
                    _zone_means(_heat(t[:, None], np.ones((len(t), 1)), size, maps), zones)
                    for t in (low, high)
                ]
                heat = _heat(a, w, size, maps)
                r = np.mean(
                    [
                        np.corrcoef(h[m > 0], (m[m > 0] == 1).astype(float))[0, 1]
                        for h, m in zip(heat, maps, strict=True)
                    ]
                )
                extra = " " + " ".join(f"{z[0]:.2f}/{z[1]:.2f}/{z[2]:.2f}".rjust(17) for z in terms)
                extra += f" {r:>6.2f}"
            print(f"{name:<10} {len(idx):>3} {text} {p:>5.2f} {p_del:>8.2f} {p_fill:>11.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
