"""The NVIDIA DALI backend: :class:`SimCLRLoader` and :class:`EvalLoader`.

``loader`` runs one DALI pipeline per epoch; ``graph`` builds the view graphs from the
augmentation spec; ``cpu_augment`` is the numba op the CPU graph runs the pixel ops with.
"""

from fastclr.pipelines.dali.loader import (
    EvalLoader,
    SimCLRLoader,
    dali_available,
    resolve_augment_impl,
)

__all__ = ["EvalLoader", "SimCLRLoader", "dali_available", "resolve_augment_impl"]
