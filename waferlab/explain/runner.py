"""``explain_runs``: figures and scores of one or more trained runs on the same wafer maps.

Output layout under ``out``: ``<run>/study_grid.png`` (per class the first correctly classified map,
GradCAM and GradCAM++), ``<run>/maps/map_<i>_<true>_as_<pred>.png`` (one figure per selected map),
``compare_<method>.png`` (several runs: one row per model on the same maps) and ``scores.json``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.data.table import UNLABELED
from waferlab.errors import WaferlabError
from waferlab.explain.cam import compute_cams, parse_methods, probabilities, resolve_device
from waferlab.explain.faithfulness import DEFAULT_STEPS
from waferlab.explain.figures import GridRow, plot_comparison, plot_map_overlays, plot_study_grid
from waferlab.explain.scores import DEFAULT_ROAD_MAPS

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
class ExplainSettings:
    """What ``explain_runs`` draws and scores (the ``waferlab explain`` flags)."""

    methods: Sequence[str] | str = STUDY_METHODS
    per_class: int = 1
    map_indexes: Sequence[int] | None = None
    scores: bool = False
    batch_size: int = 32
    device: str | None = None
    test_part: bool = False
    score_per_class: int = DEFAULT_SCORE_PER_CLASS
    steps: int = DEFAULT_STEPS
    road: bool = True
    road_maps: int = DEFAULT_ROAD_MAPS
    progress: bool = True

    def check(self) -> list[str]:
        """Validate the settings (one-line user errors); returns the parsed method names."""
        names = parse_methods(self.methods)
        for key, low in (("per_class", 0), ("batch_size", 1), ("score_per_class", 1), ("steps", 1)):
            if getattr(self, key) < low:
                raise WaferlabError(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(self, key)}")
        return names


@dataclass
class _Run:
    name: str
    run_dir: str
    model: Any
    spec: Any  # InputSpec
    model_name: str
    data: Any  # PreparedData
    labels: np.ndarray  # run class ids, -1 when the run does not know the map's label
    probs: np.ndarray
    sel_cams: Any = None  # CamResult of the selected maps

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


def _test_part(src: str, config: dict[str, Any], size: int, progress: bool):
    """The test part of a run's split of ``src``, reproduced by training's own split of one source."""
    from waferlab.data.cache import resize_prepared
    from waferlab.engine.config import config_from_dict
    from waferlab.engine.datamodule import source_split

    cfg = config_from_dict({**config, "data": str(src), "progress": progress})  # names the resize rule
    p, parts = source_split(src, cfg)
    if not (parts == "test").any():
        raise WaferlabError(f"{src}: the run's {cfg.split} split has no test part")
    test = p.subset(np.flatnonzero(parts == "test"))
    return test if test.size == size else resize_prepared(test, size)  # CAMs need the run's size


def _load_data(src: str, run: Any, test_part: bool, progress: bool):
    from waferlab.data.cache import load_prepared

    if not Path(src).exists():
        raise WaferlabError(f"data not found: {src}")
    spec = run.spec()
    return _test_part(src, run.info.config, spec.image_size, progress) if test_part else (
        load_prepared(src, spec.image_size, progress=progress, resize=spec.resize))


def _run_labels(data: Any, class_names: Sequence[str]) -> np.ndarray:
    ids = {name: i for i, name in enumerate(class_names)}
    lut = np.array([ids.get(name, -1) for name in data.class_names] + [-1], dtype=np.int64)
    return lut[np.asarray(data.labels, dtype=np.int64)]  # label -1 picks the trailing -1


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if label >= 0 else UNLABELED


def _load_runs(run_dirs: Sequence[str], data: str, s: ExplainSettings, dev: Any) -> list[_Run]:
    """Open every run, load (and share per image size) the maps, predict them through the engine."""
    from waferlab.engine.run import Run

    runs: list[_Run] = []
    used: set[str] = set()
    loaded: dict[tuple[int, str], Any] = {}
    for run_dir in run_dirs:
        run = Run.open(run_dir)
        spec = run.spec()
        model = run.load_model(device=dev)
        key = spec.image_size, spec.resize
        if s.test_part or key not in loaded:
            loaded[key] = _load_data(data, run, s.test_part, s.progress)
        prepared = loaded[key]
        if len(prepared) == 0:
            raise WaferlabError(f"{data}: no maps to explain")
        probs = probabilities(model, prepared.maps, spec, batch_size=s.batch_size, device=dev)
        name = base = _safe(Path(run_dir).resolve().name)
        k = 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        runs.append(_Run(name, str(run_dir), model, spec, run.info.model_name, prepared,
                         _run_labels(prepared, spec.class_names), probs))
    if len({len(r.data) for r in runs}) > 1:
        raise WaferlabError(f"{data}: the runs see different numbers of maps "
                            f"({', '.join(f'{r.name}: {len(r.data)}' for r in runs)}); with --test-part, "
                            "compare runs trained with the same data and split")
    return runs


def _selected(runs: list[_Run], s: ExplainSettings) -> list[int]:
    n_maps = len(runs[0].data)
    if s.map_indexes is None:
        return first_per_class(runs[0].labels, len(runs[0].spec.class_names), s.per_class)
    bad = [i for i in s.map_indexes if not 0 <= i < n_maps]
    if bad:
        raise WaferlabError(f"--maps: index {bad[0]} out of range "
                            f"(the data has {n_maps} maps, 0..{n_maps - 1})")
    return list(s.map_indexes)


def _study_grid(run: _Run, out: Path, s: ExplainSettings, dev: Any) -> tuple[Path, list[int]]:
    """Per class the first correctly classified map, GradCAM and GradCAM++ (the study's figure)."""
    cls, preds = run.spec.class_names, run.preds
    ok = [(run.labels == c) & (preds == c) for c in range(len(cls))]
    firsts = [int(np.flatnonzero(m)[0]) if m.any() else -1 for m in ok]
    shown = [i for i in firsts if i >= 0]
    cams = compute_cams(run.model, run.data.maps[shown], run.spec, STUDY_METHODS, targets=preds[shown],
                        batch_size=s.batch_size, device=dev).cams if shown else {}
    rows = [GridRow(cls[c], None) if i < 0 else
            GridRow(cls[c], run.data.maps[i], {m: cams[m][shown.index(i)] for m in STUDY_METHODS},
                    note=f"#{i} p={run.probs[i, c]:.2f}") for c, i in enumerate(firsts)]
    path = out / "study_grid.png"
    plot_study_grid(rows, STUDY_METHODS, path,
                    title=f"{run.model_name}: first correctly classified map per class")
    return path, firsts


def _map_figures(run: _Run, selected: list[int], names: list[str], out: Path, s: ExplainSettings,
                 dev: Any) -> list[str]:
    """One figure per selected map with every requested method; keeps the CAMs for comparison grids."""
    preds, cls, files = run.preds, run.spec.class_names, []
    run.sel_cams = None if not selected else compute_cams(
        run.model, run.data.maps[selected], run.spec, names, targets=preds[selected], batch_size=s.batch_size,
        device=dev, progress=s.progress)
    for j, i in enumerate(selected):
        true, pred = _name(int(run.labels[i]), cls), cls[int(preds[i])]
        title = f"{run.model_name}  map #{i}: true {true}, predicted {pred} ({run.probs[i, preds[i]]:.0%})"
        path = out / "maps" / f"map_{i:05d}_{_safe(true)}_as_{_safe(pred)}.png"
        plot_map_overlays(run.data.maps[i], {m: run.sel_cams.cams[m][j] for m in names}, title, path)
        files.append(str(path))
    return files


def _explain_one(run: _Run, selected: list[int], names: list[str], out_dir: Path, s: ExplainSettings,
                 dev: Any, files: list[str]) -> dict[str, Any]:
    """Study grid, per-map figures and (with ``scores``) the scores of one run; returns its summary entry."""
    from waferlab.explain.scores import ScoreSettings, score_model

    grid, firsts = _study_grid(run, out_dir / run.name, s, dev)
    files += [str(grid), *_map_figures(run, selected, names, out_dir / run.name, s, dev)]
    cls = run.spec.class_names
    entry: dict[str, Any] = {"run_dir": run.run_dir, "model": run.model_name, "n_maps": len(run.data),
                             "study_grid_maps": {cls[c]: (i if i >= 0 else None)
                                                 for c, i in enumerate(firsts)},
                             "selected_maps": selected}
    if run.sel_cams is not None and run.sel_cams.notes:
        entry["notes"] = run.sel_cams.notes
    if s.scores:
        idx = selected if s.map_indexes is not None else first_per_class(run.labels, len(cls),
                                                                          s.score_per_class)
        masks = None if run.data.masks is None or not idx else run.data.masks[idx]
        settings = ScoreSettings(methods=names, steps=s.steps, batch_size=s.batch_size, device=str(dev),
                                 road=s.road, road_maps=s.road_maps, progress=s.progress)
        entry["scores"] = score_model(run.model, run.data.maps[idx], run.labels[idx], run.spec, masks=masks,
                                      settings=settings) if idx else None
    return entry


def _comparison(runs: list[_Run], selected: list[int], names: list[str], out_dir: Path) -> list[str]:
    """Per method one grid: a row per model, the same maps (at most ``MAX_COMPARE_MAPS``)."""
    cols, files = selected[:MAX_COMPARE_MAPS], []
    for m in names:
        cells = []
        for run in runs:
            preds, cls = run.preds, run.spec.class_names
            cells.append([GridRow(_name(int(run.labels[i]), cls), run.data.maps[i],
                                  {m: run.sel_cams.cams[m][selected.index(i)]},
                                  note=f"#{i} {_name(int(run.labels[i]), cls)}\n-> {cls[int(preds[i])]} "
                                       f"{run.probs[i, preds[i]]:.0%}") for i in cols])
        path = out_dir / f"compare_{_safe(m)}.png"
        plot_comparison([r.name for r in runs], cells, path, title=f"{m}: same maps, one row per model")
        files.append(str(path))
    return files


def _scores_doc(data: str, names: list[str], s: ExplainSettings, summary: dict[str, Any]) -> dict[str, Any]:
    from waferlab.io import versions

    return {
        "data": str(data), "test_part_only": s.test_part, "methods": names,
        "settings": {"steps": s.steps,
                     "score_per_class": s.score_per_class if s.map_indexes is None else None,
                     "road_maps": s.road_maps if s.road else 0,
                     "localisation": "correctly classified maps with a pattern mask",
                     "fail_mass_lift": "CAM mass on failed dies / failed-die share of wafer (1 = uniform)",
                     "cam_target": "predicted class", "heat": "min-max over the wafer dies only"},
        "models": {name: e.get("scores") for name, e in summary["runs"].items()},
        "versions": versions(),
    }


def explain_runs(run_dirs: Sequence[str], data: str, out: str,
                 settings: ExplainSettings | None = None) -> dict[str, Any]:
    """Explain every run on ``data``: study grid, per-map overlays, comparison grids, optional scores."""
    from waferlab.io import write_json

    s = settings or ExplainSettings()
    names = s.check()
    if not run_dirs:
        raise WaferlabError("no run directory given")
    dev = resolve_device(s.device)
    out_dir = Path(out)
    runs = _load_runs(run_dirs, data, s, dev)
    selected = _selected(runs, s)
    files: list[str] = []
    summary: dict[str, Any] = {"out": str(out_dir), "runs": {}, "files": files}
    for run in runs:
        summary["runs"][run.name] = _explain_one(run, selected, names, out_dir, s, dev, files)
    if len(runs) > 1 and selected:
        files += _comparison(runs, selected, names, out_dir)
    if s.scores:
        summary["scores"] = _scores_doc(data, names, s, summary)
        path = out_dir / "scores.json"
        write_json(path, summary["scores"])
        files.append(str(path))
    return summary


def _ci(d: dict[str, Any] | None) -> str:
    """``-0.123 [-0.150,-0.090]`` for a paired difference with its bootstrap interval."""
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f},{d['ci_high']:+.3f}]"


def format_scores(doc: dict[str, Any]) -> str:
    """A compact text table of the overall scores: one line per model and method."""
    head = (f"{'model':<16} {'method':<12} {'del AUC':>7} {'del-rnd [95% CI]':>25} {'ins AUC':>7} "
            f"{'ins-rnd [95% CI]':>25} {'point':>5} {'chance':>6} {'IoU_k':>5} {'chance':>6} "
            f"{'mass_in':>7} {'lift':>5} {'ROAD':>6}")
    lines = [head]

    def f(v: Any, w: int, p: int = 3) -> str:
        return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    for model, s in doc["models"].items():
        if not s:
            continue
        rnd = s["random_order"]["overall"]
        lines.append(f"{model:<16} {'random':<12} {f(rnd['deletion_auc'], 7)} {'':>25} "
                     f"{f(rnd['insertion_auc'], 7)}")
        for method, block in s["methods"].items():
            o = block["overall"]
            d_del = block.get("deletion_auc_vs_random", {}).get("overall")
            d_ins = block.get("insertion_auc_vs_random", {}).get("overall")
            lines.append(f"{model:<16} {method:<12} {f(o['deletion_auc'], 7)} {_ci(d_del):>25} "
                         f"{f(o['insertion_auc'], 7)} {_ci(d_ins):>25} {f(o.get('pointing_game'), 5, 2)} "
                         f"{f(o.get('pointing_chance'), 6, 2)} {f(o.get('iou_k'), 5, 2)} "
                         f"{f(o.get('iou_k_chance'), 6, 2)} {f(o.get('mass_inside'), 7, 2)} "
                         f"{f(o.get('fail_mass_lift'), 5, 2)} {f(o.get('road'), 6)}")
    return "\n".join(lines)
