"""Contrastive-loss forward+backward: time and peak extra memory per implementation, side by side, with the three-GEMM
floor.

    python bench/bench_loss.py                       # 2N in {1024, 4096, 16384, 65536}, D = 128, fp32, this device
    python bench/bench_loss.py --sizes 1024 4096 --impls torch reference lightly --repeats 5
    python bench/bench_loss.py --world-size 2        # + gathered negatives over 2 gloo ranks (communication vs loss)
    python bench/bench_loss.py --loss supcon --impls torch materialised   # the family: ntxent-bank, dcl, dclw, supcon
    fastclr bench loss ...                            # the same

--loss picks the loss (default ntxent). ntxent-bank is NT-Xent against a memory bank of K = --bank-size negatives
(default 2N, the column count of in-batch NT-Xent) with N anchors; supcon draws labels from --classes classes.
Providers: torch and reference for every loss; lightly for ntxent, ntxent-bank, dcl, dclw; materialised for supcon
(the usual materialising implementation written from the paper: a (2N)^2 float mask and logits); triton (CUDA) for
every loss.

Every (impl, 2N) runs in a fresh child process: peak memory is the child's RSS high-water mark (CPU, reset once the inputs exist) or the CUDA allocator's peak
above the baseline taken after the inputs exist, and an address-space limit (--mem-limit-gb) turns "would not fit" into a
reported out-of-memory instead of a swapping machine. Time is the median of repeated forward+backward passes after a
warm-up (CUDA: triton.testing.do_bench). The floor is three (2N x D) @ (D x 2N) GEMMs timed in the same child way:
forward+backward of NT-Xent cannot do less matrix work (S once forward; S again and P @ Z backward).
Results: a table on stdout, rows appended to bench_loss.csv (ntxent) or bench_loss_family.csv (the other losses, with
their loss, bank size and classes) and a plot bench_loss.png / bench_loss_<loss>.png in --out (default: bench/results/
in a source checkout, else ./fastclr-bench).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

IMPLS = ("floor", "torch", "triton", "reference", "compile", "lightly", "materialised")
DEFAULT_SIZES = (1024, 4096, 16384, 65536)
LOSSES = ("ntxent", "ntxent-bank", "dcl", "dclw", "supcon")
# The providers each loss has (the default --impls); "compile" and the named kernel variants are NT-Xent's only.
LOSS_IMPLS = {
    "ntxent": ("floor", "torch", "triton", "reference", "compile", "lightly"),
    "ntxent-bank": ("floor", "torch", "triton", "reference", "lightly"),
    "dcl": ("floor", "torch", "triton", "reference", "lightly"),
    "dclw": ("floor", "torch", "triton", "reference", "lightly"),
    "supcon": ("floor", "torch", "triton", "reference", "materialised"),
}


def supcon_materialised(z_a, z_b, labels, temperature: float):
    """SupCon L_out (Khosla et al. 2020) as it is usually written: a (2N, 2N) float mask of equal labels, the logits
    made stable by their row maximum, the self entries masked out by multiplication. Every (2N)^2 intermediate is
    kept for backward: the memory the tiled path avoids."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    y = torch.cat([labels, labels])
    same = (y[:, None] == y[None, :]).float()
    not_self = 1.0 - torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(dim=1, keepdim=True))
    positives = same * not_self
    return -((positives * log_prob).sum(dim=1) / positives.sum(dim=1)).mean()


def require_cuda() -> None:
    """RuntimeError('skipped: ...') without a CUDA device: the triton providers time compiled kernels only."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "skipped: no CUDA device (the Triton interpreter is a correctness tool, not a fast path)"
        )


def make_family_loss_fn(
    loss: str,
    impl: str,
    temperature: float,
    bank_size: int,
    d: int,
    *,
    device="cpu",
    interpret: bool = False,
):
    """A callable (z_a, z_b, labels) -> loss for one provider of a family loss (the labels (N,) are supcon's; the
    others ignore them), its module (and bank) on ``device``; raises RuntimeError('skipped: ...') where the provider
    does not exist for that loss, or for triton without a CUDA device unless ``interpret`` (the GPU check's dry run)."""
    import fastclr

    if impl not in LOSS_IMPLS[loss]:
        raise RuntimeError(f"skipped: no {impl} provider for --loss {loss}")
    if impl == "triton" and not interpret:
        require_cuda()
    if impl == "lightly":
        try:
            import lightly.loss as lightly_loss
        except ImportError as exc:
            raise RuntimeError(f"skipped: lightly is not installed ({exc})") from None
        if loss == "ntxent-bank":
            module = lightly_loss.NTXentLoss(temperature, memory_bank_size=(bank_size, d))
        else:
            module = {"dcl": lightly_loss.DCLLoss, "dclw": lightly_loss.DCLWLoss}[loss](temperature)
    elif loss == "supcon":
        if impl == "materialised":
            return lambda a, b, y: supcon_materialised(a, b, y, temperature)
        return lambda a, b, y: fastclr.supcon(a, b, y, temperature, impl=impl)
    elif loss == "ntxent-bank":
        module = fastclr.NTXentLoss(temperature, memory_bank_size=(bank_size, d), impl=impl)
    else:
        module = {"dcl": fastclr.DCLLoss, "dclw": fastclr.DCLWLoss}[loss](temperature, impl=impl)
    module = module.to(device)  # a bank lives where the embeddings are
    return lambda a, b, y: module(a, b)


def make_loss_fn(impl: str, temperature: float):
    """A callable (z_a, z_b) -> loss for one provider; raises RuntimeError('skipped: ...') where it cannot run."""
    import torch

    import fastclr
    from fastclr.losses.reference import nt_xent_reference

    if impl == "lightly":
        try:
            from lightly.loss import NTXentLoss as LightlyNTXent
        except ImportError as exc:
            raise RuntimeError(f"skipped: lightly is not installed ({exc})") from None
        return LightlyNTXent(temperature=temperature)
    if impl == "compile":
        return torch.compile(lambda a, b: nt_xent_reference(a, b, temperature))
    if impl == "materialised":
        raise RuntimeError("skipped: the materialised provider is SupCon's (--loss supcon)")
    if impl.startswith("triton"):
        require_cuda()
    if impl.startswith("triton:"):  # a named kernel variant, e.g. triton:BM64_BN64_W4_S3
        from fastclr.kernels.nt_xent import nt_xent_triton

        config = impl.split(":", 1)[1]
        return lambda a, b: nt_xent_triton(a, b, temperature, config=config)
    return lambda a, b: fastclr.nt_xent(a, b, temperature, impl=impl)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark (Linux) and return the current RSS in bytes.

    Without the reset, a transient peak from importing torch can hide the loss's own memory at small sizes.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (_status_kb("VmRSS") or 0) * 1024


def peak_rss() -> int:
    """Peak RSS in bytes since the last reset_peak_rss (VmHWM), or the process's ru_maxrss elsewhere."""
    hwm = _status_kb("VmHWM")
    return (
        hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def _child(spec: dict) -> dict:
    """Run one (impl, 2N) measurement in this process and return its result row."""
    import torch

    impl, two_n, d, device = spec["impl"], spec["two_n"], spec["d"], spec["device"]
    loss_name = spec.get("loss", "ntxent")
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    n = two_n // 2
    z_a = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    z_b = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, spec.get("classes", 100), (n,), device=device)
    cuda = device == "cuda"

    if impl == "floor":
        z = torch.cat([z_a, z_b]).detach()
        block = 1024

        def step():
            for _ in range(3):
                for s in range(0, two_n, block):
                    z[s : s + block] @ z.T
    else:
        if loss_name == "ntxent":
            ntxent = make_loss_fn(impl, spec["temperature"])
            fn = lambda a, b, y: ntxent(a, b)  # noqa: E731
        else:
            bank_size = spec.get("bank_size") or two_n
            fn = make_family_loss_fn(
                loss_name, impl, spec["temperature"], bank_size, d, device=device
            )

        def step():
            loss = fn(z_a, z_b, labels)
            loss.backward()
            z_a.grad = z_b.grad = None

    if impl not in ("floor", "compile"):
        # A tiny call first: lazy imports and op registration must not count as the loss's memory.
        tiny = [torch.randn(2, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        fn(*tiny, labels[:2]).backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    step()  # warm-up (and compilation for the compile provider)
    if cuda:
        import triton.testing

        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        med, lo, hi = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
        times = [med / 1e3, lo / 1e3, hi / 1e3]
    else:
        peak = peak_rss() - base
        samples, start = [], time.perf_counter()
        while len(samples) < spec["repeats"] and (
            len(samples) < 1 or time.perf_counter() - start < spec["budget_s"]
        ):
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
        times = [statistics.median(samples), min(samples), max(samples)]
    return {
        "status": "ok",
        "median_s": times[0],
        "lo_s": times[1],
        "hi_s": times[2],
        "peak_extra_mb": peak / 2**20,
    }


def run_one(spec: dict, mem_limit_gb: float, timeout_s: float) -> dict:
    """Measure one (impl, 2N) in a fresh child process, bounded in memory and time."""
    cmd = [sys.executable, "-m", "fastclr.bench.bench_loss", "--child", json.dumps(spec)]

    def limit():
        if mem_limit_gb > 0:
            cap = int(mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=limit
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else f"exit code {proc.returncode}"
    if "skipped:" in last:
        return {"status": last[last.index("skipped:") :]}
    if any(
        k in proc.stderr
        for k in ("out of memory", "can't allocate memory", "MemoryError", "std::bad_alloc")
    ):
        return {"status": f"out of memory (> {mem_limit_gb:g} GiB)"}
    return {"status": f"failed: {last[:160]}"}


def gemm_flops(two_n: int, d: int) -> float:
    """FLOPs of the three (2N x D) @ (D x 2N) GEMMs forward+backward needs: 3 * 2 * (2N)^2 * D."""
    return 6.0 * two_n * two_n * d


def fmt_time(s):
    return "-" if s is None else (f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s")


# The columns of bench/results/bench_loss.csv: the environment, then the measurement.
CSV_COLUMNS = ("date", "device", "torch", "impl", "two_n", "d", "dtype", "temperature", "median_s", "lo_s", "hi_s",
               "x_floor", "peak_fraction", "peak_extra_mb", "status")  # fmt: skip
# bench_loss_family.csv: the same, after the loss and its own settings (K negatives of ntxent-bank; supcon's classes).
FAMILY_CSV_COLUMNS = ("loss", "bank_size", "classes", *CSV_COLUMNS)


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows as the printed table shows them: times, spread, ratio to the floor, TFLOP/s on the GEMM count."""
    shown = []
    for r in rows:
        t = r.get("median_s")
        shown.append(
            {
                "impl": r["impl"],
                "2N": r["two_n"],
                "time (median)": fmt_time(t),
                "min..max": f"{fmt_time(r.get('lo_s'))}..{fmt_time(r.get('hi_s'))}" if t else "-",
                "x floor": r.get("x_floor") or None,
                "TFLOP/s": round(gemm_flops(r["two_n"], r["d"]) / t / 1e12, 3) if t else None,
                "peak extra": f"{r['peak_extra_mb']:.0f} MiB" if "peak_extra_mb" in r else "-",
                "status": r["status"],
            }
        )
    return shown


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        ok = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["two_n"] for r in ok]
        style = "--" if impl == "floor" else "-o"
        ax_t.loglog(xs, [r["median_s"] for r in ok], style, label=impl, base=2)
        if impl != "floor":
            ax_m.loglog(xs, [max(r["peak_extra_mb"], 1e-1) for r in ok], style, label=impl, base=2)
    ax_t.set(xlabel="2N", ylabel="forward+backward time (s)", title="time")
    ax_m.set(xlabel="2N", ylabel="peak extra memory (MiB)", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{meta.get('loss', 'ntxent')}, D={meta['d']}, {meta['dtype']}, {meta['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="values of 2N")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument(
        "--loss", default="ntxent", choices=LOSSES, help="the loss to time (default: ntxent)"
    )
    p.add_argument(
        "--bank-size",
        type=int,
        default=0,
        help="ntxent-bank: K negatives in the bank (default 0 = 2N)",
    )
    p.add_argument("--classes", type=int, default=100, help="supcon: number of label classes")
    p.add_argument(
        "--impls",
        nargs="+",
        default=None,
        help=f"providers, side by side: {', '.join(IMPLS)}, or triton:<variant> (see --list-variants); "
        "default: every provider of --loss",
    )
    p.add_argument(
        "--list-variants",
        action="store_true",
        help="list the named Triton kernel variants and exit",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (CPU), at most")
    p.add_argument(
        "--budget-s", type=float, default=20.0, help="stop repeating after this many seconds (CPU)"
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=20.0,
        help="address-space cap per child (CPU); 0 = none",
    )
    p.add_argument("--timeout-s", type=float, default=900.0, help="wall-clock cap per child")
    p.add_argument(
        "--world-size", type=int, default=0, help="also time gathered negatives over W gloo ranks"
    )
    p.add_argument("--no-plot", action="store_true")
    add_out_argument(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        try:
            print(json.dumps(_child(json.loads(args.child))))
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            sys.exit(3)
        return []

    if args.list_variants:
        from fastclr.kernels.nt_xent import list_configs

        print("\n".join(f"triton:{name}" for name in list_configs()))
        return []
    if args.impls is None:
        args.impls = list(LOSS_IMPLS[args.loss])
    for impl in args.impls:
        if impl not in IMPLS and not impl.startswith("triton:"):
            p.error(
                f"--impls: unknown provider {impl!r}; choose from {', '.join(IMPLS)} or triton:<variant>"
            )

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    meta = {
        "device": env["device"],
        "d": args.dim,
        "dtype": args.dtype,
        "temperature": args.temperature,
    }
    family = args.loss != "ntxent"
    if family:
        meta |= {"loss": args.loss, "bank_size": args.bank_size, "classes": args.classes}
    mem_limit = args.mem_limit_gb if device == "cpu" else 0
    print(
        f"{args.loss} forward+backward on {meta['device']}; D={args.dim}, {args.dtype}, tau={args.temperature}"
    )
    rows = []
    for two_n in args.sizes:
        if two_n < 2 or two_n % 2:
            p.error(f"--sizes: 2N must be an even number >= 2, got {two_n}")
        for impl in args.impls:
            spec = {"impl": impl, "two_n": two_n, "d": args.dim, "dtype": args.dtype, "device": device,
                    "temperature": args.temperature, "repeats": args.repeats, "budget_s": args.budget_s,
                    "loss": args.loss, "bank_size": args.bank_size, "classes": args.classes}  # fmt: skip
            t0 = time.perf_counter()
            res = run_one(spec, mem_limit, args.timeout_s)
            row = {"impl": impl, "two_n": two_n, "d": args.dim, **res}
            if device == "cuda" and res.get("median_s"):
                from fastclr.kernels.report import H100_BF16_TFLOPS

                row["peak_fraction"] = (
                    gemm_flops(two_n, args.dim) / res["median_s"] / 1e12 / H100_BF16_TFLOPS
                )
            rows.append(row)
            print(f"  {impl:<10} 2N={two_n:<6} {fmt_time(res.get('median_s')):>10}  {res['status']}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    floors = {r["two_n"]: r.get("median_s") for r in rows if r["impl"] == "floor"}
    for r in rows:
        floor, t = floors.get(r["two_n"]), r.get("median_s")
        r["x_floor"] = round(t / floor, 3) if t and floor else ""
    print()
    print_table(table_rows(rows))
    columns, stem = (
        (FAMILY_CSV_COLUMNS, "bench_loss_family") if family else (CSV_COLUMNS, "bench_loss")
    )
    path = append_csv(
        args.out / f"{stem}.csv",
        [{key: (env | meta | r).get(key, "") for key in columns} for r in rows],
    )
    print(f"\nappended {len(rows)} rows to {path}")
    if not args.no_plot:
        png = args.out / (f"bench_loss_{args.loss}.png" if family else "bench_loss.png")
        plot(rows, meta, png)
        print(f"plot: {png}")
    if args.world_size:
        from fastclr.bench.bench_dist import main as dist_main

        dist_main(
            [
                "--world-size",
                str(args.world_size),
                "--sizes",
                *map(str, args.sizes),
                "--dim",
                str(args.dim),
                "--out",
                str(args.out),
            ]
        )
    return rows


if __name__ == "__main__":
    main()
