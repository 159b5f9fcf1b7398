"""Test configuration: every Triton kernel runs under the interpreter on CPU tensors (no GPU on CI machines)."""

import os

# Must be set before triton is first imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "1")
