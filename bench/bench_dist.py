"""NT-Xent with negatives gathered across W ranks: the time of the communication next to the time of the loss, per rank.

    python -m fastclr.bench.bench_dist --world-size 2 --sizes 512 2048 --impls reference torch
    python bench/bench_loss.py --world-size 2 ...          (the loss benchmark hands its --world-size runs to this module)

W processes join a gloo group on 127.0.0.1 (NCCL with ``--device cuda``, one GPU per rank). Every rank runs
``nt_xent(z_a, z_b, gather_distributed=True)`` forward and backward on its own 2N embeddings (``--sizes`` are values of
2N, as in ``bench_loss.py``) against the 2N*W rows of all ranks. Every ``torch.distributed`` collective called meanwhile
(the shape check, the all_gather of rows and per-row statistics, the backward's scalar gather, or the reference's autograd
all_gather and its backward) is timed, so each row reports, per rank and per phase, the wall time of the loss and the
part of it spent communicating. Timings are medians over at most ``--reps`` iterations (within ``--budget-s``) after
``--warmup``; ranks meet before each iteration so that one rank's lag is not booked as another's communication.

``fastclr.testing.distributed.spawn_world`` starts the W processes, bounds them in time and always tears them down.
A table goes to stdout; rows are appended to ``loss_dist.csv`` in ``--out`` (default ``bench/results/`` in a checkout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table
from fastclr.testing.distributed import spawn_world

BENCH_IMPLS = ("reference", "torch", "triton")
CSV_NAME = "loss_dist.csv"
# Collectives of torch.distributed that the loss paths may call (gloo emulates all_to_all with scatter).
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)


class CollectiveTimer:
    """Times every ``torch.distributed`` collective called inside ``with timer:`` (wall clock, per call).

    Gloo collectives return when done, so their wall time is their cost on this rank (waiting for peers included). For
    CUDA tensors the stream is synchronised around each call, which costs the overlap that NCCL could have had.
    """

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0
        self._saved: dict[str, Callable] = {}

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.sync_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            # The first argument of every collective is its output (or in-place) tensor or list of tensors.
            out = args[0] if args else None
            tensors = out if isinstance(out, (list, tuple)) else [out]
            self.bytes += sum(
                t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)
            )
            return result

        return timed

    def __enter__(self) -> CollectiveTimer:
        import torch.distributed as dist

        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


def _median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _agree_max(value: float, device: torch.device) -> float:
    """The maximum of ``value`` over all ranks (also a barrier): decisions that change the collectives must agree."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32)
    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _skip_reason(
    impl: str,
    two_n: int,
    world_size: int,
    previous: tuple[int, float] | None,
    budget_s: float,
    max_logits_gb: float,
) -> str:
    """Why (impl, 2N) is not run, or "": the reference's (2N, 2N*W) logits too large, or one iteration over the budget."""
    if impl == "reference":
        # Logits, their masked copy, softmax and its gradient: about four fp32 (2N, 2N*W) matrices alive at once.
        gb = 4 * two_n * two_n * world_size * 4 / 2**30
        if gb > max_logits_gb:
            return f"skipped: ~{gb:.0f} GB of materialised logits > {max_logits_gb:g} GB"
    if previous is not None:
        prev_two_n, prev_s = previous
        predicted = prev_s * (two_n / prev_two_n) ** 2  # the GEMMs are (2N x D) @ (D x 2N*W)
        if predicted > budget_s:
            return f"skipped: one iteration predicted {predicted:.0f} s > budget {budget_s:g} s"
    return ""


def measure_rank(
    rank: int,
    world_size: int,
    sizes: Sequence[int],
    impls: Sequence[str],
    dim: int,
    temperature: float,
    dtype_name: str,
    warmup: int,
    reps: int,
    device_type: str,
    budget_s: float = 20.0,
    max_logits_gb: float = 4.0,
) -> list[dict]:
    """One rank's measurements, run inside a process group: a row per (impl, 2N), as described in ``run_world``.

    Each rank holds 2N embeddings (z_a, z_b: (N, dim) each, seeded by rank) and times ``nt_xent(...,
    gather_distributed=True)`` forward and backward, every collective inside timed by a ``CollectiveTimer``. Sizes run
    in increasing order; whether to repeat, and whether to run a size at all, is agreed by all ranks (their maximum
    time), since a rank that skips would leave the others waiting in a collective.
    """
    from fastclr import nt_xent

    device = torch.device(f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu")
    dtype = getattr(torch, dtype_name)
    timer = CollectiveTimer(sync_cuda=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)  # seeds offset by rank
    rows = []
    for impl in impls:
        previous = None  # (2N, slowest rank's seconds per iteration) of the last size run
        for two_n in sorted(sizes):
            row = {"world_size": world_size, "rank": rank, "impl": impl, "two_n": two_n}
            row |= {"dim": dim, "dtype": dtype_name, "threads": torch.get_num_threads()}
            reason = _skip_reason(impl, two_n, world_size, previous, budget_s, max_logits_gb)
            if reason:
                rows.append(row | {"status": reason})
                continue
            n = two_n // 2
            z_a = torch.randn(n, dim, generator=gen).to(device, dtype).requires_grad_()
            z_b = torch.randn(n, dim, generator=gen).to(device, dtype).requires_grad_()
            samples = {key: [] for key in ("fwd", "bwd", "fwd_comm", "bwd_comm")}
            calls, nbytes = {}, {}
            begin = None
            for it in range(warmup + reps):
                z_a.grad = z_b.grad = None
                if it == warmup:
                    begin = time.perf_counter()
                # Doubles as the barrier that aligns the ranks before each iteration.
                over = _agree_max(
                    float(begin is not None and time.perf_counter() - begin > budget_s), device
                )
                if over:
                    break
                sync()
                with timer:
                    timer.reset()
                    start = time.perf_counter()
                    loss = nt_xent(z_a, z_b, temperature, impl=impl, gather_distributed=True)
                    sync()  # host-device sync: the forward must finish inside its own timing
                    mid = time.perf_counter()
                    fwd_comm, calls["fwd"], nbytes["fwd"] = timer.seconds, timer.calls, timer.bytes
                    timer.reset()
                    loss.backward()
                    sync()
                    stop = time.perf_counter()
                    bwd_comm, calls["bwd"], nbytes["bwd"] = timer.seconds, timer.calls, timer.bytes
                if it >= warmup:
                    samples["fwd"].append(mid - start)
                    samples["bwd"].append(stop - mid)
                    samples["fwd_comm"].append(fwd_comm)
                    samples["bwd_comm"].append(bwd_comm)
            totals = [f + b for f, b in zip(samples["fwd"], samples["bwd"], strict=True)]
            comms = [f + b for f, b in zip(samples["fwd_comm"], samples["bwd_comm"], strict=True)]
            previous = (two_n, _agree_max(statistics.median(totals), device))
            total_ms, comm_ms = _median_ms(totals), _median_ms(comms)
            q1, _, q3 = statistics.quantiles(totals, n=4) if len(totals) > 1 else totals * 3
            rows.append(
                row
                | {
                    "status": "ok",
                    "reps": len(totals),
                    "fwd_ms": _median_ms(samples["fwd"]),
                    "fwd_comm_ms": _median_ms(samples["fwd_comm"]),
                    "bwd_ms": _median_ms(samples["bwd"]),
                    "bwd_comm_ms": _median_ms(samples["bwd_comm"]),
                    "total_ms": total_ms,
                    "total_iqr_ms": 1e3 * (q3 - q1),
                    "comm_ms": comm_ms,
                    "loss_ms": total_ms - comm_ms,
                    "comm_share": comm_ms / total_ms if total_ms > 0 else 0.0,
                    "fwd_collectives": calls["fwd"],
                    "bwd_collectives": calls["bwd"],
                    "fwd_comm_bytes": nbytes["fwd"],
                    "bwd_comm_bytes": nbytes["bwd"],
                }
            )
    return rows


def run_world(
    world_size: int,
    sizes: Sequence[int],
    impls: Sequence[str] = ("torch",),
    *,
    dim: int = 128,
    temperature: float = 0.5,
    dtype: str = "float32",
    warmup: int = 1,
    reps: int = 10,
    budget_s: float = 20.0,
    max_logits_gb: float = 4.0,
    threads: int | None = None,
    device: str = "cpu",
    timeout_s: float = 900.0,
) -> list[dict]:
    """Spawn ``world_size`` ranks and measure ``nt_xent(..., gather_distributed=True)`` on each.

    Args:
        world_size: W >= 1 processes (gloo on 127.0.0.1 for device "cpu"; NCCL and W GPUs for "cuda").
        sizes: values of 2N, the anchors per rank (as ``bench_loss.py --sizes``): 2N local rows against 2N*W columns.
        impls: any of "reference", "torch", "triton" (on CPU the triton path runs under TRITON_INTERPRET=1).
        dim: embedding width D.
        temperature: tau.
        dtype: "float32", "float16", "bfloat16" or "float64".
        warmup: untimed iterations per (impl, 2N).
        reps: timed iterations per (impl, 2N), at most: repeating stops once ``budget_s`` is spent.
        budget_s: seconds of timed repetitions per (impl, 2N); a size whose one iteration is predicted (from the
            previous size, quadratically) to take longer is skipped.
        max_logits_gb: the reference path is skipped where its materialised logits would exceed this (per rank).
        threads: torch threads per rank (default: the CPU count divided among the ranks).
        device: "cpu" or "cuda".
        timeout_s: wall-clock limit for the whole run.

    Returns:
        One dict per (rank, impl, 2N), sorted that way, with ``status`` "ok" or why it was skipped. Times are medians in
        ms: ``fwd_ms``/``bwd_ms`` per phase with ``fwd_comm_ms``/``bwd_comm_ms`` the part spent in collectives,
        ``total_ms = loss_ms + comm_ms``; also collective counts and bytes received per phase.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not sizes or any(not isinstance(s, int) or s < 2 or s % 2 for s in sizes):
        raise ValueError(f"sizes are values of 2N: even ints >= 2, got {list(sizes)!r}")
    bad = [impl for impl in impls if impl not in BENCH_IMPLS]
    if bad or not impls:
        raise ValueError(f"impls must be a non-empty subset of {BENCH_IMPLS}, got {list(impls)!r}")
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not (isinstance(reps, int) and reps >= 1 and isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps!r}, warmup={warmup!r}")
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"device='cuda' needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPUs"
        )
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    env = {"TRITON_INTERPRET": "1"} if device == "cpu" and "triton" in impls else {}
    per_rank = spawn_world(
        measure_rank,
        world_size,
        list(sizes),
        list(impls),
        dim,
        float(temperature),
        dtype,
        warmup,
        reps,
        device,
        float(budget_s),
        float(max_logits_gb),
        env=env,
        timeout_s=timeout_s,
        # Ranks wait in collectives for the slowest one's iteration, which the budget bounds.
        pg_timeout_s=max(60.0, 4 * budget_s),
        backend="nccl" if device == "cuda" else "gloo",
        threads=threads,
    )
    return [row for rows in per_rank for row in rows]


def table_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows as the printed table shows them: one line per (rank, impl, 2N), times in ms."""
    shown = []
    for r in rows:
        line = {
            "W": r["world_size"],
            "rank": r["rank"],
            "impl": r["impl"],
            "2N": r["two_n"],
            "D": r["dim"],
        }
        if r["status"] == "ok":
            line |= {
                "fwd ms": r["fwd_ms"],
                "fwd comm": r["fwd_comm_ms"],
                "bwd ms": r["bwd_ms"],
                "bwd comm": r["bwd_comm_ms"],
                "loss ms": r["loss_ms"],
                "comm ms": r["comm_ms"],
                "comm %": 100 * r["comm_share"],
                "iqr ms": r["total_iqr_ms"],
                "reps": r["reps"],
            }
        shown.append(line | {"status": r["status"]})
    return shown


# The columns of bench/results/loss_dist.csv: the environment, then the measurement.
CSV_COLUMNS = (
    "date", "device", "torch", "python", "load_avg_1min",
    "world_size", "rank", "impl", "two_n", "dim", "dtype", "threads", "status", "reps", "fwd_ms", "fwd_comm_ms",
    "bwd_ms", "bwd_comm_ms", "total_ms", "total_iqr_ms", "comm_ms", "loss_ms", "comm_share", "fwd_collectives",
    "bwd_collectives", "fwd_comm_bytes", "bwd_comm_bytes",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_dist",
        description="Per-rank time of the communication and of the NT-Xent loss with negatives gathered across ranks.",
    )
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks W (default 2)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[512, 2048, 8192],
        help="values of 2N, the anchors per rank (default 512 2048 8192)",
    )
    parser.add_argument("--dim", type=int, default=128, help="embedding width D (default 128)")
    parser.add_argument(
        "--impls", nargs="+", default=["reference", "torch"], choices=BENCH_IMPLS, help="paths"
    )
    parser.add_argument("--temperature", type=float, default=0.5, help="tau (default 0.5)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64")
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations (default 1)")
    parser.add_argument(
        "--reps", type=int, default=10, help="timed iterations, at most (default 10)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="seconds of timed repetitions per (impl, 2N); longer sizes are skipped (default 20)",
    )
    parser.add_argument(
        "--max-logits-gb",
        type=float,
        default=4.0,
        help="skip the reference where its (2N, 2N*W) logits would exceed this per rank (default 4)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per rank (default: CPUs / W)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu: gloo on 127.0.0.1; cuda: NCCL, one GPU per rank",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="limit in seconds for the whole run"
    )
    add_out_argument(parser)
    parser.add_argument(
        "--csv",
        default=None,
        help=f"append results to this file instead of OUT/{CSV_NAME}; empty string: no CSV",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Command line: run the world, print the table, append the CSV. Returns the rows."""
    args = build_parser().parse_args(argv)
    rows = run_world(
        args.world_size,
        args.sizes,
        args.impls,
        dim=args.dim,
        temperature=args.temperature,
        dtype=args.dtype,
        warmup=args.warmup,
        reps=args.reps,
        budget_s=args.budget_s,
        max_logits_gb=args.max_logits_gb,
        threads=args.threads,
        device=args.device,
        timeout_s=args.timeout,
    )
    print(
        f"NT-Xent with negatives gathered over W={args.world_size} ranks ({args.device}): per rank, the time of the "
        "loss and of its collectives"
    )
    print_table(table_rows(rows))
    if args.csv != "":
        env = environment(args.device)
        env["load_avg_1min"] = env["load_avg"]  # this CSV's name for it
        path = append_csv(
            args.csv or args.out / CSV_NAME,
            [{key: (env | row).get(key, "") for key in CSV_COLUMNS} for row in rows],
        )
        print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
