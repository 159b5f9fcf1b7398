"""LARS with the official SimCLR semantics, and its parameter-group helper.

For each parameter ``w`` with gradient ``g`` in a group with learning rate ``lr``, momentum ``m``,
weight decay ``wd`` and trust coefficient ``eta`` (You et al. 2017; google-research/simclr
``lars_optimizer.py``):

    g'    = g + wd * w
    trust = eta * ||w|| / ||g'||       (1 when ||w|| == 0 or ||g'|| == 0)
    v     = m * v + lr * trust * g'    (classic momentum: lr lives inside the buffer)
    w     = w - v

A group with ``"lars_exclude": True`` gets neither weight decay nor adaptation: ``v = m * v + lr * g``;
``w = w - v``. :func:`lars_exclusions` decides which parameters go there: biases, normalisation parameters,
and what a model declares (position embeddings, class tokens), whatever their shapes.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict

import torch
from torch import nn

# Normalisation layers (BatchNorm/SyncBatchNorm/InstanceNorm through _NormBase): their scale and shift are excluded
# whatever their shape. timm's norm layers subclass these or hold 1-d parameters.
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling as used by SimCLR.

    Args:
        params: parameters or parameter groups (see ``lars_param_groups``); a group may set
            ``"lars_exclude": True`` to skip weight decay and trust-ratio adaptation.
        lr: learning rate (e.g. ``scaled_lr(batch_size)``).
        momentum: classic momentum coefficient (0.9 in SimCLR).
        weight_decay: L2 coefficient added to the gradient before the trust ratio (1e-6 in SimCLR).
        eta: trust coefficient (0.001 in SimCLR).

    Example:
        >>> opt = LARS(lars_param_groups(model, weight_decay=1e-6), lr=scaled_lr(4096))
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"LARS learning rate must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum!r}")
        if not weight_decay >= 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay!r}")
        if not eta > 0:
            raise ValueError(f"LARS eta must be > 0, got {eta!r}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one update to every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Multi-tensor (foreach) kernels per device and dtype: a handful of launches per group
            # instead of ~10 per parameter, which dominates the optimiser step of a ResNet-50 on GPU.
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise TypeError("LARS does not support sparse gradients")
                    buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, grads = group["lr"], [p.grad for p in params]
        if group["lars_exclude"]:
            updates = torch._foreach_mul(grads, lr)
        else:
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(updates))
            # torch.where keeps this on-device: no host sync for the zero-norm branches.
            trust = torch.where(
                (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
            )
            torch._foreach_mul_(updates, (trust * lr).unbind())
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, updates)
        torch._foreach_sub_(params, bufs)


def _declared_no_decay(model: nn.Module) -> list[str]:
    """Full-name patterns of the parameters the modules of ``model`` declare free of weight decay.

    timm's convention: a module's ``no_weight_decay()`` returns names relative to itself, exact (``pos_embed``),
    a submodule (``pos_block``) or a wildcard (``pos_embed.*``); ViT's names its position embedding and its
    class, register and distillation tokens, Swin its relative-position tables.
    """
    patterns = []
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            patterns += [f"{prefix}.{name}" if prefix else str(name) for name in declare()]
    return patterns


def lars_exclusions(model: nn.Module) -> set[str]:
    """Names of the trainable parameters that get no weight decay and no trust-ratio adaptation.

    A parameter is excluded when it is

    * at most 1-d (biases, norm scales and shifts, layer-scale gains; SimCLR's rule), or named ``bias``;
    * owned by a normalisation layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm...), whatever its shape;
    * declared by its model through ``no_weight_decay()`` (timm's convention): position embeddings
      ``(1, N, D)``, class/register tokens ``(1, 1, D)``, relative-position tables.

    Everything else, the conv and linear weights (patch projection, attention, MLP, stem), is decayed and adapted.
    For torchvision's ResNets this is exactly the ``ndim <= 1`` rule.
    """
    modules = dict(model.named_modules())
    declared = _declared_no_decay(model)
    excluded = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        if (
            p.ndim <= 1
            or leaf == "bias"
            or isinstance(modules.get(owner), _NORMS)
            or any(
                name == pat or name.startswith(pat + ".") or fnmatch.fnmatchcase(name, pat)
                for pat in declared
            )
        ):
            excluded.add(name)
    return excluded


def lars_param_groups(model: nn.Module, weight_decay: float = 1e-6) -> list[dict]:
    """Split a model's trainable parameters into LARS groups.

    The parameters :func:`lars_exclusions` names (biases, normalisation parameters, position embeddings and class
    tokens) go into a group with ``weight_decay=0`` and ``"lars_exclude": True``, as in SimCLR; everything else
    (conv and linear weights) gets ``weight_decay``. Frozen parameters are left out, and so are empty groups.

    Returns:
        A list of param-group dicts for ``LARS`` (or any torch optimizer, e.g. AdamW, which honours the groups'
        ``weight_decay`` and ignores the extra key).
    """
    excluded = lars_exclusions(model)
    decay, exclude = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exclude if name in excluded else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": exclude, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]
