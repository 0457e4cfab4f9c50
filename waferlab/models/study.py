"""The attention-ResNet34 study's models (seeds.md A.3-A.4), registered in family "attention-study".

``resnet34``, ``danet``, ``cbam``, ``cbam_da`` use torchvision's standard ResNet34; ``pan``, ``pan_da``,
``pan_inverse``, ``pan_dualinverse`` the dilated one (output stride 16). Pretrained weights
(``"imagenet"`` or a local torchvision-layout file) load into the backbone only; the rest is new.
``cam_target_layer`` is a property (not a second registration of the module, which would duplicate
its weights in ``state_dict``) pointing at the module whose output is the map fed to the final
pooling/flatten; ``classifier`` is the final Linear.

Added (not in the study): an ``output_stride`` option, the stride of the CAM layer, so that layer keeps a
grid at wafer-map sizes (at 64 px the study's layouts give 1x1 to 4x4): resnet34/danet 32 (study), 16, 8;
cbam/cbam_da 64 (study), 32, 16, 8; pan_inverse/pan_dualinverse 16 (study), 8. PAN and PAN_DA explain their
last GAU at stride 4 already. The defaults are the study's layouts.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models.attention import (
    FPA,
    GAD,
    GADS,
    GAU,
    PAM_MODES,
    CBAMBasicBlock,
    DABasicBlock,
    DANetHead,
    FeatureSum,
    attention_stage,
)
from waferlab.models.backbones import OUTPUT_STRIDES, resnet34_backbone
from waferlab.models.registry import register

FAMILY = "attention-study"
#: Output strides of CBAM/CBAM_DA's extra stage: 64 is the study's (layer5 at stride 2 after layer4 at 32);
#: the others run layer5 at stride 1 on a backbone of that output stride.
EXTRA_STAGE_STRIDES = (64, *OUTPUT_STRIDES)
#: Output strides of PAN_Inverse/PAN_DualInverse: 16 is the study's dilated backbone, 8 also dilates layer3.
INVERSE_STRIDES = (16, 8)


class _GapClassifier(nn.Module):
    """Shared tail: global average pooling, optional dropout, then ``self.classifier`` (a Linear)."""

    def _init_head(self, features: int, num_classes: int, dropout: float) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, num_classes)

    def _classify(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.pool(fmap).flatten(1)))


class StudyResNet34(_GapClassifier):
    """Plain torchvision ResNet34 with a new classifier; the study's attention-free reference."""

    def __init__(
        self, num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
        output_stride: int = 32,
    ):
        super().__init__()
        self.backbone = resnet34_backbone(in_chans, pretrained, output_stride=output_stride)
        self._init_head(512, num_classes, dropout)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.backbone.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._classify(self.backbone(x)[-1])


def pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) averaging matrix with adaptive pooling's bins [floor(i*n/m), ceil((i+1)*n/m))."""
    rows = []
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n_in)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)  # a constant when traced for export


class GridPool(nn.Module):
    """Adaptive average pooling to ``grid`` x ``grid``, written as two small matrix products.

    Same values as ``F.adaptive_avg_pool2d``, but it also exports to ONNX when the map size is not a
    multiple of ``grid`` (a 64 px input gives DANet a 2x2 map, which must be spread over 7x7).
    """

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h == self.grid and w == self.grid:
            return x
        ph, pw = pool_matrix(h, self.grid, x), pool_matrix(w, self.grid, x)
        return torch.matmul(torch.matmul(ph, x), pw.t())


class DANet(nn.Module):
    """DANet (A.4.1): ResNet34 -> DANetHead(512->128) -> flatten -> MLP 2048 (BN, LeakyReLU, Dropout), Linear.

    Changed from the study: the 128-channel map is adaptive-average-pooled to ``grid`` x ``grid``
    (7, the map size at 224 px, where the pooling is the identity; ``GridPool``) before the flatten,
    so the MLP's input size (128·7·7 = 6272) no longer depends on the input size.
    PAM computes DANet's canonical V·attnᵀ; the study's code computed attn·Vᵀ and then a view that mixes
    channels and positions, available as ``pam="literal"`` (see :class:`waferlab.models.attention.PAM`).
    CAM layer: the head's final 1x1 conv.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        pretrained: str | None = None,
        dropout: float = 0.3,
        attn_dropout: float = 0.1,
        hidden: int = 2048,
        grid: int = 7,
        output_stride: int = 32,
        pam: str = "canonical",
    ):
        super().__init__()
        self.backbone = resnet34_backbone(in_chans, pretrained, output_stride=output_stride)
        self.head = DANetHead(512, 128, reduction=4, pam_reduction=8, dropout=attn_dropout, pam_mode=pam)
        self.pool = GridPool(grid)
        self.mlp = nn.Sequential(
            nn.Linear(128 * grid * grid, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.head.conv8[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.head(self.backbone(x)[-1])
        return self.classifier(self.mlp(self.pool(fmap).flatten(1)))


class ExtraStageNet(_GapClassifier):
    """CBAM (A.4.2) / CBAM_DA (A.4.4): ResNet34 through layer4, then an extra stage of 2 attention
    BasicBlocks (512, first stride 2) -> GAP -> Linear. CAM layer: the extra stage (``layer5``).

    Fixed from the study: the Linear's size comes from ``num_classes`` (the study read a global ``out_dim``).
    Added: ``output_stride`` 32/16/8 runs layer5 at stride 1 on a backbone of that stride (64: the study).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        pretrained: str | None = None,
        block: str = "cbam",
        dropout: float = 0.0,
        output_stride: int = 64,
        pam: str = "canonical",
    ):
        super().__init__()
        block_cls = {"cbam": CBAMBasicBlock, "da": partial(DABasicBlock, pam_mode=pam)}[block]
        study = output_stride == 64  # the study's layout; else layer5 at stride 1 on that backbone stride
        self.backbone = resnet34_backbone(in_chans, pretrained, output_stride=32 if study else output_stride)
        self.layer5 = attention_stage(block_cls, 512, 512, blocks=2, stride=2 if study else 1)
        self._init_head(512, num_classes, dropout)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.layer5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._classify(self.layer5(self.backbone(x)[-1]))


class PANDecoder(nn.Module):
    """PAN's top-down path on [l1, l2, l3, l4] of the dilated ResNet34: FPA(l4), then GAU with l3
    (1x1, same stride), l2 and l1 (ConvT, doubling). Returns the 64-channel map at l1's size."""

    def __init__(self, channels: tuple[int, int, int, int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.fpa = FPA(c4)
        self.gau3 = GAU(c4, c3, upsample=False)  # l4 and l3 share stride 16 in the dilated backbone
        self.gau2 = GAU(c3, c2, upsample=True)
        self.gau1 = GAU(c2, c1, upsample=True)

    def forward(self, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor, l4: torch.Tensor) -> torch.Tensor:
        x = self.fpa(l4)
        x = self.gau3(x, l3)
        x = self.gau2(x, l2)
        return self.gau1(x, l1)


class PAN(_GapClassifier):
    """PAN (A.4.3, ``PAN_final``): dilated ResNet34 -> FPA + 3 GAUs -> 64 x H/4 x W/4 -> GAP -> Linear.

    CAM layer: the last GAU (56x56 at 224 px). Size handling: see ``FPA`` and ``GAU``.
    """

    def __init__(
        self, num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0
    ):
        super().__init__()
        self.backbone = resnet34_backbone(in_chans, pretrained, dilated=True)
        self.decoder = PANDecoder()
        self._init_head(64, num_classes, dropout)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.decoder.gau1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, l1, l2, l3, l4 = self.backbone(x)
        return self._classify(self.decoder(l1, l2, l3, l4))


class PANDA(nn.Module):
    """PAN_DA (A.4.5): PAN branch (GAP -> Linear 64->K) and a DANet head on l4 (512 -> 128, GAP ->
    Linear 128->K); the concatenated 2K logits go through ``classifier`` (Linear 2K->K).

    CAM layer: the PAN branch's last GAU. No cosine head (``cosine_head_refusal``): the classifier reads
    the two branches' logits, so cosine similarities there would compare logit vectors, not features.
    """

    cosine_head_refusal = ("its classifier fuses the two branches' logits, so a cosine head there would "
                           "compare logit vectors, not features; use head 'linear'")

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        pretrained: str | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.1,
        pam: str = "canonical",
    ):
        super().__init__()
        self.backbone = resnet34_backbone(in_chans, pretrained, dilated=True)
        self.decoder = PANDecoder()
        self.danet = DANetHead(512, 128, reduction=4, pam_reduction=8, dropout=attn_dropout, pam_mode=pam)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc_pan = nn.Linear(64, num_classes)
        self.fc_da = nn.Linear(128, num_classes)
        self.classifier = nn.Linear(2 * num_classes, num_classes)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.decoder.gau1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, l1, l2, l3, l4 = self.backbone(x)
        logits_pan = self.fc_pan(self.drop(self.pool(self.decoder(l1, l2, l3, l4)).flatten(1)))
        logits_da = self.fc_da(self.drop(self.pool(self.danet(l4)).flatten(1)))
        return self.classifier(torch.cat([logits_pan, logits_da], dim=1))


class InverseChain(nn.Module):
    """Bottom-up fusion l1 -> l2 -> l3 -> l4 with GAD (or GADS) blocks, then an FPA on the 512 map."""

    def __init__(
        self, block: type[nn.Module], channels: tuple[int, int, int, int] = (64, 128, 256, 512),
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.fuse2 = block(c1, c2, downsample=True)
        self.fuse3 = block(c2, c3, downsample=output_stride == 16)  # l2 and l3 share stride 8 at 8
        self.fuse4 = block(c3, c4, downsample=False)  # l3 and l4 share stride 16 in the dilated backbone
        self.fpa = FPA(c4)

    def forward(self, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor, l4: torch.Tensor) -> torch.Tensor:
        x = self.fuse2(l1, l2)
        x = self.fuse3(x, l3)
        return self.fpa(self.fuse4(x, l4))


class PANInverse(_GapClassifier):
    """PAN_Inverse (A.4.6): dilated ResNet34, GAD chain l1->l4, FPA(512) -> GAP -> Linear.

    CAM layer: the FPA (512 x H/16 x W/16, 14x14 at 224 px; H/8 x W/8 with ``output_stride=8``).
    """

    def __init__(
        self, num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
        output_stride: int = 16,
    ):
        super().__init__()
        self.backbone = resnet34_backbone(in_chans, pretrained, output_stride=output_stride)
        self.chain = InverseChain(GAD, output_stride=output_stride)
        self._init_head(512, num_classes, dropout)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.chain.fpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, l1, l2, l3, l4 = self.backbone(x)
        return self._classify(self.chain(l1, l2, l3, l4))


class PANDualInverse(_GapClassifier):
    """PAN_DualInverse (A.4.7): the PAN_Inverse chain (GAD + FPA) and a parallel GADS chain with its
    own FPA; ``fuse`` = ReLU(fm1 + fm2) -> GAP -> Linear. CAM layer: ``fuse`` (14x14 at 224 px)."""

    def __init__(
        self, num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
        output_stride: int = 16,
    ):
        super().__init__()
        self.backbone = resnet34_backbone(in_chans, pretrained, output_stride=output_stride)
        self.chain = InverseChain(GAD, output_stride=output_stride)
        self.spatial_chain = InverseChain(GADS, output_stride=output_stride)
        self.fuse = FeatureSum()
        self._init_head(512, num_classes, dropout)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, l1, l2, l3, l4 = self.backbone(x)
        return self._classify(self.fuse(self.chain(l1, l2, l3, l4), self.spatial_chain(l1, l2, l3, l4)))


# --------------------------------------------------------------------------------------------------
# Registration: builder(num_classes, in_chans, pretrained, **options)


def _check_rates(model: str, **rates: float) -> None:
    """Dropout options are probabilities; a bad value is a user error, not a traceback."""
    for key, value in rates.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            raise WaferlabError(f"model {model!r}: option {key} must be a number in [0, 1), got {value!r}")


def _check_stride(model: str, value: object, allowed: tuple[int, ...]) -> int:
    """The ``output_stride`` option (stride of the CAM layer) must be one the model offers."""
    if isinstance(value, bool) or value not in allowed:
        raise WaferlabError(f"model {model!r}: option output_stride must be one of "
                            f"{', '.join(map(str, allowed))}, got {value!r}")
    return int(value)


def _check_pam(model: str, pam: object) -> str:
    """The PAM option: the canonical DANet product or the study's literal one (``attention.PAM``)."""
    if pam not in PAM_MODES:
        raise WaferlabError(f"model {model!r}: option pam must be one of {', '.join(PAM_MODES)}, got {pam!r}")
    return str(pam)


@register("resnet34", family=FAMILY, description="torchvision ResNet34 + new Linear head (study reference)")
def build_resnet34(num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
                   output_stride: int = 32):
    """torchvision ResNet34; options: dropout before the classifier, output_stride (32, 16, 8)."""
    _check_rates("resnet34", dropout=dropout)
    stride = _check_stride("resnet34", output_stride, OUTPUT_STRIDES)
    return StudyResNet34(num_classes, in_chans, pretrained, dropout=dropout, output_stride=stride)


@register(
    "danet", family=FAMILY, description="ResNet34 + DANet position/channel attention head, MLP classifier"
)
def build_danet(
    num_classes: int,
    in_chans: int = 3,
    pretrained: str | None = None,
    dropout: float = 0.3,
    attn_dropout: float = 0.1,
    output_stride: int = 32,
    pam: str = "canonical",
):
    """DANet; options: dropout (MLP, 0.3), attn_dropout (Dropout2d in the head, 0.1), output_stride
    (32, 16, 8), pam (canonical|literal: the study's channel/position-mixing product, ``attention.PAM``)."""
    _check_rates("danet", dropout=dropout, attn_dropout=attn_dropout)
    stride = _check_stride("danet", output_stride, OUTPUT_STRIDES)
    return DANet(num_classes, in_chans, pretrained, dropout=dropout, attn_dropout=attn_dropout,
                 output_stride=stride, pam=_check_pam("danet", pam))


@register("cbam", family=FAMILY, description="ResNet34 + an extra stage of 2 CBAM BasicBlocks")
def build_cbam(num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
               output_stride: int = 64):
    """CBAM; options: dropout before the classifier, output_stride (64 = the study's, 32, 16, 8)."""
    _check_rates("cbam", dropout=dropout)
    stride = _check_stride("cbam", output_stride, EXTRA_STAGE_STRIDES)
    return ExtraStageNet(num_classes, in_chans, pretrained, block="cbam", dropout=dropout,
                         output_stride=stride)


@register(
    "pan", family=FAMILY, description="dilated ResNet34 + Pyramid Attention Network (FPA + GAU decoder)"
)
def build_pan(num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0):
    """PAN; options: dropout before the classifier."""
    _check_rates("pan", dropout=dropout)
    return PAN(num_classes, in_chans, pretrained, dropout=dropout)


@register(
    "cbam_da", family=FAMILY, description="ResNet34 + an extra stage of 2 BasicBlocks with DANet PAM+CAM"
)
def build_cbam_da(num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
                  output_stride: int = 64, pam: str = "canonical"):
    """CBAM_DA; options: dropout before the classifier, output_stride (64 = the study's, 32, 16, 8), pam
    (canonical|literal, see ``attention.PAM``)."""
    _check_rates("cbam_da", dropout=dropout)
    stride = _check_stride("cbam_da", output_stride, EXTRA_STAGE_STRIDES)
    return ExtraStageNet(num_classes, in_chans, pretrained, block="da", dropout=dropout, output_stride=stride,
                         pam=_check_pam("cbam_da", pam))


@register("pan_da", family=FAMILY, description="PAN and a DANet head on layer4, logits fused by a Linear")
def build_pan_da(
    num_classes: int,
    in_chans: int = 3,
    pretrained: str | None = None,
    dropout: float = 0.0,
    attn_dropout: float = 0.1,
    pam: str = "canonical",
):
    """PAN_DA; options: dropout before both branch Linears, attn_dropout in the DANet head, pam
    (canonical|literal, see ``attention.PAM``). Linear head only (see :class:`PANDA`)."""
    _check_rates("pan_da", dropout=dropout, attn_dropout=attn_dropout)
    return PANDA(num_classes, in_chans, pretrained, dropout=dropout, attn_dropout=attn_dropout,
                 pam=_check_pam("pan_da", pam))


@register("pan_inverse", family=FAMILY, description="dilated ResNet34, bottom-up GAD fusion + FPA")
def build_pan_inverse(
    num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
    output_stride: int = 16,
):
    """PAN_Inverse; options: dropout before the classifier, output_stride (16 = the study's, 8)."""
    _check_rates("pan_inverse", dropout=dropout)
    stride = _check_stride("pan_inverse", output_stride, INVERSE_STRIDES)
    return PANInverse(num_classes, in_chans, pretrained, dropout=dropout, output_stride=stride)


@register(
    "pan_dualinverse", family=FAMILY, description="PAN_Inverse plus a parallel spatial GADS chain + FPA"
)
def build_pan_dualinverse(
    num_classes: int, in_chans: int = 3, pretrained: str | None = None, dropout: float = 0.0,
    output_stride: int = 16,
):
    """PAN_DualInverse; options: dropout before the classifier, output_stride (16 = the study's, 8)."""
    _check_rates("pan_dualinverse", dropout=dropout)
    stride = _check_stride("pan_dualinverse", output_stride, INVERSE_STRIDES)
    return PANDualInverse(num_classes, in_chans, pretrained, dropout=dropout, output_stride=stride)
