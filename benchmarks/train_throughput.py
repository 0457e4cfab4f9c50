"""Training throughput: waferlab's full training path vs the bare model step on tensors already in memory.

Full path = index-batch DataLoader -> LightningModule (gather uint8 maps on the device, Augmenter, resize if
needed, encode, forward, loss, backward, AdamW step, LR schedule) driven by a Lightning Trainer.
Bare = the same model, loss and optimizer on a pre-encoded float batch, in a plain loop.
The ratio full/bare should be >= 0.9 (the data path must not cost more than ~10%). Rates use the MEDIAN
step time (robust on a shared, noisy machine); bare and full runs alternate ``--repeats`` times.

    python benchmarks/train_throughput.py                                   # CPU, 64 px, batch 64
    python benchmarks/train_throughput.py --device cuda --image-size 224 --precision bf16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def bare_step_rate(model_name: str, args: argparse.Namespace, num_classes: int = 9) -> float:
    """Images/s of forward+backward+AdamW on a fixed, already encoded batch."""
    from waferlab.models import create_model

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, in_chans=3).to(dev).train()
    cuda = dev.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (args.batch_size,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    fwd = torch.compile(model) if args.compile else model

    def step() -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = loss_fn(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    durations = []
    for _ in range(args.steps):
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        durations.append(time.perf_counter() - start)
    return args.batch_size / float(np.median(durations))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _datamodule(cfg: object, p: object) -> object:
    """The engine's data module over prepared maps ``p``, every map a training map."""
    from waferlab.engine.datamodule import SplitData, WaferDataModule

    empty = np.arange(0)
    return WaferDataModule(cfg, SplitData(p, np.arange(len(p.maps)), empty, empty))


def interleaved_rates(model_name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(bare, module) images/s, alternating one bare step and one module step so load drift cancels.

    Module step = WaferDataModule.gather (index -> uint8 maps on the device, Augmenter, encode) + forward +
    the configured loss + backward + AdamW step: the full path minus Lightning's loop.
    """
    from waferlab.data.cache import prepare
    from waferlab.data.synth import generate
    from waferlab.engine.config import build_config
    from waferlab.engine.module import WaferClassifier
    from waferlab.models import create_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cfg = build_config("default", {"model": model_name, "image_size": args.image_size,
                                   "batch_size": args.batch_size, "epochs": 1, "progress": False})
    p = prepare(generate(args.n_maps, seed=0), args.image_size)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = create_model(model_name, num_classes=len(p.class_names), in_chans=3).to(dev).train()
        nets.append(net.to(memory_format=torch.channels_last) if cuda else net)
    data = _datamodule(cfg, p)
    data.maps, data.labels = data.maps.to(dev), data.labels.to(dev)
    module = WaferClassifier(nets[1], cfg, data.class_counts()).to(dev)
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in nets]
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(p.class_names), (args.batch_size,), device=dev)
    gen = torch.Generator().manual_seed(0)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def bare() -> None:
        with torch.autocast(**amp):
            loss = torch.nn.functional.cross_entropy(nets[0](x).float(), y)
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()

    def full() -> None:
        idx = torch.randperm(len(p), generator=gen)[:args.batch_size]
        xb, yb = data.gather(idx, train=True)
        with torch.autocast(**amp):
            loss = module.criterion(module(xb).float(), yb)
        opts[1].zero_grad(set_to_none=True)
        loss.backward()
        opts[1].step()

    times: dict[str, list[float]] = {"bare": [], "full": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("bare", bare), ("full", full)) if i % 2 == 0 else (("full", full), ("bare", bare)):
            _sync(dev)
            start = time.perf_counter()
            fn()
            _sync(dev)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    bs = args.batch_size
    return bs / float(np.median(times["bare"])), bs / float(np.median(times["full"]))


def full_path_rate(model_name: str, args: argparse.Namespace) -> float:
    """Images/s of the real training path (Trainer + data module + WaferClassifier), after warm-up."""
    import lightning as L

    from waferlab.data.cache import prepare
    from waferlab.data.synth import generate
    from waferlab.engine.config import build_config
    from waferlab.engine.module import WaferClassifier
    from waferlab.models import create_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cfg = build_config("default", {"model": model_name, "image_size": args.image_size,
                                   "batch_size": args.batch_size, "epochs": 1, "progress": False,
                                   "compile": bool(args.compile)})
    p = prepare(generate(args.n_maps, seed=0), args.image_size)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(p.class_names), in_chans=3)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    data = _datamodule(cfg, p)
    module = WaferClassifier(model, cfg, data.class_counts())
    total = args.warmup + args.steps
    if len(p) // args.batch_size < total:
        raise SystemExit(f"--n-maps {args.n_maps} gives {len(p) // args.batch_size} batches; need {total}")
    times: list[float] = []

    class _Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            _sync(dev)
            times.append(time.perf_counter())

    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, max_steps=total,
                        deterministic=not cuda, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[_Clock()],
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    durations = np.diff(times[args.warmup - 1:])  # end of one step to end of the next: everything included
    return args.batch_size / float(np.median(durations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet34,cbam,spanet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="alternate bare/full this often, keep best")
    parser.add_argument("--n-maps", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    print(f"device {args.device}, {args.image_size} px, batch {args.batch_size}, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}")
    print("| model | bare step img/s | module step img/s (interleaved) | ratio | bare (separate) img/s | "
          "Lightning Trainer img/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        ib, im = interleaved_rates(name, args)
        bare, full = 0.0, 0.0
        for _ in range(args.repeats):  # alternated, best median of each: fair on a noisy, shared machine
            bare = max(bare, bare_step_rate(name, args))
            full = max(full, full_path_rate(name, args))
        print(f"| {name} | {ib:.1f} | {im:.1f} | {im / ib:.3f} | {bare:.1f} | {full:.1f} | "
              f"{full / bare:.3f} |", flush=True)


if __name__ == "__main__":
    main()
