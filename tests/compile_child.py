"""Child processes that compile the Triton kernels for a GPU target on a machine without one (``fastclr.kernels.
stub_driver``), for the compile tests.

The test session interprets the kernels (TRITON_INTERPRET=1, see conftest), and interpreted kernels cannot be compiled,
so these tests run a script in a child process with the interpreter off and the session's Triton cache (the
``triton_cache`` fixture of conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_compiling(args: list[str], cache: str, timeout: float) -> subprocess.CompletedProcess:
    """``python *args`` with TRITON_INTERPRET=0 and Triton's cache in ``cache``; stdout and stderr captured."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def failure(proc: subprocess.CompletedProcess) -> str:
    """A failed child's error first (its stderr's last lines, where Python names the exception), then the traceback's
    tail: a log cut short after a few lines still says why."""
    last = " | ".join(proc.stderr.rstrip().splitlines()[-3:])
    return f"child exited with {proc.returncode}: {last}\n{proc.stderr[-6000:]}"


def json_records(args: list[str], cache: str, timeout: float):
    """What the child prints as JSON, once it exited with 0 (else ``failure``)."""
    proc = run_compiling(args, cache, timeout)
    assert proc.returncode == 0, failure(proc)
    return json.loads(proc.stdout)
