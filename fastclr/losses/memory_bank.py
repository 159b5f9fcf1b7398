"""NT-Xent against a memory bank of negatives, with the semantics of lightly 1.6.0's ``NTXentLoss(memory_bank_size=
(K, D))``: ``MemoryBank`` (the FIFO of past embeddings) and ``nt_xent_bank`` (the loss against a given bank).

With a bank the loss is MoCo's InfoNCE (He et al. 2020): the anchors are z_a's rows only, each with its own z_b row as
the positive and the K bank rows q_k as negatives (no in-batch negatives):

    L = 1/N sum_i [ log( exp(s(a_i, b_i)/tau) + sum_k exp(s(a_i, q_k)/tau) ) - s(a_i, b_i)/tau ]
      = 1/N sum_i softplus( lse^bank_i - s(a_i, b_i)/tau ),    lse^bank_i = log sum_k exp(s(a_i, q_k)/tau)

and one step of ``NTXentLoss`` is, as in lightly:
  1. the loss against the bank as it was before the step (a snapshot: the bank has no gradient);
  2. if z_a requires a gradient (a training step, not an evaluation), the unit rows of z_b enter the bank, oldest
     first out: written at the pointer, which advances; a batch that reaches the end of the bank fills it and the
     pointer returns to 0, the rest of that batch is dropped. With ``gather_distributed`` every rank's z_b rows enter,
     in rank order, so that every rank's bank stays the single-process one.
The bank starts as K normalised standard-normal rows drawn from torch's global generator when the loss is built
(``torch.randn((K, D))`` in the default dtype, then float32): the same seed gives lightly's bank. Like lightly's, the
bank is a non-persistent float32 buffer (``memory_bank.bank``, pointer ``memory_bank.bank_ptr``), moved by ``.to()``
and absent from ``state_dict`` (the trainer's checkpoints carry it, see ``fastclr.train.checkpoint``). The pointer
stays on the device: a step never reads it back, so a skipped step can put the bank and the pointer back in place.

The "torch" impl takes lse^bank from the tiled engine (the bank as extra columns without gradient, memory linear in N
and K), "triton" from the fused bank kernel (``fastclr.kernels.memory_bank``); both keep sum_k P_ik q_k from the
forward's tiles, since the bank has no gradient, so that a step costs two (N x K x D) GEMMs (the kernel up to D =
KERNEL_MAX_D; above it recomputes S per 128-wide chunk of D). "auto" picks the kernel for CUDA tensors of D <=
KERNEL_MAX_D, the tiled path otherwise. "reference" materialises the (N, 1 + K) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastclr.losses import distributed as dist_utils
from fastclr.losses import tiled
from fastclr.losses.backends import checked_triton, pick_path
from fastclr.losses.reference import nt_xent_bank_reference, unit_rows
from fastclr.nt_xent_spec import (
    all_gather_rows,
    check_embeddings,
    check_impl,
    check_temperature,
)

# The widest D the bank kernel runs in one pass (its MAX_BLOCK_D): "auto" takes the tiled path above it.
KERNEL_MAX_D = 256


def nt_xent_bank(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    temperature: float = 0.5,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """NT-Xent of the anchors z_a against their positives z_b and the negatives ``bank`` (see the module docstring).

    Args:
        z_a: (N, D) embeddings of the first views (the anchors).
        z_b: (N, D) embeddings of the second views (the positives).
        bank: (K, D) unit rows (what ``MemoryBank`` stores), K >= 1, on z_a's device; no gradient flows into it.
        temperature: tau > 0.
        impl: "auto" (triton for CUDA tensors with D <= KERNEL_MAX_D when triton imports, else torch), "triton" (the
            fused bank kernel), "torch" (tiled, any device),
            "reference" (materialised). fp32 inputs of the kernel follow PyTorch's TF32 switch, as ``fastclr.nt_xent``.

    Returns:
        0-d tensor in the input dtype: the mean over the N anchors.
    """
    temperature = check_temperature(temperature)
    path = check_impl(impl)
    check_embeddings(z_a, z_b)
    check_bank(bank, z_a)
    return _bank_loss(z_a, z_b, bank, temperature, path)


def check_bank(bank, z_a: torch.Tensor) -> None:
    """TypeError/ValueError naming the problem unless bank is a non-empty floating (K, D) tensor on z_a's device."""
    if not isinstance(bank, torch.Tensor):
        raise TypeError(f"bank must be a torch.Tensor, got {type(bank).__name__}")
    if not bank.is_floating_point():
        raise TypeError(f"bank must have a floating-point dtype, got {bank.dtype}")
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"bank must be a non-empty (K, D) tensor, got shape {tuple(bank.shape)}")
    if bank.shape[1] != z_a.shape[1]:
        raise ValueError(
            f"the memory bank holds D = {bank.shape[1]} features (memory_bank_size {tuple(bank.shape)}) but the "
            f"embeddings have D = {z_a.shape[1]}"
        )
    if bank.device != z_a.device:
        raise ValueError(f"bank must be on the embeddings' device {z_a.device}, got {bank.device}")


def _bank_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float, impl: str
) -> torch.Tensor:
    """The loss of the module docstring for a checked impl ("auto" resolved here), from lse^bank_i = shift_i +
    log_sum_i: the positive's logit is subtracted from the shift (the row's largest logit, or 1/tau) before log_sum
    is added, so lse_i itself, about 1/tau, is never rounded."""
    path = pick_path(impl, z_a.device, z_a.dtype)
    if impl == "auto" and path == "triton" and z_a.shape[1] > KERNEL_MAX_D:
        path = "torch"
    if path == "reference":
        return nt_xent_bank_reference(z_a, z_b, bank, temperature)
    a, b = tiled.normalized(z_a), tiled.normalized(z_b)
    if path == "triton":
        shift, log_sum = _bank_lse_triton(a, bank, temperature, z_a.dtype)
    else:
        terms = tiled.row_terms(a, temperature, in_batch=False, extra=bank.detach().to(a.dtype))
        shift, log_sum = terms.shift, terms.log_sum
    positive = (a * b).sum(dim=1) / temperature
    return F.softplus((shift - positive) + log_sum).mean().to(z_a.dtype)


def _bank_lse_triton(
    a: torch.Tensor, bank: torch.Tensor, temperature: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, log_sum) (N,) of the unit anchors a against the bank, through the fused kernel in the embeddings' dtype
    (the tensor cores' operands; the gradient flows back through the cast)."""
    from fastclr.kernels.memory_bank import bank_lse_triton

    x = a.to(dtype)
    _, precision = checked_triton(x)
    return bank_lse_triton(x, bank.detach().to(dtype), temperature, precision=precision)


class MemoryBank(nn.Module):
    """A FIFO of K past embeddings (D features each) used as negatives, as lightly's ``MemoryBankModule`` keeps it.

    Args:
        size: (K, D), checked by the caller (``fastclr.losses.family.check_memory_bank_size``).
        gather_distributed: enqueue the embeddings of every rank (in rank order) instead of this rank's only.
    """

    bank: torch.Tensor
    bank_ptr: torch.Tensor

    def __init__(self, size: tuple[int, int], gather_distributed: bool = False):
        super().__init__()
        self.size = size
        self.gather_distributed = gather_distributed
        # The draw lightly makes: randn in the default dtype, to float32, then unit rows.
        bank = F.normalize(torch.randn(size).float(), dim=-1)
        self.register_buffer("bank", bank, persistent=False)
        # the pointer lives on the device only: a step never reads it back, and a guard can undo it in place
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        self._synced = False

    def snapshot(self, like: torch.Tensor) -> torch.Tensor:
        """The bank (K, D) as the step's negatives, on ``like``'s device: a copy that later enqueues cannot change."""
        return self.bank.detach().to(like.device, copy=True)

    @torch.no_grad()
    def sync(self, group) -> None:
        """Once per bank: every rank takes rank 0's bank and pointer, so the ranks of a DDP run share one bank even
        if they seeded their generators differently."""
        if self._synced or group is None:
            return
        import torch.distributed as dist

        for buf in (self.bank, self.bank_ptr):
            shared = buf.to(_collective_device(group), copy=True)
            dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
            buf.copy_(shared)
        self._synced = True

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor, group) -> None:
        """Write the unit rows (B, D) (of every rank of ``group``, when given) at the pointer; advance it or wrap.

        Without reading the pointer: with p = bank_ptr and B' = min(B, K) (a batch never writes more than K rows),
        row r < B' goes to slot p + r when p + r < K and is dropped otherwise (its slot (p + r) - K, distinct from
        every written one, is rewritten with its own value); the pointer becomes p + B', or 0 when p + B' >= K.
        """
        rows, _ = all_gather_rows(rows, group)
        k = self.size[0]
        rows = rows[:k].to(self.bank.dtype)
        pos = self.bank_ptr + torch.arange(rows.shape[0], device=self.bank.device)
        dropped = pos >= k
        slots = pos - k * dropped
        self.bank.index_copy_(0, slots, torch.where(dropped[:, None], self.bank[slots], rows))
        end = self.bank_ptr + rows.shape[0]
        self.bank_ptr.copy_(torch.where(end >= k, 0, end))

    def extra_repr(self) -> str:
        return f"size={self.size}, gather_distributed={self.gather_distributed}"


def _collective_device(group) -> torch.device:
    """Where a collective's tensors must live for the group's backend: CUDA for NCCL, the CPU otherwise."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bank_step(
    bank: MemoryBank,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    impl: str,
    gather_distributed: bool,
) -> torch.Tensor:
    """One ``NTXentLoss`` step with a bank: the loss against the bank as it was, then z_b's unit rows enqueued when
    z_a requires a gradient (see the module docstring). z_a, z_b: (N, D), checked here."""
    check_embeddings(z_a, z_b)
    k, d = bank.size
    if z_a.shape[1] != d:
        raise ValueError(
            f"memory_bank_size is ({k}, {d}) but the embeddings have D = {z_a.shape[1]}: the bank's feature "
            "dimension must match the embeddings'"
        )
    group = dist_utils.resolve_group(gather_distributed)
    if group is not None:
        dist_utils.check_equal_batches(z_a.shape[0], d, z_a.device, group)
        bank.sync(group)
    negatives = bank.snapshot(z_a)
    loss = _bank_loss(z_a, z_b, negatives, temperature, impl)
    if (
        z_a.requires_grad and torch.is_grad_enabled()
    ):  # lightly: update when its normalised z_a requires a gradient
        bank.enqueue(unit_rows(z_b.detach()), group)
    return loss
