"""Benchmarks: `python bench/bench_<x>.py` or `fastclr bench <x>`; `harness.py` is what they share (environment row,
CSV appending, table, output folder); `gpu_check.py` is the one-command GPU check (its loss sections in
`gpu_check_loss.py`)."""
