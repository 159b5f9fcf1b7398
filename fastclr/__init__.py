"""fastclr: a performance-focused SimCLR engine.

>>> from fastclr import NTXentLoss
>>> loss = NTXentLoss(temperature=0.5)(z_a, z_b)  # z_a, z_b: (N, D) embeddings of two views

The contrastive family shares the tiled path and the fused kernels: ``NTXentLoss(memory_bank_size=(K, D))``,
``DCLLoss``, ``DCLWLoss``, ``SupConLoss`` (called with labels), and the functional forms ``dcl``, ``dclw``,
``supcon``, ``nt_xent_bank``.

Heavy optional dependencies (triton, DALI) are imported lazily, so ``import fastclr`` works anywhere.
"""

from fastclr.losses.dcl import DCLLoss, DCLWLoss, dcl, dclw
from fastclr.losses.memory_bank import nt_xent_bank
from fastclr.losses.nt_xent import NTXentLoss, nt_xent
from fastclr.losses.supcon import SupConLoss, supcon
from fastclr.nt_xent_spec import IMPLS

__version__ = "0.1.0"
__all__ = [
    "IMPLS",
    "LARS",
    "DCLLoss",
    "DCLWLoss",
    "NTXentLoss",
    "SupConLoss",
    "dcl",
    "dclw",
    "nt_xent",
    "nt_xent_bank",
    "supcon",
    "__version__",
]


def __getattr__(name):
    if name == "LARS":
        from fastclr.optim import LARS

        return LARS
    raise AttributeError(f"module 'fastclr' has no attribute {name!r}")
