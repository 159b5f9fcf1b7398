"""Supervised contrastive learning (Khosla et al. 2020, arXiv:2004.11362): ``supcon`` and ``SupConLoss``.

Every view with the anchor's label is a positive; the L_out form averages the log-probabilities over them (s: cosine
similarity, rows [z_a; z_b] with labels y = [labels; labels], candidates gathered from every rank with
``gather_distributed``):

    L = 1/(2N) sum_i [ log sum_{k != i} exp(s(i, k)/tau) - 1/|P(i)| sum_{p in P(i)} s(i, p)/tau ],   P(i) = {p != i : y_p = y_i}

P(i) always holds the anchor's other view, so no row is without positives; with all labels distinct P(i) = {pos(i)} and
L is NT-Xent. The "torch" impl compares labels inside the tiles of the tiled engine (``fastclr.losses.tiled``): no
(2N)^2 mask or logits matrix exists, memory stays linear in 2N, and the gradient under DDP is the full-batch one.

The "triton" impl (the default for CUDA tensors) takes the log-sum-exp from the fused NT-Xent kernel, whose loss is
mean_i [lse_i - s(i, pos(i))/tau] over the same denominator, and adds the O(N D) difference of the positives' terms
from per-class sums of the unit rows (sum_{p in P(i)} s(i, p) = <z_hat_i, C_{y_i} - z_hat_i>, C_y the sum of class y's
rows of every rank), with autograd; a row whose only positive is its pair adds exactly 0:

    L = L_NT-Xent + 1/(2N) sum_i [ (s(i, pos(i)) - 1)/tau - 1/|P(i)| sum_{p in P(i)} (s(i, p) - 1)/tau ]
"""

from __future__ import annotations

import torch
from torch import nn

from fastclr.losses import distributed as dist_utils
from fastclr.losses import tiled
from fastclr.losses.backends import checked_triton, pick_path
from fastclr.losses.family import check_labels
from fastclr.losses.reference import supcon_reference
from fastclr.nt_xent_spec import (
    check_embeddings,
    check_impl,
    check_temperature,
)


def supcon(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    *,
    impl: str = "auto",
    gather_distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """Supervised contrastive loss, L_out (see the module docstring for the formula).

    Args:
        z_a: (N, D) embeddings of the first views.
        z_b: (N, D) embeddings of the second views of the same samples.
        labels: (N,) integer class of each sample, on the embeddings' device.
        temperature: tau > 0.
        impl: "auto" (triton for CUDA tensors when triton imports, else torch), "triton" (the fused NT-Xent kernel
            plus the label terms), "torch" (tiled, any device), "reference" (materialised). fp32 inputs of the kernel
            follow PyTorch's TF32 switch, as ``fastclr.nt_xent``.
        gather_distributed: use the embeddings and labels of every rank of the process group (exact gradients).
        group: process group for gather_distributed (default: the world).

    Returns:
        0-d tensor in the input dtype: the mean over this rank's 2N anchors.

    Example:
        >>> loss = fastclr.supcon(model(x_a), model(x_b), y, temperature=0.1)
    """
    temperature = check_temperature(temperature)
    check_impl(impl)
    if gather_distributed:
        dist_utils.require_distributed()
    return _checked_supcon(z_a, z_b, labels, temperature, impl, gather_distributed, group)


def _checked_supcon(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    impl: str,
    gather_distributed: bool,
    group,
) -> torch.Tensor:
    """SupCon once the hyper-parameters are checked: checks the embeddings and labels, routes them."""
    check_embeddings(z_a, z_b)
    check_labels(labels, z_a)
    labels = labels.long()
    dist_group = dist_utils.resolve_group(gather_distributed, group)
    if dist_group is not None:
        dist_utils.check_equal_batches(z_a.shape[0], z_a.shape[1], z_a.device, dist_group)
    path = pick_path(impl, z_a.device, z_a.dtype)
    if path == "reference":
        return supcon_reference(z_a, z_b, labels, temperature, group=dist_group)
    if path == "triton":
        return _supcon_triton(z_a, z_b, labels, temperature, dist_group)
    z_hat = tiled.normalized(torch.cat([z_a, z_b]))
    terms = tiled.row_terms(
        z_hat, temperature, group=dist_group, labels=torch.cat([labels, labels])
    )
    # lse_i - mean_p S_ip/tau = log l_i - mean_p (S_ip/tau - m_i): no term of size 1/tau is formed
    return (terms.log_sum - terms.positive / terms.count).mean().to(z_a.dtype)


def _supcon_triton(
    z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor, temperature: float, group
) -> torch.Tensor:
    """SupCon from the fused NT-Xent kernel plus the positives' difference (see the module docstring). A row whose only
    positive is its pair adds exactly 0 (and no gradient); the others carry the rounding of the class sums, about
    eps |C_y| / tau (fp32: ~1e-7 per class member over tau), the size of the kernel's own rounding of its logits."""
    kernel, _ = checked_triton(z_a)
    loss = kernel.loss(z_a, z_b, temperature, group=group)
    z_hat = tiled.normalized(torch.cat([z_a, z_b]))
    sums = tiled.label_sums(z_hat, torch.cat([labels, labels]), temperature, group=group)
    pair = (tiled.pair_cosines(z_hat) - 1) / temperature
    diff = torch.where(sums.count == 1, 0.0, pair - sums.positive / sums.count)
    return (loss.float() + diff.mean()).to(z_a.dtype)


class SupConLoss(nn.Module):
    """Supervised contrastive loss module (Khosla et al. 2020, L_out), called as ``loss(z_a, z_b, labels)``.

    Args:
        temperature: tau > 0.
        gather_distributed: gather embeddings and labels from all ranks of the default process group, with exact
            gradients.
        impl: "auto" (triton for CUDA tensors when triton imports, else torch) | "triton" | "torch" | "reference".

    Shapes:
        forward(z_a (N, D), z_b (N, D), labels (N,) integer) -> 0-d tensor.

    Example:
        >>> criterion = SupConLoss(temperature=0.1)
        >>> loss = criterion(model(x_a), model(x_b), y)
    """

    def __init__(
        self, temperature: float = 0.1, gather_distributed: bool = False, impl: str = "auto"
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.impl = check_impl(impl)
        if gather_distributed:
            dist_utils.require_distributed()
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _checked_supcon(
            z_a, z_b, labels, self.temperature, self.impl, self.gather_distributed, None
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather_distributed={self.gather_distributed}"
