"""SP&A-Net (Self-Proliferation-and-Attention Network), re-implemented in PyTorch from the spec (seeds.md B).

Yang & Sun (2022), official TensorFlow code ``github.com/Yfyangd/SPA``. Layout: 16 SP&A blocks on a
GhostNet / MobileNetV3-Large skeleton (:data:`LAYOUT`), then a 1x1-conv head, as in the official code.

**Default = the official code's network with its attention in the graph**: ``attention="code"`` (the
code's ``Self_Attention.py``, softmax fixed), ``sa_pattern="ghostnet"`` (attention in the 7 blocks of
GhostNet's SE placement, as in the original upload 12d190b and the author's later CVPR2022 code; the
repository HEAD switched to all 16 blocks the same day), ratio 2. It has 4,081,128 trainable parameters
for 10 classes, exactly the official Keras code built with that pattern (4,109,944 with Keras' BN moving
statistics).

**The published 2.60M is the network WITHOUT attention.** The paper's r table matches, to the printed
digit, the Keras totals of the notebook model whose self-attention output is dropped (so no SA layer is in
its graph): 2,601,928 at r=0.5 (2.60), 3,398,284 at r=0.13 (ratio 8; 3.40) and 5,099,781 at r=0.06
(ratio 16; 5.10). No placement of the code's attention reaches 2.60M: its C/r -> C conv alone adds
~C²/r parameters per block. Cheapest placements (Keras totals, 10 classes): SA on the block output
instead of the expansion, GhostNet pattern, 2,656,432 (2.66M; neither the code nor the paper's SPA
figure puts it there); on the expansion (code and figure), GhostNet pattern 4,109,944, all 16 blocks
5,125,232. ``attention="none"`` gives the published count exactly (2,573,112 trainable + 28,816
BN statistics = 2,601,928 for 10 classes); it is the ablation's "SPNet (no attention)" row.

Parameters (trainable, 10 classes, ratio 2, width 1; Keras totals add the BN moving mean/var):

============================  ===========  =====================================================
variant (options)             params       note
============================  ===========  =====================================================
``attention=none``              2,573,112  = notebook, published 2.60M (Keras total 2,601,928)
``code``, ``ghostnet`` (def.)   4,081,128  = official code, original SE pattern (Keras 4,109,944)
``code``, ``all``               5,096,416  = official code HEAD (Keras 5,125,232)
``gate``, ``ghostnet``          5,577,336  GC context (C -> C/2), hard-sigmoid gate
``gate``, ``all``               7,599,320  the previous default
``gc``, ``ghostnet``            5,577,336  GC block of the paper's figure (additive)
``gc``, ``all``                 7,599,320
``se``, ``ghostnet``            2,964,376  timm SEModule, reduction 16
``se``, ``all``                 3,235,344
``nl``, ``ghostnet``            4,116,312  timm NonLocalAttn, C/8
``nl``, ``all``                 5,139,536
``snl``, ``ghostnet``          10,071,864  spectral non-local, C/2
``snl``, ``all``               15,118,232
``flatten=gap`` (default SA)    2,846,578  pool -> Linear(960, classes): no 1280 hidden layer
============================  ===========  =====================================================

Composition ratio (the paper's r = 1/ratio; option ``r`` or ``ratio``), default attention and none,
against the paper's r table (r2.jpg; the published counts are Keras totals of the attention-free model):

=====  =====  =============  ==============  =================  ===============================
r      ratio  published (M)  none, Keras     none, trainable    default (code, ghostnet)
=====  =====  =============  ==============  =================  ===============================
0.06   16     5.10           5,099,781       5,004,437          11,602,901
0.13   8      3.40           3,398,284       3,340,956          6,467,658
0.25   4      2.98           2,685,136       2,646,816          4,318,932
0.50   2      2.60           2,601,928       2,573,112          4,081,128
0.63   --     2.47           cannot be built
0.83   --     2.35           cannot be built
1.00   1      2.29           3,461,656       3,432,840          6,444,936
=====  =====  =============  ==============  =================  ===============================

r = 0.63 and 0.83 cannot be built: ratio 1/r = 1.6 / 1.2 is not a whole number, and the cheap
depthwise convs have a depth multiplier of ratio - 1, which must be a whole number (the official code
cannot build them either). r = 0.25 builds but has 2.69M, not the published 2.98M (no integer ratio
gives 2.98M; ratio 6 gives 3.02M). r = 1.0 (ratio 1) in the official code has zero-channel depthwise
convs (multiplier 0), a broken network; here their multiplier is 1, see :class:`SPABlock`. The published
2.47 / 2.35 / 2.29M for r > 0.5 fall below every ratio's count, so they come from a network that is not
in the repository.

Width (``width``, channel multiplier, rounded to multiples of 4; the 1280-wide hidden layer is not scaled,
as in GhostNet): :data:`waferlab.models.sizes.FIGURE_SIZES` lists the widths that land on the three sizes
of the accuracy-vs-parameters figure.

Ablation options (the README's table r1): ``attention`` none | code | gate | gc | se | nl | snl (se, nl, snl
as in :func:`waferlab.models.attention.ablation_attention`, in the same blocks on the same channels);
``attn_norm`` bn | ln | gn replaces the attention's normalisation (LayerNorm in SP&A-Net's own); ``flatten``
conv1x1 (official: GAP, then 1x1 convs 960 -> 1280 -> classes) or gap (GAP, then one Linear). The
optimiser and schedule columns are engine options. Attention on early blocks (``sa_pattern="all"``) with
nl/snl builds HW x HW affinities: 1024² per map at 64 px in block 0, 12544² at 224 px (too big).

Deviations from the official code, each named where it is made:

* **degenerate softmax** (``Self_Attention.py``): Keras' softmax ran over a size-1 channel axis, so it
  returned ones. ``attention="code"`` takes it over the H*W positions (``sa_softmax="spatial"``); the
  literal all-ones behaviour is ``sa_softmax="literal"`` (:class:`CodeSelfAttention`).
* **softmax output**: the official model ends in a softmax. :class:`SPANet` outputs LOGITS; the softmax
  belongs in the loss (``nn.CrossEntropyLoss`` / :class:`waferlab.losses.CircleLoss`).
* **SA unused** (notebook): the notebook dropped the SA block's return value; here the attention is used.
* **init**: ``init="kaiming"`` (default) uses Kaiming-normal fan-out convs and zero-inits each SA's last
  conv (gate 0.5 / identity at start); ``init="glorot"`` is Keras' Glorot-uniform, with Keras' fan counts
  for depthwise kernels (fan_in = k²·C_in, fan_out = k²·multiplier), zero biases and no zero-init.
* **ratio 1** and **ratio != 2 with SA in a stride-2 block**: the official code breaks (multiplier 0; SA
  built on ``exp`` channels while the strided path has exp·(ratio-1)); here the multiplier is at least 1
  and the SA is built on the channels it receives.

Keras conventions kept: BatchNorm eps 1e-3 and momentum 0.01 (Keras momentum 0.99), LayerNorm eps
1e-3, Keras-2 ``hard_sigmoid`` = clip(0.2x + 0.5, 0, 1), and Keras "same" padding: for stride 2 the
padding is computed from the input size and is asymmetric (the extra row/column goes at the
bottom/right), done by :class:`SamePad` in front of an unpadded convolution.

Inference speed: :func:`fuse_for_inference` returns an eval-only copy with every BatchNorm that follows a
convolution folded into it and the code SA's LayerNorm of a rank-1 map in closed form (see there).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models.attention import ATTN_NORMS, ablation_attention, norm2d
from waferlab.models.backbones import load_torchvision_state
from waferlab.models.registry import register

BN_EPS = 1e-3  # Keras BatchNormalization default epsilon
BN_MOMENTUM = 0.01  # PyTorch momentum equivalent to Keras' momentum=0.99
LN_EPS = 1e-3  # Keras LayerNormalization default epsilon

#: Attention in the SP&A blocks: none (SPNet), SP&A-Net's own (code, gate, gc), or another family's.
ATTENTION_MODES = ("none", "code", "gate", "gc", "se", "nl", "snl")
#: Which blocks get attention: GhostNet's 7 SE positions (original code) or all 16 (code HEAD).
SA_PATTERNS = ("ghostnet", "all")
#: The code SA's softmax: over the H*W positions (fixed) or over the size-1 channel axis (literal: ones).
SA_SOFTMAX = ("spatial", "literal")
#: Head after the 960-channel map: GAP + 1x1 convs 1280 -> classes (official), or GAP + one Linear.
FLATTENS = ("conv1x1", "gap")
#: Weight initialisation: PyTorch-style Kaiming fan-out, or Keras' Glorot-uniform.
INITS = ("kaiming", "glorot")
#: The paper's composition ratios r (r2.jpg) -> the code's integer ratio, fixed by the parameter counts.
PAPER_R_RATIO = {0.06: 16, 0.13: 8, 0.25: 4, 0.5: 2, 1.0: 1}
#: The paper's r values whose ratio 1/r is not a whole number, so no depthwise conv can realise them.
PAPER_R_UNBUILDABLE = {0.63: 1.6, 0.83: 1.2}
#: Published parameter counts (millions) of the r table, for the docstring table and its test.
PAPER_R_PARAMS_M = {0.06: 5.10, 0.13: 3.40, 0.25: 2.98, 0.5: 2.60, 0.63: 2.47, 0.83: 2.35, 1.0: 2.29}
#: Output strides (of the CAM layer) offered: 32 is the official layout, 16/8 run the last strided blocks
#: at stride 1 (finer CAMs at wafer sizes; waferlab's addition).
OUTPUT_STRIDES = (32, 16, 8)

# (kernel, expansion, out, stride, use_sa in the GhostNet/original pattern), from the official SPA_Net.py.
LAYOUT: tuple[tuple[int, int, int, int, bool], ...] = (
    (3, 16, 16, 1, False),
    (3, 48, 24, 2, False),
    (3, 72, 24, 1, False),
    (5, 72, 40, 2, True),
    (5, 120, 40, 1, True),
    (3, 240, 80, 2, False),
    (3, 200, 80, 1, False),
    (3, 184, 80, 1, False),
    (3, 184, 80, 1, False),
    (3, 480, 112, 1, True),
    (3, 672, 112, 1, True),
    (5, 672, 160, 2, True),
    (5, 960, 160, 1, False),
    (5, 960, 160, 1, True),
    (5, 960, 160, 1, False),
    (5, 960, 160, 1, True),
)
STEM_CHANNELS = 16
HEAD_CHANNELS = 960
HIDDEN_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 4) -> int:
    """Round a width-scaled channel count to a multiple of ``divisor`` (never below it, never < 90%)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Keras 2.x ``hard_sigmoid``: clip(0.2 x + 0.5, 0, 1) (the official code's gate nonlinearity)."""
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SamePad(nn.Module):
    """Keras/TensorFlow "same" padding for a ``kernel`` x ``kernel`` conv of ``stride``.

    Total padding per axis is max(k - s, 0) when the size divides by s, else max(k - size % s, 0);
    the smaller half goes top/left and the larger bottom/right, so stride-2 convs on even inputs pad
    only bottom/right (PyTorch's symmetric ``padding=`` would shift the sampling grid by one pixel).
    """

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    @staticmethod
    def amounts(size: int, kernel: int, stride: int) -> tuple[int, int]:
        """(before, after) padding of one axis of length ``size``, as TensorFlow computes it."""
        if size % stride == 0:
            total = max(kernel - stride, 0)
        else:
            total = max(kernel - size % stride, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int(): constant pads in an exported graph (ONNX Runtime can then fuse the Pad into the Conv)
        top, bottom = self.amounts(int(x.shape[-2]), self.kernel, self.stride)
        left, right = self.amounts(int(x.shape[-1]), self.kernel, self.stride)
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))


def same_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
    """A bias-free conv with Keras "same" padding (symmetric ``padding=`` when stride is 1)."""
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(SamePad(kernel, stride), nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups,
                                                            bias=False))


class SelfProliferate(nn.Module):
    """SP block (B.1): a GhostNet ghost module without BN/ReLU inside.

    A 1x1 conv makes p = ceil(out / ratio) primary channels; a 3x3 depthwise conv with depth multiplier
    ratio - 1 "proliferates" cheap channels from them; the first ``out`` of [primary, cheap] are kept.
    """

    def __init__(self, cin: int, cout: int, ratio: int = 2, dw_kernel: int = 3) -> None:
        super().__init__()
        self.cout = cout
        primary = math.ceil(cout / ratio)
        self.primary = nn.Conv2d(cin, primary, 1, bias=False)
        self.cheap = (nn.Conv2d(primary, primary * (ratio - 1), dw_kernel, 1, dw_kernel // 2, groups=primary,
                                bias=False) if ratio > 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        if self.cheap is None:
            return p
        out = torch.cat([p, self.cheap(p)], dim=1)
        return out if out.shape[1] == self.cout else out[:, : self.cout]  # no Slice op when nothing is cut


class SelfAttention(nn.Module):
    """SP&A-Net's attention with a GC context (``attention="gate"`` or ``"gc"``).

    Context: a 1x1 conv C->1 scores every position, softmax over the H*W positions, then a weighted sum of
    the features gives a C x 1 x 1 context. Transform: 1x1 conv C->C/ratio, a norm (LayerNorm by default),
    ReLU, 1x1 conv C/ratio->C. Fusion: ``"gate"`` multiplies x by hard_sigmoid(transform) (the code's
    multiplicative hard-sigmoid gating on a GC context; the gate is per channel and the same at every
    position); ``"gc"`` adds the transform to every position (the GC block of the paper's SA figure).
    """

    def __init__(self, channels: int, ratio: int = 2, mode: str = "gate", norm: str = "ln") -> None:
        super().__init__()
        if mode not in ("gate", "gc"):
            raise ValueError(f"SelfAttention mode must be 'gate' or 'gc', got {mode!r}")
        self.mode = mode
        hidden = max(1, channels // ratio)
        self.score = nn.Conv2d(channels, 1, 1, bias=False)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False)
        self.norm = norm2d(norm, hidden, LN_EPS)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=False)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Global context (N, C, 1, 1): softmax over all H*W positions, then attention pooling."""
        n, c, h, w = x.shape
        weights = torch.softmax(self.score(x).reshape(n, 1, h * w), dim=-1)  # (N, 1, HW)
        ctx = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        return ctx.view(n, c, 1, 1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck transform of the context: (N, C, 1, 1), before the gate nonlinearity."""
        return self.expand(F.relu(self.norm(self.reduce(self.context(x)))))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplicative gate in [0, 1] that ``"gate"`` mode applies, broadcast to x's shape."""
        return hard_sigmoid(self.transform(x)).expand_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform(x)
        if self.mode == "gate":
            return x * hard_sigmoid(t)
        return x + t


class CodeSelfAttention(nn.Module):
    """The official ``Self_Attention.py`` (``attention="code"``), with its softmax fixed by default.

    a = 1x1 conv C -> 1 (no bias); s = a · softmax(a); h = ReLU(norm(1x1 conv 1 -> C/ratio (s))) (norm:
    LayerNorm over the C/ratio channels at each position, Keras eps 1e-3); gate = hard_sigmoid(1x1 conv
    C/ratio -> C (h)); out = x · gate (per pixel and per channel). Parameters: C + C/r + 2C/r + C²/r.

    ``softmax="spatial"`` (default, the fix) takes the softmax over the H*W positions, so every position's
    gate depends on the whole map through the softmax's normaliser (the code has no pooling: its second
    conv reads the 1-channel map, so the context stays per pixel). ``softmax="literal"`` is the code as
    written: the softmax runs over the size-1 channel axis and returns ones, so s = a.

    Note on the code's design: the 1 -> C/r conv makes a rank-1 map s·w, and LayerNorm over its channels
    gives (w - mean w)·s / sqrt(var(w)·s² + eps): for |s| well above sqrt(eps)/std(w) the gate hardly
    depends on |s|, only on its sign. :func:`fuse_for_inference` uses this closed form.
    """

    def __init__(self, channels: int, ratio: int = 2, softmax: str = "spatial", norm: str = "ln") -> None:
        super().__init__()
        if softmax not in SA_SOFTMAX:
            raise ValueError(f"softmax must be one of {SA_SOFTMAX}, got {softmax!r}")
        self.softmax = softmax
        hidden = max(1, int(channels / ratio))  # the code's int(filters / ratio)
        self.score = nn.Conv2d(channels, 1, 1, bias=False)
        self.reduce = nn.Conv2d(1, hidden, 1, bias=False)
        self.norm = norm2d(norm, hidden, LN_EPS)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=False)

    def pooled_score(self, x: torch.Tensor) -> torch.Tensor:
        """s = a · softmax(a), (N, 1, H, W): the 1-channel map the bottleneck reads."""
        a = self.score(x)
        if self.softmax == "literal":
            return a * torch.softmax(a, dim=1)  # softmax over a size-1 axis: all ones, as in the code
        return a * torch.softmax(a.flatten(2), dim=-1).view_as(a)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, C, H, W) multiplicative gate in [0, 1]."""
        h = F.relu(self.norm(self.reduce(self.pooled_score(x))))
        return hard_sigmoid(self.expand(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def make_attention(kind: str, channels: int, ratio: int, softmax: str = "spatial",
                   norm: str | None = None) -> nn.Module:
    """The attention module of one SP&A block: SP&A-Net's own (``code``, ``gate``, ``gc``) on the block's
    ratio, or another family's (``se``, ``nl``, ``snl``, see :func:`ablation_attention`); ``norm`` (one of
    ``bn``, ``ln``, ``gn``) replaces the block's own normalisation (LayerNorm for SP&A-Net's)."""
    if kind == "code":
        return CodeSelfAttention(channels, ratio, softmax, norm or "ln")
    if kind in ("gate", "gc"):
        return SelfAttention(channels, ratio, kind, norm or "ln")
    return ablation_attention(kind, channels, norm, eps=BN_EPS)


class SPABlock(nn.Module):
    """SP&A block (B.3): conv shortcut + main path, summed, no activation after the add.

    Shortcut (always a conv path; the official block has no identity shortcut): depthwise kxk stride s
    with multiplier ratio-1 -> BN -> 1x1 conv -> out -> BN. Main: SP(exp) -> BN -> ReLU -> [stride > 1:
    depthwise kxk stride s -> BN -> ReLU] -> [attention] -> SP(out) -> BN. For ratio 1 the depth multiplier
    would be 0 (a broken layer in the official code), so the multiplier is max(1, ratio - 1).
    ``attention`` builds the attention module for a given channel count (None: no attention).
    """

    def __init__(self, cin: int, exp: int, cout: int, kernel: int, stride: int, ratio: int = 2,
                 attention: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        mult = max(1, ratio - 1)
        self.shortcut = nn.Sequential(
            same_conv(cin, cin * mult, kernel, stride, groups=cin), _bn(cin * mult),
            nn.Conv2d(cin * mult, cout, 1, bias=False), _bn(cout),
        )
        layers: list[nn.Module] = [SelfProliferate(cin, exp, ratio), _bn(exp), nn.ReLU(inplace=True)]
        mid = exp
        if stride > 1:
            mid = exp * mult
            layers += [same_conv(exp, mid, kernel, stride, groups=exp), _bn(mid), nn.ReLU(inplace=True)]
        self.expand = nn.Sequential(*layers)
        self.attention = nn.Identity() if attention is None else attention(mid)
        self.project = nn.Sequential(SelfProliferate(mid, cout, ratio), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.project(self.attention(self.expand(x)))


@dataclass(frozen=True)
class SPANetOptions:
    """The architecture options of :class:`SPANet` (validated by :func:`build_spanet`)."""

    attention: str = "code"
    sa_pattern: str = "ghostnet"
    ratio: int = 2
    width: float = 1.0
    sa_softmax: str = "spatial"
    attn_norm: str | None = None
    flatten: str = "conv1x1"
    init: str = "kaiming"
    output_stride: int = 32


class SPANet(nn.Module):
    """SP&A-Net (B.4): stem, 16 SP&A blocks, head; outputs LOGITS (N, num_classes).

    The official model ends in a softmax; here the softmax is left to the loss (fix). Head: 1x1 conv
    -> 960 + BN + ReLU (``cam_target_layer``), global average pool, then (``flatten="conv1x1"``, official)
    1x1 conv -> 1280 + BN + ReLU and a 1x1 conv -> classes without bias (``classifier``), or
    (``flatten="gap"``) one Linear 960 -> classes with bias. No dropout, as in the official code.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, options: SPANetOptions | None = None) -> None:
        super().__init__()
        opts = options or SPANetOptions()
        self.options = opts
        width = opts.width
        stem = make_divisible(STEM_CHANNELS * width)
        self.stem = nn.Sequential(same_conv(in_chans, stem, 3, 2), _bn(stem), nn.ReLU(inplace=True))

        def attention(channels: int) -> nn.Module:
            return make_attention(opts.attention, channels, opts.ratio, opts.sa_softmax, opts.attn_norm)

        blocks = []
        cin = stem
        total = 2  # the stem's stride; strided blocks beyond ``output_stride`` run at stride 1 (waferlab)
        for kernel, exp, out, stride, ghost_sa in LAYOUT:
            stride = stride if total * stride <= opts.output_stride else 1
            total *= stride
            use_sa = opts.attention != "none" and (opts.sa_pattern == "all" or ghost_sa)
            exp_c, out_c = make_divisible(exp * width), make_divisible(out * width)
            blocks.append(SPABlock(cin, exp_c, out_c, kernel, stride, opts.ratio,
                                   attention if use_sa else None))
            cin = out_c
        self.blocks = nn.Sequential(*blocks)
        head = make_divisible(HEAD_CHANNELS * width)
        self.head_conv = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), _bn(head), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        if opts.flatten == "gap":
            self.hidden: nn.Module = nn.Identity()
            self.classifier: nn.Module = nn.Linear(head, num_classes)
        else:
            self.hidden = nn.Sequential(nn.Conv2d(head, HIDDEN_CHANNELS, 1, bias=False), _bn(HIDDEN_CHANNELS),
                                        nn.ReLU(inplace=True))
            self.classifier = nn.Conv2d(HIDDEN_CHANNELS, num_classes, 1, bias=False)
        _init_weights(self, opts.init)

    @property
    def attention_mode(self) -> str:
        """The attention type of the SP&A blocks (``SPANetOptions.attention``)."""
        return self.options.attention

    @property
    def sa_pattern(self) -> str:
        """Which blocks carry attention (``SPANetOptions.sa_pattern``)."""
        return self.options.sa_pattern

    @property
    def cam_target_layer(self) -> nn.Module:
        """The 960-channel 1x1 conv + BN + ReLU whose output is the map fed to global pooling."""
        return self.head_conv

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 960-channel feature map before global pooling."""
        return self.head_conv(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x))
        if self.options.flatten == "conv1x1":  # the classifier may be a cosine head (heads.use_cosine_head)
            return self.classifier(self.hidden(x)).flatten(1)
        return self.classifier(x.flatten(1))


def _foreign_modules(model: nn.Module) -> set[int]:
    """ids of the modules inside other families' attention blocks (se, nl, snl), which keep their own init."""
    own = (SelfAttention, CodeSelfAttention)
    ids: set[int] = set()
    for block in model.modules():
        if isinstance(block, SPABlock) and not isinstance(block.attention, (nn.Identity, *own)):
            ids.update(id(m) for m in block.attention.modules())
    return ids


def keras_glorot_uniform_(module: nn.Conv2d | nn.Linear) -> None:
    """Keras' ``glorot_uniform`` on a conv or dense weight, with Keras' fan counts.

    Keras sees a depthwise kernel as (k, k, C_in, multiplier), so its fans are k²·C_in and k²·multiplier,
    not PyTorch's k² and k²·C_out; other layers agree with ``nn.init.xavier_uniform_``.
    """
    weight = module.weight
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
        k2 = weight.shape[-1] * weight.shape[-2]
        fan_in, fan_out = k2 * module.in_channels, k2 * (module.out_channels // module.groups)
    else:
        receptive = weight[0][0].numel() if weight.dim() > 2 else 1
        fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _init_weights(model: nn.Module, init: str) -> None:
    """``kaiming``: Kaiming-normal fan-out convs, unit/zero norms, each SA's last conv zero (gate 0.5,
    identity for gc). ``glorot``: Keras' Glorot-uniform convs and dense layers, zero biases, unit/zero norms.
    Other families' attention blocks (se, nl, snl) keep their own init."""
    skip = _foreign_modules(model)
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Conv2d | nn.Linear):
            if init == "glorot":
                keras_glorot_uniform_(m)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if init == "kaiming":
        for m in model.modules():
            if isinstance(m, SelfAttention | CodeSelfAttention):
                nn.init.zeros_(m.expand.weight)


# --------------------------------------------------------------------------------------------------
# Fused inference path


def _fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a bias-free conv followed by ``bn`` in eval mode, as one conv."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bn.bias - bn.running_mean * scale


def _folded(module: nn.Module, bn: nn.BatchNorm2d, relu: bool) -> FusedConv:
    """A :class:`FusedConv` from a conv (or ``same_conv``'s SamePad + conv) and the BN after it."""
    conv = module if isinstance(module, nn.Conv2d) else module[1]
    return FusedConv(*_fold_bn(conv.weight, bn), conv.stride[0], conv.groups, relu)


class FusedConv(nn.Module):
    """A conv with its BatchNorm folded in, optional ReLU, and Keras "same" padding without a Pad op.

    For stride 2 Keras pads (before, after) per axis with after = before + 1 on even sizes; the same result
    comes from a symmetric padding of ``after`` and a kernel with one leading zero row/col, so eager mode
    copies no padded input and the ONNX graph has no Pad node (the zero-extended kernels are precomputed).
    Costs (k+1)²/k² of the MACs of the strided convs only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, groups: int,
                 relu: bool) -> None:
        super().__init__()
        if stride > 2:
            raise ValueError("FusedConv handles strides 1 and 2")
        weight = weight.detach().clone()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride, self.groups, self.relu = stride, groups, relu
        self.kernel = weight.shape[-1]
        if stride == 2:  # kernels with a leading zero row (h), column (w) or both, for even sizes
            self.register_buffer("weight_h", F.pad(weight, (0, 0, 1, 0)), persistent=False)
            self.register_buffer("weight_w", F.pad(weight, (1, 0, 0, 0)), persistent=False)
            self.register_buffer("weight_hw", F.pad(weight, (1, 0, 1, 0)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = self.weight, self.kernel // 2
        if self.stride == 2:
            (top, bottom), (left, right) = (SamePad.amounts(int(n), self.kernel, 2) for n in x.shape[-2:])
            grow_h, grow_w = bottom > top, right > left
            if grow_h or grow_w:
                weight = self.weight_hw if grow_h and grow_w else (self.weight_h if grow_h else self.weight_w)
            padding = (bottom, right)
        y = F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)
        return F.relu(y) if self.relu else y


class FusedSP(nn.Module):
    """SP block + its BatchNorm (+ ReLU): the cheap depthwise conv takes its channels' BN folded in, the
    primary channels keep theirs (the depthwise conv reads them before it), no Slice when none is cut."""

    def __init__(self, sp: SelfProliferate, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        p = sp.primary.out_channels
        self.primary = FusedConv(sp.primary.weight, None, 1, 1, relu=False)
        self.primary_bn = _bn_slice(bn, 0, p)
        self.cout, self.relu = sp.cout, relu
        self.cheap: FusedConv | None = None
        if sp.cheap is not None:
            # BN of the kept cheap channels folded in; channels the official slice drops get an identity
            n, keep = sp.cheap.out_channels, sp.cout - p
            pad = n - keep
            scale = bn.weight[p:] / torch.sqrt(bn.running_var[p:] + bn.eps)
            scale = torch.cat([scale, bn.weight.new_ones(pad)])
            shift = torch.cat([bn.bias[p:] - bn.running_mean[p:] * scale[:keep], bn.weight.new_zeros(pad)])
            self.cheap = FusedConv(sp.cheap.weight * scale.view(-1, 1, 1, 1), shift, 1, p, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        if self.cheap is None:
            out = self.primary_bn(p)
        else:
            out = torch.cat([self.primary_bn(p), self.cheap(p)], dim=1)
            out = out if out.shape[1] == self.cout else out[:, : self.cout]
        return F.relu(out) if self.relu else out


def _bn_slice(bn: nn.BatchNorm2d, start: int, stop: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm over channels [start, stop) of ``bn``."""
    part = nn.BatchNorm2d(stop - start, eps=bn.eps).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(part, name).copy_(getattr(bn, name)[start:stop])
    part.requires_grad_(False)
    return part


class FusedCodeSA(nn.Module):
    """:class:`CodeSelfAttention` (LayerNorm or BatchNorm) for inference, in closed form.

    The 1-channel convs become matrix products (oneDNN runs 1-channel convs slowly), and the norm of the
    rank-1 map s·w is closed-form: LayerNorm gives γ⊙(w - mean w)·f + β with f = s / sqrt(var(w)·s² + eps),
    BatchNorm (eval) a per-channel affine of s·w; so no Transpose/LayerNorm runs. Keras' hard_sigmoid is
    ``F.hardsigmoid`` of 1.2x, the 1.2 folded into the last conv.
    """

    def __init__(self, sa: CodeSelfAttention) -> None:
        super().__init__()
        w = sa.reduce.weight.detach().flatten()
        norm = sa.norm
        if isinstance(norm, nn.LayerNorm):
            u, beta = norm.weight * (w - w.mean()), norm.bias
            self.ln_var, self.ln_eps = float(w.var(unbiased=False)), float(norm.eps)
        elif isinstance(norm, nn.BatchNorm2d):
            k = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            u, beta = w * k, norm.bias - norm.running_mean * k
            self.ln_var, self.ln_eps = None, 0.0
        else:
            raise TypeError(f"no closed form for {type(norm).__name__}")
        self.spatial = sa.softmax == "spatial"
        self.score = nn.Parameter(sa.score.weight.detach().view(1, -1).clone(), requires_grad=False)
        self.u = nn.Parameter(u.detach().view(-1, 1, 1).clone(), requires_grad=False)
        self.beta = nn.Parameter(beta.detach().view(-1, 1, 1).clone(), requires_grad=False)
        self.expand = nn.Parameter(1.2 * sa.expand.weight.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = (int(d) for d in x.shape[1:])  # constants when exported; batch (-1) dynamic
        a = torch.matmul(self.score, x.reshape(-1, c, h * w))  # (N, 1, HW): a 1-output conv as a product
        s = a * torch.softmax(a, dim=-1) if self.spatial else a
        f = s * torch.rsqrt(s * s * self.ln_var + self.ln_eps) if self.ln_var is not None else s
        hidden = torch.relu(torch.addcmul(self.beta, self.u, f.view(-1, 1, h, w)))  # (N, C/r, H, W)
        return x * F.hardsigmoid(F.conv2d(hidden, self.expand))  # a 1x1 conv: blocked layout in ORT


def _fuse_attention(attention: nn.Module) -> nn.Module:
    if isinstance(attention, CodeSelfAttention) and isinstance(attention.norm, nn.LayerNorm | nn.BatchNorm2d):
        return FusedCodeSA(attention)
    return copy.deepcopy(attention).eval().requires_grad_(False)


class FusedBlock(nn.Module):
    """:class:`SPABlock` for inference: every BN that follows a conv folded into it (see :class:`FusedSP`)."""

    def __init__(self, block: SPABlock) -> None:
        super().__init__()
        dw, bn1, pw, bn2 = block.shortcut
        self.shortcut = nn.Sequential(_folded(dw, bn1, relu=False), _folded(pw, bn2, relu=False))
        layers: list[nn.Module] = [FusedSP(block.expand[0], block.expand[1], relu=True)]
        if len(block.expand) > 3:
            layers.append(_folded(block.expand[3], block.expand[4], relu=True))
        self.expand = nn.Sequential(*layers)
        self.attention = _fuse_attention(block.attention)
        self.project = FusedSP(block.project[0], block.project[1], relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.project(self.attention(self.expand(x)))


class FusedSPANet(nn.Module):
    """An inference-only SP&A-Net made by :func:`fuse_for_inference`: same outputs as the source model in
    eval mode (up to float rounding), fewer and cheaper ops; the head's 1x1 convs on the pooled 1x1 map run
    as Linear layers."""

    def __init__(self, model: SPANet) -> None:
        super().__init__()
        self.stem = _folded(model.stem[0], model.stem[1], relu=True)
        self.blocks = nn.Sequential(*(FusedBlock(b) for b in model.blocks))
        self.head_conv = _folded(model.head_conv[0], model.head_conv[1], relu=True)
        self.hidden: nn.Module = nn.Identity()
        classifier = model.classifier
        if isinstance(model.hidden, nn.Sequential):
            w, b = _fold_bn(model.hidden[0].weight, model.hidden[1])
            self.hidden = nn.Sequential(nn.Linear(w.shape[1], w.shape[0]), nn.ReLU())
            with torch.no_grad():
                self.hidden[0].weight.copy_(w.flatten(1))
                self.hidden[0].bias.copy_(b)
        if isinstance(classifier, nn.Conv2d):
            linear = nn.Linear(classifier.in_channels, classifier.out_channels,
                               bias=classifier.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(classifier.weight.flatten(1))
                if classifier.bias is not None:
                    linear.bias.copy_(classifier.bias)
            classifier = linear
        else:
            classifier = copy.deepcopy(classifier)
        self.classifier = classifier
        self.eval().requires_grad_(False)

    @property
    def cam_target_layer(self) -> nn.Module:
        """The folded 960-channel head conv (the source model's ``cam_target_layer``)."""
        return self.head_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_conv(self.blocks(self.stem(x))).mean(dim=(2, 3))
        return self.classifier(self.hidden(x))


def fuse_for_inference(model: nn.Module) -> FusedSPANet:
    """An eval-only copy of a (trained) :class:`SPANet` for fast inference; ``model`` is left unchanged.

    Folds every BatchNorm that follows a conv into it (the SP blocks' BN on their primary channels stays:
    the cheap depthwise conv reads those channels before it), drops the no-op Slice of the SP blocks, does
    Keras "same" padding without a Pad op (:class:`FusedConv`), and runs the code SA in closed form
    (:class:`FusedCodeSA`). Outputs equal ``model.eval()(x)`` to float rounding (tests check 1e-4).
    """
    if not isinstance(model, SPANet):
        raise TypeError(f"fuse_for_inference needs an SPANet, got {type(model).__name__}")
    with torch.no_grad():
        return FusedSPANet(model)


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                          skip_prefixes: tuple[str, ...], allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``: strict on every key except ``skip_prefixes`` (the classifier).

    Keys containing an ``allow_missing`` substring may be absent from the file (new modules keep their
    init).
    A key or shape mismatch is a one-line :class:`WaferlabError` naming the first offending key.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise WaferlabError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                            "not weights of this model")
    missing = sorted(k for k in set(own) - set(state)
                     if not k.startswith(skip_prefixes) and not any(a in k for a in allow_missing)
                     and not k.endswith("num_batches_tracked"))
    if missing:
        raise WaferlabError(f"{source}: missing key {missing[0]!r} ({len(missing)} in all)")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise WaferlabError(f"{source}: key {k!r} has shape {tuple(v.shape)}, the model expects "
                                f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise WaferlabError(f"spanet: option {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise WaferlabError(f"spanet: option {name} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def ratio_from_r(r: object) -> int:
    """The code's integer ratio for the paper's composition ratio r = 1/ratio (:data:`PAPER_R_RATIO` for the
    printed values, else 1/r must be a whole number); an r that no network can realise is a user error."""
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
        raise WaferlabError(f"spanet: option r must be a number in (0, 1], got {r!r}")
    for printed, ratio in PAPER_R_RATIO.items():
        if abs(r - printed) < 1e-9:
            return ratio
    inverse = 1.0 / r
    if abs(inverse - round(inverse)) > 1e-3:
        raise WaferlabError(
            f"spanet: option r={r} cannot be built: ratio 1/r = {inverse:.3g} is not a whole number, and the "
            "depthwise convs' depth multiplier ratio - 1 must be one; use r = 1/n, e.g. "
            f"{', '.join(str(k) for k in PAPER_R_RATIO)}")
    return round(inverse)


def resolve_options(attention: object = "code", sa_pattern: object = "ghostnet", ratio: object = None,
                    r: object = None, width: object = 1.0, sa_softmax: object = "spatial",
                    attn_norm: object = None, flatten: object = "conv1x1",
                    init: object = "kaiming", output_stride: object = 32) -> SPANetOptions:
    """Validate the builder's options (one-line :class:`WaferlabError` each) into :class:`SPANetOptions`."""
    if ratio is not None and r is not None:
        raise WaferlabError("spanet: give option ratio or option r (= 1/ratio), not both")
    ratio = ratio_from_r(r) if r is not None else _check_int("ratio", 2 if ratio is None else ratio, 1)
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0.05 <= width <= 8:
        raise WaferlabError(f"spanet: option width must be a number in [0.05, 8], got {width!r}")
    attention = _check_choice("attention", attention, ATTENTION_MODES)
    if attn_norm is not None:
        _check_choice("attn_norm", attn_norm, ATTN_NORMS)
        if attention == "none":
            raise WaferlabError("spanet: option attn_norm needs an attention (attention is 'none')")
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise WaferlabError(f"spanet: option output_stride must be one of "
                            f"{', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")
    sa_softmax = _check_choice("sa_softmax", sa_softmax, SA_SOFTMAX)
    if sa_softmax != "spatial" and attention != "code":
        raise WaferlabError(f"spanet: option sa_softmax={sa_softmax!r} applies to attention 'code' only, "
                            f"not {attention!r}")
    return SPANetOptions(attention=attention, sa_pattern=_check_choice("sa_pattern", sa_pattern, SA_PATTERNS),
                         ratio=ratio, width=float(width), sa_softmax=sa_softmax,
                         attn_norm=attn_norm if attn_norm is None else str(attn_norm),
                         flatten=_check_choice("flatten", flatten, FLATTENS),
                         init=_check_choice("init", init, INITS), output_stride=int(output_stride))


#: Option sets that ``waferlab models --variants`` lists with their parameter counts (docstring tables).
VARIANTS: tuple[tuple[str, dict[str, object]], ...] = (
    ("attention=none", {"attention": "none"}),
    *((f"attention={a},sa_pattern={p}", {"attention": a, "sa_pattern": p})
      for a in ATTENTION_MODES[1:] for p in SA_PATTERNS),
    ("flatten=gap", {"flatten": "gap"}),
    *((f"r={r}", {"r": r}) for r in PAPER_R_RATIO if r != 0.5),
    *((f"attention=none,r={r}", {"attention": "none", "r": r}) for r in PAPER_R_RATIO if r != 0.5),
)


@register("spanet", family="spanet", variants=VARIANTS,
          description="SP&A-Net (Yang & Sun 2022), official code with its attention in 7 blocks, logits out; "
                      "4.08M params (attention=none: the published 2.60M)")
def build_spanet(num_classes: int, in_chans: int = 3, pretrained: str | None = None, attention: str = "code",
                 sa_pattern: str = "ghostnet", ratio: int | None = None, r: float | None = None,
                 width: float = 1.0, sa_softmax: str = "spatial", attn_norm: str | None = None,
                 flatten: str = "conv1x1", init: str = "kaiming", bn_momentum: float = BN_MOMENTUM,
                 output_stride: int = 32) -> SPANet:
    """Build SP&A-Net. Options: ``attention`` (none|code|gate|gc|se|nl|snl), ``sa_pattern``
    (ghostnet|all), ``ratio`` (int) or ``r`` (the paper's 1/ratio), ``width`` (channel multiplier),
    ``sa_softmax`` (spatial|literal, code only), ``attn_norm`` (bn|ln|gn), ``flatten`` (conv1x1|gap),
    ``init`` (kaiming|glorot), ``bn_momentum``, ``output_stride`` (32 = official; 16 or 8 keep the last
    stage at 4x4 / 8x8 at 64 px, for CAMs; waferlab's addition). The module docstring has every variant's
    parameter count.

    ``bn_momentum`` defaults to Keras' 0.99 (0.01 in PyTorch terms), as in the official code. Its running
    statistics need thousands of steps to settle, so a short run (a few hundred steps) evaluates with
    stale statistics and predicts one class; use PyTorch's 0.1 for short runs (the demo does).
    """
    opts = resolve_options(attention, sa_pattern, ratio, r, width, sa_softmax, attn_norm, flatten, init,
                           output_stride)
    if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, int | float) or not 0 < bn_momentum <= 1:
        raise WaferlabError(f"spanet: option bn_momentum must be a number in (0, 1], got {bn_momentum!r}")
    model = SPANet(num_classes, in_chans, opts)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = float(bn_momentum)
    if pretrained is not None:
        if pretrained == "imagenet":
            raise WaferlabError("spanet: no ImageNet weights exist for SP&A-Net; pass a local weights file "
                                "or train from scratch")
        state = load_torchvision_state(pretrained)
        load_backbone_weights(model, state, str(pretrained), skip_prefixes=("classifier.",))
    return model
