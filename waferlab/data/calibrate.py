"""Per-class statistics of wafer maps, to check that synthetic maps agree with real WM-811K maps.

Statistics per map (all on the wafer's own normalised coordinates, so grids of any size compare):
failed-die fraction, a 10-bin radial failure profile, where that profile peaks and how wide its
high part is (ring width / radial extent), the failure rate in the outermost dies, how much of the
rim is covered by failures, and the size and principal-axis length of the largest connected failed
component (a scratch's length). ``compare`` puts real and synthetic medians/IQRs side by side.

Statistics aimed at the synthetic-to-real confusions (issue 14): ``ring_coverage`` / ``ring_depth`` (how
much of the outermost die ring fails and how many die rings deep: Edge-Ring vs Edge-Loc), the longest
failed line's length, straightness and fill (Scratch: faint, broken, curved), the largest component's
elongation, solidity and radius (Loc blob vs Scratch vs Edge-Loc), and the interior background rate
and how isolated background failures are (``none``). Dense clusters (``n_clusters`` ...) find Loc blobs
also when surviving dies break them into pieces; the longest straight run (``line_run``, 1-die gaps
bridged) and the line's angle to the die grid find a scratch inside a noisy wafer; ``largest_cc_dies``
and ``edge_runs`` (edge die loss) describe the background of ``none`` maps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from waferlab.data.table import WaferTable
from waferlab.errors import WaferlabError

#: Number of normalised-radius bins of the radial profile.
N_RADIAL_BINS = 10
#: Scalar statistics that ``compare`` reports, in order.
STATS: tuple[str, ...] = (
    "fail_frac", "peak_r", "radial_extent", "rate_center", "rate_edge", "edge_coverage",
    "largest_cc_frac", "cc_length", "n_dies",
    "ring_coverage", "ring_depth", "line_length", "line_straightness", "line_fill",
    "blob_elongation", "blob_solidity", "blob_radius", "bg_rate", "isolated_frac",
    "line_axis_dev", "n_clusters", "cluster_share", "cluster_fill", "cluster_radius", "line_run",
    "line_run_fill", "largest_cc_dies", "edge_runs",
)
#: Dense clusters: smallest number of dies, and the failed share of a die's 3x3 neighbourhood that makes
#: it dense (4/9 keeps loose clusters whose dies are half failed, rejects 10% random background).
CLUSTER_MIN_DIES = 5
CLUSTER_DENSITY = 4 / 9
#: Short description of each statistic (for tables and the benchmark printout).
STAT_HELP: dict[str, str] = {
    "fail_frac": "failed dies / wafer dies",
    "peak_r": "normalised radius of the radial-profile maximum",
    "radial_extent": "radial width (0..1) where the profile is above half its range",
    "rate_center": "failure rate at normalised radius < 0.3",
    "rate_edge": "failure rate of the outermost two die rings",
    "edge_coverage": "fraction of 16 rim sectors with failure rate > 50%",
    "largest_cc_frac": "largest 8-connected failed component / wafer dies",
    "cc_length": "largest component's extent along its principal axis / wafer diameter",
    "n_dies": "dies on the wafer",
    "ring_coverage": "fraction of 24 sectors whose outermost die ring fails > 50%",
    "ring_depth": "die rings from the rim failing > 50% in a row, mean over those sectors (0 if none)",
    "line_length": "longest 8-connected failed component (>= 3 dies) along its axis / wafer diameter",
    "line_straightness": "that component's 1 - minor/major axis variance (1 = a straight line)",
    "line_fill": "that component's dies per die of length (1 = a 1-die-wide unbroken line)",
    "blob_elongation": "largest component's minor/major axis std ratio (1 = round, 0 = a line)",
    "blob_solidity": "largest component's dies / area of its 2-sigma ellipse (1 = solid blob)",
    "blob_radius": "normalised radius of the largest component's centroid",
    "bg_rate": "failure rate of dies >= 3 from the rim outside the largest component",
    "isolated_frac": "failed dies with no failed 8-neighbour / failed dies",
    "line_axis_dev": "degrees (0-45) between the longest line's axis and the nearest die row/column",
    "n_clusters": (f"dense clusters (>= {CLUSTER_MIN_DIES} dies not on the outermost two rings whose 3x3 "
                   f"neighbourhood fails >= {CLUSTER_DENSITY:.2f}), loose ones too"),
    "cluster_share": "dies in dense clusters (not on the outermost two rings) / wafer dies",
    "cluster_fill": "failed fraction inside the largest dense cluster (1 = solid, ~0.5 = loose)",
    "cluster_radius": "normalised radius of the largest dense cluster's centroid",
    "line_run": "longest straight failed run (rows, columns, diagonals; 1-die gaps bridged) / diameter",
    "line_run_fill": "failed fraction of that run (1 = unbroken)",
    "largest_cc_dies": "dies in the largest 8-connected failed component (absolute, not a share)",
    "edge_runs": "runs of >= 2 failed dies on the outermost die ring per 100 of its dies (edge die loss)",
}
#: Share of each class of the real samples kept out of generator calibration and fine-tuning (the part
#: ``benchmarks/sim2real.py`` reports on); see :func:`split_real`.
HOLDOUT_FRACTION = 0.5
#: Sectors of the outermost die ring for ``ring_coverage`` / ``ring_depth``.
N_RING_SECTORS = 24

_EIGHT = np.ones((3, 3), bool)


def _coords(wafer: np.ndarray):
    """Normalised radius, polar angle and die distance to the rim of every die of ``wafer``."""
    from scipy.ndimage import distance_transform_edt

    inside = wafer > 0
    rows, cols = np.nonzero(inside)
    ci, cj = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    ri, rj = (rows.max() - rows.min() + 1) / 2, (cols.max() - cols.min() + 1) / 2
    ii, jj = np.mgrid[0:wafer.shape[0], 0:wafer.shape[1]]
    v, u = (ii - ci) / ri, (jj - cj) / rj
    edge = distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    return inside, np.sqrt(u * u + v * v), np.arctan2(v, u), edge, (ri + rj)


def map_stats(wafer: np.ndarray) -> dict[str, float]:
    """The scalar statistics (``STATS``) and radial profile (``prof0..prof9``) of one map."""
    from scipy.ndimage import label

    wafer = np.asarray(wafer)
    if wafer.ndim != 2 or not (wafer > 0).any():
        raise WaferlabError(f"map of shape {wafer.shape} has no wafer dies")
    inside, r, theta, edge, diameter = _coords(wafer)
    failed = wafer == 2
    n_dies = int(inside.sum())
    out: dict[str, float] = {"fail_frac": failed.sum() / n_dies, "n_dies": float(n_dies),
                             "height": float(wafer.shape[0]), "width": float(wafer.shape[1])}
    bins = np.minimum((r[inside] * N_RADIAL_BINS).astype(int), N_RADIAL_BINS - 1)
    tot = np.bincount(bins, minlength=N_RADIAL_BINS)
    bad = np.bincount(bins, weights=failed[inside], minlength=N_RADIAL_BINS)
    prof = np.where(tot > 0, bad / np.maximum(tot, 1), np.nan)
    prof = _fill_nan(prof)
    for k, p in enumerate(prof):
        out[f"prof{k}"] = float(p)
    lo, hi = prof.min(), prof.max()
    out["peak_r"] = (int(np.argmax(prof)) + 0.5) / N_RADIAL_BINS
    out["radial_extent"] = float((prof > lo + 0.5 * (hi - lo)).sum() / N_RADIAL_BINS) if hi > lo else 1.0
    central = inside & (r < 0.3)
    out["rate_center"] = float(failed[central].mean()) if central.any() else float(prof[0])
    rim = inside & (edge <= 2.0)
    out["rate_edge"] = float(failed[rim].mean())
    sector = ((theta[rim] + np.pi) / (2 * np.pi) * 16).astype(int) % 16
    s_tot = np.bincount(sector, minlength=16)
    s_bad = np.bincount(sector, weights=failed[rim], minlength=16)
    have = s_tot > 0
    out["edge_coverage"] = float((s_bad[have] / s_tot[have] > 0.5).mean())
    comp, n_comp = label(failed, structure=_EIGHT)
    if n_comp == 0:
        out["largest_cc_frac"] = 0.0
        out["cc_length"] = 0.0
    else:
        sizes = np.bincount(comp.ravel())[1:]
        big = int(np.argmax(sizes)) + 1
        out["largest_cc_frac"] = float(sizes[big - 1] / n_dies)
        pts = np.argwhere(comp == big).astype(float)
        if len(pts) < 2:
            out["cc_length"] = 1.0 / diameter
        else:
            pts -= pts.mean(axis=0)
            _, vecs = np.linalg.eigh(pts.T @ pts)
            proj = pts @ vecs[:, -1]
            out["cc_length"] = float((proj.max() - proj.min() + 1.0) / diameter)
    out.update(_ring_stats(failed, inside, theta, edge))
    out.update(_component_stats(failed, inside, r, edge, diameter))
    out.update(_cluster_stats(failed, inside, r, edge))
    out.update(_run_stats(failed, inside, edge, diameter))
    return out


def _ring_stats(failed: np.ndarray, inside: np.ndarray, theta: np.ndarray, edge: np.ndarray) -> dict:
    """Angular coverage of the outermost die ring and the failing depth where it is covered."""
    depth = np.floor(edge + 0.5).astype(int)  # 1 = outermost die ring
    sector = ((theta + np.pi) / (2 * np.pi) * N_RING_SECTORS).astype(int) % N_RING_SECTORS
    max_d = 6
    tot = np.zeros((N_RING_SECTORS, max_d + 1))
    bad = np.zeros((N_RING_SECTORS, max_d + 1))
    sel = inside & (depth >= 1) & (depth <= max_d)
    np.add.at(tot, (sector[sel], depth[sel]), 1.0)
    np.add.at(bad, (sector[sel], depth[sel]), failed[sel])
    rate = np.where(tot > 0, bad / np.maximum(tot, 1), 0.0)[:, 1:]
    have = tot[:, 1] > 0
    covered = have & (rate[:, 0] > 0.5)
    run = np.argmin(np.concatenate([rate > 0.5, np.zeros((N_RING_SECTORS, 1), bool)], axis=1), axis=1)
    return {"ring_coverage": float(covered.sum() / max(have.sum(), 1)),
            "ring_depth": float(run[covered].mean()) if covered.any() else 0.0}


def _axes(pts: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """Projection extent along the principal axis, and the two axis variances, of die coordinates."""
    c = pts - pts.mean(axis=0)
    vals, vecs = np.linalg.eigh(c.T @ c / len(c))
    proj = c @ vecs[:, -1]
    return proj, float(proj.max() - proj.min() + 1.0), float(max(vals[-1], 1e-9)), float(max(vals[0], 0.0))


def _axis_deviation(pts: np.ndarray) -> float:
    """Degrees (0..45) between the principal axis of die coordinates and the nearest die-grid row/column."""
    c = pts - pts.mean(axis=0)
    vec = np.linalg.eigh(c.T @ c)[1][:, -1]
    ang = float(np.degrees(np.arctan2(vec[0], vec[1]))) % 90.0
    return min(ang, 90.0 - ang)


def _component_stats(failed, inside, r, edge, diameter: float) -> dict:
    """Longest-line, largest-blob (and largest component's die count), background-rate and isolation
    statistics of the failed dies."""
    from scipy.ndimage import convolve, label

    comp, n_comp = label(failed, structure=_EIGHT)
    out = {"line_length": 0.0, "line_straightness": 0.0, "line_fill": 0.0, "line_axis_dev": 45.0,
           "blob_elongation": 0.0, "blob_solidity": 0.0, "blob_radius": 0.0, "largest_cc_dies": 0.0}
    big_mask = np.zeros(failed.shape, bool)
    if n_comp:
        sizes = np.bincount(comp.ravel())[1:]
        out["largest_cc_dies"] = float(sizes.max())
        order = np.argsort(comp.ravel(), kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(comp.ravel()))])
        coords = np.stack(np.unravel_index(order, failed.shape), axis=1).astype(float)
        best = (-1.0, 0.0, 0.0, 0)
        for k in np.flatnonzero(sizes >= 3) + 1:
            _, length, l1, l2 = _axes(coords[starts[k]:starts[k + 1]])
            if length > best[0]:
                best = (length, 1.0 - l2 / l1, sizes[k - 1] / length, k)
        if best[0] > 0:
            out.update(line_length=best[0] / diameter, line_straightness=best[1], line_fill=best[2],
                       line_axis_dev=_axis_deviation(coords[starts[best[3]]:starts[best[3] + 1]]))
        big = int(np.argmax(sizes)) + 1
        big_mask = comp == big
        if sizes[big - 1] >= 3:
            _, _, l1, l2 = _axes(coords[starts[big]:starts[big + 1]])
            out["blob_elongation"] = float(np.sqrt(l2 / l1))
            area = 4 * np.pi * np.sqrt(l1 * max(l2, 1 / 12))  # the 2-sigma ellipse (a 1-die line: var 1/12)
            out["blob_solidity"] = float(min(sizes[big - 1] / area, 2.0))
            out["blob_radius"] = float(r[big_mask].mean())
    interior = inside & (edge >= 3) & ~big_mask
    out["bg_rate"] = float(failed[interior].mean()) if interior.any() else 0.0
    neigh = convolve(failed.astype(np.int32), _EIGHT.astype(np.int32), mode="constant") - failed
    n_fail = int(failed.sum())
    out["isolated_frac"] = float((failed & (neigh == 0)).sum() / n_fail) if n_fail else 1.0
    return out


#: The four straight directions of ``line_run`` (row, column steps).
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _cluster_stats(failed, inside, r, edge) -> dict:
    """Dense clusters of failed dies (Loc blobs, also loose ones that fall apart into several components)."""
    from scipy.ndimage import label, uniform_filter

    dens = uniform_filter(failed.astype(np.float32), 3, mode="constant")
    share = dens / np.maximum(uniform_filter(inside.astype(np.float32), 3, mode="constant"), 1e-6)
    dense = inside & (edge > 2.0) & (share >= CLUSTER_DENSITY - 1e-6)
    comp, n = label(dense, structure=_EIGHT)
    sizes = np.bincount(comp.ravel())[1:]
    keep = np.flatnonzero(sizes >= CLUSTER_MIN_DIES) + 1
    out = {"n_clusters": float(len(keep)), "cluster_share": float(sizes[keep - 1].sum() / inside.sum()),
           "cluster_fill": 0.0, "cluster_radius": 0.0}
    if len(keep):
        big = comp == keep[np.argmax(sizes[keep - 1])]
        out["cluster_fill"] = float(failed[big].mean())
        out["cluster_radius"] = float(r[big].mean())
    return out


def _run_stats(failed, inside, edge, diameter: float) -> dict:
    """Longest straight failed run (a scratch in a noisy wafer) and edge die loss runs."""
    from scipy.ndimage import label

    best, best_fill = 0.0, 0.0
    h, w = failed.shape
    for di, dj in _DIRECTIONS:
        fwd = np.zeros_like(failed)  # the die one step back / ahead along the direction is failed
        back = np.zeros_like(failed)
        src = (slice(max(-di, 0), h - max(di, 0)), slice(max(-dj, 0), w - max(dj, 0)))
        dst = (slice(max(di, 0), h - max(-di, 0)), slice(max(dj, 0), w - max(-dj, 0)))
        fwd[dst] = failed[src]
        back[src] = failed[dst]
        on = failed | (inside & fwd & back)  # a 1-die gap between two failed dies is bridged
        run = np.zeros((h, w), np.int32)
        cnt = np.zeros((h, w), np.int32)
        f32 = failed.astype(np.int32)
        axis_len = h if di else w
        for k in range(axis_len):
            if di:  # rows in order; the previous die is in row k-1, column j-dj
                prev_r = run[k - 1] if k else np.zeros(w, np.int32)
                prev_c = cnt[k - 1] if k else np.zeros(w, np.int32)
                if dj:
                    prev_r, prev_c = np.roll(prev_r, dj), np.roll(prev_c, dj)
                    prev_r[0 if dj > 0 else -1] = prev_c[0 if dj > 0 else -1] = 0
                run[k] = on[k] * (prev_r + 1)
                cnt[k] = on[k] * (prev_c + f32[k])
            else:
                prev_r = run[:, k - 1] if k else np.zeros(h, np.int32)
                prev_c = cnt[:, k - 1] if k else np.zeros(h, np.int32)
                run[:, k] = on[:, k] * (prev_r + 1)
                cnt[:, k] = on[:, k] * (prev_c + f32[:, k])
        step = float(np.hypot(di, dj))
        k = int(np.argmax(run))
        if run.flat[k] * step > best:
            best, best_fill = run.flat[k] * step, cnt.flat[k] / run.flat[k]
    outer = inside & (np.floor(edge + 0.5) == 1)
    rim_comp, n_rim = label(failed & outer, structure=_EIGHT)
    runs = int((np.bincount(rim_comp.ravel())[1:] >= 2).sum()) if n_rim else 0
    return {"line_run": float(best / diameter), "line_run_fill": float(best_fill),
            "edge_runs": 100.0 * runs / max(int(outer.sum()), 1)}


def _fill_nan(prof: np.ndarray) -> np.ndarray:
    """Fill empty radial bins (tiny wafers) from their neighbours."""
    if not np.isnan(prof).any():
        return prof
    idx = np.arange(len(prof))
    ok = ~np.isnan(prof)
    return np.interp(idx, idx[ok], prof[ok])


def table_stats(table: WaferTable, max_per_class: int | None = None, seed: int = 0):  # -> DataFrame
    """One row per map: ``label`` plus ``map_stats``; at most ``max_per_class`` maps per class (seeded)."""
    import pandas as pd

    idx = np.arange(len(table))
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = []
        for lab in dict.fromkeys(table.labels.tolist()):
            rows = idx[table.labels == lab]
            keep.extend(rng.permutation(rows)[:max_per_class].tolist() if len(rows) > max_per_class else rows)
        idx = np.sort(np.array(keep, dtype=int))
    rows = []
    for i in idx:
        st = map_stats(table.maps[i])
        st["label"] = table.labels[i]
        rows.append(st)
    return pd.DataFrame(rows)


def compare(real, synth, stats: tuple[str, ...] = STATS, match_sizes: bool = False):  # -> DataFrame
    """Per class and statistic: real and synthetic median / 25% / 75% and whether they agree.

    ``agree`` is true when the synthetic median lies within the real inter-quartile range widened by
    a quarter of its width on each side (plus a small absolute slack), i.e. a typical synthetic map is typical
    of the real class too. ``match_sizes``: compare each class only with synthetic maps whose die count lies
    in the real class's 10-90% range (x0.8 / x1.25). The generator draws grid sizes independently of the
    class, but each class of the small real sample comes from a few products (real Center: median 515
    dies, real Edge-Ring: 2,126), and size-dependent statistics (failed fraction, ring share) then differ
    for that reason alone.
    """
    import pandas as pd

    rows = []
    for lab in [c for c in dict.fromkeys(real["label"]) if c in set(synth["label"])]:
        r, s = real[real["label"] == lab], synth[synth["label"] == lab]
        if match_sizes:
            lo, hi = np.percentile(r["n_dies"], [10, 90])
            s = s[(s["n_dies"] >= 0.8 * lo) & (s["n_dies"] <= 1.25 * hi)]
            if len(s) == 0:
                continue
        for stat in stats:
            rq = np.percentile(r[stat], [25, 50, 75])
            sq = np.percentile(s[stat], [25, 50, 75])
            iqr = rq[2] - rq[0]
            slack = 0.25 * iqr + 0.01 * (abs(rq[1]) if stat == "n_dies" else 1.0)
            rows.append({
                "class": lab, "stat": stat, "n_real": len(r), "n_synth": len(s),
                "real_q25": rq[0], "real_median": rq[1], "real_q75": rq[2],
                "synth_q25": sq[0], "synth_median": sq[1], "synth_q75": sq[2],
                "agree": bool(rq[0] - slack <= sq[1] <= rq[2] + slack),
            })
    return pd.DataFrame(rows)


def format_comparison(cmp) -> str:
    """The comparison as a fixed-width text table, one line per (class, statistic)."""
    lines = [f"{'class':<10} {'statistic':<16} {'n_real':>6} {'real median [IQR]':>26} "
             f"{'synth median [IQR]':>26}  agree"]
    for row in cmp.itertuples():
        fmt = "{:.0f}" if row.stat == "n_dies" else "{:.3f}"
        real = f"{fmt.format(row.real_median)} [{fmt.format(row.real_q25)}, {fmt.format(row.real_q75)}]"
        syn = f"{fmt.format(row.synth_median)} [{fmt.format(row.synth_q25)}, {fmt.format(row.synth_q75)}]"
        lines.append(f"{row._1:<10} {row.stat:<16} {row.n_real:>6} {real:>26} {syn:>26}  "
                     f"{'yes' if row.agree else 'NO'}")
    n_ok = int(cmp["agree"].sum())
    lines.append(f"agreement: {n_ok}/{len(cmp)} (class, statistic) pairs")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ real samples

_PKL = "wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl"
_PNG_DIR = "wm811k_dm3_ntu_png_67f9ccf/generated_images"
_CSV = "wm811k_caslabai_sub100/sub100_WM-811K.csv"


def load_real_samples(shared_dir: str | Path) -> WaferTable:
    """The real maps of ``shared/data`` at original size: LSWMD sample pickle, dm3 PNGs, sub100 CSV.

    Read directly (not through the general readers) so calibration only depends on pandas and Pillow.
    Unlabelled rows are dropped.
    """
    import pandas as pd
    from PIL import Image

    root = Path(shared_dir)
    maps: list[np.ndarray] = []
    labels: list[str] = []
    lots: list[str] = []
    pkl = root / _PKL
    if pkl.is_file():
        from waferlab.data.lswmd import load_pickle

        df = load_pickle(pkl)  # the restricted unpickler: a pickle runs code from the file
        for m, ft, lot in zip(df["waferMap"], df["failureType"], df["lotName"]):
            lab = _nested_label(ft)
            if lab:
                maps.append(np.asarray(m, dtype=np.uint8))
                labels.append(lab)
                lots.append(str(lot))
    png_dir = root / _PNG_DIR
    for f in sorted(png_dir.glob("*.png")) if png_dir.is_dir() else []:
        m = re.fullmatch(r"\d+_(.+)\.png", f.name)
        if not m:
            continue
        px = np.asarray(Image.open(f).convert("L"), dtype=np.float32)
        maps.append(np.clip(np.rint(px / 127.5), 0, 2).astype(np.uint8))
        labels.append(m.group(1))
        lots.append("dm3")
    csv = root / _CSV
    if csv.is_file():
        df = pd.read_csv(csv, sep="\t", index_col=0)
        for s, ft, lot in zip(df["waferMap"], df["failureType"], df["lotName"]):
            lab = str(ft).strip("[]' \"")
            if lab:
                maps.append(np.array(json.loads(s), dtype=np.uint8))
                labels.append(lab)
                lots.append(str(lot))
    if not maps:
        raise WaferlabError(f"{root}: no real sample maps found (expected {_PKL}, {_PNG_DIR}, {_CSV})")
    n = len(maps)
    return WaferTable(maps=maps, labels=np.array(labels, dtype=object),
                      split=np.array([""] * n, dtype=object), lot=np.array(lots, dtype=object),
                      wafer_index=np.zeros(n, np.int64), source=str(root))


def split_real(table: WaferTable, seed: int = 0, holdout: float = HOLDOUT_FRACTION
               ) -> tuple[WaferTable, WaferTable]:
    """(calibration part, held-out part) of the real samples: per class, a seeded ``holdout`` share held out.

    The calibration part is what generator tuning (``benchmarks/synth_calibration.py``) and real-map
    training / fine-tuning may see; results on real maps are reported on the held-out part only.
    """
    rng = np.random.default_rng(seed)
    held = np.zeros(len(table), bool)
    for cls in sorted(set(table.labels.tolist())):
        rows = np.flatnonzero(table.labels == cls)
        held[rng.permutation(rows)[: int(round(holdout * len(rows)))]] = True
    return table.subset(~held), table.subset(held)


def _nested_label(value) -> str:
    """The class name in an LSWMD nested label cell (``[['Center']]``, ``[]``, NaN or str)."""
    if isinstance(value, str):
        return value
    arr = np.asarray(value, dtype=object)
    if arr.size == 0:
        return ""
    item = arr.ravel()[0]
    return "" if item is None or (isinstance(item, float) and np.isnan(item)) else str(item)
