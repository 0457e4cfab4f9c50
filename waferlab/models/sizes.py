"""The three model sizes of SP&A-Net's accuracy-vs-parameters figure (seeds.md B.7, raei/radi/rapi.jpg).

The figure plots SP&A-Net and four peers at three sizes each but does not say how the sizes were made. Here
each size is the model's ``width`` option (channel multiplier) that lands on the figure's parameter count
(x-positions read by eye, about +-0.1M), for 9 classes and the models' defaults (SP&A-Net: the default
``attention="code"``, ``sa_pattern="ghostnet"``). Build one with ``create_model(name, 9, width=w)``. GCNet is
taken as the GC-ResNet34 baseline, whose stage widths scale in steps of 8 channels, so its sizes land
within 2% instead of 0.5%. Kept torch-free so the CLI can list it without importing torch.
"""

from __future__ import annotations

#: model name -> ((width, published parameters in millions), ...) for the figure's small/medium/large sizes.
FIGURE_SIZES: dict[str, tuple[tuple[float, float], ...]] = {
    "spanet": ((0.72, 2.4), (0.94, 3.7), (1.21, 5.6)),
    "ghostnet_100": ((0.66, 2.0), (0.85, 3.0), (1.09, 4.5)),
    "mobilenetv3_large_100": ((0.68, 2.3), (0.88, 3.4), (1.12, 5.1)),
    "mobilenetv2_100": ((1.22, 3.3), (1.44, 4.6), (1.68, 6.2)),
    "gc_resnet34": ((0.67, 9.8), (0.73, 11.5), (0.8, 13.8)),
}
