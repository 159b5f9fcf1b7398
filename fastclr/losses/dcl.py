"""Decoupled contrastive learning (Yeh et al. 2022, arXiv:2110.06848): ``dcl``, ``dclw``, ``DCLLoss``, ``DCLWLoss``.

NT-Xent with the positive pair taken out of the denominator, and optionally weighted (s: cosine similarity, rows
[z_a; z_b], pos(i) = (i + N) mod 2N, M pairs in the batch, gathered from every rank with ``gather_distributed``):

    L    = 1/(2N) sum_i [ log sum_{k != i, pos(i)} exp(s(i, k)/tau) - w_i s(i, pos(i))/tau ]         (DCL: w = 1)
    DCLW   w_i = 2 - M exp(s(i, pos(i))/sigma) / sum_{pairs j} exp(s(j, pos(j))/sigma)   (a constant for autograd)

Both equal lightly 1.6.0's ``DCLLoss`` / ``DCLWLoss`` in value and gradients. The "torch" impl takes the log-sum-exp
and the positives' logits from the tiled engine (``fastclr.losses.tiled.row_terms``, memory linear in 2N) and the
weights from autograd, so a custom ``weight_fn`` gets its own gradient exactly as in lightly. The "triton" impl (the
default for CUDA tensors) runs the fused kernel with the positive left out of its denominator, which gives DCL's loss
and gradients; with weights it adds mean_i (1 - w_i) s(i, pos(i))/tau, an O(N D) term, in torch.

Under ``gather_distributed`` DCLW's softmax runs over the pairs of every rank, so that W ranks give the single-process
full-batch gradients (lightly normalises each rank's weights over its own pairs); a custom ``weight_fn`` sees this
rank's pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from fastclr.losses import distributed as dist_utils
from fastclr.losses import tiled
from fastclr.losses.backends import checked_triton, pick_path
from fastclr.losses.family import check_pair_weights, check_positive, check_weight_fn
from fastclr.losses.reference import dcl_reference
from fastclr.nt_xent_spec import (
    all_gather_rows,
    check_embeddings,
    check_impl,
    check_temperature,
)

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def negative_mises_fisher_weights(
    out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5, *, group=None
) -> torch.Tensor:
    """DCLW's weights w_i = 2 - M softmax_i(<out0_i, out1_i> / sigma) over the M pairs, without gradient: (N,).

    Args:
        out0, out1: (N, D) unit rows of the two views.
        sigma: sigma > 0, the temperature of the weighting softmax.
        group: a process group whose pairs all take part in the softmax (this rank's slice is returned), or None.
    """
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    every, offset = all_gather_rows(similarity, group)
    weights = 2 - every.shape[0] * torch.softmax(every, dim=0)
    return weights[offset : offset + out0.shape[0]]


def dcl(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    *,
    weight_fn: WeightFn | None = None,
    impl: str = "auto",
    gather_distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """Decoupled contrastive loss (see the module docstring for the formula).

    Args:
        z_a: (N, D) embeddings of the first views.
        z_b: (N, D) embeddings of the second views; row i of each is a positive pair.
        temperature: tau > 0.
        weight_fn: w(u, v) -> (N,) weights of the positive pairs of unit rows u, v (N, D), called as w(a_hat, b_hat)
            for the first views' anchors and w(b_hat, a_hat) for the second's (as lightly); None: w = 1.
        impl: "auto" (triton for CUDA tensors when triton imports, else torch), "triton" (fused kernel), "torch"
            (tiled, any device), "reference" (materialised). fp32 inputs of the kernel follow PyTorch's TF32 switch, as
            ``fastclr.nt_xent``.
        gather_distributed: use the embeddings of every rank of the process group as negatives (exact gradients).
        group: process group for gather_distributed (default: the world).

    Returns:
        0-d tensor in the input dtype: the mean over this rank's 2N anchors.

    Example:
        >>> loss = fastclr.dcl(model(x_a), model(x_b), temperature=0.1)
    """
    temperature = check_temperature(temperature)
    check_impl(impl)
    check_weight_fn(weight_fn)
    if gather_distributed:
        dist_utils.require_distributed()
    return _checked_dcl(z_a, z_b, temperature, weight_fn, None, impl, gather_distributed, group)


def dclw(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    sigma: float = 0.5,
    *,
    impl: str = "auto",
    gather_distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """DCL weighted by ``negative_mises_fisher_weights`` (DCLW); arguments as ``dcl``, sigma > 0 the weights'
    temperature."""
    temperature = check_temperature(temperature)
    sigma = check_positive(sigma, "sigma")
    check_impl(impl)
    if gather_distributed:
        dist_utils.require_distributed()
    return _checked_dcl(z_a, z_b, temperature, None, sigma, impl, gather_distributed, group)


def _checked_dcl(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    weight_fn: WeightFn | None,
    sigma: float | None,
    impl: str,
    gather_distributed: bool,
    group,
) -> torch.Tensor:
    """DCL once the hyper-parameters are checked: checks the embeddings, picks the weights, routes them."""
    check_embeddings(z_a, z_b)
    n = z_a.shape[0]
    dist_group = dist_utils.resolve_group(gather_distributed, group)
    if dist_group is not None:
        dist_utils.check_equal_batches(n, z_a.shape[1], z_a.device, dist_group)
    elif n == 1:
        raise ValueError(
            "N = 1: DCL takes the positive out of the denominator, which leaves a single pair no negative"
        )
    if sigma is not None:
        weight_fn = partial(negative_mises_fisher_weights, sigma=sigma, group=dist_group)
    if weight_fn is not None:
        weight_fn = partial(_checked_weights, weight_fn)
    path = pick_path(impl, z_a.device, z_a.dtype)
    if path == "reference":
        return dcl_reference(z_a, z_b, temperature, weight_fn=weight_fn, group=dist_group)
    if path == "triton":
        return _dcl_triton(z_a, z_b, temperature, weight_fn, dist_group)
    return _dcl_tiled(z_a, z_b, temperature, weight_fn, dist_group)


def _checked_weights(weight_fn: WeightFn, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight_fn(u, v) as (N,) weights (a scalar is every pair's weight), ValueError for any other shape."""
    return check_pair_weights(weight_fn(u, v), u.shape[0]).expand(u.shape[0])


def _dcl_tiled(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, weight_fn: WeightFn | None, group
) -> torch.Tensor:
    """L = mean_i [ log l_i - w_i pair_i + (1 - w_i) m_i ] from the tiled engine's terms: lse_i = m_i + log l_i and
    S_i,pos(i)/tau = m_i + pair_i, so that with w = 1 no term of size 1/tau is formed."""
    z_hat = tiled.normalized(torch.cat([z_a, z_b]))
    terms = tiled.row_terms(z_hat, temperature, group=group, exclude_pos=True)
    if weight_fn is None:
        return (terms.log_sum - terms.pair).mean().to(z_a.dtype)
    w = _row_weights(z_hat, weight_fn)
    return (terms.log_sum - w * terms.pair + (1 - w) * terms.shift).mean().to(z_a.dtype)


def _row_weights(z_hat: torch.Tensor, weight_fn: WeightFn) -> torch.Tensor:
    """(2N,) weights of the anchors [a_hat; b_hat] = z_hat: w(a_hat, b_hat) for the first views, w(b_hat, a_hat) for
    the second (as lightly), through autograd."""
    a, b = z_hat.chunk(2)
    return torch.cat([weight_fn(a, b), weight_fn(b, a)])


def _dcl_triton(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, weight_fn: WeightFn | None, group
) -> torch.Tensor:
    """DCL from the fused kernel (``exclude_pos``: mean_i [lse'_i - s(i, pos(i))/tau]); with weights, plus
    mean_i (1 - w_i) s(i, pos(i))/tau from the normalised rows, with autograd through s and w."""
    kernel, _ = checked_triton(z_a)
    loss = kernel.loss(z_a, z_b, temperature, group=group, exclude_pos=True)
    if weight_fn is None:
        return loss
    z_hat = tiled.normalized(torch.cat([z_a, z_b]))
    pair = tiled.pair_cosines(z_hat) / temperature
    w = _row_weights(z_hat, weight_fn)
    return (loss.float() + ((1 - w) * pair).mean()).to(z_a.dtype)


class DCLLoss(nn.Module):
    """Drop-in decoupled contrastive loss (lightly's ``DCLLoss``): NT-Xent without the positive in the denominator.

    Args:
        temperature: tau > 0.
        weight_fn: optional w(u, v) -> (N,) weights of the positive pairs (see ``fastclr.dcl``).
        gather_distributed: gather negatives from all ranks of the default process group, with exact gradients.
        impl: "auto" (triton for CUDA tensors when triton imports, else torch) | "triton" | "torch" | "reference".

    Shapes:
        forward(z_a (N, D), z_b (N, D)) -> 0-d tensor.

    Example:
        >>> criterion = DCLLoss(temperature=0.1)
        >>> loss = criterion(model(x_a), model(x_b))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn: WeightFn | None = None,
        gather_distributed: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.impl = check_impl(impl)
        check_weight_fn(weight_fn)
        self.weight_fn = weight_fn
        if gather_distributed:
            dist_utils.require_distributed()
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return _checked_dcl(
            z_a,
            z_b,
            self.temperature,
            self.weight_fn,
            None,
            self.impl,
            self.gather_distributed,
            None,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather_distributed={self.gather_distributed}"


class DCLWLoss(DCLLoss):
    """Drop-in weighted decoupled contrastive loss (lightly's ``DCLWLoss``): DCL with the von Mises-Fisher weights.

    Args:
        temperature: tau > 0.
        sigma: sigma > 0, the temperature of the weights (see ``negative_mises_fisher_weights``).
        gather_distributed: gather negatives (and the weights' softmax) over all ranks, with exact gradients.
        impl: "auto" (triton for CUDA tensors when triton imports, else torch) | "triton" | "torch" | "reference".

    Shapes:
        forward(z_a (N, D), z_b (N, D)) -> 0-d tensor.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        gather_distributed: bool = False,
        impl: str = "auto",
    ):
        super().__init__(temperature, None, gather_distributed, impl)
        self.sigma = check_positive(sigma, "sigma")

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return _checked_dcl(
            z_a, z_b, self.temperature, None, self.sigma, self.impl, self.gather_distributed, None
        )

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, " + super().extra_repr()
