"""``predict --gallery``: one self-contained HTML page of predicted maps (thumbnails, GradCAM overlays,
filter by class, sort by confidence, unknown/low-confidence first).

For large inputs the page holds a bounded selection, kept while predict streams: every unknown and
low-confidence map up to :attr:`GallerySelection.cap` (the strangest first) and a uniform sample of
:attr:`GallerySelection.per_class` maps per predicted class; the page shows the counts of all maps and says
what it holds, so it stays a few MB and opens fast.
"""

from __future__ import annotations

import base64
import heapq
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: RGB of no die / good die / failed die (viridis at 0, 0.5, 1, as in most wafer-map figures).
PALETTE = np.array([(68, 1, 84), (33, 145, 140), (253, 231, 37)], dtype=np.uint8)
THUMB = 96  # thumbnail side in pixels
TEMPLATE = Path(__file__).with_name("gallery_template.html")


@dataclass
class GallerySelection:
    """The bounded set of maps the page shows, filled chunk by chunk, plus the counts of every map."""

    cap: int = 300
    per_class: int = 16
    low_confidence: float = 0.5
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    n: int = 0
    n_flagged: int = 0
    _flagged: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    _sample: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def offer(self, chunk: Any, frame: Any) -> None:
        """Consider every map of a predicted chunk (``frame`` from ``rows_frame``) for the page."""
        records = frame.to_dict("records")
        for i, rec in enumerate(records):
            self.n += 1
            cls = rec["pred_class"]
            self.counts[cls] = self.counts.get(cls, 0) + 1
            flagged = bool(rec["unknown"]) or rec["prob"] < self.low_confidence
            item = {**rec, "map": chunk.maps[i]}
            if flagged:
                self.n_flagged += 1
                # priority: unknowns first (by score), then the least confident
                key = (1.0 + float(rec["unknown_score"]) if rec["unknown"] else 1.0 - float(rec["prob"]))
                entry = (key, self.n, item)
                if len(self._flagged) < self.cap:
                    heapq.heappush(self._flagged, entry)
                elif key > self._flagged[0][0]:
                    heapq.heapreplace(self._flagged, entry)
                continue
            seen = self._seen.get(cls, 0) + 1  # reservoir sampling: a uniform sample of each class
            self._seen[cls] = seen
            bucket = self._sample.setdefault(cls, [])
            if len(bucket) < self.per_class:
                bucket.append(item)
            else:
                j = int(self._rng.integers(0, seen))
                if j < self.per_class:
                    bucket[j] = item

    def items(self) -> list[dict[str, Any]]:
        flagged = [e[2] for e in sorted(self._flagged, key=lambda e: -e[0])]
        sampled = [it for cls in sorted(self._sample) for it in self._sample[cls]]
        return flagged + sampled

    def write(self, path: str | Path, model: Any = None, contract: Any = None) -> None:
        """Render the page (with GradCAM overlays when the torch ``model`` is given) atomically."""
        from waferlab.io import write_text

        items = self.items()
        cams = _cams(model, items, contract) if model is not None and items else None
        cards = [_card(it, None if cams is None else cams[i], self.low_confidence)
                 for i, it in enumerate(items)]
        note = (f"Showing {len(items)} of {self.n} maps: " +
                (f"every unknown or low-confidence map ({self.n_flagged}) " if self.n_flagged <= self.cap else
                 f"the {self.cap} strangest of {self.n_flagged} unknown or low-confidence maps ")
                + f"and up to {self.per_class} sampled per predicted class."
                if len(items) < self.n else f"Showing all {self.n} maps.")
        data = {"cards": cards, "counts": self.counts, "n": self.n, "n_flagged": self.n_flagged, "note": note,
                "cam": cams is not None, "low_confidence": self.low_confidence,
                "classes": list(contract.class_names) if contract else sorted(self.counts),
                "cam_note": "" if cams is not None else "GradCAM overlays need the run directory."}
        html = TEMPLATE.read_text(encoding="utf-8").replace("/*__DATA__*/null",
                                                            json.dumps(data).replace("</", "<\\/"))
        write_text(path, html)


def _png(rgb: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 80} if fmt == "JPEG" else {"optimize": True}))
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _upscale(img: np.ndarray) -> np.ndarray:
    from waferlab.data.cache import nearest_indices

    idx = nearest_indices(img.shape[0], THUMB)
    jdx = nearest_indices(img.shape[1], THUMB)
    return img[idx][:, jdx]


def _overlay(m: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map in gray with the CAM as a jet heat map on top (alpha follows the heat)."""
    from matplotlib import colormaps

    gray = np.array([30, 150, 235], np.float32)[m][..., None].repeat(3, axis=2)
    heat = colormaps["jet"](cam)[..., :3] * 255
    alpha = 0.65 * cam[..., None]
    return _upscale((gray * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8))


def _cams(model: Any, items: list[dict[str, Any]], contract: Any) -> list[str]:
    from waferlab.explain.cam import compute_cams

    names = list(contract.class_names)
    maps = np.stack([it["map"] for it in items])
    targets = [names.index(it["pred_class"]) for it in items]
    res = compute_cams(model, maps, contract.spec, ("gradcam",), targets=targets, batch_size=32,
                       device="cpu")
    return [_png(_overlay(m, c), "JPEG") for m, c in zip(maps, res.cams["gradcam"])]


def _card(it: dict[str, Any], cam: str | None, low: float) -> dict[str, Any]:
    def num(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 4)

    return {"img": _png(_upscale(PALETTE[it["map"]])), "cam": cam, "row": int(it["row"]),
            "lot": str(it["lot"]), "wafer": int(it["wafer"]), "cls": it["pred_class"],
            "prob": num(it["prob"]),
            "top2": [it["top2_class"], num(it["top2_prob"])],
            "top3": [it["top3_class"], num(it["top3_prob"])],
            "unknown": bool(it["unknown"]), "score": num(it["unknown_score"]), "defect": bool(it["defect"]),
            "low": bool(it["prob"] < low), "truth": str(it["true_label"] or "")}
