"""Backbones: torchvision ResNets adapted for SimCLR, and a small plain CNN for CPU runs.

Every backbone maps images ``(B, 3, H, W)`` to features ``(B, feat_dim)`` and has no classifier:

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision's models built with ``weights=None`` (nothing
  is ever downloaded), ``fc`` replaced by ``nn.Identity`` so the state_dict stays loadable into a plain
  torchvision ResNet, and the last BN of every residual branch zero-initialised (each block starts as
  the identity; Goyal et al. 2017, used by SimCLR). ``width`` scales every stage (64 is standard).
* ``cifar_stem=True`` swaps the 7x7/stride-2 conv + max-pool stem for one 3x3/stride-1 conv, the usual
  change for 32x32 images (SimCLR appendix B.9).
* ``cnn7``: seven conv-BN-ReLU layers with three 2x2 max-pools and global average pooling, base width
  32 by default, for short CPU runs.
* ``timm:<name>``: any timm model (``timm:vit_small_patch16_224``, ``timm:convnext_tiny``...), built by
  :mod:`fastclr.models.timm_backbone` as timm defines it (no ``width`` or ``cifar_stem``); timm is imported
  only then.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastclr.models.timm_backbone import TIMM_PREFIX, build_timm_backbone, is_timm_arch

ARCHS = ("resnet18", "resnet34", "resnet50", "cnn7")  # plus any "timm:<name>"

# arch -> (torchvision builder name, residual block, blocks per stage)
_RESNETS = {
    "resnet18": ("resnet18", BasicBlock, (2, 2, 2, 2)),
    "resnet34": ("resnet34", BasicBlock, (3, 4, 6, 3)),
    "resnet50": ("resnet50", Bottleneck, (3, 4, 6, 3)),
}
_DEFAULT_WIDTH = {"resnet18": 64, "resnet34": 64, "resnet50": 64, "cnn7": 32}


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BN that follows has its own shift.
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class CNN7(nn.Module):
    """A plain 7-layer CNN: ``(B, 3, H, W) -> (B, 8 * width)``.

    Channels ``w, w, 2w, 2w, 4w, 4w, 8w`` with a 2x2 max-pool after layers 2, 4 and 6, then a global
    average pool. With ``cifar_stem=False`` the first conv has stride 2, for images larger than 32 px.
    Inputs must be at least 8 px (16 px without the CIFAR stem) on each side.

    Args:
        width: channels of the first layer (32 by default).
        cifar_stem: first conv with stride 1 (True) or 2 (False).
    """

    def __init__(self, width: int = 32, cifar_stem: bool = True) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(3, w, stride=1 if cifar_stem else 2),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            *_conv_bn_relu(4 * w, 4 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(4 * w, 8 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feat_dim = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, feat_dim)``."""
        return self.features(x)


def _init_resnet(model: ResNet) -> None:
    """torchvision's ResNet initialisation, zero-init residual included, for rebuilt layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def _resnet(arch: str, cifar_stem: bool, width: int) -> tuple[ResNet, int]:
    builder, block, layers = _RESNETS[arch]
    model = getattr(torchvision.models, builder)(weights=None, zero_init_residual=True)
    if width != 64:
        # torchvision hard-codes 64 base channels; rebuild the stages with its own layer factory so
        # parameter names (and hence exported state_dicts) stay torchvision's.
        model.inplanes, model.dilation = width, 1
        model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, layers[0])
        model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
        model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
        model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if width != 64 or cifar_stem:
        _init_resnet(model)
    model.fc = nn.Identity()
    return model, 8 * width * block.expansion


def standard_width(arch: str) -> int:
    """The base width ``build_backbone(arch, width=None)`` uses: 64 for the ResNets, 32 for cnn7.

    Raises:
        ValueError: a ``timm:`` architecture, which has no single base width.
    """
    if is_timm_arch(arch):
        raise ValueError(f"{arch} has no base width: timm builds it as defined")
    return _DEFAULT_WIDTH[arch]


def unknown_arch(arch: str) -> str:
    """The error message for an architecture that is neither built in nor ``timm:<name>``."""
    return f"unknown arch {arch}; choose one of {', '.join(ARCHS)}, or {TIMM_PREFIX}<name> (any timm model)"


def channels_last_helps(backbone: nn.Module) -> bool:
    """Whether ``backbone`` should run in channels-last (NHWC) layout.

    Convolutional stages (the ResNets, cnn7, timm's ConvNeXt, EfficientNet, RegNet...) are what channels-last is
    for: cuDNN's and oneDNN's NHWC convolution kernels under autocast, and ConvNeXt's channel MLPs then read NHWC
    activations without a permute copy (not yet timed on a GPU for timm models).
    Token models (ViT, DeiT, EVA, Swin...: a ``patch_embed`` followed by ``(B, N, D)`` sequences) hold a single
    4-d weight, the patch projection, so the layout would change that one convolution only; they keep the
    default layout.
    """
    return not isinstance(getattr(backbone, "patch_embed", None), nn.Module)


def build_backbone(
    arch: str = "resnet18", cifar_stem: bool = False, width: int | None = None
) -> tuple[nn.Module, int]:
    """Build a classifier-free backbone.

    Args:
        arch: one of ``ARCHS``, or ``"timm:<name>"`` for a timm model (random weights, no classifier).
        cifar_stem: 3x3 stride-1 first conv and no max-pool, for 32x32 images (built-in archs only).
        width: base channel width; ``None`` means the architecture's standard one (64 for the
            ResNets, 32 for ``cnn7``; timm models take only ``None``).

    Returns:
        ``(backbone, feat_dim)``: the module maps ``(B, 3, H, W)`` to ``(B, feat_dim)``; feat_dim is
        ``8 * width`` (``32 * width`` for resnet50), i.e. 512 / 2048 at the standard width, and the
        model's own feature width for timm (384 for ``timm:vit_small_patch16_224``).

    Raises:
        ValueError: unknown ``arch``, a non-positive ``width``, or ``width``/``cifar_stem`` with a timm arch.
        ImportError: a ``timm:`` arch without timm installed.
    """
    if is_timm_arch(arch):
        if cifar_stem or width is not None:
            raise ValueError(
                f"--width and --cifar-stem apply to {', '.join(ARCHS)} only; {arch} is built as timm defines it"
            )
        return build_timm_backbone(arch)
    if arch not in ARCHS:
        raise ValueError(unknown_arch(repr(arch)))
    if width is None:
        width = standard_width(arch)
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if arch == "cnn7":
        model = CNN7(width=width, cifar_stem=cifar_stem)
        return model, model.feat_dim
    return _resnet(arch, cifar_stem, width)
