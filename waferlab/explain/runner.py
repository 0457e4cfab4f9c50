"""``explain_runs``: figures and scores of one or more trained runs on the same wafer maps.

Output layout under ``out``: ``<run>/study_grid.png`` (per class the first correctly classified map,
GradCAM and GradCAM++), ``<run>/maps/map_<i>_<true>_as_<pred>.png`` (one figure per selected map),
``compare_<method>.png`` (several runs: one row per model on the same maps) and ``scores.json``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.data.table import UNLABELED
from waferlab.errors import WaferlabError
from waferlab.explain.cam import compute_cams, parse_methods, predict, resolve_device, set_logit_scale
from waferlab.explain.faithfulness import DEFAULT_STEPS
from waferlab.explain.figures import GridRow, plot_comparison, plot_map_overlays, plot_study_grid

#: Methods of the attention study's figure.
STUDY_METHODS = ("gradcam", "gradcam++")
#: Maps per class scored by ``--json`` unless ``--maps`` picks them.
DEFAULT_SCORE_PER_CLASS = 50
#: Columns of a comparison grid at most.
MAX_COMPARE_MAPS = 12


def parse_indexes(text: str | None) -> list[int] | None:
    """``"3,7,12"`` -> [3, 7, 12]; a malformed list is a one-line user error."""
    if text is None:
        return None
    try:
        out = [int(tok) for tok in text.split(",") if tok.strip()]
    except ValueError:
        raise WaferlabError(f"--maps: expected comma-separated map indexes, got {text!r}") from None
    if not out:
        raise WaferlabError("--maps: no map index given")
    return list(dict.fromkeys(out))


def first_per_class(labels: np.ndarray, n_classes: int, k: int,
                    eligible: np.ndarray | None = None) -> list[int]:
    """Indexes of the first ``k`` maps of every class, in data order (only ``eligible`` maps when given)."""
    out: list[int] = []
    for c in range(n_classes):
        sel = labels == c
        if eligible is not None:
            sel &= eligible
        out.extend(np.flatnonzero(sel)[:k].tolist())
    return sorted(out)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "x"


@dataclass
class _Run:
    name: str
    run_dir: str
    model: Any
    info: Any
    data: Any  # PreparedData
    labels: np.ndarray  # run class ids, -1 when the run does not know the map's label
    probs: np.ndarray
    sel_cams: Any = None  # CamResult of the selected maps


def _load_data(src: str, info: Any, test_part: bool, progress: bool):
    from waferlab.data.cache import load_prepared

    if not Path(src).exists():
        raise WaferlabError(f"data not found: {src}")
    if not test_part:
        return load_prepared(src, info.image_size, progress=progress)
    from waferlab.engine.config import config_from_dict
    from waferlab.engine.train import load_split_data

    cfg = config_from_dict({**info.config, "data": str(src), "progress": progress},
                           f"{info.run_dir}/config.yaml")
    split = load_split_data(cfg)
    if not len(split.test):
        raise WaferlabError(f"{src}: the run's {cfg.split} split has no test part")
    test = split.data.subset(split.test)
    if test.size != info.image_size:  # a cache keeps its own size in training; CAMs need the run's size
        from waferlab.data.cache import resize_prepared

        test = resize_prepared(test, info.image_size)
    return test


def _run_labels(data: Any, class_names: Sequence[str]) -> np.ndarray:
    ids = {name: i for i, name in enumerate(class_names)}
    lut = np.array([ids.get(name, -1) for name in data.class_names] + [-1], dtype=np.int64)
    return lut[np.asarray(data.labels, dtype=np.int64)]  # label -1 picks the trailing -1


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if label >= 0 else UNLABELED


def explain_runs(
    run_dirs: Sequence[str],
    data: str,
    out: str,
    methods: Sequence[str] | str = STUDY_METHODS,
    per_class: int = 1,
    map_indexes: Sequence[int] | None = None,
    scores: bool = False,
    batch_size: int = 32,
    device: str | None = None,
    test_part: bool = False,
    score_per_class: int = DEFAULT_SCORE_PER_CLASS,
    steps: int = DEFAULT_STEPS,
    road: bool = True,
    road_maps: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain every run on ``data``: study grid, per-map overlays, comparison grids, optional scores."""
    from waferlab.engine.run import load_run
    from waferlab.explain.scores import score_model
    from waferlab.io import versions, write_json

    names = parse_methods(methods)
    if not run_dirs:
        raise WaferlabError("no run directory given")
    if per_class < 0:
        raise WaferlabError(f"--per-class must be >= 0, got {per_class}")
    if batch_size < 1:
        raise WaferlabError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    out_dir = Path(out)
    files: list[str] = []
    runs: list[_Run] = []
    used: set[str] = set()
    loaded: dict[int, Any] = {}  # the data per image size (shared by runs of the same size)
    for run_dir in run_dirs:
        model, info = load_run(run_dir, device=dev)
        set_logit_scale(model, info.logit_scale)
        if test_part or info.image_size not in loaded:
            loaded[info.image_size] = _load_data(data, info, test_part, progress)
        prepared = loaded[info.image_size]
        if len(prepared) == 0:
            raise WaferlabError(f"{data}: no maps to explain")
        labels = _run_labels(prepared, info.class_names)
        probs = predict(model, prepared.maps, info.encoding, batch_size=batch_size, device=dev,
                        progress=progress)
        name = _safe(Path(run_dir).resolve().name)
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        runs.append(_Run(name, str(run_dir), model, info, prepared, labels, probs))

    n_maps = min(len(r.data) for r in runs)
    if len({len(r.data) for r in runs}) > 1:
        raise WaferlabError(f"{data}: the runs see different numbers of maps "
                            f"({', '.join(f'{r.name}: {len(r.data)}' for r in runs)}); with --test-part, "
                            "compare runs trained with the same data and split")
    if map_indexes is not None:
        bad = [i for i in map_indexes if not 0 <= i < n_maps]
        if bad:
            raise WaferlabError(f"--maps: index {bad[0]} out of range "
                                f"(the data has {n_maps} maps, 0..{n_maps - 1})")
        selected = list(map_indexes)
    else:
        first = runs[0]
        selected = first_per_class(first.labels, len(first.info.class_names), per_class)

    summary: dict[str, Any] = {"out": str(out_dir), "runs": {}, "files": files}
    for run in runs:
        info, cls = run.info, run.info.class_names
        preds = run.probs.argmax(1)
        run_out = out_dir / run.name
        # (1) the study grid: first correctly classified map of every class, GradCAM and GradCAM++
        firsts = [int(np.flatnonzero((run.labels == c) & (preds == c))[0])
                  if ((run.labels == c) & (preds == c)).any() else -1 for c in range(len(cls))]
        shown = [i for i in firsts if i >= 0]
        grid_cams = compute_cams(run.model, run.data.maps[shown], info.encoding, STUDY_METHODS,
                                 targets=preds[shown], batch_size=batch_size, device=dev) if shown else None
        rows = []
        for c, i in enumerate(firsts):
            if i < 0:
                rows.append(GridRow(cls[c], None))
                continue
            j = shown.index(i)
            rows.append(GridRow(cls[c], run.data.maps[i], {m: grid_cams.cams[m][j] for m in STUDY_METHODS},
                                note=f"#{i} p={run.probs[i, c]:.2f}"))
        path = run_out / "study_grid.png"
        plot_study_grid(rows, STUDY_METHODS, path,
                        title=f"{info.model_name}: first correctly classified map per class")
        files.append(str(path))
        # (2) one figure per selected map, every requested method
        sel_cams = compute_cams(run.model, run.data.maps[selected], info.encoding, names,
                                targets=preds[selected], batch_size=batch_size, device=dev,
                                progress=progress) if selected else None
        for j, i in enumerate(selected):
            true, pred = _name(int(run.labels[i]), cls), cls[int(preds[i])]
            conf = run.probs[i, preds[i]]
            title = f"{info.model_name}  map #{i}: true {true}, predicted {pred} ({conf:.0%})"
            path = run_out / "maps" / f"map_{i:05d}_{_safe(true)}_as_{_safe(pred)}.png"
            plot_map_overlays(run.data.maps[i], {m: sel_cams.cams[m][j] for m in names}, title, path)
            files.append(str(path))
        run.sel_cams = sel_cams
        entry: dict[str, Any] = {"run_dir": run.run_dir, "model": info.model_name, "n_maps": len(run.data),
                                 "study_grid_maps": {cls[c]: (i if i >= 0 else None)
                                                     for c, i in enumerate(firsts)},
                                 "selected_maps": selected}
        if sel_cams is not None and sel_cams.notes:
            entry["notes"] = sel_cams.notes
        # (3) scores
        if scores:
            idx = selected if map_indexes is not None else first_per_class(
                run.labels, len(cls), score_per_class)
            if idx:
                masks = None if run.data.masks is None else run.data.masks[idx]
                entry["scores"] = score_model(run.model, run.data.maps[idx], run.labels[idx], cls,
                                              info.encoding, names, masks=masks, steps=steps,
                                              batch_size=batch_size, device=dev, road=road,
                                              road_maps=road_maps, progress=progress)
            else:
                entry["scores"] = None
        summary["runs"][run.name] = entry

    # (4) comparison grids: one row per model, the same maps
    if len(runs) > 1 and selected:
        cols = selected[:MAX_COMPARE_MAPS]
        for m in names:
            cells = []
            for run in runs:
                preds = run.probs.argmax(1)
                row = []
                for i in cols:
                    j = selected.index(i)
                    true = _name(int(run.labels[i]), run.info.class_names)
                    pred = run.info.class_names[int(preds[i])]
                    row.append(GridRow(true, run.data.maps[i], {m: run.sel_cams.cams[m][j]},
                                       note=f"#{i} {true}\n-> {pred} {run.probs[i, preds[i]]:.0%}"))
                cells.append(row)
            path = out_dir / f"compare_{_safe(m)}.png"
            plot_comparison([r.name for r in runs], cells, path, title=f"{m}: same maps, one row per model")
            files.append(str(path))

    if scores:
        doc = {
            "data": str(data),
            "test_part_only": test_part,
            "methods": names,
            "settings": {"steps": steps, "score_per_class": score_per_class if map_indexes is None else None,
                         "road_maps": road_maps if road else 0,
                         "localisation": "correctly classified maps with a pattern mask",
                         "cam_target": "predicted class"},
            "models": {name: e.get("scores") for name, e in summary["runs"].items()},
            "versions": versions(),
        }
        path = out_dir / "scores.json"
        write_json(path, doc)
        files.append(str(path))
        summary["scores"] = doc
    return summary


def format_scores(doc: dict[str, Any]) -> str:
    """A compact text table of the overall scores: one line per model and method."""
    head = (f"{'model':<16} {'method':<10} {'del AUC':>8} {'ins AUC':>8} {'ROAD':>7} {'point':>6} "
            f"{'chance':>6} {'IoU@top':>7} {'chance':>6}")
    lines = [head]

    def f(v: Any, w: int, p: int = 3) -> str:
        return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    for model, s in doc["models"].items():
        if not s:
            continue
        rnd = s["random_order"]["overall"]
        lines.append(f"{model:<16} {'random':<10} {f(rnd['deletion_auc'], 8)} {f(rnd['insertion_auc'], 8)}")
        for method, block in s["methods"].items():
            o = block["overall"]
            lines.append(f"{model:<16} {method:<10} {f(o['deletion_auc'], 8)} {f(o['insertion_auc'], 8)} "
                         f"{f(o.get('road'), 7)} {f(o.get('pointing_game'), 6, 2)} "
                         f"{f(o.get('pointing_chance'), 6, 2)} {f(o.get('iou_top'), 7)} "
                         f"{f(o.get('iou_top_chance'), 6)}")
    return "\n".join(lines)


def note(msg: str) -> None:
    """A one-line note on stderr."""
    print(f"waferlab: {msg}", file=sys.stderr)
