"""A Triton driver without a device: the real launch path on CPU tensors, compiled for sm_80 / sm_90, never run.

    with stub_driver(90) as drv:                  # a process without TRITON_INTERPRET=1
        loss = nt_xent_triton(z_a, z_b, 0.5)      # CPU tensors
    for launch in drv.launches:
        print(launch.name, launch.grid, launch.compiled().asm["ptx"][:80])

Everything between the call and the GPU is Triton's own code: the autotuner and its pruning, the JIT's specialisation on
the real arguments (16-byte-aligned pointers, integers divisible by 16 or equal to 1), option parsing and compilation for
``GPUTarget("cuda", arch, 32)``. The driver only answers the questions a device would (target, device properties, a
stream), loads nothing, and records each launch instead of running it; its benchmarker returns fixed timings, so
autotuning completes and keeps the first of its pruned configs. Output tensors keep whatever ``torch.empty`` gave them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.backends.nvidia.driver import ty_to_cpp

# Per-block opt-in shared memory (CUDA occupancy tables); CompiledKernel refuses to load a kernel that needs more.
MAX_SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# SMs of the data-centre part of each architecture (A100, H100 SXM): the kernels size their grids by it.
SM_COUNT = {80: 108, 90: 132}
FIXED_TIMING_MS = 1.0
# The options a launch passes to the compiler; the rest are the backend's defaults for the target.
_LAUNCH_OPTIONS = (
    "num_warps", "num_ctas", "num_stages", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid", "launch_pdl",
    "debug", "instrumentation_mode",
)  # fmt: skip


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the compiled kernel's source (function, signature, constexprs, attrs), metadata and grid."""

    src: object  # triton.compiler.ASTSource, built by the JIT from the launch's arguments
    metadata: object  # the compiled kernel's metadata: hash, target, options, shared memory, ...
    grid: tuple[int, int, int]
    scalars: dict[str, object]  # the integer and float arguments by name (constexprs included)

    @property
    def name(self) -> str:
        return self.src.fn.__name__

    @property
    def constexprs(self) -> dict[str, object]:
        """Constexpr arguments by name (the JIT keys them by argument-index path)."""
        names = self.src.fn.arg_names
        return {
            names[path[0]]: value for path, value in self.src.constants.items() if len(path) == 1
        }

    @property
    def attrs(self) -> dict[str, list]:
        """Specialisation attributes by argument name, e.g. {"zhat_ptr": [["tt.divisibility", 16]]}."""
        names = self.src.fn.arg_names
        return {
            names[path[0]]: value
            for path, value in self.src.attrs.items()
            if len(path) == 1 and value
        }

    def options(self) -> dict:
        return {k: getattr(self.metadata, k) for k in _LAUNCH_OPTIONS if hasattr(self.metadata, k)}

    def compiled(self):
        """The CompiledKernel this launch ran (from Triton's cache; the same hash, so the same binary)."""
        kernel = triton.compile(self.src, target=self.metadata.target, options=self.options())
        if kernel.hash != self.metadata.hash:
            raise RuntimeError(f"{self.name}: recompiling the launch gave another kernel")
        return kernel


class _Utils:
    """The driver utilities a CompiledKernel calls: device properties and loading (nothing is loaded)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device) -> dict:
        return dict(
            max_shared_mem=MAX_SHARED_PER_BLOCK.get(self.arch, 99 * 1024),
            multiprocessor_count=SM_COUNT.get(self.arch, 132),
            max_num_regs=65536,
            warpSize=32,
            sm_clock_rate=1_980_000,
            mem_clock_rate=2_619_000,
            mem_bus_width=5120,
        )

    def load_binary(self, name, kernel, shared, device):
        # module None: CompiledKernel then never unloads anything; 1024 threads per block.
        return None, name, 0, 0, 1024

    def unload_module(self, module) -> None:
        pass


def _fixed_timings(kernel_call, quantiles=None, **kwargs):
    """The benchmarker: runs nothing, every config takes FIXED_TIMING_MS, so the autotuner keeps its first config."""
    return [FIXED_TIMING_MS] * len(quantiles) if quantiles else FIXED_TIMING_MS


@dataclass
class StubDriver(DriverBase):
    """Target sm_{arch}; launches are appended to ``launches``."""

    arch: int
    launches: list[Launch] = field(default_factory=list)

    def __post_init__(self):
        self.target = GPUTarget("cuda", self.arch, 32)
        self.utils = _Utils(self.arch)
        driver = self

        class _Launcher:
            def __init__(self, src, metadata):
                self.src, self.metadata = src, metadata

            def __call__(
                self,
                gx,
                gy,
                gz,
                stream,
                function,
                packed_metadata,
                launch_metadata,
                enter,
                exit_,
                *args,
            ):
                names = self.src.fn.arg_names
                scalars = {
                    k: v
                    for k, v in zip(names, args, strict=True)
                    if isinstance(v, (bool, int, float))
                }
                driver.launches.append(Launch(self.src, self.metadata, (gx, gy, gz), scalars))

        self.launcher_cls = _Launcher

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked on its own: only ``stub_driver`` installs it

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_current_device(self) -> str:
        # The JIT keeps one kernel cache per device: one per stub architecture, never shared with a real GPU's.
        return f"stub-sm{self.arch}"

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_benchmarker(self):
        return _fixed_timings

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(0)

    def clear_cache(self, cache) -> None:
        pass

    def launched(self, name: str) -> list[Launch]:
        """The launches of the kernel function called ``name``, in order."""
        return [launch for launch in self.launches if launch.name == name]


@contextmanager
def stub_driver(arch: int):
    """Make a StubDriver(arch) Triton's active driver for the block; the previous one comes back afterwards."""
    from triton import knobs
    from triton.runtime import driver as config

    if knobs.runtime.interpret:
        raise RuntimeError(
            "TRITON_INTERPRET=1 turns kernels into interpreted functions, which never reach a driver: use the stub "
            "driver in a process without it"
        )
    stub = StubDriver(arch)
    # Not .active: with no GPU that would try (and fail) to create a default driver.
    previous = config._active
    config.set_active(stub)
    try:
        yield stub
    finally:
        config.set_active(previous)
