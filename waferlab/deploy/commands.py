"""``waferlab predict``, ``waferlab calibrate`` and ``waferlab export``."""

from __future__ import annotations

import argparse
import sys

from waferlab.deploy import DEFAULT_CALIB_MAPS, EXPORT_FORMATS, QUANTIZE_MODES
from waferlab.deploy.ood import METHODS as OOD_METHODS
from waferlab.deploy.predict import BACKENDS
from waferlab.engine.predict import add_autocast_flag, add_tta_flag


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``predict``, ``calibrate`` and ``export`` to the top-level parser."""
    p = sub.add_parser("predict", help="predict every map of a source with a trained run or an ONNX export",
                       description="One output row per map (source row, lot, wafer, predicted class and its "
                                   "calibrated probability, top 3, P(none) and the defect flag at the run's "
                                   "operating point, the unknown-pattern score and flag, the true label when "
                                   "known), streamed in chunks and written atomically. The run must be "
                                   "calibrated (training does it; else 'waferlab calibrate').")
    p.add_argument("run", help="run directory, or an ONNX file written by 'waferlab export'")
    p.add_argument("--data", required=True, help="any source the readers take, labelled or not, or a cache")
    p.add_argument("--out", required=True, help="output file: .csv, .parquet or .jsonl")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="torch (run directory), onnx (onnxruntime; RUN/exports/model.onnx or the ONNX "
                        "file) or openvino (the same file, OpenVINO CPU plugin; pip install "
                        "'waferlab[openvino]'); default: onnx for an .onnx file, else torch")
    p.add_argument("--gallery", default=None, metavar="FILE.html",
                   help="also write a self-contained HTML gallery of the predicted maps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096, help="maps read, prepared and written at a time")
    p.add_argument("--devices", type=int, default=None,
                   help="worker processes, one per device (default: every CUDA GPU, else 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_autocast_flag(p)
    add_tta_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    p = sub.add_parser("calibrate", help="fit calibration, operating point and unknown-pattern threshold",
                       description="Temperature scaling, a P(none) threshold reaching the defect-vs-none "
                                   "recall target, and the unknown-pattern threshold at the in-distribution "
                                   "recall target, fitted on labelled held-out maps and written into the "
                                   "run (calibration.json, thresholds.json, ood.json, ood.safetensors, "
                                   "trust.md).")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", required=True, help="labelled held-out maps (any source or cache)")
    p.add_argument("--defect-recall", type=float, default=0.99,
                   help="defect-vs-none recall of the operating point (default 0.99, SP&A-Net's rule)")
    p.add_argument("--id-recall", type=float, default=0.95,
                   help="share of known-class maps NOT flagged unknown (default 0.95)")
    p.add_argument("--ood-method", choices=OOD_METHODS, default=None,
                   help="unknown-pattern score (default: the one benchmarks/open_set.py measured best)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("export", help="export a calibrated run as one self-describing ONNX file",
                       description="Dynamic batch; input uint8 maps (N,S,S) at the run's size; outputs "
                                   "logits, calibrated probs and the unknown-pattern score; the input "
                                   "contract (encoding, size, resize rule, classes, temperature, "
                                   "thresholds) is in the metadata.")
    p.add_argument("run", help="run directory (calibrated)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", default=None,
                   help="output file (default RUN/exports/model.onnx; with --quantize int8 model-int8.onnx)")
    p.add_argument("--quantize", default=QUANTIZE_MODES[0], metavar="{" + ",".join(QUANTIZE_MODES) + "}",
                   help="int8: static QDQ quantisation of the network (per-channel int8 weights, uint8 "
                        "activations calibrated on the run's validation part or --calib-data; encoding, "
                        "temperature and unknown-pattern score stay float32), compared with float32 on the "
                        "run's test part; faster on CPUs with VNNI, see README 'Deploy' (default: "
                        f"{QUANTIZE_MODES[0]}, float32)")
    p.add_argument("--calib-data", default=None, metavar="SRC",
                   help="maps to calibrate int8 on (any source or cache, labels not needed; default: the "
                        "run's validation part, rebuilt from its data, config and seed)")
    p.add_argument("--calib-maps", type=int, default=DEFAULT_CALIB_MAPS, metavar="N",
                   help=f"calibrate on about N maps, a stratified sample when there are more (default "
                        f"{DEFAULT_CALIB_MAPS})")
    p.set_defaults(func=_export)


def _predict(args: argparse.Namespace) -> int:
    from waferlab.deploy.predict import PredictJob, predict_file

    job = PredictJob(run=args.run, data=args.data, out=args.out, backend=args.backend, gallery=args.gallery,
                     batch_size=args.batch_size, chunk_size=args.chunk_size, devices=args.devices,
                     device=args.device, progress=not args.no_progress, tta=args.tta,
                     autocast=args.autocast)
    print(predict_summary(predict_file(job), args.out, args.gallery), file=sys.stderr)
    return 0


def predict_summary(s: dict, out: str, gallery: str | None) -> str:
    """The one line `predict` ends with: counts, time and rate (two significant digits under 10 maps/s)."""
    rate = s["maps"] / s["seconds"] if s["seconds"] else float("nan")
    rate_text = f"{rate:.2g}" if rate < 10 else f"{rate:.0f}"
    model = "" if s["quantization"] == QUANTIZE_MODES[0] else f" ({s['quantization']} model)"
    return (f"waferlab: {s['maps']} maps{model} -> {out} ({s['defect']} flagged defect, "
            f"{s['unknown']} unknown, {s['low_confidence']} low-confidence) in {s['seconds']:.1f} s "
            f"({rate_text} maps/s)" + (f"; gallery -> {gallery}" if gallery else ""))


def _calibrate(args: argparse.Namespace) -> int:
    from waferlab.deploy.trust import TrustOptions, calibrate_run

    opts = TrustOptions(defect_recall=args.defect_recall, id_recall=args.id_recall)
    if args.ood_method:
        opts.ood_method = args.ood_method
    res = calibrate_run(args.run, args.data, opts, batch_size=args.batch_size, device=args.device,
                        progress=not args.no_progress)
    c, t = res["calibration"], res["thresholds"]
    fa = t.get("false_alarm_rate")
    op = (f"P(none) < {t['none_threshold']:.4g} (defect recall {t['defect_recall']:.4f}, false alarms "
          f"{'n/a' if fa is None else round(fa, 4)})"
          if t.get("none_threshold") is not None else "none")
    print(f"waferlab: T = {c['temperature']:.3f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; "
          f"operating point {op}; unknown if {t['ood_method']} > {t['ood_threshold']:.4g} -> {args.run}",
          file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from waferlab.deploy.export import export_run
    from waferlab.deploy.quantize import QuantizeOptions

    quantize = QuantizeOptions(args.quantize, args.calib_data, args.calib_maps)
    print(export_run(args.run, args.out, args.format, quantize))
    return 0
