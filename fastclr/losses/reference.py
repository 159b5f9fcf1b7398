"""The reference losses: short, materialised, obviously correct. Every fast path is checked against them.

Rows 0..N-1 are the first views, rows N..2N-1 the second; pos(i) = (i + N) mod 2N; s(i, k) the cosine similarity.

    NT-Xent  (Chen et al. 2020)   L = 1/(2N) sum_i [ log sum_{k != i} exp(s(i, k)/tau) - s(i, pos(i))/tau ]
    DCL      (Yeh et al. 2022)    L = 1/(2N) sum_i [ log sum_{k != i, pos(i)} exp(s(i, k)/tau) - w_i s(i, pos(i))/tau ]
    SupCon   (Khosla et al. 2020) L = 1/(2N) sum_i [ log sum_{k != i} exp(s(i, k)/tau) - 1/|P(i)| sum_{p in P(i)} s(i, p)/tau ]
             P(i) = {p != i : y_p = y_i}, never empty: the other view of a sample carries its label
    bank     (He et al. 2020)     L = 1/N sum_i [ log( exp(s(a_i, b_i)/tau) + sum_k exp(s(a_i, q_k)/tau) ) - s(a_i, b_i)/tau ]
             anchors a_i = z_a's rows only, negatives the K bank rows q_k (unit rows, no gradient)

With ``group`` set, the rows of every rank are gathered (with gradients, through ``fastclr.losses.distributed``) as
candidates, local row i sits at column ``rank * 2N + i``, and SupCon's labels are gathered with them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastclr.nt_xent_spec import all_gather_rows, row_norms


def unit_rows(z: torch.Tensor) -> torch.Tensor:
    """z (A, D) with every row divided by max(||z_i||, EPS), in z's dtype.

    fp16 cannot hold eps (1e-12 rounds to 0): it is normalised in fp32. row_norms scales each row by its max |z| before
    squaring, so no dtype overflows there (fp32 squares did from norms ~1e19).
    """
    work = z.float() if z.dtype == torch.float16 else z
    return (work / row_norms(work)[:, None]).to(z.dtype)


def _candidates(z: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """(the rows of every rank (A*W, D) with a gradient path back to z, the column of local row 0)."""
    if group is None:
        return z, 0
    import torch.distributed as dist

    from fastclr.losses.distributed import all_gather_rows_autograd

    return all_gather_rows_autograd(z, group), dist.get_rank(group) * z.shape[0]


def _logits(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, group):
    """(logits (2N, M) = z_hat cols^T / tau, unit rows z_hat (2N, D), self columns (2N,), positive columns (2N,))."""
    n = z_a.shape[0]
    z = unit_rows(torch.cat([z_a, z_b]))
    cols, offset = _candidates(z, group)
    rows = torch.arange(2 * n, device=z.device)
    return z @ cols.T / temperature, z, offset + rows, offset + (rows + n) % (2 * n)


def _masked(logits: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """logits with entry (i, columns[i]) set to -inf, for each of the given (2N,) column indices."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(logits.shape[0], device=logits.device)
    for cols in columns:
        mask[rows, cols] = True
    return logits.masked_fill(mask, float("-inf"))


def nt_xent_reference(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.5, *, group=None
) -> torch.Tensor:
    """NT-Xent over the materialised (2N, 2N·W) logits matrix.

    Args:
        z_a, z_b: (N, D) embeddings of the two views; row i of each is a positive pair.
        temperature: tau > 0.
        group: a ``torch.distributed`` process group to gather negatives from, or None.

    Returns:
        Scalar loss, mean over this rank's 2N anchors, in the input dtype.
    """
    logits, _, self_cols, pos_cols = _logits(z_a, z_b, temperature, group)
    return F.cross_entropy(_masked(logits, self_cols), pos_cols)


def dcl_reference(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    *,
    weight_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    group=None,
) -> torch.Tensor:
    """Decoupled contrastive loss (DCL, Yeh et al. 2022 eq. 6): the positive left out of the log-sum-exp.

    Args:
        z_a, z_b: (N, D) embeddings of the two views.
        temperature: tau > 0.
        weight_fn: w(u, v) -> (N,) weights of the positive pairs of unit rows u, v (N, D), called as w(a_hat, b_hat)
            for the first views' anchors and w(b_hat, a_hat) for the second's; None: w = 1.
        group: a process group to gather negatives from, or None.

    Returns:
        Scalar loss, mean over this rank's 2N anchors, in the input dtype.
    """
    n = z_a.shape[0]
    logits, z, self_cols, pos_cols = _logits(z_a, z_b, temperature, group)
    rows = torch.arange(2 * n, device=z.device)
    positive = logits[rows, pos_cols]
    if weight_fn is not None:
        positive = positive * torch.cat([weight_fn(z[:n], z[n:]), weight_fn(z[n:], z[:n])])
    return (_masked(logits, self_cols, pos_cols).logsumexp(dim=1) - positive).mean()


def supcon_reference(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    *,
    group=None,
) -> torch.Tensor:
    """Supervised contrastive loss (SupCon, Khosla et al. 2020, L_out: the log-probabilities averaged over positives).

    Args:
        z_a, z_b: (N, D) embeddings of the two views.
        labels: (N,) integer label of each sample (both views share it).
        temperature: tau > 0.
        group: a process group to gather candidates and their labels from, or None.

    Returns:
        Scalar loss, mean over this rank's 2N anchors, in the input dtype.
    """
    logits, _, self_cols, _ = _logits(z_a, z_b, temperature, group)
    y = torch.cat([labels, labels])
    y_cols, _ = all_gather_rows(y, group)
    log_prob = logits - _masked(logits, self_cols).logsumexp(dim=1, keepdim=True)
    positive = y[:, None] == y_cols[None, :]
    positive[torch.arange(y.shape[0], device=y.device), self_cols] = False
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)).mean()


def nt_xent_bank_reference(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """NT-Xent against a memory bank (MoCo's InfoNCE): anchors z_a, positives z_b, negatives the bank's rows.

    Args:
        z_a, z_b: (N, D) embeddings of the two views.
        bank: (K, D) unit rows, constants for autograd.
        temperature: tau > 0.

    Returns:
        Scalar loss, mean over the N anchors, in the input dtype.
    """
    a, b = unit_rows(z_a), unit_rows(z_b)
    positive = (a * b).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, a @ bank.detach().to(a.dtype).T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))
