"""timm models as backbones: ``--arch timm:<name>`` (``pip install 'fastclr[timm]'``).

Any model in timm's registry becomes a classifier-free backbone ``(B, 3, H, W) -> (B, feat_dim)``:

    timm.create_model(name, pretrained=False, num_classes=0)

whose forward returns the pooled pre-logits features, ``feat_dim = model.head_hidden_size`` (``num_features`` for
models that do not set it). Weights start random: nothing is ever downloaded. The parameter names are timm's, so a
trained backbone's ``state_dict`` loads into ``timm.create_model(name, num_classes=0)``.

Models timm marks as having a fixed input size (ViT, DeiT, EVA, Swin...: their position embedding or attention
windows are laid out for one image size, usually 224 px) are built with ``dynamic_img_size=True`` where the model
takes it: the parameters keep the shapes of the default build (so the exported file still loads into the plain
``create_model`` call), and the position embedding ``(1, prefix + g*g, D)`` is interpolated at forward time to the
grid of the crops actually fed, e.g. a 2x2 grid for 32 px crops through a /16 ViT. Other fixed-size models take
only their own size, which :func:`input_size_error` reports before a run starts.

timm is imported only when a ``timm:`` backbone is built or checked: ``import fastclr`` never imports it.
"""

from __future__ import annotations

import difflib
import math

from torch import nn

TIMM_PREFIX = "timm:"
TIMM_MISSING = "--arch {arch} needs timm, which is not installed: pip install 'fastclr[timm]'"


def is_timm_arch(arch: object) -> bool:
    """Whether ``arch`` names a timm model (``"timm:<name>"``)."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def _shown(arch: str) -> str:
    return arch if len(arch) <= 80 else arch[:77] + "..."


def _import_timm(arch: str):
    try:
        import timm
    except ImportError:
        raise ImportError(TIMM_MISSING.format(arch=_shown(arch))) from None
    return timm


def check_timm_arch(arch: str) -> str:
    """The timm model name in ``arch`` (``"timm:vit_small_patch16_224"`` -> ``"vit_small_patch16_224"``).

    Raises:
        ImportError: timm is not installed.
        ValueError: the name is empty, carries a pretrained tag (``name.tag``: weights are never downloaded) or is not
            in timm's registry; the message suggests close names.
    """
    name = arch[len(TIMM_PREFIX) :]
    timm = _import_timm(arch)
    if "." in name:
        raise ValueError(
            f"--arch {_shown(arch)}: give the timm architecture without a pretrained tag "
            f"(timm:{_shown(name.split('.')[0])}); fastclr never downloads weights"
        )
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name[:80], timm.list_models(), n=3) if name else []
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ValueError(
            f"unknown timm model {_shown(name)!r} in --arch {_shown(arch)} (timm.list_models() lists them){hint}"
        )
    return name


def build_timm_backbone(arch: str) -> tuple[nn.Module, int]:
    """``(backbone, feat_dim)`` for ``arch = "timm:<name>"``: random weights, no classifier (see the module docstring).

    Raises:
        ImportError: timm is not installed.
        ValueError: an unknown name (see :func:`check_timm_arch`).
    """
    name = check_timm_arch(arch)
    timm = _import_timm(arch)
    kwargs = dict(pretrained=False, num_classes=0)
    if getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False):
        try:
            model = timm.create_model(name, dynamic_img_size=True, **kwargs)
        except TypeError as e:
            # a fixed-size model without the option (CaiT, XCiT...) takes its own size only
            if "dynamic_img_size" not in str(e):
                raise
            model = timm.create_model(name, **kwargs)
    else:
        model = timm.create_model(name, **kwargs)
    return model, getattr(model, "head_hidden_size", None) or model.num_features


def input_size_error(backbone: nn.Module, size: int) -> str | None:
    """Why a timm ``backbone`` cannot take ``size`` x ``size`` crops, or None when it can.

    Only models with a fixed input size that do not resample it (no ``dynamic_img_size``) are refused; the others
    take any size their strides allow.
    """
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if not cfg.get("fixed_input_size") or getattr(backbone, "dynamic_img_size", False):
        return None
    fixed = tuple(cfg.get("input_size", (3, size, size))[-2:])
    if fixed == (size, size):
        return None
    return (
        f"this timm model takes {fixed[0]}x{fixed[1]} px inputs only (it cannot resample its position "
        f"embedding), but --size is {size}: set --size {fixed[0]}"
    )


def freeze_patch_embed(backbone: nn.Module) -> None:
    """MoCo v3's random patch projection: re-initialise a ViT's patch embedding and freeze it.

    Chen, Xie & He (2021, "An Empirical Study of Training Self-Supervised Vision Transformers") trace the loss
    spikes of self-supervised ViTs to sudden gradient changes in the first layer; a fixed random patch projection
    removes them. The ``(D, 3, p, p)`` weight is drawn as a Xavier-uniform matrix ``D x 3p^2``,
    ``U(-a, a)`` with ``a = sqrt(6 / (3 p^2 + D))``, the bias set to 0, and both get ``requires_grad=False``
    (so every optimiser group leaves them out).

    Raises:
        ValueError: the backbone has no ``patch_embed.proj`` convolution.
    """
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(
            "--freeze-patch-embed needs a patch-embedding model (a ViT: patch_embed.proj, a convolution)"
        )
    fan_in = proj.weight[0].numel()
    bound = math.sqrt(6.0 / (fan_in + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    proj.requires_grad_(False)


def timm_create_call(arch: str, backbone: nn.Module | None = None) -> str:
    """The ``timm.create_model(...)`` call, as Python text, that rebuilds ``backbone`` (built for ``arch``) with the
    same parameter shapes and forward: ``timm.create_model('vit_small_patch16_224', num_classes=0,
    dynamic_img_size=True)``. The plain ``timm.create_model(name, num_classes=0)`` loads the same state_dict."""
    name = arch[len(TIMM_PREFIX) :]
    dynamic = ", dynamic_img_size=True" if getattr(backbone, "dynamic_img_size", False) else ""
    return f"timm.create_model({name!r}, num_classes=0{dynamic})"
