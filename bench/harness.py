"""The harness every benchmark shares: where results go, the environment row, CSV appending, a text table.

    parser = argparse.ArgumentParser()
    add_out_argument(parser)                            # --out DIR (default: default_out_dir())
    args = parser.parse_args()
    env = environment("cuda")                           # date, device, CPU, versions
    rows = [{**env, **measured} for measured in ...]
    print_table(rows, ["impl", "two_n", "median_ms"])
    append_csv(args.out / "bench_x.csv", rows)          # refuses rows whose columns differ from the file's

Results land in ``bench/results/`` when the benchmarks run from a source checkout, else in ``./fastclr-bench``: an
installed fastclr never writes into its own package folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

BENCH_DIR = Path(__file__).resolve().parent
INSTALL_DIRS = ("site-packages", "dist-packages")


def default_out_dir() -> Path:
    """``bench/results/`` inside a source checkout of fastclr, else ``fastclr-bench/`` in the working directory.

    A checkout is recognised by the bench folder's parent holding fastclr's ``pyproject.toml`` while the bench folder
    is not inside an installation (``site-packages``); an editable install runs from the checkout and counts as one.
    """
    pyproject = BENCH_DIR.parent / "pyproject.toml"
    installed = any(part in INSTALL_DIRS for part in BENCH_DIR.parts)
    if not installed and pyproject.is_file() and 'name = "fastclr"' in pyproject.read_text():
        return BENCH_DIR / "results"
    return Path.cwd() / "fastclr-bench"


def add_out_argument(parser: argparse.ArgumentParser) -> argparse.Action:
    """Add ``--out DIR``, the folder the benchmark writes its CSV (and plots) into."""
    return parser.add_argument(
        "--out",
        type=Path,
        default=default_out_dir(),
        metavar="DIR",
        help="folder for the CSV and plots (default: %(default)s; bench/results in a source "
        "checkout, else ./fastclr-bench)",
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _installed_version(prefix: str) -> str:
    """Version of the first installed distribution whose name starts with ``prefix`` (DALI's names carry its CUDA)."""
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower().startswith(prefix):
            return dist.version
    return "absent"


def environment(device=None) -> dict[str, str]:
    """What a result row needs to be comparable later: date, device, CPU, load, versions.

    Args:
        device: what the benchmark runs on: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or a ``torch.device``;
            None means the CPU.

    Returns:
        Strings keyed by the column names the CSVs under ``bench/results/`` use: ``date`` (local, with its UTC
        offset), ``device`` (the GPU's name, or the CPU's with its core count), ``cpu``, ``cpu_threads`` (torch's
        intra-op threads), ``load_avg`` (1 min; other work skews wall-clock rates), ``python``, ``torch``,
        ``torchvision``, ``triton``, ``dali``, ``pillow``, ``fastclr`` (``"absent"`` where not installed).
    """
    import torch
    import torchvision

    from fastclr import __version__ as fastclr_version
    from fastclr.device import DEVICE_CHOICES, resolve_device

    if device is None:
        device = torch.device("cpu")
    elif isinstance(device, str):
        device = resolve_device(device) if device in DEVICE_CHOICES else torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{_cpu_name()} ({cores} cores)"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_threads": str(torch.get_num_threads()),
        "load_avg": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": _installed_version("triton"),
        "dali": _installed_version("nvidia-dali"),
        "pillow": _installed_version("pillow"),
        "fastclr": fastclr_version,
    }


def append_csv(path: str | Path, rows: Sequence[Mapping]) -> Path:
    """Append ``rows`` to the CSV at ``path``, creating it (and its folder) with a header if it does not exist.

    The columns are the rows' keys in order of first appearance (a key a row lacks is written empty). An existing
    file must have the same columns (in any order; its order is kept); otherwise nothing is written and SystemExit
    names the file and the columns that differ, so rows never land under another benchmark's header.
    """
    path = Path(path)
    if not rows:
        return path
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if set(header) != set(columns):
            missing = [c for c in header if c not in columns]
            extra = [c for c in columns if c not in header]
            raise SystemExit(
                f"{path} has other columns than this run's rows (the file's, not in the rows: "
                f"{', '.join(missing) or '-'}; the rows', not in the file: {', '.join(extra) or '-'}); "
                "nothing was written: choose another --out folder (or --csv file)"
            )
        columns, new = header, False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def print_table(
    rows: Sequence[Mapping], columns: Sequence[str] | None = None, file: TextIO | None = None
) -> None:
    """Print ``rows`` as an aligned text table: one line per row, ``columns`` (default: every key) as the header.

    Floats get four significant digits, a missing value or None shows as ``-``; numeric columns align right.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), int | float) for row in rows if row.get(c) is not None)
        for c in columns
    ]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]

    def line(values) -> str:
        parts = [
            f"{v:>{w}}" if num else f"{v:<{w}}"
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = file or sys.stdout
    print(line(columns), file=out)
    for values in cells:
        print(line(values), file=out)
    out.flush()
