"""Test configuration: every Triton kernel runs under the interpreter on CPU tensors (no GPU on CI machines)."""

import os

import pytest

# Must be set before triton is first imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def triton_cache(tmp_path_factory) -> str:
    """One Triton cache per test session: the compile tests' child processes (``compile_child``) build the same kernels
    (the kernel report, the NT-Xent launches, the bank kernel)."""
    return str(tmp_path_factory.getbasetemp() / "triton-cache")
