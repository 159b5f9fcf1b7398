"""The one place an impl name becomes code: ``resolve_impl`` turns "auto" into a concrete path, ``backend`` gives a
fast path's functions, with one signature per job whichever path it is, so that callers need no branch of their own:

    check(z_a)                                     what the path needs beyond ``check_embeddings`` (dtype, device)
    loss(z_a, z_b, temperature, *, group)          the 0-d loss with autograd (negatives gathered from ``group``)
    forward(z_a, z_b, temperature)                 (0-d loss, ForwardState), one process
    backward(grad, z_a, z_b, state, temperature)   (dz_a, dz_b), (N, D) each, two tensors that share no memory
    empty_state(z_a, temperature)                  forward's state as empty tensors (the custom op's fake)

None of them checks its inputs: ``fastclr.nt_xent`` has. "triton" is imported here, and only when asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from fastclr.losses import tiled
from fastclr.nt_xent_spec import ForwardState, check_impl, fp32_dot_precision

PATHS = ("torch", "triton")  # the impls with a forward and a backward ("reference" is autograd's)
# Where and for what "auto" runs the kernels (tests add "cpu" to walk the choice under the interpreter).
KERNEL_DEVICE_TYPES = ("cuda",)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backend(NamedTuple):
    """A fast path's functions (signatures in the module docstring)."""

    check: Callable[[torch.Tensor], None]
    loss: Callable[..., torch.Tensor]
    forward: Callable[..., tuple[torch.Tensor, ForwardState]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    empty_state: Callable[[torch.Tensor, float], ForwardState]


@functools.cache  # a failed import is not cached by Python: ask once per process
def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_path(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """A checked ``impl`` as a concrete path. "auto": triton for CUDA tensors of a dtype the kernels take (fp32, bf16,
    fp16; any when ``dtype`` is None) when triton imports, else the tiled torch path."""
    if impl != "auto":
        return impl
    kernel = device.type in KERNEL_DEVICE_TYPES and (dtype is None or dtype in KERNEL_DTYPES)
    return "triton" if kernel and triton_available() else "torch"


def checked_triton(z: torch.Tensor) -> tuple[Backend, str]:
    """The triton path for embeddings z and its dot precision ("tf32" or "ieee" for fp32 as PyTorch's TF32 switch says,
    see ``fp32_dot_precision``; bf16/fp16 use their own tensor-core dots), once the kernel has checked z (a TypeError
    or ValueError naming what it does not take)."""
    precision = fp32_dot_precision() if z.dtype == torch.float32 else "tf32"
    kernel = backend("triton", precision)
    kernel.check(z)
    return kernel, precision


def resolve_impl(impl: str, device: torch.device) -> str:
    """``pick_path`` for an unchecked ``impl`` (a ValueError unless it is one of IMPLS)."""
    return pick_path(check_impl(impl), device)


def _takes_any_float(z: torch.Tensor) -> None:
    """The tiled path runs on any floating dtype and device: nothing to add to ``check_embeddings``."""


def _tiled_backward(grad, z_a, z_b, state, temperature):
    dz_a, dz_b = tiled.tiled_backward(grad, state, temperature, dtype=z_a.dtype)
    # Two views of one (A, D) buffer: copies, since the custom op's outputs may not alias each other.
    return dz_a.clone(), dz_b.clone()


_TILED = Backend(
    check=_takes_any_float,
    loss=tiled.nt_xent_tiled,
    forward=tiled.tiled_forward,
    backward=_tiled_backward,
    empty_state=tiled.empty_state,
)


_TRITON: dict[str, Backend] = {}


def backend(impl: str, precision: str = "tf32") -> Backend:
    """The functions of path ``impl`` ("torch" | "triton"). ``precision`` ("tf32" | "ieee") reaches the kernel's fp32
    dot products only."""
    if impl == "torch":
        return _TILED
    if impl == "triton":
        if (
            precision not in _TRITON
        ):  # built once per precision: every loss call (forward, backward) asks
            from fastclr.kernels import nt_xent as kernel

            _TRITON[precision] = Backend(
                check=partial(kernel.check_supported, precision=precision),
                loss=partial(kernel.nt_xent_triton, precision=precision),
                forward=partial(kernel.nt_xent_forward, precision=precision),
                backward=partial(kernel.nt_xent_backward, precision=precision),
                empty_state=partial(kernel.empty_state, precision=precision),
            )
        return _TRITON[precision]
    raise ValueError(f"impl must be one of {PATHS} for a fast path, got {impl!r}")
