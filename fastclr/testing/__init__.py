"""Test infrastructure shipped with the package, for fastclr's tests and benchmarks: not part of the public API."""
