"""``waferlab train`` and ``waferlab evaluate``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from waferlab.engine.predict import add_tta_flag

_TRAIN_FLAGS = {  # CLI flag dest -> config key (None values are "not given")
    "model": "model", "data": "data", "out": "out", "init": "init", "val_data": "val_data",
    "optimizer": "optimizer",
    "scheduler": "scheduler", "epochs": "epochs", "image_size": "image_size", "resize": "resize",
    "seed": "seed", "batch_size": "batch_size", "lr": "lr", "class_set": "class_set", "encoding": "encoding",
    "split": "split", "loss": "loss", "pretrained": "pretrained", "devices": "devices",
    "num_nodes": "num_nodes",
    "strategy": "strategy", "accelerator": "accelerator", "precision": "precision", "max_maps": "max_maps",
}


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _choices(values: Any) -> str:
    return ", ".join(values)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate`` to the top-level parser (help built from the declared lists)."""
    from waferlab.data.cache import RESIZE_RULES
    from waferlab.data.encode import ENCODINGS
    from waferlab.data.splits import CLASS_SETS, SPLIT_METHODS
    from waferlab.engine.config import preset_names
    from waferlab.engine.optim import OPTIMIZERS, SCHEDULERS
    from waferlab.engine.run import RUN_LAYOUT

    p = sub.add_parser(
        "train", help="train a model on wafer maps into a run directory",
        description="Train a registered model on any wafer-map source or prepared cache. The run directory "
                    f"gets {', '.join(RUN_LAYOUT)} (see README, 'Run directory'). An existing run is "
                    "refused unless --overwrite or --resume. Settings: preset < --config file < flags < "
                    "--set.")
    p.add_argument("--model", required=True, help="registered model name (see 'waferlab models')")
    p.add_argument("--data", required=True, action="append", metavar="SRC[:WEIGHT]",
                   help="source file/folder or a prepared cache (.npz); repeat to train on several sources, "
                        "each optionally with a sampling weight, e.g. --data synth.pkl --data fab.pkl:3")
    p.add_argument("--val-data", metavar="SRC",
                   help="labelled maps to validate on (best checkpoint, calibration, operating point) "
                        "instead of a share of --data, e.g. a fab's few labelled maps when training on "
                        "synthetic ones; --data's own validation share is then trained on")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", default=None,
                   help=f"preset name ({', '.join(preset_names())}) or a YAML file (default: default); "
                        "'multilabel' trains MixedWM38-style multi-hot labels")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, help="side length the maps are resized to")
    p.add_argument("--resize", help=f"how larger grids are shrunk: {_choices(RESIZE_RULES)} "
                                    "(README: Resizing)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--class-set", help=_choices(CLASS_SETS))
    p.add_argument("--encoding", help=_choices(ENCODINGS))
    p.add_argument("--split", help=_choices(SPLIT_METHODS))
    p.add_argument("--optimizer", help=_choices(OPTIMIZERS))
    p.add_argument("--scheduler", help=_choices(SCHEDULERS))
    p.add_argument("--loss", help="training loss (waferlab.losses; an unknown name lists them)")
    p.add_argument("--pretrained", help="imagenet or a path to local weights")
    p.add_argument("--init", metavar="RUN", help="start from a finished run's weights (fine-tuning; the "
                                                 "classifier head is rebuilt when the classes differ)")
    p.add_argument("--devices", type=_devices, help="number of devices (or 'auto')")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--strategy", help="auto, ddp, ... (Lightning strategies)")
    p.add_argument("--accelerator", help="auto, cpu or gpu")
    p.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed (default: bf16-mixed on GPU, "
                                         "32-true on CPU)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    p.add_argument("--max-maps", type=int, help="use a random subset of at most N maps")
    _progress_flag(p)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (YAML value), e.g. --set weight_decay=0 --set "
                        "model_options.width=0.5; repeatable")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run on any labelled data",
                       description="Metrics (accuracy, balanced accuracy, macro P/R/F1, per class, "
                                   "confusion, ECE) of a run on any source; labels are matched to the run's "
                                   "classes by name, unlabeled maps are dropped.")
    p.add_argument("run_dir", help="run directory written by 'waferlab train'")
    p.add_argument("--data", required=True, help="source file/folder or prepared cache")
    p.add_argument("--out", required=True, help="directory for metrics.json, report.md and figures")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_tta_flag(p)
    _progress_flag(p)
    p.set_defaults(func=_evaluate)


def _progress_flag(p: argparse.ArgumentParser) -> None:
    """The same flag for the same thing in every command."""
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs get one line per epoch either way)")


def _train(args: argparse.Namespace) -> int:
    from waferlab.engine.config import build_config
    from waferlab.engine.train import train

    overrides = {key: getattr(args, flag) for flag, key in _TRAIN_FLAGS.items()}
    if args.compile:
        overrides["compile"] = True
    if not args.progress:
        overrides["progress"] = False
    if len(args.data) == 1:
        overrides["data"] = args.data[0]
    cfg = build_config(args.config, overrides, args.sets)
    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if out is not None:
        print(out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from waferlab.engine.evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, args.data, args.out, batch_size=args.batch_size, device=args.device,
                           progress=args.progress, tta=args.tta)
    if metrics.get("task") == "multilabel":
        from waferlab.engine.metrics import multilabel_summary

        print(f"{multilabel_summary(metrics)} -> {args.out}", file=sys.stderr)
        return 0
    print(f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
          f"balanced accuracy {metrics['balanced_accuracy']:.4f}  (n={metrics['n']}) -> {args.out}",
          file=sys.stderr)
    return 0
