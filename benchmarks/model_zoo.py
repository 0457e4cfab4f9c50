"""Model zoo benchmark: params, MACs at 64/224 px and training throughput of every registered model.

Throughput = images/s of forward + backward + SGD step on a batch of 32 random 64x64 inputs
(9 classes, 3 channels), after warm-up iterations; torch threads = 2 on CPU by default.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/model_zoo.py [--models a,b] [--device cpu|cuda] [--json out]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from waferlab.io import write_json
from waferlab.models import create_model, list_models, model_spec
from waferlab.models.profile import count_macs, count_params


def throughput(name: str, device: str, batch: int, size: int, warmup: int, iters: int) -> float:
    """Training images/s (forward + backward + optimizer step) of model ``name``."""
    model = create_model(name, num_classes=9, in_chans=3).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 9, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: all registered)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = args.models.split(",") if args.models else list_models()
    rows = []
    for name in tqdm(names, desc="models", unit="model"):
        model = create_model(name, num_classes=9, in_chans=3)
        rows.append({
            "name": name, "family": model_spec(name).family, "params": count_params(model),
            "macs_64": count_macs(model, 64), "macs_224": count_macs(model, 224),
            "train_img_s": throughput(name, args.device, args.batch, args.size, args.warmup, args.iters),
        })
        del model
    dev = args.device if args.device != "cpu" else f"cpu, {args.threads} threads"
    print(f"\nfwd+bwd+step images/s at {args.size} px, batch {args.batch} ({dev}); 9 classes, 3 channels")
    print(f"{'model':<24}{'family':<20}{'params M':>9}{'MACs@64 M':>11}{'MACs@224 M':>12}{'img/s':>9}")
    for r in rows:
        print(f"{r['name']:<24}{r['family']:<20}{r['params'] / 1e6:>9.3f}{r['macs_64'] / 1e6:>11.1f}"
              f"{r['macs_224'] / 1e6:>12.1f}{r['train_img_s']:>9.1f}")
    if args.json:
        write_json(args.json, {"device": dev, "batch": args.batch, "size": args.size, "rows": rows,
                               "torch": torch.__version__})
        print(json.dumps({"written": args.json}))


if __name__ == "__main__":
    main()
