"""``fastclr::nt_xent_fwd`` / ``fastclr::nt_xent_bwd``: eager values and gradients equal the tiled autograd path, the
fake implementations agree with the real ones, and ``torch.compile(fullgraph=True)`` of ``fastclr.nt_xent`` compiles
with no graph break and gives the eager values and gradients (CPU)."""

from __future__ import annotations

import os

# Before triton is imported: the impl="triton" case runs the kernel under the interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import fastclr
from fastclr.losses.custom_op import nt_xent_op
from fastclr.losses.tiled import nt_xent_tiled


def pair(n=19, d=12, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen)
    return z_a.to(dtype), (z_a + 0.5 * torch.randn(n, d, generator=gen)).to(dtype)


def loss_and_grads(fn, z_a, z_b, upstream=1.3):
    a = z_a.detach().clone().requires_grad_()
    b = z_b.detach().clone().requires_grad_()
    loss = fn(a, b)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("tau", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_op_equals_tiled_function(dtype, tau):
    z_a, z_b = pair(dtype=dtype)
    got = loss_and_grads(lambda a, b: nt_xent_op(a, b, tau), z_a, z_b)
    want = loss_and_grads(lambda a, b: nt_xent_tiled(a, b, tau), z_a, z_b)
    for name, g, w in zip(("loss", "dz_a", "dz_b"), got, want, strict=True):
        assert g.dtype == w.dtype == dtype, name
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


def test_triton_op_equals_tiled_function():
    z_a, z_b = pair(
        n=70
    )  # N >= 64: the kernel's backward loads the diagonal squares' S (the op's fifth residual)
    got = loss_and_grads(
        lambda a, b: nt_xent_op(a, b, 0.2, impl="triton", precision="ieee"), z_a, z_b
    )
    want = loss_and_grads(lambda a, b: nt_xent_tiled(a, b, 0.2), z_a, z_b)
    for name, g, w in zip(("loss", "dz_a", "dz_b"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tau", [0.5, 0.01])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_opcheck_fake_and_autograd_registration(impl, tau):
    """Both temperatures' residuals: the kernel's upper-triangle forward (tau = 0.5) keeps its diagonal squares of S,
    the running-max path (0.01) and the tiled path an empty tensor in their place."""
    z_a, z_b = pair(n=64, d=8)  # N = 64: squares of 64 rows hold no positive
    torch.library.opcheck(torch.ops.fastclr.nt_xent_fwd.default, (z_a, z_b, tau, impl, "ieee"))
    loss, z_hat, norm, lse, square = torch.ops.fastclr.nt_xent_fwd(z_a, z_b, tau, impl, "ieee")
    assert square.numel() == (128 * 64 if impl == "triton" and tau == 0.5 else 0)
    grad = torch.tensor(0.7)
    torch.library.opcheck(
        torch.ops.fastclr.nt_xent_bwd.default,
        (grad, z_a, z_b, z_hat, norm, lse, square, tau, impl, "ieee"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_bad_impl_raises():
    z_a, z_b = pair(n=3, d=4)
    with pytest.raises(ValueError, match="impl must be one of"):
        nt_xent_op(z_a, z_b, 0.5, impl="reference")


def test_compile_fullgraph_matches_eager():
    """fastclr.nt_xent under torch.compile(fullgraph=True): no graph break (fullgraph raises on one), same numbers."""
    torch._dynamo.reset()
    z_a, z_b = pair(n=24, d=16)

    def step(a, b):
        return fastclr.nt_xent(a * 2.0, b, temperature=0.1, impl="torch") * 3.0

    compiled = torch.compile(step, fullgraph=True)
    got = loss_and_grads(compiled, z_a, z_b)
    want = loss_and_grads(lambda a, b: nt_xent_tiled(a * 2.0, b, 0.1) * 3.0, z_a, z_b)
    for name, g, w in zip(("loss", "dz_a", "dz_b"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=name)
    explained = torch._dynamo.explain(step)(z_a, z_b)
    assert explained.graph_break_count == 0, explained.break_reasons
    op_names = [
        str(node.target)
        for graph in explained.graphs
        for node in graph.graph.nodes
        if node.op == "call_function"
    ]
    assert any("fastclr.nt_xent_fwd" in name for name in op_names), op_names
