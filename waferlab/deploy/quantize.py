"""``waferlab export --quantize int8``: static int8 (QDQ) quantisation of the exported graph, and how far it
moves the outputs.

Only the network's nodes are quantised (torch.onnx names them under :data:`NETWORK_SCOPE`): weights per
output channel (int8), activations per tensor (uint8) with ranges calibrated on maps the run knows (its
validation part, rebuilt from its config and seed as training split it, or ``--calib-data``). The rest of
the exported graph stays float32: the one-hot encoding, the classifier layer (:data:`FLOAT_SCOPE`), the logit
scale and temperature, the softmax and the unknown-pattern score (k-NN bank product, top-k, Mahalanobis,
energy); the pooled features it reads are dequantised from the last int8 feature map. At export the int8
graph is compared with the float32 one on the run's test part (held out from training and calibration
alike) and the figures go into the file's metadata (:func:`compare_outputs`). The operating point and the
unknown-pattern threshold are moved to the int8 outputs on the calibration maps (:func:`transfer_thresholds`).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from waferlab.deploy import DEFAULT_CALIB_MAPS, QUANTIZE_MODES
from waferlab.errors import WaferlabError

#: Name prefix torch.onnx gives the nodes of ``DeployGraph.model``: the only nodes quantised.
NETWORK_SCOPE = "/model/"
#: Nodes of the network kept float32 too: the registry's ``model.classifier`` (the last layer, a few thousand
#: multiply-adds; a cosine head multiplies its output by the logit scale), whose logits feed the temperature,
#: the probabilities and the energy score; int8 there moved the top-1 of more near-tied maps.
FLOAT_SCOPE = "/classifier/"
#: Maps per calibration batch (onnxruntime keeps every intermediate tensor of a batch to take its range).
CALIB_BATCH = 64
#: Held-out maps the export compares float32 and int8 on (a stratified sample when the test part is larger).
CHECK_MAPS = 2048


@dataclass
class QuantizeOptions:
    """``--quantize``, ``--calib-data`` and ``--calib-maps`` of ``waferlab export``."""

    mode: str = "none"
    calib_data: str | None = None  # None: the run's validation part
    calib_maps: int = DEFAULT_CALIB_MAPS

    def check(self) -> None:
        """One-line errors for a bad combination, before anything is read or written."""
        if self.mode not in QUANTIZE_MODES:
            raise WaferlabError(f"--quantize {self.mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        if self.mode == "none" and self.calib_data is not None:
            raise WaferlabError(f"--calib-data {self.calib_data}: calibration data only serves --quantize "
                                f"{'/'.join(m for m in QUANTIZE_MODES if m != 'none')}")
        if self.calib_maps < 1:
            raise WaferlabError(f"--calib-maps {self.calib_maps}: give at least 1 map")
        if self.calib_data is not None and not Path(self.calib_data).exists():
            raise WaferlabError(f"{self.calib_data}: no such file or directory (--calib-data)")


@dataclass
class CalibrationSet:
    """Maps to calibrate on, and held-out labelled maps to check the quantised graph on (None: none here)."""

    maps: np.ndarray
    source: str
    check_maps: np.ndarray | None = None
    check_labels: np.ndarray | None = None  # ids into the run's classes


def calibration_set(run: Any, opts: QuantizeOptions) -> CalibrationSet:
    """The calibration maps (``--calib-data`` or the run's validation part; about ``calib_maps``, a
    stratified sample) and the run's test part for the check, all at the run's size."""
    from waferlab.deploy.ood import stratified_sample
    from waferlab.engine.evaluate import map_labels

    split = _run_split(run)
    if opts.calib_data is not None:
        from waferlab.data.cache import load_prepared

        spec = run.spec()
        p = load_prepared(opts.calib_data, spec.image_size, progress=False, resize=spec.resize)
        maps, labels, source = p.maps, p.labels, Path(opts.calib_data).name
    elif split is None:
        raise WaferlabError(f"{_missing_data(run)}: the run's training data is not here, so its "
                            f"validation part cannot be rebuilt to calibrate int8; give --calib-data SRC "
                            f"(labelled or not, maps like those to predict)")
    else:
        maps, labels = split.data.maps[split.val], split.data.labels[split.val]
        source = "the run's validation part"
    if len(maps) == 0:
        raise WaferlabError(f"{opts.calib_data or source}: no maps to calibrate int8 on")
    pick = stratified_sample(np.asarray(labels), opts.calib_maps, seed=0)
    out = CalibrationSet(np.ascontiguousarray(maps[pick]), f"{source} ({len(pick)} of {len(maps)} maps)")
    if split is not None and len(split.test):
        keep, y = map_labels(tuple(split.data.class_names), split.data.labels[split.test], run.class_names,
                             "the run's test part")
        pick = stratified_sample(y, CHECK_MAPS, seed=1)
        out.check_maps, out.check_labels = split.data.maps[split.test[keep][pick]], y[pick]
    return out


def _missing_data(run: Any) -> str | None:
    """The first of the run's training sources (``data``, then ``val_data``) that is not here, if any."""
    from waferlab.engine.config import missing_data

    gone = missing_data(run.config_values(), required=True)
    if gone is None:
        return None
    return "config.yaml: field 'data'" if gone[1] is None else str(gone[1])


def _run_split(run: Any) -> Any:
    """The run's data split again (same config and seed as training), or None when its data is not here."""
    from waferlab.engine.config import config_from_dict
    from waferlab.engine.datamodule import load_split_data

    if _missing_data(run) is not None:
        return None
    return load_split_data(config_from_dict({**run.config_values(), "progress": False}, "config.yaml"))


class _Reader(CalibrationDataReader):
    """onnxruntime's calibration reader over uint8 maps, :data:`CALIB_BATCH` at a time."""

    def __init__(self, maps: np.ndarray) -> None:
        self._batches = iter([maps[i:i + CALIB_BATCH] for i in range(0, len(maps), CALIB_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"maps": np.ascontiguousarray(batch)}


def quantize_int8(proto: Any, maps: np.ndarray) -> Any:
    """A QDQ int8 copy of an exported float32 graph (``onnx.ModelProto``), calibrated (min/max) on ``maps``.

    ``quant_pre_process`` first folds the Identity nodes torch.onnx emits for shared constants (without it
    the convolutions' biases are not initializers, onnxruntime cannot fuse DQ-Conv-Q into QLinearConv, and
    the int8 graph runs slower than the float32 one)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.preprocess import quant_pre_process

    reader = _Reader(maps)
    with tempfile.TemporaryDirectory(prefix="waferlab-int8-") as tmp:
        src, pre, out = (str(Path(tmp) / name) for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        keep_float = [n.name for n in onnx.load(pre).graph.node
                      if not n.name.startswith(NETWORK_SCOPE) or FLOAT_SCOPE in n.name]
        quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=keep_float)
        return onnx.load(out)


def compare_outputs(ref: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray],
                    labels: np.ndarray | None, contract: Any, new_contract: Any = None) -> dict[str, Any]:
    """How far ``new`` (probs, unknown scores) moves from ``ref`` on the same maps: top-1 agreement, max abs
    probability difference, agreement of the defect and unknown flags (each at its own contract's
    thresholds; ``new_contract`` defaults to ``contract``), Spearman correlation of the unknown scores, and
    macro-F1 and defect recall (at the operating point) of both when ``labels`` (ids of the contract's
    classes) are given."""
    from scipy.stats import spearmanr

    from waferlab.deploy.predict import map_flags
    from waferlab.engine.metrics import compute_metrics

    (p0, s0), (p1, s1) = ref, new
    f0, f1 = map_flags(p0, s0, contract), map_flags(p1, s1, new_contract or contract)
    out: dict[str, Any] = {
        "maps": len(p0),
        "top1_agreement": float(np.mean(p0.argmax(1) == p1.argmax(1))),
        "max_abs_prob_diff": float(np.abs(p0 - p1).max()),
        "defect_flag_agreement": float(np.mean(f0["defect"] == f1["defect"])),
        "unknown_flag_agreement": float(np.mean(f0["unknown"] == f1["unknown"])),
        "unknown_score_spearman": float(spearmanr(s0, s1)[0]),
    }
    if labels is not None:
        names = contract.class_names
        out["macro_f1_fp32"] = compute_metrics(labels, p0, names)["macro_f1"]
        out["macro_f1_int8"] = compute_metrics(labels, p1, names)["macro_f1"]
        is_defect = labels != names.index("none") if "none" in names else np.ones(len(labels), bool)
        if is_defect.any():  # the operating point's promise (>= 0.99 on its fitting maps) on held-out maps
            out["defect_recall_fp32"] = float(f0["defect"][is_defect].mean())
            out["defect_recall_int8"] = float(f1["defect"][is_defect].mean())
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def matched_threshold(ref: np.ndarray, new: np.ndarray, t: float, below: bool) -> float:
    """The threshold on ``new`` that flags as many maps as ``t`` flags of ``ref`` (the same maps; a map is
    flagged when its value is below ``t``, or above it); ``t`` itself when it flags none or all of them."""
    n = len(ref)
    k = int(np.sum(ref < t)) if below else int(np.sum(ref > t))
    if k in (0, n):
        return float(t)
    s = np.sort(np.asarray(new, np.float32))
    if below:  # flag x < t': just above the k-th smallest
        return float(np.nextafter(s[k - 1], np.float32(np.inf)))
    return float(s[n - k - 1])  # flag x > t': the k largest lie above the (n - k)-th smallest


def transfer_thresholds(ref: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray],
                        contract: Any, source: str) -> Any:
    """``contract`` with its operating point (P(none) threshold) and unknown-pattern threshold moved to the
    int8 graph's outputs ``new`` (probs, scores) so that each flags as many calibration maps as the float32
    threshold flags of ``ref``: int8 shifts probabilities and scores a little, and a threshold fitted on the
    float32 outputs would otherwise change the defect recall and the unknown rate it was chosen for."""
    (p0, s0), (p1, s1) = ref, new
    names = list(contract.class_names)
    none_t = contract.none_threshold
    if none_t is not None and "none" in names:
        c = names.index("none")
        none_t = matched_threshold(p0[:, c], p1[:, c], none_t, below=True)
    ood_t = matched_threshold(np.asarray(s0), np.asarray(s1), contract.ood_threshold, below=False)
    record = {"on": source, "maps": int(len(p0)), "none_threshold_fp32": contract.none_threshold,
              "ood_threshold_fp32": contract.ood_threshold}
    return replace(contract, none_threshold=none_t, ood_threshold=ood_t, threshold_transfer=record)


def session_of(proto: Any, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of an in-memory graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _outputs(sessions: list[Any], maps: np.ndarray, contract: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probs, final unknown scores) of each session on the same ``maps``; their wafer descriptors (a
    ``knn+wafer`` contract) are computed once for all sessions."""
    from waferlab.deploy.descriptors import wafer_descriptors
    from waferlab.deploy.export import run_session

    descriptors = wafer_descriptors(maps) if contract.wafer_part is not None else None
    return [run_session(s, maps, 256, contract, descriptors)[1:] for s in sessions]


def quantize_export(run: Any, proto: Any, contract: Any, opts: QuantizeOptions) -> tuple[Any, Any]:
    """(int8 graph, contract recording the quantisation, its calibration and the held-out check)."""
    data = calibration_set(run, opts)
    qproto = quantize_int8(proto, data.maps)
    fp32 = replace(contract, quantization="int8", calibration_maps=len(data.maps),
                   calibration_source=data.source)
    sessions = [session_of(g) for g in (proto, qproto)]
    calib = _outputs(sessions, data.maps, fp32)
    contract = transfer_thresholds(calib[0], calib[1], fp32, data.source)
    if data.check_maps is None:
        print("waferlab: note: no held-out part of the run's data here: int8 not compared with float32",
              file=sys.stderr)
        return qproto, contract
    outs = _outputs(sessions, data.check_maps, fp32)
    check = compare_outputs(outs[0], outs[1], data.check_labels, fp32, contract)
    contract = replace(contract, quantization_check={"on": "the run's test part", **check})
    print(f"waferlab: int8 vs float32 on {check['maps']} held-out maps (the run's test part): top-1 "
          f"agreement {check['top1_agreement']:.4f}, max |prob diff| {check['max_abs_prob_diff']:.4f}, "
          f"macro-F1 {check['macro_f1_fp32']:.4f} -> {check['macro_f1_int8']:.4f}, unknown-score Spearman "
          f"{check['unknown_score_spearman']:.4f}", file=sys.stderr)
    return qproto, contract
