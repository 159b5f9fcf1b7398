"""Child processes that compile the Triton kernels for a GPU target on a machine without one (``fastclr.kernels.
stub_driver``), for the compile tests.

The test session interprets the kernels (TRITON_INTERPRET=1, see conftest), and interpreted kernels cannot be compiled,
so these tests run a script in a child process with the interpreter off and the session's Triton cache (the
``triton_cache`` fixture of conftest).

Compiling is mostly ptxas on one core, while much of the rest of the suite leaves the second core idle, so conftest
starts the children the selected tests will ask for at the beginning of the session (``start_early``: one at a time,
in the background, at low priority). A test that asks for a child waits for its result; a child nobody started early
runs when asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

# args -> (done, [result]) of the children started early
_EARLY: dict[tuple[str, ...], tuple[threading.Event, list]] = {}
_RUNNING: set[subprocess.Popen] = set()
_STOP = threading.Event()


def _run(args: list[str], cache: str, timeout: float, nice: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache)
    with subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    ) as proc:  # fmt: skip
        _RUNNING.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            _RUNNING.discard(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_early(commands: list[list[str]], cache: str, timeout: float = 3600) -> None:
    """Run ``commands`` (each the args of ``run_compiling``) one after another in a daemon thread, at nice 10.

    Each keeps its result (or the exception it raised, e.g. its timeout) for the ``run_compiling`` call with the same
    args."""
    todo = []
    for args in commands:
        if tuple(args) not in _EARLY:
            _EARLY[tuple(args)] = (threading.Event(), [])
            todo.append(args)

    def lane():
        for args in todo:
            done, result = _EARLY[tuple(args)]
            if _STOP.is_set():
                break
            try:
                result.append(_run(args, cache, timeout, nice=10))
            except Exception as exc:  # handed to the test that asks for it
                result.append(exc)
            done.set()

    threading.Thread(target=lane, name="compile-children", daemon=True).start()


def stop_early() -> None:
    """End of the session: kill the running children and start no more."""
    _STOP.set()
    for proc in list(_RUNNING):
        proc.kill()


def run_compiling(args: list[str], cache: str, timeout: float) -> subprocess.CompletedProcess:
    """``python *args`` with TRITON_INTERPRET=0 and Triton's cache in ``cache``; stdout and stderr captured. The
    result of the child ``start_early`` started with these args, once it ended (within ``timeout`` of this call)."""
    early = _EARLY.get(tuple(args))
    if early is None:
        return _run(args, cache, timeout)
    done, result = early
    if not done.wait(timeout):
        raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def param(item, name: str):
    """The value of parameter (or parametrised fixture) ``name`` of a test item; None where it has none."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(name) if callspec is not None else None


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
