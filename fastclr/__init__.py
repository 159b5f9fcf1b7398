"""fastclr: a performance-focused SimCLR engine.

>>> from fastclr import NTXentLoss
>>> loss = NTXentLoss(temperature=0.5)(z_a, z_b)  # z_a, z_b: (N, D) embeddings of two views

Heavy optional dependencies (triton, DALI) are imported lazily, so ``import fastclr`` works anywhere.
"""

from fastclr.losses.nt_xent import NTXentLoss, nt_xent
from fastclr.nt_xent_spec import IMPLS

__version__ = "0.1.0"
__all__ = ["IMPLS", "LARS", "NTXentLoss", "nt_xent", "__version__"]


def __getattr__(name):
    if name == "LARS":
        from fastclr.optim import LARS

        return LARS
    raise AttributeError(f"module 'fastclr' has no attribute {name!r}")
