"""SP&A-Net (Self-Proliferation-and-Attention Network), re-implemented in PyTorch from the spec.

Yang & Sun (2022), official TensorFlow code ``github.com/Yfyangd/SPA``. Layout (16 SP&A blocks on a
GhostNet / MobileNetV3-Large skeleton) and parameter count follow the official code; three bugs of
that code are fixed here, each named where it is fixed:

* **degenerate softmax** (``Self_Attention.py``): Keras' softmax ran over a size-1 channel axis, so
  it returned ones and the "global context" was a per-pixel scalar. Here the softmax runs over the
  H*W positions and pools a real global context (:class:`SelfAttention`).
* **softmax output**: the official model ends in a softmax. :class:`SPANet` outputs LOGITS; the
  softmax belongs in the loss (``nn.CrossEntropyLoss`` / :class:`waferlab.losses.CircleLoss`).
* **SA unused** (notebook): the notebook dropped the SA block's return value, so attention was never
  in the graph. Here ``attention="none"`` reproduces that network (2,573,112 trainable parameters
  for 10 classes, exactly the notebook's count); ``"gate"`` and ``"gc"`` really use attention.

Keras conventions kept: BatchNorm eps 1e-3 and momentum 0.01 (Keras momentum 0.99), LayerNorm eps
1e-3, Keras-2 ``hard_sigmoid`` = clip(0.2x + 0.5, 0, 1), and Keras "same" padding: for stride 2 the
padding is computed from the input size and is asymmetric (the extra row/column goes at the
bottom/right), done by :class:`SamePad` in front of an unpadded convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models.backbones import load_torchvision_state
from waferlab.models.registry import register

BN_EPS = 1e-3  # Keras BatchNormalization default epsilon
BN_MOMENTUM = 0.01  # PyTorch momentum equivalent to Keras' momentum=0.99
LN_EPS = 1e-3  # Keras LayerNormalization default epsilon

ATTENTION_MODES = ("none", "gate", "gc")
#: Output strides (of the CAM layer) offered: 32 is the official layout, 16/8 run the last strided blocks
#: at stride 1.
OUTPUT_STRIDES = (32, 16, 8)
SA_PATTERNS = ("all", "ghostnet")

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
        top, bottom = self.amounts(x.shape[-2], self.kernel, self.stride)
        left, right = self.amounts(x.shape[-1], self.kernel, self.stride)
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
        return out[:, : self.cout]


class SelfAttention(nn.Module):
    """SA block (B.2) with the degenerate softmax FIXED: a real global context.

    Context: a 1x1 conv C->1 scores every position, softmax over the H*W positions (the official code
    took softmax over a size-1 channel axis, which is all ones), then a weighted sum of the features
    gives a C x 1 x 1 context. Transform: 1x1 conv C->C/ratio, LayerNorm, ReLU, 1x1 conv C/ratio->C.
    Fusion: ``"gate"`` multiplies x by hard_sigmoid(transform) (the official code's multiplicative
    hard-sigmoid gating; the gate is per channel and, being global, the same at every position);
    ``"gc"`` adds the transform to every position (the GC block of the paper's figure).
    """

    def __init__(self, channels: int, ratio: int = 2, mode: str = "gate") -> None:
        super().__init__()
        if mode not in ("gate", "gc"):
            raise ValueError(f"SelfAttention mode must be 'gate' or 'gc', got {mode!r}")
        self.mode = mode
        hidden = max(1, channels // ratio)
        self.score = nn.Conv2d(channels, 1, 1, bias=False)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=False)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Global context (N, C, 1, 1): softmax over all H*W positions, then attention pooling."""
        n, c, h, w = x.shape
        weights = torch.softmax(self.score(x).view(n, 1, h * w), dim=-1)  # (N, 1, HW)
        ctx = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        return ctx.view(n, c, 1, 1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck transform of the context: (N, C, 1, 1), before the gate nonlinearity."""
        t = self.reduce(self.context(x))
        t = self.norm(t.flatten(1))[:, :, None, None]
        return self.expand(F.relu(t))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplicative gate in [0, 1] that ``"gate"`` mode applies, broadcast to x's shape."""
        return hard_sigmoid(self.transform(x)).expand_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform(x)
        if self.mode == "gate":
            return x * hard_sigmoid(t)
        return x + t


class SPABlock(nn.Module):
    """SP&A block (B.3): conv shortcut + main path, summed, no activation after the add.

    Shortcut (always a conv path; the official block has no identity shortcut): depthwise kxk stride s
    with multiplier ratio-1 -> BN -> 1x1 conv -> out -> BN. Main: SP(exp) -> BN -> ReLU -> [stride > 1:
    depthwise kxk stride s -> BN -> ReLU] -> [SA] -> SP(out) -> BN. For ratio 1 the depth multiplier
    would be 0 (a broken layer in the official code), so the multiplier is max(1, ratio - 1).
    """

    def __init__(self, cin: int, exp: int, cout: int, kernel: int, stride: int, ratio: int = 2,
                 attention: str = "none") -> None:
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
        self.attention = nn.Identity() if attention == "none" else SelfAttention(mid, ratio, attention)
        self.project = nn.Sequential(SelfProliferate(mid, cout, ratio), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.project(self.attention(self.expand(x)))


class SPANet(nn.Module):
    """SP&A-Net (B.4): stem, 16 SP&A blocks, 1x1-conv head; outputs LOGITS (N, num_classes).

    The official model ends in a softmax; here the softmax is left to the loss (fix). Head: 1x1 conv
    -> 960 + BN + ReLU (``cam_target_layer``), global average pool, 1x1 conv -> 1280 + BN + ReLU, 1x1
    conv -> classes without bias (``classifier``). No dropout, as in the official code.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, attention: str = "gate", sa_pattern: str = "all",
                 ratio: int = 2, width: float = 1.0, output_stride: int = 32) -> None:
        super().__init__()
        self.attention_mode = attention
        self.sa_pattern = sa_pattern
        self.ratio = ratio
        self.width = width
        stem = make_divisible(STEM_CHANNELS * width)
        self.stem = nn.Sequential(same_conv(in_chans, stem, 3, 2), _bn(stem), nn.ReLU(inplace=True))
        blocks = []
        cin = stem
        total = 2  # the stem's stride; strided blocks beyond ``output_stride`` run at stride 1 (waferlab)
        for kernel, exp, out, stride, ghost_sa in LAYOUT:
            stride = stride if total * stride <= output_stride else 1
            total *= stride
            use_sa = attention != "none" and (sa_pattern == "all" or ghost_sa)
            exp_c, out_c = make_divisible(exp * width), make_divisible(out * width)
            blocks.append(SPABlock(cin, exp_c, out_c, kernel, stride, ratio, attention if use_sa else "none"))
            cin = out_c
        self.blocks = nn.Sequential(*blocks)
        head = make_divisible(HEAD_CHANNELS * width)
        self.head_conv = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), _bn(head), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Sequential(nn.Conv2d(head, HIDDEN_CHANNELS, 1, bias=False), _bn(HIDDEN_CHANNELS),
                                    nn.ReLU(inplace=True))
        self.classifier: nn.Module = nn.Conv2d(HIDDEN_CHANNELS, num_classes, 1, bias=False)
        self._init_weights()

    @property
    def cam_target_layer(self) -> nn.Module:
        """The 960-channel 1x1 conv + BN + ReLU whose output is the map fed to global pooling."""
        return self.head_conv

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Start every attention transform at zero output: "gc" starts as identity, "gate" at 0.5.
        for m in self.modules():
            if isinstance(m, SelfAttention):
                nn.init.zeros_(m.expand.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 960-channel feature map before global pooling."""
        return self.head_conv(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hidden(self.pool(self.forward_features(x)))
        return self.classifier(x).flatten(1)


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


@register("spanet", family="spanet",
          description="SP&A-Net (Yang & Sun 2022): 16 self-proliferation-and-attention blocks, logits out")
def build_spanet(num_classes: int, in_chans: int = 3, pretrained: str | None = None, attention: str = "gate",
                 sa_pattern: str = "all", ratio: int = 2, width: float = 1.0,
                 bn_momentum: float = BN_MOMENTUM, output_stride: int = 32) -> SPANet:
    """Build SP&A-Net; options ``attention`` (none|gate|gc), ``sa_pattern`` (all|ghostnet), ``ratio``,
    ``width`` (channel multiplier, channels rounded to multiples of 4), ``bn_momentum``, ``output_stride``
    (32 = official; 16 or 8 keep the last stage at 4x4 / 8x8 at 64 px, for CAMs; waferlab's addition).

    ``bn_momentum`` defaults to Keras' 0.99 (0.01 in PyTorch terms), as in the official code. Its running
    statistics need thousands of steps to settle, so a short run (a few hundred steps) evaluates with
    stale statistics and predicts one class; use PyTorch's 0.1 for short runs (the demo does).
    """
    if attention not in ATTENTION_MODES:
        raise WaferlabError(f"spanet: option attention must be one of {', '.join(ATTENTION_MODES)}, "
                            f"got {attention!r}")
    if sa_pattern not in SA_PATTERNS:
        raise WaferlabError(f"spanet: option sa_pattern must be one of {', '.join(SA_PATTERNS)}, "
                            f"got {sa_pattern!r}")
    ratio = _check_int("ratio", ratio, 1)
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0.05 <= width <= 8:
        raise WaferlabError(f"spanet: option width must be a number in [0.05, 8], got {width!r}")
    if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, int | float) or not 0 < bn_momentum <= 1:
        raise WaferlabError(f"spanet: option bn_momentum must be a number in (0, 1], got {bn_momentum!r}")
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise WaferlabError(f"spanet: option output_stride must be one of "
                            f"{', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")
    model = SPANet(num_classes, in_chans, attention, sa_pattern, ratio, float(width), int(output_stride))
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
