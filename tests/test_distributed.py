"""Cross-device negatives (``gather_distributed=True``): W gloo ranks on 127.0.0.1 against one process with the full batch.

The promise: one DDP step on W ranks with N pairs per rank gives the parameter gradients of one process with the N*W
pairs and ``gather_distributed=False``, and the single-process loss is the mean of the rank losses. Spawning processes
that import torch costs seconds, so each world size is spawned once (a module-scoped fixture running every impl and
every check) and the tests below only compare what the ranks sent back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastclr import NTXentLoss, nt_xent
from fastclr.bench.bench_dist import _skip_reason, main, measure_rank, run_world
from fastclr.testing.distributed import spawn_world

IMPLS = ("reference", "torch", "triton")
WORLD_SIZES = (2, 3)
N = 3  # pairs per rank
D_IN, D_HIDDEN, D_OUT = 6, 16, 5
TEMPERATURE = 0.5
# The triton path runs under the interpreter on CPU, in its own precision; the torch paths are checked in float64.
DTYPES = {"reference": torch.float64, "torch": torch.float64, "triton": torch.float32}
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
WORLD_TIMEOUT_S = 240.0


def make_model(dtype: torch.dtype) -> nn.Module:
    """The same small MLP in every process (fixed seed), projecting D_IN -> D_OUT."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT))
    return model.to(dtype)


def make_batch(world_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch: (N*W, D_IN) inputs of both views; rank r holds rows r*N .. (r+1)*N - 1 of each."""
    gen = torch.Generator().manual_seed(world_size)
    x_a = torch.randn(N * world_size, D_IN, generator=gen)
    x_b = x_a + 0.3 * torch.randn(N * world_size, D_IN, generator=gen)
    return x_a.to(dtype), x_b.to(dtype)


def embed(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor):
    """Both views in one forward (one DDP call per step), split back into (z_a, z_b)."""
    z = model(torch.cat([x_a, x_b]))
    return z[: x_a.shape[0]], z[x_a.shape[0] :]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------------
# What every rank runs (module level, so that the spawned processes can unpickle it).


def _ddp_step(ddp, model, x_a, x_b, impl, scale, functional):
    """One DDP step on this rank's batch; the loss is multiplied by ``scale`` before backward."""
    model.zero_grad(set_to_none=True)
    z_a, z_b = embed(ddp, x_a, x_b)
    if functional:
        loss = nt_xent(z_a, z_b, TEMPERATURE, impl=impl, gather_distributed=True)
    else:
        loss = NTXentLoss(TEMPERATURE, impl=impl, gather_distributed=True)(z_a, z_b)
    (loss * scale).backward()
    return {"loss": loss.item(), "grads": grads(model)}


def _uneven(rank, impl, dtype, n, d):
    """The outcome of a loss call with this rank's (n, d): the error type and message, or 'no error'."""
    z_a = torch.randn(n, d, dtype=dtype)
    try:
        nt_xent(z_a, z_a.flip(0), TEMPERATURE, impl=impl, gather_distributed=True)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": "no error"}


def _checks_for_impl(rank, world_size, impl, singleton):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = DTYPES[impl]
    out = {}
    model = make_model(dtype)
    x_a_all, x_b_all = make_batch(world_size, dtype)
    rows = slice(rank * N, (rank + 1) * N)
    x_a, x_b = x_a_all[rows], x_b_all[rows]
    ddp = DDP(model)
    out["mean"] = _ddp_step(ddp, model, x_a, x_b, impl, 1.0, functional=False)
    out["scaled"] = _ddp_step(ddp, model, x_a, x_b, impl, float(rank + 1), functional=True)

    if rank == 0:
        # The single-process equivalent with the same impl: the full batch, nothing gathered.
        single = make_model(dtype)
        z_a, z_b = embed(single, x_a_all, x_b_all)
        loss = nt_xent(z_a, z_b, TEMPERATURE, impl=impl, gather_distributed=False)
        loss.backward()
        out["single"] = {"loss": loss.item(), "grads": grads(single)}

    # A group of one rank is the plain loss: same value, same gradient.
    z = torch.randn(2 * N, D_OUT, dtype=dtype, generator=torch.Generator().manual_seed(rank))
    plain, gathered = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss_plain = nt_xent(plain[:N], plain[N:], TEMPERATURE, impl=impl)
    loss_one = nt_xent(
        gathered[:N], gathered[N:], TEMPERATURE, impl=impl, gather_distributed=True, group=singleton
    )
    (loss_plain * 1.5).backward()
    (loss_one * 1.5).backward()
    out["singleton"] = {
        "plain": (loss_plain.detach(), plain.grad),
        "one_rank_group": (loss_one.detach(), gathered.grad),
    }

    # Uneven per-rank batches must raise on every rank, never hang or answer.
    out["uneven_n"] = _uneven(rank, impl, dtype, N + rank, D_OUT)
    out["uneven_d"] = _uneven(rank, impl, dtype, N, D_OUT + (rank == world_size - 1))
    dist.barrier()  # every rank is past the failed calls: the group still works
    return out


def world_worker(rank: int, world_size: int) -> dict:
    """Every check for every impl on this rank; an impl that fails reports its traceback instead of hiding the others."""
    import traceback

    import torch.distributed as dist

    singleton, _ = dist.new_subgroups(group_size=1)
    results = {}
    for impl in IMPLS:
        try:
            results[impl] = _checks_for_impl(rank, world_size, impl, singleton)
            # The benchmark's accounting of the collectives, on a tiny size (one timed iteration).
            (row,) = measure_rank(
                rank, world_size, [2 * N], [impl], D_OUT, TEMPERATURE, "float32", 0, 1, "cpu"
            )
            results[impl]["bench"] = row
        except Exception:
            results[impl] = {"error": traceback.format_exc()}
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The float64 oracle in this process: per-anchor losses over the materialised full-batch logits.


def per_anchor_losses(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """(2M,) NT-Xent of every anchor of a single batch, rows [z_a; z_b], straight from the definition."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    m = z_a.shape[0]
    logits = (z @ z.T / TEMPERATURE).fill_diagonal_(float("-inf"))
    targets = (torch.arange(2 * m) + m) % (2 * m)
    return F.cross_entropy(logits, targets, reduction="none")


def oracle(world_size: int, dtype: torch.dtype, weights: list[float]) -> dict:
    """Rank losses L_r and the gradient of (1/W) sum_r w_r L_r (what DDP averages to), in float64."""
    model = make_model(dtype).double()
    x_a, x_b = (x.double() for x in make_batch(world_size, dtype))
    losses = per_anchor_losses(*embed(model, x_a, x_b))
    # Rank r's anchors: its N rows of z_a (r*N ...) and its N rows of z_b (N*W + r*N ...).
    owner = torch.arange(N * world_size) // N
    rank_losses = torch.stack(
        [losses[torch.cat([owner == r, owner == r])].mean() for r in range(world_size)]
    )
    (torch.tensor(weights, dtype=torch.float64) @ rank_losses / world_size).backward()
    return {"rank_losses": rank_losses.detach(), "grads": grads(model)}


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCES[dtype]
    # dtype given: torch.as_tensor would otherwise turn a Python float (a double) into float32.
    expected, actual = (torch.as_tensor(x, dtype=torch.float64) for x in (expected, actual))
    # Gradients near zero: scale the absolute tolerance to the tensor's magnitude.
    atol = tol["atol"] + tol["rtol"] * expected.abs().max().item()
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=atol, msg=lambda m: f"{what}: {m}"
    )


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def world(request):
    """(W, per-rank results) of one spawned world running every impl and check."""
    results = spawn_world(
        world_worker, request.param, env={"TRITON_INTERPRET": "1"}, timeout_s=WORLD_TIMEOUT_S
    )
    return request.param, results


def impl_results(world, impl) -> tuple[int, list[dict]]:
    world_size, results = world
    errors = [
        f"rank {r}:\n{res[impl]['error']}" for r, res in enumerate(results) if "error" in res[impl]
    ]
    if errors:
        pytest.fail(
            f"impl={impl} failed on {len(errors)} of {world_size} ranks:\n" + "\n".join(errors)
        )
    return world_size, [res[impl] for res in results]


@pytest.mark.parametrize("impl", IMPLS)
def test_ddp_gradients_equal_full_batch(world, impl):
    world_size, ranks = impl_results(world, impl)
    dtype = DTYPES[impl]
    single = ranks[0]["single"]["grads"]
    expected = oracle(world_size, dtype, [1.0] * world_size)["grads"]
    for name in expected:
        assert_close(single[name], expected[name], dtype, f"single process, {name}")
        for rank, res in enumerate(ranks):
            got = res["mean"]["grads"][name]
            assert_close(got, single[name], dtype, f"W={world_size} rank {rank} vs single, {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_is_mean_of_rank_losses(world, impl):
    world_size, ranks = impl_results(world, impl)
    dtype = DTYPES[impl]
    rank_losses = torch.tensor([res["mean"]["loss"] for res in ranks], dtype=torch.float64)
    assert_close(rank_losses.mean(), ranks[0]["single"]["loss"], dtype, "mean of rank losses")
    expected = oracle(world_size, dtype, [1.0] * world_size)["rank_losses"]
    assert_close(rank_losses, expected, dtype, "rank losses vs oracle")
    # The rank losses differ (each is over its own anchors): the comparison above is not trivially of equal numbers.
    assert rank_losses.max() - rank_losses.min() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_rank_scaled_upstream_gradient(world, impl):
    """loss * (rank + 1) on each rank: every column's gradient must be weighted by the upstream gradient of its owner."""
    world_size, ranks = impl_results(world, impl)
    dtype = DTYPES[impl]
    weights = [float(r + 1) for r in range(world_size)]
    expected = oracle(world_size, dtype, weights)
    unweighted = oracle(world_size, dtype, [sum(weights) / world_size] * world_size)["grads"]
    for name, want in expected["grads"].items():
        # A path that gives every column the local rank's weight (or the mean weight) would not pass.
        assert not torch.allclose(want, unweighted[name], rtol=1e-3, atol=1e-6)
        for rank, res in enumerate(ranks):
            got = res["scaled"]["grads"][name]
            assert_close(got, want, dtype, f"W={world_size} rank {rank}, loss*(rank+1), {name}")
    for rank, res in enumerate(ranks):
        assert_close(
            res["scaled"]["loss"], expected["rank_losses"][rank], dtype, f"rank {rank} loss"
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["uneven_n", "uneven_d"])
def test_uneven_batches_raise_on_every_rank(world, impl, case):
    world_size, ranks = impl_results(world, impl)
    for rank, res in enumerate(ranks):
        outcome = res[case]
        assert outcome["type"] == "ValueError", f"rank {rank}: {outcome}"
        assert "same per-rank batch" in outcome["message"], outcome["message"]
        # The message names every rank's shape, so the user sees which rank is off.
        for r in range(world_size):
            assert f"rank {r}:" in outcome["message"], outcome["message"]


@pytest.mark.parametrize("impl", IMPLS)
def test_one_rank_group_is_plain_loss(world, impl):
    _, ranks = impl_results(world, impl)
    dtype = DTYPES[impl]
    for rank, res in enumerate(ranks):
        (plain_loss, plain_grad), (one_loss, one_grad) = (
            res["singleton"]["plain"],
            res["singleton"]["one_rank_group"],
        )
        assert_close(one_loss, plain_loss, dtype, f"rank {rank} loss")
        assert_close(one_grad, plain_grad, dtype, f"rank {rank} grad")


# ---------------------------------------------------------------------------------------------------------------------
# In this process: no process group at all.


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_no_process_group_is_plain_loss(impl):
    import torch.distributed as dist

    assert not dist.is_initialized()
    z = torch.randn(2 * N, D_OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plain, gathered = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss_plain = nt_xent(plain[:N], plain[N:], TEMPERATURE, impl=impl)
    loss_flag = NTXentLoss(TEMPERATURE, impl=impl, gather_distributed=True)(
        gathered[:N], gathered[N:]
    )
    loss_plain.backward()
    loss_flag.backward()
    assert_close(loss_flag.detach(), loss_plain.detach(), torch.float64, "loss")
    assert_close(gathered.grad, plain.grad, torch.float64, "grad")


def test_gather_without_torch_distributed_raises(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: False)
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="gather_distributed=True needs torch.distributed"):
        nt_xent(z, z.flip(0), gather_distributed=True, impl="torch")
    with pytest.raises(RuntimeError, match="gather_distributed=True needs torch.distributed"):
        NTXentLoss(gather_distributed=True)
    # Without the flag nothing asks for torch.distributed.
    assert torch.isfinite(nt_xent(z, z.flip(0), impl="torch"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gathered_paths_communicate_rows_lse_and_one_scalar(world, impl):
    """Forward: the shape check, the rows, per-row statistics; backward: one scalar per rank, nothing else."""
    world_size, ranks = impl_results(world, impl)
    f32, i64 = 4, 8
    for rank, res in enumerate(ranks):
        row = res["bench"]
        assert (row["world_size"], row["rank"], row["impl"], row["two_n"]) == (
            world_size,
            rank,
            impl,
            2 * N,
        )
        assert (row["status"], row["reps"]) == ("ok", 1), row
        assert row["fwd_collectives"] == 3, row
        # The shape check (2 int64), the normalised rows, then the per-row statistics: (max, log-sum) for the kernel,
        # (max, log-sum, argmax) for the tiled path.
        stats_bytes = row["fwd_comm_bytes"] - world_size * (2 * i64 + 2 * N * D_OUT * f32)
        assert stats_bytes == world_size * 2 * N * (3 if impl == "torch" else 2) * f32, row
        assert row["bwd_collectives"] == 1, row
        assert row["bwd_comm_bytes"] == world_size * f32
        assert 0 < row["comm_ms"] <= row["total_ms"]
        assert row["loss_ms"] == pytest.approx(row["total_ms"] - row["comm_ms"])


def test_reference_path_communicates_gradients_back(world):
    """The reference gathers with autograd: its backward sends the (2N, D) row gradients back to their owners."""
    world_size, ranks = impl_results(world, "reference")
    for res in ranks:
        row = res["bench"]
        assert row["fwd_collectives"] == 2, row  # shape check, autograd all_gather
        assert row["bwd_comm_bytes"] >= 2 * N * D_OUT * 4 * world_size, row


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=0, sizes=[4]), "world_size"),
        (dict(world_size=2, sizes=[]), "sizes"),
        (dict(world_size=2, sizes=[0]), "sizes"),
        (dict(world_size=2, sizes=[7]), "even"),
        (dict(world_size=2, sizes=[4], impls=["fused"]), "impls"),
        (dict(world_size=2, sizes=[4], dtype="int8"), "dtype"),
        (dict(world_size=2, sizes=[4], device="tpu"), "device"),
        (dict(world_size=2, sizes=[4], reps=0), "reps"),
        (dict(world_size=2, sizes=[4], budget_s=0), "budget_s"),
    ],
)
def test_run_world_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_world(**kwargs)


@pytest.mark.slow
def test_bench_main_writes_rows_for_every_rank(tmp_path, capsys):
    csv_path = tmp_path / "loss_dist.csv"
    argv = ["--world-size", "2", "--sizes", "4", "8", "--dim", "8", "--impls", "torch"]
    rows = main([*argv, "--warmup", "0", "--reps", "2", "--csv", str(csv_path)])
    assert sorted((r["rank"], r["two_n"]) for r in rows) == [(0, 4), (0, 8), (1, 4), (1, 8)]
    assert "comm ms" in capsys.readouterr().out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].startswith("date,device,torch")


def test_bench_skips_what_would_not_fit_or_finish():
    # The reference's (2N, 2N*W) logits: 2N = 65536 on 2 ranks is ~128 GB; 2N = 512 is a few MB.
    assert _skip_reason("reference", 65536, 2, None, 20.0, 4.0).startswith("skipped: ~128 GB")
    assert _skip_reason("reference", 512, 2, None, 20.0, 4.0) == ""
    assert _skip_reason("torch", 65536, 2, None, 20.0, 4.0) == ""  # tiled: nothing materialised
    # 1 s at 2N = 1024 predicts 16 s at 4096 (within a 20 s budget) and 64 s at 8192 (not).
    assert _skip_reason("torch", 4096, 2, (1024, 1.0), 20.0, 4.0) == ""
    assert "predicted 64 s" in _skip_reason("torch", 8192, 2, (1024, 1.0), 20.0, 4.0)
