"""Attention modules: the attention-ResNet34 study's (seeds.md A.4: DANet, CBAM, PAN and the study's own) and
the blocks of SP&A-Net's ablation (seeds.md B.7: SE, NL, SNL, GC with a chosen normalisation).

Every study module works at any spatial size: where the reference code fixed a size for 224 px inputs
(GAU's up-sampling choice, GADS's hard-coded sizes), the output is resized to the size of the map it is
combined with instead, as each docstring says; FPA uses the study's own stride-1 transposed conv where the
sizes are the ones it was made for (n -> n + 3, 4 -> 7 at 224 px) and resizes elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def match_size(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` to ``ref``'s spatial size when they differ (odd sizes, tiny maps)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------
# DANet (A.4.1)


#: How PAM applies its HW x HW attention to V: the canonical DANet product, or the study's literal one.
PAM_MODES = ("canonical", "literal")


class PAM(nn.Module):
    """DANet position attention: softmax(QᵀK) over HW×HW positions re-weights V; γ·out + x, γ starts at 0.

    ``mode="canonical"`` (default) computes out = V·attnᵀ, i.e. out[c, i] = Σ_j V[c, j]·attn[i, j], as in
    DANet. ``mode="literal"`` reproduces the study's code: bmm(attn, Vᵀ) gives an (HW, C) matrix, which its
    ``view(N, C, H, W)`` then reads in the wrong order, so channels and positions are mixed in the output
    (a bug of the study, kept behind this option for reproduction only).
    """

    def __init__(self, channels: int, reduction: int = 8, mode: str = "canonical") -> None:
        super().__init__()
        if mode not in PAM_MODES:
            raise ValueError(f"PAM mode must be one of {PAM_MODES}, got {mode!r}")
        self.mode = mode
        qk = max(1, channels // reduction)
        self.query_conv = nn.Conv2d(channels, qk, 1)
        self.key_conv = nn.Conv2d(channels, qk, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)  # N, HW, C'
        k = self.key_conv(x).flatten(2)  # N, C', HW
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # N, HW, HW
        v = self.value_conv(x).flatten(2)  # N, C, HW
        if self.mode == "literal":
            out = torch.bmm(attn, v.transpose(1, 2)).reshape(n, c, h, w)  # (HW, C) memory read as (C, H, W)
        else:
            out = torch.bmm(v, attn.transpose(1, 2)).view(n, c, h, w)
        return self.gamma * out + x


class ChannelAttentionDA(nn.Module):
    """DANet channel attention (CAM): softmax(rowmax(XXᵀ) − XXᵀ) re-weights the channels; γ·out + x."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        feats = x.flatten(2)  # N, C, HW
        energy = torch.bmm(feats, feats.transpose(1, 2))  # N, C, C
        energy = energy.amax(dim=-1, keepdim=True).expand_as(energy) - energy
        attn = torch.softmax(energy, dim=-1)
        out = torch.bmm(attn, feats).view(n, c, h, w)
        return self.gamma * out + x


class DANetHead(nn.Module):
    """DANet's dual head: position and channel branches (3x3 conv-BN-ReLU, attention, 3x3 conv-BN-ReLU,
    Dropout2d, 1x1 conv), summed, then Dropout2d and the final 1x1 conv (``conv8[1]``, the CAM layer)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        reduction: int = 4,
        pam_reduction: int = 8,
        dropout: float = 0.1,
        pam_mode: str = "canonical",
    ) -> None:
        super().__init__()
        inter = in_channels // reduction
        out_channels = out_channels or inter
        self.out_channels = out_channels

        def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.conv5a = conv_bn_relu(in_channels, inter)
        self.conv5c = conv_bn_relu(in_channels, inter)
        self.pam = PAM(inter, pam_reduction, pam_mode)
        self.cam = ChannelAttentionDA()
        self.conv51 = conv_bn_relu(inter, inter)
        self.conv52 = conv_bn_relu(inter, inter)
        self.conv6 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, inter, 1))
        self.conv7 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, inter, 1))
        self.conv8 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.conv6(self.conv51(self.pam(self.conv5a(x))))
        chn = self.conv7(self.conv52(self.cam(self.conv5c(x))))
        return self.conv8(pos + chn)


# --------------------------------------------------------------------------------------------------
# CBAM (A.4.2) and the DA block of CBAM_DA (A.4.4)


class ChannelGate(nn.Module):
    """CBAM channel attention: sigmoid(MLP(avgpool) + MLP(maxpool)) with a shared bias-free 1x1-conv MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, C, 1, 1) channel weights; the caller multiplies."""
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class SpatialGate(nn.Module):
    """CBAM spatial attention: sigmoid(7x7 conv([channel-mean, channel-max])), bias-free."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, 1, H, W) spatial weights; the caller multiplies."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _AttentionBasicBlock(nn.Module):
    """ResNet BasicBlock with an attention step after bn2, before the residual add."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def attend(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attend(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class CBAMBasicBlock(_AttentionBasicBlock):
    """CBAM BasicBlock: after bn2, out = CA(out)·out then out = SA(out)·out, then the residual add."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        reduction: int = 16,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        self.ca = ChannelGate(planes, reduction)
        self.sa = SpatialGate(7)

    def attend(self, out: torch.Tensor) -> torch.Tensor:
        out = self.ca(out) * out
        return self.sa(out) * out


class DABasicBlock(_AttentionBasicBlock):
    """CBAM_DA's block: CBAM's gating replaced by DANet's CAM(PAM(out)) (PAM query/key reduction /4)."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        pam_reduction: int = 4,
        pam_mode: str = "canonical",
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        self.pam = PAM(planes, pam_reduction, pam_mode)
        self.cam = ChannelAttentionDA()

    def attend(self, out: torch.Tensor) -> torch.Tensor:
        return self.cam(self.pam(out))


def attention_stage(
    block: Callable[..., _AttentionBasicBlock], inplanes: int, planes: int, blocks: int = 2, stride: int = 2
) -> nn.Sequential:
    """The extra stage CBAM/CBAM_DA append after layer4: ``blocks`` blocks, the first strided with a
    1x1-conv + BN downsample."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# PAN (A.4.3) and the study's GAD / GADS (A.4.6, A.4.7)


class _DownConv(nn.Module):
    """conv(stride 2)-BN-ReLU of FPA's pyramid; halves the map only while it is >= 4 px (else stride 1).

    Clamping keeps the coarsest level >= 2x2 on tiny maps (a 32 px input gives a 2x2 l4), where
    halving would collapse it to 1x1 and leave BatchNorm one value per channel at batch size 1.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=2, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = 2 if min(x.shape[-2:]) >= 4 else 1
        y = F.conv2d(x, self.conv.weight, None, stride, self.conv.padding)
        return F.relu(self.bn(y))


def _conv_bn(cin: int, cout: int, kernel_size: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias), nn.BatchNorm2d(cout)
    )


def _up_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class FPA(nn.Module):
    """Feature Pyramid Attention: a 7/5/3 conv pyramid gives a mask on the 1x1-conv master branch,
    plus a global-pooling branch: out = ReLU(master·mask + gp).

    Up-sampling: each step is a transposed conv with a 4x4 kernel. Where the target level is 3 px larger
    than the source (4 -> 7 at 224 px, the case the study built it for) it runs as the study's stride-1
    ConvT k4 p0 (n -> n + 3, exact); everywhere else as ConvT k4 s2 p1 (doubling) whose output is
    bilinearly resized to the level it is added to when the sizes differ (changed from the study, whose
    stride-1 step only fits 14x14 maps). Both use the same weights, so one model serves every input size.
    Pyramid levels halve only while >= 4 px (see ``_DownConv``), so 2x2 maps still work.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(1, channels // reduction)
        self.master = _conv_bn(channels, channels, 1)
        self.gp = _conv_bn(channels, channels, 1)
        self.down1 = _DownConv(channels, mid, 7)
        self.down2 = _DownConv(mid, mid, 5)
        self.down3 = _DownConv(mid, mid, 3)
        self.conv7 = _conv_bn(mid, mid, 7)
        self.conv5 = _conv_bn(mid, mid, 5)
        self.conv3 = _conv_bn(mid, mid, 3)
        self.up3 = _up_bn_relu(mid, mid)
        self.up2 = _up_bn_relu(mid, mid)
        self.up1 = _up_bn_relu(mid, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        master = self.master(x)
        gp = self.gp(F.adaptive_avg_pool2d(x, 1))
        d1 = self.down1(x)
        d2 = self.down2(d1)
        d3 = self.down3(d2)
        b1, b2, b3 = self.conv7(d1), self.conv5(d2), self.conv3(d3)
        m2 = F.relu(b2 + _upsample_to(self.up3, b3, b2))
        m1 = F.relu(b1 + _upsample_to(self.up2, m2, b1))
        mask = _upsample_to(self.up1, m1, master)
        return F.relu(master * mask + gp)


def _upsample_to(up: nn.Sequential, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``up`` = ConvT(k4, s2, p1) + BN + ReLU applied to reach ``ref``'s size: as the study's stride-1 ConvT
    (k4, p0, n -> n + 3) when ``ref`` is 3 px larger on both axes, else doubling and then resizing."""
    convt = up[0]
    if all(r == s + 3 for r, s in zip(ref.shape[-2:], x.shape[-2:], strict=True)):
        y = F.conv_transpose2d(x, convt.weight, convt.bias, stride=1, padding=0)
        return up[2](up[1](y))
    return match_size(up(x), ref)


class GAU(nn.Module):
    """Global Attention Upsample: out = ReLU(BN(3x3(low))·w + BN(up(high))), w = ReLU(BN(1x1(GAP(high)))).

    ``upsample`` picks ConvT k4 s2 p1 (high is at half the resolution of low) or a 1x1 conv (same
    resolution); the model sets it from the backbone's stage strides rather than from fixed pixel sizes
    as the study did, and the result is resized to ``low`` when odd input sizes make them differ.
    """

    def __init__(self, high_channels: int, low_channels: int, upsample: bool = True) -> None:
        super().__init__()
        self.conv_low = _conv_bn(low_channels, low_channels, 3)
        self.conv_gp = nn.Sequential(
            nn.Conv2d(high_channels, low_channels, 1, bias=False),
            nn.BatchNorm2d(low_channels),
            nn.ReLU(inplace=True),
        )
        up: nn.Module = (
            nn.ConvTranspose2d(high_channels, low_channels, 4, 2, 1, bias=False)
            if upsample
            else nn.Conv2d(high_channels, low_channels, 1, bias=False)
        )
        self.up = nn.Sequential(up, nn.BatchNorm2d(low_channels))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        w = self.conv_gp(F.adaptive_avg_pool2d(high, 1))
        m = self.conv_low(low)
        return F.relu(m * w + match_size(self.up(high), low))


class GAD(nn.Module):
    """The study's inverse GAU (low -> high): out = ReLU(BN(BN(3x3(deeper))·w + BN(down(acc)))),
    w = ReLU(BN(1x1(GAP(acc)))) (acc channels -> deeper channels).

    ``down`` is a conv k4 s2 p1 when acc is at twice the resolution of ``deeper``, else 3x3 s1; its
    output is resized to ``deeper`` when odd sizes make them differ.
    """

    def __init__(self, acc_channels: int, deep_channels: int, downsample: bool = True) -> None:
        super().__init__()
        self.conv_gp = nn.Sequential(
            nn.Conv2d(acc_channels, deep_channels, 1, bias=False),
            nn.BatchNorm2d(deep_channels),
            nn.ReLU(inplace=True),
        )
        self.conv_deep = _conv_bn(deep_channels, deep_channels, 3)
        down = (
            nn.Conv2d(acc_channels, deep_channels, 4, 2, 1, bias=False)
            if downsample
            else nn.Conv2d(acc_channels, deep_channels, 3, 1, 1, bias=False)
        )
        self.down = nn.Sequential(down, nn.BatchNorm2d(deep_channels))
        self.bn_out = nn.BatchNorm2d(deep_channels)

    def forward(self, acc: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        w = self.conv_gp(F.adaptive_avg_pool2d(acc, 1))
        m = self.conv_deep(deeper)
        return F.relu(self.bn_out(m * w + match_size(self.down(acc), deeper)))


class GADS(nn.Module):
    """The study's spatial inverse block: out = ReLU(BN(3x3(deeper))·mask + BN(down(acc))), where mask =
    7x7 conv([channel-mean(acc), channel-max(acc)]) (no sigmoid, no BN, as in the study).

    ``down`` is 3x3 s2 p2 dilation 2 when halving, else 3x3 p1 (convs with bias). Changed from the
    study: its hard-coded sizes [56, 28, 14, 14] are gone; mask and ``down`` output are resized to
    ``deeper`` when they differ, so any input size works. The study's unused ``bn_final`` is omitted.
    """

    def __init__(self, acc_channels: int, deep_channels: int, downsample: bool = True) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.mask_conv = nn.Conv2d(2, 1, 7, stride=stride, padding=3, bias=False)
        self.conv_deep = _conv_bn(deep_channels, deep_channels, 3, bias=True)
        down = (
            nn.Conv2d(acc_channels, deep_channels, 3, stride=2, padding=2, dilation=2)
            if downsample
            else nn.Conv2d(acc_channels, deep_channels, 3, padding=1)
        )
        self.down = nn.Sequential(down, nn.BatchNorm2d(deep_channels))

    def forward(self, acc: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([acc.mean(dim=1, keepdim=True), acc.amax(dim=1, keepdim=True)], dim=1)
        mask = match_size(self.mask_conv(pooled), deeper)
        x = self.conv_deep(deeper)
        return F.relu(x * mask + match_size(self.down(acc), deeper))


class FeatureSum(nn.Module):
    """ReLU(a + b): PAN_DualInverse's fusion of its two branches, a module so CAM hooks can attach to it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.relu(a + b)


# --------------------------------------------------------------------------------------------------
# Attention blocks of SP&A-Net's ablation (seeds.md B.7, table r1): SE, NL, SNL, GC, each with a chosen
# normalisation. SE, NL and GC are timm's modules; timm has no spectral non-local block, so SNL is here.

#: Attention types of the ablation that come from other papers (SP&A-Net's own live in spanet.py).
ABLATION_ATTENTIONS = ("se", "nl", "snl", "gc")
#: Normalisations the ablation swaps into an attention block (table r1's BN / LN / GN columns).
ATTN_NORMS = ("bn", "ln", "gn")
#: Each block's own normalisation, used when none is asked for (SE has none).
OWN_NORM = {"se": None, "nl": "bn", "snl": "bn", "gc": "ln"}


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` <= min(32, channels / 2), so every group holds
    at least two channels (a one-channel group of a 1x1 context would normalise to zero)."""
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def norm2d(kind: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """A normalisation of (N, C, H, W) maps: ``bn`` BatchNorm2d, ``ln`` LayerNorm over the channels at each
    position (timm LayerNorm2d), ``gn`` GroupNorm with :func:`group_count` groups."""
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=eps)
    if kind == "ln":
        from timm.layers import LayerNorm2d

        return LayerNorm2d(channels, eps=eps)
    if kind == "gn":
        return nn.GroupNorm(group_count(channels), channels, eps=eps)
    raise ValueError(f"norm must be one of {ATTN_NORMS}, got {kind!r}")


class SpectralNonLocal(nn.Module):
    """Spectral non-local block (SNL; Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV
    2021), as the official ``SNL_ICCV2021`` classification code builds it (``is_sys``, ``is_norm``, one unit).

    Affinity: A = D^-1/2 · sym(ReLU(T)ᵀ ReLU(P)) · D^-1/2 over the H·W positions (T, P: 1x1 convs C -> C/2,
    sym(M) = (M + Mᵀ)/2, D its row sums; rows summing to 0 stay 0). Output: x + ReLU(norm(W1·g + W2·(g·A))),
    with g a 1x1 conv C -> C/2 and W1, W2 1x1 convs C/2 -> C (a first-order graph filter). The norm's scale
    starts at 0, so the block starts as the identity (the official code zero-inits it in the inserted stage).
    """

    def __init__(self, channels: int, reduction: int = 2, norm: str = "bn", eps: float = 1e-5) -> None:
        super().__init__()
        planes = max(1, channels // reduction)
        self.t = nn.Conv2d(channels, planes, 1, bias=False)
        self.p = nn.Conv2d(channels, planes, 1, bias=False)
        self.g = nn.Conv2d(channels, planes, 1, bias=False)
        self.w1 = nn.Conv2d(planes, channels, 1, bias=False)
        self.w2 = nn.Conv2d(planes, channels, 1, bias=False)
        self.norm = norm2d(norm, channels, eps)
        nn.init.zeros_(self.norm.weight)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The symmetric, degree-normalised (N, HW, HW) affinity of the positions of ``x``."""
        t = F.relu(self.t(x)).flatten(2)  # N, P, HW
        p = F.relu(self.p(x)).flatten(2)
        att = torch.bmm(t.transpose(1, 2), p)
        att = (att + att.transpose(1, 2)) / 2
        d = att.sum(dim=2)
        d = torch.where(d > 0, d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt(), torch.zeros_like(d))
        return att * d.unsqueeze(1) * d.unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.affinity(x)
        g = self.g(x)
        spread = torch.bmm(g.flatten(2), att.transpose(1, 2)).view_as(g)  # out[c, i] = sum_j A[i, j] g[c, j]
        return x + F.relu(self.norm(self.w1(g) + self.w2(spread)))


def ablation_attention(kind: str, channels: int, norm: str | None = None, eps: float = 1e-5) -> nn.Module:
    """One of :data:`ABLATION_ATTENTIONS` on ``channels`` channels, with ``norm`` (one of :data:`ATTN_NORMS`)
    in place of the block's own normalisation (:data:`OWN_NORM`; ``None`` keeps it).

    ``se``: timm SEModule, reduction 16, the norm (if any) after the reducing conv. ``nl``: timm
    NonLocalAttn (embedded Gaussian, query/key/value C/8), the norm on its output projection, scale 0 at
    start. ``snl``: :class:`SpectralNonLocal`, reduction 2. ``gc``: timm GlobalContext as in GCNet
    (softmax attention pooling, C -> C/16 -> C bottleneck with the norm, fusion by addition, last conv 0).
    """
    if kind not in ABLATION_ATTENTIONS:
        raise ValueError(f"attention must be one of {ABLATION_ATTENTIONS}, got {kind!r}")
    norm = norm or OWN_NORM[kind]
    if kind == "snl":
        return SpectralNonLocal(channels, 2, norm or "bn", eps)
    from timm.layers import GlobalContext, NonLocalAttn, SEModule

    if kind == "se":
        block: nn.Module = SEModule(channels, rd_ratio=1 / 16)
        if norm is not None:
            block.bn = norm2d(norm, block.fc1.out_channels, eps)
        return block
    if kind == "nl":
        block = NonLocalAttn(channels)
        block.norm = norm2d(norm or "bn", channels, eps)
        nn.init.zeros_(block.norm.weight)
        return block
    block = GlobalContext(channels, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)  # gc
    block.mlp_add.norm = norm2d(norm or "ln", block.mlp_add.fc1.out_channels, eps)
    nn.init.zeros_(block.mlp_add.fc2.bias)  # GCNet zero-inits the whole last conv: the block starts as x
    return block
