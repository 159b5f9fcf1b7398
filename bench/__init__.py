"""Benchmarks: `python bench/bench_<x>.py` or `fastclr bench <x>`."""
