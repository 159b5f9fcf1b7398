"""The reference NT-Xent loss: short, materialised, obviously correct. Every fast path is checked against it.

    L = 1/(2N) * sum_i -log( exp(s(i, pos(i))/tau) / sum_{k != i} exp(s(i, k)/tau) ),   s = cosine similarity

Rows 0..N-1 are the first views, rows N..2N-1 the second; pos(i) = (i + N) mod 2N. With ``group`` set, the rows of every rank
are gathered (with gradients, through ``torch.distributed.nn``) as candidates and local row i sits at column ``rank * 2N + i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclr.nt_xent_spec import row_norms


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
    n = z_a.shape[0]
    z = torch.cat([z_a, z_b])
    # fp16 cannot hold eps (1e-12 rounds to 0): normalise in fp32. row_norms scales each row by its max |z| before
    # squaring, so no dtype overflows there (fp32 squares did from norms ~1e19).
    z = z.float() if z.dtype == torch.float16 else z
    z = (z / row_norms(z)[:, None]).to(z_a.dtype)
    cols, offset = z, 0
    if group is not None:
        import torch.distributed as dist

        from fastclr.losses.distributed import all_gather_rows_autograd

        cols = all_gather_rows_autograd(z, group)
        offset = dist.get_rank(group) * 2 * n
    logits = z @ cols.T / temperature
    rows = torch.arange(2 * n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rows + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = offset + (rows + n) % (2 * n)
    return F.cross_entropy(logits, targets)
